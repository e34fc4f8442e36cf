"""Write a model as a GGUF file that llama.cpp (and Ollama) run: the inverse of `gguf.py`.

    write_gguf(lm, "model.gguf", dtype="q8_0")     # f32 | f16 | q8_0

Architectures: those of the families whose record says so (model/families.py, `gguf_export`):
Llama 2 / Orca 2 and Mistral as llama.cpp's `llama`, Phi-2 as `phi2`. Tensors get the family's
GGUF names and llama.cpp's conventions for it (Q/K rows permuted for its interleaved rotary pairs,
norms stored as 1 + w), the tokenizer (byte-level BPE as `gpt2`, SentencePiece-style BPE as
`llama`) and the chat template go into the metadata. A model read from a GGUF file (`source`) keeps
that file's tokenizer metadata as it was, tokenizer.ggml.pre included; a byte-level Hugging Face
tokenizer gets the tokenizer.ggml.pre whose split its tokenizer.json's pre-tokenizer is
(gguf_tokenizer.PRE_TOKENIZERS), or `gpt-2` when it is none of them. Norms and biases stay f32, as llama.cpp's own converter keeps them. A quantized
model is dequantized layer by layer first. Written with the `gguf` package to a temporary file
that replaces `path` when complete.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import torch

from ..files import atomic_path
from ..model import families
from .gguf import read_gguf
from .gguf_tokenizer import _CONTRACTIONS, _GPT2, PRE_TOKENIZERS
from .hf import _dequantized_tensors
from .safetensors_io import CheckpointError

DTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
          "q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def gguf_name(family: families.Family, hf: str) -> str:
    """Hugging Face tensor name -> llama.cpp's (model.layers.3.mlp.fc1.bias -> blk.3.ffn_up.bias)."""
    name = family.gguf_name(hf)
    if name is None:
        raise CheckpointError(f"no GGUF name for tensor {hf!r}")
    return name


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute: pair rotary dims (2i, 2i+1) instead of (i, i + d/2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _splits(pre: dict | None) -> list[str] | None:
    """The regexes a tokenizer.json pre-tokenizer splits by, in turn, in PRE_TOKENIZERS' spelling
    (None: one that is not a sequence of regex splits)."""
    if pre is None:
        return []
    kind = pre.get("type")
    if kind == "Sequence":
        parts = [_splits(p) for p in pre.get("pretokenizers", [])]
        return None if None in parts else [r for p in parts for r in p]
    if kind == "ByteLevel":
        return [_GPT2] if pre.get("use_regex", True) else []
    if kind == "Digits":
        return [r"\p{N}" if pre.get("individual_digits") else r"\p{N}+"]
    if kind == "Split" and "Regex" in pre.get("pattern", {}) and pre.get("behavior") == "Isolated" and not pre.get("invert"):
        return [pre["pattern"]["Regex"].replace("(?i:'s|'t|'re|'ve|'m|'ll|'d)", _CONTRACTIONS)]
    return None


def pre_name(data: dict, clean_spaces: bool | None = None) -> str:
    """The tokenizer.ggml.pre of a byte-level tokenizer.json (parsed): the first value of
    PRE_TOKENIZERS with its split and whole-word lookup, one with clean_spaces (the tokenizer's
    clean_up_tokenization_spaces) before one without; `gpt-2` if none has them."""
    splits, ignore_merges = _splits(data.get("pre_tokenizer")), bool(data["model"].get("ignore_merges"))
    same = [name for name, rule in PRE_TOKENIZERS.items()
            if name is not None and list(rule.splits) == splits and rule.ignore_merges == ignore_merges]
    return next((n for n in same if PRE_TOKENIZERS[n].clean_spaces == clean_spaces), same[0] if same else "gpt-2")


def _copy_tokenizer(w: gguf.GGUFWriter, meta: dict) -> None:
    """A GGUF file's tokenizer metadata (tokenizer.*) written as it was read."""
    for key, value in meta.items():
        if not key.startswith("tokenizer.") or value == []:
            continue
        if isinstance(value, list):
            w.add_array(key, value)  # strings, int32 token types, float32 scores
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)  # token ids
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, value)


