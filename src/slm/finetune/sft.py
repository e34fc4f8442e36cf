"""Supervised fine-tuning on chat data: full, LoRA, or LoRA over an int8/int4 base (QLoRA).

    slm finetune --model DIR --data chats.jsonl --out run --lora --max-steps 200

Data: one JSON object a line, either {"messages": [{"role": "system"|"user"|"assistant",
"content": ...}, ...]} (OpenAI's format) or {"prompt": ..., "completion": ...} (taken as one user
turn and one assistant turn). Each conversation is rendered with the model's chat template and
only the assistant turns are learnt: every other token's target is -100. A turn's tokens are found
by rendering the conversation up to it (with and without the assistant's reply) and mapping those
character spans to tokens through the tokenizer's offsets, so it works for any template whose
renderings of a conversation's prefixes are prefixes of the whole.

Packing: conversations are packed whole into rows of --seq-len tokens (best fit, longest first);
inside a row each conversation sees only itself (a block-diagonal causal mask) and its positions
start at 0, so a packed row computes exactly what each conversation would alone, with less padding.

    out/adapter_model.safetensors + adapter_config.json    (--lora: PEFT's format)
    out/config.json + model.safetensors + tokenizer files  (full fine-tuning)
    out/metrics.jsonl, out/loss.png, out/finetune.json      (losses, the run's settings and results)
    out/checkpoint/                                         (while it runs: every --save-every steps)

Nothing is lost: `--resume` continues a run stopped at any moment (even by kill -9) from its last
checkpoint to bitwise the same weights and losses as an uninterrupted run (state.py), and a run
already in --out is replaced only with --overwrite. The receipt counts the tokens actually trained:
the real, non-padding tokens of the rows in each step's batch (`packed_flops`).
"""

from __future__ import annotations

import bisect
import ctypes
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from tqdm import tqdm

from ..files import atomic_write, parse_json
from ..footprint.flops import matmul_params
from ..model import Transformer
from ..runtime.lm import load
from ..runtime.models import resolve
from ..runtime.tokenizer import Tokenizer
from ..train.loop import lr_at, plot_metrics
from ..train.loss import fused_linear_cross_entropy
from ..train.optim import build_optimizers, load_state_tensors, set_lr
from . import lora as lora_mod
from . import state as ckpt

IGNORE = -100
ROLES = ("system", "user", "assistant")


# -- data --------------------------------------------------------------------------------------
def to_messages(record: dict, where: str = "record") -> list[dict]:
    """A record's conversation: its `messages`, or a prompt/completion pair as two turns."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty list")
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: each message needs a role ({'/'.join(ROLES)}) and string content, "
                                 f"got {m!r}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{where}: no assistant message to learn from")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    raise ValueError(f"{where}: needs 'messages' or 'prompt' and 'completion'")


def jsonl_records(path: str):
    """(line number, record) for each non-blank line of a JSONL file; a bad line (not JSON, not
    UTF-8, nested too deeply to read) is a ValueError naming the file and line."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not a .jsonl file")
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            yield i, parse_json(line, f"{path}:{i}")


def read_conversations(path: str) -> list[list[dict]]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    convs = [to_messages(record, f"{path}:{i}") for i, record in jsonl_records(path)]
    if not convs:
        raise ValueError(f"{path}: no conversations")
    return convs


