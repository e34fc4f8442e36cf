"""`make demo`: a tour of what slm does today, on this machine, with nothing downloaded.

1. the registry of known models and what they need in memory;
2. a stories15M-shaped model written as a Hugging Face folder, read back by slm and by
   transformers with the same logits;
3. streamed generation and decode speed.
The weights are random until `slm train` exists (next milestone), so the text is noise.
"""

from __future__ import annotations

import os
import time

import torch

from . import load
from .checkpoint.hf import save_model
from .checkpoint.safetensors_io import CheckpointError
from .config import REGISTRY, get_config, memory_table
from .generate import generate_ids
from .model import Transformer
from .tokenizer import Tokenizer

TEXT = ["Once upon a time, there was a little girl named Lily who loved to play in the park.",
        "Tom had three red apples. He gave one to his friend, so he had two apples left."] * 50


def _tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer as Tk, decoders, models, pre_tokenizers, trainers
    tk = Tk(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                     show_progress=False))
    return Tokenizer(tk, {"bos_token": "<s>", "eos_token": "</s>"})


def main(out: str = "runs/demo") -> None:
    print("== Known models (slm info --preset NAME) ==")
    print(f"{'name':<16} {'family':<8} {'params':>9} {'fp32':>9} {'int4':>9}")
    for name, cfg in REGISTRY.items():
        mem = memory_table(cfg)
        print(f"{name:<16} {cfg.family:<8} {cfg.num_params() / 1e6:>8.1f}M {mem['fp32'] / 2**30:>7.2f}GB "
              f"{mem['int4'] / 2**30:>7.2f}GB")

    print("\n== A stories15M-shaped model, saved as a Hugging Face folder ==")
    tok = _tokenizer()
    cfg = get_config("stories15m").replace(vocab_size=tok.vocab_size, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    save_model(model, out, tokenizer=tok)
    print(f"wrote {out}: {sorted(os.listdir(out))}")
    lm = load(out)
    ids = torch.tensor([lm.tokenizer.encode(TEXT[0])])
    try:
        from transformers import AutoModelForCausalLM
        ref = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            diff = (lm.model(ids) - ref(ids).logits).abs().max().item()
        print(f"transformers loads it unchanged: max |logit difference| = {diff:.2e}")
    except ImportError:
        print("(install transformers to compare logits)")

    print("\n== Streamed generation (random weights: expect noise) ==")
    for chunk in lm.stream("Once upon a time", max_new_tokens=60, temperature=0.8, seed=0):
        print(chunk, end="", flush=True)
    t = time.perf_counter()
    n = sum(1 for _ in generate_ids(lm.model, [lm.tokenizer.encode("Once upon a time")], 200))
    dt = time.perf_counter() - t
    print(f"\n\ngreedy decode: {n} tokens in {dt:.2f}s = {n / dt:.0f} tokens/s on {torch.get_num_threads()} threads")
    print("Benchmark against transformers: python benchmarks/decode.py")

    print("\n== A real pretrained model: gemma-3-270m (slm generate --prompt ... with no --model) ==")
    try:
        real = load()  # the default model; a line on stderr says which
    except CheckpointError as e:
        print(f"skipped: {e}")
        return
    prompt = "Once upon a time, there was a little"
    print(prompt, end="", flush=True)
    for chunk in real.stream(prompt, max_new_tokens=40, temperature=0):
        print(chunk, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
