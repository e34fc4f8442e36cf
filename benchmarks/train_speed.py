"""Training speed against transformers, measured in the same run. Two figures:

    python benchmarks/train_speed.py throughput [--preset stories15m] [--steps 10] [--batch-size 8] [--seq-len 256]
    python benchmarks/train_speed.py quality [--minutes 10] [--ours-minutes 6.67]
    python benchmarks/train_speed.py gpu [--preset slm-124m] [--batch-size 32] [--seq-len 1024]

throughput: tokens/s of one training step (forward, backward, fused AdamW) of slm's loop against a
transformers LlamaForCausalLM at the same shape, on the same random token batches, both fp32 on
the CPU (bf16 is emulated here); each also as a fraction of the machine's measured fp32 matmul peak
(MFU: 6 FLOPs per matmul weight, the tied LM head included, plus 12 L T d for attention): the best
2048^3 rate ever measured on this machine, and the best of this run's rounds. slm's step is the
Trainer's on the CPU (loss_function): the head fused into the cross-entropy, C++ kernels for the
softmax, RMSNorm, SwiGLU, the rotation and causal attention.

quality (time to quality): the baseline, a transformers LlamaForCausalLM with AdamW (warmup,
cosine decay over its time budget), trains for --minutes on the built-in synthetic corpus. Then
`slm train`'s recipe (Muon on the hidden matrices, warmup-stable-decay over its own, shorter time
budget) trains the same shape and parameter count on the same data, batch and sequence length,
and we report the wall time at which its validation loss (the same held-out batches) first
reaches the baseline's final one. Both evaluate every --eval-every steps; that time counts in both.

gpu: tokens/s and MFU of one training step on a CUDA device in bf16 autocast, slm's Trainer step
(loss_function + train_step: compiled loss, fused AdamW or Muon, clipping) against transformers'
LlamaForCausalLM (SDPA attention, fused AdamW, clipping), each with and without torch.compile.
MFU is against the datasheet's dense bf16 peak (footprint/devices.py) and, second, against a
bf16 8192^3 matmul measured in the same run.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import slm  # noqa: E402
from slm.train.loop import (TrainConfig, Trainer, batch, flops_per_token, loss_function,  # noqa: E402
                            peak_flops, train_step)
from slm.runtime.tokenizer import Tokenizer  # noqa: E402
from slm.train.optim import build_optimizers  # noqa: E402
from slm.footprint.devices import measure_cpu_peak  # noqa: E402
from results_log import machine_info, record  # noqa: E402


def hf_llama(cfg, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings, **kw))


# -- throughput --------------------------------------------------------------------------------
def tokens_per_s(step, steps: int, tokens: int) -> float:
    step(0)  # warm-up
    best = float("inf")
    for rep in range(3):
        t = time.perf_counter()
        for i in range(steps):
            step(i + 1)
        best = min(best, time.perf_counter() - t)
    return steps * tokens / best


def throughput(a) -> None:
    cfg = slm.get_config(a.preset)
    B, T = a.batch_size, a.seq_len
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g) for _ in range(a.steps + 1)]

    # slm: the Trainer's model, optimizer and loss (the LM head fused into the cross-entropy, C++ kernels)
    torch.manual_seed(0)
    ours = slm.Transformer(cfg)
    ours.init_weights()
    ours.train()
    opts = build_optimizers(ours, "adamw", 1e-3, 0.1)

    loss_fn = loss_function(ours, ours, torch.device("cpu"))

    def slm_step(i):
        x, y = data[i][:, :-1], data[i][:, 1:]
        loss_fn(x, y).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)

    ref = hf_llama(cfg)
    ref.train()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, fused=True)

    def hf_step(i):
        x, y = data[i][:, :-1], data[i][:, 1:]
        loss = F.cross_entropy(ref(x).logits.view(-1, cfg.vocab_size), y.reshape(-1))
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    fpt = flops_per_token(cfg, T)
    t_ref, t_ours, rates = [], [], []
    for _ in range(a.rounds):  # interleaved: the machine's speed drifts between minutes
        t_ref.append(tokens_per_s(hf_step, a.steps, B * T))
        t_ours.append(tokens_per_s(slm_step, a.steps, B * T))
        rates.append(measure_cpu_peak())
    # The peak: the best 2048^3 matmul rate ever measured here (cached by footprint/devices.py,
    # which keeps the best), and second the best of this run's rounds, taken between the steps.
    peak, here = peak_flops(torch.device("cpu"), refresh=True), max(rates)
    t_ref, t_ours = max(t_ref), max(t_ours)
    print(f"{a.preset} ({cfg.num_params() / 1e6:.1f}M), batch {B} x {T}, fp32, {torch.get_num_threads()} threads; "
          f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (best measured here), {here / 1e9:.1f} in this run; "
          f"{fpt / 1e6:.1f} MFLOP per token")
    print(f"  transformers  {t_ref:8.0f} tok/s   MFU {t_ref * fpt / peak:5.1%} ({t_ref * fpt / here:5.1%} of this run's)")
    print(f"  slm           {t_ours:8.0f} tok/s   MFU {t_ours * fpt / peak:5.1%} ({t_ours * fpt / here:5.1%} of this run's)"
          f"   ratio {t_ours / t_ref:.2f}x")
    record("train_speed_throughput", preset=a.preset, batch=f"{B} x {T}", mflop_per_token=round(fpt / 1e6, 1),
           peak_gflops=round(peak / 1e9, 1), run_peak_gflops=round(here / 1e9, 1),
           transformers_tok_s=round(t_ref), slm_tok_s=round(t_ours), vs_transformers=round(t_ours / t_ref, 2),
           transformers_mfu=round(t_ref * fpt / peak, 4), mfu=round(t_ours * fpt / peak, 4),
           mfu_this_run=round(t_ours * fpt / here, 4))


# -- time to quality ---------------------------------------------------------------------------
def baseline_run(cfg, c: TrainConfig, tokens, val_tokens, minutes: float, lr: float, log) -> float:
    """transformers Llama + fused AdamW (betas 0.9/0.95, decay 0.1 on matrices), warmup then cosine
    to 10% over the time budget, clipping at 1.0. Returns the final validation loss."""
    torch.manual_seed(c.seed)
    model = hf_llama(cfg)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), fused=True)

    @torch.no_grad()
    def evaluate():
        model.eval()
        losses = [F.cross_entropy(model(x).logits.view(-1, cfg.vocab_size), y.reshape(-1)).item()
                  for x, y in (batch(val_tokens, 10_000 + c.seed, i, 0, c, "cpu") for i in range(c.eval_batches))]
        model.train()
        return sum(losses) / len(losses)

    start, step, val = time.time(), 0, None
    budget = 60 * minutes
    while time.time() - start < budget:
        progress = (time.time() - start) / budget
        mult = (step + 1) / c.warmup if step < c.warmup else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = lr * mult
        x, y = batch(tokens, c.seed, step, 0, c, "cpu")
        loss = F.cross_entropy(model(x).logits.view(-1, cfg.vocab_size), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % c.eval_every == 0:
            val = evaluate()
            log({"run": "baseline", "step": step, "minutes": (time.time() - start) / 60, "val_loss": val})
    val = evaluate()
    log({"run": "baseline", "step": step, "minutes": (time.time() - start) / 60, "val_loss": val, "final": True})
    return val


def quality(a) -> None:
    from slm.data.prepare import build_synthetic, load_tokens
    root = a.data_dir or os.path.join(os.path.expanduser("~"), ".cache", "slm", "bench-train")
    data, tok_dir = build_synthetic(root, a.n_docs, a.vocab_size, seed=0)
    tokens, val_tokens = load_tokens(data, "train"), load_tokens(data, "val")
    tok = Tokenizer.from_dir(tok_dir)
    cfg = slm.get_config("slm-1m").replace(
        name="bench", hidden_size=a.dim, num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.heads,
        head_dim=a.dim // a.heads, intermediate_size=a.mlp, max_seq_len=a.seq_len, vocab_size=tok.vocab_size,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    log_path = a.log or os.path.join(root, "quality.jsonl")
    log_f = open(log_path, "w")

    def log(row):
        log_f.write(json.dumps(row) + "\n")
        log_f.flush()
        print(json.dumps(row), flush=True)

    c = TrainConfig(out="", data=data, tokenizer=tok_dir, seq_len=a.seq_len, batch_size=a.batch_size,
                    eval_every=a.eval_every, eval_batches=a.eval_batches, warmup=a.warmup)
    print(f"{a.layers} layers x {a.dim} wide, {cfg.num_params() / 1e6:.2f}M parameters (vocab {tok.vocab_size}), batch "
          f"{a.batch_size} x {a.seq_len}, {len(tokens):,} training tokens; {torch.get_num_threads()} threads")
    out = tempfile.mkdtemp()
    ours_minutes = a.ours_minutes or a.minutes * 2 / 3
    oc = TrainConfig(out=out, data=data, tokenizer=tok_dir, seq_len=a.seq_len, batch_size=a.batch_size,
                     eval_every=a.eval_every, eval_batches=a.eval_batches, warmup=a.warmup, max_steps=a.steps or 10**9,
                     max_minutes=None if a.steps else ours_minutes, optimizer=a.optimizer, lr=a.lr,
                     muon_lr=a.muon_lr, schedule=a.schedule, cooldown=a.cooldown, weight_decay=a.weight_decay,
                     save_every=10**9, log_every=a.eval_every)
    if a.steps:  # a recipe at a fixed step count: the loss does not depend on the machine's load
        result = Trainer(oc, cfg).train(progress=False)
        log({"run": "slm", "steps": a.steps, "muon_lr": a.muon_lr, "lr": a.lr, "cooldown": a.cooldown,
             "weight_decay": a.weight_decay, "val_loss": round(result["val_loss"], 4)})
        record("train_speed_quality", model=f"{a.layers} x {a.dim}", steps=a.steps, optimizer=a.optimizer,
               schedule=a.schedule, muon_lr=a.muon_lr, lr=a.lr, cooldown=a.cooldown, weight_decay=a.weight_decay,
               slm_val_loss=round(result["val_loss"], 4))
        return
    if a.baseline_loss is None:
        base = baseline_run(cfg, c, tokens, val_tokens, a.minutes, a.baseline_lr, log)
    else:
        base = a.baseline_loss
    Trainer(oc, cfg).train(progress=False)
    reached = None
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    elapsed, prev = 0.0, 0
    for r in rows:  # wall minutes (evaluations included) from the tokens/s of each logged interval
        elapsed += (r["step"] - prev) * a.batch_size * a.seq_len / r["tokens_per_s"] / 60
        prev = r["step"]
        log({"run": "slm", "step": r["step"], "minutes": elapsed, "val_loss": r.get("val_loss")})
        if reached is None and r.get("val_loss") is not None and r["val_loss"] <= base:
            reached = elapsed
    print(f"baseline (transformers + AdamW): validation loss {base:.4f} after {a.minutes:g} min")
    print(f"slm ({a.optimizer}, {a.schedule}): validation loss {rows[-1]['val_loss']:.4f} after {ours_minutes:.2f} min")
    if reached is None:
        print("slm did not reach the baseline's validation loss")
    else:
        print(f"slm reached the baseline's loss after {reached:.2f} min: {a.minutes / reached:.2f}x faster")
    record("train_speed_quality", model=f"{a.layers} x {a.dim}", optimizer=a.optimizer, schedule=a.schedule,
           muon_lr=a.muon_lr, lr=a.lr, cooldown=a.cooldown, baseline_minutes=a.minutes,
           baseline_val_loss=round(base, 4), slm_minutes=round(ours_minutes, 2),
           slm_val_loss=round(rows[-1]["val_loss"], 4), slm_steps=rows[-1]["step"],
           slm_reached_minutes=None if reached is None else round(reached, 2),
           vs_baseline=None if reached is None else round(a.minutes / reached, 2))


# -- GPU ---------------------------------------------------------------------------------------
def matmul_rate(device, n: int = 8192) -> float:
    """bf16 n^3 matmul FLOP/s on this device (the mean of 10 after 3 warm-ups)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * n**3 / (time.perf_counter() - t)


