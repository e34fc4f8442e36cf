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

Several processes: `torchrun --nproc_per_node N -m slm train ... [--fsdp]` (DDP or FSDP; rank 0 writes).
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from ..accel import accelerate_training
from ..checkpoint import hf
from ..checkpoint.safetensors_io import CheckpointError, read_header, read_into
from ..model.config import ModelConfig
from ..data.prepare import load_meta, load_tokens
from ..data.probes import probes
from ..data.probes import score as score_probes
from ..files import atomic_write, output_folder, read_json_object
from ..footprint import track
from ..footprint.devices import peak_flops  # noqa: F401 (re-exported: benchmarks import it from here)
from ..footprint.flops import flops_per_token
from ..model import Transformer
from ..runtime.lm import LM, check_device
from ..runtime.tokenizer import Tokenizer
from .loss import fused_linear_cross_entropy
from . import distributed
from .optim import build_optimizers, load_state_tensors, set_lr, state_tensors


@dataclass
class TrainConfig:
    out: str
    data: str  # folder written by `slm data prepare`
    tokenizer: str  # folder with tokenizer.json
    seq_len: int | None = None  # None: SEQ_LEN (`slm train --max-minutes` fills in its recipe's)
    batch_size: int | None = None  # sequences per micro-batch; None: BATCH_SIZE
    grad_accum: int = 1
    max_steps: int | None = None  # None: DEFAULT_STEPS, or with max_minutes as many as the minutes allow
    max_minutes: float | None = None
    # The default recipe is the one benchmarks/train_speed.py measures (1.6x faster to a given
    # validation loss than AdamW with cosine decay): Muon at 0.02 on the blocks' matrices, AdamW at
    # 6e-3 on embeddings and norms, warmup-stable-decay with the last 70% decaying to 0.
    optimizer: str = "muon"  # muon | adamw (see optim.py)
    lr: float | None = None  # AdamW's (embeddings, head, norms under muon): default 6e-3 with muon, 2e-3 alone
    muon_lr: float = 0.02
    min_lr_ratio: float | None = None  # the decay's floor: 0 for wsd (0.5% lower loss at 400 steps), 0.1 for cosine
    warmup: int = 50
    schedule: str = "wsd"  # wsd (warmup, stable, linear decay over the last `cooldown`) | cosine
    cooldown: float = 0.7
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 10
    # Built-in probes (data/probes.py) per kind scored with each validation loss: what the model
    # knows of its world, not only how well it predicts text. 0: none.
    probes: int = 20
    save_every: int = 100
    log_every: int = 10
    seed: int = 0
    device: str | None = None
    compile: bool = False
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state (else DDP)


    def __post_init__(self):
        self.seq_len = SEQ_LEN if self.seq_len is None else self.seq_len
        self.batch_size = BATCH_SIZE if self.batch_size is None else self.batch_size
        if self.max_steps is None:  # a time budget alone runs for its minutes (60 minutes once stopped at 1000 steps)
            self.max_steps = UNLIMITED_STEPS if self.max_minutes else DEFAULT_STEPS
        if self.lr is None:
            self.lr = 6e-3 if self.optimizer == "muon" else 2e-3
        if self.min_lr_ratio is None:
            self.min_lr_ratio = 0.0 if self.schedule == "wsd" else 0.1
        positive = {"seq_len": self.seq_len, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "max_steps": self.max_steps, "eval_every": self.eval_every, "eval_batches": self.eval_batches,
                    "save_every": self.save_every, "log_every": self.log_every}
        for name, v in positive.items():
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
        for name, v in {"warmup": self.warmup, "seed": self.seed, "probes": self.probes}.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"--{name} must be a non-negative integer, got {v}")
        numbers = {"lr": self.lr, "muon_lr": self.muon_lr, "grad_clip": self.grad_clip, "cooldown": self.cooldown,
                   "min_lr_ratio": self.min_lr_ratio, "weight_decay": self.weight_decay}
        for name, v in numbers.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {v}")
        for name in ("lr", "muon_lr", "grad_clip"):
            if not numbers[name] > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {numbers[name]}")
        if self.max_minutes is not None and not (isinstance(self.max_minutes, (int, float))
                                                 and math.isfinite(self.max_minutes) and self.max_minutes > 0):
            raise ValueError(f"--max-minutes must be positive, got {self.max_minutes}")
        if not 0 < self.cooldown <= 1 or not 0 <= self.min_lr_ratio <= 1 or self.weight_decay < 0:
            raise ValueError("--cooldown must be in (0, 1], min_lr_ratio in [0, 1], weight_decay >= 0")
        if self.device is not None:
            self.device = _check_device(self.device)
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"unknown schedule {self.schedule!r}: use cosine or wsd")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}: use adamw or muon")

    @property
    def warmup_steps(self) -> int:
        """The warmup the schedule uses: --warmup, but at most a quarter of the run, so that a run
        shorter than the default warmup still reaches its peak and decays (a 30-step run with 50
        warmup steps would end still warming up)."""
        return min(self.warmup, self.max_steps // WARMUP_SHARE)


WARMUP_SHARE = 4  # warmup takes at most 1/4 of the steps
DEFAULT_STEPS = 1000  # --max-steps unset, without --max-minutes
UNLIMITED_STEPS = 10**12  # --max-minutes without --max-steps: the minutes decide
SEQ_LEN, BATCH_SIZE = 256, 32  # --seq-len and --batch-size unset (and no budget recipe)


def _check_device(name: str) -> str:
    """--device: a device this machine has (runtime.lm.check_device), and one training runs on."""
    if check_device(name).type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: training runs on cpu or cuda")
    return name


def lr_at(step: int, c: TrainConfig, progress: float | None = None) -> float:
    """The learning-rate multiplier: linear warmup over `c.warmup_steps` steps, then cosine or WSD decay
    over the run's progress (by steps; with --max-minutes, by whichever of steps and time is
    further along). WSD holds the peak, then decays linearly over the last `cooldown` fraction."""
    warmup = c.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if progress is None:
        progress = (step - warmup) / max(1, c.max_steps - warmup)
    progress, floor = min(progress, 1.0), c.min_lr_ratio
    if c.schedule == "wsd":
        return 1.0 if progress < 1 - c.cooldown else floor + (1 - floor) * (1 - progress) / c.cooldown
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


GiB = 1024**3


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated: free GPU memory, or the host's MemAvailable (None when
    it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory_needed(c: TrainConfig, cfg: ModelConfig, device: torch.device, world: int = 1) -> dict[str, int]:
    """A lower bound of the bytes one training process needs, by part: weights, gradients and
    optimizer state (16 bytes a parameter with AdamW, 12 with Muon's single momentum on the
    matrices), the activations a micro-batch keeps for the backward pass (at least 4 floats a
    token per hidden unit and 2 per MLP unit, in each layer, at 4 bytes on the CPU and 2 under
    bf16 autocast), on a GPU the bf16 logits and their gradient, and the micro-batch's token ids
    (int64, on the host). The real figure is higher; this only refuses runs that cannot fit."""
    rows = max(1, c.batch_size // world)
    tokens = rows * c.seq_len
    act_bytes = 2 if device.type == "cuda" else 4
    params = cfg.num_params() // (world if c.fsdp else 1)  # FSDP: each process holds 1/world of them
    need = {
        "weights and optimizer state": params * (12 if c.optimizer == "muon" else 16),
        "activations": tokens * cfg.num_layers * (4 * cfg.hidden_size + 2 * cfg.intermediate_size) * act_bytes,
        "batch": c.batch_size * (c.seq_len + 1) * 8 * 2,  # every process reads the whole batch, then a tensor
    }
    if device.type == "cuda":
        need["logits"] = tokens * cfg.vocab_size * 2 * 2
    return need


def check_memory(c: TrainConfig, cfg: ModelConfig, device: torch.device, world: int = 1) -> None:
    """Refuse, with the numbers, a run whose memory_needed exceeds what the device has free, before
    anything is allocated: a billion-row batch would otherwise sit at step 0 building its rows, then
    fail allocating (or be killed) minutes later."""
    need = memory_needed(c, cfg, device, world)
    host_only = {"batch"} if device.type == "cuda" else set()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if world > 1 else 1  # processes sharing the host
    checks = [(device, sum(v for k, v in need.items() if k not in host_only) * (1 if device.type == "cuda" else local))]
    if host_only:
        checks.append((torch.device("cpu"), need["batch"] * local))
    for dev, total in checks:
        free = available_memory(dev)
        if free is None or total <= free:
            continue
        parts = ", ".join(f"{k} {v / GiB:,.1f} GiB" if v >= GiB else f"{k} {v / 2**20:,.0f} MiB"
                          for k, v in need.items() if v >= 2**20)
        where = "the GPU has" if dev.type == "cuda" else "the machine has"
        raise ValueError(f"--batch-size {c.batch_size} x --seq-len {c.seq_len} needs at least {total / GiB:,.1f} GiB "
                         f"({parts}), but {where} {free / GiB:,.1f} GiB free: lower --batch-size (raise "
                         "--grad-accum to keep the tokens per step), --seq-len or the model's size")


RUN_FILES = ("checkpoint", "metrics.jsonl", "loss.png", "receipt.json", "config.json", "generation_config.json",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja", ".final")


def run_files(out: str) -> list[str]:
    """The files and folders of an earlier run in out (what a new run would replace); the data a
    run synthesized (out/data) is not among them, as it is reused."""
    if not os.path.isdir(out):
        return []
    names = [n for n in RUN_FILES if os.path.lexists(os.path.join(out, n))]
    names += sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "*.safetensors")))
    names += sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, ".tmp-checkpoint-*")))
    return names