def tokenize_chat(tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(token ids, labels): labels are the ids on the assistant turns (their text and the
    template's end-of-turn marker) and -100 elsewhere."""
    text = tok.apply_chat_template(messages, add_generation_prompt=False)
    enc = tok.tk.encode(text, add_special_tokens=False)
    ids = tok.encode_chat(messages, add_generation_prompt=False)  # the same, with BOS where the model wants it
    lead = len(ids) - len(enc.ids)
    if lead not in (0, 1) or ids[lead:] != enc.ids:
        raise ValueError("the chat template's text does not tokenize consistently")
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        through = tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if text.startswith(through) and through.startswith(before):
            spans.append((len(before), len(through)))
        else:  # a template that renders earlier turns differently: learn the reply's own text
            start = text.find(m["content"], cursor)
            if start < 0:
                raise ValueError("cannot find an assistant turn in the rendered conversation")
            spans.append((start, start + len(m["content"])))
        cursor = spans[-1][1]
    labels = [IGNORE] * lead
    for t, (a, _) in zip(enc.ids, enc.offsets):
        labels.append(t if any(s <= a < e for s, e in spans) else IGNORE)
    return ids, labels


@dataclass
class Packed:
    """Rows of packed conversations: inputs, next-token targets (-100: not learnt), each token's
    position within its conversation, which conversation of the row it belongs to, and which
    tokens are real (not padding)."""
    ids: torch.Tensor
    targets: torch.Tensor
    pos: torch.Tensor
    doc: torch.Tensor
    real: torch.Tensor | None = None  # default: every token
    truncated: int = 0
    dropped: int = 0

    def __post_init__(self):
        if self.real is None:
            self.real = torch.ones_like(self.ids, dtype=torch.bool)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def rows(self, index) -> "Packed":
        return Packed(self.ids[index], self.targets[index], self.pos[index], self.doc[index], self.real[index])


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int = 0) -> Packed:
    """Pack (ids, labels) examples whole into rows of seq_len tokens, longest first, each into the
    row it fills best. An example longer than a row keeps its first seq_len tokens."""
    items, truncated, dropped = [], 0, 0
    for ids, labels in examples:
        targets = labels[1:] + [IGNORE]  # token t predicts token t + 1
        if len(ids) > seq_len:
            ids, targets, truncated = ids[:seq_len], targets[:seq_len], truncated + 1
        if all(t == IGNORE for t in targets):
            dropped += 1  # nothing to learn (e.g. the reply was cut off by truncation)
            continue
        items.append((ids, targets))
    if not items:
        raise ValueError(f"no example has an assistant token within --seq-len {seq_len}")
    order = sorted(range(len(items)), key=lambda i: (-len(items[i][0]), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, row), sorted: best fit by bisection
    for i in order:
        n = len(items[i][0])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            left, r = free.pop(k)
        else:
            left, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if left - n > 0:
            bisect.insort(free, (left - n, r))
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), seq_len), dtype=torch.long)
    doc = torch.zeros((len(rows), seq_len), dtype=torch.long)
    real = torch.zeros((len(rows), seq_len), dtype=torch.bool)
    for r, members in enumerate(rows):
        at = 0
        for d, i in enumerate(members):
            x, y = items[i]
            ids[r, at:at + len(x)] = torch.tensor(x)
            targets[r, at:at + len(x)] = torch.tensor(y)
            pos[r, at:at + len(x)] = torch.arange(len(x))
            doc[r, at:at + len(x)] = d
            at += len(x)
        pos[r, at:] = torch.arange(seq_len - at)  # padding: a conversation of its own, never learnt
        doc[r, at:] = len(members)
        real[r, :at] = True
    return Packed(ids, targets, pos, doc, real, truncated, dropped)


# -- model -------------------------------------------------------------------------------------
def packed_forward(model: Transformer, ids: torch.Tensor, pos: torch.Tensor, doc: torch.Tensor,
                   checkpoint: bool = False) -> torch.Tensor:
    """The final hidden states [B, T, d] of packed rows: the model's blocks with each conversation
    attending only to itself, at its own positions (Transformer.plans with documents: a
    block-diagonal causal mask). checkpoint: recompute each block in backward (less memory)."""
    x = model.run_blocks(model.embeddings(ids), pos, model.plans(pos, documents=doc), checkpoint=checkpoint)
    return model.norm(x)


def _ce_sum(h: torch.Tensor, t: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), t, reduction="sum")


def sft_loss(model: Transformer, batch: Packed, checkpoint: bool = False, chunk: int = 256) -> tuple[torch.Tensor, int]:
    """(mean cross-entropy over the learnt tokens, their number). Only those tokens go through
    the LM head. A trainable bias-free head uses the fused chunked loss (train/loss.py); a frozen
    or quantized one is applied `chunk` tokens at a time, recomputed in backward, so [tokens, vocab]
    logits are never all held at once (256 x 49,152 fp32 logits: 48 MiB)."""
    hidden = packed_forward(model, batch.ids, batch.pos, batch.doc, checkpoint)
    keep = batch.targets != IGNORE
    h, t = hidden[keep], batch.targets[keep]
    n, head = t.numel(), model.lm_head
    if isinstance(head, nn.Linear) and head.bias is None and head.weight.requires_grad:
        return fused_linear_cross_entropy(h, head.weight, t), n
    total = sum(torch.utils.checkpoint.checkpoint(_ce_sum, h[s:s + chunk], t[s:s + chunk], head, use_reentrant=False)
                if torch.is_grad_enabled() else _ce_sum(h[s:s + chunk], t[s:s + chunk], head)
                for s in range(0, n, chunk))
    return total / max(n, 1), n


def accumulate(model: Transformer, batch: Packed, micro_batch: int, checkpoint: bool = False) -> tuple[float, int]:
    """Forward and backward over the batch `micro_batch` rows at a time, each part's gradient
    weighted by its share of the learnt tokens, so the gradients add up to those of the mean loss
    over the whole batch while only one part's activations are alive at a time. Returns (that mean
    loss, the learnt tokens)."""
    total = int((batch.targets != IGNORE).sum())
    loss_sum = 0.0
    for s in range(0, len(batch), micro_batch):
        part = batch.rows(slice(s, s + micro_batch))
        if not bool((part.targets != IGNORE).any()):
            continue
        loss, n = sft_loss(model, part, checkpoint)
        (loss * (n / total)).backward()
        loss_sum += loss.item() * n
    return loss_sum / max(total, 1), total


