"""FLOPs of a decoder-only transformer: one formula for training MFU, receipts and forecasts.

Per token, a forward pass costs 2 FLOPs (a multiply and an add) for every weight that takes part
in a matmul, plus attention's own two matmuls (scores Q K^T and the weighted sum of V):

    forward  = 2 N + 4 * sum over layers of (context_l * heads * head_dim)
    training = 3 x forward = 6 N + 12 * sum_l context_l * heads * head_dim      (backward = 2 x forward)

N counts the weights of the matmuls: the blocks' Q/K/V/O and MLP matrices and the LM head (a
matmul even when tied to the embedding, as in nanoGPT). It leaves out the input embedding (a
lookup, no FLOPs), norms and biases (elementwise, negligible): Kaplan et al.'s non-embedding
parameters plus the head. The attention term follows PaLM (appendix B) and nanoGPT: each token
is charged for the whole context it may see, ignoring the causal mask's savings, so a training
token at sequence length T costs 12 L T d_attn. A sliding-window layer (Mistral, Gemma 3) sees
at most its window. Kaplan's table has the same 2N + attention forward count; Chinchilla's 6ND
drops the attention term, which is what the forecaster (forecast.py) uses.
"""

from __future__ import annotations

from ..model.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """N: the weights that multiply activations (blocks' linear layers and the LM head)."""
    d, h, kv, hd, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    attn = d * (h + 2 * kv) * hd + h * hd * d
    mlp = (2 if cfg.mlp == "gelu" else 3) * d * f
    return cfg.num_layers * (attn + mlp) + cfg.vocab_size * d


def attention_flops(cfg: ModelConfig, context: float) -> float:
    """Forward FLOPs per token of the attention matmuls when a token sees `context` positions."""
    return attention_pricer(cfg)(context)


def attention_pricer(cfg: ModelConfig):
    """attention_flops(cfg, ·) with the layers grouped by window once: for a caller that prices
    many tokens (the receipt's hook, before every decode step of a server: looping over the
    layers for each of 16 rows took ~60 us of a step, ~23 us grouped)."""
    windows = [cfg.layer_window(i) for i in range(cfg.num_layers)]
    full = sum(1 for w in windows if not w)
    windowed = {w: windows.count(w) for w in windows if w}
    per_position = 4 * cfg.num_heads * cfg.head_dim
    return lambda context: per_position * (full * context + sum(n * min(context, w) for w, n in windowed.items()))


def flops_per_token(cfg: ModelConfig, context: float, training: bool = True) -> float:
    """FLOPs per token: 6N + 12 L T d_attn when training (the PaLM MFU count), 2N + 4 L T d_attn
    for a forward pass (inference) where each token sees `context` positions."""
    n, attn = matmul_params(cfg), attention_flops(cfg, context)
    return 6 * n + 3 * attn if training else 2 * n + attn


def training_flops(params: float, tokens: float) -> float:
    """Chinchilla's C = 6 N D, the forecaster's count (no attention term)."""
    return 6.0 * params * tokens