def check_new_run(out: str, resume: bool, overwrite: bool) -> None:
    """A run into a folder that holds another needs --resume (continue it) or --overwrite (replace it)."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    found = run_files(out) if not resume else []
    if found and not overwrite:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise ValueError(f"--out {out} already holds a training run ({shown}): --resume continues it, "
                         "--overwrite replaces it (its checkpoint, metrics and model are deleted)")


def batch(tokens: np.ndarray, seed: int, step: int, micro: int, c: TrainConfig, device) -> tuple:
    """The micro-batch of a step: a pure function of (seed, step, micro), so resuming replays it."""
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(tokens) - c.seq_len - 1, size=c.batch_size)
    rows = np.stack([tokens[s:s + c.seq_len + 1] for s in starts]).astype(np.int64)
    xy = torch.from_numpy(rows).to(device)
    return xy[:, :-1], xy[:, 1:]


def lm_loss(model: Transformer, x, y, forward=None, autocast=None, fuse_head: bool = True,
            cross_entropy=None, head_loss=None) -> torch.Tensor:
    """Next-token cross-entropy. The LM head is applied inside the loss: head_loss(hidden, weight,
    targets), by default chunk by chunk so that the [tokens, vocab] logits never exist (loss.py);
    `forward` may be the DDP- or compile-wrapped model. Without the fused head,
    cross_entropy(logits [N, V], targets [N]) computes the loss (default: F.cross_entropy over an
    fp32 copy of the logits)."""
    head, forward = model.lm_head, (forward if forward is not None else model)
    fused = fuse_head and head.bias is None
    with autocast or contextlib.nullcontext():
        out = forward(x, return_hidden=fused)
    if fused:
        w = head.weight.to(torch.bfloat16) if autocast is not None else head.weight
        return (head_loss or fused_linear_cross_entropy)(out.to(w.dtype), w, y)
    logits, y = out.view(-1, out.shape[-1]), y.reshape(-1)
    if cross_entropy is not None:
        return cross_entropy(logits, y)
    return F.cross_entropy(logits.float(), y)


def loss_function(model: Transformer, forward, device: torch.device, compile: bool = False, fsdp: bool = False):
    """(x, y) -> the mean next-token loss, as Trainer computes it, with the model's training
    accelerators swapped in (slm.accel.accelerate_training). On the CPU the LM head is fused into
    the cross-entropy (loss.py: no logits tensor, less memory traffic), and the GLU, the rotary
    embedding, RMSNorm and causal attention run as C++ kernels (accel/cpu_train.py). On a GPU: bf16
    autocast, a bf16 residual stream, the plain head and the Triton cross-entropy over the bf16
    logits (accel/gpu_train.py), all of which torch.compile keeps in one graph with the model.
    SLM_TRITON=linear_ce,glu,rope also fuses the head into that cross-entropy (not under FSDP), and
    runs SwiGLU and rotary embedding with the Q/K/V split in Triton, until a GPU measurement makes
    them the default. With `compile` the whole loss (forward, head and cross-entropy) is compiled,
    not the model alone."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    fuse = device.type == "cpu" and not fsdp  # FSDP re-shards the head after forward: keep it inside
    cross_entropy = head_loss = None
    if device.type == "cuda":
        from ..accel import gpu_train  # imports Triton: not on the CPU's start-up path
        cross_entropy, head_loss = gpu_train.losses(device, fsdp)
        fuse = fuse or head_loss is not None
        # bf16 residual stream (as modded-nanogpt and llm.c train): +1.6% tokens/s on an H200
        model.autocast_residual = True
        if compile:  # tunes the generated kernels' block sizes: +1.7% on an H200, ~1 min more compiling
            import torch._inductor.config as inductor_config
            inductor_config.coordinate_descent_tuning = True
    accelerate_training(model, device)

    def loss(x, y):
        return lm_loss(model, x, y, forward, autocast, fuse_head=fuse, cross_entropy=cross_entropy,
                       head_loss=head_loss)
    return torch.compile(loss) if compile else loss