def packed_flops(model: Transformer, rows: Packed, mode: str) -> tuple[int, float]:
    """(real tokens, FLOPs) of one pass over packed rows; mode "full" (training every weight),
    "lora" (training adapters over frozen weights) or "eval" (forward only). Padding is left out.
    Per token, the blocks' matmuls cost 2N forward, 4N more in backward when their weights learn,
    2N more when only their inputs need a gradient (LoRA); attention charges each token the length
    of its conversation (packing isolates them, flops.py's convention otherwise), 3x in training;
    the LM head is applied to the learnt tokens only (sft_loss)."""
    cfg = model.config
    head = cfg.vocab_size * cfg.hidden_size
    body = matmul_params(cfg) - head
    real, learnt = int(rows.real.sum()), int((rows.targets != IGNORE).sum())
    width = rows.ids.shape[1] + 1
    key = (torch.arange(len(rows))[:, None] * width + rows.doc)[rows.real]
    n = torch.bincount(key).double()
    n = n[n > 0]  # each conversation's length
    seen = sum(float((n * (n.clamp(max=w) if (w := cfg.layer_window(i)) else n)).sum()) for i in range(cfg.num_layers))
    attn = 4 * seen * cfg.num_heads * cfg.head_dim
    times = {"eval": 1, "lora": 2, "full": 3}[mode]
    return real, 2 * times * (body * real + head * learnt) + (1 if mode == "eval" else 3) * attn


FLOPS_FORMULA = ("fine-tuning: the real (non-padding) tokens of each step's packed rows; per token 6N (4N with "
                 "LoRA: the frozen weights need input gradients only) + 12 L T d_attn with T its conversation's "
                 "length, the LM head only on learnt tokens; validation as inferred tokens at 2N + 4 L T d_attn; "
                 "N = weights of the blocks' matmuls (+ the head's where applied), d_attn = heads x head_dim")


# -- the run -----------------------------------------------------------------------------------
DEFAULT_SEQ_LEN, DEFAULT_WARMUP = 512, 10
# Without --epochs or --max-steps a run makes DEFAULT_EPOCHS passes, and at least DEFAULT_MIN_STEPS
# steps (a small set is one step an epoch), and stops early when the validation loss has not
# improved for --patience evaluations, keeping the weights of the best one.
DEFAULT_EPOCHS, DEFAULT_MIN_STEPS, DEFAULT_EVAL_EVERY = 3, 10, 50
DEFAULT_LR = {"lora": 1e-3, "full": 2e-5}
# Rehearsal against forgetting: general requests the model answers itself before training; its own
# answers join the training data, so the update that teaches the user's few examples is also held
# to what the model already did elsewhere. On SmolLM2-135M-Instruct, 20 examples of one made-up
# fact at the default rate without it: the fact learnt and "What is the capital of France?" lost
# ("Le Grand Garçon"); with 8 of these: both (tests/finetune/test_teach_fact.py).
REPLAY_PROMPTS = [
    "What is the largest planet in our solar system?",
    "How many days are there in a week?",
    "Who wrote Romeo and Juliet?",
    "What is 12 times 7?",
    "Give me a synonym for happy.",
    "At what temperature does water boil at sea level?",
    "Name the three primary colors.",
    "Write one sentence about the ocean.",
    "What is the chemical symbol for gold?",
    "How many continents are there?",
    "What is the opposite of cold?",
    "Which animal is known as the king of the jungle?",
]
REPLAY_TOKENS = 64  # the longest rehearsal answer


def _positive_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")


def _number(name: str, v, low: float, inclusive: bool = False, high: float | None = None) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
        (v >= low if inclusive else v > low) and (high is None or v < high)
    if not ok:
        rng = f"in [{low:g}, {high:g})" if high is not None else f"{'at least' if inclusive else 'greater than'} {low:g}"
        raise ValueError(f"--{name.replace('_', '-')} must be a number {rng}, got {v!r}")


