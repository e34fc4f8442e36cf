"""The one decoder-only transformer behind every family `slm` runs.

Read top to bottom: norms, rotary embeddings, attention, MLP, block, model (the KV cache and
the attention plans are in kv_cache.py).
The families differ only in switches on `ModelConfig`:

    Llama 2 / Orca 2   RMSNorm, SwiGLU MLP, full rotary, multi-head attention
    Mistral            as Llama, plus grouped-query attention and a sliding attention window
    Phi-2              LayerNorm, GELU MLP with biases, rotary on 40% of each head, attention and
                       MLP in parallel from one norm, biased LM head
    Gemma 3            RMSNorm scaling by (1 + w), norms before and after attention and MLP,
                       QK-norm, GeGLU, embeddings times sqrt(hidden), sliding-window layers with
                       their own rope base interleaved with global layers, tied embeddings

Parameter names are ours (`blocks.3.attn.qkv_proj.weight`); `checkpoint/hf.py` maps them to each
family's Hugging Face names, splitting the fused QKV and gate/up matrices.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from .config import ModelConfig
from .kv_cache import AttentionPlan as _Plan, KVCache, RowKVCache, causal_mask as _mask  # noqa: F401


def _decoder():  # skeleton only: the accelerators move out of the reference model
    from ..accel import decoder
    return decoder


def _cpu_train():
    from ..accel import cpu_train
    return cpu_train


# -- normalisation -----------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cpu and x.dtype == torch.float32:
            if not torch.is_grad_enabled():
                op = kernels.rms_norm_op()  # one fused call: decoding runs many small norms
                if op is not None:
                    return op(x.contiguous(), self.weight, self.eps, self.plus_one)
            else:  # training: one C++ pass each way, with its own backward
                y = _cpu_train().rms_norm(x, self.weight, self.eps, self.plus_one)
                if y is not None:
                    return y
        return self._reference(x)

    def _fused(self, x: torch.Tensor, name: str):
        """The fused kernel `name` if it applies to x (fp32 on the CPU, no autograd), else None.
        Not while hooks watch this norm (explain's capture): a fused call would skip them."""
        if x.is_cpu and x.dtype == torch.float32 and not torch.is_grad_enabled() \
                and not (self._forward_hooks or self._forward_pre_hooks):
            return kernels.fused_op(name)
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

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        # Written out: on CPU, F.rms_norm decomposes into twice as many small kernels.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:  # Gemma: scale by (1 + w), all in fp32
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)  # Llama: normalise in fp32, scale in the model dtype


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(dim or cfg.hidden_size, eps=cfg.norm_eps)
    return RMSNorm(dim or cfg.hidden_size, cfg.norm_eps, cfg.norm_plus_one)


