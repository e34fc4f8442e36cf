"""PNG figures of an explanation, for papers: attention patterns, the logit lens, attributions.
Drawn with matplotlib's Agg canvas directly (no pyplot, no global backend switch)."""

from __future__ import annotations

import io
import warnings

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..files import atomic_write


def _label(token: str) -> str:
    return token.replace("\n", "\\n").replace("\t", "\\t").replace("$", r"\$")


def _save(fig: Figure, path: str, dpi: int) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    with warnings.catch_warnings():  # tokens in scripts DejaVu Sans lacks: drawn as boxes, no warning
        warnings.simplefilter("ignore", UserWarning)
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def attention_figure(ex, path: str) -> str:
    layers, heads = ex.layers, next(iter(ex.patterns.values())).shape[0]
    T, labels = len(ex.tokens), [_label(t) for t in ex.tokens]
    size = 1.5 if T <= 16 else 2.2
    fig = Figure(figsize=(heads * size + 1, len(layers) * size + 0.5))
    axes = fig.subplots(len(layers), heads, squeeze=False)
    for r, layer in enumerate(layers):
        for h in range(heads):
            ax = axes[r][h]
            ax.imshow(ex.patterns[layer][h], cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"L{layer} H{h}", fontsize=7, pad=2)
            ax.set_xticks([]), ax.set_yticks([])
            if T <= 16 and h == 0:
                ax.set_yticks(range(T), labels, fontsize=5)
            if T <= 16 and r == len(layers) - 1:
                ax.set_xticks(range(T), labels, fontsize=5, rotation=90)
    fig.suptitle("attention patterns (row: query, column: key)", fontsize=9)
    return _save(fig, path, dpi=90)


def logit_lens_figure(ex, path: str) -> str:
    lens = ex.lens
    top1 = lens.top_probs[:, :, 0].numpy()
    R, T = top1.shape
    rows = ["embed"] + [f"layer {x}" for x in lens.labels[1:]]
    fig = Figure(figsize=(1.0 * T + 3.2, 0.32 * R + 1.6))
    ax, side = fig.subplots(1, 2, gridspec_kw={"width_ratios": [T, 1.6]}, sharey=True)
    im = ax.imshow(top1, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    for r in range(R):
        for t in range(T):
            ax.text(t, r, _label(ex.lens_tokens[r][t][0])[:12], ha="center", va="center", fontsize=7,
                    color="white" if top1[r, t] > 0.55 else "black")
    ax.set_xticks(range(T), [_label(t) for t in ex.tokens], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(R), rows, fontsize=7)
    ax.set_xlabel("input position (the lens reads the next-token prediction there)", fontsize=8)
    ax.set_title(f"logit lens: top-1 next token after each layer, prompt {ex.prompt!r}"[:110], fontsize=9)
    tp, rank = lens.target_probs[:, -1].numpy(), lens.target_ranks[:, -1].numpy()
    side.barh(np.arange(R), tp, color=["#08519c" if k == 0 else "#9ecae1" for k in rank])
    for r in range(R):
        side.text(min(tp[r], 1.0) + 0.02, r, f"#{rank[r] + 1}", va="center", fontsize=6)
    side.set_xlim(0, 1.25)
    side.set_title(f"p({_label(ex.target_token)!r}) at the end\n(dark: top-1, #rank)", fontsize=8)
    side.tick_params(labelsize=7)
    fig.colorbar(im, ax=[ax, side], fraction=0.03, pad=0.02, label="top-1 probability")
    return _save(fig, path, dpi=110)


def attribution_figure(ex, path: str) -> str:
    a, T = ex.attribution, len(ex.tokens)
    fig = Figure(figsize=(max(5.0, 0.55 * T + 1.5), 5.2))
    axes = fig.subplots(3, 1, sharex=True)
    series = [("integrated gradients", a.integrated_gradients), ("gradient x input", a.gradient_x_input),
              ("occlusion", a.occlusion)]
    for ax, (name, vals) in zip(axes, series):
        v = np.asarray(vals)
        ax.bar(range(T), v, color=np.where(v >= 0, "#d62728", "#1f77b4"))
        ax.axhline(0, color="#888", lw=0.6)
        ax.set_ylabel(name, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1].set_xticks(range(T), [_label(t) for t in ex.tokens], rotation=45, ha="right", fontsize=8)
    what = f"logit({ex.target_token!r})" + (f" - logit({ex.contrast_token!r})" if ex.contrast_token else "")
    axes[0].set_title(f"attribution of {what}; IG sum {sum(a.integrated_gradients):+.3f}, "
                      f"f(x) - f(baseline) {a.value - a.baseline_value:+.3f}", fontsize=9)
    return _save(fig, path, dpi=110)


def write_figures(ex, stem: str) -> list[str]:
    return [attention_figure(ex, stem + "_attention.png"), logit_lens_figure(ex, stem + "_logit_lens.png"),
            attribution_figure(ex, stem + "_attribution.png")]
