"""Every setting that comes from the environment, in one place.

    SLM_CACHE        root of slm's cache (default ~/.cache/slm): compiled kernels, the assembled
                     default model, the CPU's measured peak, footprint receipts
    SLM_RECEIPTS     folder for footprint receipts (default $SLM_CACHE/receipts)
    SLM_NO_KERNELS   1: never build or use the C++ CPU kernels (pure PyTorch paths)
    SLM_NO_DECODER   1: keep the module path instead of the whole-step C++ decoder
    SLM_NO_TRITON    1: no Triton kernels on a GPU
    SLM_TRITON       comma-separated Triton parts to turn on beyond the defaults (linear_ce, glu, rope)
    SLM_PUE, SLM_GRID_G_PER_KWH, SLM_PRICE_PER_HOUR, SLM_CPU_WATTS_PER_CORE, SLM_RAPL_ROOT: the
                     footprint's rates and meters (slm.footprint)

This module imports nothing from slm, so every layer may read it.
"""

from __future__ import annotations

import os


def cache_dir(*parts: str) -> str:
    """$SLM_CACHE (default ~/.cache/slm), joined with parts."""
    root = os.environ.get("SLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "slm")
    return os.path.join(root, *parts)


def switch(name: str) -> bool:
    """An on/off environment switch: set to anything but '' or '0' means on."""
    return os.environ.get(name, "") not in ("", "0")


def env_list(name: str) -> list[str]:
    """A comma-separated environment variable as a list (empty when unset)."""
    return [s for s in os.environ.get(name, "").split(",") if s]


def env_float(name: str, default):
    """A number from the environment, default when unset or empty; a clear error otherwise."""
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return float(v)
    except ValueError:
        raise ValueError(f"${name} must be a number, got {v!r}") from None
