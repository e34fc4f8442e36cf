"""GPU training's Triton parts (kernels/cross_entropy.py, glu.py, rope.py), chosen by
kernels/triton_launch.py's switches: the loss over the logits (`ce`, on by default), the LM head
fused into it (`linear_ce`), and modules that `slm.accel.accelerate_training` swaps in for the
reference ones: MLP with SwiGLU/GeGLU (`glu`) and Attention with the rotary embedding and the Q/K/V
split (`rope`) in one kernel each way. SLM_TRITON=linear_ce,glu,rope turns on the parts that are
off until a GPU measurement makes them the default; SLM_NO_TRITON=1 turns every part off.
tests/kernels/test_cross_entropy_triton.py holds each to PyTorch and a whole model's loss and gradients to
the reference model's. Importing this module imports Triton.
"""

from __future__ import annotations

import torch

from .. import model as reference
from ..kernels import cross_entropy, glu, rope
from ..kernels.triton_launch import available


class MLP(reference.MLP):
    def glu(self, h: torch.Tensor) -> torch.Tensor:
        return glu.glu(h, self.act != "swiglu")


class Attention(reference.Attention):
    def rotated_qkv(self, x, cos, sin):
        q, k, v = rope.rope_qkv(self.qkv_proj(x), cos, sin, self.n_heads, self.n_kv)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def module_parts(device: torch.device) -> list[str]:
    """The module parts (glu, rope) that run in Triton on `device`."""
    return [part for part in ("glu", "rope") if available(device, part)]


def classes(model, parts) -> dict:
    """reference class -> Triton class for `parts` (glu, rope; rope where it supports the model's
    rotation: full, no QK-norm, a power-of-two head)."""
    out = {}
    if "glu" in parts:
        out[reference.MLP] = MLP
    if "rope" in parts and rope.supports(model.config):
        out[reference.Attention] = Attention
    return out


def losses(device: torch.device, fsdp: bool = False) -> tuple:
    """(cross_entropy(logits, targets) or None for F.cross_entropy over an fp32 copy, head_loss(hidden,
    head weight, targets) or None) on `device`. Not the fused head under FSDP, which re-shards the
    head after forward."""
    ce = cross_entropy.cross_entropy if available(device, "ce") else None  # reads the bf16 logits in place
    head = cross_entropy.linear_cross_entropy if available(device, "linear_ce") and not fsdp else None
    return ce, head
