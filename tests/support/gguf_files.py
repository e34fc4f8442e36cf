"""GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes them, independently of slm's
reader and writer: tensors, metadata and the two kinds of vocabulary (tests/checkpoint/test_gguf.py,
tests/quant/test_gguf_blocks.py)."""

from __future__ import annotations

import json

import numpy as np
import torch
import gguf
from gguf import GGMLQuantizationType as Q

from .models import CORPUS

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
TEXTS = ["Once upon a time, there was a little girl named Lily.", "  two  spaces and\nnew lines\n\n",
         "Tom counted 3 apples and 12 pears.", "émoji 😀 and ünïcödé", "<|im_start|>user\nHi!<|im_end|>\n", " x", ""]


# -- writing GGUF files the way llama.cpp's convert_hf_to_gguf.py does ---------------------------------
def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {  # Hugging Face name pieces -> GGUF, written independently of the reader's table
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.dense": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
}


def gguf_tensors(arch: str, cfg, sd: dict[str, torch.Tensor], fuse_qkv: bool = False) -> dict[str, np.ndarray]:
    out = {}
    for name, t in sd.items():
        w = t.detach().float().numpy()
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            part, kind = rest.rsplit(".", 1)
            g = f"blk.{i}.{GGUF_NAMES[part]}.{kind}"
            if arch == "llama" and part in ("self_attn.q_proj", "self_attn.k_proj"):
                w = permute(w, cfg.num_attention_heads if "q_proj" in part else cfg.num_key_value_heads)
        else:
            g = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
                 "lm_head.bias": "output.bias", "model.norm.weight": "output_norm.weight",
                 "model.final_layernorm.weight": "output_norm.weight",
                 "model.final_layernorm.bias": "output_norm.bias"}[name]
        out[g] = w
    if fuse_qkv:  # old Phi-2 conversions store one attn_qkv per layer
        for i in range(cfg.num_hidden_layers):
            for kind in ("weight", "bias"):
                parts = [out.pop(f"blk.{i}.attn_{x}.{kind}") for x in "qkv"]
                out[f"blk.{i}.attn_qkv.{kind}"] = np.concatenate(parts)
    return out


def write_gguf(path, arch: str, cfg, tensors: dict[str, np.ndarray], qtype=Q.F32, vocab: dict | None = None) -> str:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    if arch == "phi2":
        w.add_layer_norm_eps(cfg.layer_norm_eps)
        factor = cfg.rope_parameters["partial_rotary_factor"]  # as Phi2Model.set_gguf_parameters writes it:
        w.add_rope_dimension_count(int(factor * cfg.hidden_size) // cfg.num_attention_heads)
    else:
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        w.add_rope_dimension_count(head_dim)
    if getattr(cfg, "sliding_window", None):
        w.add_sliding_window(cfg.sliding_window)
    for key, value in (vocab or {}).items():
        getattr(w, f"add_{key}")(value)
    for name, t in tensors.items():
        # As llama.cpp does, 1-D tensors (norms, biases) stay F32 whatever the file's type.
        q = qtype if t.ndim == 2 else Q.F32
        data = gguf.quants.quantize(t, q)
        w.add_tensor(name, data, raw_dtype=q if data.dtype == np.uint8 else None)
    finish(w)
    return str(path)


def finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# -- tokenizers to store ---------------------------------------------------------------------------------
def bpe_vocab() -> tuple[object, dict]:
    """A byte-level BPE (GPT-2 style, as Phi-2's) and its GGUF metadata."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokens = sorted(tk.get_vocab(), key=tk.get_vocab().get)
    merges = [" ".join(m) for m in json.loads(tk.to_str())["model"]["merges"]]
    return tk, dict(tokenizer_model="gpt2", tokenizer_pre="default", token_list=tokens, token_merges=merges,
                    token_types=[3 if t in SPECIALS else 1 for t in tokens], bos_token_id=1, eos_token_id=2,
                    add_bos_token=True, chat_template="{{ messages }}")


def spm_vocab() -> dict:
    """A SentencePiece-style vocabulary (Llama 2's layout: specials, 256 byte tokens, then pieces)."""
    from tokenizers import SentencePieceBPETokenizer

    spm = SentencePieceBPETokenizer()
    spm.train_from_iterator(CORPUS, vocab_size=300, special_tokens=SPECIALS[:3], show_progress=False)
    pieces = [t for t in sorted(spm.get_vocab(), key=spm.get_vocab().get) if t not in SPECIALS]
    tokens = SPECIALS[:3] + [f"<0x{b:02X}>" for b in range(256)] + pieces + SPECIALS[3:] + ["<tag>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [3, 3, 4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0] * 3
    return dict(tokenizer_model="llama", token_list=tokens, token_scores=scores, token_types=types,
                unk_token_id=0, bos_token_id=1, eos_token_id=2, add_bos_token=True)
