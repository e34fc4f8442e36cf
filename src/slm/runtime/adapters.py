"""LoRA adapters in PEFT's file format, read for a frozen model: what the file says and which of
our layers it adapts, and adapters applied to chosen rows of a batch (several adapters and the
base model served together, as `slm serve --lora NAME=DIR` does).

A PEFT folder holds `adapter_config.json` (r, lora_alpha, target_modules) and
`adapter_model.safetensors` with keys like
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. Our model fuses Q/K/V into
`qkv_proj` and gate/up into `gate_up_proj`, so an adapter of q_proj adds to some rows of the fused
output; `layout` says which (from checkpoint/hf.py, so every family is covered by the same code):

    llama, mistral, gemma3   q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
    phi                      q_proj k_proj v_proj dense fc1 fc2

Training adapters (finetune/lora.py's LoRALinear) wraps the layers; serving them (`RowAdapters`)
leaves the model's layers as they are, so that steps without adapter rows keep the C++ decoder,
and adds each adapter's low-rank update to its rows' outputs through forward hooks that exist only
during a forward that has such rows (a hooked model runs on the module path).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from ..accel.decoder import module_path
from ..checkpoint import hf
from ..model import Transformer
from ..quant.layers import QuantLinear

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."
TARGETS = {  # every projection of a block, by Hugging Face module name
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
}
TARGETS["mistral"] = TARGETS["gemma3"] = TARGETS["llama"]


def layout(model: Transformer) -> dict[str, list[tuple[str, slice]]]:
    """Each linear layer inside a block (our name) -> its parts: (Hugging Face module name, rows)."""
    out: dict[str, list[tuple[str, slice]]] = {}
    for hf_tensor, (ours, rows) in hf.hf_layout(model).items():
        mod_name, _, kind = ours.rpartition(".")
        if not mod_name.startswith("blocks.") or kind not in ("weight", "qweight"):
            continue
        mod = model.get_submodule(mod_name)
        if isinstance(mod, (nn.Linear, QuantLinear)):
            out.setdefault(mod_name, []).append((hf_tensor.rsplit(".", 1)[0], rows or slice(0, mod.out_features)))
    return {m: sorted(parts, key=lambda p: p[1].start) for m, parts in out.items()}


def check_targets(family: str, targets: list[str] | None) -> list[str]:
    """The Hugging Face module names to adapt (default: all of a block's projections)."""
    valid = TARGETS[family]
    if not targets:
        return list(valid)
    bad = [t for t in targets if t not in valid]
    if bad:
        raise ValueError(f"unknown LoRA target module(s) {', '.join(bad)} for a {family} model; "
                         f"choose from {', '.join(valid)}")
    return list(dict.fromkeys(targets))


def read_adapter_config(adapter_dir: str) -> dict:
    """adapter_config.json, checked for what slm reads: a LoRA adapter (no DoRA, rsLoRA or per-module
    ranks) with r and a list of target modules."""
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isdir(adapter_dir):
        raise FileNotFoundError(f"{adapter_dir}: no such adapter folder")
    cfg = hf.read_json(path)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {cfg.get('peft_type')!r}; slm reads LoRA adapters only")
    for key, default in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False)):
        if cfg.get(key, default) != default:
            raise ValueError(f"{path}: {key}={cfg[key]!r} is not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{path}: per-module rank_pattern/alpha_pattern are not supported")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1 or not cfg.get("target_modules"):
        raise ValueError(f"{path}: needs a positive whole r and target_modules")
    if isinstance(cfg["target_modules"], str):
        raise ValueError(f"{path}: target_modules is a pattern ({cfg['target_modules']!r}); slm reads a list of names")
    alpha = cfg.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha == alpha or abs(alpha) == float("inf"):
        raise ValueError(f"{path}: lora_alpha must be a finite number, got {alpha!r}")
    return cfg


def expected_shapes(model: Transformer, targets: list[str], r: int) -> dict[str, tuple[int, ...]]:
    """The tensors an adapter of these targets and rank holds for `model`, by PEFT key: lora_A
    [r, in_features] and lora_B [rows, r] for every adapted part."""
    out = {}
    for mod, parts in layout(model).items():
        k = model.get_submodule(mod).in_features
        for name, rows in parts:
            if name.rsplit(".", 1)[-1] in targets:
                out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (r, k)
                out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (rows.stop - rows.start, r)
    return out


