"""The CPU training step's work outside the big matmuls in C++ (cpu/train.cpp), with autograd: the MLP's
GLU, the rotary embedding with the Q/K/V split, RMSNorm, and causal attention. The GPU has Triton
versions of the first two (glu.py, rope.py); these take the same arguments, so train/loop.py sets
either on the model the same way (`MLP.glu`, `Attention.rope_qkv`); on the CPU it also sets
`attention` as `Attention.attend`. model.RMSNorm calls `rms_norm` itself whenever autograd is on
for fp32 CPU input.

Why: in PyTorch's autograd each is a string of passes over [tokens, width] tensors. SwiGLU is
silu, a product, then backward silu's derivative, two products and a concatenation; the rotation
is two products, a roll (a concatenation) and a sum each way, plus zero-filled gradients for the
Q/K/V slices; RMSNorm is some ten small ops. Here each is one pass forward and one backward. At the
stories15M shape (batch 8 x 256) their forward and backward took ~140 ms of a ~1.7 s step in
PyTorch's ops and take ~40 ms here (README, Training). Attention: PyTorch's CPU flash kernel takes
~22 ms a layer forward and backward at that shape, cpu/train.cpp's `attn_train` ~15 (its comment says how;
`python benchmarks/cpu_train_kernels.py` measures each piece).

fp32 on the CPU only; anything else, torch.compile, or no kernels (no compiler, SLM_NO_KERNELS=1)
takes the PyTorch path, with the same results.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import fused_op

__all__ = ["attention", "glu", "rms_norm", "rope_qkv", "supports"]


def supports(cfg) -> bool:
    """Whether rope_qkv can stand in for the rotation and split of a model of ModelConfig `cfg`:
    full rotation (not Phi's partial one) and no q/k norms (not Gemma's)."""
    return not cfg.qk_norm and cfg.rotary_dim == cfg.head_dim and cfg.head_dim % 2 == 0


def _fast(*xs: torch.Tensor) -> bool:
    """fp32 CPU tensors, outside torch.compile (which traces PyTorch's ops and fuses them itself)."""
    return not torch.compiler.is_compiling() and all(x.is_cpu and x.dtype == torch.float32 for x in xs)


class _GLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, gelu):
        ctx.save_for_backward(h)
        ctx.gelu = gelu
        return fused_op("glu_train")(h, None, gelu)

    @staticmethod
    def backward(ctx, dy):
        (h,) = ctx.saved_tensors
        return fused_op("glu_train")(h, dy.contiguous(), ctx.gelu), None


def glu(h: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """act(gate) * up for h = [gate | up] along the last dimension (act: SiLU, or with `gelu` GELU's
    tanh approximation), with its gradient."""
    if not _fast(h) or fused_op("glu_train") is None:
        gate, up = h.chunk(2, -1)
        return (F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)) * up
    lead = h.shape[:-1]
    return _GLU.apply(h.reshape(-1, h.shape[-1]).contiguous(), gelu).view(*lead, -1)


class _RopeQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, heads, kv_heads):
        q, k = fused_op("rope_qk_train")(qkv, cos, sin, heads, kv_heads)
        ctx.save_for_backward(cos, sin)
        B, T, _ = qkv.shape
        D = q.shape[-1]
        v = qkv[..., (heads + kv_heads) * D:].view(B, T, kv_heads, D)
        ctx.shapes = (q.shape, k.shape)
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        grads = []
        for g, shape in zip((dq, dk, dv), (*ctx.shapes, ctx.shapes[1])):
            if g is None:
                g = torch.zeros(shape)
            grads.append(g if g.stride(-1) == 1 else g.contiguous())
        return fused_op("rope_qkv_backward")(*grads, cos, sin), None, None, None, None


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
             kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B, T, (heads + 2 kv_heads) * D] -> Q [B, T, heads, D] and K [B, T, kv_heads, D] rotated by
    cos/sin ([B or 1, 1, T, D], as model.Transformer.rope gives them) and V [B, T, kv_heads, D], with
    their gradients."""
    B, T, width = qkv.shape
    D = width // (heads + 2 * kv_heads)
    if D * (heads + 2 * kv_heads) != width or cos.shape[-1] != D:
        raise ValueError(f"rope_qkv needs [B, T, (heads + 2 kv_heads) * D] and full rotation; got "
                         f"{tuple(qkv.shape)}, {heads}+2x{kv_heads} heads, rotary dim {cos.shape[-1]}")
    if not _fast(qkv, cos, sin) or fused_op("rope_qk_train") is None:
        from ..model import apply_rope
        x = qkv.view(B, T, heads + 2 * kv_heads, D)
        qk = apply_rope(x[:, :, :heads + kv_heads].transpose(1, 2), cos, sin).transpose(1, 2)
        return qk[:, :, :heads], qk[:, :, heads:], x[:, :, heads + kv_heads:]
    cos, sin = (t.reshape(t.shape[0], T, D).contiguous() for t in (cos, sin))
    return _RopeQKV.apply(qkv.contiguous(), cos, sin, heads, kv_heads)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, plus_one):
        y, r = fused_op("rms_norm_train")(x, weight, eps, plus_one)
        ctx.save_for_backward(x, weight, r)
        ctx.plus_one = plus_one
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, r = ctx.saved_tensors
        dx, dw = fused_op("rms_norm_train_backward")(x, weight, r, dy.contiguous(), ctx.plus_one)
        return dx, dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, plus_one: bool = False) -> torch.Tensor | None:
    """x / rms(x) * weight (or * (1 + weight) with `plus_one`, Gemma's) over the last dimension, with
    its gradient; None where the kernel does not apply (the caller then runs its own ops)."""
    if not _fast(x, weight) or fused_op("rms_norm_train") is None:
        return None
    lead = x.shape[:-1]
    return _RMSNorm.apply(x.reshape(-1, x.shape[-1]).contiguous(), weight, eps, plus_one).view(*lead, -1)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        o, lse = fused_op("attn_train")(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = do if do.stride(-1) == 1 else do.contiguous()
        return (*fused_op("attn_train_backward")(q, k, v, o, lse, do, ctx.scale), None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal self-attention, q [B, T, H, D] and k, v [B, T, Hkv, D] (Hkv dividing H: grouped-query)
    -> [B, T, H, D], with its gradient; SDPA's where the kernel does not apply."""
    if not _fast(q, k, v) or fused_op("attn_train") is None:
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           scale=scale, enable_gqa=k.shape[2] != q.shape[2])
        return y.transpose(1, 2)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _Attention.apply(q, k, v, scale)
