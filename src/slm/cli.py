"""`slm <command>`: each subcommand is a thin call into one module."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .checkpoint.safetensors_io import CheckpointError
from .config import ConfigError


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--device", default=None)
    _quantize_args(p)


def _quantize_args(p: argparse.ArgumentParser, group: bool = True) -> None:
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="quantize the linear layers while loading: int8 (one scale per output channel, ~4x fewer "
                        "bytes per token than fp32) or int4 (groups of --group-size, ~6.4x fewer)")
    if group:
        p.add_argument("--group-size", type=int, default=None, help="weights per scale (int4: 32, 64 or 128; default 32)")


def _sampling(a) -> dict:
    return dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, repetition_penalty=a.repetition_penalty,
                seed=a.seed, stop=a.stop)


def cmd_generate(a) -> None:
    from . import load
    lm = load(a.model, dtype=a.dtype, device=a.device, quantize=a.quantize, group_size=a.group_size)
    for chunk in lm.stream(a.prompt, a.max_new_tokens, **_sampling(a)):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(a) -> None:
    from . import load
    lm = load(a.model, dtype=a.dtype, device=a.device, quantize=a.quantize, group_size=a.group_size)
    messages = [{"role": "system", "content": a.system}] if a.system else []
    print(f"Chatting with {a.model or 'the default model'}. Empty line or /exit to quit, /reset to start over.",
          file=sys.stderr)
    while True:
        try:
            sys.stderr.write("> ")
            sys.stderr.flush()
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            break
        if not line or line.strip() in ("", "/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = messages[:1] if a.system else []
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        reply = []
        for chunk in lm.chat(messages, a.max_new_tokens, stream=True, **_sampling(a)):
            reply.append(chunk)
            sys.stdout.write(chunk)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_info(a) -> None:
    from .config import get_config, memory_table
    if a.preset:
        cfg = get_config(a.preset)
    elif os.path.isfile(a.model):
        from .checkpoint.gguf import read_gguf
        from .config import ModelConfig
        cfg = ModelConfig.from_hf(read_gguf(a.model).hf_config, name=os.path.basename(a.model))
    else:
        from .checkpoint.hf import read_config
        cfg = read_config(a.model)
    n = cfg.num_params()
    rows = [
        ("name", cfg.name), ("family", cfg.family),
        ("parameters", f"{n:,} ({n / 1e6:.1f}M)"),
        ("layers", cfg.num_layers), ("hidden size", cfg.hidden_size), ("MLP size", cfg.intermediate_size),
        ("attention heads", f"{cfg.num_heads} (KV heads {cfg.num_kv_heads}, head dim {cfg.head_dim})"),
        ("context", cfg.max_seq_len), ("sliding window", cfg.sliding_window or "-"),
        ("rope", f"theta {cfg.rope_theta:g}, rotary dim {cfg.rotary_dim}/{cfg.head_dim}"),
        ("vocabulary", cfg.vocab_size), ("tied embeddings", cfg.tie_embeddings),
    ]
    rows += [(f"weights {k}", _human(v)) for k, v in memory_table(cfg).items()]
    rows.append(("KV cache (bf16, full context)", _human(cfg.kv_cache_bytes())))
    if cfg.source:
        rows.append(("source", cfg.source))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def cmd_tokenizer_train(a) -> None:
    from .data.prepare import read_documents, input_files
    from .tokenizer import train_tokenizer
    train, val = input_files(a.data)
    docs = (d for f in train for d in read_documents(f, a.field))
    tok = train_tokenizer(docs, a.vocab_size)
    tok.save(a.out)
    print(f"wrote {a.out}: byte-level BPE, {tok.vocab_size} tokens")


def cmd_data_prepare(a) -> None:
    from .data.prepare import prepare
    from .tokenizer import Tokenizer
    meta = prepare(a.data, Tokenizer.from_dir(a.tokenizer), a.out, field=a.field, val_every=a.val_every)
    print(f"wrote {a.out}: {meta['train_tokens']:,} train tokens ({meta['train_docs']:,} documents), "
          f"{meta['val_tokens']:,} val tokens ({meta['val_docs']:,} documents)")
    if meta["skipped"]:
        print(f"skipped records: {meta['skipped']}", file=sys.stderr)


def cmd_data_synth(a) -> None:
    from .data.synth import write_corpus
    stats = write_corpus(a.out, a.n_docs, seed=a.seed)
    print(json.dumps(stats, indent=2))


def cmd_train(a) -> None:
    from .config import get_config
    from .train.loop import TrainConfig, Trainer
    cfg = get_config(a.preset)
    if a.dim or a.layers or a.heads:
        dim, heads = a.dim or cfg.hidden_size, a.heads or cfg.num_heads
        cfg = cfg.replace(name="custom", hidden_size=dim, num_layers=a.layers or cfg.num_layers, num_heads=heads,
                          num_kv_heads=heads, head_dim=dim // heads, intermediate_size=a.mlp or 256 * round(8 * dim / 3 / 256 + 0.5))
    data, tokenizer = a.data, a.tokenizer
    if data is None:  # nothing given: synthesize a corpus and train a tokenizer on it
        from .data.prepare import build_synthetic
        root = os.path.join(a.out, "data")
        print(f"synthetic corpus of {a.n_docs:,} documents in {root}", file=sys.stderr)
        data, synth_tok = build_synthetic(root, a.n_docs, a.vocab_size, seed=a.seed)
        tokenizer = tokenizer or synth_tok
    if tokenizer is None:
        raise ValueError("--tokenizer is required with --data (the folder the data was prepared with)")
    c = TrainConfig(out=a.out, data=data, tokenizer=tokenizer, seq_len=a.seq_len, batch_size=a.batch_size,
                    grad_accum=a.grad_accum, max_steps=a.max_steps, max_minutes=a.max_minutes, lr=a.lr,
                    optimizer=a.optimizer, muon_lr=a.muon_lr, warmup=a.warmup, schedule=a.schedule, cooldown=a.cooldown,
                    eval_every=a.eval_every, save_every=a.save_every,
                    log_every=a.log_every, seed=a.seed, device=a.device, compile=a.compile, fsdp=a.fsdp)
    result = Trainer(c, cfg).train(resume=a.resume)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"trained {result['steps']} steps in {result['minutes']:.1f} min; "
              f"validation loss {result['val_loss']:.4f}; model in {a.out}")


def cmd_serve(a) -> None:
    try:
        from .serve import run
    except ImportError as e:
        raise ValueError(f"serving needs FastAPI and uvicorn ({e}): pip install 'slm[serve]'") from None
    run(model=a.model, host=a.host, port=a.port, api_key=a.api_key or os.environ.get("SLM_API_KEY"),
        name=a.served_model_name, max_batch=a.max_batch, context=a.context, log_prompts=a.log_prompts,
        dtype=a.dtype, device=a.device, quantize=a.quantize)


def cmd_quantize(a) -> None:
    from . import load
    lm = load(a.model, quantize=f"int{a.bits}", group_size=a.group_size)
    lm.save(a.out)
    print(f"wrote {a.out}: int{a.bits}, {lm.model.quantization}")


def cmd_export(a) -> None:
    from . import load
    lm = load(a.model)
    if a.format == "gguf":
        from .checkpoint.gguf_write import write_gguf
        write_gguf(lm, a.out, a.dtype)
    else:
        lm.save(a.out, dequantize=True)
    print(f"wrote {a.out}")


def cmd_bench(a) -> None:
    from .bench import run
    r = run(a.preset, a.quantize, a.group_size, a.new_tokens, a.threads)
    print(json.dumps(r, indent=2))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="slm", description="Small language models on one ordinary machine.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="continue a prompt, streaming the text")
    p.add_argument("--model", default=None, help="Hugging Face model folder or .gguf file (default: gemma-3-270m)")
    p.add_argument("--prompt", required=True)
    _sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat through the model's chat template")
    p.add_argument("--model", default=None, help="Hugging Face model folder or .gguf file (default: gemma-3-270m)")
    p.add_argument("--system", default=None, help="system message")
    _sampling_args(p)
    p.set_defaults(func=cmd_chat, max_new_tokens=256)

    p = sub.add_parser("train", help="train a model from scratch (synthesizes data when none is given)")
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="slm-1m")
    p.add_argument("--dim", type=int), p.add_argument("--layers", type=int), p.add_argument("--heads", type=int)
    p.add_argument("--mlp", type=int, help="MLP width (default: 8/3 x dim, rounded up to 256)")
    p.add_argument("--data", help="folder from `slm data prepare` (default: synthesize)")
    p.add_argument("--tokenizer", help="tokenizer folder the data was prepared with")
    p.add_argument("--n-docs", type=int, default=100_000, help="documents to synthesize when no --data")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokenizer size when no --data")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--optimizer", choices=["muon", "adamw"], default="muon",
                   help="muon (default): Muon on the blocks' matrices, AdamW (--lr) on embeddings and norms")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: 6e-3 with muon, 2e-3 alone)")
    p.add_argument("--muon-lr", type=float, default=0.03)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--schedule", choices=["wsd", "cosine"], default="wsd")
    p.add_argument("--cooldown", type=float, default=0.5, help="wsd: the fraction of the run spent decaying")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and optimizer state over the processes (else DDP)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tokenizer", help="tokenizers: train")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer that transformers loads")
    t.add_argument("--data", required=True, help=".txt/.jsonl/.parquet file or folder")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--field", default="text", help="text field of .jsonl/.parquet records")
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("data", help="training data: synth, prepare")
    dsub = p.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("synth", help="built-in synthetic stories and textbook exercises")
    d.add_argument("--out", required=True)
    d.add_argument("--n-docs", type=int, default=100_000)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_data_synth)
    d = dsub.add_parser("prepare", help="tokenize text into token shards for training")
    d.add_argument("--data", required=True, help=".txt/.jsonl/.parquet file or folder")
    d.add_argument("--tokenizer", required=True, help="folder with tokenizer.json")
    d.add_argument("--out", required=True)
    d.add_argument("--field", default="text")
    d.add_argument("--val-every", type=int, default=50, help="every N-th document goes to validation")
    d.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("serve", help="OpenAI-compatible API and a chat page on this machine (127.0.0.1)")
    p.add_argument("--model", default=None, help="Hugging Face model folder or .gguf file (default: gemma-3-270m)")
    p.add_argument("--host", default="127.0.0.1", help="a non-loopback address needs --api-key")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $SLM_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: folder name)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (KV cache rows)")
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence (capped by the model's)")
    p.add_argument("--log-prompts", action="store_true", help="log prompts and outputs (off by default)")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--device", default=None)
    _quantize_args(p, group=False)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("quantize", help="save a weight-only int8/int4 copy of a model folder (slm.load reads it)")
    p.add_argument("--model", required=True, help="Hugging Face model folder or .gguf file")
    p.add_argument("--bits", type=int, choices=[8, 4], required=True)
    p.add_argument("--group-size", type=int, default=None, help="weights per scale (default: int8 per channel, int4 32)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export", help="write a model as GGUF (llama.cpp, Ollama) or as a Hugging Face folder")
    p.add_argument("--model", required=True, help="model folder (quantized or not) or .gguf file")
    p.add_argument("--format", choices=["gguf", "hf"], required=True)
    p.add_argument("--out", required=True, help="FILE.gguf, or a folder for --format hf")
    p.add_argument("--dtype", choices=["f32", "f16", "q8_0"], default="f32", help="GGUF tensor type of the matrices")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="resident memory and decode tokens/s of a registry architecture")
    p.add_argument("--preset", required=True)
    p.add_argument("--random-weights", action="store_true", required=True,
                   help="random weights, created (and quantized) one layer at a time")
    _quantize_args(p)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("info", help="parameters, shape and memory of a model or preset")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model")
    g.add_argument("--preset")
    p.set_defaults(func=cmd_info)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError) as e:  # DataError is a ValueError
        print(f"slm {args.command}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
