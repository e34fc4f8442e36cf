"""slm bench, cost, eval, explain: measuring models and runs."""

from __future__ import annotations

import json
import os
import sys

from ..files import output_file
from .flags import at_least, check_load_flags, load_flags, model_flag, quantize_options, receipt_flag


def bench_flags(p) -> None:
    p.add_argument("--preset", required=True, help="a registry architecture (see `slm info`)")
    p.add_argument("--random-weights", action="store_true", required=True,
                   help="random weights, created (and quantized) one layer at a time")
    quantize_options(p)
    p.add_argument("--new-tokens", type=at_least(1), default=32, help="tokens decoded for the timing")
    p.add_argument("--threads", type=at_least(1), default=None, help="torch threads (default: torch's)")


def bench(a) -> None:
    from ..bench import run
    r = run(a.preset, a.quantize, a.group_size, a.new_tokens, a.threads)
    print(json.dumps(r, indent=2))


def cost_flags(p) -> None:
    p.add_argument("--params", help="parameters N (2.7e9, 2.7B, 124M)")
    p.add_argument("--preset", help="take N from a registry model (its matmul weights, LM head included)")
    p.add_argument("--tokens", help="training tokens D (1.4T, 2e12), or 'chinchilla' for 20 per parameter")
    p.add_argument("--gpu", default="a100-80gb-sxm", help="a100-40gb-sxm, a100-80gb-sxm, a100-40gb-pcie, "
                   "a100-80gb-pcie, h100-sxm, h100-pcie, h200, l4, t4, rtx-4090 (looser names work: 'H100 PCIe')")
    p.add_argument("--gpus", type=at_least(1), default=1, help="GPUs training together")
    p.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation")
    p.add_argument("--pue", type=float, default=None, help="data-centre overhead (default 1.0 or $SLM_PUE)")
    p.add_argument("--grid", type=float, default=None, help="g CO2 per kWh (default 475, world average, or $SLM_GRID_G_PER_KWH)")
    p.add_argument("--price", type=float, default=None, help="USD per GPU-hour (default: the device table's)")
    p.add_argument("--json", action="store_true", help="print the forecast as JSON")
    p.add_argument("--compare", action="store_true", help="chart published runs and your receipts (--out PNG)")
    p.add_argument("--receipts", default=None, help="folder of receipts for --compare (default: ~/.cache/slm/receipts)")
    p.add_argument("--out", default="cost_compare.png", help="--compare: the PNG to write")
    p.add_argument("--validate", action="store_true", help="print the forecaster's validation table")


def _count(text: str) -> float:
    """A count such as 2.7e9, 2.7B, 124M or 1.4T."""
    units = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    t = text.strip().upper().replace(",", "").replace("_", "")
    try:
        n = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise ValueError(f"not a count: {text!r} (use e.g. 2.7e9, 2.7B, 124M, 1.4T)") from None
    if not 0 < n < float("inf"):
        raise ValueError(f"a count must be positive and finite, got {text!r}")
    return n


