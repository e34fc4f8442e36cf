"""Run a model and keep its activations, in the manner of TransformerLens' `run_with_cache`.

    logits, cache = run_with_cache(lm, "The capital of France is")
    cache["resid_post", 3]          # [batch, pos, d_model] after block 3
    cache["attn.pattern", 3]        # [batch, head, query, key], post-softmax
    cache.stack("resid_post")       # [layers, batch, pos, d_model]

Everything is captured with forward hooks on the model's own modules; model.py is not changed
and runs at full speed when nothing is captured. Names, per block i (`blocks.{i}.NAME`):

    resid_pre       the block's input (block 0: the scaled embeddings)
    attn_in         the normed input of attention (Phi: also the MLP's input)
    attn.q/k/v      [batch, head, pos, head_dim] after QK-norm and rotary (k and v: KV heads)
    attn.scores     [batch, head, query, key] scaled q.k, -inf where masked
    attn.pattern    softmax of the scores: causal and sliding-window masks applied, GQA expanded
    attn.z          [batch, pos, head, head_dim] pattern @ V, what o_proj reads (the model's own)
    attn_out        o_proj's output
    attn_resid      what attention adds to the residual stream (Gemma: post_attn_norm(attn_out))
    resid_mid       resid_pre + attn_resid, the MLP branch's input (not in Phi's parallel block)
    mlp_in          the normed input of the MLP
    mlp.post        [batch, pos, d_mlp] the hidden activation (after SwiGLU/GeGLU/GELU)
    mlp_out         down_proj's output
    mlp_resid       what the MLP adds (Gemma: post_mlp_norm(mlp_out))
    resid_post      the block's output: resid_pre + attn_resid + mlp_resid

and `embed` (the token embeddings before Gemma's sqrt(d) scale), `final` (the final norm's output)
and `logits`. Attention patterns are recomputed in a hook from the block's own projections and
its mask plan; tests check that pattern @ V equals the `attn.z` the model itself computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch

from ..model import Transformer

ATTN_DETAIL = ("attn.q", "attn.k", "attn.v", "attn.scores", "attn.pattern")


class ActivationCache(dict):
    """A dict of activations by full name (`blocks.3.attn.pattern`); `cache[name, layer]` is a
    shorthand for `cache[f"blocks.{layer}.{name}"]`, negative layers counting from the end."""

    def __init__(self, num_layers: int):
        super().__init__()
        self.num_layers = num_layers

    def _key(self, key) -> str:
        if isinstance(key, tuple):
            name, layer = key
            if not -self.num_layers <= layer < self.num_layers:
                raise KeyError(f"layer {layer} out of range for {self.num_layers} layers")
            return f"blocks.{layer % self.num_layers}.{name}"
        return key

    def __getitem__(self, key):
        return super().__getitem__(self._key(key))

    def __contains__(self, key):
        try:
            return super().__contains__(self._key(key))
        except KeyError:  # a layer the model does not have
            return False

    def stack(self, name: str) -> torch.Tensor:
        """One activation of every layer stacked on a new leading axis."""
        return torch.stack([self[name, i] for i in range(self.num_layers)])

    def residual_stream(self) -> torch.Tensor:
        """[layers + 1, batch, pos, d]: the embeddings as block 0 sees them, then each block's output."""
        return torch.stack([self["resid_pre", 0]] + [self["resid_post", i] for i in range(self.num_layers)])


def _wanted(names) -> Callable[[str], bool]:
    if names is None:
        return lambda name: True
    if callable(names):
        return names
    names = {names} if isinstance(names, str) else set(names)
    return lambda name: name in names or name.split(".", 2)[-1] in names  # "attn.pattern" matches every layer


