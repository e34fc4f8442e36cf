"""Batched decoding on the CPU: one decode step of B rows of a serving cache (RowKVCache, as
`slm serve`'s engine steps them) against batch 1, on the same model in the same run.

    python benchmarks/batched_decode.py [--model NAME_OR_FILE ...] [--batches 1 4 16] [--rounds 3] [--no-llama-cpp]

B = 1 runs the whole-step decoder (`Decoder.step`), B > 1 `Decoder.step_rows`, whose products
take the rows together. Every row decodes at the same position (its cache holds what the
warm-up steps wrote); a step's time is the best over --rounds rounds of 20 steps, the rounds
interleaving the batch sizes. llama.cpp (llama-cpp-python) runs the same file in the same rounds:
B sequences of one token each in one `llama_decode` (a context with B sequences, as its server's
parallel slots), 2 threads, without its run-time repacking (llama-cpp-python 0.3.36 crashes in the
repacked path on these files; benchmarks/prefill_vs_llamacpp.py says the same). Reported: ms a
step, total tokens/s, the ratio to batch 1 and to llama.cpp at the same B.
Models: by default both real GGUF files (`slm models`), loaded as `slm.load` does by default.
SLM_NO_DECODER=1 times the module path instead, for comparison.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import slm  # noqa: E402
from slm.model import RowKVCache  # noqa: E402
from slm.runtime.models import resolve  # noqa: E402
from results_log import record  # noqa: E402


def llama_cpp_stepper(path: str, threads: int):
    """A function B -> seconds a step of B sequences takes in llama.cpp (positions 3.. after 3
    warm-up steps, as step_seconds), over the model loaded once."""
    import llama_cpp.llama_cpp as L
    from decode_vs_llamacpp import load_llama
    llm = load_llama(path, threads, n_ctx=512, repack=False)

    def seconds(B: int, steps: int = 20) -> float:
        p = L.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = 256 * B, max(B, 64), max(B, 64), B
        p.n_threads = p.n_threads_batch = threads
        ctx = L.llama_init_from_model(llm.model, p)
        batch = L.llama_batch_init(B, 0, B)
        try:
            def step(pos: int) -> None:
                batch.n_tokens = B
                for i in range(B):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = 5, pos, 1, 1
                    batch.seq_id[i][0] = i
                if L.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")
            for i in range(3):
                step(i)
            t = time.perf_counter()
            for i in range(3, 3 + steps):
                step(i)
            return (time.perf_counter() - t) / steps
        finally:
            L.llama_batch_free(batch)
            L.llama_free(ctx)
    seconds.llm = llm  # kept alive with the function
    return seconds


@torch.no_grad()
def step_seconds(model, B: int, steps: int = 20) -> float:
    cache = RowKVCache(model.config, B, 256, model.device, model.dtype)
    ids = torch.full((B, 1), 5)
    for i in range(3):  # warm-up, and keys to attend over
        model(ids, cache=cache, pos=torch.full((B, 1), i))
    t = time.perf_counter()
    for i in range(3, 3 + steps):
        model(ids, cache=cache, pos=torch.full((B, 1), i))
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", default=["smollm2-135m-instruct", "gemma-3-270m"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-llama-cpp", action="store_true", help="time slm alone")
    a = ap.parse_args()
    batches = sorted(set(a.batches) | {1})
    for name in a.model:
        lm = slm.load(name)
        model, peer = lm.model, None
        if not a.no_llama_cpp:
            known = resolve(name)[1]  # a name of `slm models`, else a file
            path = known.path() if known is not None else name
            peer = llama_cpp_stepper(path, torch.get_num_threads())
        best = {B: float("inf") for B in batches}
        theirs = {B: float("inf") for B in batches}
        for _ in range(a.rounds):
            for B in batches:
                best[B] = min(best[B], step_seconds(model, B))
                if peer is not None:
                    theirs[B] = min(theirs[B], peer(B))
        print(f"{name}: {torch.get_num_threads()} threads, best of {a.rounds} rounds")
        for B in batches:
            print(f"  B={B:3d}: {best[B] * 1e3:7.2f} ms a step, {B / best[B]:7.1f} tokens/s, "
                  f"{best[1] / best[B] * B:.2f}x batch 1" +
                  (f"; llama.cpp {B / theirs[B]:7.1f} tokens/s, slm {theirs[B] / best[B]:.2f}x" if peer else ""))
        record("batched_decode", model=name,
               path="module path (SLM_NO_DECODER=1)" if os.environ.get("SLM_NO_DECODER") == "1" else "C++ decoder",
               **{f"b{B}_tok_s": round(B / best[B], 1) for B in batches},
               **{f"b{B}_vs_batch1": round(best[1] / best[B] * B, 2) for B in batches if B > 1},
               **({f"llamacpp_b{B}_tok_s": round(B / theirs[B], 1) for B in batches} if peer else {}),
               **({f"b{B}_vs_llamacpp": round(theirs[B] / best[B], 2) for B in batches} if peer else {}))


if __name__ == "__main__":
    main()