@dataclass
class FinetuneConfig:
    model: str  # model folder or .gguf file
    data: str  # .jsonl of conversations or prompt/completion pairs
    out: str
    lora: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=list)  # Hugging Face names; empty: all projections
    # the frozen base of a LoRA run: int8 | int4 (quantized), none (fp32); default: a GGUF file's
    # own bits (base_mode), fp32 otherwise
    quantize: str | None = None
    group_size: int | None = None
    max_steps: int | None = None  # default: --epochs over the training rows
    epochs: float | None = None  # default DEFAULT_EPOCHS, at least DEFAULT_MIN_STEPS steps
    lr: float | None = None  # default DEFAULT_LR
    batch_size: int = 8  # packed rows per step (at most the training rows there are)
    micro_batch: int = 1  # rows per forward and backward; their gradients add up to the step's
    seq_len: int | None = None  # default DEFAULT_SEQ_LEN, or the model's context if shorter
    val_fraction: float = 0.1
    eval_every: int | None = None  # default: once an epoch, at most DEFAULT_EVAL_EVERY steps apart
    patience: int = 3  # evaluations without a better validation loss before stopping; 0: never stop early
    log_every: int = 5
    save_every: int = 50  # steps between checkpoints (for --resume)
    warmup: int | None = None  # default DEFAULT_WARMUP, or a tenth of a shorter run
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    gradient_checkpointing: bool | None = None  # recompute blocks in backward; default: with LoRA
    replay: int = 8  # general requests the model answers itself, trained on beside the data (REPLAY_PROMPTS)
    seed: int = 0

    def __post_init__(self):
        if self.lr is None:
            self.lr = DEFAULT_LR["lora" if self.lora else "full"]
        if self.gradient_checkpointing is None:  # LoRA's aim is memory: 1.60 -> 0.77 GiB on SmolLM2-135M
            self.gradient_checkpointing = self.lora
        for name in ("model", "data", "out"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"--{name} must name a file or folder, got {getattr(self, name)!r}")
        if self.quantize not in (None, "none", "int8", "int4"):
            raise ValueError(f"--quantize must be none, int8 or int4, got {self.quantize!r}")
        if self.quantize in ("int8", "int4") and not self.lora:
            raise ValueError("--quantize trains adapters over a frozen quantized base: use it with --lora")
        if not isinstance(self.target_modules, list) or not all(isinstance(t, str) for t in self.target_modules):
            raise ValueError(f"--target-modules must be a list of module names, got {self.target_modules!r}")
        for name in ("batch_size", "micro_batch", "log_every", "save_every", "lora_r"):
            _positive_int(name, getattr(self, name))
        for name in ("seq_len", "max_steps", "group_size", "eval_every"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if isinstance(self.replay, bool) or not isinstance(self.replay, int) or not 0 <= self.replay <= len(REPLAY_PROMPTS):
            raise ValueError(f"--replay must be a whole number from 0 to {len(REPLAY_PROMPTS)}, got {self.replay!r}")
        for name in ("warmup", "patience"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"--{name} must be a non-negative integer, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"--seed must be an integer, got {self.seed!r}")
        for name in ("lr", "lora_alpha", "grad_clip"):
            _number(name, getattr(self, name), 0)
        if self.epochs is not None:
            _number("epochs", self.epochs, 0)
        _number("weight_decay", self.weight_decay, 0, inclusive=True)
        _number("lora_dropout", self.lora_dropout, 0, inclusive=True, high=1)
        _number("val_fraction", self.val_fraction, 0, inclusive=True, high=1)


def split(convs: list[list[dict]], fraction: float) -> tuple[list, list]:
    """Train and validation conversations, chosen by a hash of each conversation (stable when
    the file grows); at least one for validation when there are two or more."""
    if fraction <= 0 or len(convs) < 2:
        return convs, []
    keys = [int.from_bytes(hashlib.sha256(json.dumps(c, sort_keys=True).encode()).digest()[:8], "big") / 2**64
            for c in convs]
    val = [i for i, k in enumerate(keys) if k < fraction] or [min(range(len(convs)), key=keys.__getitem__)]
    val_set = set(val)
    return [c for i, c in enumerate(convs) if i not in val_set], [convs[i] for i in val]


@torch.no_grad()
def evaluate(model: Transformer, rows: Packed, batch_size: int) -> float:
    """Mean loss per learnt token over all rows."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(rows), batch_size):
        loss, n = sft_loss(model, rows.rows(slice(s, s + batch_size)))
        total, count = total + loss.item() * n, count + n
    model.train(was)
    return total / max(count, 1)


# ggml types by their bits: a LoRA base read from a GGUF file keeps about the file's precision
_FOUR_BIT_TYPES = {2, 3, 12}  # Q4_0, Q4_1, Q4_K
_FLOAT_TYPES = {0, 1, 30}  # F32, F16, BF16


def base_mode(c: FinetuneConfig) -> str | None:
    """How the frozen base is held: "int8" or "int4" (slm's quantized layers, the file's own
    Q8_0/Q5_0/Q4_K/Q6_K blocks kept as they are), or None for floating point (fp32).
    --quantize decides when given ("none": fp32). By default a LoRA run over a GGUF file whose
    projections are quantized keeps them quantized at the file's precision: int4 (group 32,
    w = scale * q + min, which holds Q4_1's and Q4_0's 4-bit grids) when most are 4-bit, int8
    otherwise. That is 4-7x fewer bytes than fp32, and the adapters learn on the weights the
    model runs with. Anything else trains over fp32 weights."""
    if c.quantize is not None:
        return None if c.quantize == "none" else c.quantize
    path = resolve(c.model)[0]
    if not c.lora or not os.path.isfile(path) or not _is_gguf(path):
        return None
    import gguf  # the reader only: slm's own loader reads the weights
    types = [int(t.tensor_type) for t in gguf.GGUFReader(path).tensors
             if t.name.startswith("blk.") and len(t.shape) == 2]
    quantized = [t for t in types if t not in _FLOAT_TYPES]
    if not quantized or len(quantized) < len(types) / 2:
        return None
    return "int4" if sum(t in _FOUR_BIT_TYPES for t in quantized) > len(quantized) / 2 else "int8"


def _is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def prepare_model(c: FinetuneConfig):
    """Load the model (its frozen base quantized as base_mode says) and make the right parameters
    trainable. The load options are explicit (fp32, and quantized or not), so the result does not
    depend on what `load` does by default."""
    quantize = base_mode(c) if c.lora else None
    # dtype fp32 without quantize: the dequantized model, whatever load's default for a GGUF file
    lm = load(c.model, dtype=torch.float32, quantize=quantize, group_size=c.group_size)
    if lm.tokenizer is None:
        raise ValueError(f"{c.model}: has no tokenizer (tokenizer.json); fine-tuning needs its chat template")
    if c.lora:
        lora_mod.apply_lora(lm.model, c.target_modules or None, c.lora_r, c.lora_alpha, c.lora_dropout, c.seed)
    elif getattr(lm.model, "quantization", None):
        raise ValueError(f"{c.model}: is quantized; full fine-tuning needs a floating-point model (use --lora)")
    else:
        for p in lm.model.parameters():
            p.requires_grad_(True)
    lm.base_mode = quantize or "fp32"
    return lm


@torch.no_grad()
def rehearsal(lm, n: int, receipt=None) -> list[list[dict]]:
    """The model's own greedy answers to the first n REPLAY_PROMPTS, as conversations to train on
    (before any update: LoRA's adapters start at zero, so this is the base model speaking). The
    receipt, if any, is charged the forward passes as inferred tokens."""
    out = []
    hook = receipt.watch(lm) if receipt is not None and n else None
    try:
        for q in REPLAY_PROMPTS[:n]:
            messages = [{"role": "user", "content": q}]
            answer = lm.chat(messages, max_new_tokens=REPLAY_TOKENS, temperature=0).strip()
            if answer:
                out.append(messages + [{"role": "assistant", "content": answer}])
    finally:
        if hook is not None:
            hook.remove()
    return out


def note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


def resolve_seq_len(c: FinetuneConfig, context: int) -> int:
    """--seq-len, or by default the smaller of DEFAULT_SEQ_LEN and the model's context."""
    if c.seq_len is None:
        return min(DEFAULT_SEQ_LEN, context)
    if c.seq_len > context:
        raise ValueError(f"--seq-len {c.seq_len} exceeds the model's context of {context}")
    return c.seq_len


def resolve_warmup(c: FinetuneConfig, max_steps: int) -> int:
    """Warmup steps: by default DEFAULT_WARMUP, or a tenth of a shorter run (so that a short run
    still decays); an explicit --warmup is kept to at most half the run, with a note."""
    if c.warmup is None:
        return min(DEFAULT_WARMUP, max(1, math.ceil(max_steps / 10)))
    if c.warmup > max_steps // 2:
        note(f"--warmup {c.warmup} is longer than half of the run's {max_steps} steps; warming up over "
             f"{max_steps // 2} so that the learning rate also decays")
        return max_steps // 2
    return c.warmup


def resolve_steps(c: FinetuneConfig, steps_per_epoch: int) -> int:
    """--max-steps, or --epochs over the training rows; by default DEFAULT_EPOCHS of them and at
    least DEFAULT_MIN_STEPS steps (twenty conversations fill one step: three would teach nothing)."""
    if c.max_steps:
        return c.max_steps
    if c.epochs is not None:
        return max(1, round(c.epochs * steps_per_epoch))
    return max(DEFAULT_MIN_STEPS, DEFAULT_EPOCHS * steps_per_epoch)


def resolve_eval_every(c: FinetuneConfig, steps_per_epoch: int) -> int:
    """--eval-every, or once an epoch, at most DEFAULT_EVAL_EVERY steps apart."""
    return c.eval_every or min(steps_per_epoch, DEFAULT_EVAL_EVERY)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_freed_memory(threshold: int = 1 << 20) -> None:
    """Have glibc's malloc serve every allocation of `threshold` bytes or more by its own mmap, so
    freeing it hands the pages back at once. By default glibc raises that threshold each time a
    large block is freed, after which such blocks come from the heap, which fragments and never
    shrinks: a training step's activations, allocated and freed by the hundred MB, took a LoRA
    step on SmolLM2-135M to a 4.8 GiB peak, 1.8 GiB with the threshold fixed (lora_memory.jsonl).
    Setting the threshold once turns that raising off. A no-op off glibc."""
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):  # not glibc (musl, macOS): their allocators do not do this
        pass


BEST = "best."  # the checkpoint's copy of the best evaluation's weights: "best.<parameter>"


# Settings a resumed run must share with its checkpoint: they shape every step (the others, such
# as --log-every or --gradient-checkpointing, change what is logged or how, not what is learnt).
RESUME_SETTINGS = ("lora", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "quantize", "group_size",
                   "max_steps", "lr", "batch_size", "micro_batch", "seq_len", "val_fraction", "eval_every",
                   "patience", "warmup", "weight_decay", "grad_clip", "replay", "seed")


def _flag(name: str, value) -> str:
    if isinstance(value, bool):
        return f"--{name.replace('_', '-')}" if value else f"no --{name.replace('_', '-')}"
    return f"--{name.replace('_', '-')} {value}"


def _model_config(model: Transformer) -> dict:
    cfg = json.loads(json.dumps(model.config.to_dict()))  # as JSON keeps it (tuples as lists)
    cfg.pop("name", None)  # the folder's name: a moved model is the same model
    return cfg


def _data_hash(convs: list[list[dict]]) -> str:
    return hashlib.sha256(json.dumps(convs, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def restore(c: FinetuneConfig, model: Transformer, optimizers, settings: dict, data_sha: str,
            n_rows: int, gen: torch.Generator) -> tuple[dict, torch.Tensor, dict[str, torch.Tensor]]:
    """Load out/checkpoint into the model, the optimizers and the RNGs after checking that it
    belongs to this run (model, data, settings): (its state, the current epoch's row order, the
    best evaluation's weights so far).
    Every failure is one CheckpointError naming the file."""
    state, weights, tensors = ckpt.load(c.out)
    folder = ckpt.checkpoint_dir(c.out)
    state_path, weights_path, tensors_path = (os.path.join(folder, n) for n in (ckpt.STATE, ckpt.WEIGHTS, ckpt.TENSORS))
    again = "resume with the settings it was started with, or pass --overwrite to start again"
    saved_cfg, cfg = state["model_config"], _model_config(model)
    if saved_cfg != cfg:
        diff = [k for k in sorted(set(saved_cfg) | set(cfg)) if saved_cfg.get(k) != cfg.get(k)]
        shown = ", ".join(f"{k} {saved_cfg.get(k)!r} there, {cfg.get(k)!r} here" for k in diff[:3])
        raise ckpt.CheckpointError(f"{state_path}: the checkpoint was fine-tuned from a different model ({shown}); "
                                   f"resume with its --model, or pass --overwrite to start again")
    for name in RESUME_SETTINGS:
        if name not in state["settings"] or state["settings"][name] != settings[name]:
            was = _flag(name, state["settings"][name]) if name in state["settings"] else f"no {name}"
            raise ckpt.CheckpointError(f"{state_path}: the checkpoint was written with {was}, this run has "
                                       f"{_flag(name, settings[name])}; {again}")
    if state["data_sha256"] != data_sha:
        raise ckpt.CheckpointError(f"{state_path}: the checkpoint was trained on other conversations than "
                                   f"{c.data} holds now; {again}")
    if state["step"] > settings["max_steps"]:
        raise ckpt.CheckpointError(f"{state_path}: step {state['step']} is past the run's {settings['max_steps']}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        what = f"lacks {missing[0]!r}" if missing else f"has unexpected {unexpected[0]!r}"
        raise ckpt.CheckpointError(f"{weights_path}: {what} ({len(missing)} missing, {len(unexpected)} unexpected); "
                                   f"{again}")
    for n, p in params.items():
        if weights[n].shape != p.shape or weights[n].dtype != p.dtype:
            raise ckpt.CheckpointError(f"{weights_path}: {n} is {weights[n].dtype} {list(weights[n].shape)}, the model "
                                       f"needs {p.dtype} {list(p.shape)}; {again}")
    extra = {"rng.torch", "rng.data", "order"}
    if not extra <= set(tensors):
        raise ckpt.CheckpointError(f"{tensors_path}: lacks {sorted(extra - set(tensors))[0]!r}")
    best = {k[len(BEST):]: v for k, v in tensors.items() if k.startswith(BEST)}
    if not isinstance(state.get("best"), dict) or {"loss", "step", "since"} - set(state["best"]):
        raise ckpt.CheckpointError(f"{state_path}: lacks the best evaluation's record; {again}")
    if best and (set(best) != set(params) or any(best[n].shape != p.shape for n, p in params.items())):
        raise ckpt.CheckpointError(f"{tensors_path}: the best evaluation's weights do not fit this model; {again}")
    moments = {k: v for k, v in tensors.items() if k not in extra and not k.startswith(BEST)}
    for k, v in moments.items():  # "<optimizer>.<parameter>.<key>" (train/optim.py's state_tensors)
        opt, _, rest = k.partition(".")
        name, _, kind = rest.rpartition(".")
        if opt != "0" or name not in params or (kind != "step" and v.shape != params[name].shape):
            raise ckpt.CheckpointError(f"{tensors_path}: optimizer state {k!r} does not fit this model; {again}")
    order = tensors["order"]
    if order.dtype != torch.long or order.dim() != 1 or sorted(order.tolist()) != list(range(n_rows)):
        raise ckpt.CheckpointError(f"{tensors_path}: 'order' is not an order of the {n_rows} training rows; {again}")
    for key in ("rng.torch", "rng.data"):
        try:
            torch.Generator().set_state(tensors[key])  # checked on a spare generator before any is set
        except (RuntimeError, TypeError) as e:
            raise ckpt.CheckpointError(f"{tensors_path}: {key!r} is not a random generator's state ({e})") from None
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    load_state_tensors(optimizers, {id(p): n for n, p in params.items()}, moments)
    torch.set_rng_state(tensors["rng.torch"])
    gen.set_state(tensors["rng.data"])
    return state, order, best


def truncate_metrics(path: str, step: int) -> None:
    """Drop the metric rows logged after the checkpoint being resumed (they are logged again),
    and a last line cut off by a kill."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                keep.append(json.dumps(row) + "\n")
    with atomic_write(path) as f:
        f.writelines(keep)


def finetune(c: FinetuneConfig, progress: bool = True, resume: bool = False, overwrite: bool = False,
             receipt=None) -> dict:
    """Fine-tune as `c` says, into c.out. resume: continue from c.out/checkpoint (a fresh start
    when there is none yet); overwrite: replace a run already in c.out (without either, one there
    is an error). receipt: a footprint Tracker, charged the tokens and FLOPs actually computed.

    With held-out conversations the run is evaluated every eval_every steps and stops once
    `patience` evaluations in a row found no lower validation loss; the weights saved are those of
    the best evaluation (finetune.json: best_step, stopped_early)."""
    resumable = ckpt.check_out(c.out, c.model, resume, overwrite)
    convs = read_conversations(c.data)
    return_freed_memory()
    torch.manual_seed(c.seed)
    lm = prepare_model(c)
    model, tok = lm.model, lm.tokenizer
    seq_len = resolve_seq_len(c, model.config.max_seq_len)
    train_convs, val_convs = split(convs, c.val_fraction)
    train_convs = train_convs + rehearsal(lm, c.replay, receipt)
    pad = tok.token_id(tok.pad_token) if tok.pad_token else None
    pad = pad if pad is not None else (tok.eos_id or 0)
    train = pack([tokenize_chat(tok, m) for m in train_convs], seq_len, pad)
    val = pack([tokenize_chat(tok, m) for m in val_convs], seq_len, pad) if val_convs else None
    batch_size = min(c.batch_size, len(train))
    if batch_size < c.batch_size:
        note(f"--batch-size {c.batch_size} is more than the {len(train)} packed training rows; each step "
             f"takes all {batch_size}")
    steps_per_epoch = -(-len(train) // batch_size)
    max_steps = resolve_steps(c, steps_per_epoch)
    eval_every = resolve_eval_every(c, steps_per_epoch)
    warmup = resolve_warmup(c, max_steps)
    settings = {**{k: getattr(c, k) for k in RESUME_SETTINGS}, "target_modules": getattr(model, "lora", {}).get(
        "target_modules", []), "max_steps": max_steps, "batch_size": batch_size, "seq_len": seq_len,
        "eval_every": eval_every, "warmup": warmup}
    data_sha = _data_hash(convs)
    optimizers = build_optimizers(model, "adamw", c.lr, c.weight_decay)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    schedule = SimpleNamespace(warmup_steps=warmup, max_steps=max_steps, min_lr_ratio=0.1, schedule="cosine", cooldown=0.5)
    trainable, total = lora_mod.trainable_parameters(model)
    mode = "lora" if c.lora else "full"
    if receipt is not None:
        receipt.model_cfg, receipt.dtype, receipt.merge = model.config, torch.float32, resumable
        receipt.formula = FLOPS_FORMULA
    val_cost = packed_flops(model, val, "eval") if val is not None else None

    metrics_path = os.path.join(c.out, "metrics.jsonl")
    gen = torch.Generator().manual_seed(c.seed)
    order = torch.randperm(len(train), generator=gen)
    step, losses, first_val, val_loss = 0, [], None, None
    best = {"loss": None, "step": 0, "since": 0}  # the best evaluation, and evaluations since it
    best_weights: dict[str, torch.Tensor] = {}
    if resumable:
        state, order, best_weights = restore(c, model, optimizers, settings, data_sha, len(train), gen)
        step, losses, first_val, val_loss = state["step"], state["losses"], state.get("first_val_loss"), \
            state.get("val_loss")
        best = state["best"]
        print(f"resuming from {ckpt.checkpoint_dir(c.out)} at step {step}", file=sys.stderr, flush=True)
        truncate_metrics(metrics_path, step)
    else:
        if overwrite:
            ckpt.clear_run(c.out)
        os.makedirs(c.out, exist_ok=True)
        if os.path.exists(metrics_path):
            os.remove(metrics_path)

    def evaluate_val() -> float:
        loss = evaluate(model, val, c.micro_batch)
        if receipt is not None:
            receipt.add_tokens(val_cost[0], "inferred", flops=val_cost[1])
        return loss

    bar = tqdm(total=max_steps, initial=step, desc="fine-tuning", unit="step", disable=not progress)
    model.train()
    start, last_t, learnt = time.time(), time.perf_counter(), 0
    if val is not None and first_val is None:
        first_val = evaluate_val()
    stopped = c.patience and best["since"] >= c.patience
    while step < max_steps and not stopped:
        k = step % steps_per_epoch
        if k == 0 and step:
            order = torch.randperm(len(train), generator=gen)  # a new shuffle each epoch
        batch = train.rows(order[k * batch_size:(k + 1) * batch_size])
        set_lr(optimizers, lr_at(step, schedule))
        loss, n = accumulate(model, batch, c.micro_batch, c.gradient_checkpointing)
        torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if receipt is not None:
            real, flops = packed_flops(model, batch, mode)
            receipt.add_tokens(real, "trained", flops=flops)
        learnt += n
        losses.append(loss)
        lr = c.lr * lr_at(step, schedule)
        step += 1
        last = step == max_steps
        row = None
        if step % c.log_every == 0 or last:
            now = time.perf_counter()
            row = {"step": step, "loss": round(losses[-1], 5), "lr": lr,
                   "learnt_tokens_per_s": round(learnt / (now - last_t), 1)}
            last_t, learnt = now, 0
        if val is not None and (step % eval_every == 0 or last):
            val_loss = evaluate_val()
            row = row or {"step": step, "loss": round(losses[-1], 5), "lr": lr}
            row["val_loss"] = round(val_loss, 5)
            if best["loss"] is None or val_loss < best["loss"]:
                best = {"loss": val_loss, "step": step, "since": 0}
                best_weights = {n: p.detach().clone() for n, p in named.items()}
            else:
                best["since"] += 1
                stopped = bool(c.patience) and best["since"] >= c.patience
        if row is not None:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if step % c.save_every == 0 and not last and not stopped:  # the last step's results are written below
            extra = {"rng.torch": torch.get_rng_state(), "rng.data": gen.get_state(), "order": order,
                     **{BEST + n: w for n, w in best_weights.items()}}
            ckpt.save(c.out, model, optimizers, extra,
                      {"step": step, "losses": losses, "first_val_loss": first_val, "val_loss": val_loss,
                       "best": best, "settings": settings, "model_config": _model_config(model),
                       "data_sha256": data_sha})
        bar.set_postfix(loss=f"{losses[-1]:.3f}", **({"val": f"{val_loss:.3f}"} if val_loss is not None else {}))
        bar.update(1)
    bar.close()
    model.eval()
    if best_weights and best["step"] != step:  # keep the best evaluation's weights
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(best_weights[n])
    if stopped:
        note(f"validation loss had not improved for {c.patience} evaluations: stopped at step {step} of "
             f"{max_steps}, keeping step {best['step']}'s weights (validation loss {best['loss']:.4f})")

    if c.lora:
        base = os.path.abspath(resolve(c.model)[0])
        lora_mod.save_adapter(model, c.out, base_model=base)
    else:
        final = os.path.join(c.out, ".final")  # written whole, then moved in file by file (as train does)
        lm.save(final)
        for name in os.listdir(final):
            os.replace(os.path.join(final, name), os.path.join(c.out, name))
        os.rmdir(final)
    plot_metrics(metrics_path, os.path.join(c.out, "loss.png"))
    summary = {"steps": step, "max_steps": max_steps, "stopped_early": bool(stopped),
               "best_step": best["step"] if best["loss"] is not None else step,
               "train_conversations": len(train_convs), "val_conversations": len(val_convs),
               "train_rows": len(train), "truncated": train.truncated, "dropped": train.dropped,
               "batch_size": batch_size, "micro_batch": c.micro_batch, "seq_len": seq_len, "warmup": warmup,
               "eval_every": eval_every, "base": getattr(lm, "base_mode", "fp32"),
               "trainable_params": trainable, "total_params": total, "first_val_loss": first_val,
               "val_loss": best["loss"] if best["loss"] is not None else val_loss,
               "final_train_loss": losses[-1], "train_losses": losses,
               "minutes": (time.time() - start) / 60, "resumed": resumable, "config": asdict(c)}
    with atomic_write(os.path.join(c.out, "finetune.json")) as f:
        json.dump(summary, f, indent=2)
    ckpt.discard(c.out)  # the results are complete: the checkpoint has served
    summary["lm"] = lm
    return summary
