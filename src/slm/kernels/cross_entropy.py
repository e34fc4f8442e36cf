"""Cross-entropy over bf16 logits in two Triton passes, for training on a GPU.

With the vocabulary of GPT-2 (50,304) a batch of 32 x 1,024 tokens has 3.3 GB of bf16 logits.
`F.cross_entropy(logits.float(), y)` copies them to fp32 (6.6 GB), runs log-softmax over the copy
and, backwards, the log-softmax gradient and another copy back to bf16: on an H200 that is about
20 ms of a 79 ms step of the 124M preset, more than attention. torch.compile does not fuse it.

Here the forward reads each row once (online max and sum of exponentials, as in flash attention)
and keeps only the log-sum-exp per row; the backward reads the row again and writes
d loss / d logits = (softmax - onehot) * grad straight in the logits' dtype. That is three passes
over the bf16 logits instead of about ten over fp32 ones. The arithmetic is fp32 throughout.

Registered with `torch.library.triton_op`, so torch.compile keeps the whole loss in one graph.
On a machine without a GPU the same kernels run under Triton's interpreter (TRITON_INTERPRET=1),
which is how the tests check them against `F.cross_entropy`.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # no Triton (CPU builds of torch): callers use F.cross_entropy
    triton = None

BLOCK, SCALAR = 4096, True  # under the interpreter (tests): logits per inner step, forward variant


def available(device: torch.device) -> bool:
    """Whether cross_entropy() runs the Triton kernels for tensors on `device` (SLM_NO_TRITON=1: no,
    to compare with F.cross_entropy)."""
    return triton is not None and device.type == "cuda" and os.environ.get("SLM_NO_TRITON", "") in ("", "0")


if triton is not None:
    @triton.jit
    def _triton_ce_forward(logits, stride, targets, loss, lse, V, ignore_index, BLOCK: tl.constexpr,
                           SCALAR: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits + row * stride
        t = tl.load(targets + row)
        # online softmax, one pass over the row: a running maximum m and the sum s of exp(x - m)
        if SCALAR:  # one m for the row: one exp per logit, two block reductions per step
            m = float("-inf")
            s = 0.0
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, 0))  # finite: every step holds at least one column
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
                m = m_new
            row_lse = m + tl.log(s)
        else:  # one m per lane: no reductions inside the loop, two exps per logit
            m = tl.full([BLOCK], float("-inf"), tl.float32)
            s = tl.zeros([BLOCK], tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, x)
                # lanes that have seen only -inf keep s = 0 (avoid exp(-inf - -inf) = nan)
                s = s * tl.exp(tl.where(m == m_new, 0.0, m - m_new)) + tl.where(x == float("-inf"), 0.0, tl.exp(x - m_new))
                m = m_new
            m_row = tl.max(m, 0)
            row_lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), 0))
        valid = t != ignore_index
        x_t = tl.load(base + tl.where(valid, t, 0)).to(tl.float32)
        tl.store(lse + row, row_lse)
        tl.store(loss + row, tl.where(valid, row_lse - x_t, 0.0))

    @triton.jit
    def _triton_ce_backward(logits, stride, targets, lse, grad_loss, grad, V, ignore_index, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        t = tl.load(targets + row)
        g = tl.load(grad_loss + row).to(tl.float32)
        g = tl.where(t != ignore_index, g, 0.0)  # ignored rows get no gradient
        row_lse = tl.load(lse + row)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            x = tl.load(logits + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
            d = tl.exp(x - row_lse) - tl.where(cols == t, 1.0, 0.0)
            tl.store(grad + row * stride + cols, (d * g).to(grad.dtype.element_ty), mask=mask)

    # On a GPU the block size, warps and forward variant are tuned once per vocabulary size (a few
    # seconds at the first step); the interpreter runs the plain kernels.
    _configs = [(b, w) for b in (2048, 4096, 8192) for w in (4, 8, 16)]
    _forward_tuned = triton.autotune([triton.Config({"BLOCK": b, "SCALAR": sc}, num_warps=w) for b, w in _configs
                                      for sc in (True, False)], key=["V"])(_triton_ce_forward)
    _backward_tuned = triton.autotune([triton.Config({"BLOCK": b}, num_warps=w) for b, w in _configs],
                                      key=["V"])(_triton_ce_backward)

    def _launch(tuned, plain, grid, args, scalar=None):
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            extra = {} if scalar is None else {"SCALAR": scalar}
            wrap_triton(plain)[grid](*args, BLOCK=BLOCK, **extra)
        else:
            wrap_triton(tuned)[grid](*args)

    @triton_op("slm::cross_entropy_rows", mutates_args={})
    def _rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, v = logits.shape
        loss = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        _launch(_forward_tuned, _triton_ce_forward, (n,),
                (logits, logits.stride(0), targets, loss, lse, v, ignore_index), scalar=SCALAR)
        return loss, lse

    @triton_op("slm::cross_entropy_rows_backward", mutates_args={})
    def _rows_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_loss: torch.Tensor,
                       ignore_index: int) -> torch.Tensor:
        n, v = logits.shape
        grad = torch.empty_like(logits)
        _launch(_backward_tuned, _triton_ce_backward, (n,),
                (logits, logits.stride(0), targets, lse, grad_loss.contiguous(), grad, v, ignore_index))
        return grad

    def _setup_context(ctx, inputs, output):
        logits, targets, ignore_index = inputs
        ctx.save_for_backward(logits, targets, output[1])
        ctx.ignore_index = ignore_index

    def _backward(ctx, grad_loss, grad_lse):
        logits, targets, lse = ctx.saved_tensors
        return _rows_backward(logits, targets, lse, grad_loss, ctx.ignore_index), None, None

    _rows.register_autograd(_backward, setup_context=_setup_context)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of logits [N, V] (any float dtype, rows contiguous) against targets [N],
    over the targets that are not ignore_index: F.cross_entropy's value and gradient, computed
    by the Triton kernels (a GPU, or any device under TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("cross_entropy needs Triton (pip install triton)")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    loss, _ = _rows(logits, targets.contiguous(), ignore_index)
    return loss.sum() / (targets != ignore_index).sum().clamp(min=1)
