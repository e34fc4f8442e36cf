"""Decoding over the KV cache: batched prompts, EOS, stop strings and streaming.

`generate_ids` is the token loop (prompts of any lengths, left-padded into one batch; each prompt
samples as it would alone, see sampling.py); `stream_text` turns one prompt's tokens into text
chunks, holding back text that may still become a stop string.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .sampling import Row, Sampling, apply_repetition_penalty, sample, sample_rows  # noqa: F401 (re-exported)
from .tokenizer import Detokenizer


@torch.inference_mode()
def generate_ids(model, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling | None = None,
                 eos_ids: set[int] | None = None) -> Iterator[list[int | None]]:
    """Yield, per step, one new token per prompt (None once that prompt has finished)."""
    s = sampling or Sampling()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.device
    B, longest = len(prompts), max(len(p) for p in prompts)
    ctx = model.config.max_seq_len
    if longest >= ctx:
        raise ValueError(f"prompt of {longest} tokens leaves no room in the context of {ctx}")
    max_new_tokens = min(max_new_tokens, ctx - longest)
    if max_new_tokens <= 0:
        return
    ids = torch.zeros(B, longest, dtype=torch.long)
    pos = torch.full((B, longest), -1, dtype=torch.long)
    for b, p in enumerate(prompts):  # left padding: every prompt ends at the same column
        ids[b, longest - len(p):] = torch.tensor(p)
        pos[b, longest - len(p):] = torch.arange(len(p))
    ids, pos = ids.to(device), pos.to(device)
    cache = model.new_cache(B, longest + max_new_tokens)
    eos = set(eos_ids or ())
    done = [False] * B
    logits = model(ids, cache=cache, pos=pos, last_only=True)[:, -1]
    rows = [Row(s, logits.shape[-1], device, prompt=p, index=b) for b, p in enumerate(prompts)]
    last = pos[:, -1:]
    for _ in range(max_new_tokens):
        toks = sample_rows(logits, rows)
        out = [None if done[b] else toks[b] for b in range(B)]
        for b, t in enumerate(toks):
            done[b] = done[b] or t in eos
        yield out
        if all(done):
            return
        last = last + 1
        logits = model(torch.tensor(toks, device=device)[:, None], cache=cache, pos=last)[:, -1]


def stream_text(tokenizer, tokens: Iterator[int | None], stop: list[str], eos_ids: set[int]) -> Iterator[str]:
    """Text chunks for one sequence of tokens, ending at EOS or before the first stop string."""
    text = Detokenizer(tokenizer, stop)
    for t in tokens:
        if t is None or t in eos_ids:
            break
        out, stopped = text.add(t)
        if out:
            yield out
        if stopped:
            return
    rest = text.flush()
    if rest:
        yield rest
