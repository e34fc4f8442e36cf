"""Rotary embedding and the Q/K/V split of the fused projection, in Triton, for training on a GPU.

Attention's first product gives qkv [B, T, (H + 2K) * D]; Q and K heads are rotated and V is cut
out. Compiled, the backward of that is two kernels: one rotates dQ and dK back, a second reads
them again with dV to assemble d qkv (the autograd of the slices). On an H200 (124M preset) they
took 96 + 71 us a layer (docs/gpu/h200_slm124m_profile.txt). Here the forward writes Q, K (rotated)
and V in one kernel, and the backward reads dQ, dK and dV once, in whatever layout attention's
backward left them, and writes d qkv: one pass each way.

Only full rotation (rotary_dim == head_dim) without q/k norms: Llama, Mistral and slm's presets.
The rotation is apply_rope's, x * cos + roll(x, D/2) * sin (model.rope_tables puts the sign in
sin); its transpose, for the backward, is dx[j] = dy[j] cos[j] + dy[p] sin[p] with p = (j + D/2) mod D.
"""

from __future__ import annotations

import torch

from .triton_launch import launch, triton

__all__ = ["rope_qkv", "supports"]


def supports(cfg) -> bool:
    """Whether rope_qkv can stand in for the rotation and split of a model of ModelConfig `cfg`."""
    D = cfg.head_dim
    return not cfg.qk_norm and cfg.rotary_dim == D and D & (D - 1) == 0


