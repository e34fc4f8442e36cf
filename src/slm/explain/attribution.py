"""Which input tokens made the model predict its next token.

The target is f(x) = logit of `target` at the last position, or logit(target) - logit(contrast)
(a logit difference, which cancels what raises every token alike). Three methods:

- integrated gradients (Sundararajan et al., 2017) on the input embeddings: the gradient of f
  integrated along the straight path from a baseline (zeros, or a token's embedding, at every
  position) to the real embeddings, times (x - baseline), summed over the embedding dimensions.
  The integral's error is reported as the completeness gap sum(attributions) - (f(x) - f(baseline)),
  against a tolerance (1% of |f(x) - f(baseline)| by default). By default the integral is
  adaptive Simpson (see `integrated_gradients`): real models' paths are not smooth at any uniform
  step.
- gradient x input: the same product at x alone, one backward pass.
- occlusion: f(x) - f(x with the token replaced by a baseline token), one forward pass per token.

The embeddings are those of `model.embed`, before Gemma's sqrt(d) scale (a linear map, so the
attributions are the same as for the scaled ones). A leading BOS token is held at its real
embedding by default (`fixed`): its attribution is 0 and the baseline keeps it, since the model
has never seen a sequence without it. Attribution needs an fp32 model with dequantized weights
(slm.load(path, dtype="fp32")): linear layers that keep a GGUF's quantized blocks quantize their
activations to int8, which makes f piecewise constant and its gradient meaningless.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..model import Transformer
from ..quant.layers import QuantEmbedding, QuantLinear

DEFAULT_STEPS = 512  # gradient evaluations of integrated gradients
DEFAULT_TOLERANCE = 0.01  # of |f(x) - f(baseline)|: the completeness gap allowed
INITIAL_INTERVALS = 16  # the adaptive rule's first, equal, intervals
MIN_WIDTH = 1e-6  # of alpha: the adaptive rule splits no narrower interval


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
    steps: int  # gradient evaluations integrated gradients used
    rule: str
    baseline: str
    fixed: list[int]
    tolerance: float = DEFAULT_TOLERANCE  # the completeness gap allowed, relative to |f(x) - f(baseline)|

    @property
    def completeness_gap(self) -> float:
        """sum of integrated gradients - (f(x) - f(baseline)); 0 for the exact integral."""
        return sum(self.integrated_gradients) - (self.value - self.baseline_value)

    @property
    def relative_gap(self) -> float:
        """|completeness gap| / |f(x) - f(baseline)| (inf when f(x) = f(baseline) and the gap is not 0)."""
        delta = abs(self.value - self.baseline_value)
        gap = abs(self.completeness_gap)
        return gap / delta if delta > 0 else (0.0 if gap == 0 else float("inf"))

    @property
    def complete(self) -> bool:
        """Whether the completeness gap is within the tolerance: the attributions can be trusted."""
        return self.relative_gap <= self.tolerance

    def gap_summary(self) -> str:
        """One line on completeness, with a warning when the gap exceeds the tolerance."""
        line = (f"integrated gradients: sum {sum(self.integrated_gradients):+.4f} vs f(x) - f(baseline) = "
                f"{self.value - self.baseline_value:+.4f}; completeness gap {self.completeness_gap:+.2e} = "
                f"{self.relative_gap:.2%} of it (tolerance {self.tolerance * 100:g}%) after {self.steps} steps")
        if not self.complete:
            line += (f"\nWARNING: the completeness gap exceeds the {self.tolerance * 100:g}% tolerance: the integrated "
                     "gradients are not a reliable split of f(x) - f(baseline); raise --steps")
        return line


def _check(model: Transformer, ids: torch.Tensor, target: int, contrast: int | None) -> None:
    if model.dtype != torch.float32:
        raise ValueError(f"attribution needs an fp32 model, this one is {model.dtype} "
                         "(load it with dtype='fp32')")
    if any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules()):
        raise ValueError("attribution needs dequantized weights: quantized layers make f piecewise constant "
                         "(load the model with dtype='fp32')")
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


@dataclass
class IntegratedGradients:
    attributions: list[float]  # per token
    value: float  # f(x)
    baseline_value: float  # f(baseline)
    steps: int  # gradient evaluations used
    local_gaps: float  # sum over the intervals of |their gap|: an upper bound of |completeness gap|

    @property
    def completeness_gap(self) -> float:
        return sum(self.attributions) - (self.value - self.baseline_value)


@dataclass
class _Interval:
    """[a, c] of alpha with f at both ends and the midpoint, and the per-token (x - b) . grad f
    there (da, dm, dc: [T] float64; da None at alpha = 0 from the zero baseline, where the
    gradient overflows, and both None where the budget left no gradients at the first edges). Its
    share of the attributions, `part`, is Simpson's rule (c - a) (da + 4 dm + dc) / 6, or the
    midpoint rule (c - a) dm without da or dc."""
    a: float
    c: float
    fa: float
    fc: float
    fm: float
    da: torch.Tensor | None
    dm: torch.Tensor
    dc: torch.Tensor
    part: torch.Tensor = None  # [T] float64

    def __post_init__(self):
        w = self.c - self.a
        self.part = w * self.dm if self.da is None or self.dc is None else w / 6 * (self.da + 4 * self.dm + self.dc)

    @property
    def mid(self) -> float:
        return (self.a + self.c) / 2

    @property
    def signed_gap(self) -> float:
        """its share of the attributions - (f(c) - f(a)): the midpoint rule's error here."""
        return self.part.sum().item() - (self.fc - self.fa)

    @property
    def gap(self) -> float:
        return abs(self.signed_gap)


