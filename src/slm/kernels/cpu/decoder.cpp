// The whole-model decode step (decoder.h says what it runs; slm.accel.decoder builds it).

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <unordered_map>
#include <vector>

#include "abi.h"
#include "decoder.h"
#include "matvec.h"
#include "ops.h"
#include "rows.h"

namespace slm::cpu {

// Up to this many rows, fp32 products read the weights once for all rows (f32_rows_direct): on
// a small model's matrices 1.2-2.2x ATen's GEMM at 2-8 rows and 1.05-1.4x at 16 (2 threads).
constexpr int64_t F32_DIRECT_ROWS = 16;

void Lin::rows(const float* x, int64_t B, float* y) const {
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  switch (kind) {
    case Layout::F32:
      if (B == 1) {
        f32_direct(x, a.const_data_ptr<float>(), N, K, y, bp);
      } else if (B <= F32_DIRECT_ROWS) {
        f32_rows_direct(x, B, a.const_data_ptr<float>(), N, K, y, bp);
      } else {  // F.linear's GEMM
        auto xt = at::from_blob(const_cast<float*>(x), {B, K}, at::kFloat);
        auto yt = at::from_blob(y, {B, N}, at::kFloat);
        bias.defined() ? at::addmm_out(yt, bias, xt, a.t()) : at::mm_out(yt, xt, a.t());
      }
      break;
    case Layout::F32_TRANSPOSED:
      if (B == 1) {
        f32t_direct(x, a.const_data_ptr<float>(), N, K, y, bp);
      } else {
        auto xt = at::from_blob(const_cast<float*>(x), {B, K}, at::kFloat);
        auto yt = at::from_blob(y, {B, N}, at::kFloat);
        bias.defined() ? at::addmm_out(yt, bias, xt, a) : at::mm_out(yt, xt, a);
      }
      break;
    case Layout::INT8: q8_direct(x, B, K, a.const_data_ptr<int8_t>(), b.const_data_ptr<float>(), b.size(1), N, y, bp); break;
    case Layout::INT4: q4_direct(x, B, K, a.const_data_ptr<uint8_t>(), half_ptr(b), half_ptr(c), b.size(1), N, y, bp); break;
    default: gguf_direct(*parts, a.const_data_ptr<uint8_t>(), x, B, K, y, bp); break;
  }
}

void Lin::row(int64_t n, float* out) const {
  switch (kind) {
    case Layout::F32: std::memcpy(out, a.const_data_ptr<float>() + n * K, K * sizeof(float)); break;
    case Layout::F32_TRANSPOSED:
      for (int64_t k = 0; k < K; ++k) out[k] = a.const_data_ptr<float>()[k * N + n];
      break;
    case Layout::INT8: dequant_range(a.const_data_ptr<int8_t>(), b.const_data_ptr<float>(), K, b.size(1), n, n + 1, out); break;
    case Layout::INT4: dequant_range_q4(a.const_data_ptr<uint8_t>(), half_ptr(b), half_ptr(c), K, b.size(1), n, n + 1, out); break;
    default: dequant_rows(*parts, a.const_data_ptr<uint8_t>(), K, n, n + 1, out); break;
  }
}

void Norm::operator()(const float* x, float* out, int64_t D) const {
  const float* wp = w.const_data_ptr<float>();
  if (kind == NormKind::RMS) {
    rms_row(x, wp, D, eps, add, out);
    return;
  }
  float mean = 0.0f, var = 0.0f;
  for (int64_t i = 0; i < D; ++i) mean += x[i];
  mean /= float(D);
  for (int64_t i = 0; i < D; ++i) var += (x[i] - mean) * (x[i] - mean);
  const float inv = 1.0f / std::sqrt(var / float(D) + float(eps));
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  for (int64_t i = 0; i < D; ++i) out[i] = (x[i] - mean) * inv * wp[i] + (bp ? bp[i] : 0.0f);
}

Decoder::Decoder(std::vector<int64_t> dims, std::vector<double> scales) {
  TORCH_CHECK(dims.size() == 10 && scales.size() == 2, "slm_cpu.Decoder: 10 dims and 2 scales");
  d = dims[0], H = dims[1], Hkv = dims[2], D = dims[3], rd = dims[4], F = dims[5], V = dims[6], block = dims[8], act = dims[9];
  TORCH_CHECK(d > 0 && H > 0 && Hkv > 0 && H % Hkv == 0 && D > 0 && rd <= D && rd % 2 == 0 && F > 0 && V > 0,
              "slm_cpu.Decoder: bad dims");
  scale = scales[0], embed_scale = scales[1];
  layers.resize(dims[7]);
}

Layer& Decoder::layer(int64_t i) {
  TORCH_CHECK(i >= 0 && i < int64_t(layers.size()), "slm_cpu.Decoder: no layer ", i);
  return layers[i];
}

void Decoder::fp32(const at::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n,
              "slm_cpu.Decoder: ", what, " must be contiguous fp32 with ", n, " values");
}

