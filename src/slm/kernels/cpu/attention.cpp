// Attention when decoding: one new query per sequence over the KV cache (attn_decode), and the
// whole step between the QKV and output products (attn_step; attn_step_row also serves the Decoder).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "ops.h"
#include "rows.h"
#include "simd.h"

namespace slm::cpu {

// The sums of 8 vectors, as one vector: lane j holds the sum of a[j]'s 8 lanes.
static inline __m256 hsum8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // halves: keys 0-3 | 4-7 of each lane half
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// One query row against S cached keys and values (rows ks and vs floats apart):
// o = softmax(q K^T * sc) V, softmax in fp32; p holds S floats of scratch. Scores eight keys at a
// time (one reduction for the eight, not one per key) and the exponentials eight at a time: with
// a few hundred keys, the per-key reductions and scalar exp took most of a prompt chunk's attention.
inline void attend_row(const float* qr, const float* kb, int64_t ks, const float* vb, int64_t vs, int64_t S,
                       int64_t D, float sc, float* p, float* o) {
  __m256 mx8 = _mm256_set1_ps(-INFINITY);
  int64_t s = 0;
  if (D % 8 == 0) {
    for (; s + 8 <= S; s += 8) {
      __m256 acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
      for (int64_t i = 0; i < D; i += 8) {
        const __m256 q = _mm256_loadu_ps(qr + i);
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(q, _mm256_loadu_ps(kb + (s + j) * ks + i), acc[j]);
      }
      const __m256 sco = _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(sc));
      _mm256_storeu_ps(p + s, sco);
      mx8 = _mm256_max_ps(mx8, sco);
    }
  }
  float mx = hmax(mx8);
  for (; s < S; ++s) {
    p[s] = dot_f32(qr, kb + s * ks, D) * sc;
    mx = std::max(mx, p[s]);
  }
  __m256 sum8 = _mm256_setzero_ps();
  const __m256 m8 = _mm256_set1_ps(mx);
  s = 0;
  for (; s + 8 <= S; s += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + s), m8));
    _mm256_storeu_ps(p + s, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  float sum = hsum(sum8);
  for (; s < S; ++s) sum += (p[s] = std::exp(p[s] - mx));
  const float inv = 1.0f / sum;
  int64_t i0 = 0;
  for (; i0 + 64 <= D; i0 += 64) {  // 64 of o at a time in registers, not through memory at every key
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (s = 0; s < S; ++s) {
      const float* vr = vb + s * vs + i0;
      const __m256 ps = _mm256_set1_ps(p[s]);
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(ps, _mm256_loadu_ps(vr + 8 * j), acc[j]);
    }
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(o + i0 + 8 * j, _mm256_mul_ps(acc[j], _mm256_set1_ps(inv)));
  }
  if (i0 < D) {
    for (int64_t i = i0; i < D; ++i) o[i] = 0.0f;
    for (s = 0; s < S; ++s) {
      const float* vr = vb + s * vs;
      const __m256 ps = _mm256_set1_ps(p[s] * inv);
      int64_t i = i0;
      for (; i + 8 <= D; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(ps, _mm256_loadu_ps(vr + i), _mm256_loadu_ps(o + i)));
      for (; i < D; ++i) o[i] += p[s] * inv * vr[i];
    }
  }
}

