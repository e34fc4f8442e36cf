"""Batch-1 decode tokens/s of slm against llama.cpp (llama-cpp-python, same threads, same file),
and perplexity of slm against the file's own weights dequantized to fp32.

    python benchmarks/decode_vs_llamacpp.py [--new-tokens 64] [--repeats 5] [--model NAME_OR_FILE ...]

Models: by default both real GGUF files, gemma-3-270m Q4_K_M (Q5_0, Q4_K, Q8_0, Q6_K tensors) and
SmolLM2-135M-Instruct Q4_1 (Q4_1, Q8_0); --model names others (a file or a name of `slm models`).
Rows: llama.cpp running the file as is, and slm loading it with each of --modes: `default` is
slm.load(file) with no options, which keeps the file's tensors in their own blocks
(slm.quant.gguf_layers) as llama.cpp does; x1row is the same model with the kernels' x in one
int8 row per block as llama.cpp's (SLM_GGUF_X_ROWS=1), not two (x and its residual, the default);
int8 / int4 keep the file's blocks too and quantize only the rest;
--requantize adds rows for the path that requantizes every tensor to slm's int8/int4
(file_blocks=False). With --export DIR, also a model folder exported by `slm export --format gguf
--dtype q8_0` and run by both. Decode at batch 1 is bound by memory bandwidth here (~14-17 GB/s),
so the bytes of weights read per token decide the speed.
Every engine of a model is loaded first, then timed in turns (llama.cpp, then each slm row,
--repeats rounds, best of each), so a shared machine's drifting load reaches all rows alike; the
1-minute load average before and after is printed and recorded.
Perplexity is slm's, on a fixed English passage (a story for the exported model: make demo's is
trained on stories), for fp32 (quantize="none": the file's weights dequantized) and for each row,
twice: over the whole passage at once (prefill: above 32 rows the layers multiply fp32
activations) and one token at a time through the KV cache (decode: the kernels' int8 activations,
as generation runs); the ratio to fp32 is the cost of the int8 activations.
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
from slm.runtime.generate import generate_ids  # noqa: E402
from slm.quant.layers import weight_bytes  # noqa: E402
from results_log import record  # noqa: E402

PROMPT = "Once upon a time, there was a little"
NO_REPACK = False
TEXT = ("The history of the city begins with a small settlement on the river. Farmers grew wheat and barley in the "
        "fields around it, and traders brought salt, cloth and tools from the coast. Over the centuries the town "
        "grew into a market, then into a city with walls, a cathedral and a university. Today it is known for its "
        "old bridges, its museums and the festival that fills its streets every summer with music and dancing.")


# For a model trained on make demo's corpus, whose vocabulary of ~1,500 words TEXT mostly leaves: a
# story of its validation split (runs/demo/data/text/val.txt, never trained on).
STORY = ("There once was a polite lion called Felix. He lived on a quiet farm. He liked to run in the grass more "
         "than anything. One day, Felix brought a big bag of pies to the village.\nArlo came over and looked at "
         "it. \"Can I have some of the pies, please?\" asked Arlo. But Felix held it tight and said, \"No, I want "
         "it all for me.\" Arlo felt nervous, so he walked away and sat alone. Felix played alone, but it was not "
         "fun anymore. Later, Dad said, \"When we share, we have twice the fun.\" So Felix found Arlo and shared "
         "the pies with him.\nFelix felt so relieved that he gave Arlo a big hug. From that day on, Felix never "
         "forgot it. Fun is bigger when it is shared.")


def passage(lm, text: str) -> list[int]:
    """The passage's tokens, cut to the model's context (make demo's model sees 128)."""
    return lm.tokenizer.encode(text)[:lm.model.config.max_seq_len]


@torch.no_grad()
def perplexity(lm, text: str) -> float:
    ids = torch.tensor([passage(lm, text)])
    logits = lm.model(ids)[0, :-1]
    return math.exp(torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:]).item())


@torch.no_grad()
def decode_perplexity(lm, text: str) -> float:
    """The same passage fed one token at a time through the KV cache, as generation runs it."""
    ids = passage(lm, text)
    cache = lm.model.new_cache(1, len(ids))
    nll = 0.0
    for i in range(len(ids) - 1):
        logits = lm.model(torch.tensor([[ids[i]]]), cache=cache)[0, -1]
        nll += torch.nn.functional.cross_entropy(logits[None].float(), torch.tensor([ids[i + 1]])).item()
    return math.exp(nll / (len(ids) - 1))


def load_llama(path: str, threads: int, n_ctx: int, repack: bool = True, **kw):
    """llama.cpp (llama-cpp-python) on the file, with or without its run-time weight repacking
    (use_extra_bufts), in which llama-cpp-python 0.3.36 crashes on these files."""
    import llama_cpp
    defaults = llama_cpp.llama_cpp.llama_model_default_params  # what Llama.__init__ starts from

    def params():
        p = defaults()
        if not repack and hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = False
        return p
    llama_cpp.llama_cpp.llama_model_default_params = params
    try:
        return llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, verbose=False, **kw)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults


def x_rows(mode: str, fn):
    """fn() with the kernels' x in one int8 row (SLM_GGUF_X_ROWS=1, llama.cpp's way) for the mode
    x1row, else in two (x and its residual, the default)."""
    if not mode.startswith("x1row"):
        return fn()
    os.environ["SLM_GGUF_X_ROWS"] = "1"
    try:
        return fn()
    finally:
        del os.environ["SLM_GGUF_X_ROWS"]