void Decoder::set_linear(int64_t i, int64_t role, int64_t kind, std::vector<at::Tensor> t,
                         std::optional<at::Tensor> bias, std::vector<int64_t> types, std::vector<int64_t> rows,
                         int64_t K) {
  TORCH_CHECK(role >= 0 && role <= (i < 0 ? int64_t(ModelLinearRole::EMBED) : int64_t(LinearRole::DOWN)),
              "slm_cpu.Decoder: bad role");
  Lin& L = i < 0 ? (role == ModelLinearRole::HEAD ? head : embed) : layer(i).lin[role];
  L = Lin();
  L.kind = kind, L.K = K;
  if (kind == Layout::F32 || kind == Layout::F32_TRANSPOSED) {
    TORCH_CHECK(t.size() == 1 && t[0].dim() == 2 && t[0].size(kind == Layout::F32 ? 1 : 0) == K,
                "slm_cpu.Decoder: fp32 weight [N, K], or its transpose [K, N]");
    L.N = t[0].size(kind == Layout::F32 ? 0 : 1), L.a = t[0];
    fp32(t[0], L.N * K, "an fp32 weight");
  } else if (kind == Layout::INT8) {
    TORCH_CHECK(t.size() == 2 && t[0].dim() == 2 && t[0].size(1) == K, "slm_cpu.Decoder: int8 weight [N, K]");
    check_q8(t[0], t[1]);
    L.N = t[0].size(0), L.a = t[0], L.b = t[1];
  } else if (kind == Layout::INT4) {
    TORCH_CHECK(t.size() == 3 && t[0].dim() == 2 && 2 * t[0].size(1) == K, "slm_cpu.Decoder: int4 weight [N, K/2]");
    check_q4(t[0], t[1], t[2]);
    L.N = t[0].size(0), L.a = t[0], L.b = t[1], L.c = t[2];
  } else {
    TORCH_CHECK(kind == Layout::GGUF && t.size() == 1, "slm_cpu.Decoder: unknown layout ", kind);
    L.parts.emplace(t[0], types, rows, K);
    L.N = L.parts->N, L.a = t[0];
  }
  if (bias.has_value() && bias->defined()) {
    fp32(*bias, L.N, "a bias");
    L.bias = *bias;
  }
}

void Decoder::set_norm(int64_t i, int64_t role, int64_t kind, std::optional<at::Tensor> w,
                       std::optional<at::Tensor> b, double eps, bool plus_one) {
  TORCH_CHECK(role >= 0 && role <= NormRole::K && kind >= NormKind::NONE && kind <= NormKind::LAYER,
              "slm_cpu.Decoder: bad norm");
  Norm& n = i < 0 ? final_norm : layer(i).norm[role];
  n = Norm();
  n.kind = kind, n.eps = eps, n.add = plus_one ? 1.0f : 0.0f;
  if (kind == NormKind::NONE) return;
  const int64_t dim = role >= NormRole::Q ? D : d;
  fp32(*w, dim, "a norm weight");
  n.w = *w;
  if (kind == NormKind::LAYER && b.has_value() && b->defined()) {
    fp32(*b, dim, "a norm bias");
    n.b = *b;
  }
}

void Decoder::set_rope(int64_t i, at::Tensor cos, at::Tensor sin) {
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(1) == rd,
              "slm_cpu.Decoder: rope tables must be contiguous fp32 [positions, ", rd, "]");
  layer(i).cos = cos, layer(i).sin = sin;
}

at::Tensor Decoder::step(std::vector<int64_t> tokens, int64_t seen, std::vector<at::Tensor> K,
                         std::vector<at::Tensor> Vc, std::vector<at::Tensor> pos, std::vector<int64_t> rolling,
                         bool last_only) {
  const int64_t T = tokens.size();
  TORCH_CHECK(seen >= 0, "slm_cpu.Decoder.step: a negative position");
  std::vector<int64_t> rows(T, 0), positions(T), want(last_only ? 1 : T);
  for (int64_t t = 0; t < T; ++t) positions[t] = seen + t;
  for (int64_t w = 0; w < int64_t(want.size()); ++w) want[w] = T - int64_t(want.size()) + w;
  return run(tokens, rows, positions, K, Vc, pos, rolling, want, "step");
}

