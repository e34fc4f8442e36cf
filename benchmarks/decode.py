"""Batch-1 greedy decode speed: slm against transformers' generate() on the same weights, and on
the real gemma-3-270m also against llama.cpp (llama-cpp-python) on the same GGUF file.

    python benchmarks/decode.py [--shapes stories15m stories110m] [--new-tokens 128] [--no-gemma]

Random-weight shapes: built through transformers' LlamaForCausalLM, saved as a Hugging Face folder,
loaded by slm, both timed on the same prompt in the same process. gemma-3-270m: slm reads the
Q4_K_M GGUF; transformers runs the same weights in fp32 (its 5.x GGUF loader refuses the file's
Q5_0 tensors, so it loads the Hugging Face folder slm writes from them); llama.cpp runs the GGUF
with the same number of threads. Prints tokens/s and the ratios.
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
from slm.runtime.generate import generate_ids  # noqa: E402
from results_log import record  # noqa: E402


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


def bench_gemma(new_tokens: int, repeats: int, quantize: str | None) -> None:
    from slm.runtime.lm import default_model_path
    path = default_model_path()
    prompt = "Once upon a time, there was a little"
    lm = slm.load(path, quantize=quantize) if quantize else slm.load(path)
    ids = lm.tokenizer.encode(prompt)
    results = {}

    def run_slm():
        return [s[0] for s in generate_ids(lm.model, [ids], new_tokens)]
    run_slm()
    results[f"slm ({quantize or 'fp32'})"] = best_rate(run_slm, new_tokens, repeats)

    from transformers import AutoModelForCausalLM
    with tempfile.TemporaryDirectory() as d:
        (slm.load(path) if quantize else lm).save(d)
        ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    x = torch.tensor([ids])

    def run_hf():
        with torch.inference_mode():
            return ref.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    run_hf()
    results["transformers (fp32)"] = best_rate(run_hf, new_tokens, repeats)
    ref = None  # free its memory before llama.cpp runs

    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python is not installed: pip install llama-cpp-python (builds from source)")
    else:
        llm = Llama(path, n_threads=torch.get_num_threads(), n_ctx=512, verbose=False)

        def run_llama():
            out = llm(prompt, max_tokens=new_tokens, temperature=0)
            assert out["usage"]["completion_tokens"] == new_tokens, "llama.cpp stopped early"
        run_llama()
        results["llama.cpp (Q4_K_M)"] = best_rate(run_llama, new_tokens, repeats)
    ours = results[f"slm ({quantize or 'fp32'})"]
    print(f"gemma-3-270m, {new_tokens} new tokens, {torch.get_num_threads()} threads")
    for name, rate in results.items():
        print(f"  {name:<22} {rate:7.1f} tok/s   slm / this = {ours / rate:5.2f}x")
    peers = {"transformers (fp32)": "transformers", "llama.cpp (Q4_K_M)": "llamacpp"}
    record("decode", model="gemma-3-270m", new_tokens=new_tokens, slm_mode=quantize or "fp32",
           slm_tok_s=round(ours, 1),
           **{f"{peers[name]}_tok_s": round(rate, 1) for name, rate in results.items() if name in peers},
           **{f"vs_{peers[name]}": round(ours / rate, 2) for name, rate in results.items() if name in peers})


def best_rate(fn, n: int, repeats: int) -> float:
    return n / time_best(fn, repeats)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["stories15m", "stories110m"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-gemma", action="store_true", help="skip the real gemma-3-270m")
    ap.add_argument("--gemma-quantize", default=None, help="int8: slm's int8 kernels on gemma")
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, greedy, {a.new_tokens} new tokens, fp32")
    print(f"{'shape':<12} {'params':>8} {'transformers tok/s':>19} {'slm tok/s':>10} {'ratio':>6}  same tokens")
    for shape in a.shapes:
        hf_tps, slm_tps, o1, o2 = bench(shape, a.new_tokens, a.repeats)
        n = slm.get_config(shape).num_params()
        print(f"{shape:<12} {n / 1e6:>7.1f}M {hf_tps:>19.1f} {slm_tps:>10.1f} {slm_tps / hf_tps:>5.2f}x  {o1 == o2}")
        record("decode", model=f"{shape} shape, random weights, fp32", new_tokens=a.new_tokens,
               transformers_tok_s=round(hf_tps, 1), slm_tok_s=round(slm_tps, 1),
               vs_transformers=round(slm_tps / hf_tps, 2), same_tokens=o1 == o2)
    if not a.no_gemma:
        bench_gemma(a.new_tokens, a.repeats, a.gemma_quantize)


if __name__ == "__main__":
    main()
