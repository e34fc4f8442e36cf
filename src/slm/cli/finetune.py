"""slm finetune, data distill: fine-tuning on chat data, and making that data with a teacher."""

from __future__ import annotations

import os

from .flags import add_flags, at_least, quantize_options, values

# The flags of finetune.sft.FinetuneConfig (defaults from there).
FINETUNE = [
    ("model", "model folder or .gguf file"),
    ("data", ".jsonl: {'messages': [...]} or {'prompt', 'completion'} per line"),
    ("out", "folder for the fine-tuned model, or the adapter with --lora"),
    ("lora", "train LoRA adapters (PEFT format) instead of all weights"),
    ("lora_r", "LoRA rank", {"min": 1}),
    ("lora_alpha", "LoRA scale numerator (the update is scaled by alpha / r)"),
    ("lora_dropout", "dropout on the LoRA input"),
    ("target_modules", "Hugging Face module names, space- or comma-separated (default: all attention and MLP)",
     {"nargs": "+"}),
    ("quantize", "with --lora: the frozen base quantized to int8 or int4 (QLoRA-style), or none: fp32 "
     "(default: a quantized GGUF file's own bits, fp32 otherwise)", {"choices": ["none", "int8", "int4"]}),
    ("group_size", "int4 weights per scale (32, 64 or 128; default 32)", {"min": 1}),
    ("max_steps", "optimizer steps (default: --epochs over the data)", {"min": 1}),
    ("epochs", "passes over the training conversations (default: 3, and at least 10 steps)"),
    ("lr", "learning rate (default: 1e-3 with --lora, 2e-5 otherwise)"),
    ("batch_size", "packed rows per step (at most the training rows there are)", {"min": 1}),
    ("micro_batch", "rows per forward and backward (gradients accumulate over the step's rows; "
     "activation memory grows with it)", {"min": 1}),
    ("seq_len", "tokens per packed row (default: 512, or the model's context if shorter)", {"min": 1}),
    ("val_fraction", "the share of conversations held out for the validation loss"),
    ("eval_every", "steps between validation losses (default: once an epoch, at most 50 steps apart)", {"min": 1}),
    ("patience", "stop after this many validation losses without a new best, keeping the best weights "
     "(0: never stop early)", {"min": 0}),
    ("log_every", "steps between log lines", {"min": 1}),
    ("save_every", "steps between checkpoints (for --resume)", {"min": 1}),
    ("warmup", "steps of linear learning-rate warmup (default: 10, or a tenth of a shorter run)", {"min": 0}),
    ("gradient_checkpointing", "recompute each block in backward: a third more compute, activations of one "
     "block instead of all (default: on with --lora)"),
    ("replay", "general requests the model answers itself before training, trained on beside --data so the "
     "update does not erase what it knew (0: off)", {"min": 0}),
    ("seed", "seed of the adapters' initialization and of the batch order"),
]


def finetune_flags(p) -> None:
    from ..finetune.sft import FinetuneConfig
    add_flags(p, FinetuneConfig, FINETUNE)
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last checkpoint (after a crash or kill)")
    again.add_argument("--overwrite", action="store_true", help="replace a run already in --out")


def finetune(a) -> None:
    from ..finetune.sft import FinetuneConfig
    from ..finetune.sft import finetune as run
    from ..files import output_folder
    from ..footprint import track
    targets = [t for arg in a.target_modules for t in arg.split(",") if t]
    c = FinetuneConfig(**{**values(a, FINETUNE), "target_modules": targets})
    output_folder(a.out)  # said about --out itself, before the receipt inside it is checked
    # the run counts the tokens and FLOPs it computes into the receipt, and adds this session to
    # the earlier ones' when it resumes
    with track("finetune", path=os.path.join(a.out, "receipt.json")) as receipt:
        r = run(c, resume=a.resume, overwrite=a.overwrite, receipt=receipt)
    val = f"; validation loss {r['first_val_loss']:.4f} -> {r['val_loss']:.4f}" if r["val_loss"] is not None else ""
    what = "adapter (adapter_model.safetensors, adapter_config.json)" if a.lora else "model"
    print(f"fine-tuned {r['steps']} steps on {r['train_conversations']} conversations "
          f"({r['trainable_params']:,} of {r['total_params']:,} parameters trained){val}; {what} in {a.out}")


def data_distill_flags(p) -> None:
    from ..runtime.sampling import Sampling
    p.add_argument("--teacher", default="smollm2-135m-instruct",
                   help="model folder/.gguf file, a name `slm models` lists, or a server URL (http://host:port) "
                        "(default: smollm2-135m-instruct)")
    p.add_argument("--prompts", required=True, help="'builtin', a .jsonl (prompt/question per line) or a .txt file")
    p.add_argument("--out", required=True, help=".jsonl; an existing one is resumed")
    p.add_argument("--strategy", default="step-by-step",
                   choices=["step-by-step", "direct", "explain", "recall-then-answer"],
                   help="how the teacher is asked to answer (Orca 2's strategies)")
    p.add_argument("--max-tokens", type=at_least(1), default=256, help="tokens per reply at most")
    add_flags(p, Sampling, [("temperature", "the teacher's sampling temperature (0: greedy)")])
    p.add_argument("--model", default=None, help="model name at the server (default: the first it lists)")
    p.add_argument("--api-key", default=None, help="default: $OPENAI_API_KEY or $SLM_API_KEY")
    p.add_argument("--n-prompts", type=at_least(1), default=500, help="questions in the builtin set")
    p.add_argument("--limit", type=at_least(1), default=None, help="stop after this many new records (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the builtin questions")
    quantize_options(p, group=False)


def data_distill(a) -> None:
    from ..finetune.distill import check_options, distill, make_teacher, read_prompts
    check_options(a.out, a.strategy, a.max_tokens, a.temperature, a.limit)  # before the teacher is loaded
    items = read_prompts(a.prompts, a.n_prompts, a.seed)
    teacher = make_teacher(a.teacher, a.model, a.api_key, a.quantize)
    s = distill(teacher, items, a.out, a.strategy, a.max_tokens, a.temperature, a.limit)
    checked = f"; teacher correct on {s['correct']}/{s['checked']} checkable" if s["checked"] else ""
    print(f"wrote {s['written']} records to {a.out} ({s['already_done']} already there, "
          f"{s['duplicates']} duplicate prompts skipped, {s['empty']} empty replies){checked}")