def profile(step, batches, out: str | None, steps: int = 5) -> None:
    """Where a step's time goes: CUDA kernel time per step (against wall time: the gap is the GPU
    waiting for the CPU) and the kernels that take it, grouped by kind."""
    from torch.profiler import ProfilerActivity
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for i in range(steps):
            step(batches(i))
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / steps
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels) / steps / 1e6
    kinds = {}
    for e in kernels:
        n = e.key.lower()
        kind = ("slm's Triton kernels (kernels/)" if n.startswith(("_triton_ce", "_glu", "_rope")) else
                "attention" if any(k in n for k in ("flash", "fmha", "attention", "cudnn", "sdpa")) else
                "matmul" if any(k in n for k in ("gemm", "sm90", "cutlass", "nvjet", "xmma", "mm_", "matmul")) else
                "triton (fused elementwise/reductions)" if "triton" in n else "other")
        kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total / steps / 1e6
    lines = [f"profile: {wall * 1e3:.1f} ms wall per step, {total * 1e3:.1f} ms of CUDA kernels "
             f"({total / wall:.0%} busy)"]
    lines += [f"  {k:<40} {v * 1e3:7.1f} ms  {v / total:5.1%}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])]
    lines.append(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=70))
    print("\n".join(lines[:len(kinds) + 1]), flush=True)
    if out:
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")


