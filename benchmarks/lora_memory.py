"""Peak memory and speed of LoRA training steps: on a real model as `slm finetune --lora` runs
them, or one QLoRA step at the Llama 2 7B shape with random int4 weights.

    python benchmarks/lora_memory.py --model smollm2-135m-instruct [--steps 3] [--batch 8] [--micro-batch 1]
        [--seq-len 512] [--quantize none|int8|int4] [--gradient-checkpointing] [--record]

With --model, the model is prepared exactly as `slm finetune --lora` prepares it (sft.prepare_model:
the frozen base as the finetune defaults hold it, adapters r 8 on every projection, the allocator
set as the run sets it), and --steps AdamW steps run on --batch rows of --seq-len random tokens
(loss on the last three quarters of each row, as an SFT batch whose prompt carries none), through
sft.accumulate (--micro-batch rows per forward and backward). The peak resident memory is the
kernel's VmHWM over the whole process, loading included; steps/s is over the steps after the first.
--record appends the result to benchmarks/results/lora_memory.jsonl.

    nice -n 5 .venv/bin/python benchmarks/lora_memory.py [--preset llama-2-7b] [--quantize int4] [--seq-len 64]

The base is built as `slm bench --random-weights` builds it (slm/bench.py): on the meta device,
then each linear layer is given random fp32 weights and quantized on its own, so the fp32 model
never exists. LoRA adapters (r 8 on every attention and MLP projection) are added, and one
AdamW step runs on one random sequence with the loss on its second half (as an SFT batch: the
prompt's tokens carry no loss). The quantized layers pass gradients to their inputs by
dequantizing their weights again in backward (quantize._InputGrad), so no fp32 copy of a weight
outlives its layer's call. Prints peak resident memory (the kernel's VmHWM: what the machine
had to hold at the worst moment, the model included) and the step's time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))


def rss_gib() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**30


def peak_gib() -> float:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux carries that across
    exec, so a benchmark started from a large process (pytest) would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # KiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a real model (path or known name), prepared as finetune does")
    ap.add_argument("--preset", default="llama-2-7b")
    ap.add_argument("--quantize", default=None, choices=["none", "int8", "int4"],
                    help="the frozen base (default: finetune's with --model, int4 with --preset)")
    ap.add_argument("--seq-len", type=int, default=None, help="default: 512 with --model, 64 with --preset")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="rows per step (--model)")
    ap.add_argument("--micro-batch", type=int, default=1, help="rows per forward and backward (--model)")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                    help="default: finetune's with --model (on for LoRA), off with --preset")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--record", action="store_true", help="append the result to benchmarks/results/lora_memory.jsonl")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.model:
        return real_model(a)
    a.quantize = a.quantize or "int4"
    a.seq_len = a.seq_len or 64
    a.gradient_checkpointing = bool(a.gradient_checkpointing)

    from slm.bench import random_model
    from slm.finetune.lora import apply_lora, trainable_parameters
    from slm.finetune.sft import IGNORE, Packed, sft_loss
    from slm.quant.layers import weight_bytes
    from slm.train.optim import build_optimizers

    t0 = time.perf_counter()
    model = random_model(a.preset, a.quantize)
    build_s = time.perf_counter() - t0
    rss_built = rss_gib()
    apply_lora(model, r=a.r, alpha=2 * a.r)
    trainable, total = trainable_parameters(model)
    optimizers = build_optimizers(model, "adamw", 2e-4, 0.0)
    model.train()

    g = torch.Generator().manual_seed(0)
    T = a.seq_len
    ids = torch.randint(0, model.config.vocab_size, (1, T), generator=g)
    targets = torch.roll(ids, -1, 1)
    targets[:, : T // 2] = IGNORE
    targets[:, -1] = IGNORE
    batch = Packed(ids, targets, torch.arange(T)[None], torch.zeros(1, T, dtype=torch.long))
    t1 = time.perf_counter()
    loss, n = sft_loss(model, batch, checkpoint=a.gradient_checkpointing)
    t2 = time.perf_counter()
    loss.backward()
    t3 = time.perf_counter()
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    t4 = time.perf_counter()
    result = {"preset": a.preset, "quantize": a.quantize, "seq_len": T, "batch": 1, "lora_r": a.r,
              "gradient_checkpointing": a.gradient_checkpointing, "trainable_params": trainable,
              "base_params": total, "weights_GiB": round(weight_bytes(model) / 2**30, 3),
              "rss_after_build_GiB": round(rss_built, 3), "peak_rss_GiB": round(peak_gib(), 3),
              "build_s": round(build_s, 1), "forward_s": round(t2 - t1, 2), "backward_s": round(t3 - t2, 2),
              "optimizer_s": round(t4 - t3, 2), "step_s": round(t4 - t1, 2), "loss": round(loss.item(), 4),
              "threads": torch.get_num_threads()}
    print(json.dumps(result, indent=2))
    return result


def real_model(a) -> dict:
    from slm.finetune.sft import IGNORE, FinetuneConfig, Packed, accumulate, prepare_model, return_freed_memory
    from slm.quant.layers import weight_bytes
    from slm.train.optim import build_optimizers

    T = a.seq_len or 512
    with tempfile.TemporaryDirectory() as tmp:  # the config checks its paths' names only
        c = FinetuneConfig(model=a.model, data=os.path.join(tmp, "none.jsonl"), out=tmp, lora=True, lora_r=a.r,
                           lora_alpha=2.0 * a.r, quantize=a.quantize, micro_batch=a.micro_batch,
                           gradient_checkpointing=a.gradient_checkpointing)
    return_freed_memory()
    t0 = time.perf_counter()
    lm = prepare_model(c)
    model = lm.model
    load_s, rss_loaded = time.perf_counter() - t0, rss_gib()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizers = build_optimizers(model, "adamw", c.lr, 0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, T), generator=g)
    targets = torch.roll(ids, -1, 1)
    targets[:, : T // 4] = IGNORE
    targets[:, -1] = IGNORE
    batch = Packed(ids, targets, torch.arange(T).expand(a.batch, T).contiguous(),
                   torch.zeros(a.batch, T, dtype=torch.long))
    times, losses = [], []
    for _ in range(a.steps):
        t1 = time.perf_counter()
        loss, _ = accumulate(model, batch, a.micro_batch, c.gradient_checkpointing)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t1)
        losses.append(loss)
    later = times[1:] or times
    result = {"model": a.model, "base": lm.base_mode, "lora": f"r {a.r} on every projection",
              "trainable_params": trainable, "weights_mib": round(weight_bytes(model) / 2**20, 1),
              "seq_len": T, "batch_rows": a.batch, "micro_batch": a.micro_batch,
              "gradient_checkpointing": c.gradient_checkpointing, "steps": a.steps,
              "peak_rss_gib": round(peak_gib(), 3), "rss_after_load_gib": round(rss_loaded, 3),
              "load_s": round(load_s, 1), "first_step_s": round(times[0], 1),
              "step_s": round(sum(later) / len(later), 1), "steps_per_s": round(len(later) / sum(later), 4),
              "tokens_per_s": round(a.batch * T * len(later) / sum(later), 1),
              "losses": [round(x, 4) for x in losses], "threads": torch.get_num_threads()}
    print(json.dumps(result, indent=2))
    if a.record:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from results_log import record
        record("lora_memory", **{k: v for k, v in result.items() if k not in ("threads", "losses")},
               conditions="2 shared cores with other jobs running: times are upper bounds; memory is not affected")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
