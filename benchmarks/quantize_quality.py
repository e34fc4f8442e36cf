"""Perplexity of a model trained by `slm train` (default: make demo's) in fp32, int8 and int4, on
held-out tokens of its own corpus. The bounds aimed for: +0.5% at int8, +5% at int4.

    make demo && python benchmarks/quantize_quality.py [--model runs/demo/model --data runs/demo/data/tokens]
"""

import argparse
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import slm  # noqa: E402
from slm.data.prepare import load_tokens  # noqa: E402


def perplexity(lm, rows: torch.Tensor) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), 32):
            b = rows[i:i + 32]
            logits = lm.model(b[:, :-1]).float()
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum").item()
            n += b[:, 1:].numel()
    return math.exp(total / n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/demo/model")
    ap.add_argument("--data", default="runs/demo/data/tokens", help="folder from `slm data prepare`")
    ap.add_argument("--tokens", type=int, default=40960)
    ap.add_argument("--seq-len", type=int, default=128)
    a = ap.parse_args()
    val = np.array(load_tokens(a.data, "val")[:a.tokens], dtype=np.int64)
    rows = torch.from_numpy(val[:len(val) // a.seq_len * a.seq_len]).view(-1, a.seq_len)
    base = perplexity(slm.load(a.model), rows)
    print(f"{a.model}: {rows.numel():,} held-out tokens; fp32 perplexity {base:.4f}")
    for mode, group in (("int8", None), ("int4", 32), ("int4", 128)):
        p = perplexity(slm.load(a.model, quantize=mode, group_size=group), rows)
        label = mode + (f" (groups of {group})" if group else " (per channel)")
        print(f"  {label:24s} {p:.4f}   {(p / base - 1) * 100:+.2f}%")


if __name__ == "__main__":
    main()