// Attention of one new query per sequence over S cached keys, no mask: q [B, H, 1, D], k and v
// [B, Hkv, S, D] (any strides with the last dimension contiguous), H a multiple of Hkv (grouped
// queries). Softmax in fp32. -> [B, H, 1, D], as F.scaled_dot_product_attention.
at::Tensor attn_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                  v.scalar_type() == at::kFloat && q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1 &&
                  q.is_contiguous() && k.stride(3) == 1 && v.stride(3) == 1,
              "slm_cpu.attn_decode: q contiguous fp32 [B, H, 1, D], k and v fp32 [B, Hkv, S, D] with contiguous rows");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D && Hkv > 0 && H % Hkv == 0 && S > 0,
              "slm_cpu.attn_decode: shapes do not match");
  auto y = at::empty(q.sizes(), q.options());
  const float* qp = q.const_data_ptr<float>();
  const float *kp = k.const_data_ptr<float>(), *vp = v.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  const int64_t g = H / Hkv;
  const float sc = static_cast<float>(scale);
  // heads per task: at least ~1M multiply-adds, so a short context does not pay for a thread wake-up
  at::parallel_for(0, B * H, std::max<int64_t>(1, (int64_t(1) << 20) / (2 * S * D)), [&](int64_t a, int64_t e) {
    std::vector<float> p(S);
    for (int64_t bh = a; bh < e; ++bh) {
      const int64_t b = bh / H, h = bh % H, hk = h / g;
      const float* qr = qp + bh * D;
      const float* kb = kp + b * k.stride(0) + hk * k.stride(1);
      const float* vb = vp + b * v.stride(0) + hk * v.stride(1);
      attend_row(qr, kb, k.stride(2), vb, v.stride(2), S, D, sc, p.data(), yp + bh * D);
    }
  });
  return y;
}

// One head of a new token as attention reads it: RMS-normalised by w (qk-norm, if w), then rotated
// (rope over the first rd of its D values, cos c and sin s of its position). n: D floats of scratch.
static void prep_head(const float* in, const float* w, double eps, float add, const float* c, const float* s,
                      int64_t D, int64_t rd, float* n, float* out) {
  if (w) {
    rms_row(in, w, D, eps, add, n);
  } else {
    for (int64_t i = 0; i < D; ++i) n[i] = in[i];
  }
  const int64_t half = rd / 2;
  for (int64_t i = 0; i < rd; ++i) out[i] = n[i] * c[i] + n[i < half ? i + half : i - half] * s[i];
  for (int64_t i = rd; i < D; ++i) out[i] = n[i];
}

// attn_step for one sequence: row its qkv [(H + 2 Hkv) D], K and V its caches [Hkv, S, D], y [H D].
void attn_step_row(const float* row, int64_t H, int64_t Hkv, int64_t D, int64_t rd, const float* qwp, const float* kwp,
                   double eps, bool plus_one, const float* c, const float* s, float* kp, float* vp, int64_t S, int64_t slot,
                   int64_t read, float sc, float* y) {
  const float add = plus_one ? 1.0f : 0.0f;
  std::vector<float> n(D), q(H * D), p(read);
  for (int64_t j = 0; j < Hkv; ++j) {
    prep_head(row + (H + j) * D, kwp, eps, add, c, s, D, rd, n.data(), kp + (j * S + slot) * D);
    std::memcpy(vp + (j * S + slot) * D, row + (H + Hkv + j) * D, D * sizeof(float));
  }
  for (int64_t h = 0; h < H; ++h) prep_head(row + h * D, qwp, eps, add, c, s, D, rd, n.data(), q.data() + h * D);
  const int64_t g = H / Hkv;
  for (int64_t h = 0; h < H; ++h)
    attend_row(q.data() + h * D, kp + (h / g) * S * D, D, vp + (h / g) * S * D, D, read, D, sc, p.data(), y + h * D);
}

void attn_step_rows(int64_t T, const float* qkv, int64_t H, int64_t Hkv, int64_t D, int64_t rd, const float* qwp,
                    const float* kwp, double eps, bool plus_one, const float* cos, const float* sin,
                    const int64_t* positions, const int64_t* rows, float* K, float* V, int64_t S, float sc, float* y) {
  const float add = plus_one ? 1.0f : 0.0f;
  const int64_t Q = (H + 2 * Hkv) * D, g = H / Hkv;
  std::vector<float> n(D), q(T * H * D);
  int64_t longest = 1;
  for (int64_t t = 0; t < T; ++t) {  // every key and value first: a query reads only slots up to its own
    const int64_t p = positions[t], cache = rows[t] * Hkv * S * D;
    const float *row = qkv + t * Q, *c = cos + p * rd, *s = sin + p * rd;
    for (int64_t j = 0; j < Hkv; ++j) {
      prep_head(row + (H + j) * D, kwp, eps, add, c, s, D, rd, n.data(), K + cache + (j * S + p) * D);
      std::memcpy(V + cache + (j * S + p) * D, row + (H + Hkv + j) * D, D * sizeof(float));
    }
    for (int64_t h = 0; h < H; ++h) prep_head(row + h * D, qwp, eps, add, c, s, D, rd, n.data(), q.data() + (t * H + h) * D);
    longest = std::max(longest, p + 1);
  }
  // (token, head) pairs per task: at least ~1M multiply-adds, as attn_decode
  at::parallel_for(0, T * H, std::max<int64_t>(1, (int64_t(1) << 20) / (2 * longest * D)), [&](int64_t a, int64_t e) {
    std::vector<float> p(longest);
    for (int64_t th = a; th < e; ++th) {
      const int64_t t = th / H, h = th % H, cache = rows[t] * Hkv * S * D + (h / g) * S * D;
      attend_row(q.data() + th * D, K + cache, D, V + cache, D, positions[t] + 1, D, sc, p.data(), y + th * D);
    }
  });
}

