"""GGUF files (llama.cpp's format) read as Hugging Face checkpoints: config, tensors, tokenizer.

A GGUF file is a header (key/value metadata, then a table of tensors) followed by the tensor data,
most of it quantized in blocks. `read_gguf` parses and checks the header. `tensors()` dequantizes one
tensor at a time to float32 and undoes llama.cpp's conventions (Q/K row order, Gemma's 1 + w norms,
fused QKV), so the names, shapes and values are those of the Hugging Face checkpoint:

    ckpt = read_gguf("gemma-3-270m-q4_k_m.gguf")
    ckpt.hf_config                      # a config.json-style dict
    for name, t in ckpt.tensors(): ...  # ("model.layers.0.self_attn.q_proj.weight", fp32 tensor)
    tok = ckpt.tokenizer()

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

from ..model import Transformer
from ..model.config import ConfigError, ModelConfig
from ..quant.apply import StreamingQuantizer
from .loader import load
from .safetensors_io import CheckpointError

ARCHITECTURES = ("llama", "phi2", "gemma3")
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
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: unsupported architecture {arch!r}; slm reads {', '.join(ARCHITECTURES)}")
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
_TOP = {"token_embd": "model.embed_tokens", "output": "lm_head", "output_norm": "model.norm"}
_LLAMA = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
          "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
# GGUF name -> Hugging Face name, per architecture: top-level tensors, and those of blk.N -> model.layers.N.
_NAMES = {
    "llama": (_TOP, {**_LLAMA, "ffn_norm": "post_attention_layernorm"}),
    "phi2": ({**_TOP, "output_norm": "model.final_layernorm"},
             {**_LLAMA, "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.dense",
              "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"}),
    "gemma3": (_TOP, {**_LLAMA, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
                      "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
                      "post_ffw_norm": "post_feedforward_layernorm"}),
}
_NAME = re.compile(r"^(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)$")


def _hf_name(arch: str, name: str) -> str | None:
    m = _NAME.match(name)
    top, layer = _NAMES[arch]
    hf = m and (top.get(m[2]) if m[1] is None else layer.get(m[2]))
    if not hf:
        return None
    return f"{hf}.{m[3]}" if m[1] is None else f"model.layers.{m[1]}.{hf}.{m[3]}"


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's LlamaModel.permute of Q/K rows. Hugging Face's rotary embedding pairs dimension
    i with i + head_dim/2, llama.cpp's pairs 2i with 2i + 1, so its converter interleaves the two halves
    of each head: w.reshape(n_head, 2, d, ...).swapaxes(1, 2). This is the inverse."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# -- the checkpoint ----------------------------------------------------------------------------
class GGUFCheckpoint:
    """A checked GGUF file: its Hugging Face config and tokenizer, and its tensors on demand."""

    def __init__(self, path: str, metadata: dict, tensors: list[_Tensor]):
        self.path = path
        self.metadata = metadata
        self.architecture: str = metadata["general.architecture"]
        self._tensors = tensors
        self._tokenizer = None
        for t in tensors:  # refuse an unknown tensor now, not after loading half the model
            if _hf_name(self.architecture, t.name) is None:
                raise CheckpointError(f"{path}: unexpected tensor {t.name!r} for a {self.architecture} model")
        self.hf_config: dict = _hf_config(self)
        self.generation_config: dict = {k: self.hf_config[k] for k in ("bos_token_id", "eos_token_id")}

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({self.path!r}, {self.architecture}, {len(self._tensors)} tensors)"

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

    def tokenizer(self):
        """The tokenizer the metadata describes, as slm.runtime.tokenizer.Tokenizer (built once)."""
        if self._tokenizer is None:
            self._tokenizer = _build_tokenizer(self)
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
        arch, cfg, hf = self.architecture, self.hf_config, _hf_name(self.architecture, name)
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            heads = cfg["num_attention_heads"] if ".attn_q." in name else cfg["num_key_value_heads"]
            if w.shape[0] % (2 * heads):
                raise CheckpointError(f"{self.path}: tensor {name!r} has {w.shape[0]} rows, not {heads} heads")
            w = _unpermute(w, heads)
            if blocks is not None:  # a row permutation: whole rows of blocks move with it
                blocks = (blocks[0], _unpermute(blocks[1], heads).contiguous())
        if arch == "gemma3" and name.endswith("norm.weight"):
            w -= 1.0  # llama.cpp bakes Gemma's RMSNorm scale (1 + w) into the file; Hugging Face stores w
        if ".attn_qkv." in name:  # Phi-2 converted from its original layout: q, k, v stacked by rows
            head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
            q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
            if w.shape[0] != q + 2 * kv:
                raise CheckpointError(f"{self.path}: tensor {name!r} has {w.shape[0]} rows, not {q} + 2 x {kv}")
            for part, rows in (("q_proj", slice(0, q)), ("k_proj", slice(q, q + kv)), ("v_proj", slice(q + kv, None))):
                yield (hf.replace("qkv_proj", part), w[rows].clone(),
                       None if blocks is None else (blocks[0], blocks[1][rows].contiguous()))
        else:
            yield hf, w, blocks


def read_gguf(path: str) -> GGUFCheckpoint:
    path = os.fspath(path)
    return GGUFCheckpoint(path, *_parse(path))


def load_model(ckpt: GGUFCheckpoint, dtype: torch.dtype | None = None, device=None,
               quantizer: StreamingQuantizer | None = None) -> Transformer:
    """The model of a GGUF file (checkpoint/loader.py). With a quantizer, the tensors stored in
    blocks it keeps (`keeps_blocks`) reach it as they are, beside their fp32 values."""
    try:
        cfg = ModelConfig.from_hf(ckpt.hf_config, name=os.path.splitext(os.path.basename(ckpt.path))[0])
    except ConfigError as e:
        raise CheckpointError(f"{ckpt.path}: {e}") from None
    keep = quantizer.keeps_blocks if quantizer is not None else (lambda qtype: False)
    tensors = ((ckpt.path, name, t.shape, t, blocks) for name, t, blocks in ckpt.tensors_and_blocks(keep))
    return load(cfg, tensors, ckpt.path, dtype, device, quantizer, config_name="the GGUF metadata")


# -- config ------------------------------------------------------------------------------------
def _f32(x) -> float:
    """A float32 metadata value as the decimal it was written from (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(x)))


