"""Flags taken from the config dataclasses (and signatures), so that each default lives once.

A verb module lists, next to its command, one row per flag: (field, help) or (field, help,
argparse options). `add_flags` adds `--field-name` with the default of that field of the
dataclass (or parameter of the function), and --help shows it (`HelpFormatter`); `values` reads the
fields back out of the parsed arguments, to build the dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import sys
import types
import typing


def finite_float(text: str) -> float:
    """A float flag's value: NaN and infinity are refused (no flag of slm means them)."""
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(text)
    return x


finite_float.__name__ = "finite number"  # argparse says "invalid finite number value: 'nan'"


def at_least(low: float, kind=int):
    """A type for argparse: a number of `kind` that is >= low."""
    def parse(text: str):
        x = finite_float(text) if kind is float else kind(text)
        if x < low:
            raise argparse.ArgumentTypeError(f"must be at least {low:g}, got {text}")
        return x
    parse.__name__ = f"{kind.__name__} >= {low:g}"
    return parse


class Parser(argparse.ArgumentParser):
    """argparse, with the conventions of every slm command: a float flag is finite, and a usage
    error is one line, `slm VERB: error: ...` (exit code 2), instead of the usage block."""

    def add_argument(self, *args, **kwargs):
        if kwargs.get("type") is float:
            kwargs["type"] = finite_float
        return super().add_argument(*args, **kwargs)

    def error(self, message: str):
        message = " ".join(message.split())
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to each flag's help, except where X is None or False (the help says
    what that means) and where the help already names the default."""

    def _get_help_string(self, action):
        help = action.help or ""
        if action.default is None or action.default is False or action.default == [] or "default" in help:
            return help
        return super()._get_help_string(action)


def defaults(source) -> dict[str, object]:
    """name -> default, of a dataclass's fields or a function's parameters (required ones absent)."""
    if dataclasses.is_dataclass(source):
        out = {}
        for f in dataclasses.fields(source):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out
    return {k: p.default for k, p in inspect.signature(source).parameters.items() if p.default is not p.empty}


def _value_type(t):
    """int | None -> int, list[str] -> str, bool -> bool."""
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return _value_type(next(a for a in typing.get_args(t) if a is not type(None)))
    if typing.get_origin(t) is list:
        return typing.get_args(t)[0]
    return t


def add_flags(p: argparse.ArgumentParser, source, table: list[tuple]) -> None:
    """One flag per row (name, help[, argparse options]) of table, named --name-with-dashes unless
    the options give "flag", typed and defaulted after `source` (a dataclass or a function); a
    field without a default is a required flag, a bool one a switch."""
    given = defaults(source)
    hints = typing.get_type_hints(source)
    for name, help, *rest in table:
        opts = dict(rest[0]) if rest else {}
        flag = opts.pop("flag", "--" + name.replace("_", "-"))
        kind = _value_type(hints[name])
        if "min" in opts:  # {"min": 1}: the value must be at least this
            opts["type"] = at_least(opts.pop("min"), kind)
        if name not in given:
            opts.setdefault("required", True)
        elif kind is bool:
            opts.setdefault("action", "store_true" if given[name] is False else argparse.BooleanOptionalAction)
        if opts.get("action") not in ("store_true", "store_false"):
            opts.setdefault("type", kind)
        p.add_argument(flag, dest=name, default=given.get(name), help=help, **opts)


def values(a: argparse.Namespace, table: list[tuple]) -> dict[str, object]:
    """The table's fields, read back out of the parsed arguments."""
    return {row[0]: getattr(a, row[0]) for row in table}


# -- flags that many commands share --------------------------------------------------------------
MODEL_HELP = "Hugging Face model folder or .gguf file"


def model_flag(p: argparse.ArgumentParser, required: bool = False, help: str | None = None,
               default: str = "gemma-3-270m") -> None:
    """--model: a path, or the name of a model `slm models` lists (runtime/models.py), by default
    the base model; commands that chat default to the instruction-tuned one."""
    p.add_argument("--model", required=required, default=None if required else default,
                   help=help or MODEL_HELP + ", or a name `slm models` lists" + ("" if required else f" (default: {default})"))


def load_flags(p: argparse.ArgumentParser) -> None:
    """How `slm.load` places the model: --dtype, --device, --quantize, --group-size, --tokenizer."""
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16", "float32", "bfloat16", "float16"],
                   metavar="DTYPE", help="fp32 | bf16 | fp16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--device", default=None, help="where the model runs: cpu, cuda, cuda:1, ... (default: cpu)")
    quantize_options(p)
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="a folder with a tokenizer.json to use instead of the model's own tokenizer "
                        "(e.g. for a GGUF file whose tokenizer.ggml.pre slm does not know)")


def check_load_flags(a: argparse.Namespace) -> None:
    """--dtype and --device (of load_flags), checked before anything is loaded or tracked."""
    from ..runtime.lm import check_device, check_dtype
    check_dtype(a.dtype)
    check_device(a.device)


def quantize_options(p: argparse.ArgumentParser, group: bool = True) -> None:
    p.add_argument("--quantize", default=None, choices=["int8", "int4", "none"],
                   help="quantize the linear layers while loading: int8 (one scale per output channel, ~4x fewer "
                        "bytes per token than fp32) or int4 (groups of --group-size, ~6.4x fewer); none: a GGUF "
                        "file's weights dequantized (default: a GGUF file runs in its own blocks, as llama.cpp; "
                        "other models in their dtype)")
    if group:
        p.add_argument("--group-size", type=at_least(1), default=None,
                       help="weights per scale (int4: 32, 64 or 128; default 32)")


def receipt_flag(p: argparse.ArgumentParser, when: str = "") -> None:
    p.add_argument("--receipt", default=None, help=f"where to write the receipt JSON{when} "
                                                   "(default: ~/.cache/slm/receipts/)")
