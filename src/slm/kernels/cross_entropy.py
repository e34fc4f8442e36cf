"""Cross-entropy over bf16 logits in two Triton passes, for training on a GPU.

With the vocabulary of GPT-2 (50,304) a batch of 32 x 1,024 tokens has 3.3 GB of bf16 logits.
`F.cross_entropy(logits.float(), y)` copies them to fp32 (6.6 GB), runs log-softmax over the copy
and, backwards, the log-softmax gradient and another copy back to bf16: on an H200 that is about
20 ms of a 79 ms step of the 124M preset, more than attention. torch.compile does not fuse it.

Here the forward reads each row once (online max and sum of exponentials, as in flash attention)
and keeps only the log-sum-exp per row; the backward reads the row again and writes
d loss / d logits = (softmax - onehot) * grad straight in the logits' dtype. That is three passes
over the bf16 logits instead of about ten over fp32 ones. The arithmetic is fp32 throughout.

linear_cross_entropy() takes the head too, for training: as the loss is the last operation, one
kernel writes the loss and the gradient of each row while the row is still in cache, and the
head's backward products run in the forward pass. Two passes over the logits, which are freed at
once instead of being kept for the backward.

Registered with `torch.library.triton_op`, so torch.compile keeps the whole loss in one graph.
On a machine without a GPU the same kernels run under Triton's interpreter (TRITON_INTERPRET=1),
which is how the tests check them against `F.cross_entropy`.
"""

from __future__ import annotations

import torch

from .triton_launch import launch, triton

BLOCK, SCALAR = 4096, True  # under the interpreter (tests): logits per inner step, forward variant


