"""The training recipe's parts: the fused LM-head cross-entropy, Muon, and resuming a Muon run."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from slm.train.loop import TrainConfig, Trainer, lr_at
from slm.train.loss import fused_linear_cross_entropy
from slm.train.optim import Muon, build_optimizers, orthogonalize


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("ignored", [True, False])
@pytest.mark.parametrize("chunk", [None, 7, 64])
def test_fused_cross_entropy_equals_plain_with_gradients(chunk, ignored, kernel, monkeypatch):
    """With the C++ softmax kernel (kernels/cpu/train.cpp) and with its PyTorch fallback; 50 classes
    leave a tail after the kernel's groups of 8."""
    from slm.train import loss
    if kernel:
        assert loss._softmax_xent_op(torch.zeros(1), torch.zeros(1)) is not None, "the CPU kernels did not build"
    else:
        monkeypatch.setattr(loss, "_softmax_xent_op", lambda hidden, weight: None)
    torch.manual_seed(0)
    h = torch.randn(3, 40, 16, requires_grad=True)
    w = (torch.randn(50, 16) * 0.3).requires_grad_()
    y = torch.randint(0, 50, (3, 40))
    if ignored:
        y[0, :5] = -100  # ignored positions count neither in the sum nor in the mean
    ref = F.cross_entropy((h @ w.t()).view(-1, 50), y.view(-1))
    gh, gw = torch.autograd.grad(ref * 2.5, (h, w))
    ours = fused_linear_cross_entropy(h, w, y, chunk=chunk)
    oh, ow = torch.autograd.grad(ours * 2.5, (h, w))
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(oh, gh, atol=1e-6) and torch.allclose(ow, gw, atol=1e-6)


def test_fused_cross_entropy_refuses_a_target_outside_the_vocabulary():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises((RuntimeError, IndexError)):
        fused_linear_cross_entropy(h, w, torch.tensor([1, 2, 10, 3]))


def test_gram_path_equals_newton_schulz():
    from slm.train.optim import NS_COEFFICIENTS, _polynomial_via_gram
    torch.manual_seed(0)
    x = torch.randn(3, 24, 80) * torch.logspace(-2, 0, 80)
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    a, b, c = NS_COEFFICIENTS
    y = x.double()
    for _ in range(5):
        gram = y @ y.mT
        y = a * y + (b * gram + c * gram @ gram) @ y
    assert torch.allclose(_polynomial_via_gram(x, 5).double(), y, atol=2e-4 * y.abs().max())


def test_orthogonalize_flattens_singular_values():
    torch.manual_seed(0)
    for shape in [(4, 32, 96), (2, 96, 32), (48, 48), (2, 40, 60)]:
        g = torch.randn(*shape) * torch.logspace(-1, 0, shape[-1])  # singular values over a decade
        s = torch.linalg.svdvals(orthogonalize(g))
        assert s.min() > 0.5 and s.max() < 1.3, shape


def test_muon_on_matrices_adamw_on_the_rest():
    import slm
    m = slm.Transformer(slm.get_config("slm-1m"))
    muon, adamw = build_optimizers(m, "muon", 1e-3, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    on_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert isinstance(muon, Muon) and on_muon and all(n.startswith("blocks.") and "norm" not in n for n in on_muon)
    on_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert "embed.weight" in on_adamw and not on_muon & on_adamw
    assert on_muon | on_adamw == set(names.values())


def test_wsd_schedule():
    c = TrainConfig(out="", data="", tokenizer="", max_steps=110, warmup=10, schedule="wsd", cooldown=0.4, min_lr_ratio=0.0)
    assert lr_at(0, c) == pytest.approx(0.1) and lr_at(9, c) == 1.0
    assert lr_at(60, c) == 1.0  # stable until 60% of the post-warmup steps
    assert lr_at(90, c) == pytest.approx(0.5) and lr_at(110, c) == 0.0


class Crash(Exception):
    pass


def test_muon_run_resumes_exactly(tmp_path, prepared):
    data, tok = prepared
    from slm.model.config import get_config
    cfg = get_config("slm-1m").replace(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
                                       intermediate_size=128)

    def run(out, crash_at=None, resume=False):
        c = TrainConfig(out=str(out), data=data, tokenizer=tok, seq_len=32, batch_size=4, max_steps=12, warmup=2,
                        optimizer="muon", schedule="wsd", eval_every=6, save_every=4, log_every=2)
        t = Trainer(c, cfg)
        if crash_at:
            step = t.optimizers[0].step

            def crashing_step(*a, **k):  # dies inside the step after the checkpoint at crash_at
                if t.step == crash_at + 1:
                    raise Crash
                return step(*a, **k)
            t.optimizers[0].step = crashing_step
        return t.train(resume=resume, progress=False)

    ref = run(tmp_path / "ref")
    with pytest.raises(Crash):
        run(tmp_path / "b", crash_at=8)
    assert json.load(open(tmp_path / "b" / "checkpoint" / "trainer_state.json"))["step"] == 8
    resumed = run(tmp_path / "b", resume=True)
    rows = [open(os.path.join(tmp_path / d, "metrics.jsonl")).read() for d in ("ref", "b")]
    def trajectory(text):
        return [(r["step"], r["loss"], r.get("val_loss")) for r in map(json.loads, text.splitlines())]
    assert trajectory(rows[0]) == trajectory(rows[1])
    assert resumed["val_loss"] == ref["val_loss"]
