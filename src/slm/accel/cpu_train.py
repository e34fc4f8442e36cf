"""The CPU training step's work outside the big matmuls in C++ (kernels/cpu/train.cpp), with autograd: the MLP's
GLU, the rotary embedding with the Q/K/V split, RMSNorm, and causal attention; and the modules that
call them, subclasses of the reference modules that `slm.accel.accelerate_training` swaps in when
a model trains on the CPU (train/loop.py's loss_function). The GPU has Triton versions of the first
two (gpu_train.py), which take the same arguments.

Why: in PyTorch's autograd each is a string of passes over [tokens, width] tensors. SwiGLU is
silu, a product, then backward silu's derivative, two products and a concatenation; the rotation
is two products, a roll (a concatenation) and a sum each way, plus zero-filled gradients for the
Q/K/V slices; RMSNorm is some ten small ops. Here each is one pass forward and one backward. At the
stories15M shape (batch 8 x 256) their forward and backward took ~140 ms of a ~1.7 s step in
PyTorch's ops and take ~40 ms in these kernels (docs/benchmarks.md, cpu_train_kernels). Attention: PyTorch's CPU flash kernel takes
~22 ms a layer forward and backward at that shape, cpu/train.cpp's `attn_train` ~15 (its comment says how;
`python benchmarks/cpu_train_kernels.py` measures each piece).

fp32 on the CPU only; anything else, torch.compile, or no kernels (no compiler, SLM_NO_KERNELS=1)
takes the PyTorch path, with the same results (tests/test_cpu_train_kernels.py holds them to the
reference model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import model as reference
from ..kernels import fused_op
from ..model import apply_rope

__all__ = ["attention", "glu", "rms_norm", "rope_qkv", "supports", "RMSNorm", "MLP", "Attention"]


def supports(cfg) -> bool:
    """Whether rope_qkv can stand in for the rotation and split of a model of ModelConfig `cfg`:
    full rotation (not Phi's partial one) and no q/k norms (not Gemma's)."""
    return _supports(cfg.qk_norm, cfg.rotary_dim, cfg.head_dim)


def _supports(qk_norm: bool, rotary_dim: int, head_dim: int) -> bool:
    return not qk_norm and rotary_dim == head_dim and head_dim % 2 == 0


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
    cos/sin ([B or 1, 1, T, D], as Transformer.run_blocks passes them to each block) and V [B, T, kv_heads, D], with
    their gradients."""
    B, T, width = qkv.shape
    D = width // (heads + 2 * kv_heads)
    if D * (heads + 2 * kv_heads) != width or cos.shape[-1] != D:
        raise ValueError(f"rope_qkv needs [B, T, (heads + 2 kv_heads) * D] and full rotation; got "
                         f"{tuple(qkv.shape)}, {heads}+2x{kv_heads} heads, rotary dim {cos.shape[-1]}")
    if not _fast(qkv, cos, sin) or fused_op("rope_qk_train") is None:
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


# -- the modules that call them ----------------------------------------------------------------
class RMSNorm(reference.RMSNorm):
    """With autograd on: one C++ pass each way (rms_norm); the reference everywhere else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            y = rms_norm(x, self.weight, self.eps, self.plus_one)
            if y is not None:
                return y
        return super().forward(x)


class MLP(reference.MLP):
    """The gated MLP's act(gate) * up in one C++ pass each way (glu)."""

    def glu(self, h: torch.Tensor) -> torch.Tensor:
        return glu(h, self.act != "swiglu")


class Attention(reference.Attention):
    """The rotation with the Q/K/V split (rope_qkv, where it stands in: see supports) and causal
    attention (attention) in C++, one pass each way."""

    def rotated_qkv(self, x, cos, sin):
        if not _supports(self.qk_norm, cos.shape[-1], self.head_dim):
            return super().rotated_qkv(x, cos, sin)
        q, k, v = rope_qkv(self.qkv_proj(x), cos, sin, self.n_heads, self.n_kv)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, q, k, v, plan):
        if not plan.causal or plan.mask is not None:
            return super().attend(q, k, v, plan)
        scale = self.scale if self.scale is not None else self.head_dim ** -0.5
        return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale).transpose(1, 2)
