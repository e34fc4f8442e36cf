"""Filling a model from a checkpoint, whatever its format: the one loader behind `hf.load_model`
(Hugging Face folders) and `gguf.load_model` (GGUF files).

    model = load(cfg, tensors, source, dtype, device, quantizer)

allocates the model once in its dtype, weights a quantizer takes left on the meta device
(`new_empty_model`), and writes each tensor of the stream into its place as it comes, so that
nothing larger than one tensor is held beside the model (`fill_model`). The stream names tensors
as Hugging Face checkpoints do (the GGUF reader translates its names and conventions to theirs);
`hf_layout` says which of our parameters, and which of its rows, each name fills.

The quantizer (`quant.apply.StreamingQuantizer`) is made once, by the caller, which has checked
the options with it; the loader hands it the model it builds.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable

import torch
import torch.nn as nn

from ..model import Transformer, families
from ..model.config import ModelConfig
from ..quant.apply import StreamingQuantizer
from .safetensors_io import CheckpointError

# Tensors some checkpoints carry that hold no weights (old Llama exports saved the rope table).
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")
_FUSED = re.compile(r"^(blocks\.\d+\.(?:attn|mlp))\.(qkv_proj|gate_up_proj)\.(weight|bias|qweight|scales|mins)$")


def hf_layout(model: Transformer) -> dict[str, tuple[str, slice | None]]:
    """Each Hugging Face tensor name -> (our parameter, the rows of it that tensor fills).
    Our fused QKV and gate/up matrices are the checkpoints' separate matrices stacked by rows; so
    are the buffers of a quantized layer (`qweight`, `scales`, `mins`: one row per output)."""
    cfg, out = model.config, {}
    family = families.get(cfg.family)
    q, kv, _ = model.blocks[0].attn.split
    f = cfg.intermediate_size
    parts = {"qkv_proj": [("q_proj", slice(0, q)), ("k_proj", slice(q, q + kv)), ("v_proj", slice(q + kv, q + 2 * kv))],
             "gate_up_proj": [("gate_proj", slice(0, f)), ("up_proj", slice(f, 2 * f))]}
    # a tied LM head is listed once, as the embedding (a quantized one by its buffers)
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:
        m = _FUSED.match(name)
        if m:
            for part, rows in parts[m[2]]:
                out[family.hf_name(f"{m[1]}.{part}.{m[3]}")] = (name, rows)
        else:
            out[family.hf_name(name)] = (name, None)
    return out


# -- the empty model -----------------------------------------------------------------------------
def default_dtype(device: torch.device) -> torch.dtype:
    # This CPU has no native bf16: fp32 is both faster and exact. GPUs get bf16.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@contextlib.contextmanager
def _meta_device():
    """Build modules on the meta device without nn.Embedding's random init: on meta it runs a Python
    decomposition that imports torch._dynamo (80 MB, 2 s) for values about to be overwritten."""
    saved = nn.Embedding.reset_parameters
    nn.Embedding.reset_parameters = lambda self: None
    try:
        with torch.device("meta"):
            yield
    finally:
        nn.Embedding.reset_parameters = saved


def _materialize(model: nn.Module, dtype: torch.dtype, device: torch.device, lazy_weights: bool = False) -> None:
    """Give each meta parameter real, uninitialised storage (tied parameters stay tied). Unlike
    Module.to_empty this calls torch.empty directly: empty_like on meta imports torch.fx (50 MB).
    lazy_weights: leave the weights of linear layers and embeddings on meta, for a quantizer to
    fill layer by layer."""
    made: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                if lazy_weights and isinstance(mod, (nn.Linear, nn.Embedding)) and name == "weight":
                    continue
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(empty_storage(p.shape, dtype, device), p.requires_grad)
                mod._parameters[name] = made[id(p)]


def empty_storage(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Storage for a parameter. The LM head (a matrix far taller than wide) is stored column-major:
    at batch 1, MKL's matrix-vector product streams [in, out] 2-3x faster than [out, in]
    (benchmarks/decode.py). The other matrices stay row-major for slm's own one-row kernel
    (accel.cpu_decode.Linear). Shape and values are unchanged; only the memory order differs."""
    if device.type == "cpu" and len(shape) == 2 and shape[0] >= 16 * shape[1]:
        return torch.empty(shape[1], shape[0], dtype=dtype, device=device).t()
    return torch.empty(shape, dtype=dtype, device=device)