def _hf_config(c: GGUFCheckpoint) -> dict:
    arch, meta, names = c.architecture, c.metadata, {t.name: t.shape for t in c._tensors}

    def m(key: str, default=KeyError):
        value = meta.get(f"{arch}.{key}", default)
        if value is KeyError:
            raise CheckpointError(f"{c.path}: metadata lacks {arch}.{key}")
        return value

    heads = m("attention.head_count")
    tokens = meta.get("tokenizer.ggml.tokens")
    if "token_embd.weight" not in names and not tokens:
        raise CheckpointError(f"{c.path}: no token_embd.weight and no tokenizer.ggml.tokens to size the vocabulary")
    cfg = {
        "vocab_size": names["token_embd.weight"][0] if "token_embd.weight" in names else len(tokens),
        "hidden_size": m("embedding_length"),
        "intermediate_size": m("feed_forward_length"),
        "num_hidden_layers": m("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": m("attention.head_count_kv", heads),
        "max_position_embeddings": m("context_length"),
    }
    if m("attention.key_length", None):
        cfg["head_dim"] = m("attention.key_length")
    for key, value in cfg.items():
        if not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"{c.path}: corrupt metadata: {key} would be {value!r}")
    if m("rope.scaling.type", "none") != "none":  # passed on, so that a reader can refuse it
        cfg["rope_scaling"] = {"rope_type": m("rope.scaling.type"), "factor": _f32(m("rope.scaling.factor", 1.0))}
    if arch == "llama":
        window = m("attention.sliding_window", None)  # llama.cpp writes Mistral as llama
        cfg.update(model_type="mistral" if window else "llama",
                   architectures=["MistralForCausalLM" if window else "LlamaForCausalLM"], hidden_act="silu",
                   rms_norm_eps=_f32(m("attention.layer_norm_rms_epsilon")), rope_theta=_f32(m("rope.freq_base", 1e4)),
                   attention_bias="blk.0.attn_q.bias" in names, mlp_bias="blk.0.ffn_up.bias" in names)
        if window:
            cfg["sliding_window"] = window
    elif arch == "phi2":
        head_dim = cfg["hidden_size"] // heads
        cfg.update(model_type="phi", architectures=["PhiForCausalLM"], hidden_act="gelu_new", qk_layernorm=False,
                   layer_norm_eps=_f32(m("attention.layer_norm_epsilon")), rope_theta=_f32(m("rope.freq_base", 1e4)),
                   partial_rotary_factor=m("rope.dimension_count", head_dim) / head_dim)
    elif arch == "gemma3":
        head_dim = m("attention.key_length", cfg["hidden_size"] // heads)
        pattern = m("attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):  # one flag per layer: true = sliding window
            layer_types = ["sliding_attention" if swa else "full_attention" for swa in pattern]
        else:  # llama.cpp's Gemma 3: every 6th layer attends globally
            layer_types = ["full_attention" if pattern and (i + 1) % pattern == 0 else "sliding_attention"
                           for i in range(cfg["num_hidden_layers"])]
        cfg.update(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], head_dim=head_dim,
                   rms_norm_eps=_f32(m("attention.layer_norm_rms_epsilon")), rope_theta=_f32(m("rope.freq_base", 1e6)),
                   rope_local_base_freq=10000.0, sliding_window=m("attention.sliding_window"),
                   layer_types=layer_types, query_pre_attn_scalar=head_dim, hidden_activation="gelu_pytorch_tanh",
                   final_logit_softcapping=None, attn_logit_softcapping=None)
    cfg["tie_word_embeddings"] = "output.weight" not in names
    for key, gguf_key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        cfg[f"{key}_token_id"] = meta.get(f"tokenizer.ggml.{gguf_key}_token_id")
    return cfg


# -- tokenizer ---------------------------------------------------------------------------------
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)

