// The numbers Python passes to the kernels for weight layouts, norm, block and MLP kinds, and the
// roles of a model's linear layers and norms (torch.classes.slm_cpu.Decoder's arguments). Python's
// copy is slm/kernels/abi.py, with the same names and values; torch.ops.slm_cpu.abi_constants()
// returns abi_table() below, and tests/test_kernels_abi.py holds the two equal.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace slm::cpu {

// A linear layer's weights (Decoder.set_linear's kind; Lin in decoder.h).
struct Layout {
  enum : int64_t {
    F32 = 0,             // fp32 W [N, K], row-major
    INT8 = 1,            // int8 q [N, K], fp32 scales [N, K/G] (matvec_int8.cpp)
    INT4 = 2,            // uint8 packed [N, K/2], fp16 scales and mins [N, K/G] (matvec_int4.cpp)
    GGUF = 3,            // a GGUF file's blocks, parts stacked by rows (matvec_gguf.cpp)
    F32_TRANSPOSED = 4,  // fp32 stored column-major: a = W^T [K, N] contiguous
  };
};

// A norm (Decoder.set_norm's kind; Norm in decoder.h).
struct NormKind {
  enum : int64_t {
    NONE = 0,   // no norm there
    RMS = 1,    // RMSNorm (plus_one: Gemma's 1 + w)
    LAYER = 2,  // LayerNorm, with a bias if given
  };
};

// How a block adds its attention and MLP to the residual stream (the Decoder's dims[8]).
struct BlockKind {
  enum : int64_t {
    SEQUENTIAL = 0,  // x += attn(norm(x)); x += mlp(norm(x))
    PARALLEL = 1,    // Phi: x += attn(h) + mlp(h), h = norm(x)
    SANDWICH = 2,    // Gemma 3: x += post_norm(attn(norm(x))), the same for the MLP
  };
};

// The MLP's activation (the Decoder's dims[9]).
struct MlpKind {
  enum : int64_t {
    SWIGLU = 0,  // silu(gate) * up
    GEGLU = 1,   // gelu_tanh(gate) * up
    GELU = 2,    // gelu_tanh(up), no gate
  };
};

// Which of a layer's linear layers (Decoder.set_linear's role for layers 0, 1, ...).
struct LinearRole {
  enum : int64_t { QKV = 0, O = 1, UP = 2 /* gate_up_proj, or up_proj */, DOWN = 3 };
};

// Which of the model's own linear layers (Decoder.set_linear's role for layer -1).
struct ModelLinearRole {
  enum : int64_t { HEAD = 0, EMBED = 1 /* the embedding table, only its rows are read */ };
};

// Which of a layer's norms (Decoder.set_norm's role for layers 0, 1, ...).
struct NormRole {
  enum : int64_t { ATTN = 0, MLP = 1, POST_ATTN = 2, POST_MLP = 3, Q = 4, K = 5 };
};

// Which of the model's own norms (Decoder.set_norm's role for layer -1).
struct ModelNormRole {
  enum : int64_t { FINAL = 0 };
};

// Every constant above as ("Group.NAME", value), in the order abi.py's table() lists them.
inline std::vector<std::pair<const char*, int64_t>> abi_table() {
#define SLM_ABI(group, name) {#group "." #name, group::name}
  return {
      SLM_ABI(Layout, F32), SLM_ABI(Layout, INT8), SLM_ABI(Layout, INT4), SLM_ABI(Layout, GGUF),
      SLM_ABI(Layout, F32_TRANSPOSED),
      SLM_ABI(NormKind, NONE), SLM_ABI(NormKind, RMS), SLM_ABI(NormKind, LAYER),
      SLM_ABI(BlockKind, SEQUENTIAL), SLM_ABI(BlockKind, PARALLEL), SLM_ABI(BlockKind, SANDWICH),
      SLM_ABI(MlpKind, SWIGLU), SLM_ABI(MlpKind, GEGLU), SLM_ABI(MlpKind, GELU),
      SLM_ABI(LinearRole, QKV), SLM_ABI(LinearRole, O), SLM_ABI(LinearRole, UP), SLM_ABI(LinearRole, DOWN),
      SLM_ABI(ModelLinearRole, HEAD), SLM_ABI(ModelLinearRole, EMBED),
      SLM_ABI(NormRole, ATTN), SLM_ABI(NormRole, MLP), SLM_ABI(NormRole, POST_ATTN), SLM_ABI(NormRole, POST_MLP),
      SLM_ABI(NormRole, Q), SLM_ABI(NormRole, K),
      SLM_ABI(ModelNormRole, FINAL),
  };
#undef SLM_ABI
}

}  // namespace slm::cpu