// One decoding step of attention for batch-1-style caches, after the QKV product: from qkv
// [B, 1, (H + 2 Hkv) D], normalise (qk-norm weights, optional) and rotate Q and K heads, store K
// and V in cache slot `slot` of K, V [B, Hkv, S, D] (contiguous), attend over slots [0, read) with
// no mask, -> [B, 1, H D]. The ~15 small ATen ops this replaces (views, slices, two index copies,
// norms, rope, attention, transposes) cost ~40 us a layer at batch 1.
at::Tensor attn_step(const at::Tensor& qkv, const std::optional<at::Tensor>& qw, const std::optional<at::Tensor>& kw,
                     double eps, bool plus_one, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& K, const at::Tensor& V,
                     int64_t slot, int64_t read, double scale, int64_t H) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat && qkv.is_contiguous() && qkv.dim() == 3 &&
                  qkv.size(1) == 1, "slm_cpu.attn_step: qkv must be contiguous fp32 [B, 1, (H + 2 Hkv) D]");
  TORCH_CHECK(K.scalar_type() == at::kFloat && V.scalar_type() == at::kFloat && K.is_contiguous() && V.is_contiguous() &&
                  K.dim() == 4 && K.sizes() == V.sizes(), "slm_cpu.attn_step: K and V caches must be contiguous fp32 [B, Hkv, S, D]");
  const int64_t B = qkv.size(0), Hkv = K.size(1), S = K.size(2), D = K.size(3), rd = cos.size(-1);
  TORCH_CHECK(K.size(0) >= B && H % Hkv == 0 && qkv.size(2) == (H + 2 * Hkv) * D && slot >= 0 && slot < S &&
                  read > 0 && read <= S && rd <= D && rd % 2 == 0, "slm_cpu.attn_step: shapes do not match");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.numel() == B * rd && sin.numel() == B * rd, "slm_cpu.attn_step: cos and sin must be fp32 [B, 1, 1, rd]");
  for (const auto* w : {&qw, &kw})
    TORCH_CHECK(!w->has_value() || ((*w)->scalar_type() == at::kFloat && (*w)->is_contiguous() && (*w)->numel() == D),
                "slm_cpu.attn_step: norm weights must be fp32 [D]");
  auto y = at::empty({B, 1, H * D}, qkv.options());
  const float* src = qkv.const_data_ptr<float>();
  float *kp = K.mutable_data_ptr<float>(), *vp = V.mutable_data_ptr<float>(), *yp = y.mutable_data_ptr<float>();
  const float *cp = cos.const_data_ptr<float>(), *sp = sin.const_data_ptr<float>();
  const float* qwp = qw.has_value() ? qw->const_data_ptr<float>() : nullptr;
  const float* kwp = kw.has_value() ? kw->const_data_ptr<float>() : nullptr;
  for (int64_t b = 0; b < B; ++b)
    attn_step_row(src + b * (H + 2 * Hkv) * D, H, Hkv, D, rd, qwp, kwp, eps, plus_one, cp + b * rd, sp + b * rd,
                  kp + b * Hkv * S * D, vp + b * Hkv * S * D, S, slot, read, static_cast<float>(scale), yp + b * H * D);
  return y;
}

}  // namespace slm::cpu
