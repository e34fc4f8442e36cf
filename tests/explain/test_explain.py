"""slm.explain on tiny real checkpoints of every family: the activation cache against the model's
own computation, the logit lens against the model's output, attribution completeness, and the
HTML report (self-contained, rendered in headless Chromium)."""

from __future__ import annotations

import io
import os
import re
import shutil

import numpy as np
import pytest
import torch

import slm
from slm.cli import main
from slm.explain import attribute, gradient_x_input, integrated_gradients, lens_logits, logit_lens, occlusion, \
    run_with_cache
from slm.explain.report import explain, parse_layers, write_report

from support.models import chromium

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play"  # 28 tokens: past both windows


@pytest.fixture(scope="module")
def lm(checkpoint):
    return slm.load(checkpoint)


@pytest.fixture(scope="module")
def ids(lm):
    return torch.tensor(lm.tokenizer.encode(PROMPT))


def no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# -- the activation cache ----------------------------------------------------------------------
def test_cache_follows_the_block_structure(lm, ids):
    model, cfg = lm.model, lm.config
    logits, cache = run_with_cache(lm, ids)
    assert no_hooks(model)  # nothing left behind: the model runs at full speed afterwards
    with torch.no_grad():
        assert torch.equal(logits, model(ids[None]))  # capturing does not change the computation
    T, d = len(ids), cfg.hidden_size
    scale = cfg.hidden_size ** 0.5 if cfg.embed_scale else 1.0
    torch.testing.assert_close(cache["resid_pre", 0], cache["embed"] * scale, rtol=0, atol=1e-6)
    for i in range(cfg.num_layers):
        pre, post = cache["resid_pre", i], cache["resid_post", i]
        assert pre.shape == post.shape == (1, T, d)
        if i + 1 < cfg.num_layers:
            assert torch.equal(post, cache["resid_pre", i + 1])
        # every block: output = input + what attention adds + what the MLP adds
        torch.testing.assert_close(post, pre + cache["attn_resid", i] + cache["mlp_resid", i], rtol=0, atol=1e-5)
        block = model.blocks[i]
        if cfg.parallel_block:  # Phi: one norm feeds both branches, there is no mid-point
            assert ("resid_mid", i) not in cache
            assert torch.equal(cache["attn_in", i], cache["mlp_in", i])
        else:
            torch.testing.assert_close(cache["resid_mid", i], pre + cache["attn_resid", i], rtol=0, atol=1e-5)
        if cfg.sandwich_norm:  # Gemma: the branch outputs are normalised before they are added
            with torch.no_grad():
                assert torch.equal(cache["attn_resid", i], block.post_attn_norm(cache["attn_out", i]))
                assert torch.equal(cache["mlp_resid", i], block.post_mlp_norm(cache["mlp_out", i]))
            assert not torch.allclose(cache["attn_resid", i], cache["attn_out", i])
        else:
            assert torch.equal(cache["attn_resid", i], cache["attn_out", i])
        assert cache["mlp.post", i].shape == (1, T, cfg.intermediate_size)
    assert torch.equal(cache["resid_post", -1], cache.stack("resid_post")[-1])
    assert cache.residual_stream().shape == (cfg.num_layers + 1, 1, T, d)


def test_attention_patterns_reproduce_the_model(lm, ids):
    cfg = lm.config
    _, cache = run_with_cache(lm, ids)
    T, H = len(ids), cfg.num_heads
    q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    windows = set()
    for i in range(cfg.num_layers):
        pattern, v, z = cache["attn.pattern", i], cache["attn.v", i], cache["attn.z", i]
        assert pattern.shape == (1, H, T, T) and v.shape[1] == cfg.num_kv_heads  # GQA: fewer KV heads
        # pattern @ V is what the model's scaled_dot_product_attention computed (read at o_proj's input)
        mine = pattern @ v.repeat_interleave(H // cfg.num_kv_heads, dim=1)
        torch.testing.assert_close(mine.transpose(1, 2), z, rtol=0, atol=1e-5)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(1, H, T), rtol=0, atol=1e-5)
        w = cfg.layer_window(i)
        allowed = (k <= q) & ((q - k < w) if w else True)
        assert (pattern[..., ~allowed] == 0).all()  # future tokens and tokens out of the window: exactly 0
        assert (pattern[..., allowed] > 0).all()
        windows.add(w if w and w < T else None)
    if cfg.sliding_window:  # the prompt is longer than the window, so some layer really slides
        assert any(w is not None for w in windows)