def train_step(loss_fn, model: torch.nn.Module, optimizers, micro_batches, grad_accum: int,
               grad_clip: float) -> torch.Tensor:
    """One optimizer step over `grad_accum` micro-batches (x, y). Returns the mean loss as a
    tensor: reading it (.item()) waits for the device, so the loop does that only when it logs."""
    total = None
    for x, y in micro_batches:
        loss = loss_fn(x, y) / grad_accum
        loss.backward()  # DDP averages the gradients over ranks
        total = loss.detach() if total is None else total + loss.detach()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return total


class Trainer:
    def __init__(self, c: TrainConfig, model_cfg: ModelConfig):
        self.c = c
        output_folder(c.out)
        # Under torchrun (WORLD_SIZE > 1): DDP, or FSDP with --fsdp (distributed.py)
        device = torch.device(c.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.world, self.rank, self.device = distributed.setup(device)
        if self.device.type == "cuda":  # fp32 matmuls outside autocast (Muon's, eval's) on tensor cores
            torch.set_float32_matmul_precision("high")
        self.fsdp = c.fsdp and self.world > 1
        if c.batch_size % self.world:
            raise ValueError(f"--batch-size {c.batch_size} must be divisible by the {self.world} processes")
        if self.fsdp and c.optimizer == "muon":
            raise ValueError("--fsdp shards each matrix over the processes, but Muon needs whole matrices: "
                             "use --optimizer adamw with --fsdp")
        self.tokenizer = Tokenizer.from_dir(c.tokenizer)
        self.train_tokens, self.val_tokens = load_tokens(c.data, "train"), load_tokens(c.data, "val")
        data_vocab = load_meta(c.data).get("vocab_size")
        if data_vocab is not None and data_vocab != self.tokenizer.vocab_size:
            raise ValueError(f"{c.data} was prepared with a {data_vocab}-token tokenizer, but {c.tokenizer} has "
                             f"{self.tokenizer.vocab_size}: pass the tokenizer the data was prepared with")
        for split, toks in (("training", self.train_tokens), ("validation", self.val_tokens)):
            if len(toks) <= c.seq_len + 1:
                raise ValueError(f"{c.data}: {len(toks)} {split} tokens, fewer than one sequence of --seq-len "
                                 f"{c.seq_len}; use more data or a shorter --seq-len")
        self.model_cfg = model_cfg.replace(vocab_size=self.tokenizer.vocab_size, max_seq_len=max(c.seq_len, model_cfg.max_seq_len),
                                           bos_token_id=self.tokenizer.bos_id, eos_token_id=self.tokenizer.eos_id)
        check_memory(c, self.model_cfg, self.device, self.world)
        torch.manual_seed(c.seed)
        self.model = Transformer(self.model_cfg).to(self.device)
        self.model.init_weights()
        self.forward = distributed.wrap(self.model, self.world, self.fsdp, self.device)
        self.optimizers = build_optimizers(self.model, c.optimizer, c.lr, c.weight_decay, c.muon_lr)
        self.step, self.receipt = 0, None
        self.probe_items = probes(c.probes) if c.probes else []
        self.loss = loss_function(self.model, self.forward, self.device, c.compile, self.fsdp)

    # -- checkpoints ---------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.c.out, "checkpoint")

    def save_checkpoint(self) -> Transformer | None:
        """Write out/checkpoint atomically (on rank 0; under FSDP every rank must call it, to gather
        the shards). Returns the whole model on rank 0, None elsewhere."""
        model, optim = self.model, None
        if self.fsdp:
            msd, optim = distributed.full_state(self.model, self.optimizers[0])
            if self.rank == 0:
                model = Transformer(self.model_cfg)
                model.load_state_dict(msd)
                optim = {f"0.{k}": v for k, v in optim.items()}
        if self.rank != 0:
            return None
        try:
            with hf.atomic_folder(self.ckpt_dir) as tmp:
                hf.save_model(model, os.path.join(tmp, "model"), tokenizer=self.tokenizer)
                optim = optim if optim is not None else state_tensors(self.optimizers, self._param_names())
                save_file(optim, os.path.join(tmp, "trainer_state.safetensors"))
                with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                    json.dump({"step": self.step, "world_size": self.world, "train_config": asdict(self.c),
                               "model_config": self.model_cfg.to_dict()}, f, indent=2)
        except BaseException as e:
            if isinstance(e, OSError) or "(os error" in str(e):  # out of disk (also as safetensors' own error)
                raise CheckpointError(f"could not write the checkpoint of step {self.step} ({e}); "
                                      f"{self._previous_checkpoint()}") from e
            raise
        return model

    def _previous_checkpoint(self) -> str:
        try:
            with open(os.path.join(self.ckpt_dir, "trainer_state.json")) as f:
                step = json.load(f)["step"]
            return f"the previous checkpoint (step {step}) in {self.ckpt_dir} is intact: free space, then --resume"
        except (OSError, ValueError, KeyError):
            return "there is no earlier checkpoint"

    def load_checkpoint(self) -> bool:
        """Restore weights, optimizer state and step from out/checkpoint; False when there is none.
        A checkpoint of another architecture or optimizer, or a damaged file, is a CheckpointError
        that names the file, before any weight is touched."""
        if self.rank == 0:
            hf.recover_folder(self.ckpt_dir)  # a kill inside the last save's commit
        if self.world > 1:
            torch.distributed.barrier()
        state_path = os.path.join(self.ckpt_dir, "trainer_state.json")
        if not os.path.exists(state_path):
            return False
        try:
            state = read_json_object(state_path)
        except ValueError as e:
            raise CheckpointError(f"{e}; the checkpoint cannot be resumed (--overwrite starts the run again)") from None
        step, saved_cfg, train_cfg = state.get("step"), state.get("model_config"), state.get("train_config")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0 or not isinstance(saved_cfg, dict) \
                or not isinstance(train_cfg, dict):
            raise CheckpointError(f"{state_path}: not a trainer state (needs step, model_config and train_config); "
                                  "the checkpoint cannot be resumed (--overwrite starts the run again)")
        saved = train_cfg.get("optimizer", "adamw")
        if saved != self.c.optimizer:
            raise ValueError(f"{self.ckpt_dir} was trained with --optimizer {saved}; resume with the same optimizer")
        ours = self.model_cfg.to_dict()
        differ = [k for k in ours if k in saved_cfg and saved_cfg[k] != ours[k] and k not in ("name", "source")]
        if differ:
            what = ", ".join(f"{k} {saved_cfg[k]} (this run: {ours[k]})" for k in differ[:6])
            raise CheckpointError(f"{state_path}: the checkpoint is of another architecture: {what}; resume with the "
                                  "flags it was trained with (--preset, --dim, --layers, --heads, --mlp, --tokenizer)")
        loaded = hf.load_model(os.path.join(self.ckpt_dir, "model"), dtype=torch.float32, device=self.device)
        theirs = dict(loaded.named_parameters())
        with torch.device("meta"):  # the whole model's shapes (under FSDP self.model holds shards)
            ours_shapes = {n: tuple(p.shape) for n, p in Transformer(self.model_cfg).named_parameters()}
        if ours_shapes != {n: tuple(q.shape) for n, q in theirs.items()}:
            bad = next((n for n in ours_shapes if n not in theirs or ours_shapes[n] != tuple(theirs[n].shape)),
                       next(iter(theirs.keys() - ours_shapes.keys()), "?"))
            raise CheckpointError(f"{os.path.join(self.ckpt_dir, 'model')}: weight {bad} has shape "
                                  f"{list(theirs[bad].shape) if bad in theirs else 'none'}, this run's model "
                                  f"{list(ours_shapes[bad]) if bad in ours_shapes else 'none'}: the checkpoint is of "
                                  "another architecture")
        tensors = self._read_trainer_state()
        if self.fsdp:
            prefix = "0."
            distributed.load_full_state(self.model, self.optimizers[0], loaded.state_dict(),
                                        {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        else:
            try:
                load_state_tensors(self.optimizers, self._param_names(), tensors, check_only=True)
            except ValueError as e:
                raise CheckpointError(f"{os.path.join(self.ckpt_dir, 'trainer_state.safetensors')}: {e}") from None
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    p.copy_(theirs[n])
            load_state_tensors(self.optimizers, self._param_names(), tensors)
        self.step = step
        return True

    def _read_trainer_state(self) -> dict[str, torch.Tensor]:
        """The optimizer state tensors, each checked to lie inside the file (a truncated or damaged
        file is a CheckpointError naming it, not a crash inside the safetensors library)."""
        path = os.path.join(self.ckpt_dir, "trainer_state.safetensors")
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing, so the optimizer state cannot be restored "
                                  "(--overwrite starts the run again)")
        out = {}
        for name, info in read_header(path).items():
            t = torch.empty(info.shape, dtype=info.dtype)
            read_into(path, info, t)
            out[name] = t
        return out

    def _param_names(self) -> dict[int, str]:
        return {id(p): n for n, p in self.model.named_parameters()}

    # -- the loop ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = [self.loss(*batch(self.val_tokens, 10_000 + self.c.seed, i, 0, self.c, self.device)).item()
                  for i in range(self.c.eval_batches)]
        if self.receipt is not None:  # forward passes only
            self.receipt.add_tokens(self.c.eval_batches * self.c.batch_size * self.c.seq_len, "inferred", self.c.seq_len)
        self.model.train()
        return sum(losses) / len(losses)

    @torch.no_grad()
    def probe(self) -> dict | None:
        """The built-in probes' scores (data.probes.score), or None where there are none to take:
        --probes 0, or weights sharded over processes (FSDP), which one process cannot run alone."""
        if not self.c.probes or self.fsdp:
            return None
        self.model.eval()
        try:
            result = score_probes(LM(self.model, self.tokenizer), self.probe_items, batch_size=64)
        finally:
            self.model.train()
        if self.receipt is not None:  # forward passes only, of sequences this long on average
            self.receipt.add_tokens(result["tokens"], "inferred", max(1, result["tokens"] // result["sequences"]))
        return result

    def _clock(self, start: float) -> float:
        """Seconds since start. Under torchrun, rank 0's: every process must take the same learning
        rate (it follows the elapsed time) and stop after the same step, or their updates drift
        apart and the last step's collectives never meet."""
        t = time.time() - start
        if self.world > 1:
            t_ = torch.tensor([t], dtype=torch.float64, device=self.device)
            torch.distributed.broadcast(t_, 0)
            t = t_.item()
        return t

    def _check_ranks_agree(self) -> None:
        """Every process must end at the same step, and under DDP with the same weights: a cheap
        check (one gather of two numbers) that turns a silent divergence into an error."""
        if self.world == 1:
            return
        checksum = torch.zeros((), dtype=torch.float64, device=self.device) if self.fsdp else \
            torch.stack([p.detach().double().sum() for p in self.model.parameters()]).sum()  # one sync, not one a tensor
        mine = torch.stack([torch.tensor(float(self.step), dtype=torch.float64, device=self.device), checksum])
        every = [torch.zeros_like(mine) for _ in range(self.world)]
        torch.distributed.all_gather(every, mine)
        if any(not torch.equal(e, every[0]) for e in every):
            raise RuntimeError("the training processes disagree at the end (step, weight checksum): "
                               + ", ".join(f"rank {i}: {e.tolist()}" for i, e in enumerate(every)))

    def train(self, resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
        """Run to max_steps (or max_minutes). resume: continue from out/checkpoint when there is one.
        Without resume, an earlier run in out is refused (its checkpoint, metrics and model would be
        lost) unless overwrite, which deletes it first."""
        c = self.c
        check_new_run(c.out, resume, overwrite)
        os.makedirs(c.out, exist_ok=True)
        metrics_path = os.path.join(c.out, "metrics.jsonl")
        if self.world > 1:  # every rank has checked the folder before rank 0 clears it
            torch.distributed.barrier()
        if overwrite and self.rank == 0:
            for name in run_files(c.out):
                path = os.path.join(c.out, name)
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        resumed = resume and self.load_checkpoint()
        if resumed:
            if self.rank == 0:
                print(f"resuming from {self.ckpt_dir} at step {self.step}", file=sys.stderr, flush=True)
                _truncate_metrics(metrics_path, self.step)
        elif os.path.exists(metrics_path) and self.rank == 0:
            os.remove(metrics_path)
        if c.warmup_steps < c.warmup and self.rank == 0:
            print(f"note: --warmup {c.warmup} is more than 1/{WARMUP_SHARE} of the {c.max_steps} steps; warming up "
                  f"over {c.warmup_steps} so that the learning rate decays", file=sys.stderr, flush=True)
        tokens_per_step = c.batch_size * c.seq_len * c.grad_accum
        fpt, peak = flops_per_token(self.model_cfg, c.seq_len), peak_flops(self.device, refresh=True)
        # out/receipt.json: this session's time, FLOPs, energy, CO2 and money (added to the earlier
        # sessions' on --resume); rank 0 accounts for all processes of this machine
        self.receipt = track("train", path=os.path.join(c.out, "receipt.json"), model_cfg=self.model_cfg,
                             device=self.device, dtype=torch.bfloat16 if self.device.type == "cuda" else torch.float32,
                             devices_used=self.world if self.device.type == "cuda" else 1, processes=self.world,
                             merge=bool(resumed), stream=sys.stdout).start() if self.rank == 0 else None
        start, budget = time.time(), 60 * c.max_minutes if c.max_minutes else None
        elapsed = 0.0  # seconds; under torchrun rank 0's clock (see _clock)
        # Under a time budget the step count is not known: no total, so no made-up ETA
        bar = tqdm(total=None if budget else c.max_steps, initial=self.step, desc="training",
                   disable=not progress or self.rank != 0, unit="step")
        last_t, last_step, val, final_val = time.perf_counter(), self.step, None, None
        probe_acc = shown_probes = final_probes = None  # the built-in probes: last scored, last shown, at the end
        self.model.train()
        while self.step < c.max_steps and not (budget and elapsed > budget):
            progress = None
            if budget:  # a time budget: decay by elapsed time when that is further along (not replayable)
                progress = max((self.step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps), elapsed / budget)
            lr = lr_at(self.step, c, progress)
            set_lr(self.optimizers, lr)
            micro_batches = ((x[self.rank::self.world], y[self.rank::self.world]) for x, y in
                             (batch(self.train_tokens, c.seed, self.step, m, c, self.device) for m in range(c.grad_accum)))
            total = train_step(self.loss, self.model, self.optimizers, micro_batches, c.grad_accum, c.grad_clip)
            self.step += 1
            if self.receipt is not None:
                self.receipt.add_tokens(tokens_per_step, "trained", c.seq_len)
            elapsed = self._clock(start) if budget else 0.0
            last = self.step == c.max_steps or bool(budget and elapsed > budget)
            if self.step % c.eval_every == 0 or last:
                val, probed = self.evaluate(), self.probe() if self.rank == 0 else None
                final_val = val if last else None
                if probed is not None:
                    probe_acc, final_probes = probed["acc"], probed if last else None
            if self.step % c.log_every == 0 or last:  # the last step is always logged
                if self.world > 1:  # report the loss of the whole global batch
                    torch.distributed.all_reduce(total)
                    total /= self.world
                total = total.item()
                now = time.perf_counter()
                tps = (self.step - last_step) * tokens_per_step / (now - last_t)
                last_t, last_step = now, self.step
                row = {"step": self.step, "loss": round(total, 5), "lr": c.lr * lr, "tokens_per_s": round(tps),
                       "mfu": round(tps * fpt / peak, 4)}
                if val is not None:
                    row["val_loss"] = round(val, 5)
                    val = None
                if probe_acc is not None:
                    row["probes"] = round(probe_acc, 4)
                    shown_probes, probe_acc = probe_acc, None
                if self.rank == 0:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{row['mfu']:.0%}",
                                **({"probes": f"{shown_probes:.2f}"} if shown_probes is not None else {}))
            bar.update(1)
            if self.step % c.save_every == 0 and (self.rank == 0 or self.fsdp):
                self.save_checkpoint()
        bar.close()
        self._check_ranks_agree()
        final_val = self.evaluate() if final_val is None else final_val
        if final_probes is None and self.rank == 0:
            final_probes = self.probe()
        model = self.save_checkpoint() if self.rank == 0 or self.fsdp else None
        result = {"steps": self.step, "val_loss": final_val, "minutes": (time.time() - start) / 60}
        if final_probes is not None:
            result["probes"] = {k: v for k, v in final_probes.items() if k not in ("tokens", "sequences")}
        if self.rank != 0:
            return result
        final = os.path.join(c.out, ".final")  # written whole, then moved in file by file
        hf.save_model(model, final, tokenizer=self.tokenizer)
        for name in os.listdir(final):
            os.replace(os.path.join(final, name), os.path.join(c.out, name))
        os.rmdir(final)
        plot_metrics(metrics_path, os.path.join(c.out, "loss.png"), chance=(final_probes or {}).get("chance"))
        self.receipt.finish()
        result["minutes"] = (time.time() - start) / 60
        return result


def _truncate_metrics(path: str, step: int) -> None:
    """Drop metric rows logged after the checkpoint being resumed: they will be logged again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with atomic_write(path) as f:  # a kill here keeps the old file whole
        f.writelines(rows)


def plot_metrics(metrics_path: str, png: str, chance: float | None = None) -> None:
    """The loss curves, and beside them the built-in probes' accuracy where the run scored them
    (with chance level, the score of guessing: `chance`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    probed = [r for r in rows if "probes" in r]
    fig, axes = plt.subplots(1, 2 if probed else 1, figsize=(12 if probed else 7, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if probed:
        ax = axes[0][1]
        ax.plot([r["step"] for r in probed], [r["probes"] for r in probed], "o-", color="tab:green",
                label="built-in probes")
        if chance is not None:
            ax.axhline(chance, color="gray", linestyle="--", label=f"chance ({chance:.2f})")
        ax.set_ylim(0, 1)
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_write(png, "wb") as f:
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)