at::Tensor Decoder::step_rows(std::vector<int64_t> tokens, std::vector<int64_t> rows, std::vector<int64_t> positions,
                              std::vector<at::Tensor> K, std::vector<at::Tensor> Vc, std::vector<at::Tensor> pos,
                              std::vector<int64_t> rolling, std::vector<int64_t> want) {
  const int64_t T = tokens.size();
  TORCH_CHECK(int64_t(rows.size()) == T && int64_t(positions.size()) == T, "slm_cpu.Decoder.step_rows: one row and one "
              "position per token");
  for (int64_t p : positions) TORCH_CHECK(p >= 0, "slm_cpu.Decoder.step_rows: a negative position");
  // A row's tokens follow one another: attention reads a row's slots up to each token's position,
  // and a sliding window's ring is written token after token.
  std::unordered_map<int64_t, int64_t> next;
  for (int64_t t = 0; t < T; ++t) {
    auto it = next.find(rows[t]);
    TORCH_CHECK(it == next.end() || it->second == positions[t],
                "slm_cpu.Decoder.step_rows: a row's tokens must be at consecutive positions, in order");
    next[rows[t]] = positions[t] + 1;
  }
  for (int64_t w : want) TORCH_CHECK(w >= 0 && w < T, "slm_cpu.Decoder.step_rows: wanted token ", w, " out of range");
  return run(tokens, rows, positions, K, Vc, pos, rolling, want, "step_rows").view({int64_t(want.size()), 1, V});
}

