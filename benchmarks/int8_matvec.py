"""Batch-1 matrix-vector products: fp32 F.linear against slm's int8 kernel (slm/kernels/cpu/matvec_int8.cpp).

    python benchmarks/int8_matvec.py [--repeats 20] [--threads N]

For each shape [out x in], times y = x W^T for one row of x, best of --repeats, in two settings:
  cold  the weights come from DRAM, as in a decode step of a model larger than the L3 cache (a
        ring of copies of the matrix, > 256 MB in all, one copy per call)
  hot   the same matrix every call (in cache when it fits): the kernel's compute and call overhead
GB/s counts the bytes of weights read (fp32: 4 per weight; int8: 1 + 4/32 for the scales).
fp32 is timed with the weight row-major and column-major (as slm's loader stores tall matrices,
where MKL's matrix-vector product is faster) and the faster layout is shown (r / c).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from slm import kernels  # noqa: E402
from slm.quant.layers import MAX_DIRECT, quantize_q8  # noqa: E402

SHAPES = [(262144, 640), (2048, 640), (640, 2048), (32000, 288)]
RING_BYTES = 256 << 20


def best_ms(fn, ring: list, repeats: int) -> float:
    """Best time of fn(item) in ms, cycling through the items of ring."""
    for item in ring[:3]:  # warm-up
        fn(item)
    best = float("inf")
    for i in range(repeats):
        item = ring[i % len(ring)]
        t = time.perf_counter()
        fn(item)
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    ops = kernels.cpu_ops()
    if ops is None:
        sys.exit(f"int8 kernel unavailable: {kernels.kernel_error()}")
    op = ops.linear.default
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; kernel ready in {time.perf_counter() - t:.1f} s")
    print(f"{'shape':>12} {'mode':>4} | {'fp32 ms':>9} {'GB/s':>5} | {'int8 ms':>8} {'GB/s':>5} | {'speed-up':>8}")
    torch.manual_seed(0)
    with torch.inference_mode():
        for N, K in SHAPES:
            w = torch.randn(N, K) * 0.02
            q, s = quantize_q8(w)
            x = torch.randn(1, K)
            fp_bytes, q_bytes = w.numel() * 4, q.numel() + s.numel() * 4
            for mode in ("cold", "hot"):
                n_fp = max(1, min(RING_BYTES // fp_bytes, 64)) if mode == "cold" else 1
                n_q = max(1, min(RING_BYTES // q_bytes, 256)) if mode == "cold" else 1
                t_fp, layout = float("inf"), ""
                for name in ("r", "c"):
                    ring = [w if name == "r" else w.t().contiguous().t()] + \
                           [w.clone() if name == "r" else w.t().contiguous().t() for _ in range(n_fp - 1)]
                    t = best_ms(lambda wi, x=x: F.linear(x, wi), ring, args.repeats)
                    if t < t_fp:
                        t_fp, layout = t, name
                    del ring
                ring = [(q, s)] + [(q.clone(), s.clone()) for _ in range(n_q - 1)]
                t_q = best_ms(lambda qs, x=x: op(x, qs[0], qs[1], None, MAX_DIRECT), ring, args.repeats)
                del ring
                print(f"{N:>6}x{K:<5} {mode:>4} | {t_fp:7.3f} {layout} {fp_bytes / t_fp / 1e6:5.1f} | "
                      f"{t_q:8.3f} {q_bytes / t_q / 1e6:5.1f} | {t_fp / t_q:7.2f}x")


if __name__ == "__main__":
    main()
