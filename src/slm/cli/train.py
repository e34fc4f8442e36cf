"""slm train, tokenizer train, data synth/prepare/scrub: training from scratch and its data."""

from __future__ import annotations

import json
import os
import sys

from .flags import add_flags, values

N_DOCS, VOCAB_SIZE = 100_000, 4096  # the synthetic corpus and its tokenizer, here and in `slm train`

# The flags of train.loop.TrainConfig (defaults from there). Its data and tokenizer are flags of
# their own: without them, `slm train` synthesizes both.
TRAIN = [
    ("out", "folder for the model, metrics.jsonl, loss.png and checkpoint/"),
    ("seq_len", "tokens per training sequence"),
    ("batch_size", "sequences per micro-batch"),
    ("grad_accum", "micro-batches per optimizer step"),
    ("max_steps", "optimizer steps"),
    ("max_minutes", "also stop after this many minutes (default: no limit)"),
    ("optimizer", "muon: Muon on the blocks' matrices, AdamW (--lr) on embeddings and norms; adamw: AdamW alone",
     {"choices": ["muon", "adamw"]}),
    ("lr", "AdamW learning rate (default: 6e-3 with muon, 2e-3 alone)"),
    ("muon_lr", "Muon learning rate"),
    ("warmup", "steps of linear learning-rate warmup"),
    ("schedule", "wsd: warmup, stable, then linear decay over the last --cooldown of the run; cosine",
     {"choices": ["wsd", "cosine"]}),
    ("cooldown", "wsd: the fraction of the run spent decaying"),
    ("eval_every", "steps between validation losses"),
    ("save_every", "steps between checkpoints (for --resume)"),
    ("log_every", "steps between lines of metrics.jsonl"),
    ("seed", "seed of the initial weights and of every step's batch"),
    ("device", "cuda or cpu (default: cuda if available)"),
    ("compile", "torch.compile the model (GPU)"),
    ("fsdp", "under torchrun: shard weights, gradients and optimizer state over the processes (else DDP)"),
]


def train_flags(p) -> None:
    from ..train.loop import TrainConfig
    p.add_argument("--preset", default="slm-1m", help="the architecture, from the registry (see `slm info`)")
    p.add_argument("--dim", type=int, help="hidden size (default: the preset's)")
    p.add_argument("--layers", type=int, help="blocks (default: the preset's)")
    p.add_argument("--heads", type=int, help="attention heads, each a KV head too (default: the preset's)")
    p.add_argument("--mlp", type=int, help="MLP width (default: 8/3 x dim, rounded up to 256)")
    p.add_argument("--data", help="folder from `slm data prepare` (default: synthesize)")
    p.add_argument("--tokenizer", help="tokenizer folder the data was prepared with (default: the synthesized one)")
    p.add_argument("--n-docs", type=int, default=N_DOCS, help="documents to synthesize when no --data")
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help="tokenizer size when no --data")
    add_flags(p, TrainConfig, TRAIN)
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint")


def train(a) -> None:
    from ..model.config import get_config
    from ..train.loop import TrainConfig, Trainer
    cfg = get_config(a.preset)
    if a.dim or a.layers or a.heads:
        dim, heads = a.dim or cfg.hidden_size, a.heads or cfg.num_heads
        cfg = cfg.replace(name="custom", hidden_size=dim, num_layers=a.layers or cfg.num_layers, num_heads=heads,
                          num_kv_heads=heads, head_dim=dim // heads, intermediate_size=a.mlp or 256 * round(8 * dim / 3 / 256 + 0.5))
    data, tokenizer = a.data, a.tokenizer
    if data is None:  # nothing given: synthesize a corpus and train a tokenizer on it
        from ..data.prepare import build_synthetic
        root = os.path.join(a.out, "data")
        print(f"synthetic corpus of {a.n_docs:,} documents in {root}", file=sys.stderr)
        data, synth_tok = build_synthetic(root, a.n_docs, a.vocab_size, seed=a.seed)
        tokenizer = tokenizer or synth_tok
    if tokenizer is None:
        raise ValueError("--tokenizer is required with --data (the folder the data was prepared with)")
    c = TrainConfig(data=data, tokenizer=tokenizer, **values(a, TRAIN))
    result = Trainer(c, cfg).train(resume=a.resume)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"trained {result['steps']} steps in {result['minutes']:.1f} min; "
              f"validation loss {result['val_loss']:.4f}; model in {a.out}")


