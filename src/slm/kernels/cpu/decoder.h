// A batch-1 decode step of the whole model in one call (`Decoder.step`), for models small enough
// that Python and ATen dispatch dominate a token: make demo's 2M-parameter model spent ~1.7 ms a
// token in ~150 module calls and ops around ~0.2 ms of arithmetic. The step runs exactly the
// kernels the module path calls (the same products, norms, rope and attention), in the order of
// model.Block.forward, and writes the KV cache and its positions as KVCache.plan/update do.
// slm.accel.decoder builds it from a Transformer and falls back to the modules otherwise.
//
// The members are defined in decoder.cpp, the class is registered in register.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/custom_class.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "matvec.h"

namespace slm::cpu {

// A linear layer in one of the weight layouts (abi.h's Layout): a the fp32 weight, or the int8 or
// int4 weight with b its scales (and c the int4 mins), or the GGUF blocks described by parts.
struct Lin {
  int64_t kind = -1, N = 0, K = 0;  // kind: a Layout, -1 until set
  at::Tensor a, b, c, bias;
  std::optional<Parts> parts;
  // y [B, N] = x [B, K] W^T (+ bias), B at most the direct paths' max_direct, as the modules run it
  void rows(const float* x, int64_t B, float* y) const;
  void row(int64_t n, float* out) const;  // fp32 row n of W (a tied embedding's lookup)
};

// A norm of abi.h's NormKind: none, RMSNorm (add = 1: Gemma's 1 + w), LayerNorm with bias.
struct Norm {
  int64_t kind = 0;
  at::Tensor w, b;
  double eps = 0.0;
  float add = 0.0f;
  void operator()(const float* x, float* out, int64_t D) const;
};

struct Layer {
  Norm norm[6];  // by NormRole: attn_norm, mlp_norm, post_attn_norm, post_mlp_norm, q_norm, k_norm
  Lin lin[4];    // by LinearRole: qkv_proj, o_proj, gate_up_proj (or up_proj), down_proj
  at::Tensor cos, sin;  // this layer's rope tables [positions, rotary dims]
};

struct Decoder : torch::CustomClassHolder {
  // dims: hidden, heads, kv heads, head dim, rotary dims, MLP width, vocab, layers, block (a
  // BlockKind: sequential, parallel (Phi), sandwich (Gemma 3)), MLP (an MlpKind: SwiGLU, GeGLU, GELU);
  // scales: attention scale, embedding scale (0: none)
  int64_t d, H, Hkv, D, rd, F, V, block, act;
  double scale, embed_scale;
  std::vector<Layer> layers;
  Norm final_norm;
  Lin head, embed;  // embed: its fp32 or int8 table as a Lin (only rows are read), or the head's

  Decoder(std::vector<int64_t> dims, std::vector<double> scales);
  Layer& layer(int64_t i);
  static void fp32(const at::Tensor& t, int64_t n, const char* what);

  // layer -1: the model's own (role a ModelLinearRole: the LM head or the embedding table); else
  // layer i's (role a LinearRole). kind: a Layout.
  void set_linear(int64_t i, int64_t role, int64_t kind, std::vector<at::Tensor> t, std::optional<at::Tensor> bias,
                  std::vector<int64_t> types, std::vector<int64_t> rows, int64_t K);

  // layer -1: the final norm (ModelNormRole); else layer i's (role a NormRole). kind: a NormKind.
  void set_norm(int64_t i, int64_t role, int64_t kind, std::optional<at::Tensor> w, std::optional<at::Tensor> b,
                double eps, bool plus_one);

  void set_rope(int64_t i, at::Tensor cos, at::Tensor sin);

  // T tokens at positions seen .. seen + T - 1 (batch 1, no padding) through every layer, their keys
  // and values stored in the caches K[i], V[i] [1 (or more: row 0), Hkv, S, D] (slot p, or p % S where rolling[i]:
  // a sliding window's ring) and pos[i] [1, S] recording the positions. The rows' products run
  // together (the weights are read once); attention runs one row after another, each after storing
  // its key, which is causal attention, sliding windows included. -> logits [1, T, V], or [1, 1, V]
  // for the last token only.
  at::Tensor step(std::vector<int64_t> tokens, int64_t seen, std::vector<at::Tensor> K, std::vector<at::Tensor> Vc,
                  std::vector<at::Tensor> pos, std::vector<int64_t> rolling, bool last_only);
  // Tokens of several rows of a serving cache (RowKVCache: rows advance on their own): token t at
  // position positions[t] of row rows[t], K[i], V[i] [R, Hkv, S, D] and pos[i] [R, S] the whole
  // caches; a row's slots [0, min(p + 1, S)) must hold its positions in order, as
  // RowKVCache.load_row leaves them. A row may take several tokens (a prompt going in beside the
  // decoding rows: chunked prefill), at consecutive positions in the order given. The products run
  // for all the tokens together, so a step of 4 rows reads the weights once. -> logits [W, 1, V] of
  // the tokens listed in `want`, in that order (the others' logits are not computed).
  at::Tensor step_rows(std::vector<int64_t> tokens, std::vector<int64_t> rows, std::vector<int64_t> positions,
                       std::vector<at::Tensor> K, std::vector<at::Tensor> Vc, std::vector<at::Tensor> pos,
                       std::vector<int64_t> rolling, std::vector<int64_t> want);

 private:
  // step and step_rows: token t of row row[t] at position positions[t]; logits of the tokens in
  // `want` (in that order)
  at::Tensor run(const std::vector<int64_t>& tokens, const std::vector<int64_t>& row, const std::vector<int64_t>& positions,
                 std::vector<at::Tensor>& K, std::vector<at::Tensor>& Vc, std::vector<at::Tensor>& pos,
                 const std::vector<int64_t>& rolling, const std::vector<int64_t>& want, const char* what);
};

}  // namespace slm::cpu
