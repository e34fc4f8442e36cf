"""SwiGLU and GeGLU over the fused gate-up projection, in Triton, for training on a GPU.

The MLP's first product gives h = [gate | up] ([N, 2F], bf16) and the block goes on with
act(gate) * up. torch.compile fuses the backward into one kernel over the concatenated gradient
[N, 2F] (`..._cat_mul_silu_silu_backward_split_...`), which by its shape walks it element by
element: a gate element needs d_out, gate and up, an up element d_out and gate, so up to 5 reads
of [N, F] for 2 writes. On an H200 (124M preset, 32 x 1,024 tokens) it took 287 us a layer, 3.4 ms
of a 60 ms step (docs/gpu/h200_slm124m_profile.txt), about half the bandwidth of the forward's
kernel. Here one program takes a row's pairs (gate_i, up_i), reads d_out, gate and up once and
writes both gradients: 3 reads for 2 writes.

The arithmetic is fp32; results are stored in h's dtype. Registered with `torch.library.triton_op`,
so torch.compile keeps the model in one graph around it.
"""

from __future__ import annotations

import torch

from .triton_launch import launch, triton

BLOCK = 256  # under the interpreter (tests): columns per program

__all__ = ["glu"]

if triton is not None:
    import triton.language as tl
    from torch.library import triton_op

    @triton.jit
    def _act(g, GELU: tl.constexpr):
        """(act(g), act'(g)) for SiLU or GELU's tanh approximation, in fp32."""
        if GELU:
            k = 0.7978845608028654  # sqrt(2 / pi)
            z = k * (g + 0.044715 * g * g * g)
            t = 2.0 * tl.sigmoid(2.0 * z) - 1.0  # tanh(z), from a function the interpreter also has
            a = 0.5 * g * (1.0 + t)
            da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * g * g)
        else:
            s = tl.sigmoid(g)
            a = g * s
            da = s * (1.0 + g * (1.0 - s))
        return a, da

    @triton.jit
    def _glu_forward(h, out, F, GELU: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < F
        g = tl.load(h + row * 2 * F + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h + row * 2 * F + F + cols, mask=mask, other=0.0).to(tl.float32)
        a, _ = _act(g, GELU)
        tl.store(out + row * F + cols, (a * u).to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def _glu_backward(h, grad_out, grad_h, F, GELU: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < F
        g = tl.load(h + row * 2 * F + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h + row * 2 * F + F + cols, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(grad_out + row * F + cols, mask=mask, other=0.0).to(tl.float32)
        a, da = _act(g, GELU)
        tl.store(grad_h + row * 2 * F + cols, (d * u * da).to(grad_h.dtype.element_ty), mask=mask)
        tl.store(grad_h + row * 2 * F + F + cols, (d * a).to(grad_h.dtype.element_ty), mask=mask)

    # On a GPU the block and warps are tuned once per width F; the interpreter runs the plain kernels.
    _configs = [triton.Config({"BLOCK": b}, num_warps=w) for b in (512, 1024, 2048) for w in (2, 4, 8)]
    _forward_tuned = triton.autotune(_configs, key=["F"])(_glu_forward)
    _backward_tuned = triton.autotune(_configs, key=["F"])(_glu_backward)

    def _grid(n, f):
        return lambda meta: (n, triton.cdiv(f, meta["BLOCK"]))

    @triton_op("slm::glu", mutates_args={})
    def _glu(h: torch.Tensor, gelu: bool) -> torch.Tensor:
        n, f = h.shape[0], h.shape[1] // 2
        out = torch.empty((n, f), dtype=h.dtype, device=h.device)
        launch(_forward_tuned, _glu_forward, _grid(n, f), (h, out, f, gelu), BLOCK=BLOCK)
        return out

    @triton_op("slm::glu_backward", mutates_args={})
    def _glu_backward_op(h: torch.Tensor, grad_out: torch.Tensor, gelu: bool) -> torch.Tensor:
        n, f = grad_out.shape
        grad_h = torch.empty_like(h)
        launch(_backward_tuned, _glu_backward, _grid(n, f), (h, grad_out.contiguous(), grad_h, f, gelu), BLOCK=BLOCK)
        return grad_h

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.gelu = inputs[1]

    def _backward(ctx, grad_out):
        (h,) = ctx.saved_tensors
        return _glu_backward_op(h, grad_out, ctx.gelu), None

    _glu.register_autograd(_backward, setup_context=_setup_context)


def glu(h: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """act(gate) * up for h = [gate | up] along the last dimension (act: SiLU, or with `gelu` GELU's
    tanh approximation), with its gradient: the Triton kernels (a GPU, or any device under
    TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("glu needs Triton (pip install triton)")
    if h.shape[-1] % 2:
        raise ValueError(f"glu needs [gate | up] of even width, got {h.shape[-1]}")
    lead = h.shape[:-1]
    out = _glu(h.reshape(-1, h.shape[-1]).contiguous(), gelu)
    return out.view(*lead, -1)
