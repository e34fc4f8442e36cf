"""`slm <command>`: each subcommand is a thin call into one module."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..checkpoint.safetensors_io import CheckpointError
from ..model.config import ConfigError


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
    from .. import load
    from ..footprint import track
    with track("generate", path=a.receipt, device=a.device, quiet=a.no_receipt_summary) as receipt:
        lm = load(a.model, dtype=a.dtype, device=a.device, quantize=a.quantize, group_size=a.group_size)
        receipt.watch(lm)
        for chunk in lm.stream(a.prompt, a.max_new_tokens, **_sampling(a)):
            sys.stdout.write(chunk)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()


def cmd_chat(a) -> None:
    from .. import load
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
    from ..model.config import get_config, memory_table
    if a.preset:
        cfg = get_config(a.preset)
    elif os.path.isfile(a.model):
        from ..checkpoint.gguf import read_gguf
        from ..model.config import ModelConfig
        cfg = ModelConfig.from_hf(read_gguf(a.model).hf_config, name=os.path.basename(a.model))
    else:
        from ..checkpoint.hf import read_config
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
    from ..data.prepare import read_documents, input_files
    from ..runtime.tokenizer import train_tokenizer
    train, val = input_files(a.data)
    docs = (d for f in train for d in read_documents(f, a.field))
    tok = train_tokenizer(docs, a.vocab_size)
    tok.save(a.out)
    print(f"wrote {a.out}: byte-level BPE, {tok.vocab_size} tokens")


def cmd_data_prepare(a) -> None:
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


def cmd_data_synth(a) -> None:
    from ..data.synth import write_corpus
    stats = write_corpus(a.out, a.n_docs, seed=a.seed)
    print(json.dumps(stats, indent=2))


def cmd_train(a) -> None:
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
        from ..serve import run
    except ImportError as e:
        raise ValueError(f"serving needs FastAPI and uvicorn ({e}): pip install 'slm[serve]'") from None
    import signal
    from ..footprint import track

    def stop(signum, frame):  # uvicorn shuts down gracefully, then re-raises SIGTERM here
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, stop)
    with track("serve", path=a.receipt, device=a.device) as receipt:  # written when the server stops
        run(model=a.model, host=a.host, port=a.port, api_key=a.api_key or os.environ.get("SLM_API_KEY"),
            name=a.served_model_name, max_batch=a.max_batch, context=a.context, log_prompts=a.log_prompts,
            dtype=a.dtype, device=a.device, quantize=a.quantize, group_size=a.group_size,
            on_load=receipt.watch)


def cmd_quantize(a) -> None:
    from .. import load
    # file_blocks=False: a GGUF file's blocks cannot be stored in slm's int8/int4 folder; requantize
    lm = load(a.model, quantize=f"int{a.bits}", group_size=a.group_size, file_blocks=False)
    lm.save(a.out)
    print(f"wrote {a.out}: int{a.bits}, {lm.model.quantization}")


def cmd_export(a) -> None:
    from .. import load
    lm = load(a.model)
    if a.format == "gguf":
        from ..checkpoint.gguf_write import write_gguf
        write_gguf(lm, a.out, a.dtype)
    else:
        lm.save(a.out, dequantize=True)
    print(f"wrote {a.out}")


def cmd_bench(a) -> None:
    from ..bench import run
    r = run(a.preset, a.quantize, a.group_size, a.new_tokens, a.threads)
    print(json.dumps(r, indent=2))


def cmd_data_scrub(a) -> None:
    from ..data.scrub import scrub_path
    report = scrub_path(a.input, a.output)
    kinds = ", ".join(f"{k} {v:,}" for k, v in report["redacted"].items()) or "nothing found"
    print(f"scrubbed {report['files']} file(s) into {a.output}: {report['total']:,} redacted ({kinds})", file=sys.stderr)
    print(json.dumps(report))
    if a.report:
        with open(a.report, "w") as f:
            json.dump(report, f, indent=2)


def _count(text: str) -> float:
    """A count such as 2.7e9, 2.7B, 124M or 1.4T."""
    units = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    t = text.strip().upper().replace(",", "").replace("_", "")
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise ValueError(f"not a count: {text!r} (use e.g. 2.7e9, 2.7B, 124M, 1.4T)") from None


def cmd_cost(a) -> None:
    from ..footprint.forecast import CHINCHILLA_TOKENS_PER_PARAM, compare_chart, forecast, validation_markdown
    from ..footprint.receipt import Rates, load_receipts, receipts_dir
    if a.validate:
        print(validation_markdown(a.mfu))
        return
    if a.compare:
        folder = a.receipts or receipts_dir()
        receipts = load_receipts(folder) if a.receipts or os.path.isdir(folder) else []
        rows = compare_chart(receipts, a.out, Rates.resolve(a.pue, a.grid))
        print(f"wrote {a.out}: {len(rows) - len(receipts)} published runs and {len(receipts)} receipts from {folder}")
        return
    if a.preset:
        from ..model.config import get_config
        from ..footprint.flops import matmul_params
        params = matmul_params(get_config(a.preset))
    elif a.params:
        params = _count(a.params)
    else:
        raise ValueError("give --params N or --preset NAME (or --compare, --validate)")
    if a.tokens is None:
        raise ValueError("give --tokens D (a count, or 'chinchilla' for 20 tokens per parameter)")
    tokens = CHINCHILLA_TOKENS_PER_PARAM * params if a.tokens.lower() == "chinchilla" else _count(a.tokens)
    r = forecast(params, tokens, a.gpu, a.gpus, a.mfu, a.pue, a.grid, a.price)
    if a.json:
        print(json.dumps(r, indent=2))
        return
    rows = [("parameters (N)", f"{params:,.0f}" + (f" ({a.preset}: matmul weights incl. LM head)" if a.preset else "")),
            ("tokens (D)", f"{tokens:,.0f}" + (" (Chinchilla: 20 per parameter)" if a.tokens.lower() == "chinchilla" else "")),
            ("FLOPs (6ND)", f"{r['flops']:.3g}"),
            ("hardware", f"{a.gpus} x {r['gpu_name']} at MFU {r['mfu']:.0%} of {r['peak_flops_per_gpu'] / 1e12:g} "
                         f"TFLOP/s {r['dtype']}"),
            ("GPU-hours", f"{r['gpu_hours']:,.4g}"), ("wall time", f"{r['wall_days']:,.4g} days"),
            ("energy", f"{r['energy_kwh']:,.4g} kWh ({r['watts_per_gpu']:g} W per GPU)"),
            ("CO2", f"{r['tco2']:,.4g} t (PUE {r['pue']:g} x {r['grid_g_per_kwh']:g} g/kWh)"),
            ("cost", f"${r['cost_usd']:,.2f} (${r['price_per_gpu_hour']:g} per GPU-hour)")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def cmd_eval(a) -> None:
    from .. import load
    from ..eval import evaluate, format_table, load_task, perplexity, read_text, write_json
    # Read the inputs before the model, so a bad file fails at once.
    text = read_text(a.text) if a.text else None
    docs = load_task(a.task, a.task_format) if a.task else None
    from ..footprint import track
    with track("eval", path=a.receipt, device=a.device) as receipt:
        lm = load(a.model, dtype=a.dtype, device=a.device, quantize=a.quantize, group_size=a.group_size)
        receipt.watch(lm)
        if text is not None:
            r = {"text": a.text, **perplexity(lm, text, max_length=a.max_length, batch_size=a.batch_size)}
        else:
            r = evaluate(lm, docs, a.task_format, num_fewshot=a.num_fewshot, limit=a.limit, batch_size=a.batch_size,
                         seed=a.seed, max_length=a.max_length, add_bos=not a.no_bos)
            r["task"], r["format"] = a.task, "builtin" if a.task == "builtin" else a.task_format
    r["model"] = a.model
    print(format_table(r))
    if a.output:
        write_json(a.output, r)
        print(f"wrote {a.output}", file=sys.stderr)


def cmd_explain(a) -> None:
    from ..explain.report import explain_cli
    paths = explain_cli(a.model, a.prompt, a.out, target=a.target, contrast=a.contrast, layers=a.layers,
                        top_k=a.top_k, steps=a.steps, baseline=a.baseline, figures=not a.no_figures)
    for path in paths:
        print(f"wrote {path}")


def cmd_finetune(a) -> None:
    from ..finetune.sft import FinetuneConfig, finetune
    targets = [t for arg in a.target_modules or [] for t in arg.split(",") if t]
    c = FinetuneConfig(model=a.model, data=a.data, out=a.out, lora=a.lora, lora_r=a.lora_r, lora_alpha=a.lora_alpha,
                       lora_dropout=a.lora_dropout, target_modules=targets, quantize=a.quantize,
                       group_size=a.group_size, max_steps=a.max_steps, epochs=a.epochs, lr=a.lr,
                       batch_size=a.batch_size, seq_len=a.seq_len, val_fraction=a.val_fraction,
                       eval_every=a.eval_every, log_every=a.log_every, warmup=a.warmup,
                       gradient_checkpointing=a.gradient_checkpointing, seed=a.seed)
    from ..footprint import track
    from ..footprint.flops import flops_per_token
    with track("finetune", path=os.path.join(a.out, "receipt.json")) as receipt:
        r = finetune(c)
        # every packed row is a forward and a backward pass; LoRA computes no gradients for the
        # frozen weights, so its step costs 4N per token (forward 2N + input gradients 2N), not 6N
        cfg, n = r["lm"].config, r["steps"] * a.batch_size * a.seq_len
        per_token = 2 * flops_per_token(cfg, a.seq_len, training=False) if a.lora else \
            flops_per_token(cfg, a.seq_len, training=True)
        receipt.model_cfg = cfg
        receipt.add_tokens(n, "trained", flops=n * per_token)
    val = f"; validation loss {r['first_val_loss']:.4f} -> {r['val_loss']:.4f}" if r["val_loss"] is not None else ""
    what = "adapter (adapter_model.safetensors, adapter_config.json)" if a.lora else "model"
    print(f"fine-tuned {r['steps']} steps on {r['train_conversations']} conversations "
          f"({r['trainable_params']:,} of {r['total_params']:,} parameters trained){val}; {what} in {a.out}")


def cmd_lora_merge(a) -> None:
    from .. import load
    from ..finetune.lora import load_adapter, merge_lora
    lm = load(a.model, dtype="fp32")
    load_adapter(lm.model, a.adapter)
    merge_lora(lm.model)
    lm.save(a.out, dequantize=bool(getattr(lm.model, "quantization", None)))
    print(f"wrote {a.out}: {a.model} with {a.adapter} merged in")


def cmd_data_distill(a) -> None:
    from ..finetune.distill import distill, make_teacher, read_prompts
    items = read_prompts(a.prompts, a.n_prompts, a.seed)
    teacher = make_teacher(a.teacher, a.model, a.api_key, a.quantize)
    s = distill(teacher, items, a.out, a.strategy, a.max_tokens, a.temperature, a.limit)
    checked = f"; teacher correct on {s['correct']}/{s['checked']} checkable" if s["checked"] else ""
    print(f"wrote {s['written']} records to {a.out} ({s['already_done']} already there, "
          f"{s['duplicates']} duplicate prompts skipped, {s['empty']} empty replies){checked}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="slm", description="Small language models on one ordinary machine.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="continue a prompt, streaming the text")
    p.add_argument("--model", default=None, help="Hugging Face model folder or .gguf file (default: gemma-3-270m)")
    p.add_argument("--prompt", required=True)
    _sampling_args(p)
    p.add_argument("--receipt", default=None, help="where to write the receipt JSON (default: ~/.cache/slm/receipts/)")
    p.add_argument("--no-receipt-summary", action="store_true", help="write the receipt without printing it")
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
    p.add_argument("--muon-lr", type=float, default=0.02)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--schedule", choices=["wsd", "cosine"], default="wsd")
    p.add_argument("--cooldown", type=float, default=0.7, help="wsd: the fraction of the run spent decaying")
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

    p = sub.add_parser("data", help="training data: synth, prepare, scrub")
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
    d.add_argument("--scrub-pii", action="store_true",
                   help="replace e-mails, phone and card numbers, IBANs, IPs, national IDs and secrets by [TYPE] first")
    d.set_defaults(func=cmd_data_prepare)
    d = dsub.add_parser("scrub", help="redact PII and secrets in .txt/.jsonl files: [EMAIL], [PHONE], [CARD], ...")
    d.add_argument("--input", required=True, help=".txt/.jsonl file or folder")
    d.add_argument("--output", required=True, help="file or folder to write (the input is left unchanged)")
    d.add_argument("--report", default=None, help="also write the counts by type to this JSON file")
    d.set_defaults(func=cmd_data_scrub)

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
    _quantize_args(p)
    p.add_argument("--receipt", default=None, help="where to write the receipt JSON when the server stops "
                                                   "(default: ~/.cache/slm/receipts/)")
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

    p = sub.add_parser("cost", help="forecast a training run's GPU-hours, energy, CO2 and money; compare receipts")
    p.add_argument("--params", help="parameters N (2.7e9, 2.7B, 124M)")
    p.add_argument("--preset", help="take N from a registry model (its matmul weights, LM head included)")
    p.add_argument("--tokens", help="training tokens D (1.4T, 2e12), or 'chinchilla' for 20 per parameter")
    p.add_argument("--gpu", default="a100-80gb-sxm", help="a100-40gb-sxm, a100-80gb-sxm, a100-40gb-pcie, "
                   "a100-80gb-pcie, h100-sxm, h100-pcie, h200, l4, t4, rtx-4090 (looser names work: 'H100 PCIe')")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation (default 0.40)")
    p.add_argument("--pue", type=float, default=None, help="data-centre overhead (default 1.0 or $SLM_PUE)")
    p.add_argument("--grid", type=float, default=None, help="g CO2 per kWh (default 475, world average, or $SLM_GRID_G_PER_KWH)")
    p.add_argument("--price", type=float, default=None, help="USD per GPU-hour (default: the device table's)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--compare", action="store_true", help="chart published runs and your receipts (--out PNG)")
    p.add_argument("--receipts", default=None, help="folder of receipts for --compare (default: ~/.cache/slm/receipts)")
    p.add_argument("--out", default="cost_compare.png", help="--compare: the PNG to write")
    p.add_argument("--validate", action="store_true", help="print the forecaster's validation table")
    p.set_defaults(func=cmd_cost)

    p = sub.add_parser("eval", help="perplexity of a text, or multiple-choice accuracy scored as lm-evaluation-harness does")
    p.add_argument("--model", default=None, help="Hugging Face model folder or .gguf file (default: gemma-3-270m)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--text", help="a UTF-8 text file: rolling-window perplexity (token, word, byte; bits per byte)")
    g.add_argument("--task", help="FILE.jsonl in the layout of --task-format, or 'builtin' (common-sense probes)")
    p.add_argument("--task-format", default=None, help="hellaswag | piqa | arc | winogrande (for a --task file)")
    p.add_argument("--num-fewshot", type=int, default=0, help="examples drawn from the same file (seeded)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--max-length", type=int, default=None, help="context in tokens (default: the model's)")
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed (lm-eval's default 1234)")
    p.add_argument("--no-bos", action="store_true",
                   help="encode tasks without the tokenizer's BOS (lm-eval's default for non-Gemma HF models)")
    p.add_argument("--output", default=None, help="write the results (per-item log-likelihoods) as JSON")
    p.add_argument("--receipt", default=None, help="where to write the receipt JSON (default: ~/.cache/slm/receipts/)")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--device", default=None)
    _quantize_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("explain", help="HTML report: attention heatmaps, logit lens, attribution of the next token")
    p.add_argument("--model", default=None, help="Hugging Face model folder or .gguf file (default: gemma-3-270m)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="report.html; PNG figures are written beside it")
    p.add_argument("--target", default=None, help="the next token to explain, as text (default: the top prediction)")
    p.add_argument("--contrast", default=None, help="explain logit(target) - logit(contrast) instead")
    p.add_argument("--layers", default=None, help="layers whose attention is shown, e.g. 0,5,10-17 (default: all)")
    p.add_argument("--top-k", type=int, default=5, help="tokens listed per layer and position by the logit lens")
    p.add_argument("--steps", type=int, default=64, help="integrated-gradients steps")
    p.add_argument("--baseline", default="pad", help="integrated-gradients baseline: pad (default), zeros, or a token")
    p.add_argument("--no-figures", action="store_true", help="only the HTML report, no PNG figures")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("finetune", help="supervised fine-tuning on chat data: full, LoRA, or LoRA over int8/int4")
    p.add_argument("--model", required=True, help="model folder or .gguf file")
    p.add_argument("--data", required=True, help=".jsonl: {'messages': [...]} or {'prompt', 'completion'} per line")
    p.add_argument("--out", required=True)
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (PEFT format) instead of all weights")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--target-modules", nargs="+", default=None,
                   help="Hugging Face module names (default: all attention and MLP projections)")
    _quantize_args(p)
    p.add_argument("--max-steps", type=int, default=None, help="default: --epochs over the data")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=None, help="default 2e-4 with --lora, 2e-5 otherwise")
    p.add_argument("--batch-size", type=int, default=8, help="packed rows per step")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in backward (less memory)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("lora", help="LoRA adapters: merge")
    lsub = p.add_subparsers(dest="lora_command", required=True)
    m = lsub.add_parser("merge", help="write base + adapter as one Hugging Face model folder")
    m.add_argument("--model", required=True, help="the base model folder or .gguf file")
    m.add_argument("--adapter", required=True, help="folder with adapter_model.safetensors + adapter_config.json")
    m.add_argument("--out", required=True)
    m.set_defaults(func=cmd_lora_merge)

    d = dsub.add_parser("distill", help="training data from a teacher model or OpenAI-compatible server (Orca 2 style)")
    d.add_argument("--teacher", required=True, help="model folder/.gguf file, or a server URL (http://host:port)")
    d.add_argument("--prompts", required=True, help="'builtin', a .jsonl (prompt/question per line) or a .txt file")
    d.add_argument("--out", required=True, help=".jsonl; an existing one is resumed")
    d.add_argument("--strategy", default="step-by-step",
                   choices=["step-by-step", "direct", "explain", "recall-then-answer"])
    d.add_argument("--max-tokens", type=int, default=256)
    d.add_argument("--temperature", type=float, default=0.0)
    d.add_argument("--model", default=None, help="model name at the server (default: the first it lists)")
    d.add_argument("--api-key", default=None, help="default: $OPENAI_API_KEY or $SLM_API_KEY")
    d.add_argument("--n-prompts", type=int, default=500, help="questions in the builtin set")
    d.add_argument("--limit", type=int, default=None, help="stop after this many new records")
    d.add_argument("--seed", type=int, default=0)
    _quantize_args(d, group=False)
    d.set_defaults(func=cmd_data_distill)

    p = sub.add_parser("info", help="parameters, shape and memory of a model or preset")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model")
    g.add_argument("--preset")
    p.set_defaults(func=cmd_info)
    return ap


# slm makes no network calls; these keep the libraries it may import (huggingface_hub, transformers,
# datasets) from trying any: no downloads, no telemetry, no update checks (tests/properties/test_offline.py).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "DO_NOT_TRACK": "1",
               "OTEL_SDK_DISABLED": "true"}  # FastAPI's tracing hooks: never export


def main(argv: list[str] | None = None) -> None:
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
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
