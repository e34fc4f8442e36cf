"""Cached decoding (full and rolling sliding-window caches, batches with padding) equals a full pass."""

import pytest
import torch

import slm
from support.models import make_checkpoint


def incremental_logits(model, ids, chunks):
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    out, start = [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(model(ids[:, start:start + n], cache=cache))
            start += n
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("chunks", [[1] * 40, [10] + [1] * 30, [20, 5, 15], [33, 7]])
def test_cached_decoding_equals_full_forward(checkpoint, chunks):
    model = slm.load(checkpoint).model
    ids = torch.randint(0, 400, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
    inc, _ = incremental_logits(model, ids, chunks)
    assert (inc - full).abs().max().item() < 1e-4


def test_mistral_cache_is_bounded_by_window(tmp_path, tokenizer_dir):
    path = make_checkpoint(str(tmp_path / "m"), "mistral", tokenizer_dir, num_key_value_heads=2, sliding_window=16)
    model = slm.load(path).model
    long_cache = model.new_cache(1, 200)
    assert all(k.shape[2] == 16 for k in long_cache.k)  # rolling buffer: window slots, not 200
    ids = torch.randint(0, 400, (1, 120), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
    inc, cache = incremental_logits(model, ids, [25] + [1] * 95)
    assert (inc - full).abs().max().item() < 1e-4
    assert cache.nbytes() == 2 * 2 * 2 * 16 * 16 * 4  # layers x (k, v) x kv heads x window x head dim x fp32


def test_left_padded_batch_equals_single_prompts(checkpoint):
    model = slm.load(checkpoint).model
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (5, 17, 30)]
    from slm.runtime.generate import generate_ids
    batched = list(zip(*generate_ids(model, prompts, 12)))
    for p, row in zip(prompts, batched):
        single = [s[0] for s in generate_ids(model, [p], 12)]
        assert list(row) == single


def test_attention_mask_matches_unpadded(checkpoint):
    model = slm.load(checkpoint).model
    ids = torch.randint(3, 400, (1, 20))
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 6), torch.ones(1, 20)], 1)
    with torch.no_grad():
        a = model(ids)
        b = model(padded, attention_mask=mask)[:, 6:]
    assert torch.isfinite(b).all()
    assert (a - b).abs().max().item() < 1e-4


def test_kv_cache_bytes_count_gemma3_global_layers_at_full_context():
    """Gemma 3's sliding-window layers keep their window, its full-attention layers every token:
    gemma-3-270m's 3 global layers alone hold 2 x 3 x 1 x 256 x 32,768 x 2 bytes = 96 MiB."""
    from slm.model.config import get_config
    cfg = get_config("gemma-3-270m")
    glob = sum(t == "full_attention" for t in cfg.layer_types)
    local = cfg.num_layers - glob
    per_token = 2 * cfg.num_kv_heads * cfg.head_dim * 2
    assert glob == 3
    assert cfg.kv_cache_bytes() == per_token * (glob * cfg.max_seq_len + local * cfg.sliding_window)
    assert cfg.kv_cache_bytes() > 96 * 2**20
    assert get_config("gemma-3-4b").kv_cache_bytes() > 2.5 * 2**30
    mistral = get_config("mistral-7b-v0.1")  # every layer windowed
    assert mistral.kv_cache_bytes() == 2 * mistral.num_layers * mistral.num_kv_heads * mistral.head_dim * \
        min(mistral.max_seq_len, mistral.sliding_window) * 2


def test_forward_by_layer_equals_forward(checkpoint):
    """The layer-at-a-time forward (a long prompt's chunk spread over a server's turns) computes
    the same logits and fills the same cache as forward, chunk after chunk."""
    lm = slm.load(checkpoint)
    model = lm.model
    ids = torch.randint(3, model.config.vocab_size, (1, 40))
    with torch.inference_mode():
        whole, parts = model.new_cache(1, 41), model.new_cache(1, 41)
        for i in range(0, 40, 13):
            want = model(ids[:, i:i + 13], cache=whole, last_only=True)
            gen, steps = model.forward_by_layer(ids[:, i:i + 13], parts), 0
            while True:
                try:
                    next(gen)
                    steps += 1
                except StopIteration as done:
                    got = done.value
                    break
            assert steps == model.config.num_layers
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert parts.seen == whole.seen == 40
        follow = torch.tensor([[5]])
        torch.testing.assert_close(model(follow, cache=parts), model(follow, cache=whole), rtol=1e-5, atol=1e-5)
