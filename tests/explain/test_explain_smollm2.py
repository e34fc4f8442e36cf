"""Integrated gradients on the real SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32):
complete within the 1% tolerance at the default steps from the token baselines `slm explain`
offers, and the zero baseline refused in one line.

This is the model where equal steps fail: its path from the <pad> embedding swings f by +-20
logits within 1-2% of alpha several times (before the adaptive rule, 64 equal trapezoid steps
left a gap of -32 on a difference of 6.6; from zeros: NaN, an overflowing gradient at alpha = 0).

The code prompt "def add(a, b):\n    return" (f(x) - f(pad) = 1.26 on a path through f = 3.8..26)
is the hard case: the midpoint rule's 512 steps left a 1.5% gap with two threads, 1,024 a 1.9%;
Simpson's rule (the adaptive default since) reaches 0.26% in 273 steps with either thread count."""

import numpy as np
import pytest

import slm
from slm.explain.attribution import DEFAULT_STEPS, DEFAULT_TOLERANCE
from slm.explain.report import explain

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]


@pytest.fixture(scope="module")
def lm(smollm2_gguf):
    # dtype="fp32" explicitly: a model that keeps the file's quantized blocks quantizes its
    # activations to int8 in the forward pass, so f is piecewise constant and has no useful gradient
    return slm.load(smollm2_gguf, dtype="fp32")


@pytest.mark.parametrize("prompt, baseline", [
    ("The Eiffel Tower is in the city of", "pad"),
    ("The Eiffel Tower is in the city of", "."),
    ("The capital of France is", "pad"),
    ("def add(a, b):\n    return", "pad"),
])
def test_integrated_gradients_are_complete(lm, prompt, baseline):
    a = explain(lm, prompt, baseline=baseline, top_k=1, layers="0").attribution
    print(f"{baseline!r}: f(x) {a.value:.4f} f(baseline) {a.baseline_value:.4f} steps {a.steps}  {a.gap_summary()}")
    print("IG", [round(v, 3) for v in a.integrated_gradients])
    values = a.integrated_gradients + a.gradient_x_input + a.occlusion + [a.value, a.baseline_value]
    assert np.isfinite(values).all()  # no NaN from any baseline
    assert a.steps <= DEFAULT_STEPS and a.tolerance == DEFAULT_TOLERANCE
    assert abs(a.value - a.baseline_value) > 0.5  # a difference worth splitting, so 1% of it is a real bar
    assert a.complete and a.relative_gap <= 0.01, a.gap_summary()


def test_zero_baseline_is_refused(lm):
    """f of the 30 pre-norm blocks is already far from f(0) = 0 at alpha = 1e-12 (measured: 7.2;
    at 1e-30: -8.0, at 1e-38: 6.3): the norms' 1/sqrt(eps) gains compound past anything fp32
    holds, so the path from zeros has no integrable start. Refused in one line, not a NaN."""
    with pytest.raises(ValueError, match="zero baseline is degenerate for this model") as e:
        explain(lm, "The Eiffel Tower is in the city of", baseline="zeros", top_k=1, layers="0")
    assert "\n" not in str(e.value) and "--baseline pad" in str(e.value)
