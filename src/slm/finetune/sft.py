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
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from tqdm import tqdm

from ..model import Transformer
from ..runtime.lm import load
from ..runtime.tokenizer import Tokenizer
from ..train.loop import lr_at, plot_metrics
from ..train.loss import fused_linear_cross_entropy
from ..train.optim import build_optimizers, set_lr
from . import lora as lora_mod

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
    """(line number, record) for each non-blank line of a JSONL file; a bad line is a ValueError
    naming the file and line."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None


def read_conversations(path: str) -> list[list[dict]]:
    if not os.path.isfile(path):
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
    position within its conversation, and which conversation of the row it belongs to."""
    ids: torch.Tensor
    targets: torch.Tensor
    pos: torch.Tensor
    doc: torch.Tensor
    truncated: int = 0
    dropped: int = 0

    def __len__(self) -> int:
        return self.ids.shape[0]

    def rows(self, index) -> "Packed":
        return Packed(self.ids[index], self.targets[index], self.pos[index], self.doc[index])


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
    return Packed(ids, targets, pos, doc, truncated, dropped)


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


def sft_loss(model: Transformer, batch: Packed, checkpoint: bool = False, chunk: int = 1024) -> tuple[torch.Tensor, int]:
    """(mean cross-entropy over the learnt tokens, their number). Only those tokens go through
    the LM head. A trainable bias-free head uses the fused chunked loss (train/loss.py); a frozen
    or quantized one is applied in chunks recomputed in backward, so [tokens, vocab] logits are
    never all held at once."""
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


# -- the run -----------------------------------------------------------------------------------
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
    quantize: str | None = None  # int8 | int4: a quantized frozen base (LoRA only)
    group_size: int | None = None
    max_steps: int | None = None  # default: --epochs over the training rows
    epochs: float = 1.0
    lr: float | None = None  # default 2e-4 with LoRA, 2e-5 for full fine-tuning
    batch_size: int = 8  # packed rows per step
    seq_len: int = 512
    val_fraction: float = 0.05
    eval_every: int = 50
    log_every: int = 5
    warmup: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.lr is None:
            self.lr = 2e-4 if self.lora else 2e-5
        if self.quantize and not self.lora:
            raise ValueError("--quantize trains adapters over a frozen quantized base: use it with --lora")
        for name in ("batch_size", "seq_len", "eval_every", "log_every", "lora_r"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"--max-steps must be positive, got {self.max_steps}")
        if self.epochs <= 0 or self.lr <= 0:
            raise ValueError("--epochs and --lr must be positive")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")


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


def prepare_model(c: FinetuneConfig):
    """Load the model (quantized if asked) and make the right parameters trainable."""
    lm = load(c.model, dtype=torch.float32, quantize=c.quantize, group_size=c.group_size)
    if lm.tokenizer is None:
        raise ValueError(f"{c.model}: has no tokenizer (tokenizer.json); fine-tuning needs its chat template")
    if c.lora:
        lora_mod.apply_lora(lm.model, c.target_modules or None, c.lora_r, c.lora_alpha, c.lora_dropout, c.seed)
    elif getattr(lm.model, "quantization", None):
        raise ValueError(f"{c.model}: is quantized; full fine-tuning needs a floating-point model (use --lora)")
    else:
        for p in lm.model.parameters():
            p.requires_grad_(True)
    return lm


def finetune(c: FinetuneConfig, progress: bool = True) -> dict:
    convs = read_conversations(c.data)
    torch.manual_seed(c.seed)
    lm = prepare_model(c)
    model, tok = lm.model, lm.tokenizer
    if c.seq_len > model.config.max_seq_len:
        raise ValueError(f"--seq-len {c.seq_len} exceeds the model's context of {model.config.max_seq_len}")
    train_convs, val_convs = split(convs, c.val_fraction)
    pad = tok.token_id(tok.pad_token) if tok.pad_token else None
    pad = pad if pad is not None else (tok.eos_id or 0)
    train = pack([tokenize_chat(tok, m) for m in train_convs], c.seq_len, pad)
    val = pack([tokenize_chat(tok, m) for m in val_convs], c.seq_len, pad) if val_convs else None
    steps_per_epoch = max(1, -(-len(train) // c.batch_size))
    max_steps = c.max_steps or max(1, round(c.epochs * steps_per_epoch))
    optimizers = build_optimizers(model, "adamw", c.lr, c.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    schedule = SimpleNamespace(warmup=min(c.warmup, max_steps // 2), max_steps=max_steps, min_lr_ratio=0.1,
                               schedule="cosine", cooldown=0.5)
    trainable, total = lora_mod.trainable_parameters(model)

    os.makedirs(c.out, exist_ok=True)
    metrics_path = os.path.join(c.out, "metrics.jsonl")
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    gen = torch.Generator().manual_seed(c.seed)
    order = torch.randperm(len(train), generator=gen)
    bar = tqdm(total=max_steps, desc="fine-tuning", unit="step", disable=not progress)
    model.train()
    start, first_val, val_loss, last_t, tokens = time.time(), None, None, time.perf_counter(), 0
    if val is not None:
        first_val = evaluate(model, val, c.batch_size)
    for step in range(max_steps):
        k = step % steps_per_epoch
        if k == 0 and step:
            order = torch.randperm(len(train), generator=gen)  # a new shuffle each epoch
        batch = train.rows(order[k * c.batch_size:(k + 1) * c.batch_size])
        set_lr(optimizers, lr_at(step, schedule))
        loss, n = sft_loss(model, batch, c.gradient_checkpointing)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        tokens += n
        last = step + 1 == max_steps
        row = None
        if (step + 1) % c.log_every == 0 or last:
            now = time.perf_counter()
            row = {"step": step + 1, "loss": round(loss.item(), 5), "lr": c.lr * lr_at(step, schedule),
                   "learnt_tokens_per_s": round(tokens / (now - last_t), 1)}
            last_t, tokens = now, 0
        if val is not None and ((step + 1) % c.eval_every == 0 or last):
            val_loss = evaluate(model, val, c.batch_size)
            row = row or {"step": step + 1, "loss": round(loss.item(), 5), "lr": c.lr * lr_at(step, schedule)}
            row["val_loss"] = round(val_loss, 5)
        if row is not None:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{loss.item():.3f}", **({"val": f"{val_loss:.3f}"} if val_loss is not None else {}))
        bar.update(1)
    bar.close()
    model.eval()

    if c.lora:
        base = os.path.abspath(c.model)
        lora_mod.save_adapter(model, c.out, base_model=base)
    else:
        final = os.path.join(c.out, ".final")  # written whole, then moved in file by file (as train does)
        lm.save(final)
        for name in os.listdir(final):
            os.replace(os.path.join(final, name), os.path.join(c.out, name))
        os.rmdir(final)
    plot_metrics(metrics_path, os.path.join(c.out, "loss.png"))
    summary = {"steps": max_steps, "train_conversations": len(train_convs), "val_conversations": len(val_convs),
               "train_rows": len(train), "truncated": train.truncated, "dropped": train.dropped,
               "trainable_params": trainable, "total_params": total, "first_val_loss": first_val,
               "val_loss": val_loss, "final_train_loss": loss.item(), "minutes": (time.time() - start) / 60,
               "config": asdict(c)}
    with open(os.path.join(c.out, "finetune.json.tmp"), "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(os.path.join(c.out, "finetune.json.tmp"), os.path.join(c.out, "finetune.json"))
    summary["lm"] = lm
    return summary
