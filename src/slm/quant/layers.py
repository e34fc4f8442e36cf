"""Weight-only int8 and int4 quantization for CPU decoding.

At batch 1 a decode step reads every weight once, so its speed is set by the bytes of weights:

    int8  one int8 per weight, one fp32 scale per output channel (or per group of G)   ~1.0 byte
    int4  two weights a byte, an fp16 scale and an fp16 minimum per group of G = 32/64/128
          (asymmetric, as GGUF's Q4_1/Q4_K: w = scale * q + min, q in 0..15)         0.625 bytes at G = 32

against 4 bytes in fp32. Activations stay in fp32.

    from slm.quant.apply import quantize_model
    quantize_model(lm.model, "int4", group_size=32)   # every nn.Linear with in_features % 32 == 0,
                                                      # and the token embedding

This module holds the formats and the layers; `apply.py` puts them into a model (and
`gguf_layers.py` holds layers that keep a GGUF file's own blocks).

The token embedding (`QuantEmbedding`) gathers the ids' rows and dequantizes only those. An untied
table becomes int8 with one fp32 scale per row; a table tied to the LM head is stored once, as the
quantized head (int8 or int4), and the lookup reads the head's buffers. For a tied vocabulary as
large as Gemma 3's (262,144 x 640) that is most of the model: gemma-3-270m holds 257 MiB of
weights in int8 and 160 MiB in int4, against 897 and 800 MiB with an fp32 embedding.

The layers run slm's own AVX2 kernels (`slm/kernels/cpu/`, compiled on first use) on the CPU.
They are written because PyTorch's packed kernels lose on the CPUs slm targets: with fp32
activations on 2 AVX2 cores `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` ran 3-10x
slower than slm's kernels (the int4 one needs bf16 activations to be competitive, which a CPU
without native bf16 emulates); benchmarks/int8_matvec.py measures it (docs/benchmarks.md). Elsewhere (other devices, no compiler, gradients wanted) a
dequantize-then-matmul PyTorch path gives the same numbers.

Models are quantized while they load (`slm.load(path, quantize="int4")`): `apply.StreamingQuantizer`
gives each linear layer, and the embedding, fp32 storage only while its tensors arrive and
quantizes it (in chunks of rows) as soon as it is complete, so peak memory stays near the
quantized size; afterwards the heap pages those fp32 tensors occupied are handed back to the OS.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels

QK = 32  # the kernels' block: group sizes and in_features are multiples of it
# Rows of x up to which the kernels stream the quantized weights; above: dequantize + ATen GEMM.
# The streaming kernel's cost grows with each row of x (~2.5 ms a row for SmolLM2-135M on 2 cores,
# bound by the vector multiplier), the GEMM's mostly with the weights it dequantizes: a prompt of
# 32 tokens took about as long either way (SmolLM2 Q4_1 and int8, gemma-3-270m's blocks at ~40), one
# of 64 1.35-1.6x as long streamed. Batch-1 decode and the serving engine's steps stay far below.
MAX_DIRECT = 32
_CHUNK = 8192  # weight rows quantized / dequantized at a time, to bound temporary memory


def _group(K: int, group_size: int | None) -> int:
    G = K if group_size is None else group_size
    if G % QK or K % G:
        raise ValueError(f"group size {G} must be a multiple of {QK} that divides in_features {K}")
    return G


# -- int8 --------------------------------------------------------------------------------------
@torch.no_grad()
def quantize_q8(weight: torch.Tensor, group_size: int | None = QK) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] (any float dtype, any strides) -> (q int8 [N, K], scales fp32 [N, K/G]) with
    scale = absmax(group) / 127 and q = round(w / scale). group_size None: per output channel."""
    N, K = weight.shape
    if K % QK:
        raise ValueError(f"in_features must be a multiple of {QK}, got {K}")
    G = _group(K, group_size)
    q = torch.empty(N, K, dtype=torch.int8, device=weight.device)
    scales = torch.empty(N, K // G, dtype=torch.float32, device=weight.device)
    for r0 in range(0, N, _CHUNK):
        w = weight[r0:r0 + _CHUNK].to(torch.float32).reshape(-1, K // G, G)
        s = w.abs().amax(-1) / 127.0
        inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))  # an all-zero group: scale 0, q 0
        q[r0:r0 + _CHUNK] = (w * inv[..., None]).round_().clamp_(-127, 127).to(torch.int8).view(-1, K)
        scales[r0:r0 + _CHUNK] = s
    return q, scales