if triton is not None:
    import triton.language as tl
    from torch.library import triton_op

    @triton.jit
    def _row_lse(base, V, BLOCK: tl.constexpr, SCALAR: tl.constexpr):
        """log-sum-exp of the row at `base`, in one pass (online softmax: a running maximum m and
        the sum s of exp(x - m))."""
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
        return row_lse

    @triton.jit
    def _row_loss(base, t, V, ignore_index, BLOCK: tl.constexpr, SCALAR: tl.constexpr):
        """(log-sum-exp, loss) of the row at `base` with target t (loss 0 where t is ignored)."""
        row_lse = _row_lse(base, V, BLOCK, SCALAR)
        valid = t != ignore_index
        x_t = tl.load(base + tl.where(valid, t, 0)).to(tl.float32)
        return row_lse, tl.where(valid, row_lse - x_t, 0.0)

    @triton.jit
    def _write_grad(base, out, t, row_lse, g, V, BLOCK: tl.constexpr):
        """out[:] = (softmax(row) - onehot(t)) * g, in out's dtype."""
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            d = tl.exp(x - row_lse) - tl.where(cols == t, 1.0, 0.0)
            tl.store(out + cols, (d * g).to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def _triton_ce_forward(logits, stride, targets, loss, lse, V, ignore_index, BLOCK: tl.constexpr,
                           SCALAR: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        row_lse, row_loss = _row_loss(logits + row * stride, tl.load(targets + row), V, ignore_index, BLOCK, SCALAR)
        tl.store(lse + row, row_lse)
        tl.store(loss + row, row_loss)

    @triton.jit
    def _triton_ce_grad(logits, stride, targets, loss, grad, V, ignore_index, BLOCK: tl.constexpr,
                        SCALAR: tl.constexpr):
        """The loss of a row and, in the same program, its gradient softmax - onehot (0 for an
        ignored row): the second read of the row comes from L2, not from memory."""
        row = tl.program_id(0).to(tl.int64)
        t = tl.load(targets + row)
        row_lse, row_loss = _row_loss(logits + row * stride, t, V, ignore_index, BLOCK, SCALAR)
        tl.store(loss + row, row_loss)
        _write_grad(logits + row * stride, grad + row * stride, t, row_lse, tl.where(t != ignore_index, 1.0, 0.0),
                    V, BLOCK)

    @triton.jit
    def _triton_ce_backward(logits, stride, targets, lse, grad_loss, grad, V, ignore_index, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        t = tl.load(targets + row)
        g = tl.load(grad_loss + row).to(tl.float32)
        g = tl.where(t != ignore_index, g, 0.0)  # ignored rows get no gradient
        _write_grad(logits + row * stride, grad + row * stride, t, tl.load(lse + row), g, V, BLOCK)

    # On a GPU the block size, warps and forward variant are tuned once per vocabulary size (a few
    # seconds at the first step); the interpreter runs the plain kernels.
    _configs = [(b, w) for b in (2048, 4096, 8192) for w in (4, 8, 16)]
    _scalar_configs = [triton.Config({"BLOCK": b, "SCALAR": sc}, num_warps=w)
                       for b, w in _configs for sc in (True, False)]
    _forward_tuned = triton.autotune(_scalar_configs, key=["V"])(_triton_ce_forward)
    _grad_tuned = triton.autotune(_scalar_configs, key=["V"])(_triton_ce_grad)
    _backward_tuned = triton.autotune([triton.Config({"BLOCK": b}, num_warps=w) for b, w in _configs],
                                      key=["V"])(_triton_ce_backward)

    @triton_op("slm::cross_entropy_rows", mutates_args={})
    def _rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, v = logits.shape
        loss = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        launch(_forward_tuned, _triton_ce_forward, (n,),
               (logits, logits.stride(0), targets, loss, lse, v, ignore_index), BLOCK=BLOCK, SCALAR=SCALAR)
        return loss, lse

    @triton_op("slm::cross_entropy_rows_backward", mutates_args={})
    def _rows_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_loss: torch.Tensor,
                       ignore_index: int) -> torch.Tensor:
        n, v = logits.shape
        grad = torch.empty_like(logits)
        launch(_backward_tuned, _triton_ce_backward, (n,),
               (logits, logits.stride(0), targets, lse, grad_loss.contiguous(), grad, v, ignore_index), BLOCK=BLOCK)
        return grad

    def _setup_context(ctx, inputs, output):
        logits, targets, ignore_index = inputs
        ctx.save_for_backward(logits, targets, output[1])
        ctx.ignore_index = ignore_index

    def _backward(ctx, grad_loss, grad_lse):
        logits, targets, lse = ctx.saved_tensors
        return _rows_backward(logits, targets, lse, grad_loss, ctx.ignore_index), None, None

    _rows.register_autograd(_backward, setup_context=_setup_context)

    @triton_op("slm::cross_entropy_rows_grad", mutates_args={})
    def _rows_grad(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, v = logits.shape
        loss = torch.empty(n, dtype=torch.float32, device=logits.device)
        grad = torch.empty_like(logits)
        launch(_grad_tuned, _triton_ce_grad, (n,), (logits, logits.stride(0), targets, loss, grad, v, ignore_index),
               BLOCK=BLOCK, SCALAR=SCALAR)
        return loss, grad

    class _LinearCrossEntropy(torch.autograd.Function):
        """The LM head and the loss together. The gradient of the logits is known in the forward
        pass, so the Triton kernel writes it while the row is in cache and the head's two backward
        products run at once (as loss.py does on the CPU); the logits are dropped right after. That
        is two passes over the [N, V] logits where the split path (cross_entropy after the head)
        takes three, and the big tensor is not kept for the backward. Backward only scales the two
        small results by the incoming gradient."""

        @staticmethod
        def forward(ctx, hidden, weight, targets, ignore_index):
            loss, grad = _rows_grad(hidden @ weight.t(), targets, ignore_index)
            scale = 1.0 / (targets != ignore_index).sum().clamp(min=1)  # a tensor: no wait for the device
            ctx.save_for_backward(grad @ weight, grad.t() @ hidden, scale)
            return loss.sum() * scale

        @staticmethod
        def backward(ctx, grad_out):
            grad_hidden, grad_weight, scale = ctx.saved_tensors
            s = grad_out * scale
            return grad_hidden * s, grad_weight * s, None, None  # a 0-dim fp32 s keeps their dtype


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


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of hidden @ weight.T ([N, d] @ [d, V]) against targets [N]: the value and
    gradients of cross_entropy(F.linear(hidden, weight), targets), hidden and weight of one dtype.
    The logits exist only inside the forward (see _LinearCrossEntropy)."""
    if triton is None:
        raise RuntimeError("linear_cross_entropy needs Triton (pip install triton)")
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1).contiguous(),
                                     ignore_index)
