"""Cross-entropy through the LM head without materialising the logits.

At the stories15M shape a batch of 8 x 256 tokens has 2048 x 32000 fp32 logits (262 MB). The
plain path writes them, reads them for log-softmax, writes the log-probabilities, then does the
same again backwards: about a fifth of a CPU training step goes to memory traffic, not math.

Since the loss is the last operation, its gradient is known during the forward pass. So for each
chunk of rows we compute the logits, turn them in place into d loss / d logits = softmax - onehot
(three passes over the chunk), and immediately multiply out the gradients for the hidden states
and the head weight. Backward only scales them by the incoming gradient. The
matmul FLOPs are exactly those of the plain path; the big tensor never exists (the idea of
Liger-Kernel's fused linear cross-entropy).
"""

from __future__ import annotations

import math

import torch


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, ignore_index):
        # hidden [N, d], weight [V, d], targets [N]; mean over targets != ignore_index
        n = hidden.shape[0]
        valid = targets != ignore_index
        count = int(valid.sum())
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            h, t = hidden[s:s + chunk], targets[s:s + chunk]
            rows, t_safe = torch.arange(len(t), device=t.device), t.clamp(min=0)
            # few passes over the [chunk, V] block: log-softmax, then in place exp -> softmax - onehot
            logp = torch.log_softmax((h @ weight.t()).float(), -1)
            nll = -logp[rows, t_safe]
            probs = logp.exp_()
            probs[rows, t_safe] -= 1.0
            if count < n:  # ignored rows: no loss, no gradient
                ok = valid[s:s + chunk]
                nll = nll * ok
                probs.mul_(ok[:, None].to(probs.dtype))
            total += nll.sum()
            g = probs.to(hidden.dtype)
            torch.mm(g, weight, out=grad_hidden[s:s + chunk])
            grad_weight.addmm_(g.t().float(), h.float())  # fp32 accumulation (.float() is free for fp32)
        scale = 1.0 / max(count, 1)  # the mean, applied once to the small results
        grad_hidden.mul_(scale)
        grad_weight.mul_(scale)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_out, (grad_weight * grad_out).to(ctx.weight_dtype), None, None, None


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