def attention_detail(attn, x, cos, sin, plan) -> dict[str, torch.Tensor]:
    """q, k, v, masked scores and the softmax pattern of one Attention module on input x, with the
    mask plan the model built for this forward: the layer's own rotated q, k, v (Attention.rotated_qkv)
    and the softmax that Attention.attend takes over them, written out."""
    T = x.shape[1]
    H, KV = attn.n_heads, attn.n_kv
    q, k, v = attn.rotated_qkv(x, cos, sin)
    scale = attn.scale if attn.scale is not None else attn.head_dim ** -0.5
    kk = k.float().repeat_interleave(H // KV, dim=1)  # GQA: query head h reads KV head h // (H / KV)
    scores = q.float() @ kk.transpose(-1, -2) * scale
    S = scores.shape[-1]
    if plan.mask is not None:
        allowed = plan.mask
    elif plan.causal:
        allowed = torch.ones(T, S, dtype=torch.bool, device=x.device).tril()  # SDPA's is_causal
    else:
        allowed = torch.ones(T, S, dtype=torch.bool, device=x.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return {"attn.q": q, "attn.k": k, "attn.v": v, "attn.scores": scores, "attn.pattern": scores.softmax(-1)}


@contextmanager
def capture(model: Transformer, names=None, detach: bool = True):
    """Hooks that fill an ActivationCache during the forward pass made inside the block (a second
    pass overwrites it; with a KV cache, the attention details are not recomputed).

    names: None (everything), a list of names (`"attn.pattern"` for every layer, or a full
    `"blocks.3.attn.pattern"`), or a predicate on full names."""
    want = _wanted(names)
    cache = ActivationCache(len(model.blocks))
    handles = []

    def keep(name: str, t: torch.Tensor) -> None:
        if want(name):
            cache[name] = t.detach() if detach else t

    def on_output(name):
        return lambda mod, args, out: keep(name, out)

    def on_input(name):
        return lambda mod, args: keep(name, args[0])

    def hook(module, kind, fn):
        reg = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
        handles.append(reg(fn))

    hook(model.embed, "post", on_output("embed"))
    hook(model.norm, "post", on_output("final"))
    hook(model.lm_head, "post", on_output("logits"))
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}."
        hook(block, "pre", on_input(p + "resid_pre"))
        hook(block, "post", on_output(p + "resid_post"))
        hook(block.attn, "post", on_output(p + "attn_out"))
        hook(block.attn.o_proj, "pre", lambda mod, args, p=p, attn=block.attn: keep(
            p + "attn.z", args[0].unflatten(-1, (attn.n_heads, attn.head_dim))))
        hook(block.mlp, "pre", on_input(p + "mlp_in"))
        hook(block.mlp, "post", on_output(p + "mlp_out"))
        hook(block.mlp.down_proj, "pre", on_input(p + "mlp.post"))
        if block.sandwich:
            hook(block.post_attn_norm, "post", on_output(p + "attn_resid"))
            hook(block.post_mlp_norm, "post", on_output(p + "mlp_resid"))
        else:
            hook(block.attn, "post", on_output(p + "attn_resid"))
            hook(block.mlp, "post", on_output(p + "mlp_resid"))
        if not block.parallel:
            hook(block.mlp_norm, "pre", on_input(p + "resid_mid"))

        def attn_pre(mod, args, p=p):
            keep(p + "attn_in", args[0])
            x, cos, sin, plan, kv_cache = args
            if kv_cache is None and any(want(p + n) for n in ATTN_DETAIL):
                for n, t in attention_detail(mod, x, cos, sin, plan).items():
                    keep(p + n, t)
        hook(block.attn, "pre", attn_pre)
    try:
        yield cache
    finally:
        for h in handles:
            h.remove()


def as_ids(lm_or_model, ids) -> torch.Tensor:
    """Token ids as a [batch, pos] tensor: from text (with an LM's tokenizer), a list or a tensor."""
    if isinstance(ids, str):
        tok = getattr(lm_or_model, "tokenizer", None)
        if tok is None:
            raise ValueError("text input needs an LM with a tokenizer; pass token ids to a bare model")
        ids = tok.encode(ids)
    if not isinstance(ids, torch.Tensor):
        ids = torch.tensor(list(ids), dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"expected token ids of shape [pos] or [batch, pos], got {tuple(ids.shape)}")
    return ids


def model_of(lm_or_model) -> Transformer:
    model = getattr(lm_or_model, "model", lm_or_model)
    if not isinstance(model, Transformer):
        raise ValueError(f"expected an slm LM or Transformer, got {type(lm_or_model).__name__}")
    return model


def run_with_cache(lm_or_model, ids, names: Iterable[str] | Callable | None = None,
                   **forward_kw) -> tuple[torch.Tensor, ActivationCache]:
    """One forward pass (no KV cache, no autograd) returning (logits [batch, pos, vocab], cache).
    ids: text (with an LM), a list of ids, or a [pos] / [batch, pos] tensor. forward_kw go to the
    model (attention_mask for a left-padded batch)."""
    model = model_of(lm_or_model)
    ids = as_ids(lm_or_model, ids).to(model.device)
    with torch.no_grad(), capture(model, names) as cache:
        logits = model(ids, **forward_kw)
    return logits, cache
