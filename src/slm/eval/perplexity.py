"""Perplexity of a text over rolling windows, as lm-evaluation-harness scores its wikitext task
(`loglikelihood_rolling`).

The text is encoded without special tokens and cut into windows of at most max_length predicted
tokens: the first window predicts its tokens from the prefix token (BOS, else EOS); each later
window is a fresh forward pass over the max_length tokens just before the ones it predicts, so
every token is predicted exactly once, with as much left context as the window allows (the
last window, shorter, re-reads earlier tokens as context). The log-likelihoods are summed and
reported per token, per word and per byte:

    token_perplexity = exp(-LL / tokens)
    word_perplexity  = exp(-LL / words)     words = len(re.split(r"\\s+", text)), lm-eval's count
    byte_perplexity  = exp(-LL / bytes)     bytes = len(text.encode("utf-8"))
    bits_per_byte    = -LL / bytes / ln 2
"""

from __future__ import annotations

import math
import re

from ..runtime.lm import LM
from ..runtime.loglik import context_length, encode, loglikelihoods, prefix_token


def rolling_windows(tokens: list[int], prefix: int, max_len: int, context_len: int = 1):
    """lm-eval's `get_rolling_token_windows`: (input tokens, predicted tokens) pairs that
    predict every token once. context_len (>= 1) is the minimum context a later window keeps
    (1: windows do not overlap in what they predict and each re-reads only the token before)."""
    if not 1 <= context_len <= max_len:
        raise ValueError(f"context_len must be in [1, {max_len}], got {context_len}")
    if not tokens:
        return
    pred_len = max_len - context_len + 1
    first = min(max_len, len(tokens))
    yield [prefix] + tokens[:first - 1], tokens[:first]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, pred_len)
        end = done + n
        yield tokens[end - max_len - 1:end - 1], tokens[end - n:end]
        done += n


def disjoint(window: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
    """lm-eval's `make_disjoint_window`: (context, continuation) with the continuation's tokens
    taken out of the input, so the pair concatenates to the window's input plus its last target."""
    inp, pred = window
    return inp[:len(inp) - (len(pred) - 1)], pred


def count_words(text: str) -> int:
    """lm-eval's wikitext word count (leading or trailing whitespace counts as an empty word)."""
    return len(re.split(r"\s+", text))


def perplexity(lm: LM, text: str, max_length: int | None = None, batch_size: int = 1,
               progress: bool = True) -> dict:
    """Rolling-window perplexity of one document. max_length defaults to the model's context."""
    if not isinstance(text, str) or not text:
        raise ValueError("the text to score is empty")
    L = context_length(lm, max_length)
    tokens = encode(lm, text, add_bos=False)
    if not tokens:
        raise ValueError("the text encodes to no tokens")
    windows = [disjoint(w) for w in rolling_windows(tokens, prefix_token(lm), L)]
    scores = loglikelihoods(lm, windows, batch_size=batch_size, max_len=L, progress=progress, desc="perplexity")
    ll = sum(s for s, _ in scores)
    words, n_bytes = count_words(text), len(text.encode("utf-8"))
    return {
        "loglikelihood": ll,
        "tokens": len(tokens), "words": words, "bytes": n_bytes,
        "windows": len(windows), "max_length": L,
        "token_perplexity": math.exp(-ll / len(tokens)),
        "word_perplexity": math.exp(-ll / words),
        "byte_perplexity": math.exp(-ll / n_bytes),
        "bits_per_byte": -ll / n_bytes / math.log(2),
    }

