"""`slm <command>`: the command table. Each command is a thin call into one module of slm, and
lives in a module of this package by verb group (run, train, serve, model_tools, measure,
finetune), as two functions: `<name>_flags(parser)` adds its flags and `<name>(args)` runs it,
name being the command's words joined by "_" (`data prepare`: data_prepare)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..checkpoint.safetensors_io import CheckpointError
from ..model.config import ConfigError
from .flags import HelpFormatter

# words: (module, help)
COMMANDS = {
    "generate": ("run", "continue a prompt, streaming the text"),
    "chat": ("run", "interactive chat through the model's chat template"),
    "train": ("train", "train a model from scratch (synthesizes data when none is given)"),
    "tokenizer train": ("train", "train a byte-level BPE tokenizer that transformers loads"),
    "data synth": ("train", "built-in synthetic stories and textbook exercises"),
    "data prepare": ("train", "tokenize text into token shards for training"),
    "data scrub": ("train", "redact PII and secrets in .txt/.jsonl files: [EMAIL], [PHONE], [CARD], ..."),
    "data distill": ("finetune", "training data from a teacher model or OpenAI-compatible server (Orca 2 style)"),
    "serve": ("serve", "OpenAI-compatible API and a chat page on this machine (127.0.0.1)"),
    "quantize": ("model_tools", "save a weight-only int8/int4 copy of a model folder (slm.load reads it)"),
    "export": ("model_tools", "write a model as GGUF (llama.cpp, Ollama) or as a Hugging Face folder"),
    "bench": ("measure", "resident memory and decode tokens/s of a registry architecture"),
    "cost": ("measure", "forecast a training run's GPU-hours, energy, CO2 and money; compare receipts"),
    "eval": ("measure", "perplexity of a text, or multiple-choice accuracy scored as lm-evaluation-harness does"),
    "explain": ("measure", "HTML report: attention heatmaps, logit lens, attribution of the next token"),
    "finetune": ("finetune", "supervised fine-tuning on chat data: full, LoRA, or LoRA over int8/int4"),
    "lora merge": ("model_tools", "write base + adapter as one Hugging Face model folder"),
    "info": ("run", "parameters, shape and memory of a model or preset"),
}
GROUPS = {"tokenizer": "tokenizers: train", "data": "training data: synth, prepare, scrub, distill",
          "lora": "LoRA adapters: merge"}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command; given argv, only the command that argv names gets its flags.
    Building a command's flags imports its module and config dataclass, and running it imports the
    rest inside the command's function: these lazy imports keep `slm --help` fast."""
    ap = argparse.ArgumentParser(prog="slm", description="Small language models on one ordinary machine.")
    sub = ap.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for words, (module, help) in COMMANDS.items():
        path = words.split()
        parent = sub
        if len(path) == 2:
            if path[0] not in groups:
                g = sub.add_parser(path[0], help=GROUPS[path[0]])
                groups[path[0]] = g.add_subparsers(dest=f"{path[0]}_command", required=True)
            parent = groups[path[0]]
        p = parent.add_parser(path[-1], help=help, description=help, formatter_class=HelpFormatter)
        if argv is None or argv[:len(path)] == path:
            mod = importlib.import_module(f".{module}", __name__)
            name = "_".join(path)
            getattr(mod, f"{name}_flags")(p)
            p.set_defaults(func=getattr(mod, name))
    return ap


# slm makes no network calls; these keep the libraries it may import (huggingface_hub, transformers,
# datasets) from trying any: no downloads, no telemetry, no update checks (tests/properties/test_offline.py).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "DO_NOT_TRACK": "1",
               "OTEL_SDK_DISABLED": "true"}  # FastAPI's tracing hooks: never export


def main(argv: list[str] | None = None) -> None:
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        args.func(args)
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError) as e:  # DataError is a ValueError
        print(f"slm {args.command}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
