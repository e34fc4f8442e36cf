"""The numbers Python passes to the C++ kernels for weight layouts, norm, block and MLP kinds, and
the roles of a model's linear layers and norms (`torch.classes.slm_cpu.Decoder`'s arguments, see
decoder.py). The kernels' copy is `cpu/abi.h`, with the same names and values;
`torch.ops.slm_cpu.abi_constants()` returns it, and tests/kernels/test_kernels_abi.py holds the two equal.
"""

from __future__ import annotations

from enum import IntEnum


class Layout(IntEnum):
    """A linear layer's weights (Decoder.set_linear's kind)."""
    F32 = 0             # fp32 W [N, K], row-major
    INT8 = 1            # int8 q [N, K], fp32 scales [N, K/G]
    INT4 = 2            # uint8 packed [N, K/2], fp16 scales and mins [N, K/G]
    GGUF = 3            # a GGUF file's blocks, parts stacked by rows
    F32_TRANSPOSED = 4  # fp32 stored column-major: W^T [K, N] contiguous


class NormKind(IntEnum):
    """A norm (Decoder.set_norm's kind)."""
    NONE = 0   # no norm there
    RMS = 1    # RMSNorm (plus_one: Gemma's 1 + w)
    LAYER = 2  # LayerNorm, with a bias if given


class BlockKind(IntEnum):
    """How a block adds its attention and MLP to the residual stream."""
    SEQUENTIAL = 0  # x += attn(norm(x)); x += mlp(norm(x))
    PARALLEL = 1    # Phi: x += attn(h) + mlp(h), h = norm(x)
    SANDWICH = 2    # Gemma 3: x += post_norm(attn(norm(x))), the same for the MLP


class MlpKind(IntEnum):
    """The MLP's activation."""
    SWIGLU = 0  # silu(gate) * up
    GEGLU = 1   # gelu_tanh(gate) * up
    GELU = 2    # gelu_tanh(up), no gate


class LinearRole(IntEnum):
    """Which of a layer's linear layers (Decoder.set_linear's role for layers 0, 1, ...)."""
    QKV = 0
    O = 1  # noqa: E741
    UP = 2  # gate_up_proj, or up_proj
    DOWN = 3


class ModelLinearRole(IntEnum):
    """Which of the model's own linear layers (Decoder.set_linear's role for layer -1)."""
    HEAD = 0
    EMBED = 1  # the embedding table, only its rows are read


class NormRole(IntEnum):
    """Which of a layer's norms (Decoder.set_norm's role for layers 0, 1, ...)."""
    ATTN = 0
    MLP = 1
    POST_ATTN = 2
    POST_MLP = 3
    Q = 4
    K = 5


class ModelNormRole(IntEnum):
    """Which of the model's own norms (Decoder.set_norm's role for layer -1)."""
    FINAL = 0


GROUPS = (Layout, NormKind, BlockKind, MlpKind, LinearRole, ModelLinearRole, NormRole, ModelNormRole)


def table() -> list[tuple[str, int]]:
    """Every constant as ("Group.NAME", value), in the order of cpu/abi.h's abi_table()."""
    return [(f"{group.__name__}.{m.name}", int(m)) for group in GROUPS for m in group]