# -- rotary position embedding -----------------------------------------------------------------
def rope_tables(rotary_dim: int, length: int, theta: float, scale: float = 1.0,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions 0..length-1, laid out for the half-split rotation that Hugging
    Face checkpoints use. sin carries the sign of the rotation, so applying it is one roll:
    rotate_half(x) * sin == roll(x, half) * [-sin, sin]. `scale` > 1 is linear position scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim))
    inv_freq = inv_freq / scale
    freqs = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, head_dim]; cos/sin: [B, 1, T, rotary_dim]. Rotates the first rotary_dim dims."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + x.roll(rd // 2, -1) * sin
    rot, rest = x[..., :rd], x[..., rd:]
    return torch.cat([rot * cos + rot.roll(rd // 2, -1) * sin, rest], -1)


# -- attention and MLP -------------------------------------------------------------------------
class Linear(nn.Linear):
    """nn.Linear; when decoding (one row of x, fp32, on the CPU, no autograd) the product goes to
    slm's AVX2 matrix-vector kernel, which streams small matrices from memory faster than MKL
    (benchmarks/int8_matvec.py). Everything else is F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1] and x.is_cpu and x.dtype == torch.float32 and self.weight.is_contiguous() \
                and not torch.is_grad_enabled():
            op = kernels.matvec_f32_op()
            if op is not None:
                return op(x.contiguous(), self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.head_dim = layer, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d, bias = cfg.hidden_size, cfg.attention_bias
        self.split = [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]
        # Q, K and V in one matrix: one matmul instead of three (checkpoints keep them apart).
        self.qkv_proj = Linear(d, sum(self.split), bias=bias)
        self.o_proj = Linear(self.split[0], d, bias=bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm, self.k_norm = make_norm(cfg, cfg.head_dim), make_norm(cfg, cfg.head_dim)
        self.scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None
        self.rope_qkv = None  # training may set kernels.rope's (GPU) or kernels.cpu_train's here (train/loop.py)
        self.attend = None  # and kernels.cpu_train.attention here on the CPU: causal, [B, T, heads, D] in and out

    def forward(self, x, cos, sin, plan: _Plan, cache: KVCache | None):
        B, T, _ = x.shape
        if T == 1 and type(cache) is KVCache and plan.mask is None and not plan.causal and not plan.concat \
                and isinstance(plan.write, slice) and x.is_cpu and x.dtype == torch.float32 \
                and not torch.is_grad_enabled() and (not self.qk_norm or isinstance(self.q_norm, RMSNorm)):
            op = kernels.fused_op("attn_step")  # the whole step between the two products, in one call
            K, V = cache.k[self.layer], cache.v[self.layer]
            if op is not None and K.is_contiguous() and V.is_contiguous() and cos.dtype == torch.float32:
                qw, kw = (self.q_norm.weight, self.k_norm.weight) if self.qk_norm else (None, None)
                eps, plus_one = (self.q_norm.eps, self.q_norm.plus_one) if self.qk_norm else (0.0, False)
                y = op(self.qkv_proj(x).contiguous(), qw, kw, eps, plus_one, cos.contiguous(), sin.contiguous(), K, V,
                       plan.write.start, plan.read, self.scale if self.scale is not None else self.head_dim ** -0.5,
                       self.n_heads)
                return self.o_proj(y)
        H = self.n_heads
        if self.rope_qkv is not None and cache is None:  # training: Triton or C++, one pass each way
            q, k, v = [t.transpose(1, 2) for t in self.rope_qkv(self.qkv_proj(x), cos, sin, H, self.n_kv)]
        else:
            qkv = self.qkv_proj(x).view(B, T, H + 2 * self.n_kv, self.head_dim).transpose(1, 2)
            v = qkv[:, H + self.n_kv:]
            if self.qk_norm:  # Gemma 3: normalise each head, then rotate
                if isinstance(self.q_norm, RMSNorm):
                    q, k = self.q_norm.rope(qkv[:, :H], cos, sin), self.k_norm.rope(qkv[:, H:H + self.n_kv], cos, sin)
                else:
                    q = apply_rope(self.q_norm(qkv[:, :H]), cos, sin)
                    k = apply_rope(self.k_norm(qkv[:, H:H + self.n_kv]), cos, sin)
            else:
                qk = apply_rope(qkv[:, :H + self.n_kv], cos, sin)  # Q and K heads rotated together
                q, k = qk[:, :H], qk[:, H:]
        scale = self.scale if self.scale is not None else self.head_dim ** -0.5
        if self.attend is not None and cache is None and plan.causal and plan.mask is None:
            y = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)
            return self.o_proj(y.reshape(B, T, -1))
        if cache is not None:
            k, v = cache.update(self.layer, k, v, plan)
        op = None
        if T == 1 and plan.mask is None and not plan.causal and q.is_cpu and q.dtype == torch.float32 \
                and not torch.is_grad_enabled():
            op = kernels.fused_op("attn_decode")  # one query a sequence: ~5 us where SDPA takes ~50
        if op is not None:
            y = op(q.contiguous(), k, v, scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, is_causal=plan.causal,
                                               scale=self.scale, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gated, self.act = cfg.mlp != "gelu", cfg.mlp
        if self.gated:  # gate and up projections in one matrix, as Q/K/V above
            self.gate_up_proj = Linear(d, 2 * f, bias=bias)
        else:
            self.up_proj = Linear(d, f, bias=bias)
        self.down_proj = Linear(f, d, bias=bias)
        self.glu = None  # training may set kernels.glu's (GPU) or kernels.cpu_train's here (train/loop.py)

    def forward(self, x):
        if self.gated:
            h = self.gate_up_proj(x)
            if self.glu is not None:  # Triton or C++: one read of gate and up each way
                return self.down_proj(self.glu(h, self.act != "swiglu"))
            if self.act != "swiglu" and h.is_cpu and h.dtype == torch.float32 and not torch.is_grad_enabled():
                op = kernels.fused_op("gelu_tanh_mul")
                if op is not None:
                    return self.down_proj(op(h.contiguous()))
            gate, up = h.chunk(2, -1)
            gate = F.silu(gate) if self.act == "swiglu" else F.gelu(gate, approximate="tanh")  # SwiGLU | GeGLU
            return self.down_proj(gate * up)
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))  # Phi's gelu_new


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.parallel, self.sandwich = cfg.parallel_block, cfg.sandwich_norm
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        if not self.parallel:
            self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        if self.sandwich:
            self.post_attn_norm, self.post_mlp_norm = make_norm(cfg), make_norm(cfg)

    def forward(self, x, cos, sin, plan, cache):
        if self.parallel:  # Phi: one norm feeds both branches
            h = self.attn_norm(x)
            return self.attn(h, cos, sin, plan, cache) + self.mlp(h) + x
        if self.sandwich:  # Gemma 3: each branch normalised on the way in and on the way out
            if isinstance(self.post_attn_norm, RMSNorm):  # x + norm(branch) in one call where it can
                x = self.post_attn_norm.add_to(x, self.attn(self.attn_norm(x), cos, sin, plan, cache))
                return self.post_mlp_norm.add_to(x, self.mlp(self.mlp_norm(x)))
            x = x + self.post_attn_norm(self.attn(self.attn_norm(x), cos, sin, plan, cache))
            return x + self.post_mlp_norm(self.mlp(self.mlp_norm(x)))
        x = x + self.attn(self.attn_norm(x), cos, sin, plan, cache)
        return x + self.mlp(self.mlp_norm(x))


# -- the model ---------------------------------------------------------------------------------
class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._rope: dict = {}  # (device, dtype, theta, scale) -> (cos, sin), built on first use
        self._layer_rope = [cfg.layer_rope(i) for i in range(cfg.num_layers)]
        # Under autocast, carry the residual stream in the autocast dtype instead of the weights'
        # fp32: half the bytes for every norm and residual add (GPU training; see train/loop.py).
        self.autocast_residual = False

    def init_weights(self, std: float = 0.02) -> None:
        """Fresh weights for training from scratch: GPT-2 style, with the residual projections
        scaled down by sqrt(2 * layers) so the residual stream does not grow with depth."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.constant_(p, 0.0 if self.config.norm_plus_one else 1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.num_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def rope(self, pos: torch.Tensor, dtype: torch.dtype, theta: float, scale: float):
        key = (pos.device, dtype, theta, scale)
        if key not in self._rope:
            cfg = self.config
            cos, sin = rope_tables(cfg.rotary_dim, cfg.max_seq_len, theta, scale, pos.device)
            self._rope[key] = (cos.to(dtype), sin.to(dtype))
        cos, sin = self._rope[key]
        p = pos.clamp(min=0)
        return cos[p].unsqueeze(1), sin[p].unsqueeze(1)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in: that of its floating-point weights. Read from the final
        norm, which is never quantized (the embedding and linear layers may hold int8/int4 tables)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        return KVCache(self.config, batch, max_len or self.config.max_seq_len, self.device, self.dtype)

    def embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The input embeddings [B, T, d] in the model's dtype (a quantized table gives fp32 rows),
        times sqrt(hidden) for Gemma, rounded to the model dtype first as Gemma's reference does."""
        x = self.embed(input_ids)
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if self.config.embed_scale:
            x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        return x

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, pos: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, last_only: bool = False,
                return_hidden: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only).

        return_hidden gives the final normalised hidden states [B, T, d] instead, for a loss that
        applies the LM head itself in chunks (train/loss.py) without materialising all logits.

        pos gives each token's absolute position, -1 for padding; by default tokens follow what
        the cache holds. attention_mask (1 = token, 0 = padding) is the Hugging Face way to say
        the same for a left-padded batch."""
        B, T = input_ids.shape
        if B == 1 and cache is not None and T <= _decoder().MAX_TOKENS and attention_mask is None \
                and not return_hidden and input_ids.is_cpu and not torch.is_grad_enabled() \
                and not torch.is_autocast_enabled("cpu"):
            first = _decoder().first_position(cache, pos, T)  # None: not a plain step
            step = _decoder().step_for(self, cache) if first is not None else None
            if step is not None:  # the whole step in one C++ call
                logits = step(input_ids[0].tolist(), first, last_only)
                cache.seen += T
                return logits
        start = cache.seen if cache is not None else 0
        padded = None if pos is not None or attention_mask is not None else False  # None: look at pos
        if pos is None and attention_mask is not None:
            pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, -1) + start
        if pos is None:
            pos = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        limit = cache.max_len if cache is not None else self.config.max_seq_len
        if start + T > limit:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {limit}")
        x = self.embeddings(input_ids)
        if self.autocast_residual and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        ropes = {r: self.rope(pos, x.dtype, *r) for r in set(self._layer_rope)}
        plans = self._plans(pos, cache, padded)
        for i, block in enumerate(self.blocks):
            w = cache.windows[i] if cache is not None else self._window(i, T)
            x = block(x, *ropes[self._layer_rope[i]], plans[w], cache)
        if cache is not None:
            cache.seen += T
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)

    def _window(self, layer: int, T: int) -> int | None:
        w = self.config.layer_window(layer)
        return w if w and w < T else None

    def _plans(self, pos: torch.Tensor, cache: KVCache | None, padded: bool | None = None) -> dict:
        T = pos.shape[1]
        if cache is None:
            if padded is None:  # a device sync (and a graph break under torch.compile): only when needed
                padded = bool((pos < 0).any()) if T > 1 else False
            windows = {self._window(i, T) for i in range(self.config.num_layers)}
            return {w: _Plan(causal=True) if w is None and not padded else _Plan(mask=_mask(pos, pos, w))
                    for w in windows}
        if T > 1 and cache.seen == 0:
            cache.padded = bool((pos < 0).any())
        return {w: cache.plan(w, pos) for w in cache.size}