# Byte-level vocabularies: the split before byte-level BPE, by tokenizer.ggml.pre. None: ByteLevel's own (GPT-2).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {None: None, "default": None, "gpt-2": None, "phi-2": None,
           "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet byte-level vocabularies are spelled in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def _spm_merges(tokens: list[str], vocab: dict[str, int], rank) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every split of a token into two tokens,
    best-ranked token first, longer left piece first -- transformers' `generate_merges` order, found
    with one dict lookup per split instead of its per-token sorts."""
    found = []
    for i, tok in enumerate(tokens):
        for k in range(len(tok) - 1, 0, -1):
            left = tok[:k]
            if left in vocab and tok[k:] in vocab:
                found.append((rank[i], left, tok[k:]))
    found.sort(key=lambda x: (-x[0], -len(x[1]), -len(x[2])))  # stable: ties keep vocabulary order
    return [(left, right) for _, left, right in found]


def _build_tokenizer(c: GGUFCheckpoint):
    from tokenizers import AddedToken, Regex, Tokenizer as Tk, decoders, models, normalizers, pre_tokenizers, processors

    from ..runtime.tokenizer import Tokenizer

    meta, path = c.metadata, c.path
    kind, tokens = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.tokens")
    if kind not in ("llama", "gpt2") or not tokens:
        raise CheckpointError(f"{path}: cannot build a tokenizer from tokenizer.ggml.model {kind!r}; slm reads "
                              "'llama' (SentencePiece) and 'gpt2' (byte-level BPE) vocabularies")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    named = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= i < len(tokens):
            named[name] = tokens[i]

    if kind == "llama":
        # llama.cpp writes a token of spaces with real spaces where SentencePiece means U+2581, the
        # character every space becomes before BPE: respell them, or they could never match.
        spelled = [t.replace(" ", "\u2581") if " " in t and not t.strip() else t for t in tokens]
        vocab = {t: i for i, t in enumerate(spelled)}
        # A merge ranks as the token it makes, by score. Gemma's scores do not follow its merge order,
        # its vocabulary order does (and serves for a file without scores, too).
        rank = meta.get("tokenizer.ggml.scores") or []
        if c.architecture.startswith("gemma") or len(rank) != len(tokens):
            rank = range(0, -len(tokens), -1)
        unk = named.get("unk_token", "<unk>" if "<unk>" in vocab else None)
        tk = Tk(models.BPE(vocab, _spm_merges(spelled, vocab, rank), unk_token=unk, fuse_unk=True, byte_fallback=True))
        dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if meta.get("tokenizer.ggml.add_space_prefix", True):  # Llama 2: "Hi" is encoded as "▁Hi"
            tk.pre_tokenizer = pre_tokenizers.Metaspace("\u2581", prepend_scheme="first", split=False)
            dec.append(decoders.Strip(" ", 1, 0))
        else:  # Gemma
            tk.normalizer = normalizers.Replace(" ", "\u2581")
        tk.decoder = decoders.Sequence(dec)
        default_bos = True  # what llama.cpp does for SentencePiece vocabularies that do not say
    else:
        pre = meta.get("tokenizer.ggml.pre")
        if pre not in _SPLITS:
            raise CheckpointError(f"{path}: unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre); slm knows "
                                  f"{', '.join(p for p in _SPLITS if p)}")
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        # Added tokens outside the byte alphabet (runs of real spaces) are respelled as their bytes.
        spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()) for t in tokens]
        vocab = {t: i for i, t in enumerate(spelled)}
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        tk = Tk(models.BPE(vocab, merges, fuse_unk=False))
        if _SPLITS[pre]:
            tk.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        default_bos = False

    # Control tokens (<bos>, <start_of_turn>) are special, user-defined ones (<b>, "\n\n") plain added
    # tokens: llama.cpp matches both whole in the text, so BPE must not cut them up. A token respelled
    # above is no longer in the vocabulary under its file spelling, and is left to BPE, as transformers does.
    special = [t for t, ty in zip(tokens, types) if ty == _CONTROL and t in vocab]
    special += [t for t in named.values() if t in vocab and t not in special]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab])

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)) and named.get("bos_token") in vocab
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and named.get("eos_token") in vocab
    if add_bos or add_eos:  # added by the post-processor, so the saved tokenizer.json does it too
        first = [named["bos_token"]] if add_bos else []
        last = [named["eos_token"]] if add_eos else []
        single = " ".join(first + ["$A"] + last)
        pair = " ".join([single] + [f"{t}:1" for t in first] + ["$B:1"] + [f"{t}:1" for t in last])
        tk.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in dict.fromkeys(first + last)])

    # Without tokenizer.chat_template (Gemma 3 270M has none) Tokenizer picks a format from the vocabulary.
    config = {**named, "add_bos_token": add_bos, "add_eos_token": add_eos}
    return Tokenizer(tk, config, meta.get("tokenizer.chat_template"))
