"""slm serve: the OpenAI-compatible API and chat page."""

from __future__ import annotations

import os

from .flags import add_flags, load_flags, model_flag, receipt_flag, values

# The flags of serve.app.ServeConfig (defaults from there).
SERVE = [
    ("host", "the address to listen on; a non-loopback one needs --api-key"),
    ("port", "the TCP port"),
    ("api_key", "require 'Authorization: Bearer KEY' (default: $SLM_API_KEY, else none)"),
    ("name", "the model id clients send (default: the folder's or file's name)", {"flag": "--served-model-name"}),
    ("max_batch", "sequences decoded together (KV cache rows)"),
    ("context", "tokens per sequence (capped by the model's)"),
    ("log_prompts", "log prompts and outputs, not only token counts"),
]


def serve_flags(p) -> None:
    try:
        from ..serve.app import ServeConfig
    except ImportError as e:
        p.error(f"serving needs FastAPI and uvicorn ({e}): pip install 'slm[serve]'")
    model_flag(p)
    add_flags(p, ServeConfig, SERVE)
    load_flags(p)
    receipt_flag(p, " when the server stops")


def serve(a) -> None:
    import signal

    from ..footprint import track
    from ..serve.app import ServeConfig, run

    def stop(signum, frame):  # uvicorn shuts down gracefully, then re-raises SIGTERM here
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, stop)
    c = ServeConfig(**{**values(a, SERVE), "api_key": a.api_key or os.environ.get("SLM_API_KEY")})
    with track("serve", path=a.receipt, device=a.device) as receipt:  # written when the server stops
        run(a.model, c, dtype=a.dtype, device=a.device, quantize=a.quantize, group_size=a.group_size,
            on_load=receipt.watch)