def _tokenizer(w: gguf.GGUFWriter, tok) -> None:
    """The tokenizer as llama.cpp metadata: vocabulary, merges or scores, token types, special ids."""
    data = json.loads(tok.tk.to_str())
    model = data["model"]
    if model.get("type") != "BPE":
        raise CheckpointError(f"cannot export a {model.get('type')} tokenizer to GGUF (slm writes BPE vocabularies)")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    for i, t in added.items():
        vocab.setdefault(t["content"], i)
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    for t, i in vocab.items():
        tokens[i] = t
    types = [gguf.TokenType.NORMAL] * n
    for i, t in added.items():
        types[i] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    spm = bool(model.get("byte_fallback"))  # SentencePiece-style: ▁ for spaces, <0xNN> byte tokens
    if spm:
        w.add_tokenizer_model("llama")
        w.add_token_scores([-float(i) for i in range(n)])  # merge rank follows the vocabulary order
        for i, t in enumerate(tokens):
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types[i] = gguf.TokenType.BYTE
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre_name(data, tok.config.get("clean_up_tokenization_spaces")))
        merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
        w.add_token_merges(merges)
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    for name, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                      ("pad", w.add_pad_token_id)):
        t = getattr(tok, f"{name}_token", None) if name != "unk" else tok.config.get("unk_token")
        t = t.get("content") if isinstance(t, dict) else t
        if t is not None and tok.token_id(t) is not None:
            add(tok.token_id(t))
    w.add_add_bos_token(bool(tok.bos_id is not None and tok.encode("a")[:1] == [tok.bos_id]))
    w.add_add_eos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def write_gguf(lm, path: str, dtype: str = "f32", source: str | None = None) -> None:
    """Write `lm` (an slm.LM: model, tokenizer) as a GGUF file at path. source: the GGUF file lm was
    read from, whose tokenizer metadata is written unchanged (lm.tokenizer is its tokenizer)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown GGUF dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    cfg = lm.model.config
    family = families.get(cfg.family)
    if not (family.gguf_export and family.gguf_arch):
        titles = [f.title for f in families.all_families() if f.gguf_export and f.gguf_arch]
        listed = ", ".join(titles[:-1]) + " and " + titles[-1] if len(titles) > 1 else "".join(titles)
        raise ValueError(f"GGUF export supports the {listed} families, not {cfg.family!r}")
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, family.gguf_arch)
        w.add_name(cfg.name)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_heads)
        w.add_head_count_kv(cfg.num_kv_heads)
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_rope_dimension_count(cfg.rotary_dim)
        if cfg.norm == "layernorm":
            w.add_layer_norm_eps(cfg.norm_eps)
        else:
            w.add_layer_norm_rms_eps(cfg.norm_eps)
        if cfg.sliding_window:
            w.add_sliding_window(cfg.sliding_window)
        w.add_file_type(FILE_TYPES[dtype])
        if source is not None:
            _copy_tokenizer(w, read_gguf(source).metadata)
        elif lm.tokenizer is not None:
            _tokenizer(w, lm.tokenizer)
        with torch.no_grad():
            tensors = _dequantized_tensors(lm.model)
            for hf, t in tensors.items():
                if cfg.tie_embeddings and hf == "lm_head.weight":
                    continue
                name = gguf_name(family, hf)
                t = t.float()
                if family.gguf_permute_qk and name.endswith(("attn_q.weight", "attn_q.bias")):
                    t = _permute(t, cfg.num_heads)
                elif family.gguf_permute_qk and name.endswith(("attn_k.weight", "attn_k.bias")):
                    t = _permute(t, cfg.num_kv_heads)
                if family.gguf_norm_plus_one and name.endswith("norm.weight"):
                    t = t + 1.0  # llama.cpp stores the RMSNorm scale 1 + w
                a = t.contiguous().numpy()
                if t.dim() < 2 or dtype == "f32" or (dtype == "q8_0" and a.shape[-1] % 32):
                    w.add_tensor(name, a)
                elif dtype == "f16":
                    w.add_tensor(name, a.astype(np.float16))
                else:
                    w.add_tensor(name, gguf.quants.quantize(a, DTYPES[dtype]), raw_dtype=DTYPES[dtype])
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
