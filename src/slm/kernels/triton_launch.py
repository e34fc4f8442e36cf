"""What the Triton kernels (cross_entropy.py, glu.py, rope.py) share: whether they run, and how they launch.

They are for training on a GPU. On a machine without one the same kernels run under Triton's
interpreter (TRITON_INTERPRET=1, chosen before Triton is imported), which is how the tests check
them against PyTorch.

Parts: `ce` (the cross-entropy over the logits; on by default: measured on an H200), and off until
a GPU session measures them: `linear_ce` (the head fused into the cross-entropy), `glu`
(SwiGLU/GeGLU) and `rope` (rotary embedding with the Q/K/V split). `SLM_TRITON=linear_ce,glu,rope`
turns those on. `SLM_NO_TRITON=1` turns every part off.
"""

from __future__ import annotations

import os

import torch

from ..settings import env_list, switch

try:
    import triton
    from torch.library import wrap_triton
except ImportError:  # no Triton (CPU builds of torch): callers use PyTorch
    triton = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


DEFAULT = ("ce",)


def available(device: torch.device, part: str) -> bool:
    """Whether the Triton kernels of `part` run for tensors on `device`: a GPU, Triton installed,
    not SLM_NO_TRITON=1, and `part` on by default or named in SLM_TRITON."""
    if triton is None or device.type != "cuda" or switch("SLM_NO_TRITON"):
        return False
    return part in DEFAULT or part in env_list("SLM_TRITON")


def launch(tuned, plain, grid, args, **interpreted) -> None:
    """Run `tuned` (the autotuned kernel) on a GPU; under the interpreter run `plain` with the
    meta-parameters `interpreted` (small blocks: the tests' shapes are small)."""
    if interpreting():
        wrap_triton(plain)[grid](*args, **interpreted)
    else:
        wrap_triton(tuned)[grid](*args)
