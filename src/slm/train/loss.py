"""Cross-entropy through the LM head without materialising the logits.

At the stories15M shape a batch of 8 x 256 tokens has 2048 x 32000 fp32 logits (262 MB). The
plain path writes them, reads them for log-softmax, writes the log-probabilities, then does the
same again backwards: about a fifth of a CPU training step goes to memory traffic, not math.

Since the loss is the last operation, its gradient is known during the forward pass. So for each
chunk of rows we compute the logits, turn them in place into d loss / d logits = softmax - onehot,
and immediately multiply out the gradients for the hidden states and the head weight. Backward
only scales them by the incoming gradient (and not at all when that is 1, as it is for the loss
itself). The matmul FLOPs are exactly those of the plain path; the big tensor never exists (the
idea of Liger-Kernel's fused linear cross-entropy).

In fp32 on the CPU the softmax and gradient are one C++ call per chunk (kernels/cpu/train.cpp
`softmax_xent_`): one exp per logit, each row's three passes in L2, the mean folded in. PyTorch's
log_softmax, exp_ and one-hot update took ~110 ms per 1,024 x 32,000 chunk on 2 CPU threads, the
kernel ~20 ms (benchmarks/cpu_train_kernels.py; docs/benchmarks.md).
"""

from __future__ import annotations

import math
import threading

import torch

from .. import kernels


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, ignore_index):
        # hidden [N, d], weight [V, d], targets [N]; mean over targets != ignore_index
        n = hidden.shape[0]
        valid = targets != ignore_index
        count = int(valid.sum())
        scale = 1.0 / max(count, 1)
        op = _softmax_xent_op(hidden, weight)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            h, t = hidden[s:s + chunk], targets[s:s + chunk]
            if op is not None:  # one C++ pass per row: logits -> scale * (softmax - onehot), in place
                logits = _scratch(len(h) * weight.shape[0]).view(len(h), weight.shape[0])
                torch.mm(h, weight.t(), out=logits)
                total += op(logits, t, ignore_index, scale).sum()
                g = logits
            else:
                g, nll = _softmax_xent(h @ weight.t(), t, valid[s:s + chunk], count < n)
                total += nll.sum()
                g = g.to(hidden.dtype)
            torch.mm(g, weight, out=grad_hidden[s:s + chunk])
            if s == 0:
                torch.mm(g.t().float(), h.float(), out=grad_weight)  # fp32 accumulation (.float() is free for fp32)
            else:
                grad_weight.addmm_(g.t().float(), h.float())
        if op is None:  # the mean, applied once to the small results (the kernel applies it per row)
            grad_hidden.mul_(scale)
            grad_weight.mul_(scale)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_out.device.type == "cpu" and grad_out.item() == 1.0:  # backward() of the loss itself
            return grad_hidden, grad_weight.to(ctx.weight_dtype), None, None, None  # no pass over [V, d]
        return grad_hidden * grad_out, (grad_weight * grad_out).to(ctx.weight_dtype), None, None, None


_local = threading.local()


def _scratch(numel: int) -> torch.Tensor:
    """A CPU fp32 buffer for one chunk of logits, kept between steps (per thread): ~128 MB. A fresh
    one would be new pages from the OS each step, and their first-touch faults cost ~40 ms of a
    1.5 s stories15M step here."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < numel:
        _local.buf = buf = torch.empty(numel, dtype=torch.float32)
    return buf[:numel]


def _softmax_xent_op(hidden, weight):
    """slm's C++ softmax-and-gradient kernel (kernels/cpu/train.cpp) where it applies: fp32 on the CPU."""
    if hidden.is_cpu and hidden.dtype == torch.float32 and weight.dtype == torch.float32:
        return kernels.fused_op("softmax_xent_")
    return None


def _softmax_xent(logits, t, ok, masked):
    """PyTorch's version of the kernel, unscaled: (softmax - onehot in fp32, per-row nll)."""
    rows, t_safe = torch.arange(len(t), device=t.device), t.clamp(min=0)
    # few passes over the [chunk, V] block: log-softmax, then in place exp -> softmax - onehot
    logp = torch.log_softmax(logits.float(), -1)
    nll = -logp[rows, t_safe]
    probs = logp.exp_()
    probs[rows, t_safe] -= 1.0
    if masked:  # ignored rows: no loss, no gradient
        nll = nll * ok
        probs.mul_(ok[:, None].to(probs.dtype))
    return probs, nll


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               chunk: int | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, equal to
    F.cross_entropy(F.linear(hidden, weight), targets) with its gradients, in chunks of rows.
    hidden [..., d], targets [...] (ignore_index rows count neither in the loss nor the mean).
    By default a chunk holds about 2**25 logits (128 MB in fp32): large enough that the per-chunk
    update of the head's gradient is cheap, small enough to bound memory."""
    d = hidden.shape[-1]
    chunk = chunk or max(64, 2 ** int(math.log2(max(1, 2**25 // weight.shape[0]))))
    return _FusedLinearCrossEntropy.apply(hidden.reshape(-1, d), weight, targets.reshape(-1), chunk, ignore_index)