def new_empty_model(cfg: ModelConfig, dtype: torch.dtype | None = None, device=None,
                    lazy_weights: bool = False) -> Transformer:
    """A model whose parameters are allocated but not initialised, ready to be filled."""
    device = torch.device(device or "cpu")
    with _meta_device():
        model = Transformer(cfg)
    _materialize(model, dtype or default_dtype(device), device, lazy_weights)
    return model


# -- filling it ----------------------------------------------------------------------------------
def fill_model(model: Transformer, tensors: Iterable[tuple], source: str, config_name: str = "config.json",
               quantizer: StreamingQuantizer | None = None) -> Transformer:
    """Fill every parameter from `tensors`: (file, Hugging Face name, shape, src) items, where src
    is write(dst) or a tensor to copy. Each tensor is written into its place as it comes, so
    nothing larger than one tensor is held.
    quantizer (bound to this model): weights left on meta get storage from it (a whole fp32 src
    tensor is taken as it is, not copied: it is about to be quantized), and each layer (and the
    embedding) is quantized as soon as all its rows are written. An item may carry a fifth
    element, a GGUF tensor's blocks (ggml type, uint8 [rows, bytes]), which the quantizer may keep
    as they are (gguf_layers.GGUFLinear) instead of quantizing the fp32 rows."""
    cfg = model.config
    params, layout = {**dict(model.named_parameters()), **dict(model.named_buffers())}, hf_layout(model)
    seen: set[str] = set()
    for item in tensors:
        file, name, shape, src = item[:4]
        if _IGNORED.search(name) or (cfg.tie_embeddings and name == "lm_head.weight"):
            continue
        if name not in layout:
            raise CheckpointError(f"{file}: unexpected tensor {name!r} for a {cfg.family} model")
        ours, rows = layout[name]
        dst = params[ours]
        if quantizer is not None and dst.is_meta:
            dst = quantizer.storage(ours, src if rows is None and isinstance(src, torch.Tensor) else None)
        dst = dst if rows is None else dst[rows]
        if tuple(dst.shape) != tuple(shape):
            raise CheckpointError(f"{file}: tensor {name!r} has shape {list(shape)} but {config_name} "
                                  f"implies {list(dst.shape)}")
        if not isinstance(src, torch.Tensor):
            src(dst.data)
        elif dst.data_ptr() != src.data_ptr():
            dst.data.copy_(src)
        seen.add(name)
        if quantizer is not None:
            if len(item) > 4 and item[4] is not None:
                quantizer.blocks(ours, 0 if rows is None else rows.start, *item[4])
            quantizer.written(ours, dst.shape[0])
    missing = sorted(set(layout) - seen)
    if missing:
        raise CheckpointError(f"{source}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]!r}")
    if quantizer is not None:
        quantizer.finish()
    return model.eval()


def load(cfg: ModelConfig, tensors: Iterable[tuple], source: str, dtype: torch.dtype | None = None, device=None,
         quantizer: StreamingQuantizer | None = None, config_name: str = "config.json") -> Transformer:
    """A model of `cfg` filled from the stream `tensors` (see fill_model); with a quantizer,
    quantized layer by layer while it fills."""
    model = new_empty_model(cfg, dtype, device, lazy_weights=quantizer is not None)
    if quantizer is not None:
        quantizer.bind(model)
    with torch.no_grad():
        return fill_model(model, tensors, source, config_name, quantizer)
