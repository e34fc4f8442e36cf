"""slm train, tokenizer train, data synth/prepare/scrub: training from scratch and its data."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .flags import add_flags, at_least, values

N_DOCS, VOCAB_SIZE = 100_000, 4096  # the synthetic corpus and its tokenizer, here and in `slm train`
PRESET = "slm-1m"  # `slm train` without --preset, shape flags or a budget recipe

# The flags of train.loop.TrainConfig (defaults from there). Its data and tokenizer are flags of
# their own: without them, `slm train` synthesizes both.
TRAIN = [
    ("out", "folder for the model, metrics.jsonl, loss.png and checkpoint/"),
    ("seq_len", "tokens per training sequence (default: 256, or the budget recipe's)", {"min": 1}),
    ("batch_size", "sequences per micro-batch (default: 32, or the budget recipe's)", {"min": 1}),
    ("grad_accum", "micro-batches per optimizer step", {"min": 1}),
    ("max_steps", "optimizer steps (default: 1000, or with --max-minutes as many as the minutes allow)",
     {"min": 1}),
    ("max_minutes", "also stop after this many minutes (default: no limit)"),
    ("optimizer", "muon: Muon on the blocks' matrices, AdamW (--lr) on embeddings and norms; adamw: AdamW alone",
     {"choices": ["muon", "adamw"]}),
    ("lr", "AdamW learning rate (default: 6e-3 with muon, 2e-3 alone)"),
    ("muon_lr", "Muon learning rate"),
    ("warmup", "steps of linear learning-rate warmup (at most a quarter of --max-steps)", {"min": 0}),
    ("schedule", "wsd: warmup, stable, then linear decay over the last --cooldown of the run; cosine",
     {"choices": ["wsd", "cosine"]}),
    ("cooldown", "wsd: the fraction of the run spent decaying"),
    ("eval_every", "steps between validation losses (and built-in probe scores)", {"min": 1}),
    ("probes", "built-in probes per kind scored with each validation loss (0: none)", {"min": 0}),
    ("save_every", "steps between checkpoints (for --resume)", {"min": 1}),
    ("log_every", "steps between lines of metrics.jsonl", {"min": 1}),
    ("seed", "seed of the initial weights and of every step's batch", {"min": 0}),
    ("device", "cuda or cpu (default: cuda if available)"),
    ("compile", "torch.compile the model (GPU)"),
    ("fsdp", "under torchrun: shard weights, gradients and optimizer state over the processes (else DDP)"),
]


def vocab_size_flag(text: str) -> int:
    """--vocab-size: from the 256 bytes plus the special tokens up to what a token id can hold."""
    from ..runtime.tokenizer import SPECIALS
    low, high = 256 + len(SPECIALS), 2**31 - 1
    v = int(text)
    if not low <= v <= high:
        raise argparse.ArgumentTypeError(f"must be between {low} (the 256 bytes and {len(SPECIALS)} special tokens) "
                                         f"and {high:,}, got {text}")
    return v


vocab_size_flag.__name__ = "vocabulary size"


def train_flags(p) -> None:
    from ..train.loop import TrainConfig
    p.add_argument("--preset", help="the architecture, from the registry (see `slm info`; default: slm-1m, or with "
                   "--max-minutes and no shape flags the recipe for the budget, docs/training.md)")
    p.add_argument("--dim", type=at_least(1), help="hidden size (default: the preset's)")
    p.add_argument("--layers", type=at_least(1), help="blocks (default: the preset's)")
    p.add_argument("--heads", type=at_least(1), help="attention heads, each a KV head too (default: the preset's)")
    p.add_argument("--mlp", type=at_least(1), help="MLP width (default: 8/3 x dim, rounded up to 256)")
    p.add_argument("--data", help="folder from `slm data prepare` (default: synthesize)")
    p.add_argument("--tokenizer", help="tokenizer folder the data was prepared with (default: the synthesized one)")
    p.add_argument("--n-docs", type=at_least(2),
                   help=f"documents to synthesize when no --data (default: {N_DOCS:,}, or the budget recipe's)")
    p.add_argument("--vocab-size", type=vocab_size_flag,
                   help=f"tokenizer size when no --data (default: {VOCAB_SIZE:,}, or the budget recipe's)")
    add_flags(p, TrainConfig, TRAIN)
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in --out (its checkpoint, metrics and model), instead of refusing")


def apply_budget_recipe(a):
    """With --max-minutes and neither --preset nor a shape flag, the recipe for the budget
    (train/recipe.py) fills in the shape, and the vocabulary, corpus size and batch not given.
    Returns the recipe, or None where none applies; the other defaults are filled in either way."""
    recipe = None
    # a budget of 0 or less gets TrainConfig's one-line error, as with a preset
    shape_given = any(v is not None for v in (a.dim, a.layers, a.heads, a.mlp))
    if a.max_minutes is not None and a.max_minutes > 0 and a.preset is None and not shape_given:
        from ..train.recipe import recipe_for
        recipe = recipe_for(a.max_minutes)
        a.layers, a.dim, a.heads = recipe.layers, recipe.dim, recipe.heads
        for flag in ("vocab_size", "n_docs", "seq_len", "batch_size"):
            if getattr(a, flag) is None:
                setattr(a, flag, getattr(recipe, flag))
    a.preset = a.preset or PRESET
    a.vocab_size = a.vocab_size or VOCAB_SIZE
    a.n_docs = a.n_docs or N_DOCS
    return recipe


def model_config(a):
    """The preset, with --dim/--layers/--heads/--mlp applied (each checked here, before any work)."""
    from ..model.config import get_config
    cfg = get_config(a.preset or PRESET)
    if a.dim is None and a.layers is None and a.heads is None and a.mlp is None:
        return cfg
    dim, heads = a.dim or cfg.hidden_size, a.heads or cfg.num_heads
    if dim % heads:
        raise ValueError(f"--dim {dim} must be a multiple of --heads {heads} (each head gets dim / heads)")
    if (dim // heads) % 2:
        raise ValueError(f"--dim {dim} / --heads {heads} = {dim // heads}: the head size must be even "
                         "(the rotary embedding turns pairs of dimensions)")
    mlp = a.mlp or 256 * round(8 * dim / 3 / 256 + 0.5)
    return cfg.replace(name="custom", hidden_size=dim, num_layers=a.layers or cfg.num_layers, num_heads=heads,
                       num_kv_heads=heads, head_dim=dim // heads, intermediate_size=mlp)


def train(a) -> None:
    import torch
    from ..files import output_folder
    from ..train.loop import TrainConfig, Trainer, check_memory, check_new_run
    output_folder(a.out)
    check_new_run(a.out, a.resume, a.overwrite)
    recipe = apply_budget_recipe(a)
    if recipe is not None and int(os.environ.get("RANK", 0)) == 0:
        print(f"the recipe for {a.max_minutes:g} minutes: {recipe.describe()} (docs/training.md)", file=sys.stderr)
    cfg = model_config(a)
    data, tokenizer = a.data, a.tokenizer
    # every flag is checked before the corpus is synthesized (minutes for the default 100,000 documents)
    c = TrainConfig(data=data or "", tokenizer=tokenizer or "", **values(a, TRAIN))
    if data is None:  # nothing given: synthesize a corpus and train a tokenizer on it
        from ..data.prepare import build_synthetic
        world = int(os.environ.get("WORLD_SIZE", 1))
        device = torch.device(c.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        check_memory(c, cfg.replace(vocab_size=a.vocab_size, max_seq_len=max(c.seq_len, cfg.max_seq_len)), device, world)
        root = os.path.join(a.out, "data")
        print(f"synthetic corpus of {a.n_docs:,} documents in {root}", file=sys.stderr)
        data, synth_tok = build_synthetic(root, a.n_docs, a.vocab_size, seed=a.seed)
        tokenizer = tokenizer or synth_tok
    if tokenizer is None:
        raise ValueError("--tokenizer is required with --data (the folder the data was prepared with)")
    c.data, c.tokenizer = data, tokenizer
    result = Trainer(c, cfg).train(resume=a.resume, overwrite=a.overwrite)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"trained {result['steps']} steps in {result['minutes']:.1f} min; "
              f"validation loss {result['val_loss']:.4f}; model in {a.out}")
        if "probes" in result:
            from ..data.probes import summary
            print(summary(result["probes"]))


def tokenizer_train_flags(p) -> None:
    p.add_argument("--data", required=True, help=".txt/.jsonl/.parquet file or folder")
    p.add_argument("--vocab-size", type=vocab_size_flag, default=VOCAB_SIZE,
                   help="tokens in the vocabulary, special ones included")
    p.add_argument("--field", default="text", help="text field of .jsonl/.parquet records")
    p.add_argument("--out", required=True, help="folder for tokenizer.json and tokenizer_config.json")


def tokenizer_train(a) -> None:
    from collections import Counter
    from ..data.prepare import DataError, input_files, read_documents
    from ..files import output_folder
    from ..runtime.tokenizer import train_tokenizer
    output_folder(a.out)
    train, _ = input_files(a.data)
    if not train:
        raise DataError(f"{a.data}: only validation files (val.*); the tokenizer learns from the others")
    skipped, n_docs = Counter(), 0

    def docs():
        nonlocal n_docs
        for f in train:
            for d in read_documents(f, a.field, skipped):
                n_docs += 1
                yield d
    tok = train_tokenizer(docs(), a.vocab_size)
    if n_docs == 0:
        raise DataError(f"{a.data}: no usable documents" + (f" (skipped: {dict(skipped)})" if skipped else ""))
    tok.save(a.out)
    print(f"wrote {a.out}: byte-level BPE, {tok.vocab_size:,} tokens from {n_docs:,} documents")
    if skipped:
        print(f"skipped records: {dict(skipped)}", file=sys.stderr)
    if tok.vocab_size < a.vocab_size:
        print(f"note: asked for --vocab-size {a.vocab_size:,}, got {tok.vocab_size:,}: BPE ran out of merges (no pair "
              "of tokens inside the corpus's words occurs twice or more without already being a token); more, or "
              "more varied, text gives more tokens", file=sys.stderr)


def data_synth_flags(p) -> None:
    p.add_argument("--out", required=True, help="folder for train.txt, val.txt and stats.json")
    p.add_argument("--n-docs", type=at_least(2), default=N_DOCS, help="documents to write (one or more of each split)")
    p.add_argument("--seed", type=at_least(0), default=0, help="the same seed writes the same corpus")


def data_synth(a) -> None:
    from ..data.synth import write_corpus
    stats = write_corpus(a.out, a.n_docs, seed=a.seed)
    print(json.dumps(stats, indent=2))


def data_prepare_flags(p) -> None:
    p.add_argument("--data", required=True, help=".txt/.jsonl/.parquet file or folder")
    p.add_argument("--tokenizer", required=True, help="folder with tokenizer.json")
    p.add_argument("--out", required=True, help="folder for the token shards (what `slm train --data` reads)")
    p.add_argument("--field", default="text", help="text field of .jsonl/.parquet records")
    p.add_argument("--val-every", type=at_least(2), default=50, help="every N-th document goes to validation")
    p.add_argument("--scrub-pii", action="store_true",
                   help="replace e-mails, phone and card numbers, IBANs, IPs, national IDs and secrets by [TYPE] first")


def data_prepare(a) -> None:
    from ..data.prepare import input_files, prepare
    from ..files import output_folder
    from ..runtime.tokenizer import Tokenizer
    output_folder(a.out)
    input_files(a.data)  # a missing input is reported before the tokenizer loads
    meta = prepare(a.data, Tokenizer.from_dir(a.tokenizer), a.out, field=a.field, val_every=a.val_every,
                   scrub_pii=a.scrub_pii)
    print(f"wrote {a.out}: {meta['train_tokens']:,} train tokens ({meta['train_docs']:,} documents), "
          f"{meta['val_tokens']:,} val tokens ({meta['val_docs']:,} documents)")
    if meta["skipped"]:
        print(f"skipped records: {meta['skipped']}", file=sys.stderr)
    if a.scrub_pii:
        print(f"redacted: {json.dumps(meta['pii_redacted'])}")


def data_scrub_flags(p) -> None:
    p.add_argument("--input", required=True, help=".txt/.jsonl file or folder (UTF-8, or UTF-16/32 with a BOM)")
    p.add_argument("--output", required=True, help="file or folder to write (the input is left unchanged)")
    p.add_argument("--report", default=None, help="also write the counts by type to this JSON file (default: no file)")


def data_scrub(a) -> None:
    from ..data.scrub import scrub_path
    from ..files import output_file, same_path, write_json
    if a.report:
        output_file(a.report, "--report")
        if os.path.exists(a.input) and same_path(a.report, a.input):
            raise ValueError(f"--report {a.report} would overwrite the input; give another file")
    report = scrub_path(a.input, a.output)
    kinds = ", ".join(f"{k} {v:,}" for k, v in report["redacted"].items()) or "nothing found"
    print(f"scrubbed {report['files']} file(s) into {a.output}: {report['total']:,} redacted ({kinds})", file=sys.stderr)
    print(json.dumps(report))
    if a.report:
        write_json(a.report, report, flag="--report")
