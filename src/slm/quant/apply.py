"""Quantizing a model: its linear layers and token embedding replaced by the layers of `layers.py`
(slm's int8/int4) or of `gguf_layers.py` (a GGUF file's own blocks), after loading
(`quantize_model`) or while it loads (`StreamingQuantizer`).

    from slm.quant.apply import quantize_model
    quantize_model(lm.model, "int4", group_size=32)

The mode and group size are checked once, where they come in: by each public function, and by
`StreamingQuantizer` when it is made (`slm.load` makes one before it opens any file); the
functions they call take them as checked.
"""

from __future__ import annotations

import ctypes
import fnmatch
from collections import Counter
from collections.abc import Iterable

import torch
import torch.nn as nn

from .gguf_layers import BLOCKS, GGUFLinear, supported
from .layers import LAYERS, QK, QuantEmbedding, _set_module

MODES = ("int8", "int4")
DEFAULT_GROUP = {"int8": None, "int4": 32}  # None: one scale per output channel
# A StreamingQuantizer mode: keep a GGUF file's blocks the kernels run, leave every other tensor in
# floating point (what slm.load does with a GGUF file by default, as llama.cpp runs it)
FILE = "file"


def check_mode(mode: str, group_size: int | None = None) -> tuple[str, int | None]:
    """(mode, group size) with the mode's default group size filled in; ValueError if unknown."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; supported: {', '.join(MODES)}")
    if group_size is None:
        group_size = DEFAULT_GROUP[mode]
    if group_size is not None and (group_size <= 0 or group_size % QK):
        raise ValueError(f"group size must be a positive multiple of {QK}, got {group_size}")
    return mode, group_size


def layer_group(mode: str, in_features: int, group_size: int | None) -> int | None | bool:
    """The group size a layer of in_features gets (None: per channel), or False if it stays in
    floating point (in_features not a multiple of 32). A group that does not divide in_features
    falls back to 32."""
    if in_features % QK:
        return False
    if group_size is None:
        return None if mode == "int8" else QK
    return group_size if in_features % group_size == 0 else QK


def quantize_linear(linear: nn.Linear, mode: str = "int8", group_size: int | None = None) -> nn.Module:
    """The quantized replacement of one nn.Linear, or the layer itself where it cannot be quantized."""
    return _quantize_linear(linear, *check_mode(mode, group_size))


def _quantize_linear(linear: nn.Linear, mode: str, group_size: int | None) -> nn.Module:
    g = layer_group(mode, linear.in_features, group_size)
    if g is False:
        return linear
    return LAYERS[mode].from_linear(linear, g)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)


def _skips(skip: str | Iterable[str]) -> tuple[str, ...]:
    return (skip,) if isinstance(skip, str) else tuple(skip)


def _linear_names(model: nn.Module, skip: Iterable[str]) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _matches(n, skip)]


def _tied_head(model: nn.Module) -> nn.Linear | None:
    """The model's LM head if it shares the embedding's table (a Transformer with tied embeddings)."""
    embed, head = getattr(model, "embed", None), getattr(model, "lm_head", None)
    if isinstance(embed, nn.Embedding) and isinstance(head, nn.Linear) and head.weight is embed.weight:
        return head
    return None


def _quantizes_embedding(model: nn.Module, mode: str, group_size: int | None, skip: tuple) -> bool:
    """Whether quantize_embedding replaces `model.embed` (whose weight may still be on meta)."""
    embed = getattr(model, "embed", None)
    if not isinstance(embed, nn.Embedding) or _matches("embed", skip):
        return False
    head = _tied_head(model)
    if head is not None:  # quantized as the head is, or not at all: one table serves both
        return not _matches("lm_head", skip) and layer_group(mode, head.in_features, group_size) is not False
    return embed.embedding_dim % QK == 0


@torch.no_grad()
def quantize_embedding(model: nn.Module, mode: str = "int8", group_size: int | None = None,
                       skip: Iterable[str] = ()) -> None:
    """Replace, in place, `model.embed` (an nn.Embedding) by a QuantEmbedding. An LM head tied to
    it is quantized in `mode` first and the embedding reads the head's table; an untied table
    becomes int8 with one scale per row. Left as it is: `embed` in skip, a tied head in skip or
    too narrow to quantize (the fp32 table then serves both), a width not a multiple of 32."""
    _quantize_embedding(model, *check_mode(mode, group_size), _skips(skip))


def _quantize_embedding(model: nn.Module, mode: str, group_size: int | None, skip: tuple[str, ...]) -> None:
    if not _quantizes_embedding(model, mode, group_size, skip) or model.embed.weight.is_meta:
        return
    embed, head = model.embed, _tied_head(model)
    if head is not None:
        model.lm_head = _quantize_linear(head, mode, group_size)
        model.embed = QuantEmbedding(embed.num_embeddings, embed.embedding_dim, tied_to=model.lm_head)
    else:
        model.embed = QuantEmbedding.from_embedding(embed)
    # the fp32 table is freed with the caller's last reference to the old module


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str = "int8", skip: Iterable[str] = (),
                   group_size: int | None = None) -> nn.Module:
    """Replace, in place, every nn.Linear whose in_features is a multiple of 32 by an Int8Linear
    or Int4Linear, one layer at a time so the fp32 weights are freed as it goes, and the token
    embedding `embed` by a QuantEmbedding (quantize_embedding: int8 rows, or the tied head's table).

    group_size: int8 default per output channel, int4 default 32. skip: module names
    (`lm_head`, `embed`), prefixes (`blocks.0`) or fnmatch patterns (`*.down_proj`) to leave in
    floating point. Returns the model."""
    return _quantize_model(model, *check_mode(mode, group_size), _skips(skip))


@torch.no_grad()
def _quantize_model(model: nn.Module, mode: str, group_size: int | None, skip: tuple[str, ...]) -> nn.Module:
    _quantize_embedding(model, mode, group_size, skip)  # first: it decides how a tied head is shared
    for name in _linear_names(model, skip):  # names only: no references kept
        linear = model.get_submodule(name)
        if linear.weight.is_meta:
            continue
        _set_module(model, name, _quantize_linear(linear, mode, group_size))
        del linear  # the last reference to an untied weight: freed here
    model.quantization = quant_config(mode, group_size)
    _trim_heap()
    return model


def _trim_heap() -> None:
    """Return the heap pages that quantizing freed to the OS. glibc serves blocks below its mmap
    threshold (raised up to 32 MB as larger blocks are freed) from the heap, and the small
    quantized scales allocated between the freed temporaries keep it from shrinking on its own:
    for Phi-2 in int8, 0.5 GiB of resident memory held nothing. Elsewhere (no glibc) a no-op."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def quant_config(mode: str, group_size: int | None) -> dict:
    """The `quantization_config` entry of a quantized checkpoint's config.json."""
    return {"quant_method": "slm", "bits": int(mode[3:]), "group_size": group_size}


def mode_of(quantization_config: dict) -> tuple[str, int | None]:
    if quantization_config.get("quant_method") != "slm" or quantization_config.get("bits") not in (4, 8):
        raise ValueError(f"unsupported quantization_config {quantization_config!r} (slm reads its own: "
                         "quant_method 'slm', bits 8 or 4)")
    return check_mode(f"int{quantization_config['bits']}", quantization_config.get("group_size"))


class StreamingQuantizer:
    """Quantizes a model's linear layers and token embedding while they are filled from a checkpoint.

    The model is built with those weights on the meta device (checkpoint.loader.new_empty_model(...,
    lazy_weights=True)). `storage(name)` gives such a weight real storage when its first tensor
    arrives (fp32 for a weight this quantizes, else the model's dtype); `written(name, rows)`
    counts the rows written, and once the weight is complete the layer (or the embedding, and a
    head tied to it) is quantized and its fp32 storage dropped. `finish()` quantizes what is left.

    Made before the model exists (model=None: the options are checked then, before any file is
    read), it is given its model by `bind` (the loader does so). file_blocks: a GGUF file's tensors
    stored in blocks the kernels run (`keeps_blocks`) stay in those blocks, as GGUFLinear layers."""

    def __init__(self, model: nn.Module | None, mode: str, group_size: int | None = None, skip: Iterable[str] = (),
                 file_blocks: bool = True):
        """mode: int8 or int4, or FILE: a GGUF file's blocks kept, nothing quantized by slm (the
        other weights stay in floating point)."""
        self.mode, self.group_size = (FILE, None) if mode == FILE else check_mode(mode, group_size)
        if mode == FILE and not file_blocks:
            raise ValueError("a StreamingQuantizer of the file's blocks must keep them (file_blocks=True)")
        self.skip, self.file_blocks = _skips(skip), file_blocks
        self.model: nn.Module | None = None
        self._left: dict[str, int] = {}
        self._blocks: dict[str, list[tuple[int, int, torch.Tensor]]] = {}  # param -> [(first row, type, blocks)]
        self.kept: Counter[str] = Counter()  # block format name -> file tensors kept in it
        if model is not None:
            self.bind(model)

    def bind(self, model: nn.Module) -> StreamingQuantizer:
        """The model to quantize, its weights still on meta; one model per quantizer."""
        if self.model is not None and self.model is not model:
            raise ValueError("this StreamingQuantizer quantizes another model already")
        self.model = model
        return self

    def keeps_blocks(self, qtype: int) -> bool:
        """Whether a GGUF tensor stored as ggml type qtype is kept in its blocks (see blocks())."""
        return self.file_blocks and qtype in BLOCKS

    def blocks(self, param: str, row0: int, qtype: int, data: torch.Tensor) -> None:
        """A GGUF tensor's blocks (ggml type, uint8 [rows, bytes]) for rows row0.. of `param`: when
        they cover the whole weight in formats the kernels run, the layer keeps them as they are
        (gguf_layers.GGUFLinear) instead of quantizing the fp32 rows."""
        mod_name = param.rpartition(".")[0]
        mod = self.model.get_submodule(mod_name)
        width = mod.embedding_dim if isinstance(mod, nn.Embedding) else getattr(mod, "in_features", 0)
        if self.wants(param) and supported(qtype, width):
            self._blocks.setdefault(param, []).append((row0, qtype, data))

    def _from_blocks(self, param: str) -> bool:
        """Replace the layer of `param` (a complete weight) by a GGUFLinear over its blocks, if it has
        them for every row; True if it did."""
        parts = sorted(self._blocks.pop(param, []), key=lambda p: p[0])
        name = param.rpartition(".")[0]
        mod = self.model.get_submodule(name)
        if not parts or sum(p[2].shape[0] for p in parts) != mod.weight.shape[0]:
            return False
        if name == "embed" and _tied_head(self.model) is None:  # an untied table: fp32 or slm's int8 rows
            return False
        merged: list[tuple[int, torch.Tensor]] = []  # neighbouring parts of one type become one
        for _, t, data in parts:
            self.kept[BLOCKS[t][0]] += 1
            if merged and merged[-1][0] == t:
                merged[-1] = (t, torch.cat([merged[-1][1], data]))
            else:
                merged.append((t, data))
        if name == "embed":
            head = _tied_head(self.model)
            self.model.lm_head = _gguf_linear(head, merged)
            self.model.embed = QuantEmbedding(mod.num_embeddings, mod.embedding_dim, tied_to=self.model.lm_head)
        else:
            _set_module(self.model, name, _gguf_linear(mod, merged))
        return True

    def wants(self, param: str) -> bool:
        """Whether `param` (ours, e.g. blocks.0.attn.qkv_proj.weight) is a weight this quantizes."""
        mod_name, _, attr = param.rpartition(".")
        if attr != "weight" or _matches(mod_name, self.skip):
            return False
        mod = self.model.get_submodule(mod_name)
        if isinstance(mod, nn.Embedding) and mod is getattr(self.model, "embed", None):
            return _quantizes_embedding(self.model, self.mode, self.group_size, self.skip)
        return isinstance(mod, nn.Linear) and layer_group(self.mode, mod.in_features, self.group_size) is not False

    def storage(self, param: str, source: torch.Tensor | None = None) -> torch.Tensor:
        """The weight's storage, made now if it is still on meta. source: the whole weight, already
        in fp32 memory (a GGUF reader's), becomes the storage itself when this quantizes it."""
        mod = self.model.get_submodule(param.rpartition(".")[0])
        old = mod.weight
        if old.is_meta:
            wanted = self.wants(param)
            dtype, device = torch.float32 if wanted else self.model.dtype, self.model.device
            if wanted and source is not None and source.shape == old.shape and source.dtype == dtype \
                    and source.device == device:
                new = nn.Parameter(source, requires_grad=False)
            else:
                new = nn.Parameter(torch.empty(old.shape, dtype=dtype, device=device), requires_grad=False)
            for m in self.model.modules():  # every module sharing it: a tied head and embedding stay tied
                if m._parameters.get("weight") is old:
                    m.weight = new
            if wanted:
                self._left[param] = old.shape[0]
        return mod.weight

    def written(self, param: str, rows: int) -> None:
        if param not in self._left:
            return
        self._left[param] -= rows
        if self._left[param] == 0:
            del self._left[param]
            name = param.rpartition(".")[0]
            with torch.no_grad():
                if self._from_blocks(param) or self.mode == FILE:  # a GGUF file's blocks, kept as they are
                    return
                if name == "embed":
                    _quantize_embedding(self.model, self.mode, self.group_size, self.skip)
                else:
                    _set_module(self.model, name, _quantize_linear(self.model.get_submodule(name), self.mode,
                                                                   self.group_size))

    def finish(self) -> nn.Module:
        if self.mode == FILE:
            self.model.quantization = {"quant_method": "gguf"}  # hf.save_model writes it dequantized
            return self.model
        return _quantize_model(self.model, self.mode, self.group_size, self.skip)

    def describe(self) -> str:
        """The precision of the model it quantized, e.g. `file blocks Q4_1 (210 tensors), Q8_0 (1);
        fp32 elsewhere` or `int8 (per channel, 12 layers); fp32 elsewhere`."""
        parts = []
        if self.kept:
            kept = sorted(self.kept.items(), key=lambda kv: -kv[1])
            parts.append("file blocks " + ", ".join(f"{n} ({c}{' tensors' if i == 0 else ''})"
                                                    for i, (n, c) in enumerate(kept)))
        ours = sum(isinstance(m, tuple(LAYERS.values())) for m in self.model.modules())
        if ours:
            group = "per channel" if self.group_size is None else f"groups of {self.group_size}"
            parts.append(f"{self.mode} ({group}, {ours} layers)")
        floats = {str(p.dtype).removeprefix("torch.") for p in self.model.parameters() if p.is_floating_point()}
        floats = {"fp32" if f == "float32" else "bf16" if f == "bfloat16" else "fp16" if f == "float16" else f
                  for f in floats}
        return "; ".join(parts + [f"{'/'.join(sorted(floats)) or 'fp32'} elsewhere"])


def _gguf_linear(linear: nn.Linear, parts: list) -> nn.Module:
    """A GGUFLinear over a file's blocks (parts: (ggml type, uint8 rows)) in place of `linear`."""
    layer = GGUFLinear(linear.in_features, parts, bias=linear.bias is not None, device=linear.weight.device)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return layer
