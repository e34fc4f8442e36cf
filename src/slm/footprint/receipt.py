"""Receipts: what a session (train, eval, generate, serve) computed and what it cost.

    with footprint.track("eval", path="run/receipt.json", device="cpu") as r:
        r.watch(lm)                     # counts every token the model's forward passes process
        ...                             # or r.add_tokens(n, kind="trained", context=seq_len)

On leaving the block (normally or by Ctrl-C, not on an error) the receipt is written atomically
as JSON and a summary is printed: wall time, tokens, FLOPs (flops.py), FLOP/s and MFU against
the device's peak (devices.py), energy (energy.py: measured or estimated, and how), CO2 and money.

    CO2 (g) = energy (kWh) x PUE x grid intensity (g/kWh)
    money   = device-hours x price per device-hour

Defaults, each overridable by option or environment variable: PUE 1.0 (SLM_PUE: the energy the
devices draw, as measured; use 1.1 for a hyperscale data centre, 1.5-1.6 for an average one),
grid 475 g CO2/kWh (SLM_GRID_G_PER_KWH: the world average, IEA), price from the device table
(SLM_PRICE_PER_HOUR). Receipts of generate/serve/eval go to ~/.cache/slm/receipts/ unless a
path is given (SLM_RECEIPTS moves the folder), where `slm cost --compare` finds them.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

from ..files import atomic_write, output_file, read_json_object
from ..model.config import ModelConfig
from ..settings import cache_dir, env_float
from . import devices
from .energy import EnergyMeter
from .flops import attention_pricer, flops_per_token, matmul_params

DEFAULT_PUE = 1.0
DEFAULT_GRID = 475.0  # g CO2 per kWh, world average electricity (IEA)

FORMULA = ("6N + 12 L T d_attn FLOPs per trained token, 2N + 4 L T d_attn per inferred token (LM head only "
           "where applied); N = weights of the matmuls (blocks + LM head, no embedding lookup), T = context "
           "seen (at most a layer's sliding window), d_attn = heads x head_dim")


@dataclass
class Rates:
    pue: float
    grid: float  # g CO2 per kWh
    price: float | None  # USD per device-hour; None: the device table's

    @classmethod
    def resolve(cls, pue: float | None = None, grid: float | None = None, price: float | None = None) -> "Rates":
        pue = pue if pue is not None else env_float("SLM_PUE", DEFAULT_PUE)
        grid = grid if grid is not None else env_float("SLM_GRID_G_PER_KWH", DEFAULT_GRID)
        price = price if price is not None else env_float("SLM_PRICE_PER_HOUR", None)
        if not pue >= 1.0:
            raise ValueError(f"PUE must be at least 1.0, got {pue}")
        if not grid >= 0 or (price is not None and not price >= 0):
            raise ValueError("grid intensity and price must be non-negative")
        return cls(pue, grid, price)


def receipts_dir() -> str:
    return os.environ.get("SLM_RECEIPTS") or cache_dir("receipts")


def default_path(verb: str) -> str:
    return os.path.join(receipts_dir(), f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{verb}.json")


class Tracker:
    """One session's meter. `path=None` writes to the receipts folder; `merge=True` adds this
    session to a receipt already at `path` (a resumed training run) instead of replacing it."""

    def __init__(self, verb: str, path: str | None = None, model_cfg: ModelConfig | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, devices_used: int = 1,
                 processes: int = 1, pue: float | None = None, grid: float | None = None, price: float | None = None,
                 rapl_root: str | None = None, merge: bool = False, quiet: bool = False, stream=None):
        if path is not None:
            output_file(path, "--receipt")  # before the session's work, not after it
        self.verb, self.path, self.model_cfg, self.merge, self.quiet = verb, path, model_cfg, merge, quiet
        try:
            self.device = torch.device(device or "cpu")
        except RuntimeError:
            raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
        self.dtype, self.devices_used, self.processes = dtype, devices_used, processes
        self.rates = Rates.resolve(pue, grid, price)
        self.rapl_root, self.stream = rapl_root, stream
        self.tokens = {"trained": 0, "inferred": 0}
        self.flops = 0.0
        self.formula = FORMULA  # how `flops` was counted: a verb that counts its own says how
        self.meter = None
        self.receipt: dict | None = None

    # -- counting ------------------------------------------------------------------------------
    def start(self) -> "Tracker":
        self.t0, self.started = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
        gpus = []
        if self.device.type == "cuda" and torch.cuda.is_available():
            first = self.device.index or 0
            gpus = list(range(first, first + self.devices_used))
        self.gpu = devices.detect(self.device, self.dtype) if gpus else None
        self.meter = EnergyMeter(_cpu_watts(), gpus, self.gpu.watts if self.gpu else 0.0, self.rapl_root,
                                 processes=self.processes)
        return self

    def add_tokens(self, n: int, kind: str = "inferred", context: float | None = None,
                   flops: float | None = None) -> None:
        """Count n tokens trained (forward + backward) or inferred (forward) with `context`
        positions each (default: the model's full context); `flops` overrides the formula."""
        if kind not in self.tokens:
            raise ValueError(f"kind must be 'trained' or 'inferred', got {kind!r}")
        if n < 0 or (flops is not None and not flops >= 0):
            raise ValueError(f"a receipt counts non-negative tokens and FLOPs, got {n} tokens, {flops} FLOPs")
        self.tokens[kind] += int(n)
        if flops is None:
            if self.model_cfg is None:
                raise ValueError("add_tokens needs the tracker's model_cfg (or flops=)")
            ctx = context if context is not None else self.model_cfg.max_seq_len
            flops = n * flops_per_token(self.model_cfg, ctx, training=kind == "trained")
        self.flops += flops

    def watch(self, model):
        """Count the tokens of every forward pass of a Transformer (or an LM's): padding left out,
        each token charged the positions it attends to, the LM head only where it is applied
        (`last_only` prefill: once per sequence). Returns the hook's handle."""
        model = getattr(model, "model", model)
        cfg = self.model_cfg = model.config
        self.dtype = self.dtype or model.dtype
        # Once here, not per call: the hook runs before every decode step of a server.
        names = list(inspect.signature(model.forward).parameters)
        body, head = 2 * (matmul_params(cfg) - cfg.vocab_size * cfg.hidden_size), 2 * cfg.vocab_size * cfg.hidden_size
        attention = attention_pricer(cfg)

        def hook(module, args, kwargs):
            a = {**dict(zip(names, args)), **kwargs}
            ids, cache, pos, mask = a["input_ids"], a.get("cache"), a.get("pos"), a.get("attention_mask")
            B, T = ids.shape
            if pos is not None:
                n = (pos >= 0).sum(1).tolist()
                ctx = (pos.max(1).values + 1).tolist()
            else:
                n = mask.sum(1).tolist() if mask is not None else [T] * B
                ctx = [(cache.seen if cache is not None else 0) + T] * B
            for rows, c in zip(n, ctx):
                if rows <= 0:
                    continue
                heads = 0 if a.get("return_hidden") else 1 if a.get("last_only") else rows
                self.flops += rows * (body + attention(c)) + heads * head
                self.tokens["inferred"] += rows

        return model.register_forward_pre_hook(hook, with_kwargs=True)

    def so_far(self) -> dict:
        """Energy (kWh), CO2 (g) and tokens since the session started, while it runs (a server's
        /metrics): the receipt's figures before the receipt."""
        kwh = self.meter.read().kwh if self.meter is not None else 0.0
        return {"kwh": kwh, "co2_g": kwh * self.rates.pue * self.rates.grid, "tokens": dict(self.tokens),
                "flops": self.flops}

    # -- the receipt ---------------------------------------------------------------------------
    def finish(self) -> dict:
        energy = self.meter.stop()
        seconds = time.perf_counter() - self.t0
        dev = self.gpu or devices.detect(self.device, self.dtype)
        count = self.devices_used if dev.kind == "gpu" else 1
        dtype = devices._dtype_name(self.dtype) if self.dtype is not None else (
            "bf16" if dev.kind == "gpu" else "fp32")
        peak = dev.peak_flops(dtype) or (dev.peak_flops("fp32") if dev.kind == "cpu" else None)
        price = self.rates.price if self.rates.price is not None else dev.price_per_hour
        r = {
            "verb": self.verb, "started": self.started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "wall_seconds": seconds,
            "model": None if self.model_cfg is None else {
                "name": self.model_cfg.name, "params": self.model_cfg.num_params(),
                "matmul_params": matmul_params(self.model_cfg)},
            "device": {"name": dev.name, "key": dev.key, "count": count, "dtype": dtype,
                       "peak_flops_per_device": peak, "source": dev.source},
            "tokens": dict(self.tokens), "flops": self.flops, "flops_formula": self.formula,
            "energy": {"kwh": energy.kwh, "joules": energy.joules, "method": energy.method, "how": energy.how},
            "pue": self.rates.pue, "grid_g_per_kwh": self.rates.grid,
            "device_hours": seconds / 3600 * count, "price_per_device_hour": price,
        }
        if self.merge and self.path and os.path.exists(self.path):
            try:
                r = _merge(_load(self.path), r)
            except (OSError, ValueError, KeyError, TypeError):  # an unreadable earlier receipt: this session alone
                pass
        _derive(r)
        if self.path is None:
            self.path = default_path(self.verb)
        _write_json(self.path, r)
        self.receipt = r
        if not self.quiet:
            print(summary(r, self.path), file=self.stream or sys.stderr, flush=True)
        return r

    def __enter__(self) -> "Tracker":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or issubclass(exc_type, (KeyboardInterrupt, SystemExit)):  # Ctrl-C, SIGTERM
            self.finish()
        else:  # a failed session: stop sampling, write nothing
            self.meter.stop()


def track(verb: str, **kw) -> Tracker:
    """A receipt for a session: `with track("generate", path=..., device=...) as r: ...`."""
    return Tracker(verb, **kw)


def _cpu_watts() -> float:
    return env_float("SLM_CPU_WATTS_PER_CORE", devices.CPU_WATTS_PER_CORE)


def _derive(r: dict) -> None:
    """The fields that follow from the additive ones: FLOP/s, MFU, CO2 and money."""
    r["flops_per_second"] = r["flops"] / r["wall_seconds"] if r["wall_seconds"] > 0 else 0.0
    peak, count = r["device"]["peak_flops_per_device"], r["device"]["count"]
    r["mfu"] = r["flops_per_second"] / (peak * count) if peak else None
    r.pop("mfu_impossible", None)
    if r["mfu"] is not None and r["mfu"] > 1:
        # No device computes faster than its peak: the tokens or FLOPs counted are more than
        # were computed (or the peak is understated). Said in the receipt and its summary.
        r["mfu_impossible"] = (f"MFU {r['mfu']:.0%} is above the {r['device']['name']}'s peak: the receipt counts "
                               "more tokens or FLOPs than were computed (a bug in slm), or the peak is understated")
    r["co2_g"] = r["energy"]["kwh"] * r["pue"] * r["grid_g_per_kwh"]
    r["cost_usd"] = r["device_hours"] * r["price_per_device_hour"]


def _merge(prev: dict, cur: dict) -> dict:
    """A resumed run: totals over the sessions, each session kept under "sessions"."""
    sessions = prev.get("sessions") or [{k: v for k, v in prev.items() if k != "sessions"}]
    sessions = sessions + [dict(cur)]
    total = dict(cur)
    total["started"] = sessions[0]["started"]
    total["wall_seconds"] = sum(s["wall_seconds"] for s in sessions)
    total["tokens"] = {k: sum(s["tokens"].get(k, 0) for s in sessions) for k in cur["tokens"]}
    total["flops"] = sum(s["flops"] for s in sessions)
    total["device_hours"] = sum(s["device_hours"] for s in sessions)
    methods = {s["energy"]["method"] for s in sessions}
    joules = sum(s["energy"]["joules"] for s in sessions)
    total["energy"] = {"kwh": joules / 3.6e6, "joules": joules,
                       "method": methods.pop() if len(methods) == 1 else "mixed",
                       "how": f"sum of {len(sessions)} sessions; the last: {cur['energy']['how']}"}
    # CO2 and money of each session at its own rates
    for s in sessions:
        _derive(s)
    total["sessions"] = sessions
    _derive(total)
    total["co2_g"] = sum(s["co2_g"] for s in sessions)
    total["cost_usd"] = sum(s["cost_usd"] for s in sessions)
    return total


def _load(path: str) -> dict:
    return read_json_object(path)


def _write_json(path: str, obj: dict) -> None:
    with atomic_write(path, flag="--receipt") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _si(x: float) -> str:
    return f"{x:.3g}"


def summary(r: dict, path: str | None = None) -> str:
    t, e, d = r["tokens"], r["energy"], r["device"]
    toks = " + ".join(f"{v:,} {k}" for k, v in t.items() if v) or "0"
    mfu = f", MFU {r['mfu']:.1%} of {d['count']} x {_si(d['peak_flops_per_device'])} {d['dtype']} peak" \
        if r["mfu"] is not None else ""
    lines = [
        f"receipt ({r['verb']}): {r['wall_seconds']:.1f} s on {d['count']} x {d['name']}; tokens {toks}; "
        f"{_si(r['flops'])} FLOPs ({_si(r['flops_per_second'])} FLOP/s{mfu})",
        f"  energy {e['kwh']:.3g} kWh ({e['how']})",
        f"  CO2 {r['co2_g']:.3g} g (kWh x PUE {r['pue']:g} x {r['grid_g_per_kwh']:g} g/kWh); "
        f"${r['cost_usd']:.4g} ({r['device_hours']:.3g} device-hours x ${r['price_per_device_hour']:g}/h)",
    ]
    if r.get("mfu_impossible"):
        lines.append(f"  WARNING: {r['mfu_impossible']}")
    if path:
        lines.append(f"  written to {path}")
    return "\n".join(lines)


def load_receipts(folder: str) -> list[dict]:
    """Every receipt in a folder (and its subfolders: training runs keep theirs beside the model)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such receipts folder")
    out = []
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            if name.endswith(".json"):  # any JSON file that has a receipt's fields
                try:
                    r = _load(os.path.join(root, name))
                except (OSError, ValueError):
                    continue
                if isinstance(r, dict) and {"verb", "device_hours", "energy", "co2_g"} <= set(r):
                    r["_path"] = os.path.join(root, name)
                    out.append(r)
    return out
