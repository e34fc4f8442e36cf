"""Batch-1 decode tokens/s of slm against llama.cpp (llama-cpp-python, same threads, same file),
and perplexity of slm's quantized weights against the file's own weights dequantized to fp32.

    python benchmarks/decode_vs_llamacpp.py [--new-tokens 64] [--repeats 3] [--model FILE.gguf]

Rows: the real gemma-3-270m Q4_K_M GGUF (default model) run by slm as int8 and int4 (its own kernels,
requantized from the file) and by llama.cpp as is; with --export DIR, also a model folder exported
by `slm export --format gguf --dtype q8_0` and run by both. Decode at batch 1 is bound by memory
bandwidth here (~11-14 GB/s), so the bytes of weights read per token decide the speed.
Perplexity is slm's, on a fixed English passage, for fp32 (the file's weights dequantized) and for
each quantized mode; the ratio to fp32 is what `within 1%` refers to.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import slm  # noqa: E402
from slm.generate import generate_ids  # noqa: E402
from slm.quantize import weight_bytes  # noqa: E402

PROMPT = "Once upon a time, there was a little"
TEXT = ("The history of the city begins with a small settlement on the river. Farmers grew wheat and barley in the "
        "fields around it, and traders brought salt, cloth and tools from the coast. Over the centuries the town "
        "grew into a market, then into a city with walls, a cathedral and a university. Today it is known for its "
        "old bridges, its museums and the festival that fills its streets every summer with music and dancing.")


def best_rate(fn, n: int, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


@torch.no_grad()
def perplexity(lm) -> float:
    ids = torch.tensor([lm.tokenizer.encode(TEXT)])
    logits = lm.model(ids)[0, :-1]
    return math.exp(torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:]).item())


def compare(path: str, modes: list[str], new_tokens: int, repeats: int, threads: int) -> None:
    from llama_cpp import Llama
    llm = Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)

    def run_llama():
        out = llm(PROMPT, max_tokens=new_tokens, temperature=0)
        assert out["usage"]["completion_tokens"] == new_tokens, "llama.cpp stopped early"
    peer = best_rate(run_llama, new_tokens, repeats)
    llm.close()
    print(f"{os.path.basename(path)}: {new_tokens} new tokens, {threads} threads; llama.cpp {peer:.1f} tok/s")
    ppl_ref = perplexity(slm.load(path))
    print(f"  {'fp32 (dequantized file)':<26} perplexity {ppl_ref:8.3f}")
    for mode in modes:
        lm = slm.load(path, quantize=mode)
        ids = lm.tokenizer.encode(PROMPT)
        rate = best_rate(lambda: [s[0] for s in generate_ids(lm.model, [ids], new_tokens)], new_tokens, repeats)
        ppl = perplexity(lm)
        print(f"  slm {mode:<22} {rate:6.1f} tok/s  vs llama.cpp {rate / peer:5.2f}x   weights "
              f"{weight_bytes(lm.model) / 2**20:6.0f} MiB   perplexity {ppl:8.3f} ({ppl / ppl_ref - 1:+.2%})")
        lm = None  # free it before the next mode loads


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a .gguf file (default: the real gemma-3-270m Q4_K_M)")
    ap.add_argument("--export", default=None, help="also: export this model folder to q8_0 GGUF and compare")
    ap.add_argument("--modes", nargs="+", default=["int8", "int4"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from slm.lm import default_model_path
    compare(a.model or default_model_path(), a.modes, a.new_tokens, a.repeats, a.threads)
    if a.export:
        from slm.checkpoint.gguf_write import write_gguf
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "exported-q8_0.gguf")
            write_gguf(slm.load(a.export), path, "q8_0")
            compare(path, a.modes, a.new_tokens, a.repeats, a.threads)


if __name__ == "__main__":
    main()
