"""Training throughput: slm's loop against a transformers LlamaForCausalLM with AdamW at the same
shape, data, batch and sequence length, in the same process; and the machine's fp32 matmul peak.

    python benchmarks/train_speed.py [--preset stories15m] [--steps 20] [--batch-size 8] [--seq-len 256]

Both run fp32 on the CPU (bf16 is emulated here), fused AdamW, the same random token batches.
Prints tokens/s, the ratio, and each as a fraction of the measured matmul peak (MFU, counting
6N + 12 L T d FLOPs per token).
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import slm  # noqa: E402
from slm.train.loop import flops_per_token, peak_flops  # noqa: E402


def tokens_per_s(step, steps: int, tokens: int) -> float:
    step(0)  # warm-up
    best = float("inf")
    for rep in range(3):
        t = time.perf_counter()
        for i in range(steps):
            step(i + 1)
        best = min(best, time.perf_counter() - t)
    return steps * tokens / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="stories15m")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    a = ap.parse_args()
    cfg = slm.get_config(a.preset)
    B, T = a.batch_size, a.seq_len
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g) for _ in range(a.steps + 1)]

    torch.manual_seed(0)
    ours = slm.Transformer(cfg)
    ours.init_weights()
    ours.train()
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-3, fused=True)

    def slm_step(i):
        x, y = data[i][:, :-1], data[i][:, 1:]
        loss = F.cross_entropy(ours(x).view(-1, cfg.vocab_size), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    from transformers import LlamaConfig, LlamaForCausalLM
    ref = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings))
    ref.train()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, fused=True)

    def hf_step(i):
        x, y = data[i][:, :-1], data[i][:, 1:]
        loss = F.cross_entropy(ref(x).logits.view(-1, cfg.vocab_size), y.reshape(-1))
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    peak = peak_flops(torch.device("cpu"))
    fpt = flops_per_token(cfg, T)
    t_ours, t_ref = tokens_per_s(slm_step, a.steps, B * T), tokens_per_s(hf_step, a.steps, B * T)
    print(f"{a.preset} ({cfg.num_params() / 1e6:.1f}M), batch {B} x {T}, fp32, {torch.get_num_threads()} threads; "
          f"measured matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"  transformers  {t_ref:8.0f} tok/s   MFU {t_ref * fpt / peak:5.1%}")
    print(f"  slm           {t_ours:8.0f} tok/s   MFU {t_ours * fpt / peak:5.1%}   ratio {t_ours / t_ref:.2f}x")


if __name__ == "__main__":
    main()
