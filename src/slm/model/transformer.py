"""The one decoder-only transformer behind every family `slm` runs: the reference model.

Read top to bottom: norms, rotary embeddings, attention, MLP, block, model (the KV cache and the
attention plans are in kv_cache.py). Nothing here calls a kernel: `slm.accel` swaps faster
subclasses of these modules in at load or train time, each held equal to them by a test.

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
import torch.utils.checkpoint

from .config import ModelConfig
from .kv_cache import AttentionPlan, KVCache, causal_mask


# -- normalisation -----------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.head_dim = layer, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d, bias = cfg.hidden_size, cfg.attention_bias
        self.split = [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]
        # Q, K and V in one matrix: one matmul instead of three (checkpoints keep them apart).
        self.qkv_proj = nn.Linear(d, sum(self.split), bias=bias)
        self.o_proj = nn.Linear(self.split[0], d, bias=bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm, self.k_norm = make_norm(cfg, cfg.head_dim), make_norm(cfg, cfg.head_dim)
        self.scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None

    def rotated_qkv(self, x: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The queries [B, heads, T, head_dim], keys and values [B, kv_heads, T, head_dim] of x
        [B, T, hidden], queries and keys normalised (Gemma 3's QK-norm) and rotated by cos/sin."""
        B, T, _ = x.shape
        H, KV = self.n_heads, self.n_kv
        qkv = self.qkv_proj(x).view(B, T, H + 2 * KV, self.head_dim).transpose(1, 2)
        v = qkv[:, H + KV:]
        if self.qk_norm:  # Gemma 3: normalise each head, then rotate
            return apply_rope(self.q_norm(qkv[:, :H]), cos, sin), apply_rope(self.k_norm(qkv[:, H:H + KV]), cos, sin), v
        qk = apply_rope(qkv[:, :H + KV], cos, sin)  # Q and K heads rotated together
        return qk[:, :H], qk[:, H:], v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        """Each query's softmax-weighted sum of the values [B, heads, T, head_dim], over the keys
        the plan lets it see (grouped-query: query head h reads key/value head h // (heads / kv_heads))."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, is_causal=plan.causal,
                                              scale=self.scale, enable_gqa=self.n_kv != self.n_heads)

    def forward(self, x, cos, sin, plan: AttentionPlan, cache: KVCache | None):
        B, T, _ = x.shape
        q, k, v = self.rotated_qkv(x, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, plan)
        y = self.attend(q, k, v, plan)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gated, self.act = cfg.mlp != "gelu", cfg.mlp
        if self.gated:  # gate and up projections in one matrix, as Q/K/V above
            self.gate_up_proj = nn.Linear(d, 2 * f, bias=bias)
        else:
            self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def glu(self, h: torch.Tensor) -> torch.Tensor:
        """act(gate) * up for h = [gate | up]: SwiGLU (act SiLU) or GeGLU (GELU, tanh approximation)."""
        gate, up = h.chunk(2, -1)
        gate = F.silu(gate) if self.act == "swiglu" else F.gelu(gate, approximate="tanh")
        return gate * up

    def forward(self, x):
        if self.gated:
            return self.down_proj(self.glu(self.gate_up_proj(x)))
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
            x = x + self.post_attn_norm(self.attn(self.attn_norm(x), cos, sin, plan, cache))
            return x + self.post_mlp_norm(self.mlp(self.mlp_norm(x)))
        x = x + self.attn(self.attn_norm(x), cos, sin, plan, cache)
        return x + self.mlp(self.mlp_norm(x))


# -- the model ---------------------------------------------------------------------------------
class Transformer(nn.Module):
    """input ids -> logits. `forward` is embeddings(), then plans() and run_blocks(), then the final
    norm and the LM head; code that runs the blocks its own way (packed fine-tuning, explain)
    calls those steps itself."""

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

    def rope_table(self, layer: int, device=None, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [max_seq_len, rotary_dim] of layer's rotary embedding (its base and scaling,
        rope_tables' layout) for every position, built once per device and dtype and kept."""
        theta, scale = self._layer_rope[layer]
        key = (torch.device(device) if device is not None else self.device, dtype, theta, scale)
        if key not in self._rope:
            cos, sin = rope_tables(self.config.rotary_dim, self.config.max_seq_len, theta, scale, key[0])
            self._rope[key] = (cos.to(dtype), sin.to(dtype))
        return self._rope[key]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in: that of its floating-point weights. Read from the final
        norm, which is never quantized (the embedding and linear layers may hold int8/int4 tables)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def new_cache(self, batch: int = 1, max_len: int | None = None, zeros=torch.zeros) -> KVCache:
        return KVCache(self.config, batch, max_len or self.config.max_seq_len, self.device, self.dtype, zeros)

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
        x = self.run_blocks(x, pos, self.plans(pos, cache, padded=padded), cache)
        if cache is not None:
            cache.seen += T
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)

    def forward_by_layer(self, input_ids: torch.Tensor, cache: KVCache):
        """forward(input_ids, cache, last_only=True), one block at a time: a generator that yields
        after each block and returns the logits of the last position [B, 1, V], computed exactly
        as forward computes them. For a caller that spreads one forward over several turns (slm
        serve puts a long prompt's chunk through a few layers between two decode steps)."""
        B, T = input_ids.shape
        start = cache.seen
        if start + T > cache.max_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {cache.max_len}")
        pos = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        x = self.embeddings(input_ids)
        if self.autocast_residual and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        plans = self.plans(pos, cache, padded=False)
        for i in range(len(self.blocks)):
            x = self.run_blocks(x, pos, plans, cache, layers=range(i, i + 1))
            yield
        cache.seen += T
        return self.lm_head(self.norm(x[:, -1:]))

    def run_blocks(self, x: torch.Tensor, pos: torch.Tensor, plans: dict, cache: KVCache | None = None,
                   checkpoint: bool = False, layers: range | None = None) -> torch.Tensor:
        """The residual stream x [B, T, d] through every block (or the blocks of `layers`), the
        tokens at positions pos [B, T] (-1: padding), each layer attending as `plans` (from
        `plans()`) says. checkpoint: keep only each block's input for backward and recompute the
        rest there (less memory)."""
        T = x.shape[1]
        p = pos.clamp(min=0)
        ropes = {}
        for i in layers if layers is not None else range(len(self.blocks)):
            block = self.blocks[i]
            r = self._layer_rope[i]
            if r not in ropes:  # the layers share one or two tables (Gemma: local and global)
                cos, sin = self.rope_table(i, x.device, x.dtype)
                ropes[r] = cos[p].unsqueeze(1), sin[p].unsqueeze(1)
            w = cache.windows[i] if cache is not None else self._window(i, T)
            args = (x, *ropes[r], plans[w], cache)
            if checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
        return x

    def _window(self, layer: int, T: int) -> int | None:
        w = self.config.layer_window(layer)
        return w if w and w < T else None

    def plans(self, pos: torch.Tensor, cache: KVCache | None = None, documents: torch.Tensor | None = None,
              padded: bool | None = None) -> dict:
        """How each layer attends in a forward over tokens at positions pos [B, T] (-1: padding):
        {window: AttentionPlan}, as run_blocks looks them up. With a cache, the plans also say
        where the new keys go (and the cache records pos). Without one, documents [B, T] may give
        each token's document in a row of packed documents: a token then sees only the earlier
        tokens of its own (a block-diagonal causal mask), as packed fine-tuning needs. padded:
        whether pos holds -1s, if the caller knows (saves a device sync)."""
        T = pos.shape[1]
        if cache is None:
            windows = {self._window(i, T) for i in range(self.config.num_layers)}
            if documents is not None:
                same = (documents[:, :, None] == documents[:, None, :])[:, None]
                return {w: AttentionPlan(mask=causal_mask(pos, pos, w) & same) for w in windows}
            if padded is None:  # a device sync (and a graph break under torch.compile): only when needed
                padded = bool((pos < 0).any()) if T > 1 else False
            return {w: AttentionPlan(causal=True) if w is None and not padded else
                    AttentionPlan(mask=causal_mask(pos, pos, w)) for w in windows}
        if T > 1 and cache.seen == 0:
            cache.padded = bool((pos < 0).any())
        return {w: cache.plan(w, pos) for w in cache.size}
