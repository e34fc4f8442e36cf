"""Forecast a training run before paying for it, and check the forecaster against published runs.

    FLOPs       C = 6 N D                                   (Chinchilla; flops.training_flops)
    GPU-hours   C / (peak x MFU) / 3600                     peak: dense bf16 of the device table
    wall days   GPU-hours / GPUs / 24
    energy      GPU-hours x board power (TDP)               as Meta's Llama 2 accounting (400 W per A100)
    CO2         energy x PUE x grid intensity
    money       GPU-hours x price per GPU-hour

The default MFU, 0.40, is what well-run A100 training reaches: Llama 2's published GPU-hours imply
0.38-0.43 and the public GPT-4 estimate 0.34 (see PUBLISHED and `validation()`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..files import atomic_write
from .devices import find_gpu
from .flops import training_flops
from .receipt import Rates

DEFAULT_MFU = 0.40
CHINCHILLA_TOKENS_PER_PARAM = 20


# Far beyond any published run (Llama 3 405B: 4e11 parameters on 1.5e13 tokens), so that a typo
# (1e200B) gets a message instead of a table of 200-digit numbers.
MAX_PARAMS, MAX_TOKENS = 1e15, 1e17


def forecast(params: float, tokens: float, gpu: str = "a100-80gb-sxm", gpus: int = 1, mfu: float = DEFAULT_MFU,
             pue: float | None = None, grid: float | None = None, price: float | None = None,
             dtype: str = "bf16", flops: float | None = None) -> dict:
    """The cost of training `params` parameters on `tokens` tokens (or `flops` FLOPs when given)."""
    if flops is None and not (0 < params < math.inf and 0 < tokens < math.inf):
        raise ValueError(f"params and tokens must be positive finite numbers, got {params:g} and {tokens:g}")
    if flops is None and (params > MAX_PARAMS or tokens > MAX_TOKENS):
        raise ValueError(f"{params:g} parameters on {tokens:g} tokens is beyond any training run "
                         f"(at most {MAX_PARAMS:g} parameters and {MAX_TOKENS:g} tokens): a typo?")
    if not 0 < mfu <= 1:
        raise ValueError(f"MFU must be in (0, 1], got {mfu}")
    if not (isinstance(gpus, int) and gpus > 0):
        raise ValueError(f"the number of GPUs must be a positive integer, got {gpus}")
    dev, rates = find_gpu(gpu), Rates.resolve(pue, grid, price)
    peak = dev.peak_flops(dtype)
    if not peak:
        raise ValueError(f"{dev.name} has no {dtype} peak in the device table")
    c = flops if flops is not None else training_flops(params, tokens)
    gpu_hours = c / (peak * mfu) / 3600
    kwh = gpu_hours * dev.watts / 1000
    price = rates.price if rates.price is not None else dev.price_per_hour
    if not math.isfinite(c * dev.watts * rates.pue * max(rates.grid, price, 1.0)):
        raise ValueError(f"{params:g} parameters x {tokens:g} tokens is too large to forecast "
                         "(the numbers overflow a float)")
    return {
        "params": params, "tokens": tokens, "gpu": dev.key, "gpu_name": dev.name, "gpus": gpus, "mfu": mfu,
        "dtype": dtype, "peak_flops_per_gpu": peak, "flops": c, "gpu_hours": gpu_hours,
        "wall_days": gpu_hours / gpus / 24, "watts_per_gpu": dev.watts, "energy_kwh": kwh, "pue": rates.pue,
        "grid_g_per_kwh": rates.grid, "tco2": kwh * rates.pue * rates.grid / 1e6,
        "price_per_gpu_hour": price, "cost_usd": gpu_hours * price,
    }


def implied_mfu(flops: float, gpu_hours: float, gpu: str, dtype: str = "bf16") -> float:
    """The MFU a published run reached: its 6ND FLOPs over what its GPU-hours could do at peak."""
    return flops / (gpu_hours * 3600 * find_gpu(gpu).peak_flops(dtype))


@dataclass(frozen=True)
class Published:
    name: str
    params: float  # N as the authors state it (total parameters)
    tokens: float  # D, tokens trained on (epochs included)
    gpu: str
    gpus: int | None
    gpu_hours: float  # published, or GPUs x published wall time
    tco2: float | None  # published CO2, tonnes
    source: str
    flops: float | None = None  # for runs known by their compute rather than N and D

    @property
    def compute(self) -> float:
        return self.flops if self.flops is not None else training_flops(self.params, self.tokens)


# Llama 2's GPU-hours and tCO2eq are Table 2 of Touvron et al. 2023 (arXiv:2307.09288), 2.0T
# tokens each, A100-80GB at 400 W; its parameter counts are the released checkpoints'.
_LLAMA2 = "Touvron et al. 2023, Llama 2, Table 2 (A100-80GB, 400 W, 2.0T tokens)"
PUBLISHED = [
    Published("Phi-2", 2.7e9, 1.4e12, "a100-80gb-sxm", 96, 96 * 14 * 24, None,
              "Microsoft Research blog, Phi-2 (Dec 2023): 2.7B, 1.4T tokens, 96 A100 GPUs for 14 days"),
    Published("Llama 2 7B", 6.74e9, 2.0e12, "a100-80gb-sxm", None, 184_320, 31.22, _LLAMA2),
    Published("Llama 2 13B", 13.0e9, 2.0e12, "a100-80gb-sxm", None, 368_640, 62.44, _LLAMA2),
    Published("Llama 2 70B", 69.0e9, 2.0e12, "a100-80gb-sxm", None, 1_720_320, 291.42, _LLAMA2),
    Published("Phi-1", 1.3e9, 51e9, "a100-80gb-sxm", 8, 8 * 4 * 24, None,
              "Gunasekar et al. 2023 (arXiv:2306.11644): 1.3B, 8 A100s for 4 days; phi-1-base saw 51B tokens "
              "(about 8 epochs of 7B) in 770 GPU-hours (Fig. 2.1); the A100 variant is not stated"),
    Published("llm.c GPT-2 124M", 124e6, 10e9, "a100-80gb-sxm", 8, 8 * 1.5, None,
              "Karpathy, llm.c discussion #481 (May 2024): GPT-2 124M on 10B FineWeb tokens, ~90 minutes on "
              "one 8X A100 80GB SXM node, 'up to ~60% MFU'"),
    Published("GPT-4 (estimate)", 0, 0, "a100-80gb-sxm", 25_000, 25_000 * 95 * 24, None,
              "SemiAnalysis (Jul 2023), public estimate: ~2.15e25 FLOPs on ~25,000 A100s for 90-100 days "
              "(95 used), MFU 32-36%", flops=2.15e25),
]

# Meta's CO2 accounting: tCO2eq / (GPU-hours x 400 W) is the same for 7B, 13B and 70B: PUE x
# grid = 423.4 g/kWh (the paper folds PUE into the power; 100% of it was offset).
LLAMA2_G_PER_KWH = 31.22e6 / (184_320 * 0.4)

# The tolerances the validation promises (and tests/footprint/test_footprint.py checks) for a forecast
# at the default MFU: Llama 2 within 10%, every run within 60% (Phi-2 reports 62% MFU).
TOLERANCE = {"Llama 2 7B": 0.10, "Llama 2 13B": 0.10, "Llama 2 70B": 0.10}
TOLERANCE_ALL = 0.60


def validation(mfu: float = DEFAULT_MFU) -> list[dict]:
    """Each published run: its implied MFU, and the error of a forecast made at `mfu` (GPU-hours,
    and CO2 at Meta's 400 W and 423.4 g/kWh where the authors published it)."""
    rows = []
    for p in PUBLISHED:
        f = forecast(p.params, p.tokens, p.gpu, p.gpus or 1, mfu, pue=1.0, grid=LLAMA2_G_PER_KWH,
                     flops=p.flops)
        row = {"name": p.name, "params": p.params, "tokens": p.tokens, "flops": p.compute, "gpu": p.gpu,
               "gpus": p.gpus, "published_gpu_hours": p.gpu_hours, "implied_mfu": implied_mfu(p.compute, p.gpu_hours, p.gpu),
               "forecast_gpu_hours": f["gpu_hours"], "gpu_hours_error": f["gpu_hours"] / p.gpu_hours - 1,
               "published_tco2": p.tco2, "forecast_tco2": f["tco2"] if p.tco2 is not None else None,
               "tco2_error": f["tco2"] / p.tco2 - 1 if p.tco2 is not None else None,
               "tolerance": TOLERANCE.get(p.name, TOLERANCE_ALL), "source": p.source}
        if p.gpus:
            row["published_days"] = p.gpu_hours / p.gpus / 24
            row["forecast_days"] = f["wall_days"]
        rows.append(row)
    return rows


def validation_markdown(mfu: float = DEFAULT_MFU) -> str:
    """The validation table as it appears in the README."""
    out = ["| run | N | D (tokens) | 6ND FLOPs | published A100-hours | implied MFU | "
           f"forecast at MFU {mfu:.2f} | error | published tCO2 | forecast tCO2 | error |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in validation(mfu):
        n = f"{r['params'] / 1e9:.3g}B" if r["params"] else "-"
        d = f"{r['tokens'] / 1e9:,.0f}B" if r["tokens"] else "-"
        co2 = (f"{r['published_tco2']:.2f} | {r['forecast_tco2']:.2f} | {r['tco2_error']:+.1%}"
               if r["published_tco2"] is not None else "- | - | -")
        out.append(f"| {r['name']} | {n} | {d} | {r['flops']:.3g} | {r['published_gpu_hours']:,.0f} | "
                   f"{r['implied_mfu']:.1%} | {r['forecast_gpu_hours']:,.0f} | {r['gpu_hours_error']:+.1%} | {co2} |")
    return "\n".join(out)


def compare_chart(receipts: list[dict], out: str, rates: Rates | None = None) -> list[dict]:
    """One PNG, three log-scale panels (device-hours, energy kWh, tCO2): the published runs
    (energy at 400 W per A100, CO2 as published or at the given PUE and grid) and the receipts.
    Returns the plotted rows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = rates or Rates.resolve()
    rows = []
    for p in PUBLISHED:
        kwh = p.gpu_hours * find_gpu(p.gpu).watts / 1000
        tco2 = p.tco2 if p.tco2 is not None else kwh * rates.pue * rates.grid / 1e6
        rows.append({"name": p.name, "hours": p.gpu_hours, "kwh": kwh, "tco2": tco2, "mine": False})
    for r in receipts:
        label = f"you: {r['verb']} {((r.get('model') or {}).get('name') or '')}".strip()
        rows.append({"name": f"{label} ({r['started'][:10]})", "hours": r["device_hours"],
                     "kwh": r["energy"]["kwh"], "tco2": r["co2_g"] / 1e6, "mine": True})
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.42 * len(rows) + 1.6), sharey=True)
    y = list(range(len(rows)))[::-1]
    colors = ["#d95f02" if r["mine"] else "#1b9e77" for r in rows]
    titles = [("hours", "device-hours (GPU-hours; CPU runs: machine-hours)"), ("kwh", "energy (kWh)"),
              ("tco2", "CO2 (tonnes)")]
    for ax, (key, title) in zip(axes, titles):
        vals = [max(r[key], 1e-12) for r in rows]
        ax.barh(y, vals, color=colors)
        ax.set_xscale("log")
        ax.set_title(title)
        ax.grid(axis="x", which="major", alpha=0.3)
        for yi, v in zip(y, vals):
            ax.text(v, yi, f" {v:.3g}", va="center", fontsize=7)
        ax.set_xlim(min(vals) / 3, max(vals) * 30)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels([r["name"] for r in rows])
    fig.suptitle(f"Published training runs (green: energy at 400 W per A100; CO2 as published for Llama 2, else at "
                 f"PUE {rates.pue:g} x {rates.grid:g} g/kWh) and your receipts (orange)")
    fig.tight_layout()
    with atomic_write(out, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return rows