if triton is not None:
    import triton.language as tl
    from torch.library import triton_op

    @triton.jit
    def _rope_qkv_forward(qkv, cos, sin, cos_sb, cos_st, q, k, v, T, H: tl.constexpr, K: tl.constexpr,
                          D: tl.constexpr, HEADS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # one token: b * T + t
        b, t = row // T, row % T
        h = tl.arange(0, HEADS)[:, None]
        d = tl.arange(0, D)[None, :]
        p = (d + D // 2) % D  # roll(x, D/2)[d] = x[p]
        ok = h < H + 2 * K
        src = qkv + row * (H + 2 * K) * D + h * D
        x = tl.load(src + d, mask=ok, other=0.0).to(tl.float32)
        xp = tl.load(src + p, mask=ok, other=0.0).to(tl.float32)
        c = tl.load(cos + b * cos_sb + t * cos_st + d).to(tl.float32)
        s = tl.load(sin + b * cos_sb + t * cos_st + d).to(tl.float32)
        y = tl.where(h < H + K, x * c + xp * s, x)  # V heads are copied
        tl.store(q + (row * H + h) * D + d, y.to(q.dtype.element_ty), mask=h < H)
        tl.store(k + (row * K + h - H) * D + d, y.to(k.dtype.element_ty), mask=(h >= H) & (h < H + K))
        tl.store(v + (row * K + h - H - K) * D + d, y.to(v.dtype.element_ty), mask=(h >= H + K) & ok)

    @triton.jit
    def _load_heads(g, sb, st, sh, sd, b, t, h, d, first, n):
        """Rows h - first of g[b, t] for first <= h < first + n, zero elsewhere (any strides)."""
        mine = (h >= first) & (h < first + n)
        return tl.load(g + b * sb + t * st + (h - first) * sh + d * sd, mask=mine, other=0.0).to(tl.float32)

    @triton.jit
    def _rope_qkv_backward(dq, dk, dv, qs_b, qs_t, qs_h, qs_d, ks_b, ks_t, ks_h, ks_d, vs_b, vs_t, vs_h, vs_d,
                           cos, sin, cos_sb, cos_st, dqkv, T, H: tl.constexpr, K: tl.constexpr, D: tl.constexpr,
                           HEADS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        b, t = row // T, row % T
        h = tl.arange(0, HEADS)[:, None]
        d = tl.arange(0, D)[None, :]
        p = (d + D // 2) % D
        g = _load_heads(dq, qs_b, qs_t, qs_h, qs_d, b, t, h, d, 0, H) + \
            _load_heads(dk, ks_b, ks_t, ks_h, ks_d, b, t, h, d, H, K) + \
            _load_heads(dv, vs_b, vs_t, vs_h, vs_d, b, t, h, d, H + K, K)
        gp = _load_heads(dq, qs_b, qs_t, qs_h, qs_d, b, t, h, p, 0, H) + \
            _load_heads(dk, ks_b, ks_t, ks_h, ks_d, b, t, h, p, H, K)
        c = tl.load(cos + b * cos_sb + t * cos_st + d).to(tl.float32)
        sp = tl.load(sin + b * cos_sb + t * cos_st + p).to(tl.float32)
        dx = tl.where(h < H + K, g * c + gp * sp, g)
        tl.store(dqkv + row * (H + 2 * K) * D + h * D + d, dx.to(dqkv.dtype.element_ty), mask=h < H + 2 * K)

    def _tables(cos, sin):
        # [B or 1, 1, T, D] with unit stride along D; a broadcast batch has stride 0
        cos, sin = cos.expand(sin.shape), sin.expand(cos.shape)
        if cos.stride(-1) != 1 or cos.stride() != sin.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
        return cos, sin, cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(2)

    # One token a program: a [heads, D] tile (64 x 64 for the 124M preset). On a GPU the warps are
    # tuned once per shape; the interpreter runs the plain kernels.
    _configs = [triton.Config({}, num_warps=w) for w in (2, 4, 8, 16)]
    _forward_tuned = triton.autotune(_configs, key=["H", "K", "D"])(_rope_qkv_forward)
    _backward_tuned = triton.autotune(_configs, key=["H", "K", "D"])(_rope_qkv_backward)

    @triton_op("slm::rope_qkv", mutates_args={})
    def _rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                  kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, width = qkv.shape
        D = width // (heads + 2 * kv_heads)
        q = qkv.new_empty(B, T, heads, D)
        k, v = qkv.new_empty(B, T, kv_heads, D), qkv.new_empty(B, T, kv_heads, D)
        cos, sin, sb, st = _tables(cos, sin)
        n = triton.next_power_of_2(heads + 2 * kv_heads)
        launch(_forward_tuned, _rope_qkv_forward, (B * T,), (qkv, cos, sin, sb, st, q, k, v, T, heads, kv_heads, D, n))
        return q, k, v

    @triton_op("slm::rope_qkv_backward", mutates_args={})
    def _rope_qkv_backward_op(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                              sin: torch.Tensor) -> torch.Tensor:
        B, T, H, D = dq.shape
        K = dk.shape[2]
        dqkv = dq.new_empty(B, T, (H + 2 * K) * D)
        cos, sin, sb, st = _tables(cos, sin)
        n = triton.next_power_of_2(H + 2 * K)
        launch(_backward_tuned, _rope_qkv_backward, (B * T,),
               (dq, dk, dv, *dq.stride(), *dk.stride(), *dv.stride(), cos, sin, sb, st, dqkv, T, H, K, D, n))
        return dqkv

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1], inputs[2])

    def _backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        return _rope_qkv_backward_op(dq, dk, dv, cos, sin), None, None, None, None

    _rope_qkv.register_autograd(_backward, setup_context=_setup_context)


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
             kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B, T, (heads + 2 kv_heads) * D] -> Q [B, T, heads, D] and K [B, T, kv_heads, D] rotated by
    cos/sin ([B or 1, 1, T, D], as model.Transformer.rope gives them) and V [B, T, kv_heads, D], with
    their gradients: the Triton kernels (a GPU, or any device under TRITON_INTERPRET=1). D must be a
    power of two."""
    if triton is None:
        raise RuntimeError("rope_qkv needs Triton (pip install triton)")
    D = qkv.shape[-1] // (heads + 2 * kv_heads)
    if D * (heads + 2 * kv_heads) != qkv.shape[-1] or D & (D - 1) or cos.shape[-1] != D:
        raise ValueError(f"rope_qkv needs [B, T, (heads + 2 kv_heads) * D] with D a power of two and full "
                         f"rotation; got {tuple(qkv.shape)}, {heads}+2x{kv_heads} heads, rotary dim {cos.shape[-1]}")
    return _rope_qkv(qkv.contiguous(), cos, sin, heads, kv_heads)
