"""Batched decoding on the CPU: one decode step of B rows of a serving cache (RowKVCache, as
`slm serve`'s engine steps them) against batch 1, on the same model in the same run.

    python benchmarks/batched_decode.py [--model NAME_OR_FILE ...] [--batches 1 4 16] [--rounds 3]

B = 1 runs the whole-step decoder (`Decoder.step`), B > 1 `Decoder.step_rows`, whose products
take the rows together. Every row decodes at the same position (its cache holds what the
warm-up steps wrote); a step's time is the best over --rounds rounds of 20 steps, the rounds
interleaving the batch sizes. Reported: ms a step, total tokens/s, and the ratio to batch 1.
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
from results_log import record  # noqa: E402


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
    a = ap.parse_args()
    batches = sorted(set(a.batches) | {1})
    for name in a.model:
        model = slm.load(name).model
        best = {B: float("inf") for B in batches}
        for _ in range(a.rounds):
            for B in batches:
                best[B] = min(best[B], step_seconds(model, B))
        print(f"{name}: {torch.get_num_threads()} threads, best of {a.rounds} rounds")
        for B in batches:
            print(f"  B={B:3d}: {best[B] * 1e3:7.2f} ms a step, {B / best[B]:7.1f} tokens/s, "
                  f"{best[1] / best[B] * B:.2f}x batch 1")
        record("batched_decode", model=name,
               path="module path (SLM_NO_DECODER=1)" if os.environ.get("SLM_NO_DECODER") == "1" else "C++ decoder",
               **{f"b{B}_tok_s": round(B / best[B], 1) for B in batches},
               **{f"b{B}_vs_batch1": round(best[1] / best[B] * B, 2) for B in batches if B > 1})


if __name__ == "__main__":
    main()
