"""What constrained decoding costs a token: the serving engine (in-process) decoding the same chat
prompt alone, free and under a grammar, on a real model; ms per generated token, best of --rounds.

    python benchmarks/structured_overhead.py [--model smollm2-135m-instruct] [--tokens 96] [--rounds 5]

Grammars: JSON mode (response_format json_object, serve/grammar.py: llguidance, no free
whitespace) and a JSON schema of an object with a string array. Free text runs --tokens tokens; a
grammar may finish sooner, so the cost is per token. Also the mask alone: Constraints.allowed for
one matcher, timed in the middle of a JSON string (the step that allows the most tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import slm  # noqa: E402
from slm.serve.engine import Engine, Params, Request, deltas  # noqa: E402
from slm.serve.app import in_passing_thread  # noqa: E402
from slm.serve.grammar import grammar_for  # noqa: E402
from results_log import record  # noqa: E402

SCHEMA = {"type": "object", "required": ["name", "hobbies"], "additionalProperties": False,
          "properties": {"name": {"type": "string"}, "hobbies": {"type": "array", "items": {"type": "string"}}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    # loaded in a thread that ends, as `slm serve` does: the engine thread's OpenMP pool is then the
    # process's only one (serve/app.py, in_passing_thread)
    lm = in_passing_thread(lambda: slm.load(a.model))
    engine = in_passing_thread(lambda: Engine(lm, max_batch=1, max_len=1024, prefix_cache_bytes=0))
    prompt = lm.tokenizer.encode_chat([{"role": "user", "content": "Describe a person and their hobbies as JSON."}])
    grammars = {"free": None, "json_object": grammar_for({"type": "json_object"}),
                "json_schema": grammar_for({"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}})}
    engine.start()

    async def one(grammar):
        req = Request(prompt, Params(max_tokens=a.tokens, temperature=0, grammar=grammar))
        engine.submit(req)
        t0, first, n = time.perf_counter(), None, 0
        async for d in deltas([req]):
            first = first or time.perf_counter()
        n = req.completion_tokens[0]
        return (time.perf_counter() - first) / max(1, n - 1), n
    best = {k: (float("inf"), 0) for k in grammars}
    try:
        for name, g in grammars.items():  # warm-up (llguidance's tokenizer, the kernels)
            asyncio.run(one(g))
        for _ in range(a.rounds):
            for name, g in grammars.items():
                s, n = asyncio.run(one(g))
                best[name] = min(best[name], (s, n))
    finally:
        engine.stop()
    c = engine.constraints
    m = c.matcher(grammars["json_object"])
    for t in lm.tokenizer.encode('{"name":"Ann and'):
        m.consume_token(t)
    c.allowed([m])
    t0 = time.perf_counter()
    for _ in range(200):
        c.allowed([m])
    mask_ms = (time.perf_counter() - t0) / 200 * 1e3
    free = best["free"][0]
    print(f"{a.model}: ms per token, best of {a.rounds} (engine in-process, batch 1, greedy)")
    for name, (s, n) in best.items():
        print(f"  {name:<12} {1e3 * s:6.2f} ms/token over {n} tokens  (+{1e3 * (s - free):.2f} ms, {s / free:.2f}x)")
    print(f"  mask alone (inside a JSON string): {mask_ms:.3f} ms")
    record("structured_overhead", model=a.model, rounds=a.rounds, engine="llguidance",
           **{f"{k}_ms_per_token": round(1e3 * s, 2) for k, (s, _) in best.items()},
           **{f"{k}_tokens": n for k, (_, n) in best.items()},
           json_object_overhead_ms=round(1e3 * (best["json_object"][0] - free), 2),
           json_schema_overhead_ms=round(1e3 * (best["json_schema"][0] - free), 2), mask_ms=round(mask_ms, 3))


if __name__ == "__main__":
    main()
