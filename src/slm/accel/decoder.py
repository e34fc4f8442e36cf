"""A whole batch-1 step in one call to slm's CPU kernels (`torch.classes.slm_cpu.Decoder`).

At batch 1 a small model's token is mostly overhead: make demo's 2M-parameter model ran ~150 module
calls and ATen ops a token, ~1.0-1.7 ms, around ~0.2 ms of arithmetic, where llama.cpp takes ~0.5 ms.
`slm.accel.accelerate` therefore gives the model this module's `Transformer`, whose forward hands
one sequence's step (a new token, or a prompt of up to MAX_TOKENS) to `step_for(model, cache)`,
which runs the same kernels as the modules (products, norms, rope, attention: cpu/decoder.cpp's
`Decoder.step`) in one call and writes the cache as `KVCache.plan/update` would. It applies when
the step is plain: a batch-1 KVCache without padding or row 0 of the serving engine's RowKVCache,
fp32 on the CPU, no autograd or autocast, no hooks inside the model (explain watches modules; the
receipt's counter on the model itself runs either way), and every layer one
it knows (nn.Linear or cpu_decode's Linear in fp32, Int8Linear, Int4Linear, GGUFLinear; RMSNorm or
LayerNorm). Anything else keeps the module path, which gives the same logits (tests/accel/test_decoder.py
holds the two together, and tests/accel/test_accel.py both to the reference model). Longer prompts go to the
modules' GEMMs. The engine's step of several rows of its RowKVCache, one token each at its own
position (or with last_only, several of a row right-aligned: a prompt going in beside the decoding
rows), goes to `rows_step_for` (`Decoder.step_rows`): the products take the rows together, so
the weights are read once a step, as at batch 1. `SLM_NO_DECODER=1` turns both off.

A decoder holds the weights it was built from. It is kept per model while they stay the same, and
dropped as soon as a module it was built from is freed (a layer replaced by quantize_model or
merge_lora), so that the old weights go at once.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn as nn

from .. import model as reference
from ..kernels import cpu_ops
from ..kernels.abi import BlockKind, Layout, LinearRole, MlpKind, ModelLinearRole, ModelNormRole, NormKind, NormRole
from ..model import KVCache, RowKVCache
from ..quant.gguf_layers import GGUFLinear
from ..quant.layers import MAX_DIRECT as MAX_TOKENS  # the quantized layers' direct path, as the modules run it
from ..quant.layers import Int4Linear, Int8Linear, QuantEmbedding
from ..settings import switch
from . import cpu_decode, cpu_train

_MLP = {"swiglu": MlpKind.SWIGLU, "geglu": MlpKind.GEGLU, "gelu": MlpKind.GELU}
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (key, decoder, finalizers)
_LINEARS = (nn.Linear.forward, cpu_decode.Linear.forward)  # forwards that compute F.linear
_NORMS = (reference.RMSNorm, cpu_train.RMSNorm, cpu_decode.RMSNorm)  # the reference RMSNorm and its accelerators


class Transformer(reference.Transformer):
    """The reference model, whose forward hands a plain batch-1 step to the decoder (step_for)."""

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, pos: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, last_only: bool = False,
                return_hidden: bool = False) -> torch.Tensor:
        B, T = input_ids.shape
        if self.__dict__.get("_module_path", 0):  # within module_path(): hooks must see every call
            return super().forward(input_ids, cache, pos, attention_mask, last_only, return_hidden)
        if B == 1 and cache is not None and T <= MAX_TOKENS and attention_mask is None \
                and not return_hidden and input_ids.is_cpu and not torch.is_grad_enabled() \
                and not torch.is_autocast_enabled("cpu"):
            first = first_position(cache, pos, T)  # None: not a plain step
            step = step_for(self, cache) if first is not None else None
            if step is not None:  # the whole step in one C++ call
                logits = step(input_ids[0].tolist(), first, last_only)
                cache.seen += T
                return logits
        if (B > 1 or T > 1) and (T == 1 or last_only) and type(cache) is RowKVCache and pos is not None \
                and pos.shape == (B, T) and attention_mask is None and not return_hidden and input_ids.is_cpu \
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"):
            step = rows_step_for(self, cache)
            if step is not None:  # the serving engine's step of several rows, in one C++ call
                # Each row's tokens (position -1: padding; a row of it is idle and not computed),
                # and the logits of each row's last one: a row may take several tokens at
                # consecutive positions (a prompt going in beside the decoding rows).
                at, ids = pos.tolist(), input_ids.tolist()
                tokens, rows, positions, want, busy = [], [], [], [], []
                for b in range(B):
                    for t in range(T):
                        if at[b][t] >= 0:
                            tokens.append(ids[b][t])
                            rows.append(b)
                            positions.append(at[b][t])
                    if rows and rows[-1] == b:
                        busy.append(b)
                        want.append(len(tokens) - 1)
                if busy and max(positions) < cache.max_len:
                    out = step(tokens, rows, positions, want)
                    if len(busy) == B:
                        return out
                    logits = out.new_zeros(B, 1, out.shape[-1])
                    logits[busy] = out
                    return logits
        return super().forward(input_ids, cache, pos, attention_mask, last_only, return_hidden)


@contextlib.contextmanager
def module_path(model):
    """Within the block, `model` runs every forward on the module path. For hooks added for a few
    calls (serving's LoRA rows): a cache notes its decoder once, so it would not see them."""
    model.__dict__["_module_path"] = model.__dict__.get("_module_path", 0) + 1
    try:
        yield
    finally:
        model.__dict__["_module_path"] -= 1


def _linear(m: nn.Module):
    """(layout, tensors, bias, types, rows, in_features) for the C++ Lin, or None."""
    bias = m.bias.detach() if getattr(m, "bias", None) is not None else None
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        return None
    t = type(m)
    if t is GGUFLinear:
        return Layout.GGUF, [m.qweight], bias, list(m.types), list(m.part_rows), m.in_features
    if t is Int8Linear and m.scales.dtype == torch.float32:
        return Layout.INT8, [m.qweight, m.scales], bias, [], [], m.in_features
    if t is Int4Linear and m.scales.dtype == torch.float16 and m.mins.dtype == torch.float16:
        return Layout.INT4, [m.qweight, m.scales, m.mins], bias, [], [], m.in_features
    if isinstance(m, nn.Linear) and type(m).forward in _LINEARS and m.weight.dtype == torch.float32:
        return _fp32(m.weight, bias)
    return None  # LoRA wrappers, other dtypes, other layer types


def _fp32(w: torch.Tensor, bias):
    """An fp32 [N, K] weight: row-major, or column-major as checkpoint/hf.py stores a tall LM head."""
    if w.is_contiguous():
        return Layout.F32, [w.detach()], bias, [], [], w.shape[1]
    if w.t().is_contiguous():
        return Layout.F32_TRANSPOSED, [w.detach().t()], bias, [], [], w.shape[1]
    return None


def _norm(m: nn.Module | None):
    """(kind, weight, bias, eps, plus_one) for the C++ Norm, or None."""
    if m is None:
        return NormKind.NONE, None, None, 0.0, False
    if type(m) in _NORMS and m.weight.dtype == torch.float32:
        return NormKind.RMS, m.weight.detach(), None, float(m.eps), bool(m.plus_one)
    if type(m) is nn.LayerNorm and m.weight is not None and m.weight.dtype == torch.float32 and len(m.normalized_shape) == 1:
        return NormKind.LAYER, m.weight.detach(), m.bias.detach() if m.bias is not None else None, float(m.eps), False
    return None


def _spec(model) -> list | None:
    """Everything the C++ decoder needs, as (method, args) calls, or None if a part is not one it runs."""
    cfg = model.config
    if cfg.mlp not in _MLP or model.dtype != torch.float32 or \
            (cfg.qk_norm and type(model.blocks[0].attn.q_norm) not in _NORMS):
        return None
    calls = []

    def add(method, describe, i, role, m):  # False where the part is not one the decoder runs
        s = describe(m)
        if s is not None:
            calls.append((method, (i, role, *s)))
        return s is not None

    def lin(i, role, m):
        return add("set_linear", _linear, i, role, m)

    def norm(i, role, m):
        return add("set_norm", _norm, i, role, m)

    emb = model.embed
    if type(emb) is nn.Embedding and emb.weight.dtype == torch.float32 and _fp32(emb.weight, None) is not None:
        calls.append(("set_linear", (-1, ModelLinearRole.EMBED, *_fp32(emb.weight, None))))
    elif type(emb) is QuantEmbedding and emb.tied_to is None:
        calls.append(("set_linear", (-1, ModelLinearRole.EMBED, Layout.INT8, [emb.qweight, emb.scales], None, [], [],
                                     cfg.hidden_size)))
    elif type(emb) is QuantEmbedding:
        s = _linear(emb.tied_to)
        if s is None:
            return None
        calls.append(("set_linear", (-1, ModelLinearRole.EMBED, s[0], s[1], None, s[3], s[4], s[5])))
    else:
        return None
    if not (lin(-1, ModelLinearRole.HEAD, model.lm_head) and norm(-1, ModelNormRole.FINAL, model.norm)):
        return None
    for i, b in enumerate(model.blocks):
        a, mlp = b.attn, b.mlp
        ok = norm(i, NormRole.ATTN, b.attn_norm) and norm(i, NormRole.MLP, getattr(b, "mlp_norm", None)) \
            and norm(i, NormRole.POST_ATTN, getattr(b, "post_attn_norm", None)) \
            and norm(i, NormRole.POST_MLP, getattr(b, "post_mlp_norm", None)) \
            and norm(i, NormRole.Q, a.q_norm if a.qk_norm else None) \
            and norm(i, NormRole.K, a.k_norm if a.qk_norm else None) \
            and lin(i, LinearRole.QKV, a.qkv_proj) and lin(i, LinearRole.O, a.o_proj) \
            and lin(i, LinearRole.UP, mlp.gate_up_proj if mlp.gated else mlp.up_proj) \
            and lin(i, LinearRole.DOWN, mlp.down_proj)
        if not ok:
            return None
        cos, sin = model.rope_table(i, torch.device("cpu"), torch.float32)
        calls.append(("set_rope", (i, cos, sin)))
    return calls


def _key(model) -> tuple | None:
    """What a decoder was built from: every module and the storage of its weights (a replaced
    layer or model.to() changes it; the decoder keeps its tensors alive, so their addresses are not
    reused meanwhile). None while a hook watches a module inside the model: those calls must
    happen, and the decoder makes none. The model's own hooks still run (its __call__ hands the
    step over), as the receipt's token counter (footprint.receipt.watch) does: refusing the decoder
    for it made every `slm generate`, `chat` and `serve` decode on the module path, ~4x slower."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None
    key = []
    for m in model.modules():
        if m is not model and (m._forward_hooks or m._forward_pre_hooks):
            return None
        key.append(id(m))
        key.extend(t.data_ptr() for t in m._parameters.values() if t is not None)
        key.extend(t.data_ptr() for t in m._buffers.values() if t is not None)
    return tuple(key)


def build(model):
    """A C++ decoder for `model` (reused while its modules and weights are the same), or None.
    Kept per model: rebuilding it from the modules takes ~1 ms, a few of a small model's tokens."""
    if switch("SLM_NO_DECODER") or cpu_ops() is None or model.device.type != "cpu":
        return None
    key = _key(model)
    if key is None:
        return None
    cached = _DECODERS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    forget(model)  # the old one's weights go now, not after building
    calls = _spec(model)
    if calls is None:
        return None
    cfg = model.config
    a = model.blocks[0].attn
    block = BlockKind.PARALLEL if cfg.parallel_block else BlockKind.SANDWICH if cfg.sandwich_norm \
        else BlockKind.SEQUENTIAL
    dims = [cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rotary_dim, cfg.intermediate_size,
            cfg.vocab_size, cfg.num_layers, block, _MLP[cfg.mlp]]
    scale = a.scale if a.scale is not None else cfg.head_dim ** -0.5
    dec = torch.classes.slm_cpu.Decoder(dims, [float(scale), float(cfg.hidden_size ** 0.5) if cfg.embed_scale else 0.0])
    for name, args in calls:
        getattr(dec, name)(*args)
    _DECODERS[model] = (key, dec, _watch(model))
    return dec


def _watch(model) -> list:
    """Finalizers that forget model's decoder as soon as one of its modules now is freed."""
    ref = weakref.ref(model)

    def drop():
        m = ref()
        if m is not None:
            forget(m)
    return [weakref.finalize(m, drop) for m in model.modules()]


def forget(model) -> None:
    """Drop the decoder kept for model, and with it its references to the weights."""
    entry = _DECODERS.pop(model, None)
    if entry is not None:
        for f in entry[2]:
            f.detach()


def first_position(cache, pos: torch.Tensor | None, T: int) -> int | None:
    """The position of the first of T new tokens of one sequence if the step is plain, else None.
    A KVCache without padding whose tokens follow what it holds (pos None, or those positions); or
    row 0 of a RowKVCache (the serving engine's when one request runs) taking one token."""
    if type(cache) is KVCache:
        seen = cache.seen
        if cache.padded or seen + T > cache.max_len:
            return None
        if pos is None:
            return seen
        if pos.shape != (1, T):
            return None
        if T == 1:
            return seen if int(pos) == seen else None
        return seen if torch.equal(pos[0], torch.arange(seen, seen + T, device=pos.device)) else None
    if type(cache) is RowKVCache and T == 1 and pos is not None and pos.shape == (1, 1):
        p = int(pos)
        return p if 0 <= p < cache.max_len else None
    return None


def _noted_step(model, cache, note: str, make):
    """The step function noted on the cache as `note` (read by tests/accel/test_decoder.py too),
    decided once per cache: make(decoder) where the cache suits the decoder (fp32 on the CPU,
    contiguous) and the model has one, else None (noted as False)."""
    fn = cache.__dict__.get(note)
    if fn is not None:
        return fn or None
    fn = False
    if cache.k and cache.k[0].dtype == torch.float32 and cache.k[0].is_cpu \
            and all(t.is_contiguous() for t in [*cache.k, *cache.v, *cache.pos.values()]):
        dec = build(model)
        if dec is not None:
            fn = make(dec)
    cache.__dict__[note] = fn
    return fn or None


def rows_step_for(model, cache):
    """A function (tokens, rows, positions, want=None) -> logits [n, 1, V] that steps those tokens
    of those rows of this RowKVCache in one call (a row's tokens at consecutive positions, in order),
    giving the logits of the tokens listed in `want` (None: every token), or None where the module
    path must run it."""
    def make(dec):
        ks, vs, pos = cache.k, cache.v, [cache.pos[w] for w in cache.windows]
        rolling = [int(w is not None) for w in cache.windows]

        def step(tokens, rows, at, want=None):
            want = range(len(tokens)) if want is None else want
            return dec.step_rows(tokens, rows, at, ks, vs, pos, rolling, list(want))
        return step
    return _noted_step(model, cache, "_rows_step", make)


def fused_rows(model, cache):
    """rows_step_for(model, cache) where a forward of `model` would run the decoder now (slm's
    accelerated model, outside module_path(), no autograd or autocast), else None. For the serving
    engine: where it is, the prompts going in may ride its decode steps as extra tokens of their
    rows (chunked prefill), which the module path's RowKVCache (one token a row) cannot take."""
    if not isinstance(model, Transformer) or model.__dict__.get("_module_path", 0) or type(cache) is not RowKVCache \
            or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
        return None
    return rows_step_for(model, cache)


def step_for(model, cache):
    """A function (tokens, position of the first, last_only) -> logits [1, T or 1, V] that runs the
    step for this model and row 0 of this cache (a batch-1 cache's only row), or None where the
    module path must run it."""
    def make(dec):
        ks, vs = [k[:1] for k in cache.k], [v[:1] for v in cache.v]
        pos, rolling = [cache.pos[w][:1] for w in cache.windows], [int(w is not None) for w in cache.windows]
        return lambda tokens, seen, last_only: dec.step(tokens, seen, ks, vs, pos, rolling, last_only)
    return _noted_step(model, cache, "_step", make)
