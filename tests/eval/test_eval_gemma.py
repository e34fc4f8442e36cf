"""slm eval on the real gemma-3-270m: rolling perplexity of a real English passage against
transformers' Gemma3ForCausalLM holding the same weights (test_gemma_real's reference), and the
built-in common-sense probes scored well above chance."""

import math

import pytest
import torch

from slm.eval import evaluate, perplexity

from support.gemma import PASSAGE, gguf_path, ours, reference  # noqa: F401 (fixtures)


pytestmark = [pytest.mark.gemma, pytest.mark.slow]


@torch.no_grad()
def test_rolling_perplexity_matches_transformers(ours, reference):
    # 600-token windows: the first slides the local layers' 512-token window, the second re-reads context
    L = 600
    r = perplexity(ours, PASSAGE, max_length=L, progress=False)
    seq = [ours.tokenizer.bos_id] + ours.tokenizer.encode(PASSAGE, add_special_tokens=False)
    n, ll, p = len(seq) - 1, 0.0, 0
    while p < n:  # every token once, from at most L tokens before it, as lm-eval's windows
        e = min(p + L, n)
        a = max(e - L, 0)
        logp = reference(torch.tensor([seq[a:e]])).logits[0].float().log_softmax(-1)
        ll += sum(logp[j - a, seq[j + 1]].item() for j in range(p, e))
        p = e
    print(f"gemma-3-270m on tests/support/data/passage.txt ({n} tokens, {r['windows']} windows of {L}): "
          f"token ppl slm {r['token_perplexity']:.4f}, transformers {math.exp(-ll / n):.4f}; "
          f"word ppl {r['word_perplexity']:.3f}, bits/byte {r['bits_per_byte']:.4f}")
    assert r["tokens"] == n and r["windows"] == 2
    assert r["token_perplexity"] == pytest.approx(math.exp(-ll / n), rel=1e-4)
    assert r["word_perplexity"] == pytest.approx(math.exp(-ll / r["words"]), rel=1e-4)
    assert r["token_perplexity"] < 30  # a real model reading real English


def test_builtin_probes_well_above_chance(ours):
    # The first 60 probes: 6 of each of the 10 kinds. The full 200 scored acc 0.755 (chance 0.325).
    r = evaluate(ours, "builtin", limit=60, batch_size=16, progress=False)
    m = r["metrics"]
    print(f"builtin probes, 60 items: acc {m['acc']:.3f} +- {m['acc_stderr']:.3f}, "
          f"acc_norm {m['acc_norm']:.3f}, chance {m['chance']:.3f}")
    assert m["acc"] >= m["chance"] + 0.3
    assert m["acc_norm"] >= m["chance"] + 0.2
