"""`slm <command>`: the command table. Each command is a thin call into one module of slm, and
lives in a module of this package by verb group (run, chat, train, serve, model_tools, measure,
finetune), as two functions: `<name>_flags(parser)` adds its flags and `<name>(args)` runs it,
name being the command's words joined by "_" (`data prepare`: data_prepare)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .flags import HelpFormatter, Parser

# words: (module, help)
COMMANDS = {
    "generate": ("run", "continue a prompt, streaming the text"),
    "chat": ("chat", "interactive chat through the model's chat template"),
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
    "models": ("run", "the models slm knows by name: installed or not, size, licence, where"),
}
GROUPS = {"tokenizer": "tokenizers: train", "data": "training data: synth, prepare, scrub, distill",
          "lora": "LoRA adapters: merge"}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command; given argv, only the command that argv names gets its flags.
    Building a command's flags imports its module and config dataclass, and running it imports the
    rest inside the command's function: these lazy imports keep `slm --help` fast."""
    ap = Parser(prog="slm", description="Small language models on one ordinary machine.")
    ap.add_argument("--version", action="version", version=f"slm {version()}", help="print slm's version and exit")
    ap.verb_parsers = {}  # "data synth" -> its parser, for errors found after parsing
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
        ap.verb_parsers[words] = p
        if argv is None or argv[:len(path)] == path:
            mod = importlib.import_module(f".{module}", __name__)
            name = "_".join(path)
            getattr(mod, f"{name}_flags")(p)
            p.set_defaults(func=getattr(mod, name))
    return ap


def version() -> str:
    """The installed package's version (without importing slm, which imports torch)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed
    try:
        return installed("slm")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from .. import __version__
        return __version__


# slm makes no network calls; these keep the libraries it may import (huggingface_hub, transformers,
# datasets) from trying any: no downloads, no telemetry, no update checks (tests/properties/test_offline.py).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "DO_NOT_TRACK": "1",
               "OTEL_SDK_DISABLED": "true"}  # FastAPI's tracing hooks: never export


# What a user's input can cause, each said as one line. CheckpointError, ConfigError and DataError
# are ValueErrors; OSError covers missing files, folders where files go, full disks, ports in use.
USER_ERRORS = (ValueError, OSError, UnicodeError, RecursionError, MemoryError, OverflowError)


def describe(e: BaseException) -> str:
    """One line for an exception: its message, or for an unexpected kind, that it is a bug."""
    if isinstance(e, MemoryError):
        text = f"out of memory{': ' + str(e) if str(e) else ''} (try a smaller batch, context or model)"
    elif isinstance(e, RecursionError):
        text = f"input nested too deeply to process ({e})"
    elif isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    elif isinstance(e, USER_ERRORS):
        text = str(e) or type(e).__name__
    else:
        text = (f"internal error {type(e).__name__}: {e} -- a bug in slm; "
                f"SLM_DEBUG=1 shows the traceback")
    return " ".join(text.split())


def verb_of(args: argparse.Namespace) -> str:
    """The command's words: "train", "data synth"."""
    sub = getattr(args, f"{args.command}_command", None)
    return f"{args.command} {sub}" if sub else args.command


def main(argv: list[str] | None = None) -> None:
    """Run one command. Whatever goes wrong ends in one line on stderr, `slm VERB: error: ...`,
    and exit code 1 (2 for a usage error); SLM_DEBUG=1 lets the traceback through."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the verb's own parser, so that the line names the verb
        parser.verb_parsers[verb_of(args)].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        args.func(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as e:
        if os.environ.get("SLM_DEBUG", "") not in ("", "0"):
            raise
        print(f"slm {verb_of(args)}: error: {describe(e)}", file=sys.stderr)
        sys.exit(1)
