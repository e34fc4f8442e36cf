"""Log-likelihood of continuations given contexts, batched the way lm-evaluation-harness's
Hugging Face backend (`HFLM._loglikelihood_tokens`) does it:

* a request is (context tokens, continuation tokens); the model reads
  (context + continuation)[-(max_length + 1):][:-1], truncated on the left;
* requests are sorted longest first, so a batch holds sequences of similar length, padded on
  the right (a causal model never looks right, so no mask is needed);
* one forward per batch; the LM head is applied only at the positions that predict the
  continuation, and log_softmax runs in fp32;
* the result per request is (sum of the continuation's log-probabilities, whether greedy
  decoding would have produced exactly the continuation), in the caller's order.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from .lm import LM

# Rows of [positions, vocab] fp32 log-probabilities held at once (gemma's 262k vocabulary: ~256 MB).
_LOGIT_BUDGET = 64 * 1024 * 1024


def encode(lm: LM, text: str, add_bos: bool) -> list[int]:
    """Token ids of text; with add_bos, as the tokenizer encodes with its special tokens (BOS)."""
    return lm._need_tokenizer().encode(text, add_special_tokens=add_bos)


def prefix_token(lm: LM) -> int:
    """The token a sequence is predicted from when nothing precedes it: BOS, else EOS (lm-eval's
    `prefix_token_id`)."""
    tok = lm._need_tokenizer()
    for i in (tok.bos_id, tok.eos_id, lm.config.bos_token_id, lm.config.eos_token_id):
        if isinstance(i, int):
            return i
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to predict the first token from")


def encode_pair(lm: LM, context: str, continuation: str, add_bos: bool) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation, the
    whole string is encoded once, and the continuation is what follows the context's tokens. An
    empty context is the prefix token."""
    if context == "":
        return [prefix_token(lm)], encode(lm, continuation, False)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = encode(lm, context + continuation, add_bos)
    ctx = encode(lm, context, add_bos)
    return ctx, whole[len(ctx):]


def context_length(lm: LM, requested: int | None = None) -> int:
    limit = lm.config.max_seq_len
    if requested is None:
        return limit
    if requested < 1:
        raise ValueError(f"max_length must be a positive number of tokens, got {requested}")
    return min(requested, limit)


@torch.no_grad()
def loglikelihoods(lm: LM, requests: list[tuple[list[int], list[int]]], batch_size: int = 8,
                   max_len: int | None = None, progress: bool = True,
                   desc: str = "scoring") -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each request's continuation given its context."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    L = context_length(lm, max_len)
    for ctx, cont in requests:
        if not cont:
            raise ValueError("a continuation encodes to no tokens; nothing to score")
        if len(cont) > L:
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit the context of {L} tokens")
    model = lm.model.eval()
    device = model.device
    # lm-eval's order: longest first, ties broken by the tokens themselves (deterministic).
    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i][0] + requests[i][1]),
                                                        tuple(requests[i][0] + requests[i][1])))
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc=desc, unit="seq", disable=not progress)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        inputs = [(requests[i][0] + requests[i][1])[-(L + 1):][:-1] for i in batch]
        width = max(len(x) for x in inputs)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for r, x in enumerate(inputs):
            ids[r, :len(x)] = torch.tensor(x)
        hidden = model(ids.to(device), return_hidden=True)  # [B, T, d]
        # The positions that predict each continuation: the last len(cont) of the row's input.
        rows, cols, targets, owner = [], [], [], []
        for r, i in enumerate(batch):
            cont, n = requests[i][1], len(inputs[r])
            rows += [r] * len(cont)
            cols += range(n - len(cont), n)
            targets += cont
            owner += [r] * len(cont)
        h = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
        tgt = torch.tensor(targets, device=device)
        lp, greedy = _score(model, h, tgt)
        owner_t = torch.tensor(owner, device=device)
        sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, owner_t, lp.double())
        misses = torch.zeros(len(batch), dtype=torch.long, device=device).index_add_(0, owner_t, (~greedy).long())
        for r, i in enumerate(batch):
            out[i] = (float(sums[r]), bool(misses[r] == 0))
        bar.update(len(batch))
    bar.close()
    return out  # type: ignore[return-value]


def _score(model, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and whether target is the argmax, for hidden states h [N, d], in chunks of
    positions so the [N, vocab] log-probabilities never exist all at once."""
    step = max(1, _LOGIT_BUDGET // model.config.vocab_size)
    lps, greedy = [], []
    for s in range(0, h.shape[0], step):
        logp = torch.log_softmax(model.lm_head(h[s:s + step]).float(), dim=-1)
        t = targets[s:s + step]
        lps.append(logp.gather(-1, t[:, None])[:, 0])
        greedy.append(logp.argmax(-1) == t)
    return torch.cat(lps), torch.cat(greedy)
