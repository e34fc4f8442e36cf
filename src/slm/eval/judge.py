"""A judge of generated text, in the spirit of TinyStories' grading, with what runs on this machine.

TinyStories graded samples with GPT-4; here the grades are things a program can check, and one
number from a real pretrained model:

- arithmetic: the share of "a + b = c" (also -, x) in generated lessons that are right;
- pronouns: in sentences that name one child of the synthetic world (whose names say she or he)
  and use a personal pronoun, the share whose pronouns agree with the name;
- names: how many children's names a story uses, on average (a story's cast: the corpus's own
  stories name about two; a model that loses track of who is who names more);
- repetition: the share of word 4-grams that repeat an earlier 4-gram of the same sample (a
  looping model scores high);
- fluency: the perplexity of the samples under a real pretrained model (gemma-3-270m or
  SmolLM2), lower is more fluent; the corpus's own text is the reference point.
"""

from __future__ import annotations

import math
import re

from ..data.vocab import BOYS, GIRLS
from ..runtime.lm import LM
from ..runtime.loglik import encode, loglikelihoods, prefix_token

_SUM = re.compile(r"\b(\d+) ([+x-]) (\d+) = (\d+)\b")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b}
_SHE, _HE = re.compile(r"\b(she|her|hers|herself)\b", re.I), re.compile(r"\b(he|him|his|himself)\b", re.I)
_GENDER = {**{n: "she" for n in GIRLS}, **{n: "he" for n in BOYS}}
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")


def arithmetic(texts: list[str]) -> tuple[int, int]:
    """(right, checked) over every "a op b = c" in texts."""
    right = checked = 0
    for t in texts:
        for a, op, b, c in _SUM.findall(t):
            checked += 1
            right += _OPS[op](int(a), int(b)) == int(c)
    return right, checked


def pronouns(texts: list[str]) -> tuple[int, int]:
    """(agreeing, checked) over sentences that name exactly one character of known gender, name no
    parent, and use pronouns of one gender or the other."""
    agree = checked = 0
    for t in texts:
        for s in _SENTENCE.findall(t):
            names = {w for w in re.findall(r"\b[A-Z][a-z]+\b", s) if w in _GENDER}
            if len(names) != 1 or re.search(r"\b(Mom|Dad|Grandma|Grandpa|mom|dad|grandma|grandpa)\b", s):
                continue
            she, he = bool(_SHE.search(s)), bool(_HE.search(s))
            if she == he:  # none, or both (another character's)
                continue
            checked += 1
            agree += _GENDER[names.pop()] == ("she" if she else "he")
    return agree, checked


def names(texts: list[str]) -> float:
    """The mean number of distinct children's names (of the synthetic world's) in a text."""
    if not texts:
        return 0.0
    return sum(len({w for w in re.findall(r"\b[A-Z][a-z]+\b", t) if w in _GENDER}) for t in texts) / len(texts)


def repetition(texts: list[str], n: int = 4) -> float:
    """The share of word n-grams that repeat an earlier n-gram of the same text."""
    repeated = total = 0
    for t in texts:
        words = t.split()
        seen = set()
        for i in range(len(words) - n + 1):
            g = tuple(words[i:i + n])
            total += 1
            repeated += g in seen
            seen.add(g)
    return repeated / total if total else 0.0


def perplexity(lm: LM, texts: list[str], batch_size: int = 8) -> float:
    """Token perplexity of the texts under lm (each scored whole from its BOS, at most the model's
    context), the fluency grade."""
    start = prefix_token(lm)
    limit = lm.config.max_seq_len
    requests = [([start], encode(lm, t, False)[:limit - 1]) for t in texts if t.strip()]
    requests = [r for r in requests if r[1]]
    if not requests:
        raise ValueError("no text to score")
    lls = loglikelihoods(lm, requests, batch_size=batch_size, progress=False)
    return math.exp(-sum(ll for ll, _ in lls) / sum(len(c) for _, c in requests))


def judge(texts: list[str], reference: LM | None = None) -> dict:
    """Every grade of the samples: {"arithmetic": [right, checked], "pronouns": [agree, checked],
    "names", "repetition", and with a reference model "perplexity"}."""
    out = {"samples": len(texts), "arithmetic": list(arithmetic(texts)), "pronouns": list(pronouns(texts)),
           "names": names(texts), "repetition": repetition(texts)}
    if reference is not None:
        out["perplexity"] = perplexity(reference, texts)
    return out
