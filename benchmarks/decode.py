"""Batch-1 greedy decode speed: slm against transformers' generate() on the same weights.

    python benchmarks/decode.py [--shapes stories15m stories110m] [--new-tokens 128]

Builds each shape with random weights through transformers' LlamaForCausalLM, saves it as a
Hugging Face folder, loads it with slm, and times both on the same prompt in the same process.
Prints tokens/s and the ratio slm / transformers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import slm  # noqa: E402
from slm.generate import generate_ids  # noqa: E402


def hf_llama(preset: str):
    from transformers import LlamaConfig, LlamaForCausalLM
    c = slm.get_config(preset)
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                      num_key_value_heads=c.num_kv_heads, max_position_embeddings=c.max_seq_len,
                      tie_word_embeddings=c.tie_embeddings, rms_norm_eps=c.norm_eps)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def time_best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench(preset: str, new_tokens: int, repeats: int) -> tuple[float, float, list[int], list[int]]:
    ref = hf_llama(preset)
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        lm = slm.load(d)
    prompt = torch.randint(3, ref.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))

    def run_hf():
        with torch.inference_mode():
            return ref.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, 16:].tolist()

    def run_slm():
        return [s[0] for s in generate_ids(lm.model, [prompt[0].tolist()], new_tokens)]

    out_hf, out_slm = run_hf(), run_slm()  # warm-up, and the outputs to compare
    t_hf = t_slm = float("inf")
    for _ in range(repeats):  # interleaved, best of each: this machine's speed drifts over seconds
        t_hf, t_slm = min(t_hf, time_best(run_hf, 1)), min(t_slm, time_best(run_slm, 1))
    return new_tokens / t_hf, new_tokens / t_slm, out_hf, out_slm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["stories15m", "stories110m"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, greedy, {a.new_tokens} new tokens, fp32")
    print(f"{'shape':<12} {'params':>8} {'transformers tok/s':>19} {'slm tok/s':>10} {'ratio':>6}  same tokens")
    for shape in a.shapes:
        hf_tps, slm_tps, o1, o2 = bench(shape, a.new_tokens, a.repeats)
        n = slm.get_config(shape).num_params()
        print(f"{shape:<12} {n / 1e6:>7.1f}M {hf_tps:>19.1f} {slm_tps:>10.1f} {slm_tps / hf_tps:>5.2f}x  {o1 == o2}")


if __name__ == "__main__":
    main()
