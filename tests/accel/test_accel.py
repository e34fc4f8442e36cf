"""The accelerators (slm.accel) against the pure reference model (slm.model) they are swapped into:
decoding through the whole-step decoder and through the fused modules, and a training step's loss
and gradients through the CPU training kernels, for every family, equal the reference model's;
and the reference model itself calls no kernel."""

from __future__ import annotations

import ast
import copy
import os

import pytest
import torch

import slm
from slm import kernels
from slm.accel import accelerate, accelerated, decoder, unaccelerate

needs_kernels = pytest.mark.skipif(kernels.cpu_ops() is None, reason="slm's CPU kernels are unavailable")


def test_the_reference_model_calls_no_kernel():
    """Nothing in src/slm/model imports the kernels, the accelerators or the quantized layers, or
    reaches torch.ops / torch.classes (where the kernels register)."""
    root = os.path.dirname(slm.model.__file__)
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(root, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = ("." * node.level) + (node.module or "")
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                if isinstance(node, ast.Attribute) and node.attr in ("ops", "classes"):
                    assert not (isinstance(node.value, ast.Name) and node.value.id == "torch"), (name, node.lineno)
                continue
            for n in names:
                assert not any(part in n.split(".") for part in ("kernels", "accel", "quant")), (name, n)


def test_load_accelerates_and_unaccelerate_restores(checkpoint):
    lm = slm.load(checkpoint)
    model = lm.model
    assert accelerated(model) and type(model) is decoder.Transformer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unaccelerate(model)
    assert not accelerated(model)
    assert all(type(m).__module__.startswith(("slm.model", "torch.")) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert accelerate(model) is model and accelerated(model)


def _decode(model, ids: list[int]):
    """Logits of: a batch-1 prompt and single steps after it, a second chunk of prompt, a batch of
    two with a step after it, and a left-padded batch without a cache; and the caches."""
    V = model.config.vocab_size
    with torch.no_grad():
        one = model.new_cache(1, 64)
        out = [model(torch.tensor([ids]), cache=one)[0]]
        for i in range(20):  # past the windows (8, 16): the rolling buffers wrap
            out.append(model(torch.tensor([[(ids[-1] + 7 * i) % V]]), cache=one)[0])
        out.append(model(torch.tensor([ids[:3]]), cache=one, last_only=True)[0])
        two = model.new_cache(2, 32)
        out.extend(model(torch.tensor([ids, ids[::-1]]), cache=two).flatten(0, 1)[None])
        for i in range(3):
            out.extend(model(torch.tensor([[i + 3], [i + 5]]), cache=two).flatten(0, 1)[None])
        mask = torch.tensor([[0, 0] + [1] * len(ids), [1] * (len(ids) + 2)])
        padded = torch.tensor([[0, 0] + ids, ids + [5, 6]])
        out.extend(model(padded, attention_mask=mask).flatten(0, 1)[None])
    return torch.cat([o.reshape(-1, V) for o in out]), (one, two)


def _assert_same(a, b, tol=1e-4):
    (fast, caches_f), (ref, caches_r) = a, b
    torch.testing.assert_close(fast, ref, rtol=tol, atol=tol)
    for cf, cr in zip(caches_f, caches_r):
        for x, y in zip(cf.k + cf.v, cr.k + cr.v):
            torch.testing.assert_close(x, y, rtol=tol, atol=tol)
        assert cf.seen == cr.seen and all(torch.equal(cf.pos[w], cr.pos[w]) for w in cf.pos)


@needs_kernels
@pytest.mark.parametrize("mode", [None, "int8"])
def test_decoding_equals_the_reference_model(checkpoint, mode, monkeypatch):
    """The decoder, then the fused modules alone (SLM_NO_DECODER), then without the fused attention
    step (one query's attention, attn_decode, instead), each against the reference model."""
    lm = slm.load(checkpoint, quantize=mode)
    fast, ids = lm.model, lm.tokenizer.encode("Once upon a time")[:5]
    reference = unaccelerate(copy.deepcopy(fast))
    want = _decode(reference, ids)
    got = _decode(fast, ids)
    assert got[1][0]._step, "the decoder did not run"
    _assert_same(got, want)
    monkeypatch.setenv("SLM_NO_DECODER", "1")
    _assert_same(_decode(fast, ids), want)
    monkeypatch.setitem(kernels._state, "op:attn_step", None)
    _assert_same(_decode(fast, ids), want)


def test_training_equals_the_reference_model(checkpoint):
    """train/loop.py's loss_function swaps in the CPU training kernels (on a loaded, decoding-
    accelerated model here): the loss and every gradient are the reference model's."""
    from slm.train.loop import lm_loss, loss_function
    model = slm.load(checkpoint).model
    reference = unaccelerate(copy.deepcopy(model))
    loss_fn = loss_function(model, model, torch.device("cpu"))
    assert any(type(m).__module__ == "slm.accel.cpu_train" for m in model.modules())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 400, (2, 24), generator=g), torch.randint(0, 400, (2, 24), generator=g)
    results = []
    for m, fn in ((model, loss_fn), (reference, lambda x, y: lm_loss(reference, x, y))):
        loss = fn(x, y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (loss_a, grads_a), (loss_r, grads_r) = results
    torch.testing.assert_close(loss_a, loss_r, rtol=1e-5, atol=1e-6)
    for n, gr in grads_r.items():
        torch.testing.assert_close(grads_a[n], gr, rtol=1e-4, atol=1e-6, msg=n)


@needs_kernels
def test_a_replaced_layer_drops_the_decoder(checkpoint):
    """Quantizing after a generation replaces the layers: the decoder built from the old ones, which
    holds their weights, goes at once (not at the next step)."""
    from slm.quant.apply import quantize_model
    lm = slm.load(checkpoint)
    with torch.no_grad():
        lm.model(torch.tensor([[3, 4, 5]]), cache=lm.model.new_cache(1, 8))
    assert lm.model in decoder._DECODERS
    quantize_model(lm.model, "int8")
    assert lm.model not in decoder._DECODERS


def test_models_built_outside_load_are_accelerated():
    from slm.bench import random_model
    assert accelerated(random_model("slm-1m"))
