"""Multiple-choice evaluation scored as lm-evaluation-harness scores `multiple_choice` tasks.

Each choice is a (context, continuation) request; its score is the log-likelihood of the
continuation's tokens given the context. Per item:

    acc       1 if argmax_i ll_i is the gold choice
    acc_norm  1 if argmax_i ll_i / len(choice_i in characters) is the gold choice

and the task's figure is the mean over items with the standard error of that mean (sample
standard deviation / sqrt(n)). Few-shot examples are drawn as lm-eval's sampler draws them: one
random.Random(seed) for the whole run, num_fewshot + 1 items sampled from the same file for each
item in order, the item itself dropped, each example written "text answer" and followed by a
blank line.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict

import numpy as np

from ..runtime.lm import LM
from ..runtime.loglik import context_length, encode_pair, loglikelihoods
from .tasks import Doc, load_task

FEWSHOT_SEED = 1234  # lm-eval's default --fewshot_random_seed


def fewshot_contexts(docs: list[Doc], n_items: int, num_fewshot: int, seed: int = FEWSHOT_SEED) -> list[str]:
    """The few-shot prefix of each of the first n_items docs, drawn from all docs."""
    if num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if num_fewshot == 0:
        return [""] * n_items
    if num_fewshot + 1 > len(docs):
        raise ValueError(f"{num_fewshot}-shot needs at least {num_fewshot + 1} items in the file, it has {len(docs)}")
    rng = random.Random(seed)
    out = []
    for i in range(n_items):
        picks = [j for j in rng.sample(range(len(docs)), num_fewshot + 1) if j != i][:num_fewshot]
        out.append("".join(docs[j].example() + "\n\n" for j in picks))
    return out


def build_requests(docs: list[Doc], num_fewshot: int = 0, limit: int | None = None,
                   seed: int = FEWSHOT_SEED) -> list[list[tuple[str, str]]]:
    """The (context, continuation) strings of every choice of the first `limit` items."""
    n = len(docs) if limit is None else min(limit, len(docs))
    return [d.requests(p) for d, p in zip(docs, fewshot_contexts(docs, n, num_fewshot, seed))]


def evaluate(lm: LM, task: str | list[Doc], fmt: str | None = None, num_fewshot: int = 0,
             limit: int | None = None, batch_size: int = 8, seed: int = FEWSHOT_SEED,
             max_length: int | None = None, add_bos: bool = True, progress: bool = True) -> dict:
    """Score a task (a file path in format fmt, "builtin", or Docs) and return metrics and items.

    add_bos: encode contexts with the tokenizer's special tokens (a BOS where the tokenizer adds
    one), as lm-eval does for Gemma (`add_bos_token=True`); False is lm-eval's default for
    other Hugging Face models."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of items, got {limit}")
    docs = load_task(task, fmt) if isinstance(task, str) else list(task)
    for d in docs:
        if any(len(c) == 0 for c in d.choices):
            raise ValueError("a choice is empty; acc_norm divides by each choice's length")
    per_item = build_requests(docs, num_fewshot, limit, seed)
    flat = [encode_pair(lm, ctx, cont, add_bos) for reqs in per_item for ctx, cont in reqs]
    scores = iter(loglikelihoods(lm, flat, batch_size=batch_size, max_len=max_length, progress=progress,
                                 desc=f"{len(per_item)} items"))
    items = []
    for i, (doc, reqs) in enumerate(zip(docs, per_item)):
        lls, greedy = zip(*(next(scores) for _ in reqs))
        lengths = [len(c) for c in doc.choices]
        pred = int(np.argmax(lls))
        pred_norm = int(np.argmax(np.array(lls) / np.array(lengths, dtype=float)))
        item = {"index": i, "gold": doc.gold, "loglikelihoods": list(lls), "is_greedy": list(greedy),
                "choice_lengths": lengths, "pred": pred, "pred_norm": pred_norm,
                "acc": float(pred == doc.gold), "acc_norm": float(pred_norm == doc.gold)}
        if doc.kind:
            item["kind"] = doc.kind
        items.append(item)
    name = task if isinstance(task, str) else "docs"
    result = {"task": name, "format": "builtin" if name == "builtin" else fmt, "num_fewshot": num_fewshot,
              "n": len(items), "metrics": _metrics(items, docs),
              "config": {"batch_size": batch_size, "max_length": context_length(lm, max_length),
                         "add_bos": add_bos, "fewshot_seed": seed, "limit": limit}}
    kinds = defaultdict(list)
    for it in items:
        if "kind" in it:
            kinds[it["kind"]].append(it)
    if kinds:
        result["by_kind"] = {k: _metrics(v, [docs[it["index"]] for it in v]) for k, v in sorted(kinds.items())}
    result["items"] = items
    return result


def _metrics(items: list[dict], docs: list[Doc]) -> dict:
    out = {}
    for m in ("acc", "acc_norm"):
        xs = [it[m] for it in items]
        out[m], out[m + "_stderr"] = sum(xs) / len(xs), mean_stderr(xs)
    out["chance"] = sum(1 / len(d.choices) for d in docs[:len(items)]) / len(items)
    return out


def mean_stderr(xs: list[float]) -> float | None:
    """Standard error of the mean with the sample (n - 1) standard deviation, as lm-eval reports it."""
    n = len(xs)
    if n < 2:
        return None
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


def format_table(result: dict) -> str:
    """lm-eval's results table for a multiple-choice result, or the figures of a perplexity one."""
    if "token_perplexity" in result:
        rows = [("token_perplexity", result["token_perplexity"]), ("word_perplexity", result["word_perplexity"]),
                ("byte_perplexity", result["byte_perplexity"]), ("bits_per_byte", result["bits_per_byte"])]
        head = (f"{result.get('text', 'text')}: {result['tokens']:,} tokens, {result['words']:,} words, "
                f"{result['bytes']:,} bytes, {result['windows']} window{'s' if result['windows'] != 1 else ''} of <= {result['max_length']} tokens")
        return head + "\n" + "\n".join(f"{k:<17} {v:.4f}" for k, v in rows)
    lines = ["| Task | n-shot | Metric | Value |   | Stderr |", "|---|---:|---|---:|---|---:|"]

    def add(task, shots, metrics):
        for m in ("acc", "acc_norm"):
            se = metrics[m + "_stderr"]
            lines.append(f"| {task} | {shots} | {m} | {metrics[m]:.4f} | ± | {'N/A' if se is None else f'{se:.4f}'} |")
            task, shots = "", ""
    name = result["format"] if result["format"] == "builtin" else f"{result['format']} ({result['task']})"
    add(name, result["num_fewshot"], result["metrics"])
    for kind, metrics in result.get("by_kind", {}).items():
        add(f" - {kind}", "", metrics)
    lines.append(f"{result['n']} items; chance level {result['metrics']['chance']:.4f}")
    return "\n".join(lines)
