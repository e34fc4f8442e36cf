"""Time to build a tokenizer from GGUF metadata: slm against transformers' GGUF converter, on the
real gemma-3-270m (262,144 tokens), and check both give the same ids.

    python benchmarks/gguf_tokenizer.py
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from slm.checkpoint.gguf import read_gguf  # noqa: E402
from slm.runtime.lm import default_model_path  # noqa: E402
from slm.runtime.tokenizer import Tokenizer  # noqa: E402

TEXT = "Once upon a time, there was a little girl.\n\n  She counted 12 apples — and 3 pears! <start_of_turn>user"


def main() -> None:
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


if __name__ == "__main__":
    main()