at::Tensor Decoder::run(const std::vector<int64_t>& tokens, const std::vector<int64_t>& row, const std::vector<int64_t>& positions,
                        std::vector<at::Tensor>& K, std::vector<at::Tensor>& Vc, std::vector<at::Tensor>& pos,
                        const std::vector<int64_t>& rolling, const std::vector<int64_t>& want, const char* what) {
  const int64_t n = layers.size(), Q = (H + 2 * Hkv) * D, T = tokens.size();
  TORCH_CHECK(int64_t(K.size()) == n && int64_t(Vc.size()) == n && int64_t(pos.size()) == n && int64_t(rolling.size()) == n,
              "slm_cpu.Decoder.", what, ": one cache per layer");
  TORCH_CHECK(T > 0 && embed.kind >= 0 && head.kind >= 0, "slm_cpu.Decoder.", what, ": no tokens, or the decoder is incomplete");
  for (int64_t t : tokens) TORCH_CHECK(t >= 0 && t < V, "slm_cpu.Decoder.", what, ": token ", t, " out of range");
  const int64_t furthest = *std::max_element(positions.begin(), positions.end());
  const auto [lowest, top] = std::minmax_element(row.begin(), row.end());
  TORCH_CHECK(*lowest >= 0, "slm_cpu.Decoder.", what, ": a negative row");
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(K[i].scalar_type() == at::kFloat && Vc[i].scalar_type() == at::kFloat && K[i].is_contiguous() &&
                    Vc[i].is_contiguous() && K[i].dim() == 4 && K[i].sizes() == Vc[i].sizes() && K[i].size(0) > *top &&
                    K[i].size(1) == Hkv && K[i].size(3) == D,
                "slm_cpu.Decoder.", what, ": caches must be contiguous fp32 [rows, ", Hkv, ", S, ", D, "] with every row");
    TORCH_CHECK(pos[i].scalar_type() == at::kLong && pos[i].is_contiguous() && pos[i].dim() == 2 &&
                    pos[i].size(0) == K[i].size(0) && pos[i].size(1) == K[i].size(2),
                "slm_cpu.Decoder.", what, ": positions must be int64 [rows, S]");
    TORCH_CHECK((rolling[i] || furthest < K[i].size(2)) && furthest < layers[i].cos.size(0),
                "slm_cpu.Decoder.", what, ": position ", furthest, " is beyond the cache or the rope table");
  }
  std::vector<float> x(T * d), h(T * d), a(T * d), m(T * d), qkv(T * Q), y(T * H * D), up(T * (act == MlpKind::GELU ? F : 2 * F)), g(T * F);
  for (int64_t t = 0; t < T; ++t) {
    embed.row(tokens[t], x.data() + t * d);
    if (embed_scale != 0.0)
      for (int64_t j = 0; j < d; ++j) x[t * d + j] *= static_cast<float>(embed_scale);
  }
  auto norm = [&](const Norm& nm, const float* in, float* out) {
    for (int64_t t = 0; t < T; ++t) nm(in + t * d, out + t * d, d);
  };
  auto attention = [&](int64_t i, const float* in, float* out) {
    Layer& L = layers[i];
    const int64_t S = K[i].size(2);
    L.lin[LinearRole::QKV].rows(in, T, qkv.data());
    const Norm &qn = L.norm[NormRole::Q], &kn = L.norm[NormRole::K];
    if (T > 1 && !rolling[i]) {  // every key first, then the tokens' heads in parallel: slot p is position p
      for (int64_t t = 0; t < T; ++t) pos[i].mutable_data_ptr<int64_t>()[row[t] * S + positions[t]] = positions[t];
      attn_step_rows(T, qkv.data(), H, Hkv, D, rd, qn.kind ? qn.w.const_data_ptr<float>() : nullptr,
                     kn.kind ? kn.w.const_data_ptr<float>() : nullptr, qn.eps, qn.add != 0.0f, L.cos.const_data_ptr<float>(),
                     L.sin.const_data_ptr<float>(), positions.data(), row.data(), K[i].mutable_data_ptr<float>(),
                     Vc[i].mutable_data_ptr<float>(), S, float(scale), y.data());
      L.lin[LinearRole::O].rows(y.data(), T, out);
      return;
    }
    // a ring (a sliding window's cache) one token after another, each after storing its key: a
    // later token may take the slot of a key an earlier one still reads
    for (int64_t t = 0; t < T; ++t) {
      const int64_t p = positions[t], slot = rolling[i] ? p % S : p, r = row[t], cache = r * Hkv * S * D;
      pos[i].mutable_data_ptr<int64_t>()[r * S + slot] = p;
      attn_step_row(qkv.data() + t * Q, H, Hkv, D, rd, qn.kind ? qn.w.const_data_ptr<float>() : nullptr,
                    kn.kind ? kn.w.const_data_ptr<float>() : nullptr, qn.eps, qn.add != 0.0f,
                    L.cos.const_data_ptr<float>() + p * rd, L.sin.const_data_ptr<float>() + p * rd,
                    K[i].mutable_data_ptr<float>() + cache, Vc[i].mutable_data_ptr<float>() + cache, S, slot, std::min(p + 1, S),
                    float(scale), y.data() + t * H * D);
    }
    L.lin[LinearRole::O].rows(y.data(), T, out);
  };
  auto mlp = [&](int64_t i, const float* in, float* out) {
    Layer& L = layers[i];
    L.lin[LinearRole::UP].rows(in, T, up.data());
    const int64_t W = act == MlpKind::GELU ? F : 2 * F;
    for (int64_t t = 0; t < T; ++t) {
      const float* u = up.data() + t * W;
      float* o = g.data() + t * F;
      if (act == MlpKind::SWIGLU) {  // SwiGLU: silu(gate) * up
        silu_mul_row(u, u + F, o, F);
      } else {
        gelu_tanh_mul_row(u, act == MlpKind::GEGLU ? u + F : nullptr, o, F);
      }
    }
    L.lin[LinearRole::DOWN].rows(g.data(), T, out);
  };
  for (int64_t i = 0; i < n; ++i) {
    Layer& L = layers[i];
    norm(L.norm[NormRole::ATTN], x.data(), h.data());
    if (block == BlockKind::PARALLEL) {  // Phi: x = attn(h) + mlp(h) + x
      attention(i, h.data(), a.data());
      mlp(i, h.data(), m.data());
      for (int64_t j = 0; j < T * d; ++j) x[j] = (a[j] + m[j]) + x[j];
      continue;
    }
    attention(i, h.data(), a.data());
    if (block == BlockKind::SANDWICH) {  // Gemma 3: x = post_norm(branch) + x
      norm(L.norm[NormRole::POST_ATTN], a.data(), h.data());
      for (int64_t j = 0; j < T * d; ++j) x[j] = h[j] + x[j];
    } else {
      for (int64_t j = 0; j < T * d; ++j) x[j] = x[j] + a[j];
    }
    norm(L.norm[NormRole::MLP], x.data(), h.data());
    mlp(i, h.data(), m.data());
    if (block == BlockKind::SANDWICH) {
      norm(L.norm[NormRole::POST_MLP], m.data(), h.data());
      for (int64_t j = 0; j < T * d; ++j) x[j] = h[j] + x[j];
    } else {
      for (int64_t j = 0; j < T * d; ++j) x[j] = x[j] + m[j];
    }
  }
  const int64_t R = want.size();
  for (int64_t w = 0; w < R; ++w) final_norm(x.data() + want[w] * d, h.data() + w * d, d);
  auto logits = at::empty({1, R, head.N}, at::TensorOptions().dtype(at::kFloat));
  if (R > 0) head.rows(h.data(), R, logits.mutable_data_ptr<float>());
  return logits;
}

}  // namespace slm::cpu
