"""Weight-only int8 quantization for CPU decoding.

At batch 1 a decode step reads every weight once, so its speed is set by the bytes of weights:
int8 weights with one fp32 scale per 32 (1.125 bytes a weight, GGUF's Q8_0) read 3.6 times fewer
bytes than fp32. Activations stay in floating point.

    from slm.quantize import quantize_model
    quantize_model(lm.model)          # every nn.Linear with in_features % 32 == 0, LM head included

`Int8Linear` runs the AVX2 kernel of `slm/kernels/q8.cpp` (compiled on first use) on the CPU, and
a dequantize-then-matmul PyTorch path elsewhere: on other devices, when the kernel cannot be
built, or when the input requires grad.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels

QK = 32  # input weights per scale
# Rows of x up to which the kernel streams the int8 weights; above: dequantize + ATen GEMM. The
# streaming kernel runs at ~80 GFLOP/s on 2 cores, as fast as this CPU's fp32 GEMM up to ~64 rows.
MAX_DIRECT = 64
_CHUNK = 8192  # weight rows quantized / dequantized at a time, to bound temporary memory


@torch.no_grad()
def quantize_q8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] (any float dtype, any strides; K % 32 == 0) -> (q int8 [N, K], scales fp32
    [N, K/32]) with scale = absmax(block) / 127 and q = round(w / scale)."""
    N, K = weight.shape
    if K % QK:
        raise ValueError(f"in_features must be a multiple of {QK}, got {K}")
    q = torch.empty(N, K, dtype=torch.int8, device=weight.device)
    scales = torch.empty(N, K // QK, dtype=torch.float32, device=weight.device)
    for r0 in range(0, N, _CHUNK):
        w = weight[r0:r0 + _CHUNK].to(torch.float32).reshape(-1, K // QK, QK)
        s = w.abs().amax(-1) / 127.0
        inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))  # an all-zero block: scale 0, q 0
        q[r0:r0 + _CHUNK] = (w * inv[..., None]).round_().clamp_(-127, 127).to(torch.int8).view(-1, K)
        scales[r0:r0 + _CHUNK] = s
    return q, scales


def dequantize_q8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 [N, K] weights from int8 [N, K] and scales [N, K/32]."""
    N, K = q.shape
    return (q.view(N, K // QK, QK).to(torch.float32) * scales.to(torch.float32)[..., None]).view(N, K)


def q8_linear_reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """The PyTorch path: x [..., K] -> [..., N] in fp32, dequantizing a few MB of rows at a time."""
    x = x.to(torch.float32)
    b = bias.to(torch.float32) if bias is not None else None
    N = q.shape[0]
    if N <= _CHUNK:
        return F.linear(x, dequantize_q8(q, scales), b)
    return torch.cat([F.linear(x, dequantize_q8(q[r:r + _CHUNK], scales[r:r + _CHUNK]),
                               None if b is None else b[r:r + _CHUNK]) for r in range(0, N, _CHUNK)], -1)


class Int8Linear(nn.Module):
    """y = x W^T + b with W held as int8 `qweight` [out, in] and fp32 `scales` [out, in/32].

    Inference only: gradients flow to x (through the PyTorch path), never to the weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        if in_features % QK:
            raise ValueError(f"in_features must be a multiple of {QK}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        # uninitialised, as nn.Linear's weight before reset_parameters: filled by from_linear or load_state_dict
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, in_features // QK, dtype=torch.float32, device=device))
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device),
                                                     requires_grad=False) if bias else None)
        kernels.q8_linear_op()  # builds the kernel now, not in the middle of the first forward

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=w.device,
                bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32)
        m.qweight, m.scales = quantize_q8(w)
        if linear.bias is not None:
            m.bias.copy_(linear.bias)
        return m

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [out, in] that this layer multiplies by."""
        return dequantize_q8(self.qweight, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the dicts, not nn.Module.__getattr__: this runs ~100 times a token
        op, buffers, bias = kernels.q8_linear_op(), self._buffers, self._parameters["bias"]
        qweight, scales = buffers["qweight"], buffers["scales"]
        if scales.dtype != torch.float32:  # after model.to(some dtype)
            scales = scales.float()
        if op is not None and x.is_cpu and not x.requires_grad:
            return op(x, qweight, scales, bias, MAX_DIRECT)  # any leading dims, out in x.dtype
        return q8_linear_reference(x, qweight, scales, bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, int8 + fp32 scale per {QK}")


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str = "int8", skip: Iterable[str] = ()) -> nn.Module:
    """Replace, in place, every nn.Linear whose in_features is a multiple of 32 by an Int8Linear,
    one layer at a time so the fp32 weights are freed as it goes. A tied LM head is quantized too:
    only the `lm_head` module is replaced, `embed` keeps the fp32 table for the lookup.

    skip: module names (`lm_head`), prefixes (`blocks.0`) or fnmatch patterns (`*.down_proj`)
    to leave in floating point. Returns the model."""
    if mode != "int8":
        raise ValueError(f"unknown quantization mode {mode!r}; supported: 'int8'")
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]  # names only: no references kept
    for name in names:
        if _matches(name, skip):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, attr)
        if linear.in_features % QK:
            continue
        setattr(parent, attr, Int8Linear.from_linear(linear))
        del linear  # the last reference to an untied weight: freed here
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (a tied tensor counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device, t.data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
