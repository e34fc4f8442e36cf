"""GGUF files (llama.cpp's format) read as Hugging Face checkpoints: config, tensors, tokenizer.

A GGUF file is a header (key/value metadata, then a table of tensors) followed by the tensor data,
most of it quantized in blocks. `read_gguf` parses and checks the header and finds the file's
family (model/families.py: by `gguf_arch`, and `gguf_marker` where families share one). `tensors()`
dequantizes one tensor at a time to float32 and undoes llama.cpp's conventions as the family's
record lists them (Q/K row order, norms stored as 1 + w, and a fused QKV split by rows), so the
names, shapes and values are those of the Hugging Face checkpoint:

    ckpt = read_gguf("gemma-3-270m-q4_k_m.gguf")
    ckpt.config                         # a ModelConfig
    ckpt.hf_config                      # the same as a config.json-style dict
    for name, t in ckpt.tensors(): ...  # ("model.layers.0.self_attn.q_proj.weight", fp32 tensor)
    tk, settings, template = ckpt.tokenizer()   # gguf_tokenizer.GGUFTokenizer
    model = load_model(ckpt, quantizer=...)     # checkpoint/loader.py

The header is parsed here, not by `gguf.GGUFReader`: that reader makes one numpy view per metadata
item, 20 s for Gemma 3's 262,144-token vocabulary, where this takes 0.3 s. Blocks are dequantized by
`gguf.quants.dequantize`.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from typing import Iterator

import gguf
import numpy as np
import torch
from gguf.quants import dequantize

from ..model import Transformer, families
from ..model.config import ModelConfig
from ..quant.apply import StreamingQuantizer
from .gguf_tokenizer import GGUFTokenizer, build_tokenizer
from .loader import load
from .safetensors_io import CheckpointError

# The ggml types read (dequantized by gguf.quants): type id -> name, as in gguf.GGMLQuantizationType.
TYPES = {0: "F32", 1: "F16", 30: "BF16", 8: "Q8_0", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1",
         12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}


# -- the header --------------------------------------------------------------------------------
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Truncated(Exception):
    pass


class _Header:
    """Little-endian values read in sequence from a memory-mapped file, never past its end."""

    def __init__(self, buf: mmap.mmap):
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def take(self, n: int) -> int:
        if self.pos + n > self.size:
            raise _Truncated
        self.pos += n
        return self.pos - n

    def scalar(self, code: str):
        return struct.unpack_from("<" + code, self.buf, self.take(struct.calcsize(code)))[0]

    def string(self) -> str:
        n = self.scalar("Q")
        start = self.take(n)
        return str(self.buf[start:start + n], "utf-8")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise ValueError(f"unknown metadata type {vtype}")
        etype, n = self.scalar("I"), self.scalar("Q")
        if etype in _SCALARS:  # scores, token types: one numpy read
            dtype = np.dtype("<" + _SCALARS[etype])
            return np.frombuffer(self.buf, dtype, n, self.take(n * dtype.itemsize)).tolist()
        if n * 8 > self.size - self.pos:  # every element takes 8 bytes or more
            raise _Truncated
        if etype == _STRING:
            return self.strings(n)
        return [self.value(etype) for _ in range(n)]

    def strings(self, n: int) -> list[str]:
        # The vocabulary is the one long loop in the header, so it runs without method calls.
        buf, pos, size, unpack = self.buf, self.pos, self.size, struct.Struct("<Q").unpack_from
        out = []
        for _ in range(n):
            if pos + 8 > size:
                raise _Truncated
            k = unpack(buf, pos)[0]
            pos += 8
            if pos + k > size:
                raise _Truncated
            out.append(str(buf[pos:pos + k], "utf-8"))
            pos += k
        self.pos = pos
        return out


@dataclass
class _Tensor:
    name: str
    type: int  # ggml type id
    shape: tuple[int, ...]  # torch order; GGUF lists dimensions innermost first
    start: int  # absolute offset in the file
    nbytes: int


def _parse(path: str) -> tuple[dict, list[_Tensor]]:
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: file not found")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: not a file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
            if magic != b"GGUF":
                raise CheckpointError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                h = _Header(buf)
                meta, table = _read_header(path, h)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None

    arch = meta.get("general.architecture")
    if arch not in families.gguf_archs():
        raise CheckpointError(f"{path}: unsupported architecture {arch!r}; slm reads {', '.join(families.gguf_archs())}")
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise CheckpointError(f"{path}: corrupt GGUF header (general.alignment is {align!r})")
    data_start = -(-h.pos // align) * align  # the data follows the header, aligned
    tensors = []
    for name, dims, type_id, offset in table:
        if type_id not in TYPES:
            try:
                type_name = gguf.GGMLQuantizationType(type_id).name
            except ValueError:
                type_name = f"unknown ggml type {type_id}"
            raise CheckpointError(f"{path}: tensor {name!r} is stored as {type_name}, which slm cannot "
                                  f"dequantize; supported types: {', '.join(TYPES.values())}")
        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
        if dims and dims[0] % block:
            raise CheckpointError(f"{path}: tensor {name!r} has rows of {dims[0]} values, not whole "
                                  f"{TYPES[type_id]} blocks of {block}")
        start, nbytes = data_start + offset, int(np.prod(dims, dtype=object)) // block * block_bytes
        if start + nbytes > h.size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} needs bytes {start}..{start + nbytes} "
                                  f"but the file has {h.size}")
        tensors.append(_Tensor(name, type_id, tuple(reversed(dims)), start, nbytes))
    return meta, tensors


def _read_header(path: str, h: _Header) -> tuple[dict, list[tuple]]:
    """(metadata, [(name, GGUF dims, ggml type, data offset)])."""
    try:
        h.take(4)
        version = h.scalar("I")
        if version not in (2, 3):
            what = "a big-endian GGUF file" if version & 0xFFFF == 0 else f"GGUF version {version}"
            raise CheckpointError(f"{path}: {what} is not supported (only little-endian versions 2 and 3)")
        n_tensors, n_kv = h.scalar("Q"), h.scalar("Q")
        meta = {}
        for _ in range(n_kv):
            key = h.string()
            meta[key] = h.value(h.scalar("I"))
        table = []
        for _ in range(n_tensors):
            name = h.string()
            n_dims = h.scalar("I")
            if n_dims > 4:  # ggml's GGML_MAX_DIMS
                raise ValueError(f"tensor {name!r} claims {n_dims} dimensions")
            dims = [h.scalar("Q") for _ in range(n_dims)]
            table.append((name, dims, h.scalar("I"), h.scalar("Q")))
        return meta, table
    except CheckpointError:
        raise
    except _Truncated:
        raise CheckpointError(f"{path}: truncated GGUF file (its header runs past the end)") from None
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise CheckpointError(f"{path}: corrupt GGUF header ({e})") from None


# -- names -------------------------------------------------------------------------------------
# Phi-2 conversions from its original layout store Q, K and V stacked by rows in one tensor.
_QKV = re.compile(r"^blk\.(\d+)\.attn_qkv\.(weight|bias)$")


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's LlamaModel.permute of Q/K rows. Hugging Face's rotary embedding pairs dimension
    i with i + head_dim/2, llama.cpp's pairs 2i with 2i + 1, so its converter interleaves the two halves
    of each head: w.reshape(n_head, 2, d, ...).swapaxes(1, 2). This is the inverse."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# -- the checkpoint ----------------------------------------------------------------------------
class GGUFCheckpoint:
    """A checked GGUF file: its family, config and tokenizer, and its tensors on demand."""

    def __init__(self, path: str, metadata: dict, tensors: list[_Tensor]):
        self.path = path
        self.metadata = metadata
        self.architecture: str = metadata["general.architecture"]
        arch = self.architecture
        family = families.by_gguf_arch(arch, lambda key: bool(metadata.get(f"{arch}.{key}")))
        if family is None:
            raise CheckpointError(f"{path}: no family of slm reads architecture {arch!r} with this metadata")
        self.family: families.Family = family
        self._tensors = tensors
        self._tokenizer: GGUFTokenizer | None = None
        for t in tensors:  # refuse an unknown tensor now, not after loading half the model
            if not self._known(t.name):
                raise CheckpointError(f"{path}: unexpected tensor {t.name!r} for a {arch} model")
        self.config: ModelConfig = _config(self)
        self.hf_config: dict = self.config.to_hf()
        self.generation_config: dict = {k: self.hf_config[k] for k in ("bos_token_id", "eos_token_id")}

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({self.path!r}, {self.architecture}, {len(self._tensors)} tensors)"

    def _known(self, name: str) -> bool:
        m = _QKV.match(name)
        if m:
            return all(self.family.hf_from_gguf(f"blk.{m[1]}.attn_{x}.{m[2]}") for x in "qkv")
        return name.endswith((".weight", ".bias")) and self.family.hf_from_gguf(name) is not None

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, float32 CPU tensor in Hugging Face layout), one tensor at a time."""
        for name, w, _ in self.tensors_and_blocks(lambda t: False):
            yield name, w

    def tensors_and_blocks(self, keep) -> Iterator[tuple[str, torch.Tensor, tuple[int, torch.Tensor] | None]]:
        """As tensors(), with a third item: for a quantized tensor where keep(ggml type) is true, its
        blocks as stored, (ggml type, uint8 tensor [rows, bytes per row]) in Hugging Face row order
        (rows permuted and split as the fp32 tensor's are), else None."""
        with open(self.path, "rb") as f:
            for t in self._tensors:
                raw = keep(t.type) and len(t.shape) == 2
                w, blocks = self._read(f, t, raw)
                yield from self._convert(t.name, w, None if blocks is None else (t.type, blocks))

    def block_types(self, kept: dict[str, int] | None = None) -> dict[str, int]:
        """The quantized block formats of the file's matrices (F32/F16/BF16 aside) -> how many
        tensors of each, less those a loader kept in their blocks (kept: format -> tensors)."""
        out: dict[str, int] = {}
        for t in self._tensors:
            if len(t.shape) == 2 and t.type not in (0, 1, 30):  # F32, F16, BF16
                name = gguf.GGMLQuantizationType(t.type).name
                out[name] = out.get(name, 0) + 1
        left = {n: c - (kept or {}).get(n, 0) for n, c in out.items()}
        return {n: c for n, c in sorted(left.items(), key=lambda kv: -kv[1]) if c > 0}

    def tokenizer(self) -> GGUFTokenizer:
        """The tokenizer the metadata describes: (tokenizers.Tokenizer, settings, chat template),
        built once; runtime.tokenizer.Tokenizer(*parts) is slm's tokenizer of it."""
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(self.metadata, self.path, self.family.gguf_ranks_by_order)
        return self._tokenizer

    def _read(self, f, t: _Tensor, raw: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the fp32 tensor, and with raw its bytes as uint8 [rows, bytes per row], else None)"""
        shape = t.shape or (1,)
        rows = int(np.prod(shape[:-1]))
        row_bytes = t.nbytes // max(rows, 1)
        out = np.empty((rows, shape[-1]), np.float32)
        # 4 MB of blocks at a time, so the peak stays near the float32 result itself; with raw the
        # chunks are read into one buffer of the whole tensor, which is kept.
        step = max(1, (4 << 20) // max(row_bytes, 1))
        data = np.empty(rows * row_bytes if raw else min(rows, step) * row_bytes, np.uint8)
        f.seek(t.start)
        for r in range(0, rows, step):
            n = min(step, rows - r)
            chunk = data[r * row_bytes:(r + n) * row_bytes] if raw else data[:n * row_bytes]
            if f.readinto(memoryview(chunk)) != chunk.size:  # the file shrank since read_gguf
                raise CheckpointError(f"{self.path}: truncated while reading tensor {t.name!r}")
            out[r:r + n] = dequantize(chunk.reshape(n, row_bytes), gguf.GGMLQuantizationType(t.type))
        blocks = torch.from_numpy(data.reshape(rows, row_bytes)) if raw else None
        return torch.from_numpy(out.reshape(t.shape)), blocks

    def _convert(self, name: str, w: torch.Tensor, blocks: tuple[int, torch.Tensor] | None = None
                 ) -> Iterator[tuple[str, torch.Tensor, tuple[int, torch.Tensor] | None]]:
        """(Hugging Face name, tensor, blocks) of one GGUF tensor, llama.cpp's conventions undone."""
        cfg, family = self.config, self.family
        m = _QKV.match(name)
        if m:  # Q, K and V stacked by rows: three tensors
            q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            if w.shape[0] != q + 2 * kv:
                raise CheckpointError(f"{self.path}: tensor {name!r} has {w.shape[0]} rows, not {q} + 2 x {kv}")
            parts = [(f"blk.{m[1]}.attn_{x}.{m[2]}", rows) for x, rows in
                     (("q", slice(0, q)), ("k", slice(q, q + kv)), ("v", slice(q + kv, None)))]
            pieces = [(part, w[rows].clone(), None if blocks is None else (blocks[0], blocks[1][rows].contiguous()))
                      for part, rows in parts]
        else:
            pieces = [(name, w, blocks)]
        for name, w, blocks in pieces:
            if family.gguf_permute_qk and (".attn_q." in name or ".attn_k." in name):
                heads = cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads
                if w.shape[0] % (2 * heads):
                    raise CheckpointError(f"{self.path}: tensor {name!r} has {w.shape[0]} rows, not {heads} heads")
                w = _unpermute(w, heads)
                if blocks is not None:  # a row permutation: whole rows of blocks move with it
                    blocks = (blocks[0], _unpermute(blocks[1], heads).contiguous())
            if family.gguf_norm_plus_one and name.endswith("norm.weight"):
                w -= 1.0  # llama.cpp bakes the RMSNorm scale (1 + w) into the file; Hugging Face stores w
            yield family.hf_from_gguf(name), w, blocks


