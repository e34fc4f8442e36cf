"""The training loop: token shards in, a Hugging Face model folder out.

Everything that decides the trajectory is a function of (seed, step): the initial weights, and
the batch of each step (random windows of the token stream drawn by a generator seeded with
(seed, step)). A checkpoint therefore needs only the weights, the optimizer state and the step,
and `--resume` after a crash (even `kill -9`) continues with exactly the losses an uninterrupted
run would have had. Checkpoints are written to a temporary folder and renamed into place, so a
crash mid-save leaves the previous one intact.

    out/                 the final model (config.json, model.safetensors, tokenizer files)
    out/metrics.jsonl    one line per logged step: loss, val_loss, lr, tokens/s, MFU
    out/loss.png         the loss curves
    out/checkpoint/      the latest checkpoint: model/ + trainer_state.{json,safetensors}

Several processes: `torchrun --nproc_per_node N -m slm train ...` (DDP; rank 0 writes).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..checkpoint import hf
from ..config import ModelConfig
from ..data.prepare import load_tokens
from ..model import Transformer
from ..tokenizer import Tokenizer


@dataclass
class TrainConfig:
    out: str
    data: str  # folder written by `slm data prepare`
    tokenizer: str  # folder with tokenizer.json
    seq_len: int = 256
    batch_size: int = 32  # sequences per micro-batch
    grad_accum: int = 1
    max_steps: int = 1000
    max_minutes: float | None = None
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    schedule: str = "cosine"  # cosine | wsd (warmup, stable, linear decay over the last 20%)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 10
    save_every: int = 100
    log_every: int = 10
    seed: int = 0
    device: str | None = None
    compile: bool = False


def lr_at(step: int, c: TrainConfig, progress: float | None = None) -> float:
    """Learning rate: linear warmup over `warmup` steps, then cosine or WSD decay over the run's
    progress (by steps; with --max-minutes, by whichever of steps and time is further along)."""
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    if progress is None:
        progress = (step - c.warmup) / max(1, c.max_steps - c.warmup)
    floor = c.lr * c.min_lr_ratio
    if c.schedule == "wsd":
        return c.lr if progress < 0.8 else floor + (c.lr - floor) * (1 - progress) / 0.2
    return floor + (c.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def batch(tokens: np.ndarray, seed: int, step: int, micro: int, c: TrainConfig, device) -> tuple:
    """The micro-batch of a step: a pure function of (seed, step, micro), so resuming replays it."""
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(tokens) - c.seq_len - 1, size=c.batch_size)
    rows = np.stack([tokens[s:s + c.seq_len + 1] for s in starts]).astype(np.int64)
    xy = torch.from_numpy(rows).to(device)
    return xy[:, :-1], xy[:, 1:]


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus 12 L T d for attention (as in PaLM's MFU)."""
    return 6 * cfg.num_params(include_embeddings=False) + 12 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim


def peak_flops(device: torch.device) -> float:
    """The device's dense peak: bf16 for known GPUs, a measured fp32 matmul rate on the CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("4090", 165e12)):
            if key in name:
                return peak
        return 100e12
    a = torch.randn(1024, 1024)
    a @ a
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < 0.3:
        a @ a
        n += 1
    return 2 * 1024**3 * n / (time.perf_counter() - t)


class Trainer:
    def __init__(self, c: TrainConfig, model_cfg: ModelConfig):
        self.c = c
        # Under torchrun (WORLD_SIZE > 1): DDP, gloo on the CPU, NCCL on GPUs. Each rank takes every
        # world-th row of the same global batch, so N processes follow the 1-process trajectory.
        self.world, self.rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
        self.device = torch.device(c.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.world > 1:
            import torch.distributed as dist
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            if c.batch_size % self.world:
                raise ValueError(f"--batch-size {c.batch_size} must be divisible by the {self.world} processes")
        self.tokenizer = Tokenizer.from_dir(c.tokenizer)
        self.train_tokens, self.val_tokens = load_tokens(c.data, "train"), load_tokens(c.data, "val")
        if len(self.train_tokens) <= c.seq_len + 1:
            raise ValueError(f"{c.data}: {len(self.train_tokens)} training tokens, fewer than one sequence")
        self.model_cfg = model_cfg.replace(vocab_size=self.tokenizer.vocab_size, max_seq_len=max(c.seq_len, model_cfg.max_seq_len),
                                           bos_token_id=self.tokenizer.bos_id, eos_token_id=self.tokenizer.eos_id)
        torch.manual_seed(c.seed)
        self.model = Transformer(self.model_cfg).to(self.device)
        self.model.init_weights()
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=c.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
        self.step = 0
        self.forward = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.forward = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.forward = torch.compile(self.forward) if c.compile else self.forward
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else None

    # -- checkpoints ---------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.c.out, "checkpoint")

    def save_checkpoint(self) -> None:
        tmp = hf._atomic_dir(self.ckpt_dir)
        try:
            hf.save_model(self.model, os.path.join(tmp, "model"), tokenizer=self.tokenizer)
            names = {id(p): n for n, p in self.model.named_parameters()}
            tensors, counts = {}, {}
            for group in self.opt.param_groups:
                for p in group["params"]:
                    st = self.opt.state.get(p, {})
                    for key in ("exp_avg", "exp_avg_sq"):
                        if key in st:
                            tensors[f"{names[id(p)]}.{key}"] = st[key].detach().cpu().contiguous()
                    if "step" in st:
                        counts[names[id(p)]] = float(st["step"])
            save_file(tensors, os.path.join(tmp, "trainer_state.safetensors"))
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump({"step": self.step, "world_size": self.world, "optimizer_steps": counts, "train_config": asdict(self.c),
                           "model_config": self.model_cfg.to_dict()}, f, indent=2)
            hf._commit(tmp, self.ckpt_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def load_checkpoint(self) -> bool:
        state_path = os.path.join(self.ckpt_dir, "trainer_state.json")
        if not os.path.exists(state_path):
            return False
        with open(state_path) as f:
            state = json.load(f)
        loaded = hf.load_model(os.path.join(self.ckpt_dir, "model"), dtype=torch.float32, device=self.device)
        with torch.no_grad():
            for (n, p), (_, q) in zip(self.model.named_parameters(), loaded.named_parameters()):
                p.copy_(q)
        tensors = load_file(os.path.join(self.ckpt_dir, "trainer_state.safetensors"), device=str(self.device))
        params = dict(self.model.named_parameters())
        for name, p in params.items():
            if f"{name}.exp_avg" in tensors:
                self.opt.state[p] = {"step": torch.tensor(state["optimizer_steps"][name]),
                                     "exp_avg": tensors[f"{name}.exp_avg"], "exp_avg_sq": tensors[f"{name}.exp_avg_sq"]}
        self.step = state["step"]
        return True

    # -- the loop ------------------------------------------------------------------------------
    def loss(self, x, y) -> torch.Tensor:
        if self.autocast is not None:
            with self.autocast:
                logits = self.forward(x)
        else:
            logits = self.forward(x)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = [self.loss(*batch(self.val_tokens, 10_000 + self.c.seed, i, 0, self.c, self.device)).item()
                  for i in range(self.c.eval_batches)]
        self.model.train()
        return sum(losses) / len(losses)

    def train(self, resume: bool = False, progress: bool = True) -> dict:
        c = self.c
        os.makedirs(c.out, exist_ok=True)
        metrics_path = os.path.join(c.out, "metrics.jsonl")
        if resume and self.load_checkpoint():
            if self.rank == 0:
                _truncate_metrics(metrics_path, self.step)
        elif os.path.exists(metrics_path) and self.rank == 0:
            os.remove(metrics_path)
        tokens_per_step = c.batch_size * c.seq_len * c.grad_accum
        fpt, peak = flops_per_token(self.model_cfg, c.seq_len), peak_flops(self.device)
        start, deadline = time.time(), (time.time() + 60 * c.max_minutes) if c.max_minutes else None
        bar = tqdm(total=c.max_steps, initial=self.step, desc="training", disable=not progress or self.rank != 0,
                   unit="step")
        last_t, last_step, val = time.perf_counter(), self.step, None
        self.model.train()
        while self.step < c.max_steps and not (deadline and time.time() > deadline):
            progress = None
            if deadline:  # a time budget: decay by elapsed time when that is further along (not replayable)
                progress = max((self.step - c.warmup) / max(1, c.max_steps - c.warmup),
                               (time.time() - start) / (deadline - start))
            lr = lr_at(self.step, c, progress)
            for g in self.opt.param_groups:
                g["lr"] = lr
            total = 0.0
            for micro in range(c.grad_accum):
                x, y = batch(self.train_tokens, c.seed, self.step, micro, c, self.device)
                x, y = x[self.rank::self.world], y[self.rank::self.world]
                loss = self.loss(x, y) / c.grad_accum
                loss.backward()  # DDP averages the gradients over ranks
                total += loss.item()
            if self.world > 1:  # report the loss of the whole global batch
                t = torch.tensor([total], device=self.device)
                torch.distributed.all_reduce(t)
                total = t.item() / self.world
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            last = self.step == c.max_steps or bool(deadline and time.time() > deadline)
            if self.step % c.eval_every == 0 or last:
                val = self.evaluate()
            if self.step % c.log_every == 0 or last:  # the last step is always logged
                now = time.perf_counter()
                tps = (self.step - last_step) * tokens_per_step / (now - last_t)
                last_t, last_step = now, self.step
                row = {"step": self.step, "loss": round(total, 5), "lr": lr, "tokens_per_s": round(tps),
                       "mfu": round(tps * fpt / peak, 4)}
                if val is not None:
                    row["val_loss"] = round(val, 5)
                    val = None
                if self.rank == 0:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{row['mfu']:.0%}")
            bar.update(1)
            if self.step % c.save_every == 0 and self.rank == 0:
                self.save_checkpoint()
        bar.close()
        final_val = self.evaluate()
        if self.rank != 0:
            return {"steps": self.step, "val_loss": final_val, "minutes": (time.time() - start) / 60}
        self.save_checkpoint()
        final = os.path.join(c.out, ".final")  # written whole, then moved in file by file
        hf.save_model(self.model, final, tokenizer=self.tokenizer)
        for name in os.listdir(final):
            os.replace(os.path.join(final, name), os.path.join(c.out, name))
        os.rmdir(final)
        plot_metrics(metrics_path, os.path.join(c.out, "loss.png"))
        return {"steps": self.step, "val_loss": final_val, "minutes": (time.time() - start) / 60}


def _truncate_metrics(path: str, step: int) -> None:
    """Drop metric rows logged after the checkpoint being resumed: they will be logged again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(rows)


def plot_metrics(metrics_path: str, png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
