"""Memory and time of one QLoRA training step at the Llama 2 7B shape, with random int4 weights.

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
import resource
import sys
import time

import torch


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
    ap.add_argument("--preset", default="llama-2-7b")
    ap.add_argument("--quantize", default="int4", choices=["int8", "int4"])
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

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


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
