"""The CPU training step's C++ kernels (kernels/cpu_train.py, cpu/train.cpp) against the PyTorch ops they
replace, piece by piece, forward and backward, at one layer of the stories15M shape:

    python benchmarks/cpu_train_kernels.py [--batch-size 8] [--seq-len 256] [--repeats 15] [--threads 2]

Each piece runs both ways in turn, `--repeats` times, and the best time of each is printed with
the ratio. fp32, the threads of the training benchmark (train_speed.py throughput). Pieces: RMSNorm
over [N, 288], SwiGLU over [N, 2 x 768], the rotation with the Q/K/V split over [N, 3 x 288],
causal attention over 6 heads of 48 (SDPA, PyTorch's CPU flash kernel, against attn_train), and the
cross-entropy's softmax and gradient over one chunk of 1,024 x 32,000 logits (log_softmax, exp_ and
the one-hot update against softmax_xent_; both start from a copy of the logits, as the kernel
works in place).
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from slm import kernels  # noqa: E402
from slm.accel import cpu_train  # noqa: E402
from slm.model import RMSNorm, apply_rope, rope_tables  # noqa: E402
from results_log import record  # noqa: E402


def pieces(B: int, T: int):
    """name -> (setup() -> inputs, ours(inputs), torch's(inputs)); each call runs forward and backward."""
    N, d, F_, H, D, V = B * T, 288, 768, 6, 48, 32000
    norm = cpu_train.RMSNorm(d, 1e-5)  # the C++ kernel with autograd; RMSNorm.forward: the reference

    def backward(y, x):
        torch.autograd.grad(y, x, torch.ones_like(y))

    def norm_in():
        return (torch.randn(N, d, requires_grad=True),)

    def glu_in():
        return (torch.randn(N, 2 * F_, requires_grad=True),)

    def torch_glu(h):
        gate, up = h.chunk(2, -1)
        backward(F.silu(gate) * up, h)

    cos, sin = rope_tables(D, T, 10000.0)
    c, s = cos[:T][None, None], sin[:T][None, None]

    def rope_in():
        return (torch.randn(B, T, 3 * H * D, requires_grad=True),)

    def ours_rope(qkv):
        torch.autograd.grad(cpu_train.rope_qkv(qkv, c, s, H, H), qkv, [torch.ones(B, T, H, D)] * 3)

    def torch_rope(qkv):
        x = qkv.view(B, T, 3 * H, D)
        qk = apply_rope(x[:, :, :2 * H].transpose(1, 2), c, s).transpose(1, 2)
        torch.autograd.grad((qk[:, :, :H], qk[:, :, H:], x[:, :, 2 * H:]), qkv, [torch.ones(B, T, H, D)] * 3)

    def attn_in():
        qkv = torch.randn(B, T, 3 * H * D, requires_grad=True)
        return (qkv, *qkv.view(B, T, 3 * H, D).split(H, 2))

    def ours_attn(qkv, q, k, v):
        backward(cpu_train.attention(q, k, v, D ** -0.5), qkv)

    def torch_attn(qkv, q, k, v):
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        backward(y.transpose(1, 2), qkv)

    def xent_in():
        return torch.randn(1024, V) * 3, torch.empty(1024, V), torch.randint(0, V, (1024,))

    def ours_xent(src, buf, t):
        kernels.fused_op("softmax_xent_")(buf.copy_(src), t, -100, 1 / 1024)

    def torch_xent(src, buf, t):
        logp = buf.copy_(src).log_softmax(-1)
        (-logp.gather(1, t[:, None])).sum()
        g = logp.exp_()
        g[torch.arange(len(t)), t] -= 1
        g.mul_(1 / 1024)

    return {
        "RMSNorm": (norm_in, lambda x: backward(norm(x), x), lambda x: backward(RMSNorm.forward(norm, x), x)),
        "SwiGLU": (glu_in, lambda h: backward(cpu_train.glu(h), h), torch_glu),
        "rotation + Q/K/V split": (rope_in, ours_rope, torch_rope),
        "causal attention": (attn_in, ours_attn, torch_attn),
        "softmax + gradient (1 chunk)": (xent_in, ours_xent, torch_xent),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if kernels.cpu_ops() is None or kernels.fused_op("attn_train") is None:
        sys.exit(f"the CPU kernels are unavailable here: {kernels.kernel_error()}")
    print(f"one layer of stories15m, batch {args.batch_size} x {args.seq_len}, fp32, {args.threads} threads, "
          f"forward + backward, best of {args.repeats} (ms)")
    print(f"  {'piece':<30} {'PyTorch':>9} {'slm':>9}  ratio")
    torch.manual_seed(0)
    for name, (setup, ours, ref) in pieces(args.batch_size, args.seq_len).items():
        inputs, best = setup(), {"ours": float("inf"), "ref": float("inf")}
        for _ in range(args.repeats):
            for key, fn in (("ref", ref), ("ours", ours)):
                t0 = time.perf_counter()
                fn(*inputs)
                best[key] = min(best[key], time.perf_counter() - t0)
        print(f"  {name:<30} {best['ref'] * 1e3:9.2f} {best['ours'] * 1e3:9.2f}  {best['ref'] / best['ours']:5.2f}x")
        record("cpu_train_kernels", piece=name, batch=f"{args.batch_size} x {args.seq_len}", repeats=args.repeats,
               pytorch_ms=round(best["ref"] * 1e3, 2), slm_ms=round(best["ours"] * 1e3, 2),
               vs_pytorch=round(best["ref"] / best["ours"], 2))


if __name__ == "__main__":
    main()
