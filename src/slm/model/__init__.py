"""The reference model: its configuration, the family table, the transformer and its KV cache,
written once.

Nothing here calls a kernel: accelerators (`slm.accel`) and quantized layers (`slm.quant`) are
swapped in beside these modules and are held equal to them by tests.
"""

from .config import FAMILIES, REGISTRY, ConfigError, ModelConfig, get_config, memory_table
from .kv_cache import AttentionPlan, KVCache, RowKVCache, causal_mask, copy_slices
from .transformer import MLP, Attention, Block, RMSNorm, Transformer, apply_rope, make_norm, rope_tables

__all__ = ["FAMILIES", "REGISTRY", "ConfigError", "ModelConfig", "get_config", "memory_table", "AttentionPlan",
           "KVCache", "RowKVCache", "causal_mask", "copy_slices", "MLP", "Attention", "Block", "RMSNorm", "Transformer",
           "apply_rope", "make_norm", "rope_tables"]