def read_adapter_tensors(model: Transformer, adapter_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the checked config, every tensor by PEFT key as fp32), each key and shape checked against
    what the config's targets and rank mean for `model`."""
    cfg = read_adapter_config(adapter_dir)
    targets = check_targets(model.config.family, cfg["target_modules"])
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: file not found")
    want = expected_shapes(model, targets, cfg["r"])
    with safe_open(path, framework="pt") as f:
        have = set(f.keys())
        missing, unexpected = sorted(set(want) - have), sorted(have - set(want))
        if missing or unexpected:
            what = f"lacks {missing[0]!r}" if missing else f"has unexpected {unexpected[0]!r}"
            raise ValueError(f"{path}: {what} for this {model.config.family} model "
                             f"({len(missing)} missing, {len(unexpected)} unexpected)")
        tensors = {}
        for key, shape in want.items():
            t = f.get_tensor(key)
            if tuple(t.shape) != shape:
                raise ValueError(f"{path}: {key} has shape {list(t.shape)}, the model needs {list(shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"{path}: {key} holds NaN or infinite values")
            tensors[key] = t.float()
    return cfg, tensors


@dataclass
class Adapter:
    """One adapter, ready to apply: for each adapted layer (our name) its parts' output rows and
    A [r, in], B [rows, r]; y[rows] += scale * B A x."""
    name: str
    folder: str
    scale: float
    layers: dict[str, list[tuple[slice, torch.Tensor, torch.Tensor]]]


def read_adapter(model: Transformer, name: str, adapter_dir: str) -> Adapter:
    cfg, tensors = read_adapter_tensors(model, adapter_dir)
    targets = check_targets(model.config.family, cfg["target_modules"])
    dtype, device = model.dtype, model.device
    layers: dict[str, list[tuple[slice, torch.Tensor, torch.Tensor]]] = {}
    for mod, parts in layout(model).items():
        for hf_name, rows in parts:
            if hf_name.rsplit(".", 1)[-1] in targets:
                a, b = (tensors[f"{PEFT_PREFIX}{hf_name}.lora_{x}.weight"].to(device, dtype) for x in "AB")
                layers.setdefault(mod, []).append((rows, a, b))
    return Adapter(name, adapter_dir, cfg.get("lora_alpha", 8) / cfg["r"], layers)


class RowAdapters:
    """Named adapters over one frozen model, each applied to the rows of a batch that ask for it.

        adapters = RowAdapters(model)
        adapters.add("support", "runs/support-lora")
        with adapters.applied({"support": [0, 2]}):   # rows 0 and 2 of the batch
            logits = model(ids, cache=cache, pos=pos)

    Rows not named get the base model. The update is computed as finetune/lora.py's LoRALinear
    computes it (the base output, plus scale times B A x per adapted part), for the named rows only.
    """

    def __init__(self, model: Transformer):
        self.model = model
        self.adapters: dict[str, Adapter] = {}

    def add(self, name: str, adapter_dir: str) -> Adapter:
        if name in self.adapters:
            raise ValueError(f"the adapter name {name!r} is given twice")
        self.adapters[name] = read_adapter(self.model, name, adapter_dir)
        return self.adapters[name]

    @contextlib.contextmanager
    def applied(self, rows: dict[str, list[int]]):
        """Within the block, forwards of the model add each adapter's update to its rows (batch
        indices); an empty mapping changes nothing (and keeps the model's fast paths)."""
        rows = {name: r for name, r in rows.items() if r}
        for name in rows:
            if name not in self.adapters:
                raise KeyError(f"no adapter named {name!r}")
        if not rows:
            yield
            return
        per_layer: dict[str, list[tuple[torch.Tensor, float, list]]] = {}
        for name, r in rows.items():
            idx = torch.tensor(r, dtype=torch.long, device=self.model.device)
            ad = self.adapters[name]
            for mod, parts in ad.layers.items():
                per_layer.setdefault(mod, []).append((idx, ad.scale, parts))
        handles = []
        try:
            for mod, updates in per_layer.items():
                handles.append(self.model.get_submodule(mod).register_forward_hook(_row_update(updates)))
            with module_path(self.model):
                yield
        finally:
            for h in handles:
                h.remove()


def _row_update(updates: list[tuple[torch.Tensor, float, list]]):
    """A forward hook adding, for each (row indices, scale, parts), scale * B A x to those rows'
    outputs of each part."""
    def hook(module, args, y):
        x = args[0]
        for idx, scale, parts in updates:
            h = x.index_select(0, idx)
            for rows, a, b in parts:
                y[idx, ..., rows] += scale * F.linear(F.linear(h, a), b).to(y.dtype)
        return y
    return hook
