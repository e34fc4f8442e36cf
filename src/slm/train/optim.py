"""Optimizers for training from scratch: AdamW, or Muon for the hidden matrices.

Muon (Keller Jordan's, as in modded-nanogpt) orthogonalises the momentum of each 2-D weight
inside the blocks with a few Newton-Schulz iterations, so every direction of the update moves at
the same rate. At small scale it reaches a given loss in markedly fewer steps than AdamW.
Embeddings, the LM head, norms and biases are not hidden matrices: they stay on AdamW.

We carry our own Muon rather than `torch.optim.Muon` because that one always iterates in bf16,
which CPUs without native bf16 (like AVX2 machines) emulate: 15 s per step at the stories15M
shape against 0.1 s here. Ours iterates in fp32 on the CPU and bf16 on GPUs, runs the matrices
of one shape (one per layer) as one batched product, and on the CPU computes the same polynomial
through the Gram matrix's eigendecomposition where that is cheaper (wide matrices).

Each parameter group keeps its base learning rate in "base_lr"; the schedule scales all of them
by one multiplier per step.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn

ADAM_BETAS = (0.9, 0.95)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller's quintic: steepest slope at zero, 5 steps


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T, batched over leading dims: Keller's Newton-Schulz
    quintic applied `steps` times (singular values land in about [0.7, 1.2], which trains as well
    as exact U V^T). Two equivalent ways to compute it, whichever is cheaper for the shape."""
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    if x.size(-2) > x.size(-1):  # work on the smaller Gram matrix
        return orthogonalize(g.mT, steps).mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    if not g.is_cuda and x.size(-1) >= 2 * x.size(-2):
        x = _polynomial_via_gram(x, steps)
    else:
        a, b, c = NS_COEFFICIENTS
        for _ in range(steps):
            gram = x @ x.mT
            x = a * x + (b * gram + c * gram @ gram) @ x
    return x.to(g.dtype)


def _polynomial_via_gram(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The same Newton-Schulz result for a wide x [m, n] (n >= 2m) on the CPU, in a third of the
    time: every iterate is p(x x^T) x for a polynomial p, so one symmetric eigendecomposition of the
    small m x m Gram matrix lets us apply the quintic to the singular values as scalars, and touch
    the wide matrix twice instead of twice per iteration. Agrees with the iteration to ~1e-4."""
    a, b, c = NS_COEFFICIENTS
    lam, v = torch.linalg.eigh(x @ x.mT)
    s = lam.clamp(min=0).sqrt()  # the singular values of x
    t = s
    for _ in range(steps):
        t = a * t + b * t**3 + c * t**5
    scale = torch.where(s > 1e-12, t / s.clamp(min=1e-12), torch.full_like(s, a**steps))  # a^steps: slope at 0
    return (v * scale.unsqueeze(-2)) @ (v.mT @ x)


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalised, scaled by sqrt(max(1, rows/cols))
    so tall matrices move as much per entry as wide ones (Keller Jordan's Muon)."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, ns_steps: int = 5, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            mu, by_shape = group["momentum"], defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - mu)
                by_shape[p.shape].append((p, p.grad.lerp(buf, mu)))  # Nesterov
            for shape, items in by_shape.items():
                updates = orthogonalize(torch.stack([u for _, u in items]), group["ns_steps"])
                scale = group["lr"] * max(1.0, shape[0] / shape[1]) ** 0.5
                for (p, _), u in zip(items, updates):
                    if group["weight_decay"]:
                        p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(u, alpha=-scale)


def build_optimizers(model: nn.Module, name: str, lr: float, weight_decay: float,
                     muon_lr: float = 0.02, fused: bool = True) -> list[torch.optim.Optimizer]:
    """"adamw": AdamW on everything (decay on matrices only). "muon": Muon on the blocks' 2-D
    weights, AdamW at `lr` on the rest."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # a tied head appears once
    hidden = [p for n, p in params.items() if p.dim() == 2 and n.startswith("blocks.")]
    matrices = [p for n, p in params.items() if p.dim() >= 2 and not (name == "muon" and n.startswith("blocks."))]
    vectors = [p for p in params.values() if p.dim() < 2]
    adamw = torch.optim.AdamW([{"params": matrices, "weight_decay": weight_decay, "base_lr": lr},
                               {"params": vectors, "weight_decay": 0.0, "base_lr": lr}],
                              lr=lr, betas=ADAM_BETAS, eps=1e-8, fused=fused)
    if name == "adamw":
        return [adamw]
    if name == "muon":
        muon = Muon([{"params": hidden, "base_lr": muon_lr}], lr=muon_lr)
        return [muon, adamw]
    raise ValueError(f"unknown optimizer {name!r}: use adamw or muon")


def set_lr(optimizers: list[torch.optim.Optimizer], multiplier: float) -> None:
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * multiplier


def state_tensors(optimizers: list[torch.optim.Optimizer], names: dict[int, str]) -> dict[str, torch.Tensor]:
    """Every tensor of the optimizers' state, keyed "<optimizer>.<parameter>.<key>" (for safetensors)."""
    out = {}
    for i, opt in enumerate(optimizers):
        for group in opt.param_groups:
            for p in group["params"]:
                for key, v in opt.state.get(p, {}).items():
                    v = v if torch.is_tensor(v) else torch.tensor(v)
                    out[f"{i}.{names[id(p)]}.{key}"] = v.detach().cpu().contiguous()
    return out


def load_state_tensors(optimizers: list[torch.optim.Optimizer], names: dict[int, str],
                       tensors: dict[str, torch.Tensor], check_only: bool = False) -> None:
    """Put the state written by state_tensors back into the optimizers. Every tensor must belong
    to a parameter of this model, with the parameter's shape (the step counters are scalars): a
    ValueError names the first that does not. check_only: check, change nothing."""
    known = set()
    for i, opt in enumerate(optimizers):
        for group in opt.param_groups:
            for p in group["params"]:
                prefix = f"{i}.{names[id(p)]}."
                state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                for k, v in state.items():
                    known.add(prefix + k)
                    if v.dim() and v.shape != p.shape:
                        raise ValueError(f"optimizer state {prefix + k} has shape {list(v.shape)}, "
                                         f"the parameter {list(p.shape)}: the checkpoint is of another architecture")
                if state and not check_only:
                    opt.state[p] = {k: v.to(p.device) for k, v in state.items()}
    unknown = sorted(tensors.keys() - known)
    if unknown:
        raise ValueError(f"optimizer state {unknown[0]} (and {len(unknown) - 1} more) belongs to no parameter of "
                         "this model: the checkpoint is of another architecture or optimizer")
