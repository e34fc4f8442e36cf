"""The whole decode step in one C++ call (slm.accel.decoder, kernels/cpu/decoder.cpp's Decoder) against the module
path it replaces: the same logits and the same cache, for every family and weight layout, and the
module path wherever the decoder does not apply."""

from __future__ import annotations

import pytest
import torch

import slm
from slm import kernels
from slm.accel import decoder
from slm.runtime.generate import generate_ids

pytestmark = pytest.mark.skipif(kernels.cpu_ops() is None, reason="slm's CPU kernels are unavailable")


def decode(model, ids: list[int], steps: int, max_len: int = 64):
    """Logits of the prompt ids (all rows) and of `steps` single-token steps after it, and the cache."""
    cache = model.new_cache(1, max_len)
    with torch.no_grad():
        prompt = model(torch.tensor([ids]), cache=cache)[0]
        out = list(prompt)
        for i in range(steps):  # fixed tokens: an argmax could flip between near-equal logits
            out.append(model(torch.tensor([[(ids[-1] + 7 * i) % model.config.vocab_size]]), cache=cache)[0, -1])
    return torch.stack(out), cache


def both(model, monkeypatch, ids, steps, max_len=64):
    return with_and_without(lambda: decode(model, ids, steps, max_len), monkeypatch)


def with_and_without(run, monkeypatch):
    """run() -> (logits, cache), once through the decoder and once through the modules."""
    fast = run()
    assert fast[1].__dict__.get("_step"), "the decoder did not run"
    with monkeypatch.context() as m:
        m.setenv("SLM_NO_DECODER", "1")
        slow = run()
    assert slow[1].__dict__.get("_step") is False
    return fast, slow


def assert_same(a, b, tol=1e-4):
    (fast, cf), (slow, cs) = a, b
    torch.testing.assert_close(fast, slow, rtol=tol, atol=tol)
    for x, y in zip(cf.k + cf.v, cs.k + cs.v):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)
    for w in cf.pos:
        assert torch.equal(cf.pos[w], cs.pos[w])
    assert cf.seen == cs.seen


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_matches_the_module_path(checkpoint, mode, monkeypatch):
    """Every family (GQA, sliding windows past their length, Phi's parallel block and partial
    rotary, Gemma's sandwich norms, qk-norm and two rope tables), fp32 and slm's int8/int4."""
    lm = slm.load(checkpoint, quantize=mode)
    ids = lm.tokenizer.encode("Once upon a time")[:5]
    assert_same(*both(lm.model, monkeypatch, ids, 24))  # windows of 8 and 16: the rings wrap
    # a prompt longer than the windows, then a second chunk of prompt after it

    def chunks():
        model, cache, long = lm.model, lm.model.new_cache(1, 64), (ids * 8)[:20]
        with torch.no_grad():
            out = [model(torch.tensor([long]), cache=cache)[0], model(torch.tensor([long[:7]]), cache=cache)[0],
                   model(torch.tensor([long[:3]]), cache=cache, last_only=True)[0]]
        return torch.cat(out), cache
    assert_same(*with_and_without(chunks, monkeypatch))


def test_row_0_of_a_serving_cache(checkpoint, monkeypatch):
    """The serving engine's RowKVCache when one request runs: its prompt prefilled in a batch-1
    cache and loaded into row 0 over an earlier request's leftovers, then one token a step."""
    from slm.model import RowKVCache
    lm = slm.load(checkpoint, quantize="int8")
    model, ids = lm.model, lm.tokenizer.encode("Once upon a time")[:5]

    def serve():
        rows = RowKVCache(model.config, 3, 48, model.device, model.dtype)
        with torch.no_grad():
            for prompt in ([9, 8, 7, 6, 5, 4, 3, 2, 1] * 3, ids):  # a longer request first, then ours
                small = model.new_cache(1, len(prompt))
                out = [model(torch.tensor([prompt]), cache=small, last_only=True)[0, -1]]
                rows.load_row(0, small)
            for i in range(24):
                p = torch.tensor([[len(ids) + i]])
                out.append(model(torch.tensor([[(ids[-1] + 7 * i) % 400]]), cache=rows, pos=p)[0, -1])
        return torch.stack(out), rows

    assert_same(*with_and_without(serve, monkeypatch))