def gpu(a) -> None:
    import torch._inductor.config as inductor_config
    device = torch.device(a.device or "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cfg = slm.get_config(a.preset)
    B, T, A = a.batch_size, a.seq_len, a.grad_accum
    fpt, peak = flops_per_token(cfg, T), peak_flops(device)
    measured = matmul_rate(device) if device.type == "cuda" else peak
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}; {a.preset} ({cfg.num_params() / 1e6:.1f}M), batch {B} x {T}, "
          f"bf16 autocast; {fpt / 1e6:.1f} MFLOP per token; peak {peak / 1e12:.1f} TFLOP/s (datasheet), "
          f"bf16 matmul measured {measured / 1e12:.1f} TFLOP/s", flush=True)
    g = torch.Generator(device=device).manual_seed(0)
    data = [torch.randint(0, cfg.vocab_size, (B, T + 1), device=device, generator=g) for _ in range(4)]

    def batches(i):  # the micro-batches of step i
        return [data[(i * A + j) % 4] for j in range(A)]
    log = open(a.log, "a") if a.log else None

    def measure(label, step):
        t0 = time.perf_counter()
        for i in range(a.warmup):  # compiles on the first
            step(batches(i))
        sync()
        warm = time.perf_counter() - t0
        t = time.perf_counter()
        for i in range(a.steps):
            loss = step(batches(i))
        sync()
        tps = a.steps * A * B * T / (time.perf_counter() - t)
        row = {"variant": label, "device": name, "preset": a.preset, "batch": B, "seq_len": T, "grad_accum": A,
               "tokens_per_s": round(tps),
               "mfu": round(tps * fpt / peak, 4), "mfu_vs_measured_matmul": round(tps * fpt / measured, 4),
               "warmup_s": round(warm, 1), "loss": round(float(loss), 4),
               "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None}
        print(f"  {label:<22} {tps:10,.0f} tok/s   MFU {row['mfu']:6.1%}  ({row['mfu_vs_measured_matmul']:.1%} of the "
              f"measured matmul)   warm-up {warm:.0f} s", flush=True)
        if log:
            log.write(json.dumps(row) + "\n")
            log.flush()
        record("train_speed_gpu", machine=machine_info(device), **row)

    for variant in a.variants.split(","):
        # slm variants run the Trainer's step as it is on a GPU: the Triton cross-entropy, a bf16 residual
        # stream and, compiled, inductor's coordinate-descent tuning. Suffixes: +cudnn (cuDNN attention
        # for SDPA), +autotune (compile mode max-autotune-no-cudagraphs), +coord (coordinate-descent
        # tuning for transformers too); for slm, to see what each part gives: +torchce (F.cross_entropy
        # over an fp32 copy of the logits), +fp32res (fp32 residual stream), +nocoord; and the Triton
        # parts not yet on by default (kernels/triton_launch.py): +linearce (the head fused into the
        # cross-entropy), +glu (the SwiGLU kernels), +rope (rotary embedding and the Q/K/V split)
        base, *knobs = variant.split("+")
        os.environ["SLM_NO_TRITON"] = "1" if "torchce" in knobs else "0"
        parts = {"linearce": "linear_ce", "glu": "glu", "rope": "rope"}
        os.environ["SLM_TRITON"] = ",".join(parts[k] for k in knobs if k in parts)
        inductor_config.coordinate_descent_tuning = "coord" in knobs or (
            base.startswith("slm") and base.endswith("-compile") and "nocoord" not in knobs)
        torch.manual_seed(0)
        compiled = base.endswith("-compile")
        mode = "max-autotune-no-cudagraphs" if "autotune" in knobs else None
        if device.type == "cuda":
            torch.backends.cuda.enable_flash_sdp("cudnn" not in knobs)
            torch.backends.cuda.enable_mem_efficient_sdp("cudnn" not in knobs)
            torch.backends.cuda.enable_cudnn_sdp(True)
        if base.startswith("slm"):  # exactly the Trainer's step
            model = slm.Transformer(cfg).to(device)
            model.init_weights()
            model.train()
            opts = build_optimizers(model, "muon" if "muon" in base else "adamw", 1e-3, 0.1)
            loss_fn = loss_function(model, model, device)
            model.autocast_residual = device.type == "cuda" and "fp32res" not in knobs
            loss_fn = torch.compile(loss_fn, mode=mode) if compiled else loss_fn

            def step(xys, loss_fn=loss_fn, model=model, opts=opts):
                return train_step(loss_fn, model, opts, [(xy[:, :-1], xy[:, 1:]) for xy in xys], len(xys), 1.0)
        else:
            model = hf_llama(cfg, attn_implementation="sdpa").to(device)
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=device.type == "cuda")

            def hf_loss(x, y, model=model):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = model(x).logits
                return F.cross_entropy(logits.float().view(-1, cfg.vocab_size), y.reshape(-1))
            loss_fn = torch.compile(hf_loss, mode=mode) if compiled else hf_loss

            def step(xys, loss_fn=loss_fn, model=model, opt=opt):
                for xy in xys:
                    loss = loss_fn(xy[:, :-1], xy[:, 1:]) / len(xys)
                    loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.detach()
        try:
            measure(variant, step)
            if a.profile and variant == a.profile:
                profile(step, batches, a.profile_out)
        except Exception as e:  # report and go on to the next variant
            print(f"  {variant}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        del model, step, loss_fn
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("throughput")
    p.add_argument("--preset", default="stories15m")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p = sub.add_parser("quality")  # default shape: make demo's model
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp", type=int, default=512)
    p.add_argument("--minutes", type=float, default=10.0, help="the baseline's budget")
    p.add_argument("--ours-minutes", type=float, default=None, help="slm's budget (default: 2/3 of --minutes)")
    p.add_argument("--baseline-loss", type=float, default=None, help="skip the baseline run, use this loss")
    p.add_argument("--baseline-lr", type=float, default=3e-3)
    p.add_argument("--optimizer", default="muon")
    p.add_argument("--lr", type=float, default=6e-3)
    p.add_argument("--muon-lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=None,
                   help="no baseline, no time budget: train slm for this many steps and print its validation loss")
    p.add_argument("--schedule", default="wsd")
    p.add_argument("--cooldown", type=float, default=0.7)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--n-docs", type=int, default=30_000)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--log", default=None)
    p = sub.add_parser("gpu")
    p.add_argument("--preset", default="slm-124m")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (both models)")
    p.add_argument("--variants", default="slm-compile,hf-compile,slm-muon-compile,hf,slm")
    p.add_argument("--device", default=None, help="default cuda (cpu: only to try the script)")
    p.add_argument("--profile", default=None, help="a variant to profile after measuring it")
    p.add_argument("--profile-out", default=None, help="file for the profile's kernel table")
    p.add_argument("--log", default=None)
    a = ap.parse_args()
    {"throughput": throughput, "quality": quality, "gpu": gpu}[a.mode](a)


if __name__ == "__main__":
    main()
