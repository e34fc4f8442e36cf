"""Linear layers that keep a GGUF file's quantized tensors in the file's own block formats.

`slm.load("model.gguf")` (and with quantize="int8"|"int4") keeps every tensor stored in one of the
formats below byte for byte (`GGUFLinear`), and runs it with slm's kernels
(`torch.ops.slm_cpu.linear_gguf`), instead of dequantizing it to fp32 (and requantizing it): the
weights are then exactly the file's, and as many bytes as llama.cpp reads. Tensors in other formats
(F32, F16, BF16, Q2_K, Q3_K, IQ* ...) stay in fp32 by default, or are quantized by slm under
quantize="int8"|"int4" as for any checkpoint.

    block            weights  bytes  bytes/weight   w
    Q8_0 (type 8)       32      34     1.0625      d * q,                 q int8
    Q4_0 (type 2)       32      18     0.5625      d * (q - 8),           q 4 bits
    Q4_1 (type 3)       32      20     0.625       d * q + m,             q 4 bits
    Q5_0 (type 6)       32      22     0.6875      d * (q - 16),          q 5 bits
    Q5_1 (type 7)       32      24     0.75        d * q + m,             q 5 bits
    Q4_K (type 12)     256     144     0.5625      d*sc_j * q - dmin*m_j, q 4 bits, 6-bit sc/m per 32
    Q5_K (type 13)     256     176     0.6875      d*sc_j * q - dmin*m_j, q 5 bits, 6-bit sc/m per 32
    Q6_K (type 14)     256     210     0.8203      d*sc_j * (q - 32),     q 6 bits, int8 sc per 16

A layer may hold parts of different formats stacked by rows (our fused QKV from a file whose V is
Q8_0 and Q, K Q5_0): `qweight` is their bytes end to end, `types` and `part_rows` say how.

The kernel quantizes x to int8 in blocks of 32 (scale amax/127) for up to MAX_DIRECT rows of x, and
the residual the same way (two int8 rows whose sum holds x to ~16 bits: llama.cpp's one int8 row
moves gemma-3-270m's perplexity by ~0.5% from its dequantized weights), and takes integer dot
products with the weights decoded once for both, as llama.cpp does with one (the minimums m of Q4_1, Q5_1 and the K formats
multiply the block's sum of the quantized x); above that it dequantizes and runs an fp32 GEMM. The
PyTorch path (no kernels, other devices, gradients) computes the same: the same int8 x, and the
weights dequantized by `gguf.quants` (llama.cpp's reference in Python). On a CPU with AVX-512 the
kernel takes 8 to 96 rows of x (a server's batched step, a short prompt) another way: each row of
weights dequantized to fp32 in cache and dotted with the unquantized x, 16 weights an FMA, which
there beats both the integer products and the GEMM; those rows are then exact up to the order of
the sums, and the PyTorch path's int8 x is within its usual ~2e-5 of them.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from .. import kernels
from .layers import _CHUNK, MAX_DIRECT, QK, QuantLinear, _InputGrad, _reference

# ggml type id -> (name, weights per block, bytes per block): the formats the kernel runs
BLOCKS = {8: ("Q8_0", 32, 34), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24),
          12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210)}
# Q5_0 with its blocks regrouped by 4, the same bytes (q5_0_regroup): what a layer holds for Q5_0
Q5_0R4 = 1006
_LAYOUTS = {**BLOCKS, Q5_0R4: ("Q5_0", 32, 22)}


def q5_0_regroup(raw: np.ndarray) -> np.ndarray:
    """Q5_0 rows uint8 [n, K/32 * 22] -> the same bytes in slm's order, per group of 4 blocks: the 4
    fp16 scales, a 16-byte plane of the high bits (byte j, bit i: weight j of block i; bit 4 + i:
    weight j + 16 of block i), the 4 blocks' low nibbles as they were. A row's last K/32 % 4 blocks
    stay as they are. The kernel spreads the plane to the weights in 2 instructions a block."""
    n, nb = raw.shape[0], raw.shape[1] // 22
    b = raw.reshape(n, nb, 22)
    G = nb // 4
    g = b[:, :4 * G].reshape(n, G, 4, 22)
    qh = np.ascontiguousarray(g[..., 2:6]).view("<u4")[..., 0]  # [n, G, 4]
    j = np.arange(16, dtype=np.uint32)
    lo = (qh[..., None] >> j) & 1  # [n, G, 4 blocks, 16]
    hi = (qh[..., None] >> (j + 16)) & 1
    shift = np.arange(4, dtype=np.uint32)[:, None]
    plane = ((lo << shift) | (hi << (shift + 4))).sum(2).astype(np.uint8)  # [n, G, 16]
    groups = np.concatenate([g[..., 0:2].reshape(n, G, 8), plane, g[..., 6:22].reshape(n, G, 64)], -1)
    return np.concatenate([groups.reshape(n, -1), b[:, 4 * G:].reshape(n, -1)], 1)


def q5_0_ungroup(raw: np.ndarray) -> np.ndarray:
    """The inverse of q5_0_regroup: Q5_0 rows as ggml lays them out."""
    n, nb = raw.shape[0], raw.shape[1] // 22
    G = nb // 4
    g = raw[:, :88 * G].reshape(n, G, 88)
    plane = g[..., 8:24].astype(np.uint32)  # [n, G, 16]
    j = np.arange(16, dtype=np.uint32)
    i = np.arange(4, dtype=np.uint32)[:, None]
    lo = (plane[:, :, None, :] >> i) & 1  # [n, G, 4, 16]
    hi = (plane[:, :, None, :] >> (i + 4)) & 1
    qh = ((lo << j) | (hi << (j + 16))).sum(-1).astype("<u4")  # [n, G, 4]
    blocks = np.concatenate([g[..., 0:8].reshape(n, G, 4, 2), qh[..., None].view(np.uint8),
                             g[..., 24:88].reshape(n, G, 4, 16)], -1)
    return np.concatenate([blocks.reshape(n, -1), raw[:, 88 * G:]], 1)


def supported(qtype: int, in_features: int) -> bool:
    """Whether a [*, in_features] tensor of ggml type qtype can stay in its blocks."""
    return qtype in BLOCKS and in_features % BLOCKS[qtype][1] == 0


def row_bytes(qtype: int, in_features: int) -> int:
    _, bw, bb = _LAYOUTS[qtype]
    return in_features // bw * bb


def _int8_blocks(x: torch.Tensor, step: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, K] fp32, each block of 32 rounded to int8 steps (round half to even, within -127..127):
    of amax / 127, or of `step` [B, K/32, 1]; returned dequantized, with the steps."""
    B, K = x.shape
    xb = x.reshape(B, K // QK, QK)
    d = xb.abs().amax(-1, keepdim=True) / 127.0 if step is None else step
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return ((xb * inv).round().clamp(-127, 127) * d).reshape(B, K), d


def quantize_x_reference(x: torch.Tensor) -> torch.Tensor:
    """x [B, K] fp32 as the kernel sees it: x in int8 blocks, plus the residual in int8 blocks of
    a 254th of the block's step (~16 bits of x in all), returned dequantized as the sum of the two.
    With SLM_GGUF_X_ROWS=1 (for benchmarks), as the kernel then: x in int8 blocks alone, as
    llama.cpp's activations."""
    q1, d = _int8_blocks(x)
    if os.environ.get("SLM_GGUF_X_ROWS") == "1":
        return q1
    return q1 + _int8_blocks(x - q1, d / 254.0)[0]


def dequantize_blocks(blocks: torch.Tensor, types: tuple[int, ...], part_rows: tuple[int, ...], K: int,
                      ids: torch.Tensor) -> torch.Tensor:
    """fp32 rows [n, K] of the stacked parts for the 1-D row ids."""
    ids = ids.reshape(-1).to(torch.int64)
    if kernels.cpu_ops() is not None and blocks.is_cpu:
        return torch.ops.slm_cpu.dequantize_gguf(blocks, list(types), list(part_rows), K, ids.contiguous())
    N = sum(part_rows)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= N):
        raise IndexError(f"row ids out of range for a table of {N} rows")
    out = torch.empty(ids.numel(), K, dtype=torch.float32)
    start, byte0 = 0, 0
    flat = blocks.cpu().numpy()
    for t, n in zip(types, part_rows):
        rb = row_bytes(t, K)
        sel = ((ids >= start) & (ids < start + n)).nonzero().reshape(-1)
        if sel.numel():
            part = flat[byte0:byte0 + n * rb].reshape(n, rb)
            rows = part[(ids[sel] - start).cpu().numpy()]
            if t == Q5_0R4:
                rows, t = q5_0_ungroup(rows), 6
            out[sel] = torch.from_numpy(np.ascontiguousarray(dequantize(rows, GGMLQuantizationType(t))))
        start, byte0 = start + n, byte0 + n * rb
    return out.to(blocks.device)


