"""Accelerators that sit beside the reference model (`slm.model`) and are swapped in for it:

    cpu_decode  CPU decoding's fused kernels (norms, one-row products, attention steps, GeGLU)
    decoder     a whole batch-1 decoding step in one C++ call, behind the model's forward
    cpu_train   the CPU training step's kernels with autograd (GLU, rotation, RMSNorm, attention)
    gpu_train   GPU training's Triton parts (GLU, rotation, the loss)

They are swapped in as quantized layers are, by module substitution: a module's class becomes an
accelerated subclass of it (the same parameters and state dict) whose forward calls its kernel
where that applies and the reference forward everywhere else. `accelerate` installs the decoding
ones (slm.load calls it), `accelerate_training` the training ones (train/loop.py's loss_function),
`unaccelerate` puts the reference classes back. Each accelerator is held equal to the reference
model by a test (tests/accel/: test_accel.py, test_decoder.py, test_cpu_train_kernels.py;
tests/kernels/test_cross_entropy_triton.py, tests/quant/test_gguf_blocks.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from ..model import Transformer
from . import cpu_decode, cpu_train, decoder

__all__ = ["accelerate", "accelerate_training", "accelerated", "unaccelerate", "swap"]


def swap(modules: Iterable[nn.Module], classes: dict) -> None:
    """Give each module whose class is a key of `classes` the class it maps to, in place."""
    for m in modules:
        new = classes.get(type(m))
        if new is not None:
            m.__class__ = new


def accelerate(model: Transformer) -> Transformer:
    """Swap the decoding accelerators into `model`, in place, and return it: the CPU fusions on its
    norms, the blocks' projections, attention, MLPs and blocks, and the whole-step decoder behind
    its forward. Each decides per call whether it applies (fp32 on the CPU, no autograd, ...), so
    a model on another device or dtype computes as the reference does. Calling it again is harmless."""
    swap(model.modules(), cpu_decode.CLASSES)
    swap((m for block in model.blocks for m in block.modules()), {nn.Linear: cpu_decode.Linear})
    swap([model], {Transformer: decoder.Transformer})
    return model


def accelerate_training(model: Transformer, device: torch.device) -> Transformer:
    """Swap the training accelerators for `device` into `model`, in place, and return it. On the
    CPU: the decoding ones (whose norms run cpu_train's kernel with autograd) with C++ GLU, rotation
    and causal attention (cpu_train). On a GPU: the Triton GLU and rotation where
    kernels/triton_launch.py turns them on (gpu_train; the loss's parts: gpu_train.losses)."""
    if device.type == "cpu":
        accelerate(model)
        swap(model.modules(), {cpu_decode.Attention: cpu_train.Attention, cpu_decode.MLP: cpu_train.MLP})
    elif device.type == "cuda":
        from . import gpu_train  # imports Triton: not on the CPU's start-up path
        swap(model.modules(), gpu_train.classes(model, gpu_train.module_parts(device)))
    return model


def _accelerator(cls: type) -> bool:
    return cls.__module__.startswith(__name__ + ".")


def accelerated(model: nn.Module) -> bool:
    """Whether any module of model runs an accelerator."""
    return any(_accelerator(type(m)) for m in model.modules())


def unaccelerate(model: nn.Module) -> nn.Module:
    """Put back, in place, the reference class of every accelerated module of model (and drop its
    decoder): the pure reference model. Returns model."""
    for m in model.modules():
        if _accelerator(type(m)):
            m.__class__ = next(c for c in type(m).__mro__ if not _accelerator(c))
    decoder.forget(model)
    return model