def dequantize_q8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 [N, K] weights from int8 [N, K] and scales [N, K/G]."""
    N, K = q.shape
    ng = scales.shape[1]
    return (q.view(N, ng, K // ng).to(torch.float32) * scales.to(torch.float32)[..., None]).view(N, K)


def q8_rows(q: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """fp32 rows [n, K] of the int8 table for the 1-D ids (gathered first: only those dequantized)."""
    return dequantize_q8(F.embedding(ids, q), F.embedding(ids, scales))


# -- int4 --------------------------------------------------------------------------------------
@torch.no_grad()
def quantize_q4(weight: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (packed uint8 [N, K/2], scales fp16 [N, K/G], mins fp16 [N, K/G]) with
    w ~= scale * q + min, q = round((w - min) / scale) in 0..15, scale = (max - min) / 15 per group.
    Packing, per block of 32 weights: byte j = q[j] | q[j + 16] << 4 (GGUF's Q4_0/Q4_1 order)."""
    N, K = weight.shape
    G = _group(K, group_size)
    packed = torch.empty(N, K // 2, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(N, K // G, dtype=torch.float16, device=weight.device)
    mins = torch.empty(N, K // G, dtype=torch.float16, device=weight.device)
    for r0 in range(0, N, _CHUNK):
        w = weight[r0:r0 + _CHUNK].to(torch.float32).reshape(-1, K // G, G)
        lo, hi = w.amin(-1), w.amax(-1)
        s, m = ((hi - lo) / 15).half(), lo.half()  # rounded first, so q is chosen for the stored values
        sf, mf = s.float(), m.float()
        inv = torch.where(sf > 0, 1.0 / sf, torch.zeros_like(sf))
        q = ((w - mf[..., None]) * inv[..., None]).round_().clamp_(0, 15).to(torch.uint8).view(-1, K // QK, 2, 16)
        packed[r0:r0 + _CHUNK] = (q[:, :, 0] | (q[:, :, 1] << 4)).view(-1, K // 2)
        scales[r0:r0 + _CHUNK], mins[r0:r0 + _CHUNK] = s, m
    return packed, scales, mins


def unpack_q4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> the 4-bit values q uint8 [N, K] in input order."""
    N, K = packed.shape[0], packed.shape[1] * 2
    b = packed.view(N, K // QK, 16)
    return torch.stack([b & 15, b >> 4], 2).view(N, K)


def dequantize_q4(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """fp32 [N, K] weights from the int4 format above."""
    N, ng = scales.shape
    q = unpack_q4(packed).to(torch.float32).view(N, ng, -1)
    return (q * scales.float()[..., None] + mins.float()[..., None]).view(N, -1)


# -- layers ------------------------------------------------------------------------------------
def _reference(x, weight_fn, N: int, bias) -> torch.Tensor:
    """The PyTorch path: x [..., K] -> [..., N] in fp32, dequantizing a few MB of rows at a time."""
    x = x.to(torch.float32)
    b = bias.to(torch.float32) if bias is not None else None
    if N <= _CHUNK:
        return F.linear(x, weight_fn(0, N), b)
    return torch.cat([F.linear(x, weight_fn(r, min(r + _CHUNK, N)), None if b is None else b[r:r + _CHUNK])
                      for r in range(0, N, _CHUNK)], -1)


def q8_linear_reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    return _reference(x, lambda a, b: dequantize_q8(q[a:b], scales[a:b]), q.shape[0], bias)


def q4_linear_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    return _reference(x, lambda a, b: dequantize_q4(packed[a:b], scales[a:b], mins[a:b]), packed.shape[0], bias)


class QuantLinear(nn.Module):
    """Common to the quantized layers: y = x W^T + b with W held in buffers. The weights are
    frozen; gradients flow to x (LoRA over a quantized base) through `_InputGrad`, which
    dequantizes W again in backward instead of keeping an fp32 copy alive until then."""

    bits: int

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int | None, device,
                 bias_dtype: torch.dtype):
        super().__init__()
        if in_features % QK:
            raise ValueError(f"in_features must be a multiple of {QK}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size = _group(in_features, group_size)
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device),
                                                     requires_grad=False) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int | None = None):
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=w.device,
                bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32, group_size=group_size)
        m.set_weight(w)
        if linear.bias is not None:  # the same storage: a loader may still be writing it
            m.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return m

    def extra_repr(self) -> str:
        g = "channel" if self.group_size == self.in_features else f"{self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, int{self.bits}, one scale per {g}")


class Int8Linear(QuantLinear):
    """int8 `qweight` [out, in] and fp32 `scales` [out, in/G]; group_size None: per output channel."""

    bits = 8

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 bias_dtype: torch.dtype = torch.float32, group_size: int | None = None):
        super().__init__(in_features, out_features, bias, group_size, device, bias_dtype)
        ng = in_features // self.group_size
        # uninitialised, as nn.Linear's weight before reset_parameters: filled by set_weight or load_state_dict
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, ng, dtype=torch.float32, device=device))
        kernels.cpu_ops()  # builds the kernel now, not in the middle of the first forward

    def set_weight(self, w: torch.Tensor) -> None:
        self.qweight, self.scales = quantize_q8(w, self.group_size)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [out, in] that this layer multiplies by."""
        return dequantize_q8(self.qweight, self.scales)

    def dequantize_rows(self, a: int, b: int) -> torch.Tensor:
        return dequantize_q8(self.qweight[a:b], self.scales[a:b])

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 rows [n, in] of W for the 1-D ids: a tied embedding's lookup."""
        return q8_rows(self.qweight, self.scales, ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the dicts, not nn.Module.__getattr__: this runs ~100 times a token
        ops, buffers, bias = kernels.cpu_ops(), self._buffers, self._parameters["bias"]
        qweight, scales = buffers["qweight"], buffers["scales"]
        if x.requires_grad and torch.is_grad_enabled():
            return _InputGrad.apply(x, self)
        if scales.dtype != torch.float32:  # after model.to(some dtype)
            scales = scales.float()
        if ops is not None and x.is_cpu:
            return ops.linear.default(x, qweight, scales, bias, MAX_DIRECT)  # any leading dims, out in x.dtype
        return q8_linear_reference(x, qweight, scales, bias).to(x.dtype)


class Int4Linear(QuantLinear):
    """uint8 `qweight` [out, in/2] (two 4-bit weights a byte), fp16 `scales` and `mins` [out, in/G]."""

    bits = 4

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 bias_dtype: torch.dtype = torch.float32, group_size: int = 32):
        super().__init__(in_features, out_features, bias, QK if group_size is None else group_size, device, bias_dtype)
        ng = in_features // self.group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, ng, dtype=torch.float16, device=device))
        self.register_buffer("mins", torch.empty(out_features, ng, dtype=torch.float16, device=device))
        kernels.cpu_ops()

    def set_weight(self, w: torch.Tensor) -> None:
        self.qweight, self.scales, self.mins = quantize_q4(w, self.group_size)

    def dequantize(self) -> torch.Tensor:
        return dequantize_q4(self.qweight, self.scales, self.mins)

    def dequantize_rows(self, a: int, b: int) -> torch.Tensor:
        return dequantize_q4(self.qweight[a:b], self.scales[a:b], self.mins[a:b])

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_q4(F.embedding(ids, self.qweight), F.embedding(ids, self.scales), F.embedding(ids, self.mins))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buffers, bias = self._buffers, self._parameters["bias"]
        packed, scales, mins = buffers["qweight"], buffers["scales"], buffers["mins"]
        if x.requires_grad and torch.is_grad_enabled():
            return _InputGrad.apply(x, self)
        if scales.dtype != torch.float16:  # after model.to(some dtype)
            scales, mins = scales.half(), mins.half()
        if kernels.cpu_ops() is not None and x.is_cpu:
            return torch.ops.slm_cpu.linear_q4(x, packed, scales, mins, bias, MAX_DIRECT)
        return q4_linear_reference(x, packed, scales, mins, bias).to(x.dtype)


class _InputGrad(torch.autograd.Function):
    """A quantized layer whose input needs a gradient (QLoRA: adapters train over a frozen
    quantized base). Forward is the inference path; backward computes dL/dx = dL/dy W by
    dequantizing W a chunk of rows at a time. Plain autograd through the dequantize-then-matmul
    path would keep every layer's fp32 weight alive until backward (6.4x the int4 bytes: a 7B
    model would not fit in memory). No gradient for the weights or the bias."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer(x.detach())

    @staticmethod
    def backward(ctx, grad_y):
        layer = ctx.layer
        g = grad_y.reshape(-1, layer.out_features).to(torch.float32)
        gx = torch.zeros(g.shape[0], layer.in_features, dtype=torch.float32, device=g.device)
        for a in range(0, layer.out_features, _CHUNK):
            b = min(a + _CHUNK, layer.out_features)
            gx.addmm_(g[:, a:b], layer.dequantize_rows(a, b))
        return gx.view(*grad_y.shape[:-1], layer.in_features).to(grad_y.dtype), None


class QuantEmbedding(nn.Module):
    """nn.Embedding's lookup from a quantized table: the ids' rows are gathered (F.embedding, so
    out-of-range ids raise as they do for nn.Embedding) and only those rows are dequantized, to
    fp32; `Transformer.embeddings` casts them to the model's dtype.

    The table is either its own, int8 `qweight` [V, d] with one fp32 scale per row in `scales`
    [V, 1], or, for an LM head tied to the embedding, the quantized head's (`tied_to`, int8 or
    int4 as the head holds it), so one copy serves both. Frozen: no gradient reaches the table."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, tied_to: QuantLinear | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        # A tuple, not a submodule: the head's buffers are then listed, and saved, once (under lm_head).
        self._tied = (tied_to,) if tied_to is not None else ()
        if tied_to is not None:
            if (tied_to.out_features, tied_to.in_features) != (num_embeddings, embedding_dim):
                raise ValueError(f"a [{num_embeddings}, {embedding_dim}] embedding cannot share the table of "
                                 f"a [{tied_to.out_features}, {tied_to.in_features}] layer")
        else:
            if embedding_dim % QK:
                raise ValueError(f"embedding_dim must be a multiple of {QK}, got {embedding_dim}")
            self.register_buffer("qweight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(num_embeddings, 1, dtype=torch.float32, device=device))

    @classmethod
    @torch.no_grad()
    def from_embedding(cls, embedding: nn.Embedding) -> QuantEmbedding:
        m = cls(embedding.num_embeddings, embedding.embedding_dim, device=embedding.weight.device)
        m.qweight, m.scales = quantize_q8(embedding.weight, None)
        return m

    @property
    def tied_to(self) -> QuantLinear | None:
        return self._tied[0] if self._tied else None

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 rows [n, d] for the 1-D ids."""
        if self._tied:
            return self._tied[0].rows(ids)
        return q8_rows(self.qweight, self.scales, ids)

    def dequantize(self) -> torch.Tensor:
        """The whole fp32 table [V, d]."""
        return self._tied[0].dequantize() if self._tied else dequantize_q8(self.qweight, self.scales)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.rows(input_ids.reshape(-1)).view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        fmt = "tied to the LM head's table" if self._tied else "int8, one scale per row"
        return f"{self.num_embeddings}, {self.embedding_dim}, {fmt}"


LAYERS = {"int8": Int8Linear, "int4": Int4Linear}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (a tied tensor counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device, t.data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