def compare(path: str, modes: list[str], new_tokens: int, repeats: int, threads: int,
            requantize: bool = False, text: str = TEXT) -> None:
    """Every engine is loaded first, then timed in turns (llama.cpp, then each slm row, `repeats`
    rounds, best of each): on a shared machine the load drifts, and interleaving exposes all rows
    to the same drift."""
    llm = load_llama(path, threads, n_ctx=512, repack=not NO_REPACK)

    def run_llama():
        out = llm(PROMPT, max_tokens=new_tokens, temperature=0)
        assert out["usage"]["completion_tokens"] == new_tokens, "llama.cpp stopped early"
    ref = slm.load(path, quantize="none")
    ppl_ref, dppl_ref = perplexity(ref, text), decode_perplexity(ref, text)
    ref = None
    rows = {}
    for mode, file_blocks in [(m, True) for m in modes] + ([(m, False) for m in modes] if requantize else []):
        lm = slm.load(path, quantize=None if mode in ("default", "x1row") else mode, file_blocks=file_blocks)
        ids = lm.tokenizer.encode(PROMPT)
        rows[mode if file_blocks else mode + " requantized"] = (
            lm, lambda lm=lm, ids=ids, mode=mode: x_rows(mode, lambda: [s[0] for s in generate_ids(lm.model, [ids],
                                                                                                   new_tokens)]))
    best = {name: float("inf") for name in ["llama.cpp", *rows]}
    fns = {"llama.cpp": run_llama, **{name: fn for name, (_, fn) in rows.items()}}
    for fn in fns.values():  # warm-up
        fn()
    load0 = os.getloadavg()[0]
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    llm.close()
    load1 = os.getloadavg()[0]
    peer = new_tokens / best["llama.cpp"]
    print(f"{os.path.basename(path)}: {new_tokens} new tokens, {threads} threads, best of {repeats} interleaved "
          f"rounds, host load {load0:.1f} -> {load1:.1f} on {os.cpu_count()} cores; llama.cpp {peer:.1f} tok/s")
    print(f"  {'fp32 (dequantized file)':<26} perplexity {ppl_ref:8.3f}, one token at a time {dppl_ref:8.3f}")
    for name, (lm, _) in rows.items():
        rate = new_tokens / best[name]
        ppl, dppl = x_rows(name, lambda: (perplexity(lm, text), decode_perplexity(lm, text)))
        print(f"  slm {name:<22} {rate:6.1f} tok/s  vs llama.cpp {rate / peer:5.2f}x   weights "
              f"{weight_bytes(lm.model) / 2**20:6.0f} MiB   perplexity {ppl:8.3f} ({ppl / ppl_ref - 1:+.2%}), "
              f"one token at a time {dppl:8.3f} ({dppl / dppl_ref - 1:+.2%})")
        record("decode_vs_llamacpp", model=os.path.basename(path), new_tokens=new_tokens, mode=name,
               threads=threads, repeats=repeats, host_load=f"{load0:.1f}->{load1:.1f}",
               llamacpp_tok_s=round(peer, 1), slm_tok_s=round(rate, 1), vs_llamacpp=round(rate / peer, 2),
               weights_mib=round(weight_bytes(lm.model) / 2**20), perplexity_fp32=round(ppl_ref, 3),
               perplexity=round(ppl, 3), perplexity_vs_fp32=f"{ppl / ppl_ref - 1:+.2%}",
               decode_perplexity_fp32=round(dppl_ref, 3), decode_perplexity=round(dppl, 3),
               decode_perplexity_vs_fp32=f"{dppl / dppl_ref - 1:+.2%}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", nargs="+", default=["gemma-3-270m", "smollm2-135m-instruct"],
                    help="GGUF files or names of `slm models` (default: gemma-3-270m and smollm2-135m-instruct)")
    ap.add_argument("--export", default=None, help="also: export this model folder to q8_0 GGUF and compare")
    ap.add_argument("--modes", nargs="+", default=["default", "x1row"], choices=["default", "x1row", "int8", "int4"],
                    help="default: slm.load(file); x1row: the same with x in one int8 row per block, as "
                         "llama.cpp (SLM_GGUF_X_ROWS=1), not the residual's second; int8/int4: --quantize")
    ap.add_argument("--no-repack", action="store_true",
                    help="llama.cpp without its run-time weight repacking (use_extra_bufts): "
                         "llama-cpp-python 0.3.36 crashes in it on these files")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--requantize", action="store_true",
                    help="also run each mode requantized from fp32 (file_blocks=False), the pre-GGUF-block path")
    a = ap.parse_args()
    global NO_REPACK
    NO_REPACK = a.no_repack
    torch.set_num_threads(a.threads)
    from slm.runtime.models import resolve
    for model in a.model:
        path, _ = resolve(model)
        compare(path, a.modes, a.new_tokens, a.repeats, a.threads, a.requantize)
    if a.export:
        from slm.checkpoint.gguf_write import write_gguf
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "exported-q8_0.gguf")
            write_gguf(slm.load(a.export), path, "q8_0")
            compare(path, [m for m in a.modes if m != "default"] or ["int8"], a.new_tokens, a.repeats, a.threads,
                    text=STORY)


if __name__ == "__main__":
    main()
