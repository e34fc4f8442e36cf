"""The one sampler: the next token of each sequence from its logits, for `generate` (a batch of
prompts) and for the server's engine (the rows of a continuous batch) alike.

Each sequence is a `Row`: its `Sampling` settings, its random generator and the tokens its
penalties look at. `sample_rows` takes one row of logits per sequence and applies, in this order:

1. the repetition penalty (transformers' CTRL-style one, over the prompt and the generated tokens),
   OpenAI's presence and frequency penalties (over the generated tokens) and logit_bias;
2. temperature, then top-k, then top-p (the order of transformers);
3. one uniform number per row, drawn from the row's own generator, which picks a token by
   inverting the cumulative distribution. A row therefore draws the same tokens alone or in any
   batch. Rows at temperature 0 take the argmax instead.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from dataclasses import dataclass, field

import torch

from .. import kernels

DEFAULT_TEMPERATURE = 0.0
"""The temperature of slm's own API and CLI (`LM.generate`/`stream`/`chat`, `slm generate`,
`slm chat`, `slm data distill`) when none is given: 0, greedy decoding. A small model's most
likely continuation is its best one, the same prompt then gives the same text on every run and
machine (no seed needed), and it is what transformers' `generate` does by default; sampling is one
flag away (`--temperature 0.8 --top-p 0.95`).

`slm serve` is the one exception: for a request that omits temperature it uses
`OPENAI_DEFAULT_TEMPERATURE`, because the OpenAI API it implements documents `temperature` as
"Defaults to 1", and a client written against that API (which may leave the field out) must get
the distribution it asked for."""

OPENAI_DEFAULT_TEMPERATURE = 1.0
"""The OpenAI API's documented default temperature, for server requests that omit it (see
DEFAULT_TEMPERATURE)."""
# top_p looks among the 256 most likely tokens first (_pick), then, for a row whose nucleus reaches
# further, among 4,096, then sorts the whole vocabulary
NUCLEUS_WIDENING = (256, 4096, 2**62)


@dataclass
class Sampling:
    """How each next token is chosen."""
    temperature: float = DEFAULT_TEMPERATURE  # 0: greedy
    top_k: int = 0  # keep the k most likely tokens; 0: off
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    repetition_penalty: float = 1.0  # transformers': seen tokens' logits divided (positive) or multiplied
    presence_penalty: float = 0.0  # OpenAI's: subtracted once a token has been generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per time a token has been generated
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    seed: int | None = None  # None: torch's global generator draws
    stop: list[str] = field(default_factory=list)  # text ends before the first of these

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):  # NaN passes every comparison below
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def generator(seed: int | None, device, index: int = 0) -> torch.Generator | None:
    """The generator of sequence `index` of a prompt: seeded with seed + index, so n sequences of
    one prompt differ, and each draws the same tokens alone or in any batch. None without a seed
    (torch's global generator then draws, as torch.manual_seed sets it)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed((seed + index) % 2**64)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> the index of each row's largest logit [B] (the first one on ties)."""
    if logits.is_cpu and logits.dtype == torch.float32 and logits.dim() == 2:
        op = kernels.fused_op("argmax_rows")  # ATen's argmax takes ~0.7 ms over 262,144 logits
        if op is not None:
            return op(logits.contiguous())
    return logits.argmax(-1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty as in transformers: divide positive logits of seen tokens, multiply negative.
    seen: token ids [B, T], or a mask [B, V]."""
    if seen.dtype != torch.bool:
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, seen, True)
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


class Row:
    """One sequence's sampling state: its settings, its generator, and what its penalties count."""

    def __init__(self, s: Sampling, vocab: int, device, prompt: Sequence[int] = (), index: int = 0):
        self.s = s
        self.gen = generator(s.seed, device, index)
        self.seen = self.counts = self.bias = None
        if s.repetition_penalty != 1.0:  # the prompt counts too
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen[torch.tensor(list(prompt), dtype=torch.long, device=device)] = True
        if s.presence_penalty or s.frequency_penalty:
            self.counts = torch.zeros(vocab, device=device)
        if s.logit_bias:
            self.bias = (torch.tensor(list(s.logit_bias), dtype=torch.long, device=device),
                         torch.tensor(list(s.logit_bias.values()), dtype=torch.float32, device=device))
        self.adjusts = self.seen is not None or self.counts is not None or self.bias is not None

    def adjust(self, x: torch.Tensor) -> None:
        """Penalties and logit bias, in place on this row's fp32 logits [V]."""
        s = self.s
        if self.seen is not None:
            x.copy_(apply_repetition_penalty(x[None], self.seen[None], s.repetition_penalty)[0])
        if self.counts is not None:
            x -= s.frequency_penalty * self.counts + s.presence_penalty * (self.counts > 0).float()
        if self.bias is not None:
            x.index_add_(0, *self.bias)

    def push(self, token: int) -> None:
        """Record the token this row produced."""
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1


def sample_rows(logits: torch.Tensor, rows: Sequence[Row]) -> list[int]:
    """logits [B, V], row b for rows[b] -> one token per row, which each row records."""
    x = logits
    if any(r.adjusts for r in rows):
        x = logits.float().clone()
        for j, r in enumerate(rows):
            if r.adjusts:
                r.adjust(x[j])
    toks = _pick(x, [r.s for r in rows], [r.gen for r in rows]).tolist()
    for r, t in zip(rows, toks):
        r.push(t)
    return toks


def sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B], every row with the settings s and drawing from gen in turn.
    Temperature, top-k and top-p only: penalties and logit_bias need a `Row`."""
    return _pick(logits, [s] * logits.shape[0], [gen] * logits.shape[0])


def _pick(x: torch.Tensor, settings: list[Sampling], gens: list[torch.Generator | None]) -> torch.Tensor:
    """Temperature, top-k, top-p and the draw, for all rows at once; rows at temperature 0 take
    the argmax."""
    hot = [j for j, s in enumerate(settings) if s.temperature > 0]
    if not hot:
        return argmax(x)
    tok = torch.zeros(len(settings), dtype=torch.long, device=x.device)
    if len(hot) < len(settings):
        cold = [j for j, s in enumerate(settings) if s.temperature == 0]
        tok[cold] = argmax(x[cold].float()).to(x.device)
    ss = [settings[j] for j in hot]
    y = x[hot].float() if len(hot) < len(settings) else x.float()
    # At a tiny temperature the best token stays finite and the rest go to -inf. Each row's
    # generator gives one number, in the rows' order.
    temps = torch.tensor([s.temperature for s in ss], dtype=torch.float32, device=x.device)
    temps = temps.clamp(min=torch.finfo().tiny)
    u = torch.cat([torch.rand(1, generator=gens[j], device=x.device) for j in hot])
    op = kernels.fused_op("sample_top_p") if y.device.type == "cpu" and not any(s.top_k for s in ss) else None
    if op is not None:  # what follows draws, in one call (kernels/cpu/sample.cpp; tests/runtime/test_sampling.py)
        tok[hot] = op(y.contiguous(), temps, torch.tensor([s.top_p for s in ss], dtype=torch.float32), u)
        return tok
    temps, u = temps[:, None], u[:, None]
    # (y - max) / T; amax, not max: max also finds where (16 x 49,152: 181 us against 34)
    y = (y - y.amax(-1, keepdim=True)).mul_(1 / temps)  # a product: dividing 16 x 49,152 took ~0.7 ms
    k = torch.tensor([min(s.top_k, y.shape[-1]) for s in ss], device=x.device)
    if k.any():
        top = torch.topk(y, int(k.max())).values
        kth = top.gather(1, (k.clamp(min=1) - 1)[:, None]).masked_fill(k[:, None] == 0, float("-inf"))
        y = y.masked_fill(y < kth, float("-inf"))
    # Each row's numbers depend on its own settings alone, as they must for a seeded row to draw
    # the same alone or in a batch.
    probs = y.exp_()
    picked = torch.zeros(len(ss), dtype=torch.long, device=x.device)
    nucleus = [j for j, s in enumerate(ss) if s.top_p < 1]
    if nucleus:  # keep the smallest set of tokens whose probability reaches top_p, and draw among them
        at = torch.tensor(nucleus, device=x.device)
        p = probs[at] if len(nucleus) < len(ss) else probs
        sums = p.sum(-1, keepdim=True)
        top_p = torch.tensor([ss[j].top_p for j in nucleus], device=x.device)[:, None]
        # Sorting a 49,152-token vocabulary took ~2.7 ms a token, half a small model's decode step.
        # The nucleus almost always lies among the most likely few hundred (topk, ~0.15 ms): then
        # every later token has that much probability before it and is dropped, as the full sort
        # would drop it (the same sums, in the same order). A flatter row looks among more, and
        # only that row: one row sorting its whole vocabulary made every row of a 16-row step sort
        # theirs (~30 ms for SmolLM2's).
        left = torch.arange(p.shape[0], device=p.device)
        for k in NUCLEUS_WIDENING:
            rows = p[left] if len(left) < p.shape[0] else p
            if k < p.shape[-1]:
                by_prob, idx = rows.topk(k, -1)
                by_prob = by_prob / sums[left]
                found = by_prob.sum(-1) >= top_p[left, 0]
            else:
                by_prob, idx = rows.sort(-1, descending=True)
                by_prob = by_prob / sums[left]
                found = torch.ones(len(left), dtype=torch.bool, device=p.device)
            keep = by_prob.cumsum(-1) - by_prob < top_p[left]
            done = found.nonzero()[:, 0]
            # The kept tokens in the vocabulary's order, the others at zero: the draw below among
            # them picks what it would pick from the whole row with every other token at zero
            # (the same sums in the same order), without passes over the whole vocabulary.
            order, perm = idx[done].sort(-1)
            vals = by_prob[done].masked_fill(~keep[done], 0).gather(1, perm)
            picked[at[left[done]]] = order.gather(1, _draw(vals, u[at[left[done]]]))[:, 0]
            left = left[~found]
            if not len(left):
                break
    whole = [j for j, s in enumerate(ss) if s.top_p >= 1]
    if whole:  # a draw from the whole row, in the vocabulary's order
        at = torch.tensor(whole, device=x.device)
        picked[at] = _draw(probs[at] if len(whole) < len(ss) else probs, u[at])[:, 0]
    tok[hot] = picked
    return tok


def _draw(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """For each row of weights [n, m] (>= 0, not all zero) and its uniform number u [n, 1]: the
    index [n, 1] whose cumulative weight is the first to exceed u times the row's total (so one of
    weight > 0)."""
    cdf = weights.cumsum(-1)
    total = cdf[:, -1:]
    r = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, r, right=True).clamp(max=cdf.shape[-1] - 1)
