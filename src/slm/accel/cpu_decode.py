"""CPU decoding's fused kernels (kernels/cpu/), as subclasses of the reference modules that
`slm.accel.accelerate` swaps in (slm.load calls it):

    RMSNorm    one call per norm; with autograd on, cpu_train's one pass each way. `rope` and
               `add_to` fuse it with the rotation after it (QK-norm) or the residual add before it
               (sandwich norms)
    Linear     one-row products (decoding) through slm's AVX2 matrix-vector kernel, which streams
               small matrices from memory faster than MKL (benchmarks/int8_matvec.py): the blocks'
               projections (the tall LM head keeps MKL's product over its column-major weight)
    Attention  a step of one token a sequence: everything between the two products in one call
               (attn_step: norms, rotation, cache write, attention), or one query's attention
               (attn_decode: ~5 us where SDPA takes ~50)
    MLP        GeGLU's gelu(gate) * up in one call
    Block      Gemma's residual + norm(branch) in one call

Each runs its kernel only where it applies: fp32 on the CPU, no autograd, the kernels built (not
SLM_NO_KERNELS=1), and for the fused norms no hooks watching them (explain's capture: a fused call
would skip them). Everywhere else it runs the reference module's forward, which gives the same
results (tests/test_accel.py, test_gguf_blocks.py). Batch-1 steps mostly do not get here: the
whole-step decoder (decoder.py) runs them in one call.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import model as reference
from ..kernels import fused_op, matvec_f32_op, rms_norm_op
from ..model import KVCache, apply_rope
from . import cpu_train


def _plain(x: torch.Tensor) -> bool:
    """fp32 on the CPU, no autograd: where the decoding kernels apply."""
    return x.is_cpu and x.dtype == torch.float32 and not torch.is_grad_enabled()


class RMSNorm(cpu_train.RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _plain(x):
            op = rms_norm_op()  # one fused call: decoding runs many small norms
            if op is not None:
                return op(x.contiguous(), self.weight, self.eps, self.plus_one)
        return super().forward(x)

    def _fused(self, x: torch.Tensor, name: str):
        """The fused kernel `name` if it applies to x, else None."""
        if _plain(x) and not (self._forward_hooks or self._forward_pre_hooks):
            return fused_op(name)
        return None

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual + self(x), in one call where the kernels run it."""
        op = self._fused(x, "rms_norm_add")
        if op is not None and residual.dtype == torch.float32 and residual.shape == x.shape:
            return op(x.contiguous(), self.weight, self.eps, self.plus_one, residual.contiguous())
        return residual + self(x)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """apply_rope(self(x), cos, sin) for x [B, H, T, head_dim], in one call where it can."""
        op = self._fused(x, "rms_norm_rope")
        if op is not None and cos.dtype == torch.float32 and cos.shape[1] == 1:
            return op(x.contiguous(), self.weight, self.eps, self.plus_one, cos.contiguous(), sin.contiguous())
        return apply_rope(self(x), cos, sin)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1] and _plain(x) and self.weight.is_contiguous():
            op = matvec_f32_op()
            if op is not None:
                return op(x.contiguous(), self.weight, self.bias)
        return super().forward(x)


class Attention(reference.Attention):
    def forward(self, x, cos, sin, plan, cache):
        if x.shape[1] == 1 and type(cache) is KVCache and plan.mask is None and not plan.causal \
                and not plan.concat and isinstance(plan.write, slice) and _plain(x) \
                and (not self.qk_norm or isinstance(self.q_norm, reference.RMSNorm)):
            op = fused_op("attn_step")  # the whole step between the two products, in one call
            K, V = cache.k[self.layer], cache.v[self.layer]
            if op is not None and K.is_contiguous() and V.is_contiguous() and cos.dtype == torch.float32:
                qw, kw = (self.q_norm.weight, self.k_norm.weight) if self.qk_norm else (None, None)
                eps, plus_one = (self.q_norm.eps, self.q_norm.plus_one) if self.qk_norm else (0.0, False)
                y = op(self.qkv_proj(x).contiguous(), qw, kw, eps, plus_one, cos.contiguous(), sin.contiguous(), K, V,
                       plan.write.start, plan.read, self._scale(), self.n_heads)
                return self.o_proj(y)
        return super().forward(x, cos, sin, plan, cache)

    def _scale(self) -> float:
        return self.scale if self.scale is not None else self.head_dim ** -0.5

    def rotated_qkv(self, x, cos, sin):
        if not (self.qk_norm and isinstance(self.q_norm, RMSNorm) and isinstance(self.k_norm, RMSNorm)):
            return super().rotated_qkv(x, cos, sin)
        B, T, _ = x.shape  # Gemma 3: each of Q and K normalised and rotated in one call
        H, KV = self.n_heads, self.n_kv
        qkv = self.qkv_proj(x).view(B, T, H + 2 * KV, self.head_dim).transpose(1, 2)
        return self.q_norm.rope(qkv[:, :H], cos, sin), self.k_norm.rope(qkv[:, H:H + KV], cos, sin), qkv[:, H + KV:]

    def attend(self, q, k, v, plan):
        if q.shape[2] == 1 and plan.mask is None and not plan.causal and _plain(q):
            op = fused_op("attn_decode")  # one query a sequence
            if op is not None:
                return op(q.contiguous(), k, v, self._scale())
        return super().attend(q, k, v, plan)


class MLP(reference.MLP):
    def glu(self, h: torch.Tensor) -> torch.Tensor:
        if self.act != "swiglu" and _plain(h):
            op = fused_op("gelu_tanh_mul")
            if op is not None:
                return op(h.contiguous())
        return super().glu(h)


class Block(reference.Block):
    def forward(self, x, cos, sin, plan, cache):
        if self.sandwich and isinstance(self.post_attn_norm, RMSNorm) and isinstance(self.post_mlp_norm, RMSNorm):
            x = self.post_attn_norm.add_to(x, self.attn(self.attn_norm(x), cos, sin, plan, cache))
            return self.post_mlp_norm.add_to(x, self.mlp(self.mlp_norm(x)))
        return super().forward(x, cos, sin, plan, cache)


# reference class -> the class `accelerate` gives it (nn.Linear: inside the blocks only)
CLASSES = {reference.RMSNorm: RMSNorm, cpu_train.RMSNorm: RMSNorm, reference.Attention: Attention,
           reference.MLP: MLP, reference.Block: Block}