def cost(a) -> None:
    from ..footprint.forecast import (
        CHINCHILLA_TOKENS_PER_PARAM,
        compare_chart,
        forecast,
        validation_markdown,
    )
    from ..footprint.receipt import Rates, load_receipts, receipts_dir
    if a.validate:
        print(validation_markdown(a.mfu))
        return
    if a.compare:
        output_file(a.out)
        folder = a.receipts or receipts_dir()
        receipts = load_receipts(folder) if a.receipts or os.path.isdir(folder) else []
        rows = compare_chart(receipts, a.out, Rates.resolve(a.pue, a.grid))
        print(f"wrote {a.out}: {len(rows) - len(receipts)} published runs and {len(receipts)} receipts from {folder}")
        return
    if a.preset:
        from ..footprint.flops import matmul_params
        from ..model.config import get_config
        params = matmul_params(get_config(a.preset))
    elif a.params:
        params = _count(a.params)
    else:
        raise ValueError("give --params N or --preset NAME (or --compare, --validate)")
    if a.tokens is None:
        raise ValueError("give --tokens D (a count, or 'chinchilla' for 20 tokens per parameter)")
    tokens = CHINCHILLA_TOKENS_PER_PARAM * params if a.tokens.lower() == "chinchilla" else _count(a.tokens)
    r = forecast(params, tokens, a.gpu, a.gpus, a.mfu, a.pue, a.grid, a.price)
    if a.json:
        print(json.dumps(r, indent=2, allow_nan=False))
        return
    rows = [("parameters (N)", f"{params:,.0f}" + (f" ({a.preset}: matmul weights incl. LM head)" if a.preset else "")),
            ("tokens (D)", f"{tokens:,.0f}" + (" (Chinchilla: 20 per parameter)" if a.tokens.lower() == "chinchilla" else "")),
            ("FLOPs (6ND)", f"{r['flops']:.3g}"),
            ("hardware", f"{a.gpus} x {r['gpu_name']} at MFU {r['mfu']:.0%} of {r['peak_flops_per_gpu'] / 1e12:g} "
                         f"TFLOP/s {r['dtype']}"),
            ("GPU-hours", f"{r['gpu_hours']:,.4g}"), ("wall time", f"{r['wall_days']:,.4g} days"),
            ("energy", f"{r['energy_kwh']:,.4g} kWh ({r['watts_per_gpu']:g} W per GPU)"),
            ("CO2", f"{r['tco2']:,.4g} t (PUE {r['pue']:g} x {r['grid_g_per_kwh']:g} g/kWh)"),
            ("cost", f"${r['cost_usd']:,.2f} (${r['price_per_gpu_hour']:g} per GPU-hour)")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def eval_flags(p) -> None:
    model_flag(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--text", help="a UTF-8 text file: rolling-window perplexity (token, word, byte; bits per byte)")
    g.add_argument("--task", help="FILE.jsonl in the layout of --task-format, or 'builtin' (common-sense probes)")
    p.add_argument("--task-format", default=None, help="hellaswag | piqa | arc | winogrande (for a --task file)")
    p.add_argument("--num-fewshot", type=at_least(0), default=0, help="examples drawn from the same file (seeded)")
    p.add_argument("--limit", type=at_least(1), default=None, help="score only the first N items (default: all)")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="sequences per forward pass")
    p.add_argument("--max-length", type=at_least(2), default=None, help="context in tokens (default: the model's)")
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed (lm-eval's default 1234)")
    p.add_argument("--no-bos", action="store_true",
                   help="encode tasks without the tokenizer's BOS (lm-eval's default for non-Gemma HF models)")
    p.add_argument("--output", default=None, help="write the results (per-item log-likelihoods) as JSON")
    receipt_flag(p)
    load_flags(p)


def eval(a) -> None:
    from .. import load
    from ..eval import (
        evaluate,
        format_table,
        load_task,
        perplexity,
        read_text,
        write_json,
    )
    # Read the inputs and check the output path before the model, so a bad file fails at once.
    if a.output:
        output_file(a.output, "--output")
    check_load_flags(a)
    text = read_text(a.text) if a.text else None
    docs = load_task(a.task, a.task_format) if a.task else None
    from ..footprint import track
    with track("eval", path=a.receipt, device=a.device) as receipt:
        lm = load(a.model, dtype=a.dtype, device=a.device, quantize=a.quantize, group_size=a.group_size,
                  tokenizer=a.tokenizer)
        receipt.watch(lm)
        if text is not None:
            r = {"text": a.text, **perplexity(lm, text, max_length=a.max_length, batch_size=a.batch_size)}
        else:
            r = evaluate(lm, docs, a.task_format, num_fewshot=a.num_fewshot, limit=a.limit, batch_size=a.batch_size,
                         seed=a.seed, max_length=a.max_length, add_bos=not a.no_bos)
            r["task"], r["format"] = a.task, "builtin" if a.task == "builtin" else a.task_format
    r["model"] = a.model
    print(format_table(r))
    if a.output:
        write_json(a.output, r)
        print(f"wrote {a.output}", file=sys.stderr)


def explain_flags(p) -> None:
    model_flag(p)
    p.add_argument("--prompt", required=True, help="the text whose next token is explained")
    p.add_argument("--out", required=True, help="report.html; PNG figures are written beside it")
    p.add_argument("--target", default=None, help="the next token to explain, as text (default: the top prediction)")
    p.add_argument("--contrast", default=None, help="explain logit(target) - logit(contrast) instead (default: none)")
    p.add_argument("--layers", default=None, help="layers whose attention is shown, e.g. 0,5,10-17 (default: all)")
    p.add_argument("--top-k", type=at_least(1), default=5, help="tokens listed per layer and position by the logit lens")
    p.add_argument("--steps", type=at_least(1), default=None,
                   help="integrated-gradients gradient evaluations at most (default: 512; adaptive, it stops once within half the tolerance)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="completeness gap allowed, as a fraction of |f(x) - f(baseline)| (default: 0.01)")
    p.add_argument("--baseline", default="pad", help="integrated-gradients baseline: pad (default), zeros, or a token")
    p.add_argument("--no-figures", action="store_true", help="only the HTML report, no PNG figures")


def explain(a) -> None:
    from ..explain.attribution import DEFAULT_STEPS, DEFAULT_TOLERANCE
    from ..explain.report import explain_cli
    tolerance = DEFAULT_TOLERANCE if a.tolerance is None else a.tolerance
    if not tolerance > 0:
        raise ValueError(f"--tolerance must be positive, got {tolerance}")
    paths, ex = explain_cli(a.model, a.prompt, a.out, target=a.target, contrast=a.contrast, layers=a.layers,
                            top_k=a.top_k, steps=a.steps or DEFAULT_STEPS, baseline=a.baseline,
                            figures=not a.no_figures, tolerance=tolerance)
    for path in paths:
        print(f"wrote {path}")
    summary, _, warning = ex.attribution.gap_summary().partition("\n")
    print(summary)
    if warning:
        print(warning, file=sys.stderr)