def _no_minus_128(p: torch.Tensor) -> torch.Tensor:
    """Q8_0 rows with any weight of -128 set to -127 (a change of one step in that weight). The
    integer kernel multiplies |q| by x with q's sign (vpsignb), and |-128| does not fit an int8.
    ggml's quantizer never writes -128 (it rounds to [-127, 127]); a hand-made file might."""
    q = p.view(p.shape[0], -1, 34)[:, :, 2:]  # after each block's fp16 scale
    bad = q == 0x80
    if not bool(bad.any()):
        return p
    p = p.clone()
    p.view(p.shape[0], -1, 34)[:, :, 2:][bad] = 0x81
    return p


class GGUFLinear(QuantLinear):
    """y = x W^T + b with W in a GGUF file's blocks: `qweight` uint8 [bytes], parts `types` (ggml
    type ids) of `part_rows` rows each, stacked by rows."""

    bits = 0  # per part: see types

    def __init__(self, in_features: int, parts: list[tuple[int, torch.Tensor]], bias: bool = False, device=None,
                 bias_dtype: torch.dtype = torch.float32):
        """parts: (ggml type, uint8 tensor [rows, row_bytes]) in row order, as the file stores them
        (Q5_0 is regrouped here, see q5_0_regroup)."""
        out_features = sum(p.shape[0] for _, p in parts)
        super().__init__(in_features, out_features, bias, QK, device, bias_dtype)
        for t, p in parts:
            if not supported(t, in_features) or p.dtype != torch.uint8 or p.dim() != 2 \
                    or p.shape[1] != row_bytes(t, in_features):
                raise ValueError(f"not {BLOCKS.get(t, ('type ' + str(t),))[0]} rows of {in_features} weights: "
                                 f"{p.dtype} {list(p.shape)}")
        parts = [(Q5_0R4, torch.from_numpy(q5_0_regroup(p.cpu().numpy()))) if t == 6 and in_features >= 128
                 else (t, _no_minus_128(p)) if t == 8 else (t, p) for t, p in parts]
        self.types = tuple(int(t) for t, _ in parts)
        self.part_rows = tuple(int(p.shape[0]) for _, p in parts)
        self.register_buffer("qweight", torch.cat([p.reshape(-1) for _, p in parts]).to(device))
        kernels.cpu_ops()

    def dequantize_rows(self, a: int, b: int) -> torch.Tensor:
        return self.rows(torch.arange(a, b))

    def dequantize(self) -> torch.Tensor:
        return self.dequantize_rows(0, self.out_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_blocks(self.qweight, self.types, self.part_rows, self.in_features, ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks, bias = self._buffers["qweight"], self._parameters["bias"]
        if x.requires_grad and torch.is_grad_enabled():
            return _InputGrad.apply(x, self)
        K = self.in_features
        if kernels.cpu_ops() is not None and x.is_cpu:
            return torch.ops.slm_cpu.linear_gguf(x, blocks, self.types, self.part_rows, K, bias, MAX_DIRECT)
        x2 = x.reshape(-1, K).to(torch.float32)
        if x2.shape[0] <= MAX_DIRECT:
            x2 = quantize_x_reference(x2)
        y = _reference(x2, self.dequantize_rows, self.out_features, bias)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        parts = ", ".join(f"{_LAYOUTS[t][0]} x {n}" for t, n in zip(self.types, self.part_rows))
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, the file's blocks: {parts}")


__all__ = ["BLOCKS", "GGUFLinear", "dequantize_blocks", "quantize_x_reference", "supported", "row_bytes", "_CHUNK"]
