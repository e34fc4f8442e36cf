"""Which input tokens made the model predict its next token.

The target is f(x) = logit of `target` at the last position, or logit(target) - logit(contrast)
(a logit difference, which cancels what raises every token alike). Three methods:

- integrated gradients (Sundararajan et al., 2017) on the input embeddings: the gradient of f
  averaged along the straight path from a baseline (zeros, or a token's embedding, at every
  position) to the real embeddings, times (x - baseline), summed over the embedding dimensions.
  The path integral is a trapezoid (or midpoint) sum over `steps` intervals; its error is
  reported as the completeness gap  sum(attributions) - (f(x) - f(baseline)).
- gradient x input: the same product at x alone, one backward pass.
- occlusion: f(x) - f(x with the token replaced by a baseline token), one forward pass per token.

The embeddings are those of `model.embed`, before Gemma's sqrt(d) scale (a linear map, so the
attributions are the same as for the scaled ones). A leading BOS token is held at its real
embedding by default (`fixed`): its attribution is 0 and the baseline keeps it, since the model
has never seen a sequence without it. Attribution needs an fp32 model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..model import Transformer


@dataclass
class Attribution:
    ids: list[int]
    target: int
    contrast: int | None
    value: float  # f(x)
    integrated_gradients: list[float]
    baseline_value: float  # f(baseline)
    gradient_x_input: list[float]
    occlusion: list[float]
    steps: int
    rule: str
    baseline: str
    fixed: list[int]

    @property
    def completeness_gap(self) -> float:
        """sum of integrated gradients - (f(x) - f(baseline)); 0 for the exact integral."""
        return sum(self.integrated_gradients) - (self.value - self.baseline_value)


def _check(model: Transformer, ids: torch.Tensor, target: int, contrast: int | None) -> None:
    if model.dtype != torch.float32:
        raise ValueError(f"attribution needs an fp32 model, this one is {model.dtype} "
                         "(load it with dtype='fp32')")
    if ids.dim() != 1 or len(ids) == 0:
        raise ValueError(f"attribution takes one sequence of token ids, got shape {tuple(ids.shape)}")
    V = model.config.vocab_size
    for name, t in (("target", target), ("contrast", contrast)):
        if t is not None and not 0 <= t < V:
            raise ValueError(f"{name} token id {t} is outside the vocabulary (0..{V - 1})")


def _objective(logits: torch.Tensor, target: int, contrast: int | None) -> torch.Tensor:
    """f for each row of last-position logits [n, 1, vocab] -> [n]."""
    last = logits[:, -1].float()
    return last[:, target] - (last[:, contrast] if contrast is not None else 0.0)


@contextmanager
def _embeddings_from(model: Transformer, box: dict):
    """While active, the model's embedding layer outputs box["emb"] instead of its lookup."""
    h = model.embed.register_forward_hook(lambda mod, args, out: box["emb"])
    try:
        yield
    finally:
        h.remove()


def _f_and_grad(model: Transformer, emb: torch.Tensor, target: int, contrast: int | None):
    """f and df/d(emb) for a batch of embedding sequences [n, T, d]."""
    emb = emb.detach().requires_grad_(True)
    ids = torch.zeros(emb.shape[:2], dtype=torch.long, device=emb.device)  # shape only: the hook replaces the lookup
    with torch.enable_grad(), _embeddings_from(model, {"emb": emb}):
        f = _objective(model(ids, last_only=True), target, contrast)
        (grad,) = torch.autograd.grad(f.sum(), emb)
    return f.detach(), grad


def default_fixed(model: Transformer, ids: torch.Tensor) -> list[int]:
    bos = model.config.bos_token_id
    return [0] if bos is not None and len(ids) > 1 and int(ids[0]) == bos else []


