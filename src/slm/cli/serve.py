"""slm serve: the OpenAI-compatible API and chat page."""

from __future__ import annotations

import argparse
import os

from .flags import add_flags, check_load_flags, finite_float, load_flags, model_flag, receipt_flag, values


def port_number(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0 to 65535 (0: any free one), got {text}")
    return port


port_number.__name__ = "port number"


def seconds(text: str) -> float:
    x = finite_float(text)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return x


seconds.__name__ = "number of seconds"


def lora_pair(text: str) -> tuple[str, str]:
    name, eq, folder = text.partition("=")
    if not eq or not name.strip() or not folder or "/" in name:
        raise argparse.ArgumentTypeError(f"give NAME=DIR (a name without '/', then the adapter's folder), got {text!r}")
    return name.strip(), folder


lora_pair.__name__ = "NAME=DIR"

# The flags of serve.app.ServeConfig (defaults from there).
SERVE = [
    ("host", "the address to listen on; a non-loopback one needs --api-key"),
    ("port", "the TCP port (0: any free one, which the first line printed names)", {"type": port_number}),
    ("api_key", "require 'Authorization: Bearer KEY' (default: $SLM_API_KEY, else none)"),
    ("name", "the model id clients send (default: the folder's or file's name)", {"flag": "--served-model-name"}),
    ("max_batch", "sequences decoded together (KV cache rows; their memory is checked at start)", {"min": 1}),
    ("context", "tokens per sequence (capped by the model's)", {"min": 1}),
    ("prefill_chunk", "most prompt tokens per prefill step; while others decode, a chunk is sized to cost about "
                      "half a decode step", {"min": 1}),
    ("timeout", "seconds a client may take to send a request's head, or its body, or stay idle between requests",
     {"type": seconds}),
    ("prefix_cache_mb", "MiB of finished conversations' keys and values kept for prompts that start with one "
                        "(a chat's next turn, a shared system prompt); 0: none", {"min": 0}),
    ("log_prompts", "log prompts and outputs, not only token counts"),
]


def serve_flags(p) -> None:
    try:
        from ..serve.app import ServeConfig
    except ImportError as e:
        p.error(f"serving needs FastAPI and uvicorn ({e}): pip install 'slm[serve]'")
    model_flag(p, default="smollm2-135m-instruct")  # a chat model: what clients of a server ask for
    add_flags(p, ServeConfig, SERVE)
    p.add_argument("--lora", action="append", type=lora_pair, default=[], metavar="NAME=DIR",
                   help="serve a LoRA adapter (a PEFT folder, as slm finetune writes) as model NAME beside the base "
                        "model; requests choose by their model field and decode in the same batch (repeatable)")
    load_flags(p)
    receipt_flag(p, " when the server stops")


def serve(a) -> None:
    import signal

    from ..footprint import track
    from ..serve.app import ServeConfig, run

    names = [n for n, _ in a.lora]
    if len(set(names)) < len(names):
        raise ValueError(f"--lora: the name {next(n for n in names if names.count(n) > 1)!r} is given twice")
    c = ServeConfig(**{**values(a, SERVE), "api_key": a.api_key or os.environ.get("SLM_API_KEY"), "lora": dict(a.lora)})
    check_load_flags(a)

    def stop(signum, frame):  # uvicorn shuts down gracefully, then re-raises SIGTERM here
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, stop)
    with track("serve", path=a.receipt, device=a.device) as receipt:  # written when the server stops
        run(a.model, c, dtype=a.dtype, device=a.device, quantize=a.quantize, group_size=a.group_size,
            tokenizer=a.tokenizer, on_load=receipt.watch, footprint=receipt)
