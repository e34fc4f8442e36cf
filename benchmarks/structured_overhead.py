"""What constrained decoding costs: the serving engine (in-process) decoding the same chat prompt
free and under a JSON schema, B requests at once (--batches, default 1 and 16); decode tokens/s
(the median over the engine's steps while at least 3/4 of the B rows decode of rows / step time:
the grammars' masks are computed and applied inside the step), best of --rounds interleaved rounds, on a real model.

    python benchmarks/structured_overhead.py [--model smollm2-135m-instruct] [--batches 1 16] [--rounds 3]

Rows: free text, JSON mode (response_format json_object) and a JSON schema (a recipe: a bounded
title, minutes, 3-10 ingredients and 3-8 steps as bounded strings, a boolean), sampled at temperature 0.7 with
a seed per request, up to --tokens tokens each. Also the mask alone: Constraints.allowed for one
matcher inside a JSON string (the step that allows the most tokens). llguidance: serve/grammar.py.
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

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["title", "minutes", "ingredients", "steps", "vegetarian"],
          "properties": {"title": {"type": "string", "maxLength": 40},
                         "minutes": {"type": "integer", "minimum": 1, "maximum": 600},
                         "ingredients": {"type": "array", "minItems": 3, "maxItems": 10,
                                         "items": {"type": "string", "maxLength": 30}},
                         "steps": {"type": "array", "minItems": 3, "maxItems": 8, "items": {"type": "string", "maxLength": 80}},
                         "vegetarian": {"type": "boolean"}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    # loaded in a thread that ends, as `slm serve` does: the engine thread's OpenMP pool is then the
    # process's only one (serve/app.py, in_passing_thread)
    lm = in_passing_thread(lambda: slm.load(a.model))
    engine = in_passing_thread(lambda: Engine(lm, max_batch=max(a.batches), max_len=1024, prefix_cache_bytes=0))
    prompt = lm.tokenizer.encode_chat([{"role": "user", "content": "Give me a recipe for pancakes as JSON."}])
    grammars = {"free": None, "json_object": grammar_for({"type": "json_object"}),
                "json_schema": grammar_for({"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}})}
    engine.start()

    steps: list[tuple[int, float]] = []  # (rows decoding, seconds) of each engine step
    step = engine._step

    def timed_step():
        t = time.perf_counter()
        busy = sum(s is not None for s in engine.rows)
        step()
        steps.append((busy, time.perf_counter() - t))
    engine._step = timed_step

    async def batch(B: int, grammar) -> tuple[float, int]:
        reqs = [Request(prompt, Params(max_tokens=a.tokens, temperature=0.7, seed=i, grammar=grammar))
                for i in range(B)]
        steps.clear()
        engine.submit_all(reqs)
        for r in reqs:
            async for _ in deltas([r]):
                pass
        # tokens/s of each step with at least 3/4 of the rows decoding (rows join and finish apart)
        full = sorted(busy / dt for busy, dt in steps if busy >= max(1, 3 * B // 4))
        return (full[len(full) // 2] if full else 0.0), len(full)
    best = {(B, k): (0.0, 0) for B in a.batches for k in grammars}
    try:
        for g in grammars.values():  # warm-up (llguidance's tokenizer, the kernels)
            asyncio.run(batch(1, g))
        for _ in range(a.rounds):
            for B in a.batches:
                for name, g in grammars.items():
                    best[B, name] = max(best[B, name], asyncio.run(batch(B, g)))
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
    print(f"{a.model}: generated tokens/s, best of {a.rounds} rounds (engine in-process, temperature 0.7)")
    for B in a.batches:
        free = best[B, "free"][0]
        for name in grammars:
            rate, n = best[B, name]
            print(f"  B={B:<3} {name:<12} {rate:7.1f} tok/s (median of {n:3d} steps)  ({rate / free:.2f}x free)")
    print(f"  mask alone (inside a JSON string): {mask_ms:.3f} ms")
    record("structured_overhead", model=a.model, rounds=a.rounds, engine="llguidance", max_tokens=a.tokens,
           **{f"b{B}_{k}_tok_s": round(best[B, k][0], 1) for B in a.batches for k in grammars},
           **{f"b{B}_{k}_vs_free": round(best[B, k][0] / best[B, "free"][0], 2) for B in a.batches
              for k in grammars if k != "free"}, mask_ms=round(mask_ms, 3))


if __name__ == "__main__":
    main()