def test_fp32_products_of_several_rows_equal_torch():
    """matvec_f32 on a few rows of x (f32_rows_direct: each weight read once for all rows, the
    products of Decoder.step_rows on fp32 weights) against torch, for every count of rows the
    tiles split into (1-4 and their sums), rows of weights that do not fill a tile or a chunk, and
    an in_features that is not a multiple of the vector width."""
    op = kernels.cpu_ops().matvec_f32.default
    g = torch.Generator().manual_seed(0)
    for N, K in ((1, 8), (7, 37), (33, 64), (130, 200)):
        w, bias = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
        for B in (2, 3, 4, 5, 7, 9, 16, 17):
            x = torch.randn(B, K, generator=g)
            torch.testing.assert_close(op(x, w, bias), torch.addmm(bias, x, w.t()), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(op(x[None], w, None), (x @ w.t())[None], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_several_rows_of_a_serving_cache(checkpoint, quantize, monkeypatch):
    """The serving engine's step of several rows (Decoder.step_rows): three requests at different
    positions in rows 0, 1 and 3 (row 2 idle, position -1), stepping together, the same logits and
    caches as the modules give, with fp32 weights and int8."""
    from slm.model import RowKVCache
    lm = slm.load(checkpoint, quantize=quantize)
    model, busy = lm.model, [0, 1, 3]
    prompts = [[9, 8, 7, 6, 5, 4, 3, 2, 1] * 3, [5, 6, 7], [11, 12, 13, 14, 15, 16]]

    def serve():
        rows = RowKVCache(model.config, 4, 48, model.device, model.dtype)
        with torch.no_grad():
            for r, prompt in zip(busy, prompts):
                small = model.new_cache(1, len(prompt))
                model(torch.tensor([prompt]), cache=small, last_only=True)
                rows.load_row(r, small)
            out = []
            for i in range(12):
                ids, pos = torch.zeros(4, 1, dtype=torch.long), torch.full((4, 1), -1)
                for r, prompt in zip(busy, prompts):
                    ids[r, 0], pos[r, 0] = (7 * i + r) % 400, len(prompt) + i
                out.append(model(ids, cache=rows, pos=pos)[busy, -1])
        return torch.stack(out), rows

    (fast, cf) = serve()
    assert cf.__dict__.get("_rows_step"), "the decoder did not run"
    with monkeypatch.context() as m:
        m.setenv("SLM_NO_DECODER", "1")
        (slow, cs) = serve()
    assert cs.__dict__.get("_rows_step") is False
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    for x, y in zip(cf.k + cf.v, cs.k + cs.v):  # the idle row is the modules' scratch: left out
        torch.testing.assert_close(x[busy], y[busy], rtol=1e-4, atol=1e-4)
    for w in cf.pos:
        assert torch.equal(cf.pos[w][busy], cs.pos[w][busy])


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_prompts_ride_beside_decoding_rows(checkpoint, quantize, monkeypatch):
    """Chunked prefill in the serving engine's step (Decoder.step_rows with several tokens of a
    row): row 0 decodes a token a step while a prompt goes into row 2 five tokens a step, after its
    first three came from a cache that holds more (RowKVCache.load_row_layers with n), past the
    sliding windows' lengths (the model's forward with right-aligned rows and last_only, as the
    engine steps). Both rows' logits and keys are what the module path gives each sequence alone
    in a batch-1 cache."""
    from slm.model import RowKVCache
    model = slm.load(checkpoint, quantize=quantize).model
    a, b = [9, 8, 7, 6, 5, 4, 3, 2, 1] * 2, [(13 * i + 5) % 400 for i in range(23)]
    steps = [(7 * i + 1) % 400 for i in range(4)]  # row 0's tokens; row 2's prompt: 3 + 4 x 5 tokens
    with torch.no_grad():
        rows = RowKVCache(model.config, 3, 48, model.device, model.dtype)
        alone = model.new_cache(1, len(a) + len(steps))
        model(torch.tensor([a]), cache=alone)
        rows.load_row(0, alone)
        longer = model.new_cache(1, 48)
        model(torch.tensor([b[:6]]), cache=longer)  # within Gemma's 8-slot rings: its first 3 are still there
        for _ in rows.load_row_layers(2, longer, 3):
            pass
        step = decoder.fused_rows(model, rows)
        assert step is not None, "the decoder does not run this model"
        got_a, got_b, done = [], [], 3
        for i, tok in enumerate(steps):  # as the engine steps: each row's tokens right-aligned, -1 before them
            ids, pos = torch.zeros(3, 5, dtype=torch.long), torch.full((3, 5), -1)
            ids[0, -1], pos[0, -1] = tok, len(a) + i
            ids[2], pos[2] = torch.tensor(b[done:done + 5]), torch.arange(done, done + 5)
            logits = model(ids, cache=rows, pos=pos, last_only=True)
            assert logits.shape == (3, 1, model.config.vocab_size)
            got_a.append(logits[0, 0])
            got_b.append(logits[2, 0])
            done += 5
        assert rows.__dict__.get("_rows_step"), "the decoder did not run"
        with pytest.raises(RuntimeError, match="consecutive positions"):
            step([1, 2], [1, 1], [4, 6], [1])
        with monkeypatch.context() as m:  # each sequence alone, on the module path
            m.setenv("SLM_NO_DECODER", "1")
            ref_a = []
            for tok in steps:
                ref_a.append(model(torch.tensor([[tok]]), cache=alone)[0, -1])
            ref = model.new_cache(1, 48)
            ref_b = model(torch.tensor([b]), cache=ref)[0]
        assert ref.__dict__.get("_step") is False
    torch.testing.assert_close(torch.stack(got_a), torch.stack(ref_a), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.stack(got_b), ref_b[[7, 12, 17, 22]], rtol=1e-4, atol=1e-4)
    for i, w in enumerate(rows.windows):  # row 2's keys and values where the lone cache has them
        n = min(len(b), rows.size[w])
        torch.testing.assert_close(rows.k[i][2, :, :n], ref.k[i][0, :, :n], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rows.v[i][2, :, :n], ref.v[i][0, :, :n], rtol=1e-4, atol=1e-4)


def test_a_column_major_head(checkpoint, monkeypatch):
    """checkpoint/hf.py stores a tall fp32 LM head column-major (and a tied embedding with it)."""
    lm = slm.load(checkpoint)
    model = lm.model
    w = torch.nn.Parameter(model.lm_head.weight.detach().t().contiguous().t())
    assert not w.is_contiguous()
    if model.lm_head.weight is model.embed.weight:
        model.embed.weight = w
    model.lm_head.weight = w
    ids = lm.tokenizer.encode("Once upon a time")[:5]
    assert_same(*both(model, monkeypatch, ids, 6))


@pytest.mark.parametrize("dtype", ["q8_0", "f32"])
def test_matches_the_module_path_from_gguf(checkpoint, dtype, tmp_path, monkeypatch):
    """A GGUF file's own blocks (GGUFLinear; a tied embedding reads the head's blocks)."""
    if not any(f in checkpoint for f in ("llama", "mistral", "phi")):
        pytest.skip("slm exports the Llama, Mistral and Phi families to GGUF")
    from slm.checkpoint.gguf_write import write_gguf
    path = str(tmp_path / "m.gguf")
    write_gguf(slm.load(checkpoint), path, dtype)
    lm = slm.load(path, quantize="int8")
    ids = lm.tokenizer.encode("Once upon a time")[:5]
    # The kernels hold x to ~16 bits (x and its residual in int8 blocks): the fused steps' last-bit
    # differences from the modules' move the residual's rounding by one step (~amax / 32000 of a
    # block) here and there, which reaches the logits at ~1e-4 of their size after 25 steps.
    assert_same(*both(lm.model, monkeypatch, ids, 20), tol=1e-4 if dtype == "f32" else 5e-4)


def test_generation_is_unchanged(checkpoint, monkeypatch):
    lm = slm.load(checkpoint, quantize="int8")
    ids = lm.tokenizer.encode("Once upon a time")

    def greedy():
        return [s[0] for s in generate_ids(lm.model, [ids], 20)]
    fast = greedy()
    monkeypatch.setenv("SLM_NO_DECODER", "1")
    assert greedy() == fast


def test_rebuilt_when_the_weights_change(checkpoint, monkeypatch):
    """Quantizing after a generation replaces the layers: the next step must see the new ones."""
    from slm.quant.apply import quantize_model
    lm = slm.load(checkpoint)
    ids = lm.tokenizer.encode("Once upon a time")[:5]
    decode(lm.model, ids, 3)
    first = decoder._DECODERS[lm.model][1]
    quantize_model(lm.model, "int4")
    a, b = both(lm.model, monkeypatch, ids, 6)
    assert decoder._DECODERS[lm.model][1] is not first
    assert_same(a, b)


def test_module_path_where_it_does_not_apply(checkpoint):
    lm = slm.load(checkpoint)
    model, ids = lm.model, lm.tokenizer.encode("Once upon a time")[:5]
    # a hook watching a module (explain's capture): the modules must run
    seen = []
    h = model.blocks[0].mlp.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    _, cache = decode(model, ids, 2)
    h.remove()
    assert cache._step is False and len(seen) == 3
    # a left-padded batch of two, and a step with autograd on
    cache = model.new_cache(2, 32)
    model(torch.tensor([[0, 5, 6], [4, 5, 6]]), cache=cache, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
    with torch.no_grad():
        model(torch.tensor([[7], [7]]), cache=cache, pos=torch.tensor([[2], [3]]))
    assert "_step" not in cache.__dict__
    cache = model.new_cache(1, 32)
    with torch.no_grad():
        model(torch.tensor([ids]), cache=cache)
    model(torch.tensor([[7]]), cache=cache).sum().backward()  # grad on: the modules, gradients flow
    assert model.lm_head.weight.grad is not None


def test_the_receipts_token_counter_keeps_the_decoder(checkpoint, monkeypatch):
    """The footprint receipt counts tokens with a pre-hook on the model itself (`slm generate`,
    `chat` and `serve` all install it): that hook runs whichever path the step takes, so the
    decoder stays; it was refused, and every CLI decode ran on the modules, ~4x slower."""
    from slm.footprint.receipt import Tracker
    lm = slm.load(checkpoint)
    tracker = Tracker("generate", device="cpu")
    handle = tracker.watch(lm)
    try:
        fast, slow = both(lm.model, monkeypatch, lm.tokenizer.encode("Once upon a time")[:5], 3)
    finally:
        handle.remove()
    assert_same(fast, slow)
    assert tracker.tokens["inferred"] == 2 * (5 + 3)  # both runs counted, every token once


def test_lora_keeps_the_module_path(checkpoint):
    from slm.finetune.lora import apply_lora
    lm = slm.load(checkpoint)
    apply_lora(lm.model, r=4)
    _, cache = decode(lm.model, lm.tokenizer.encode("Once upon a time")[:5], 2)
    assert cache._step is False


def test_refuses_bad_tokens_and_positions(checkpoint):
    lm = slm.load(checkpoint)
    model = lm.model
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(torch.tensor([[3, 4]]), cache=cache)
        with pytest.raises((IndexError, RuntimeError)):
            model(torch.tensor([[model.config.vocab_size]]), cache=cache)
        for _ in range(6):
            model(torch.tensor([[5]]), cache=cache)
        with pytest.raises(ValueError, match="exceeds the context"):
            model(torch.tensor([[5]]), cache=cache)
