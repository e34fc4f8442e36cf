"""slm generate, info, models: running a model (slm chat: chat.py)."""

from __future__ import annotations

import os
import sys

from ..runtime.lm import LM
from ..runtime.sampling import Sampling
from .flags import add_flags, check_load_flags, load_flags, model_flag, receipt_flag, values

# The flags of runtime.sampling.Sampling (defaults from there).
SAMPLING = [
    ("temperature", "0: greedy, the most likely token each time; higher: more varied text"),
    ("top_k", "sample among the k most likely tokens only (0: all)"),
    ("top_p", "sample among the fewest most likely tokens whose probability reaches p (1: all)"),
    ("repetition_penalty", "divide the positive logits of the text's tokens by this, multiply the negative (1: off)"),
    ("seed", "random seed of the sampling (default: a different draw each run)"),
    ("stop", "a stop string: the text ends before it (repeatable; default: none)", {"action": "append"}),
]


def sampling_flags(p, method) -> None:
    """--max-new-tokens (default from LM.<method>), the sampling flags and how to load the model."""
    add_flags(p, method, [("max_new_tokens", "tokens to generate at most", {"min": 1})])
    add_flags(p, Sampling, SAMPLING)
    load_flags(p)


def generate_flags(p) -> None:
    model_flag(p)
    p.add_argument("--prompt", required=True, help="the text to continue")
    sampling_flags(p, LM.stream)
    receipt_flag(p)
    p.add_argument("--no-receipt-summary", action="store_true", help="write the receipt without printing it")


def check_run_args(a) -> None:
    """What can be checked before the model loads: the sampling settings, dtype and device."""
    Sampling(**values(a, SAMPLING))
    check_load_flags(a)


def generate(a) -> None:
    from .. import load
    from ..footprint import track
    from ..runtime.tokenizer import check_text
    check_text(a.prompt, "--prompt")
    check_run_args(a)
    with track("generate", path=a.receipt, device=a.device, quiet=a.no_receipt_summary) as receipt:
        lm = load(a.model, dtype=a.dtype, device=a.device, quantize=a.quantize, group_size=a.group_size,
              tokenizer=a.tokenizer)
        receipt.watch(lm)
        for chunk in lm.stream(a.prompt, a.max_new_tokens, **values(a, SAMPLING)):
            sys.stdout.write(chunk)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()


def models_flags(p) -> None:
    pass


def models(a) -> None:
    """The models slm knows by name: installed or not, size, licence and where each lives."""
    from ..runtime.models import DEFAULT_BASE_MODEL, DEFAULT_CHAT_MODEL, KNOWN
    rows = [("name", "kind", "size", "licence", "where (or how to install)")]
    for m in KNOWN.values():
        at = m.where()
        default = " (default)" if m.name in (DEFAULT_CHAT_MODEL, DEFAULT_BASE_MODEL) else ""
        rows.append((m.name, m.kind + default, _human(at[1]) if at else "-", m.licence, at[0] if at else m.pip))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(f"{v:<{w}}" for v, w in zip(r, widths)) + "  " + r[-1])
    print(f"\nslm chat, serve and data distill use {DEFAULT_CHAT_MODEL}; generate, eval and explain "
          f"{DEFAULT_BASE_MODEL}. Pass --model NAME, or a model folder or .gguf file.")


def info_flags(p) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="Hugging Face model folder (its config.json) or .gguf file (its header)")
    g.add_argument("--preset", help="a registry architecture, e.g. slm-1m, gemma-3-270m, mistral-7b-v0.1")


def info(a) -> None:
    from ..model.config import get_config, memory_table
    if a.preset:
        cfg = get_config(a.preset)
    elif os.path.isfile(a.model):
        from ..checkpoint.gguf import read_gguf
        from ..model.config import ModelConfig
        cfg = ModelConfig.from_hf(read_gguf(a.model).hf_config, name=os.path.basename(a.model))
    else:
        from ..checkpoint.hf import read_config
        cfg = read_config(a.model)
    n = cfg.num_params()
    rows = [
        ("name", cfg.name), ("family", cfg.family),
        ("parameters", f"{n:,} ({n / 1e6:.1f}M)"),
        ("layers", cfg.num_layers), ("hidden size", cfg.hidden_size), ("MLP size", cfg.intermediate_size),
        ("attention heads", f"{cfg.num_heads} (KV heads {cfg.num_kv_heads}, head dim {cfg.head_dim})"),
        ("context", cfg.max_seq_len), ("sliding window", cfg.sliding_window or "-"),
        ("rope", f"theta {cfg.rope_theta:g}, rotary dim {cfg.rotary_dim}/{cfg.head_dim}"),
        ("vocabulary", cfg.vocab_size), ("tied embeddings", cfg.tie_embeddings),
    ]
    rows += [(f"weights {k}", _human(v)) for k, v in memory_table(cfg).items()]
    rows.append(("KV cache (bf16, full context)", _human(cfg.kv_cache_bytes())))
    if cfg.source:
        rows.append(("source", cfg.source))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
