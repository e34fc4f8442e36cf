"""`slm explain`: one forward pass with the activation cache, the logit lens and three attributions
of the next token, written as one self-contained HTML page (inline CSS and JS, data inline, no
external URL; a Content-Security-Policy forbids any fetch) and PNG figures beside it."""

from __future__ import annotations

import base64
import html
import json
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from ..files import atomic_write, output_file
from ..runtime.lm import load
from ..runtime.tokenizer import check_text

from .attribution import DEFAULT_STEPS, DEFAULT_TOLERANCE, Attribution, attribute
from .capture import model_of, run_with_cache
from .lens import LogitLens, logit_lens

MAX_TOKENS = 128  # heatmaps of longer prompts stop being readable (and reports stop being small)


@dataclass
class Explanation:
    model_name: str
    prompt: str
    ids: list[int]
    tokens: list[str]  # each id decoded on its own
    layers: list[int]  # layers whose attention is shown
    layer_kinds: list[str]  # per shown layer: "global" or "sliding N"
    patterns: dict[int, np.ndarray]  # layer -> [head, query, key] of the one sequence
    lens: LogitLens
    lens_tokens: list[list[list[str]]]  # [row][pos][k] decoded top-k tokens
    prediction: list[tuple[str, float]]  # the model's top-k next tokens at the last position
    attribution: Attribution
    target_token: str
    contrast_token: str | None
    baseline_token: str | None  # None: the zero baseline
    files: list[str] = field(default_factory=list)


def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    """"0,3,10-17" (negative numbers count from the end) -> sorted layer indices; None: all."""
    if spec is None or spec.strip() in ("", "all"):
        return list(range(num_layers))
    out = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if m:
            rng = range(int(m[1]), int(m[2]) + 1)
        elif re.fullmatch(r"-?\d+", part):
            n = int(part)
            rng = [n + num_layers if n < 0 else n]
        else:
            raise ValueError(f"--layers: cannot read {part!r}; use e.g. 0,3,10-17 or -1")
        for i in rng:
            if not 0 <= i < num_layers:
                raise ValueError(f"--layers: layer {i} does not exist (the model has layers 0..{num_layers - 1})")
            out.add(i)
    if not out:
        raise ValueError("--layers selects no layer")
    return sorted(out)