def test_patterns_of_a_left_padded_batch(lm):
    tok = lm.tokenizer
    a, b = tok.encode(PROMPT), tok.encode("The cat sat on the mat.")
    pad = len(a) - len(b)
    ids = torch.tensor([a, [0] * pad + b])
    mask = torch.tensor([[1] * len(a), [0] * pad + [1] * len(b)])
    logits, cache = run_with_cache(lm, ids, names=["attn.pattern", "attn.z", "attn.v"], attention_mask=mask)
    _, alone = run_with_cache(lm, b, names=["attn.pattern"])
    for i in range(lm.config.num_layers):
        p = cache["attn.pattern", i]
        assert (p[1, :, pad:, :pad] == 0).all()  # real tokens never attend to padding
        torch.testing.assert_close(p[1, :, pad:, pad:], alone["attn.pattern", i][0], rtol=0, atol=1e-5)
    assert {k.split(".", 2)[-1] for k in cache} == {"attn.pattern", "attn.z", "attn.v"}  # only what was asked


def test_hooks_are_removed_after_an_error(lm):
    with pytest.raises(ValueError, match="exceeds the context"):
        run_with_cache(lm, torch.zeros(1, lm.config.max_seq_len + 1, dtype=torch.long))
    assert no_hooks(lm.model)
    with pytest.raises(ValueError, match="shape"):
        run_with_cache(lm, torch.zeros(1, 2, 3, dtype=torch.long))


# -- logit lens --------------------------------------------------------------------------------
def test_logit_lens_at_the_last_layer_is_the_models_output(lm, ids):
    model, L = lm.model, lm.config.num_layers
    logits, cache = run_with_cache(lm, ids)
    diff = (lens_logits(model, cache["resid_post", L - 1]) - logits).abs().max().item()
    assert diff <= 1e-5, diff
    target = int(logits[0, -1].argmax())
    lens = logit_lens(model, cache, k=3, target=target)
    assert lens.labels == ["embed"] + [str(i) for i in range(L)] and lens.top_ids.shape == (L + 1, len(ids), 3)
    probs = logits[0].softmax(-1)
    top = probs.topk(3)
    assert torch.equal(lens.top_ids[-1], top.indices)
    torch.testing.assert_close(lens.top_probs[-1], top.values, rtol=0, atol=1e-6)
    torch.testing.assert_close(lens.target_probs[-1], probs[:, target], rtol=0, atol=1e-6)
    assert lens.target_ranks[-1, -1] == 0
    ranks = (probs > probs[:, target:target + 1]).sum(-1)
    assert torch.equal(lens.target_ranks[-1], ranks)
    # an earlier layer reads a different distribution: the lens is not the output repeated
    assert not torch.allclose(lens.top_probs[1], lens.top_probs[-1])


# -- attribution -------------------------------------------------------------------------------
def target_of(lm, ids) -> int:
    with torch.no_grad():
        return int(lm.model(ids[None])[0, -1].argmax())


