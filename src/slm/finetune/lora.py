"""LoRA adapters (Hu et al. 2021) on the attention and MLP projections, in PEFT's file format.

A LoRA layer adds a low-rank update to a frozen linear layer: y = W x + (alpha / r) B A x, with
A [r, in] and B [out, r] the only trained weights (B starts at zero, so training starts from the
base model). The base layer may be an nn.Linear or a quantized Int8Linear/Int4Linear (QLoRA:
the adapters train in fp32 over a 4-bit base; quantize.py gives those layers an input gradient).

Our model fuses Q/K/V into `qkv_proj` and gate/up into `gate_up_proj`; checkpoints and PEFT keep
them apart. So one `LoRALinear` holds one adapter per Hugging Face module it covers (q_proj,
k_proj, v_proj of one fused matrix), each adding to its own rows of the output. The names come
from checkpoint/hf.py's layout, so every family is covered by the same code:

    llama, mistral, gemma3   q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
    phi                      q_proj k_proj v_proj dense fc1 fc2

Saved as PEFT saves them: `adapter_model.safetensors` with keys like
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` and `adapter_config.json`, so
`peft.PeftModel.from_pretrained(transformers_model, adapter_dir)` gives the same outputs. Reading
and checking those files, and the names of each family's targets, live in runtime/adapters.py,
which serving shares.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from ..accel import accelerate, accelerated
from ..files import atomic_path
from ..model import Transformer
from ..quant.layers import QuantLinear, _set_module
from ..runtime.adapters import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, check_targets, layout,
                                read_adapter_tensors)


class LoRALinear(nn.Module):
    """A frozen `base` layer plus one low-rank adapter per part of its output rows.
    parts: (Hugging Face module name, slice of output rows) for every part of the base's output,
    in row order; `adapted` lists the names that get an adapter."""

    def __init__(self, base: nn.Module, parts: list[tuple[str, slice]], adapted: list[str], r: int,
                 alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base, self.r, self.alpha, self.scale = base, r, alpha, alpha / r
        self.parts = parts
        self.hf_names = {name.rsplit(".", 1)[-1]: name for name, _ in parts if name in adapted}
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dtype = base.weight.dtype if isinstance(base, nn.Linear) else torch.float32
        device = next(t.device for t in [*base.parameters(), *base.buffers()])
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for name, rows in parts:
            if name in adapted:
                key = name.rsplit(".", 1)[-1]
                a = torch.empty(r, base.in_features, dtype=dtype, device=device)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as PEFT (and nn.Linear) initialise A
                self.lora_A[key] = nn.Parameter(a)
                self.lora_B[key] = nn.Parameter(torch.zeros(rows.stop - rows.start, r, dtype=dtype, device=device))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = self.dropout(x)
        deltas = []
        for name, rows in self.parts:
            key = name.rsplit(".", 1)[-1]
            if key in self.lora_A:
                deltas.append(F.linear(F.linear(h, self.lora_A[key]), self.lora_B[key]))
            else:  # a part without an adapter (e.g. only q_proj of the fused QKV)
                deltas.append(x.new_zeros(*x.shape[:-1], rows.stop - rows.start))
        delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas, -1)
        return y + self.scale * delta.to(y.dtype)

    def merged_weight(self) -> torch.Tensor:
        """The fp32 weight of base + adapters: W[rows] += (alpha / r) B A."""
        base = self.base
        w = (base.weight.detach().float() if isinstance(base, nn.Linear) else base.dequantize()).clone()
        for name, rows in self.parts:
            key = name.rsplit(".", 1)[-1]
            if key in self.lora_A:
                w[rows] += self.scale * (self.lora_B[key].detach().float() @ self.lora_A[key].detach().float())
        return w


def apply_lora(model: Transformer, targets: list[str] | None = None, r: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, seed: int = 0) -> list[str]:
    """Freeze the model and wrap the targeted projections in LoRALinear layers, in place.
    Returns the Hugging Face names of the adapted modules."""
    if r <= 0:
        raise ValueError(f"LoRA rank must be positive, got {r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters")
    targets = check_targets(model.config.family, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    adapted = []
    for mod, parts in layout(model).items():
        names = [name for name, _ in parts if name.rsplit(".", 1)[-1] in targets]
        if names:
            _set_module(model, mod, LoRALinear(model.get_submodule(mod), parts, names, r, alpha, dropout))
            adapted += names
    model.lora = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets}
    return adapted


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's keys."""
    out = {}
    for layer in lora_layers(model).values():
        for key, name in layer.hf_names.items():
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[key].detach().float().contiguous()
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B[key].detach().float().contiguous()
    return out


def adapter_config(model: nn.Module, base_model: str | None) -> dict:
    """adapter_config.json as PEFT writes it (the fields a LoRA adapter of ours uses)."""
    lora = getattr(model, "lora", None)
    if lora is None:
        raise ValueError("the model has no LoRA adapters")
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": lora["r"], "lora_alpha": lora["lora_alpha"], "lora_dropout": lora["lora_dropout"],
            "target_modules": lora["target_modules"], "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
            "use_rslora": False, "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "revision": None}


def save_adapter(model: nn.Module, out: str, base_model: str | None = None) -> None:
    """Write adapter_model.safetensors and adapter_config.json into `out`, each atomically."""
    os.makedirs(out, exist_ok=True)
    state = adapter_state(model)
    _atomic(out, ADAPTER_WEIGHTS, lambda path: save_file(state, path, metadata={"format": "pt"}))
    cfg = adapter_config(model, base_model)
    _atomic(out, ADAPTER_CONFIG, lambda path: open(path, "w").write(json.dumps(cfg, indent=2) + "\n"))


def _atomic(folder: str, name: str, write) -> None:
    with atomic_path(os.path.join(folder, name)) as tmp:
        write(tmp)


def load_adapter(model: Transformer, adapter_dir: str) -> list[str]:
    """Wrap the model with the adapter's LoRA layers and load its weights (PEFT's format)."""
    cfg, tensors = read_adapter_tensors(model, adapter_dir)
    apply_lora(model, cfg["target_modules"], cfg["r"], cfg.get("lora_alpha", 8), 0.0)
    params = {}
    for layer in lora_layers(model).values():
        for key, name in layer.hf_names.items():
            params[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[key]
            params[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B[key]
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k])
    return list(params)


@torch.no_grad()
def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight, in place: each LoRALinear becomes an fp32
    nn.Linear holding W + (alpha / r) B A (a quantized base is dequantized first), accelerated as
    the model's other layers are."""
    fast = accelerated(model)
    for name, layer in lora_layers(model).items():
        base = layer.base
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        merged.weight = nn.Parameter(layer.merged_weight().to(model.dtype))
        if base.bias is not None:
            merged.bias = nn.Parameter(base.bias.detach().clone())
        _set_module(model, name, merged)
    if fast:
        accelerate(model)
    if hasattr(model, "lora"):
        del model.lora
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; quantized weights count as their number of weights."""
    seen, total, train = set(), 0, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
            train += p.numel() if p.requires_grad else 0
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    return train, total