def read_gguf(path: str) -> GGUFCheckpoint:
    path = os.fspath(path)
    return GGUFCheckpoint(path, *_parse(path))


# -- config ------------------------------------------------------------------------------------
def _f32(x) -> float:
    """A float32 metadata value as the decimal it was written from (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(x)))


def _config(c: GGUFCheckpoint) -> ModelConfig:
    """The ModelConfig the metadata describes. Common to every architecture but for what the
    family's record adds (its `gguf_read`); refused with a CheckpointError if corrupt."""
    arch, meta, names, family = c.architecture, c.metadata, {t.name: t.shape for t in c._tensors}, c.family

    def m(key: str, default=KeyError):
        value = meta.get(f"{arch}.{key}", default)
        if value is KeyError:
            raise CheckpointError(f"{c.path}: metadata lacks {arch}.{key}")
        return value

    heads = m("attention.head_count")
    tokens = meta.get("tokenizer.ggml.tokens")
    if "token_embd.weight" not in names and not tokens:
        raise CheckpointError(f"{c.path}: no token_embd.weight and no tokenizer.ggml.tokens to size the vocabulary")
    sizes = {
        "vocab_size": names["token_embd.weight"][0] if "token_embd.weight" in names else len(tokens),
        "hidden_size": m("embedding_length"),
        "intermediate_size": m("feed_forward_length"),
        "num_layers": m("block_count"),
        "num_heads": heads,
        "num_kv_heads": m("attention.head_count_kv", heads),
        "max_seq_len": m("context_length"),
    }
    if m("attention.key_length", None):
        sizes["head_dim"] = m("attention.key_length")
    for key, value in sizes.items():
        if not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"{c.path}: corrupt metadata: {key} would be {value!r}")
    kw = dict(name=os.path.splitext(os.path.basename(c.path))[0], family=family.name, **sizes)
    try:
        rms = family.switches.get("norm", "rmsnorm") == "rmsnorm"
        kw["norm_eps"] = _f32(m("attention.layer_norm_rms_epsilon" if rms else "attention.layer_norm_epsilon"))
        if m("rope.freq_base", None) is not None:
            kw["rope_theta"] = _f32(m("rope.freq_base"))
        if m("rope.dimension_count", None) is not None:
            kw["partial_rotary_factor"] = m("rope.dimension_count") / (kw.get("head_dim") or kw["hidden_size"] // heads)
        scaling = m("rope.scaling.type", "none")
        if scaling == "linear":
            kw["rope_scaling_factor"] = _f32(m("rope.scaling.factor", 1.0))
        elif scaling != "none":
            raise CheckpointError(f"{c.path}: rope scaling {scaling!r} is not supported yet")
        if family.carries("sliding_window") and m("attention.sliding_window", None):
            kw["sliding_window"] = m("attention.sliding_window")
        if family.carries("attention_bias"):
            kw["attention_bias"] = "blk.0.attn_q.bias" in names or "blk.0.attn_qkv.bias" in names
        if family.carries("mlp_bias"):
            kw["mlp_bias"] = "blk.0.ffn_up.bias" in names
        kw["tie_embeddings"] = "output.weight" not in names
        for key, gguf_key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
            kw[f"{key}_token_id"] = meta.get(f"tokenizer.ggml.{gguf_key}_token_id")
        if family.gguf_read:
            family.gguf_read(m, kw)
        return ModelConfig(**kw)
    except CheckpointError:
        raise
    except (ValueError, TypeError, ArithmeticError) as e:  # ConfigError among them; a value of the wrong type
        raise CheckpointError(f"{c.path}: corrupt or unsupported metadata ({e})") from None


def load_model(ckpt: GGUFCheckpoint, dtype: torch.dtype | None = None, device=None,
               quantizer: StreamingQuantizer | None = None) -> Transformer:
    """The model of a GGUF file (checkpoint/loader.py). With a quantizer, the tensors stored in
    blocks it keeps (`keeps_blocks`) reach it as they are, beside their fp32 values."""
    keep = quantizer.keeps_blocks if quantizer is not None else (lambda qtype: False)
    tensors = ((ckpt.path, name, t.shape, t, blocks) for name, t, blocks in ckpt.tensors_and_blocks(keep))
    return load(ckpt.config, tensors, ckpt.path, dtype, device, quantizer, config_name="the GGUF metadata")