def tokenizer_train_flags(p) -> None:
    p.add_argument("--data", required=True, help=".txt/.jsonl/.parquet file or folder")
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help="tokens in the vocabulary, special ones included")
    p.add_argument("--field", default="text", help="text field of .jsonl/.parquet records")
    p.add_argument("--out", required=True, help="folder for tokenizer.json and tokenizer_config.json")


def tokenizer_train(a) -> None:
    from ..data.prepare import input_files, read_documents
    from ..runtime.tokenizer import train_tokenizer
    train, val = input_files(a.data)
    docs = (d for f in train for d in read_documents(f, a.field))
    tok = train_tokenizer(docs, a.vocab_size)
    tok.save(a.out)
    print(f"wrote {a.out}: byte-level BPE, {tok.vocab_size} tokens")


def data_synth_flags(p) -> None:
    p.add_argument("--out", required=True, help="folder for train.txt, val.txt and stats.json")
    p.add_argument("--n-docs", type=int, default=N_DOCS, help="documents to write")
    p.add_argument("--seed", type=int, default=0, help="the same seed writes the same corpus")


def data_synth(a) -> None:
    from ..data.synth import write_corpus
    stats = write_corpus(a.out, a.n_docs, seed=a.seed)
    print(json.dumps(stats, indent=2))


def data_prepare_flags(p) -> None:
    p.add_argument("--data", required=True, help=".txt/.jsonl/.parquet file or folder")
    p.add_argument("--tokenizer", required=True, help="folder with tokenizer.json")
    p.add_argument("--out", required=True, help="folder for the token shards (what `slm train --data` reads)")
    p.add_argument("--field", default="text", help="text field of .jsonl/.parquet records")
    p.add_argument("--val-every", type=int, default=50, help="every N-th document goes to validation")
    p.add_argument("--scrub-pii", action="store_true",
                   help="replace e-mails, phone and card numbers, IBANs, IPs, national IDs and secrets by [TYPE] first")


def data_prepare(a) -> None:
    from ..data.prepare import prepare
    from ..runtime.tokenizer import Tokenizer
    meta = prepare(a.data, Tokenizer.from_dir(a.tokenizer), a.out, field=a.field, val_every=a.val_every,
                   scrub_pii=a.scrub_pii)
    print(f"wrote {a.out}: {meta['train_tokens']:,} train tokens ({meta['train_docs']:,} documents), "
          f"{meta['val_tokens']:,} val tokens ({meta['val_docs']:,} documents)")
    if meta["skipped"]:
        print(f"skipped records: {meta['skipped']}", file=sys.stderr)
    if a.scrub_pii:
        print(f"redacted: {json.dumps(meta['pii_redacted'])}")


def data_scrub_flags(p) -> None:
    p.add_argument("--input", required=True, help=".txt/.jsonl file or folder")
    p.add_argument("--output", required=True, help="file or folder to write (the input is left unchanged)")
    p.add_argument("--report", default=None, help="also write the counts by type to this JSON file (default: no file)")


def data_scrub(a) -> None:
    from ..data.scrub import scrub_path
    report = scrub_path(a.input, a.output)
    kinds = ", ".join(f"{k} {v:,}" for k, v in report["redacted"].items()) or "nothing found"
    print(f"scrubbed {report['files']} file(s) into {a.output}: {report['total']:,} redacted ({kinds})", file=sys.stderr)
    print(json.dumps(report))
    if a.report:
        with open(a.report, "w") as f:
            json.dump(report, f, indent=2)
