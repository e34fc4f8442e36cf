"""Sampling's draw (temperature and top-p) on a real model's logits: the fused draw
(kernels/cpu/sample.cpp, one call for all rows) against runtime/sampling.py's ATen ops, which it
replaces on the CPU, in the same run.

    python benchmarks/sampling.py [--model NAME_OR_FILE] [--rows 1 16] [--temperature 0.8] [--top-p 0.95] [--rounds 7]

The logits are the model's at 48 positions of a short story (slm.load's default loading), so that
each row's nucleus is as wide as a real one's; a batch of B rows takes B of them. Reported per
batch size: ms a draw of every row (median of --rounds rounds of 20 draws, the two paths
interleaved), and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import slm  # noqa: E402
import slm.runtime.sampling as sampling  # noqa: E402
from slm.runtime.sampling import Row, Sampling, sample_rows  # noqa: E402
from results_log import record  # noqa: E402

STORY = ("Once upon a time, a small cat named Tom lived in a quiet village by the sea. Every morning he "
         "walked to the harbour to watch the boats, and the fishermen gave him bits of fish. One day a storm "
         "came and the boats did not return.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    lm = slm.load(a.model)
    ids = lm.tokenizer.encode(STORY)
    with torch.inference_mode():
        logits = lm.model(torch.tensor([ids]))[0, -48:].float().contiguous()
    V = logits.shape[-1]
    fused_op = sampling.kernels.fused_op
    if fused_op("sample_top_p") is None:
        raise SystemExit(f"the CPU kernels are unavailable: {sampling.kernels.kernel_error()}")

    def seconds(x: torch.Tensor, fused: bool) -> float:
        sampling.kernels.fused_op = fused_op if fused else (lambda n: None if n == "sample_top_p" else fused_op(n))
        try:
            rows = [Row(Sampling(temperature=a.temperature, top_p=a.top_p, seed=i), V, "cpu") for i in range(len(x))]
            sample_rows(x, rows)
            t = time.perf_counter()
            for _ in range(20):
                sample_rows(x, rows)
            return (time.perf_counter() - t) / 20
        finally:
            sampling.kernels.fused_op = fused_op

    print(f"{a.model}: {V} logits a row, temperature {a.temperature}, top_p {a.top_p}, "
          f"{torch.get_num_threads()} threads, median of {a.rounds} rounds")
    for B in a.rows:
        x = logits[:B] if B <= len(logits) else logits.repeat((B + len(logits) - 1) // len(logits), 1)[:B]
        ours, aten = [], []
        for _ in range(a.rounds):
            ours.append(seconds(x, True))
            aten.append(seconds(x, False))
        o, t = statistics.median(ours), statistics.median(aten)
        print(f"  {B:3d} rows: fused {o * 1e3:6.3f} ms, ATen ops {t * 1e3:6.3f} ms, {t / o:.2f}x")
        record("sampling", model=a.model, rows=B, temperature=a.temperature, top_p=a.top_p,
               fused_ms=round(o * 1e3, 3), aten_ms=round(t * 1e3, 3), vs_aten=round(t / o, 2))


if __name__ == "__main__":
    main()