def test_integrated_gradients_completeness(lm, ids):
    """Completeness: the attributions sum to f(x) - f(baseline), here for a logit difference.
    With a token baseline and the trapezoid rule over 64 equal steps the sum is within 2e-3 of it
    on every family (measured: 8e-5 to 1.5e-3), and the gap shrinks like 1/steps^2 (16 -> 64
    steps: more than 8x smaller); the midpoint rule likewise."""
    model, t, contrast = lm.model, target_of(lm, ids), 7
    ig = integrated_gradients(model, ids, t, contrast, steps=64, baseline=5, rule="trapezoid", batch_size=65)
    fx, fb = ig.value, ig.baseline_value
    with torch.no_grad():
        last = model(ids[None])[0, -1]
        assert fx == pytest.approx((last[t] - last[contrast]).item(), abs=1e-5)
        base = ids.clone()
        base[1:] = 5  # the baseline: token 5 everywhere but BOS, which stays
        last = model(base[None])[0, -1]
        assert fb == pytest.approx((last[t] - last[contrast]).item(), abs=1e-5)
    assert len(ig.attributions) == len(ids) and ig.attributions[0] == 0.0  # BOS is held fixed
    assert ig.steps == 65 and abs(ig.completeness_gap) <= 2e-3, ig.completeness_gap
    ig16 = integrated_gradients(model, ids, t, contrast, steps=16, baseline=5, rule="trapezoid", batch_size=17)
    assert abs(ig.completeness_gap) < abs(ig16.completeness_gap) / 8
    mid = integrated_gradients(model, ids, t, contrast, steps=64, baseline=5, rule="midpoint", batch_size=64)
    assert (mid.value, mid.baseline_value) == pytest.approx((fx, fb), abs=1e-5)
    assert mid.steps == 64 and abs(mid.completeness_gap) <= 2e-3


def test_adaptive_integrated_gradients(lm, ids):
    """The default rule: 16 Simpson intervals, then bisection of the worst until the gap is within
    half the tolerance. On a tiny model 33 to 64 steps are enough (well under the 512 allowed); a
    tolerance of 1e-9 makes it bisect until the budget is spent, lowering the sum of the intervals'
    own gaps."""
    model, t = lm.model, target_of(lm, ids)
    ig = integrated_gradients(model, ids, t, baseline=5)
    delta = ig.value - ig.baseline_value
    assert ig.steps <= 64 and abs(ig.completeness_gap) <= 0.005 * abs(delta)
    tight = integrated_gradients(model, ids, t, baseline=5, steps=ig.steps + 32, tolerance=1e-9)
    assert (tight.value, tight.baseline_value) == pytest.approx((ig.value, ig.baseline_value), abs=1e-5)
    assert tight.steps == ig.steps + 32  # the budget is spent
    assert tight.local_gaps < ig.local_gaps and abs(tight.completeness_gap) <= abs(ig.completeness_gap) + 1e-5
    assert sum(tight.attributions) == pytest.approx(sum(ig.attributions), abs=0.005 * abs(delta))


def test_integrated_gradients_from_zeros(lm, ids):
    """From the zero baseline the adaptive rule starts with the decades 1e-12..1e-2 of alpha (f
    changes on every scale there) and never takes a gradient at alpha = 0 (the product of
    1/sqrt(eps) norm gains, which overflows fp32 in deep models). Where f already moves by more
    than the tolerance within the first 1e-6 of the path, the baseline is refused: the tiny Gemma
    (its sandwich norms normalise near-zero branch outputs) is; every other family is complete
    within the 1% tolerance, with everything finite."""
    t = target_of(lm, ids)
    if lm.config.family == "gemma3":
        with pytest.raises(ValueError, match="zero baseline is degenerate for this model"):
            integrated_gradients(lm.model, ids, t, baseline="zeros")
        return
    ig = integrated_gradients(lm.model, ids, t, baseline="zeros")
    assert all(np.isfinite(ig.attributions)) and np.isfinite([ig.value, ig.baseline_value]).all()
    assert abs(ig.completeness_gap) <= 0.01 * abs(ig.value - ig.baseline_value), (ig.steps, ig.completeness_gap)


def test_gap_over_the_tolerance_is_a_warning(lm, ids):
    model, t = lm.model, target_of(lm, ids)
    a = attribute(model, ids, t, baseline=5, steps=1, rule="midpoint", tolerance=1e-6)
    assert not a.complete and a.relative_gap > 1e-6
    summary = a.gap_summary()
    assert "tolerance 0%" not in summary and "WARNING" in summary.splitlines()[-1]
    ok = attribute(model, ids, t, baseline=5)
    assert ok.complete and "WARNING" not in ok.gap_summary() and "(tolerance 1%)" in ok.gap_summary()


