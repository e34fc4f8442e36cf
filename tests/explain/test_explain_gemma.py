"""slm.explain on the real pretrained gemma-3-270m (Q4_K_M GGUF, run in fp32): the logit lens
settles on a factual answer only in the upper layers, attribution is complete, and the report
stays small. SLM_DOCS_PICTURES=DIR copies the report's figures there (docs/explain/)."""

import os
import re
import shutil

import numpy as np
import pytest
import torch

import slm
from slm.explain import lens_logits, logit_lens, run_with_cache
from slm.explain.attribution import DEFAULT_STEPS
from slm.explain.report import explain, write_report

pytestmark = [pytest.mark.gemma, pytest.mark.slow]
PROMPT, ANSWER = "The Eiffel Tower is in the city of", " Paris"


@pytest.fixture(scope="module")
def lm(gemma_gguf):
    # dtype="fp32" explicitly: a model that keeps the file's quantized blocks quantizes its
    # activations to int8 in the forward pass, so f is piecewise constant and has no useful gradient
    lm = slm.load(gemma_gguf, dtype="fp32")
    assert lm.model.embed.weight.dtype == torch.float32
    return lm


def paris(lm) -> int:
    (i,) = lm.tokenizer.encode(ANSWER, add_special_tokens=False)
    return i


def lens_table(lm, lens) -> str:
    rows = []
    for r, label in enumerate(lens.labels):
        top = lm.tokenizer.decode([int(lens.top_ids[r, -1, 0])])
        rows.append(f"{label:>5}  rank {int(lens.target_ranks[r, -1]) + 1:>6}  p {float(lens.target_probs[r, -1]):.3f}"
                    f"  top-1 {top!r}")
    return "\n".join(rows)


def test_logit_lens_settles_on_the_answer_in_the_upper_layers(lm):
    logits, cache = run_with_cache(lm, PROMPT)
    L = lm.config.num_layers  # 18
    diff = (lens_logits(lm.model, cache["resid_post", L - 1]) - logits).abs().max().item()
    assert diff <= 1e-5, diff  # the lens at the last layer is the model's output
    lens = logit_lens(lm.model, cache, k=5, target=paris(lm))
    print(lens_table(lm, lens))
    ranks = lens.target_ranks[:, -1].tolist()  # row 0: embeddings, row r: after block r - 1
    # measured: rank 1 after blocks 13-17 (p 0.34, 0.36, 0.86, 0.93, 0.50), rank 2 after block 12,
    # rank 65 after block 11, and ranks 4,995 to 37,569 after blocks 0-10
    assert all(r == 0 for r in ranks[14:]), ranks  # top-1 after each of the last five blocks
    assert int(logits[0, -1].argmax()) == paris(lm)  # so the model answers " Paris"
    assert all(r > 0 for r in ranks[:13]), ranks  # not top-1 in the embeddings or after blocks 0-11
    assert all(r > 1000 for r in ranks[:12]), ranks  # nowhere near it in the lower half
    # the attention patterns of the real model reproduce its attention output (GQA: 4 heads, 1 KV head)
    for i in range(L):
        p, v = cache["attn.pattern", i], cache["attn.v", i]
        z = (p @ v.repeat_interleave(p.shape[1] // v.shape[1], 1)).transpose(1, 2)
        torch.testing.assert_close(z, cache["attn.z", i], rtol=0, atol=1e-4)


def test_capital_of_france(lm):
    """The prompt people try first. What is true of this model: its own top-1 is ' the' (p 0.19),
    with ' Paris' third (p 0.08); the lens shows ' Paris' as top-1 inside the network, after
    blocks 12, 15 and 16, and never in the lower layers."""
    logits, cache = run_with_cache(lm, "The capital of France is")
    lens = logit_lens(lm.model, cache, k=5, target=paris(lm))
    print(lens_table(lm, lens))
    ranks = lens.target_ranks[:, -1].tolist()
    assert ranks[16] == 0 and ranks[17] == 0  # after blocks 15 and 16
    assert 0 < ranks[-1] < 3  # in the model's own top 3, not its top-1
    assert all(r > 100 for r in ranks[:12])


@pytest.fixture(scope="module")
def explanation(lm):
    return explain(lm, PROMPT, target=ANSWER, top_k=5, model_name="gemma-3-270m")


def test_attribution_is_complete_and_points_at_eiffel(lm, explanation):
    a = explanation.attribution
    delta = a.value - a.baseline_value
    print(f"f(x) {a.value:.4f}  f(baseline) {a.baseline_value:.4f}  sum IG {sum(a.integrated_gradients):.4f}  "
          f"gap {a.completeness_gap:.2e}")
    print("IG", [round(v, 3) for v in a.integrated_gradients])
    print("occlusion", [round(v, 3) for v in a.occlusion])
    assert a.complete and abs(a.completeness_gap) <= 0.01 * abs(delta)
    eiffel = explanation.tokens.index(" Eiffel")
    by_ig = sorted(range(len(a.ids)), key=lambda t: -a.integrated_gradients[t])
    by_occlusion = sorted(range(len(a.ids)), key=lambda t: -a.occlusion[t])
    assert by_ig[0] == eiffel  # integrated gradients: ' Eiffel' matters most
    assert eiffel in by_occlusion[:2]  # occlusion agrees it is among the two that matter most


@pytest.mark.parametrize("prompt, baseline", [(PROMPT, "."), ("The capital of France is", "pad")])
def test_integrated_gradients_are_complete(lm, prompt, baseline):
    """Within the 1% tolerance at the default steps from the token baselines `slm explain` offers
    (the default, "pad", on PROMPT: above), with nothing NaN."""
    a = explain(lm, prompt, baseline=baseline, top_k=1, layers="0").attribution
    print(f"{baseline!r}: f(x) {a.value:.4f} f(baseline) {a.baseline_value:.4f} steps {a.steps}  {a.gap_summary()}")
    values = a.integrated_gradients + a.gradient_x_input + a.occlusion + [a.value, a.baseline_value]
    assert np.isfinite(values).all()
    assert a.steps <= DEFAULT_STEPS and abs(a.value - a.baseline_value) > 0.5
    assert a.complete and a.relative_gap <= 0.01, a.gap_summary()


def test_zero_baseline_is_refused(lm):
    """From zeros f moves from -59.1 (alpha = 0) to about -64 by alpha = 1e-6 (measured: -59.26 at
    1e-9, -64.27 at 1e-7), 6% of f(x) - f(baseline) = 81.5 within a millionth of the path; 511
    adaptive steps left a 1.5% gap. Refused in one line, not a NaN or a silent miss."""
    with pytest.raises(ValueError, match="zero baseline is degenerate for this model") as e:
        explain(lm, PROMPT, baseline="zeros", top_k=1, layers="0")
    assert "\n" not in str(e.value) and "--baseline pad" in str(e.value)


def test_report_is_small_and_self_contained(explanation, tmp_path):
    paths = write_report(explanation, str(tmp_path / "gemma.html"))
    text = open(paths[0], encoding="utf-8").read()
    sizes = {os.path.basename(p): os.path.getsize(p) for p in paths}
    print(sizes)
    assert not re.search(r"https?://", text)
    assert sizes["gemma.html"] < 300_000 and sum(sizes.values()) < 1_000_000
    assert text.count("class=tok style=") > 18 * 9  # the lens table: every layer x position
    if os.environ.get("SLM_DOCS_PICTURES"):
        for name in ("gemma_logit_lens.png", "gemma_attribution.png"):
            shutil.copy(tmp_path / name, os.path.join(os.environ["SLM_DOCS_PICTURES"], name))