def _interpolate(x: torch.Tensor, b: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """The path's embeddings b + alpha (x - b) at each alpha: [n] -> [n, T, d]."""
    return b + alphas.to(x.device, torch.float32)[:, None, None] * (x - b)


def _f_only(model: Transformer, ids: torch.Tensor, emb: torch.Tensor, target: int, contrast: int | None,
            batch_size: int) -> torch.Tensor:
    """f (no gradient) for a batch of embedding sequences [n, T, d] -> [n] float64."""
    out = []
    with torch.no_grad():
        for s in range(0, len(emb), batch_size):
            chunk = emb[s:s + batch_size]
            with _embeddings_from(model, {"emb": chunk}):
                out.append(_objective(model(ids.expand(len(chunk), -1), last_only=True), target, contrast))
    return torch.cat(out).double()


def integrated_gradients(model: Transformer, ids: torch.Tensor, target: int, contrast: int | None = None,
                         steps: int = DEFAULT_STEPS, baseline: str | int = "zeros", rule: str = "adaptive",
                         fixed: list[int] | None = None, tolerance: float = DEFAULT_TOLERANCE,
                         batch_size: int = 16, progress: bool = False) -> IntegratedGradients:
    """Per-token integrated gradients of f along the straight path from the baseline (alpha = 0)
    to x (alpha = 1), with f at both ends. baseline: "zeros" or a token id whose embedding fills
    every position not in `fixed`. `steps` gradient evaluations, by one of three rules:

    - "adaptive" (the default): Simpson's rule on 16 equal intervals of alpha, then bisection of
      the intervals with the largest local gap, 8 at a time, until the completeness gap is within
      half the tolerance (tolerance x |f(x) - f(baseline)|) or the steps are spent. An interval
      [a, c] with f and the gradient at both ends and the midpoint m estimates f(c) - f(a) as
      (c - a) (g(a) + 4 g(m) + g(c)) . (x - b) / 6, and f(a), f(c) are known (a bisection's new
      ends are old midpoints, with their gradients), so each interval's gap is measured, not
      guessed, and the steps go where f bends. Real models need this: on SmolLM2-135M the path
      from the <pad> embedding swings f by 10-20 logits within 1-2% of alpha several times (not
      fp32 noise: that is ~2e-5 per interval), which 64 equal steps missed by 5x f(x) - f(b).
      Simpson's error shrinks as the interval's width^5 where the midpoint rule's does as width^3:
      on "def add(a, b):\n    return" (f(x) - f(pad) = 1.26 on a path through 3.8..26), the
      midpoint rule's 512 steps left a 1.5% gap, Simpson's 273 reach 0.26%. Every gradient
      evaluation counts as a step, the edges' included.
    - "midpoint" and "trapezoid": `steps` equal intervals (error ~ 1/steps^2 where f is smooth).

    Midpoints never sample alpha = 0: from the zero baseline the gradient there is the product of
    1/sqrt(eps) gains through every norm, which overflows fp32 in deep models (30 blocks of
    SmolLM2: inf, and inf x 0 weight made NaN). A non-finite gradient anywhere is an error. From
    zeros the adaptive rule starts with the decades 1e-12..1e-2 of alpha as intervals, and refuses
    the baseline where f moves by more than the tolerance within the first 1e-6 of the path: no
    affordable quadrature follows f there (both real models: SmolLM2's f is 7.2 at 1e-12 and 0 at
    0; gemma-3-270m's moves by 5 between 1e-9 and 1e-7, and 511 steps left a 1.5% gap)."""
    _check(model, ids, target, contrast)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if rule not in ("adaptive", "midpoint", "trapezoid"):
        raise ValueError(f"rule must be 'adaptive', 'midpoint' or 'trapezoid', got {rule!r}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be positive, got {tolerance}")
    fixed = default_fixed(model, ids) if fixed is None else fixed
    with torch.no_grad():
        x = model.embed(ids).float()  # [T, d]
        b = torch.zeros_like(x) if baseline == "zeros" else model.embed(torch.full_like(ids, int(baseline))).float()
        b[fixed] = x[fixed]
    bar = tqdm(total=steps, desc="integrated gradients", disable=not progress, leave=False)

    def evaluate(alphas: torch.Tensor):
        """f and the per-token (x - b) . grad f at each alpha: [n], [n, T] (float64)."""
        fs, dots = [], []
        for s in range(0, len(alphas), batch_size):
            f, g = _f_and_grad(model, _interpolate(x, b, alphas[s:s + batch_size]), target, contrast)
            if not torch.isfinite(g).all():
                a = alphas[s:s + batch_size][~torch.isfinite(g).flatten(1).all(1).cpu()][0].item()
                raise ValueError(f"integrated gradients: the gradient is not finite at alpha = {a:.3g} "
                                 f"on the path from baseline {baseline!r}; use a token baseline")
            fs.append(f.double())
            dots.append(((x - b) * g).sum(-1).double())
            bar.update(len(f))
        return torch.cat(fs).cpu(), torch.cat(dots).cpu()

    if rule == "trapezoid":
        alphas = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        fs, dots = evaluate(alphas)
        w = torch.full((steps + 1, 1), 1.0 / steps, dtype=torch.float64)
        w[0] = w[-1] = 0.5 / steps
        attr = (w * dots).sum(0)
        bar.close()
        return IntegratedGradients(attr.tolist(), fs[-1].item(), fs[0].item(), steps + 1, float("nan"))

    # the midpoint rule on n equal intervals; "adaptive": Simpson's on n, then bisect the worst
    n = steps if rule == "midpoint" else min(steps, INITIAL_INTERVALS)
    edges = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    zero_rows = bool((b == 0).all(-1).any())  # the zero baseline (or a token whose embedding is 0)
    if rule == "adaptive" and zero_rows:  # the first interval in decades: f changes on every scale there
        edges = torch.cat([edges[:1], torch.logspace(-12, -2, 11, dtype=torch.float64), edges[1:]])
    d_edges: list = [None] * len(edges)  # the adaptive rule's gradients at the edges
    first = 1 if zero_rows else 0
    simpson = rule == "adaptive" and (len(edges) - first) + (len(edges) - 1) <= steps  # edges' gradients affordable
    if not simpson:
        f_edges = _f_only(model, ids, _interpolate(x, b, edges), target, contrast, batch_size).tolist()
    else:  # from zeros, no gradient at alpha = 0 (it overflows): f alone there
        f_rest, d_rest = evaluate(edges[first:])
        f_zero = _f_only(model, ids, _interpolate(x, b, edges[:1]), target, contrast, batch_size).tolist() if first else []
        f_edges = f_zero + f_rest.tolist()
        d_edges = d_edges[:first] + list(d_rest)
    if rule == "adaptive" and zero_rows:
        moved = f_edges[7] - f_edges[0]  # edges[7] is alpha = 1e-6
        if abs(moved) > tolerance * abs(f_edges[-1] - f_edges[0]):
            raise ValueError(f"the zero baseline is degenerate for this model: f moves by {moved:+.3g} within the "
                             "first 1e-6 of the path (its norms amplify a near-zero input), more than the tolerance; "
                             "use a token baseline (--baseline pad)")
    f_mid, dots = evaluate((edges[:-1] + edges[1:]) / 2)
    intervals = [_Interval(a, c, fa, fc, fm, da, dm, dc) for a, c, fa, fc, fm, da, dm, dc in
                 zip(edges[:-1].tolist(), edges[1:].tolist(), f_edges[:-1], f_edges[1:], f_mid.tolist(),
                     d_edges[:-1], dots, d_edges[1:])]
    fx, fb = f_edges[-1], f_edges[0]
    allowed = tolerance * max(abs(fx - fb), 1e-3)
    used = len(intervals) + sum(d is not None for d in d_edges)
    while rule == "adaptive" and used + 2 <= steps:
        # stop at half the tolerance: a margin for a gap that crosses 0 while the path is still coarse
        if abs(sum(i.signed_gap for i in intervals)) <= allowed / 2:
            break
        # the worst intervals last; those narrower than fp32 resolves around alpha = 1 never split
        intervals.sort(key=lambda i: (i.c - i.a > MIN_WIDTH, i.gap))
        k = max(1, min(batch_size, steps - used) // 2)
        keep, split = intervals[:-k], intervals[-k:]
        if any(i.c - i.a <= MIN_WIDTH for i in split):
            break
        # the old midpoint is an end of both halves, its gradient known; the first half from zeros
        # keeps the midpoint rule (da None)
        halves = [h for i in split for h in ((i.a, i.mid, i.fa, i.fm, i.da, i.dm), (i.mid, i.c, i.fm, i.fc, i.dm, i.dc))]
        f_mid, dots = evaluate(torch.tensor([(h[0] + h[1]) / 2 for h in halves], dtype=torch.float64))
        intervals = keep + [_Interval(a, c, fa, fc, fm, da, dm, dc)
                            for (a, c, fa, fc, da, dc), fm, dm in zip(halves, f_mid.tolist(), dots)]
        used += len(halves)
    bar.close()
    attr = torch.stack([i.part for i in intervals]).sum(0)
    return IntegratedGradients(attr.tolist(), fx, fb, used, sum(i.gap for i in intervals))


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


def attribute(model: Transformer, ids, target: int, contrast: int | None = None, steps: int = DEFAULT_STEPS,
              baseline: str | int = "zeros", rule: str = "adaptive", occlusion_token: int | None = None,
              fixed: list[int] | None = None, tolerance: float = DEFAULT_TOLERANCE,
              progress: bool = False) -> Attribution:
    """All three attributions of f for one sequence of token ids."""
    ids = torch.as_tensor(ids, dtype=torch.long, device=model.device).reshape(-1)
    fixed = default_fixed(model, ids) if fixed is None else list(fixed)
    ig = integrated_gradients(model, ids, target, contrast, steps, baseline, rule, fixed, tolerance, progress=progress)
    gxi = gradient_x_input(model, ids, target, contrast, fixed)
    if occlusion_token is None:
        occlusion_token = baseline if isinstance(baseline, int) else 0
    occ = occlusion(model, ids, target, contrast, occlusion_token, fixed)
    return Attribution(ids.tolist(), target, contrast, ig.value, ig.attributions, ig.baseline_value, gxi, occ,
                       ig.steps, rule, "zeros" if baseline == "zeros" else f"token {baseline}", fixed, tolerance)