def _token_id(tok, text_or_id, what: str) -> int:
    if isinstance(text_or_id, int):
        return text_or_id
    ids = tok.encode(text_or_id, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [tok.decode([i], skip_special_tokens=False) for i in ids]
        raise ValueError(f"{what} {text_or_id!r} is {len(ids)} tokens {pieces}, not one "
                         "(mind the leading space: ' Paris' and 'Paris' are different tokens)")
    return ids[0]


def _baseline_id(tok, model) -> int:
    """The baseline token of "pad": the padding token, else <unk>, else end-of-text; the first of
    them whose embedding is not all zeros (a padding_idx row is, and a path from zero embeddings
    through stacked RMSNorms changes on every scale from 1e-8 up: see attribution.py)."""
    for cand in (model.config.pad_token_id, tok.pad_token and tok.token_id(tok.pad_token),
                 tok.token_id("<unk>"), tok.eos_id):
        if cand is not None and 0 <= cand < model.config.vocab_size and \
                bool(model.embed(torch.tensor([cand], device=model.device)).any()):
            return int(cand)
    raise ValueError("no pad, <unk> or end-of-text token with a non-zero embedding for the baseline; "
                     "pass --baseline zeros or a token")


def explain(lm, prompt: str, target=None, contrast=None, layers: str | list[int] | None = None, top_k: int = 5,
            steps: int = DEFAULT_STEPS, baseline="pad", progress: bool = False, model_name: str = "model",
            tolerance: float = DEFAULT_TOLERANCE) -> Explanation:
    """Everything the report shows. target/contrast: token text (one token) or id; default target:
    the model's own top-1 next token. baseline: "pad", "zeros", or a token (text or id)."""
    model, tok = model_of(lm), getattr(lm, "tokenizer", None)
    if tok is None:
        raise ValueError("explain needs a model with a tokenizer")
    if not prompt:
        raise ValueError("the prompt is empty")
    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    ids = tok.encode(prompt)
    if len(ids) > MAX_TOKENS:
        raise ValueError(f"the prompt is {len(ids)} tokens; explain reads prompts up to {MAX_TOKENS} tokens")
    cfg = model.config
    layers = layers if isinstance(layers, list) else parse_layers(layers, cfg.num_layers)
    shown = {f"blocks.{i}.attn.pattern" for i in layers}
    names = lambda n: n in shown or n.endswith((".resid_pre", ".resid_post"))  # noqa: E731
    logits, cache = run_with_cache(model, ids, names)
    probs = logits[0, -1].float().softmax(-1)
    target_id = int(probs.argmax()) if target is None else _token_id(tok, target, "--target")
    contrast_id = None if contrast is None else _token_id(tok, contrast, "--contrast")
    base = baseline
    if baseline == "pad":
        base = _baseline_id(tok, model)
    elif baseline != "zeros":
        base = _token_id(tok, baseline, "--baseline")
    dec = lambda i: tok.decode([int(i)], skip_special_tokens=False)  # noqa: E731
    lens = logit_lens(model, cache, top_k, target_id)
    attr = attribute(model, ids, target_id, contrast_id, steps=steps, baseline=base, progress=progress,
                     occlusion_token=base if base != "zeros" else _baseline_id(tok, model), tolerance=tolerance)
    top = probs.topk(min(top_k, probs.numel()))
    kinds = [f"sliding {cfg.layer_window(i)}" if cfg.layer_window(i) else "global" for i in layers]
    return Explanation(
        model_name=model_name, prompt=prompt, ids=ids, tokens=[dec(i) for i in ids], layers=layers, layer_kinds=kinds,
        patterns={i: cache["attn.pattern", i][0].float().cpu().numpy() for i in layers},
        lens=lens, lens_tokens=[[[dec(i) for i in pos] for pos in row] for row in lens.top_ids.tolist()],
        prediction=[(dec(i), float(p)) for i, p in zip(top.indices, top.values)],
        attribution=attr, target_token=dec(target_id), contrast_token=None if contrast_id is None else dec(contrast_id),
        baseline_token=None if base == "zeros" else dec(base))


# -- HTML --------------------------------------------------------------------------------------
def _show(token: str) -> str:
    """A token as text that keeps its whitespace visible."""
    return token.replace("\n", "\u21b5").replace("\t", "\u21e5").replace("\r", "")


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def _blue(p: float) -> str:
    p = max(0.0, min(1.0, p))
    r, g, b = (int(255 + (c - 255) * p) for c in (8, 81, 156))
    return f"rgb({r},{g},{b})"


def _diverging(v: float, scale: float) -> str:
    a = 0.0 if scale == 0 else max(-1.0, min(1.0, v / scale))
    return f"rgba(214,39,40,{a:.3f})" if a >= 0 else f"rgba(31,119,180,{-a:.3f})"


def _lens_table(ex: Explanation) -> str:
    lens, T = ex.lens, len(ex.tokens)
    head = "".join(f"<th class=tok>{_e(_show(t))}</th>" for t in ex.tokens)
    rows = [f"<tr><th>layer</th>{head}<th>p({_e(_show(ex.target_token))}) at the end</th><th>rank</th></tr>"]
    for r in range(len(lens.labels)):
        cells = []
        for t in range(T):
            p = float(lens.top_probs[r, t, 0])
            tip = "\n".join(f"{_show(s)!r} {float(q):.3f}" for s, q in zip(ex.lens_tokens[r][t], lens.top_probs[r, t]))
            fg = "#fff" if p > 0.55 else "#000"
            cells.append(f'<td class=tok style="background:{_blue(p)};color:{fg}" title="{_e(tip)}">'
                         f"{_e(_show(ex.lens_tokens[r][t][0]))}</td>")
        tp, rank = float(lens.target_probs[r, -1]), int(lens.target_ranks[r, -1])
        label = "embed" if r == 0 else f"after {lens.labels[r]}"
        cls = ' class="hit"' if rank == 0 else ""
        rows.append(f"<tr><th>{label}</th>{''.join(cells)}<td style=\"background:{_blue(tp)}\">{tp:.3f}</td>"
                    f"<td{cls}>{rank + 1}</td></tr>")
    return "<table class=lens>" + "\n".join(rows) + "</table>"


def _attribution_rows(ex: Explanation) -> str:
    a = ex.attribution
    out = []
    for name, vals in (("integrated gradients", a.integrated_gradients), ("gradient x input", a.gradient_x_input),
                       ("occlusion", a.occlusion)):
        scale = max((abs(v) for v in vals), default=0.0)
        spans = "".join(f'<span class=tok style="background:{_diverging(v, scale)}" title="{v:+.4f}">'
                        f"{_e(_show(t))}</span>" for t, v in zip(ex.tokens, vals))
        out.append(f"<tr><th>{name}</th><td class=attr>{spans}</td></tr>")
        out.append("<tr><td></td><td class=vals>" + " ".join(f"{v:+.3f}" for v in vals) + "</td></tr>")
    return "<table>" + "\n".join(out) + "</table>"


def _patterns_payload(ex: Explanation) -> dict:
    """Attention patterns as base64 bytes (probability x 255): a quarter of the size of JSON floats."""
    return {"tokens": [_show(t) for t in ex.tokens], "layers": ex.layers, "kinds": ex.layer_kinds,
            "heads": int(next(iter(ex.patterns.values())).shape[0]),
            "data": {str(i): base64.b64encode(np.rint(p * 255).astype(np.uint8).tobytes()).decode()
                     for i, p in ex.patterns.items()}}


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:20px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.tok{white-space:pre;font-family:ui-monospace,monospace;font-size:12px}
table{border-collapse:collapse}td,th{padding:2px 5px;border:1px solid #eee;text-align:center}
th{background:#fafafa;font-weight:600}table.lens td.tok{min-width:40px}
td.hit{font-weight:700;color:#08519c}.attr span{padding:2px 1px;margin:0 1px;border-radius:3px;line-height:2}
.vals{font-family:ui-monospace,monospace;font-size:11px;color:#666;text-align:left}.attr{text-align:left}
#attention{display:flex;flex-wrap:wrap;gap:14px 28px}.heads{display:flex;gap:6px}
.hm{font-size:11px;color:#555}.hm canvas{display:block;border:1px solid #ccc;image-rendering:pixelated}
.layerlabel{font-size:12px;font-weight:600;margin-bottom:2px}
#tip{position:fixed;pointer-events:none;background:#333;color:#fff;padding:3px 6px;border-radius:3px;
font-size:12px;display:none;white-space:pre}.note{color:#666;font-size:12px}
.warn{background:#fde0dd;border:1px solid #c51b8a;padding:6px 10px;color:#67001f}
"""

JS = """
const P = JSON.parse(document.getElementById('patterns').textContent);
const T = P.tokens.length, grid = document.getElementById('attention'), tip = document.getElementById('tip');
const cell = Math.max(2, Math.min(14, Math.floor(140 / T)));
function color(v) {  // white -> dark blue, as the logit-lens table
  return [255 + (8 - 255) * v, 255 + (81 - 255) * v, 255 + (156 - 255) * v].map(Math.round);
}
P.layers.forEach((layer, li) => {
  const bytes = Uint8Array.from(atob(P.data[layer]), c => c.charCodeAt(0));
  const card = document.createElement('div'), label = document.createElement('div'), heads = document.createElement('div');
  label.className = 'layerlabel'; label.textContent = 'layer ' + layer + ' (' + P.kinds[li] + ')';
  heads.className = 'heads'; card.appendChild(label); card.appendChild(heads); grid.appendChild(card);
  for (let h = 0; h < P.heads; h++) {
    const box = document.createElement('div'); box.className = 'hm';
    const c = document.createElement('canvas'); c.width = T * cell; c.height = T * cell;
    c.className = 'heatmap'; c.dataset.layer = layer; c.dataset.head = h;
    const ctx = c.getContext('2d'), img = ctx.createImageData(c.width, c.height);
    for (let y = 0; y < c.height; y++) for (let x = 0; x < c.width; x++) {
      const v = bytes[(h * T + Math.floor(y / cell)) * T + Math.floor(x / cell)] / 255, rgb = color(v);
      const o = 4 * (y * c.width + x); img.data[o] = rgb[0]; img.data[o + 1] = rgb[1]; img.data[o + 2] = rgb[2];
      img.data[o + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    c.addEventListener('mousemove', e => {
      const r = c.getBoundingClientRect(), q = Math.floor((e.clientY - r.top) / cell), k = Math.floor((e.clientX - r.left) / cell);
      if (q < 0 || q >= T || k < 0 || k >= T) return;
      const v = bytes[(h * T + q) * T + k] / 255;
      tip.textContent = 'layer ' + layer + ' head ' + h + '\\n' + JSON.stringify(P.tokens[q]) + ' -> ' +
        JSON.stringify(P.tokens[k]) + '  ' + v.toFixed(3);
      tip.style.left = (e.clientX + 12) + 'px'; tip.style.top = (e.clientY + 12) + 'px'; tip.style.display = 'block';
    });
    c.addEventListener('mouseleave', () => { tip.style.display = 'none'; });
    const cap = document.createElement('div'); cap.textContent = 'head ' + h;
    box.appendChild(cap); box.appendChild(c); heads.appendChild(box);
  }
});
document.body.dataset.rendered = 'yes';
"""


def _gap_warning(a: Attribution) -> str:
    if a.complete:
        return ""
    return (f'<p class=warn><b>Warning</b>: the completeness gap of integrated gradients is {a.relative_gap:.2%} '
            f"of f(x) - f(baseline), over the {a.tolerance * 100:g}% tolerance: they are not a reliable split of it. "
            "Run again with more --steps.</p>")


def render_html(ex: Explanation) -> str:
    a = ex.attribution
    target = _e(repr(ex.target_token)) + (f" minus {_e(repr(ex.contrast_token))}" if ex.contrast_token else "")
    f_name = "logit difference" if ex.contrast_token else "logit"
    pred = ", ".join(f"{_e(repr(t))} {p:.3f}" for t, p in ex.prediction)
    baseline = "zeros" if ex.baseline_token is None else f"the embedding of {_e(repr(ex.baseline_token))}"
    payload = json.dumps(_patterns_payload(ex), separators=(",", ":")).replace("</", "<\\/")
    figs = "".join(f"<li>{_e(os.path.basename(f))}</li>" for f in ex.files)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<title>slm explain: {_e(ex.prompt[:60])}</title><style>{CSS}</style></head>
<body>
<h1>slm explain</h1>
<p><b>model</b> {_e(ex.model_name)} &nbsp; <b>prompt</b> <span class=tok>{_e(ex.prompt)}</span> ({len(ex.ids)} tokens)</p>
<p><b>next token</b> (top {len(ex.prediction)}): {pred}</p>
<p><b>explained</b>: the {f_name} of {target} at the last position</p>

<h2>Attention patterns</h2>
<p class=note>Each square: one head; row = query token, column = key token it attends to (post-softmax,
causal and sliding-window masks applied). Darker = more attention. Hover for values. Tokens: <span class=tok>{
_e(" | ".join(_show(t) for t in ex.tokens))}</span></p>
<div id="attention"></div>

<h2>Logit lens</h2>
<p class=note>The top next token read from the residual stream after each layer (final norm and LM head
applied to it), per position; colour = its probability; hover for the top {ex.lens.top_ids.shape[-1]}.
The last two columns follow {_e(repr(ex.target_token))} at the last position (rank 1 = top).</p>
{_lens_table(ex)}

<h2>Attribution of {target}</h2>
<p class=note>Red raises the {f_name}, blue lowers it; each row scaled to its largest magnitude.
Integrated gradients: {a.steps} steps ({a.rule} rule), baseline {baseline}; sum {sum(a.integrated_gradients):+.4f}
vs f(x) - f(baseline) = {a.value:+.4f} - ({a.baseline_value:+.4f}) = {a.value - a.baseline_value:+.4f}
(completeness gap {a.completeness_gap:+.2e}, {a.relative_gap:.2%} of it; tolerance {a.tolerance * 100:g}%).
Occlusion: the drop of the {f_name} when the token is replaced by
{_e(repr(ex.baseline_token)) if ex.baseline_token else "the baseline token"}.
{"Position 0 (BOS) is held fixed." if a.fixed == [0] else ""}</p>
{_gap_warning(a)}
{_attribution_rows(ex)}
{"<h2>Figures</h2><ul>" + figs + "</ul>" if figs else ""}
<div id="tip"></div>
<script type="application/json" id="patterns">{payload}</script>
<script>{JS}</script>
</body></html>
"""


def _atomic_write(path: str, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def _check_out(out: str) -> None:
    if not out.endswith((".html", ".htm")):
        raise ValueError(f"--out {out!r} should end in .html")
    output_file(out)
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--out: the folder {folder} does not exist")


def write_report(ex: Explanation, out: str, figures: bool = True) -> list[str]:
    """Write the HTML report to `out` and, with figures, `<stem>_attention.png`, `_logit_lens.png`
    and `_attribution.png` beside it. Returns the paths written."""
    _check_out(out)
    paths = []
    if figures:
        from .figures import write_figures
        paths = write_figures(ex, os.path.splitext(out)[0])
    ex.files = paths
    _atomic_write(out, render_html(ex).encode("utf-8"))
    return [out] + paths


def explain_cli(model: str | None, prompt: str, out: str, target=None, contrast=None, layers=None, top_k=5,
                steps=DEFAULT_STEPS, baseline="pad", figures: bool = True,
                tolerance: float = DEFAULT_TOLERANCE) -> tuple[list[str], Explanation]:
    """Load, explain, write the report: (the paths written, the explanation)."""
    _check_out(out)  # before minutes of work
    check_text(prompt, "--prompt")
    for name, value in (("--target", target), ("--contrast", contrast)):
        if value is not None:
            check_text(value, name)
    # fp32, dequantized: attribution takes gradients, and a model that keeps a GGUF's quantized
    # blocks quantizes its activations to int8 in the forward pass, which makes f piecewise
    # constant in the embeddings (its gradient is not the derivative of what it computes)
    lm = load(model, dtype="fp32")
    name = os.path.basename(os.path.normpath(model)) if model else "gemma-3-270m"
    ex = explain(lm, prompt, target, contrast, layers, top_k, steps, baseline, progress=True, model_name=name,
                 tolerance=tolerance)
    return write_report(ex, out, figures), ex
