"""The logit lens (nostalgebraist, 2020): read next-token predictions from every layer's residual
stream by applying the model's own final norm and LM head to it, as if the remaining blocks
were skipped. The head is the model's: tied to the embeddings where the model ties them, with
Phi's bias. (Gemma 3 has no final logit soft-capping; slm refuses configs that ask for it.)
Read at the last layer, the lens is the model's output itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import Transformer
from .capture import ActivationCache


def lens_logits(model: Transformer, resid: torch.Tensor) -> torch.Tensor:
    """Logits [..., vocab] read from residual-stream vectors [..., d_model]."""
    with torch.no_grad():
        return model.lm_head(model.norm(resid))


@dataclass
class LogitLens:
    labels: list[str]  # row r: the stream after r blocks ("embed", then "0" .. "L-1": after block i)
    top_ids: torch.Tensor  # [rows, pos, k], on the CPU
    top_probs: torch.Tensor  # [rows, pos, k]
    target: int | None = None
    target_probs: torch.Tensor | None = None  # [rows, pos] probability of `target`
    target_ranks: torch.Tensor | None = None  # [rows, pos] 0: target is the top-1 token


def logit_lens(model: Transformer, cache: ActivationCache, k: int = 5, target: int | None = None,
               batch_index: int = 0) -> LogitLens:
    """Top-k next tokens (and, given a target token id, its probability and rank) at every layer
    and position of one sequence of a cache from run_with_cache."""
    if k < 1:
        raise ValueError(f"top-k must be at least 1, got {k}")
    try:
        streams = [cache["resid_pre", 0]] + [cache["resid_post", i] for i in range(cache.num_layers)]
    except KeyError as e:
        raise ValueError(f"the cache lacks {e.args[0]}: capture resid_pre and resid_post for the logit lens") from None
    ids, probs, t_probs, t_ranks = [], [], [], []
    for resid in streams:  # one layer at a time: [pos, vocab] logits can be large
        logits = lens_logits(model, resid[batch_index]).float()
        p = logits.softmax(-1)
        top = p.topk(min(k, p.shape[-1]), dim=-1)
        ids.append(top.indices)
        probs.append(top.values)
        if target is not None:
            t_probs.append(p[:, target])
            t_ranks.append((logits > logits[:, target:target + 1]).sum(-1))
    labels = ["embed"] + [str(i) for i in range(cache.num_layers)]
    lens = LogitLens(labels, torch.stack(ids).cpu(), torch.stack(probs).cpu(), target)
    if target is not None:
        lens.target_probs, lens.target_ranks = torch.stack(t_probs).cpu(), torch.stack(t_ranks).cpu()
    return lens
