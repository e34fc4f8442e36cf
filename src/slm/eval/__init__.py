"""Evaluation as lm-evaluation-harness does it: rolling-window perplexity of a text and
multiple-choice tasks (HellaSwag, PIQA, ARC, WinoGrande, the built-in probes) scored by the
log-likelihood of each choice.

    import slm
    from slm.eval import evaluate, perplexity
    lm = slm.load("model")
    perplexity(lm, open("text.txt").read(), max_length=512)["word_perplexity"]
    evaluate(lm, "hellaswag.jsonl", "hellaswag", num_fewshot=10)["metrics"]["acc_norm"]
    evaluate(lm, "builtin")["metrics"]
"""

from __future__ import annotations

import os

from .. import files

from .choice import build_requests, evaluate, format_table
from ..runtime.loglik import encode_pair, loglikelihoods
from .perplexity import perplexity, rolling_windows
from .tasks import FORMATS, Doc, load_task

__all__ = ["evaluate", "perplexity", "format_table", "build_requests", "load_task", "Doc", "FORMATS",
           "loglikelihoods", "encode_pair", "rolling_windows", "read_text", "write_json"]


def read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such text file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def write_json(path: str, obj: dict) -> None:
    """Write atomically: a reader never sees half a file, and a failure leaves no .tmp behind."""
    files.write_json(path, obj, indent=1, flag="--output")
