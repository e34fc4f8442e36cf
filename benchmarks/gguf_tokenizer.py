"""GGUF tokenizers, two measurements.

gemma (SentencePiece, 262,144 tokens): time to build the tokenizer from the file's metadata, slm
against transformers' GGUF converter, and whether both give the same ids.

smollm2 (byte-level BPE, tokenizer.ggml.pre "smollm"): slm's ids for this repository's README and
docs against llama.cpp's own (llama-cpp-python, vocab_only), the time each takes to encode them
(best of --rounds, interleaved), and what llama.cpp counts for the same text when the file says
"gpt-2" instead, as `slm export` wrote before it kept the source's tokenizer metadata. Also how
many tokenizer.ggml.pre values slm's table holds (tests/checkpoint/test_gguf_tokenizers.py checks
each against llama.cpp).

    python benchmarks/gguf_tokenizer.py [--only gemma|smollm2] [--rounds 5]
"""

import argparse
import glob
import os
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from results_log import record  # noqa: E402
from slm.checkpoint.gguf import read_gguf  # noqa: E402
from slm.checkpoint.gguf_tokenizer import PRE_TOKENIZERS  # noqa: E402
from slm.runtime.lm import default_model_path  # noqa: E402
from slm.runtime.models import KNOWN  # noqa: E402
from slm.runtime.tokenizer import Tokenizer  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TEXT = "Once upon a time, there was a little girl.\n\n  She counted 12 apples — and 3 pears! <start_of_turn>user"


def gemma() -> None:
    path = default_model_path()
    t = time.perf_counter()
    ours = Tokenizer(*read_gguf(path).tokenizer())
    t_ours = time.perf_counter() - t
    from transformers import AutoTokenizer
    t = time.perf_counter()
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    t_ref = time.perf_counter() - t
    same = ours.encode(TEXT) == ref(TEXT)["input_ids"]
    print(f"vocabulary {ours.vocab_size:,} tokens")
    print(f"slm:          {t_ours:6.2f} s (header parse + tokenizer build)")
    print(f"transformers: {t_ref:6.2f} s (AutoTokenizer.from_pretrained(gguf_file=...))")
    print(f"speed-up {t_ref / t_ours:.1f}x, same ids: {same}")
    record("gguf_tokenizer", model=f"gemma-3-270m ({ours.vocab_size:,} tokens)", slm_s=round(t_ours, 2),
           transformers_converter_s=round(t_ref, 2), vs_transformers=round(t_ref / t_ours, 2), identical_ids=same)


def smollm2(rounds: int) -> None:
    import llama_cpp
    path = KNOWN["smollm2-135m-instruct"].path()
    parts = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
    texts = []
    for p in parts:
        with open(p, encoding="utf-8") as f:
            texts.append(f.read())
    text = "\n\n".join(texts)
    ours = Tokenizer(*read_gguf(path).tokenizer())
    llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    t_ours, t_llama = [], []
    for _ in range(rounds):  # interleaved: the two see the same machine
        t = time.perf_counter()
        ids = ours.encode(text)
        t_ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        theirs = llm.tokenize(text.encode(), add_bos=True, special=True)
        t_llama.append(time.perf_counter() - t)
    llm.close()
    # The same file split as GPT-2 splits (what export wrote: "gpt-2"). Spelled "mellum", llama.cpp's
    # other name for GPT-2's split, as long as "smollm", so that nothing else in the file moves.
    with open(path, "rb") as f:
        data = f.read()
    i = data.index(b"tokenizer.ggml.pre" + struct.pack("<IQ", 8, 6) + b"smollm") + 18 + 12
    with tempfile.TemporaryDirectory() as d:
        renamed = os.path.join(d, "gpt2-split.gguf")
        with open(renamed, "wb") as f:
            f.write(data[:i] + b"mellum" + data[i + 6:])
        old = llama_cpp.Llama(renamed, vocab_only=True, verbose=False)
        n_gpt2 = len(old.tokenize(text.encode(), add_bos=True, special=True))
        old.close()
    same, best_ours, best_llama = ids == theirs, min(t_ours), min(t_llama)
    print(f"text: README.md + docs/*.md, {len(text):,} characters, {len(ids):,} tokens")
    print(f"slm encode:       {best_ours * 1e3:7.1f} ms (best of {rounds})")
    print(f"llama.cpp tokenize: {best_llama * 1e3:5.1f} ms (best of {rounds}); same ids: {same}")
    print(f"llama.cpp with GPT-2's split (tokenizer.ggml.pre 'gpt-2', as export wrote it): {n_gpt2:,} tokens")
    print(f"tokenizer.ggml.pre values in slm's table: {sum(p is not None for p in PRE_TOKENIZERS)}")
    record("gguf_tokenizer", model="SmolLM2-135M-Instruct (pre smollm, 49,152 tokens)", text_chars=len(text),
           tokens=len(ids), identical_ids_vs_llamacpp=same, slm_encode_ms=round(best_ours * 1e3, 1),
           llamacpp_tokenize_ms=round(best_llama * 1e3, 1), vs_llamacpp=round(best_llama / best_ours, 2),
           llamacpp_tokens_if_pre_gpt2=n_gpt2, pre_values=sum(p is not None for p in PRE_TOKENIZERS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["gemma", "smollm2"], default=None)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    if a.only in (None, "smollm2"):
        smollm2(a.rounds)
    if a.only in (None, "gemma"):
        gemma()


if __name__ == "__main__":
    main()