def integrated_gradients(model: Transformer, ids: torch.Tensor, target: int, contrast: int | None = None,
                         steps: int = 64, baseline: str | int = "zeros", rule: str = "trapezoid",
                         fixed: list[int] | None = None, power: float | None = None, batch_size: int = 16,
                         progress: bool = False):
    """Per-token integrated gradients of f, with f(x) and f(baseline): (attributions [T], fx, fb).
    baseline: "zeros" or a token id whose embedding fills every position not in `fixed`.

    The path is sampled at alpha = u**power for `steps` equal steps of u (power 1: the plain
    trapezoid/midpoint rule). From a zero baseline, the first norm of a pre-norm model jumps from
    0 to its full output within alpha ~ sqrt(eps) / rms(x), and the gradient there is ~1/sqrt(eps)
    per norm; power 3 (the default when a baseline vector is zero) puts samples inside that jump and gives the
    gradient at alpha = 0 a weight of 0."""
    _check(model, ids, target, contrast)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if rule not in ("trapezoid", "midpoint"):
        raise ValueError(f"rule must be 'trapezoid' or 'midpoint', got {rule!r}")
    fixed = default_fixed(model, ids) if fixed is None else fixed
    with torch.no_grad():
        x = model.embed(ids).float()  # [T, d]
        if baseline == "zeros":
            b = torch.zeros_like(x)
        else:
            b = model.embed(torch.full_like(ids, int(baseline))).float()
        b[fixed] = x[fixed]
    if power is None:  # a zero baseline (also a token with a zero embedding, as a padding_idx row)
        power = 3.0 if bool((b == 0).all(-1).any()) else 1.0
    if rule == "trapezoid":
        u = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        weights = torch.full((steps + 1,), 1.0 / steps, dtype=torch.float64)
        weights[0] = weights[-1] = 0.5 / steps
    else:
        u = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
        weights = torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    # The path alpha = u**power, integrated over u: d(alpha) = power * u**(power - 1) du.
    alphas, weights = (u ** power).float(), (weights * power * u ** (power - 1)).float()
    total = torch.zeros_like(x)
    fs = []
    chunks = range(0, len(alphas), batch_size)
    for s in tqdm(chunks, desc="integrated gradients", disable=not progress, leave=False):
        a = alphas[s:s + batch_size].to(x.device)[:, None, None]
        f, g = _f_and_grad(model, b + a * (x - b), target, contrast)
        total += (weights[s:s + batch_size].to(x.device)[:, None, None] * g).sum(0)
        fs.append(f)
    fs = torch.cat(fs)
    if rule == "trapezoid":
        fx, fb = fs[-1].item(), fs[0].item()
    else:
        with torch.no_grad(), _embeddings_from(model, {"emb": torch.stack([x, b])}):
            ends = _objective(model(ids.expand(2, -1), last_only=True), target, contrast)
        fx, fb = ends[0].item(), ends[1].item()
    attr = ((x - b) * total).sum(-1)
    return attr.tolist(), fx, fb


def gradient_x_input(model: Transformer, ids: torch.Tensor, target: int, contrast: int | None = None,
                     fixed: list[int] | None = None) -> list[float]:
    """Per-token gradient x input (the gradient of f at x dotted with x), 0 at `fixed` positions."""
    _check(model, ids, target, contrast)
    fixed = default_fixed(model, ids) if fixed is None else fixed
    with torch.no_grad():
        x = model.embed(ids).float()
    _, g = _f_and_grad(model, x[None], target, contrast)
    out = (g[0] * x).sum(-1)
    out[fixed] = 0.0
    return out.tolist()


def occlusion(model: Transformer, ids: torch.Tensor, target: int, contrast: int | None = None,
              token: int = 0, fixed: list[int] | None = None, batch_size: int = 16) -> list[float]:
    """Per-token drop f(x) - f(x with that one token replaced by `token`), 0 at `fixed` positions."""
    _check(model, ids, target, contrast)
    fixed = default_fixed(model, ids) if fixed is None else fixed
    T = len(ids)
    rows = ids.repeat(T + 1, 1)  # row t < T: token t occluded; the last row: the real input
    rows[torch.arange(T), torch.arange(T)] = token
    with torch.no_grad():
        f = torch.cat([_objective(model(rows[s:s + batch_size], last_only=True), target, contrast)
                       for s in range(0, T + 1, batch_size)])
    drop = f[-1] - f[:T]
    drop[fixed] = 0.0
    return drop.tolist()


def attribute(model: Transformer, ids, target: int, contrast: int | None = None, steps: int = 64,
              baseline: str | int = "zeros", rule: str = "trapezoid", occlusion_token: int | None = None,
              fixed: list[int] | None = None, progress: bool = False) -> Attribution:
    """All three attributions of f for one sequence of token ids."""
    ids = torch.as_tensor(ids, dtype=torch.long, device=model.device).reshape(-1)
    fixed = default_fixed(model, ids) if fixed is None else list(fixed)
    ig, fx, fb = integrated_gradients(model, ids, target, contrast, steps, baseline, rule, fixed, progress=progress)
    gxi = gradient_x_input(model, ids, target, contrast, fixed)
    if occlusion_token is None:
        occlusion_token = baseline if isinstance(baseline, int) else 0
    occ = occlusion(model, ids, target, contrast, occlusion_token, fixed)
    return Attribution(ids.tolist(), target, contrast, fx, ig, fb, gxi, occ, steps, rule,
                       "zeros" if baseline == "zeros" else f"token {baseline}", fixed)
