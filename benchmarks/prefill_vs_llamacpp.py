"""Prompt processing (prefill) tokens/s of slm against llama.cpp (llama-cpp-python, same file, same
threads), for prompts of 128, 512 and 2,048 tokens, and the perplexity of slm's prefill path
against the file's weights dequantized to fp32.

    python benchmarks/prefill_vs_llamacpp.py [--model NAME_OR_FILE ...] [--tokens 128 512 2048]
                                             [--repeats 3]

Models: by default both real GGUF files (`slm models`), slm loading each as `slm.load` does by
default (the file's blocks kept). A prompt is one forward over a fresh cache in slm, and in
llama.cpp a completion of max_tokens 1 (its prefill plus one token; llama-cpp-python 0.3.36's
`Llama.eval` crashes when called directly). Every prompt starts with a token no earlier prompt
started with, so llama.cpp's prompt cache never skips work. llama.cpp runs without its run-time
weight repacking (use_extra_bufts), in which this llama-cpp-python crashes on these files (as
benchmarks/decode_vs_llamacpp.py --no-repack). Rounds interleave the two engines and every length;
the best of --repeats is kept.
Perplexity: on a fixed English passage of ~250 tokens, whole (above 32 tokens the layers
dequantize their weights and multiply fp32 activations), for the default load and for
quantize="none" (the file dequantized to fp32 at load).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import slm  # noqa: E402
from slm.runtime.models import resolve  # noqa: E402
from decode_vs_llamacpp import STORY, TEXT, load_llama, perplexity  # noqa: E402
from results_log import record  # noqa: E402


def compare(name: str, lengths: list[int], repeats: int, threads: int) -> None:
    path = resolve(name)[0]
    lm = slm.load(path)
    model = lm.model
    llm = load_llama(path, threads, n_ctx=max(lengths) + 16, repack=False, n_batch=512)
    vocab = min(model.config.vocab_size, 5000)
    first = iter(range(200, 200 + 10 * repeats * len(lengths) + 10))

    def prompt(T: int) -> list[int]:
        return [next(first)] + [100 + (7 * i) % (vocab - 100) for i in range(T - 1)]

    @torch.inference_mode()
    def run_slm(ids):
        model(torch.tensor([ids]), cache=model.new_cache(1, len(ids)), last_only=True)

    def run_llama(ids):
        out = llm.create_completion(ids, max_tokens=1, temperature=0)
        assert out["usage"]["prompt_tokens"] == len(ids), out["usage"]

    run_slm(prompt(64)), run_llama(prompt(64))  # warm-up
    best = {(engine, T): float("inf") for engine in ("slm", "llama.cpp") for T in lengths}
    load0 = os.getloadavg()[0]
    for _ in range(repeats):
        for T in lengths:
            for engine, fn in (("llama.cpp", run_llama), ("slm", run_slm)):
                ids = prompt(T)
                t = time.perf_counter()
                fn(ids)
                best[engine, T] = min(best[engine, T], time.perf_counter() - t)
    llm.close()
    load1 = os.getloadavg()[0]
    text = TEXT + "\n\n" + STORY
    ppl = perplexity(lm, text)
    ref = slm.load(path, quantize="none")
    ppl_ref = perplexity(ref, text)
    ref = None
    print(f"{os.path.basename(path)}: {threads} threads, best of {repeats} interleaved rounds, host load "
          f"{load0:.1f} -> {load1:.1f}; prefill perplexity {ppl:.4f} vs {ppl_ref:.4f} dequantized "
          f"({100 * (ppl / ppl_ref - 1):+.3f}%)")
    for T in lengths:
        s, peer = T / best["slm", T], T / best["llama.cpp", T]
        print(f"  {T:5d} tokens: slm {s:7.1f} tok/s, llama.cpp {peer:7.1f} tok/s, {s / peer:.2f}x")
    record("prefill_vs_llamacpp", model=os.path.basename(path), threads=threads, repeats=repeats,
           llama_cpp="llama-cpp-python, no run-time repacking",
           **{f"slm_{T}_tok_s": round(T / best["slm", T], 1) for T in lengths},
           **{f"llamacpp_{T}_tok_s": round(T / best["llama.cpp", T], 1) for T in lengths},
           **{f"vs_llamacpp_{T}": round(best["llama.cpp", T] / best["slm", T], 2) for T in lengths},
           prefill_perplexity=round(ppl, 4), dequantized_perplexity=round(ppl_ref, 4),
           perplexity_vs_dequantized=f"{100 * (ppl / ppl_ref - 1):+.3f}%", load_before=round(load0, 1),
           load_after=round(load1, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", default=["smollm2-135m-instruct", "gemma-3-270m"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    for name in a.model:
        compare(name, a.tokens, a.repeats, a.threads)


if __name__ == "__main__":
    main()