def test_gradient_x_input_is_the_derivative_along_the_input(lm, ids):
    """sum_t grad_t . x_t is d/ds f(s x) at s = 1: checked against central finite differences
    (Richardson-extrapolated, error O(h^4); the norms compute in fp32, so h cannot be tiny)
    computed without autograd."""
    model, t = lm.model, target_of(lm, ids)
    gxi = gradient_x_input(model, ids, t, fixed=[])
    with torch.no_grad():
        x = model.embed(ids)

        def f(s: float) -> float:
            h = model.embed.register_forward_hook(lambda m, a, o: x[None] * s)
            try:
                return model(ids[None])[0, -1, t].double().item()
            finally:
                h.remove()
        d = {h: (f(1 + h) - f(1 - h)) / (2 * h) for h in (0.02, 0.01)}
    derivative = (4 * d[0.01] - d[0.02]) / 3
    assert sum(gxi) == pytest.approx(derivative, abs=2e-4)
    assert max(abs(v) for v in gxi) > 10 * 2e-4  # the check is not vacuous


def test_occlusion_is_the_drop_when_a_token_is_replaced(lm, ids):
    model, t = lm.model, target_of(lm, ids)
    occ = occlusion(model, ids, t, token=5)
    assert occ[0] == 0.0  # BOS fixed
    with torch.no_grad():
        full = model(ids[None])[0, -1, t].item()
        for pos in (1, len(ids) // 2, len(ids) - 1):
            x = ids.clone()
            x[pos] = 5
            assert occ[pos] == pytest.approx(full - model(x[None])[0, -1, t].item(), abs=1e-4)


def test_attribution_refuses_bad_input(lm, ids):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        attribute(lm.model, ids, target=lm.config.vocab_size)
    with pytest.raises(ValueError, match="steps"):
        integrated_gradients(lm.model, ids, 3, steps=0)
    with pytest.raises(ValueError, match="rule"):
        integrated_gradients(lm.model, ids, 3, rule="simpson")


# -- the report --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory, tokenizer_dir):
    from support.models import make_checkpoint
    return make_checkpoint(str(tmp_path_factory.mktemp("explain-gemma")), "gemma3", tokenizer_dir,
                           num_key_value_heads=2)


@pytest.fixture(scope="module")
def report(gemma_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("report") / "report.html")
    main(["explain", "--model", gemma_dir, "--prompt", PROMPT, "--out", out, "--target", " the", "--top-k", "3"])
    return out


def test_parse_layers():
    assert parse_layers(None, 6) == list(range(6))
    assert parse_layers("0,3-4,-1", 6) == [0, 3, 4, 5]
    for bad in ("7", "a", "2-9", ""):
        if bad:
            with pytest.raises(ValueError, match="--layers"):
                parse_layers(bad, 6)


@pytest.mark.slow
def test_report_is_self_contained(report):
    text = open(report, encoding="utf-8").read()
    assert not re.search(r"https?://", text)  # nothing to fetch
    assert not re.search(r"""\b(src|href)\s*=\s*["']?(?!data:|#)""", text)  # no linked resource at all
    assert "default-src 'none'" in text  # and the page's policy forbids fetching anything
    assert 10_000 < len(text) < 300_000
    for part in ("Attention patterns", "Logit lens", "integrated gradients", "gradient x input", "occlusion",
                 "completeness gap"):
        assert part in text
    stem = report[:-len(".html")]
    for name in ("attention", "logit_lens", "attribution"):
        data = open(f"{stem}_{name}.png", "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    from PIL import Image
    img = np.asarray(Image.open(f"{stem}_logit_lens.png").convert("RGB"))
    assert img.shape[1] > 800 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50


@pytest.mark.slow
def test_report_on_selected_layers(gemma_dir, tmp_path):
    lm = slm.load(gemma_dir)
    ex = explain(lm, "The cat sat on the mat.", layers="2", top_k=2, steps=8)
    assert ex.layers == [2] and ex.layer_kinds == ["global"] and list(ex.patterns) == [2]
    assert ex.patterns[2].shape == (lm.config.num_heads, len(ex.ids), len(ex.ids))
    assert ex.target_token == ex.prediction[0][0]  # the default target: the model's top prediction
    a = ex.attribution
    assert len(a.integrated_gradients) == len(a.gradient_x_input) == len(a.occlusion) == len(ex.ids)
    paths = write_report(ex, str(tmp_path / "r.html"), figures=False)
    assert paths == [str(tmp_path / "r.html")]


@pytest.mark.slow
def test_cli_errors(gemma_dir, tmp_path, capsys):
    cases = [(["--target", " girl named"], "not one"), (["--layers", "9"], "layer 9 does not exist"),
             (["--out", str(tmp_path / "r.txt")], "should end in .html"),
             (["--out", str(tmp_path / "no" / "r.html")], "does not exist")]
    for extra, message in cases:
        argv = ["explain", "--model", gemma_dir, "--prompt", "The cat", "--out", str(tmp_path / "r.html"),
                "--steps", "2", *extra]
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 1
        err = capsys.readouterr().err.splitlines()[-1].split("\r")[-1]  # after the progress bar
        assert err.startswith("slm explain: error:") and message in err, err


@pytest.mark.slow
def test_cli_states_the_gap_and_warns_over_the_tolerance(gemma_dir, report, tmp_path, capsys):
    with open(report, encoding="utf-8") as f:
        text = f.read()  # the default run: complete, no warning
    assert "tolerance 1%" in text and "class=warn" not in text
    out = tmp_path / "r.html"
    main(["explain", "--model", gemma_dir, "--prompt", PROMPT, "--out", str(out), "--steps", "1", "--no-figures"])
    captured = capsys.readouterr()
    summary = [line for line in captured.out.splitlines() if line.startswith("integrated gradients:")]
    assert len(summary) == 1 and "completeness gap" in summary[0] and "(tolerance 1%) after 1 steps" in summary[0]
    assert captured.err.splitlines()[-1].startswith("WARNING: the completeness gap exceeds the 1% tolerance")
    assert "class=warn" in out.read_text(encoding="utf-8")


@pytest.mark.slow
def test_report_renders_heatmaps_in_chromium(report, tmp_path):
    browser_path = chromium()
    from PIL import Image
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            requests, errors = [], []
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto("file://" + report)
            page.locator("body[data-rendered=yes]").wait_for(timeout=10000)
            assert not errors, errors
            assert all(u.startswith("file://") for u in requests), requests  # nothing fetched from anywhere
            assert page.locator("canvas.heatmap").count() == 3 * 4  # every layer x head of the tiny Gemma
            grid = page.locator("#attention")
            box = grid.bounding_box()
            assert grid.is_visible() and box["width"] > 300 and box["height"] > 300, box
            shot = tmp_path / "attention.png"
            grid.screenshot(path=str(shot))  # the whole grid as a user sees it
            assert shot.read_bytes()[:4] == b"\x89PNG"
            for i in range(12):  # and each heatmap: drawn, not a blank square
                canvas = page.locator("canvas.heatmap").nth(i)
                cbox = canvas.bounding_box()
                assert cbox["width"] >= 100 and cbox["height"] >= 100, cbox
                img = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB")).astype(float)
                coloured = (img.min(-1) < 250).mean()  # masked cells are white, attended ones blue
                assert 0.1 < coloured < 0.9 and img.std() > 5 and len(np.unique(img.reshape(-1, 3), axis=0)) > 5
            lens = page.locator("table.lens")
            assert lens.is_visible() and lens.locator("tr").count() == 3 + 2  # header, embed, 3 layers
            full = tmp_path / "report.png"
            page.screenshot(path=str(full), full_page=True)
            if os.environ.get("SLM_SCREENSHOT"):
                shutil.copy(full, os.environ["SLM_SCREENSHOT"])
        finally:
            browser.close()
