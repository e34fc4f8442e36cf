"""The recipe `slm train --max-minutes M` uses when no --preset or shape is given: the model's shape,
its vocabulary, the batch and the corpus that learn most in M minutes on the machine in hand.

The table comes from the sweep in docs/training.md ("Recipes for a time budget"), measured on
2 CPU cores with the built-in corpus: probe accuracy and validation loss after 10, 30 and 60
minutes. A longer budget affords a larger model and more documents; every recipe keeps the small
vocabulary and short sequences, which learned the built-in world's facts fastest.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Recipe:
    up_to_minutes: float  # the longest budget this recipe is for
    layers: int
    dim: int
    heads: int
    vocab_size: int
    seq_len: int
    batch_size: int
    n_docs: int  # documents of the synthetic corpus

    def describe(self) -> str:
        return (f"{self.layers} layers x {self.dim} ({self.heads} heads), vocabulary {self.vocab_size:,}, "
                f"{self.batch_size} sequences of {self.seq_len} tokens a step, {self.n_docs:,} documents")


RECIPES = (
    Recipe(15, layers=4, dim=192, heads=4, vocab_size=2048, seq_len=128, batch_size=16, n_docs=100_000),
    Recipe(40, layers=4, dim=192, heads=4, vocab_size=2048, seq_len=128, batch_size=16, n_docs=100_000),
    Recipe(math.inf, layers=6, dim=192, heads=4, vocab_size=2048, seq_len=128, batch_size=16, n_docs=200_000),
)


def recipe_for(minutes: float) -> Recipe:
    """The recipe for a budget of `minutes` of training (the first whose budget covers it)."""
    if not minutes > 0:
        raise ValueError(f"a time budget must be positive, got {minutes}")
    return next(r for r in RECIPES if minutes <= r.up_to_minutes)
