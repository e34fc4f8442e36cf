"""Look inside a model: activations (run_with_cache), the logit lens, attribution of the next
token to the input tokens, and a self-contained HTML report (`slm explain`).

    import slm, slm.explain
    lm = slm.load("model")
    logits, cache = slm.explain.run_with_cache(lm, "The Eiffel Tower is in the city of")
    cache["attn.pattern", 0]                         # [batch, head, query, key]
    lens = slm.explain.logit_lens(lm.model, cache, k=5)
    attr = slm.explain.attribute(lm.model, lm.tokenizer.encode("..."), target=token_id)
"""

from .attribution import Attribution, attribute, gradient_x_input, integrated_gradients, occlusion
from .capture import ActivationCache, capture, run_with_cache
from .lens import LogitLens, lens_logits, logit_lens
from .report import Explanation, explain, render_html, write_report

__all__ = ["ActivationCache", "capture", "run_with_cache", "LogitLens", "lens_logits", "logit_lens",
           "Attribution", "attribute", "integrated_gradients", "gradient_x_input", "occlusion",
           "Explanation", "explain", "render_html", "write_report"]
