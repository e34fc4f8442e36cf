// Weight-only int4 linear layers for x86 CPUs with AVX2 + FMA.
//
// int4 (`linear_q4`): p uint8 [N, K/2], two weights a byte; in each block of 32 weights byte j holds
// weight j in its low nibble and weight j + 16 in its high one (GGUF's Q4_0/Q4_1 order). s and m fp16
// [N, K/G] (fp16, not fp32: at G = 32 that is 0.625 bytes a weight instead of 0.75): w[n, k] ~= s[n, g] * q[n, k] + m[n, g] with q in 0..15 (asymmetric, as Q4_1/Q4_K), so
//
//   y[b, n] = sum_g s[n, g] * sum_{k in g} x[b, k] q[n, k]  +  sum_g m[n, g] * xsum[b, g]
//
// where xsum, the sums of x over each group, is computed once per call.
//
// The loops are those of the int8 layers (matvec_int8.cpp): fp32 activations, software prefetch, the
// weights streamed once up to max_direct rows of x, dequantized blocks of rows and ATen's GEMM above.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "matvec.h"
#include "simd.h"

namespace slm::cpu {

// 16 packed bytes (32 weights) -> 4 x 8 floats in input order: low nibbles are weights 0..15,
// high nibbles 16..31.
inline void widen32_q4(const uint8_t* p, __m256 out[4]) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
  out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
  out[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  out[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

// As tile() for int4: R output rows against NB rows of x; xs [NB, ng] holds the group sums of x.
template <int R, int NB>
inline void tile_q4(const float* __restrict x, int64_t ldx, const float* __restrict xs, const uint8_t* __restrict p,
                    const uint16_t* __restrict s, const uint16_t* __restrict m, int64_t K, int64_t ng, int64_t n0,
                    float* __restrict y, int64_t ldy, const float* bias) {
  const int64_t nblk = K / QK, gb = nblk / ng, row = K / 2;
  const uint8_t* pr = p + n0 * row;
  const uint16_t* sr = s + n0 * ng;
  __m256 acc[R][NB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm256_setzero_ps();
  for (int64_t i = 0; i < (R * ng * 2 + 63) / 64; ++i)
    _mm_prefetch(reinterpret_cast<const char*>(sr) + PF / 8 + 64 * i, _MM_HINT_T1);
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const int64_t k0 = blk * QK;
    __m256 xv[NB][4];
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) xv[b][j] = _mm256_loadu_ps(x + b * ldx + k0 + 8 * j);
    const int64_t g = gb == 1 ? blk : blk / gb;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint8_t* pb = pr + r * row + k0 / 2;
      if ((blk & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(pb + PF), _MM_HINT_T1);
      __m256 w[4];
      widen32_q4(pb, w);
      const __m256 sv = _mm256_set1_ps(_cvtsh_ss(sr[r * ng + g]));
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) {
        __m256 t = _mm256_mul_ps(w[0], xv[b][0]);
        t = _mm256_fmadd_ps(w[1], xv[b][1], t);
        t = _mm256_fmadd_ps(w[2], xv[b][2], t);
        t = _mm256_fmadd_ps(w[3], xv[b][3], t);
        acc[r][b] = _mm256_fmadd_ps(sv, t, acc[r][b]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const uint16_t* mr = m + (n0 + r) * ng;
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) {
      float v = hsum(acc[r][b]);
      for (int64_t g = 0; g < ng; ++g) v += _cvtsh_ss(mr[g]) * xs[b * ng + g];
      y[b * ldy + n0 + r] = v + (bias ? bias[n0 + r] : 0.0f);
    }
  }
}

template <int R, int NB>
void rows_q4(const float* x, int64_t ldx, const float* xs, const uint8_t* p, const uint16_t* s, const uint16_t* m,
             int64_t K, int64_t ng, int64_t n_begin, int64_t n_end, float* y, int64_t ldy, const float* bias) {
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R) tile_q4<R, NB>(x, ldx, xs, p, s, m, K, ng, n, y, ldy, bias);
  for (; n < n_end; ++n) tile_q4<1, NB>(x, ldx, xs, p, s, m, K, ng, n, y, ldy, bias);
}

void matvec_range_q4(const float* x, const float* xs, int64_t B, int64_t K, const uint8_t* p, const uint16_t* s,
                     const uint16_t* m, int64_t ng, int64_t n_begin, int64_t n_end, float* y, int64_t N,
                     const float* bias) {
  constexpr int64_t CHUNK = 16;
  for (int64_t c0 = n_begin; c0 < n_end; c0 += CHUNK) {
    const int64_t c1 = std::min(c0 + CHUNK, n_end);
    for (int64_t b = 0; b < B;) {
      const float* xb = x + b * K;
      const float* xsb = xs + b * ng;
      float* yb = y + b * N;
      switch (std::min<int64_t>(B - b, 4)) {
        case 1: rows_q4<4, 1>(xb, K, xsb, p, s, m, K, ng, c0, c1, yb, N, bias); b += 1; break;
        case 2: rows_q4<2, 2>(xb, K, xsb, p, s, m, K, ng, c0, c1, yb, N, bias); b += 2; break;
        case 3: rows_q4<2, 3>(xb, K, xsb, p, s, m, K, ng, c0, c1, yb, N, bias); b += 3; break;
        default: rows_q4<1, 4>(xb, K, xsb, p, s, m, K, ng, c0, c1, yb, N, bias); b += 4; break;
      }
    }
  }
}

// y [B, N] (+ bias) for few rows of x [B, K], straight from the int4 weights.
void q4_direct(const float* xp, int64_t B, int64_t K, const uint8_t* pp, const uint16_t* sp, const uint16_t* mp, int64_t ng,
               int64_t N, float* yp, const float* bp) {
  const int64_t G = K / ng;
  std::vector<float> xs(B * ng);  // the group sums of x, for the mins
  for (int64_t i = 0; i < B * ng; ++i) {
    float v = 0.0f;
    for (int64_t k = 0; k < G; ++k) v += xp[i * G + k];
    xs[i] = v;
  }
  const int64_t grain = std::max<int64_t>(1, grain_rows(K / 2) / std::max<int64_t>(1, B / 4));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    matvec_range_q4(xp, xs.data(), B, K, pp, sp, mp, ng, n0, n1, yp, N, bp);
  });
}

void dequant_range_q4(const uint8_t* p, const uint16_t* s, const uint16_t* m, int64_t K, int64_t ng, int64_t n_begin,
                      int64_t n_end, float* out) {
  const int64_t nblk = K / QK, gb = nblk / ng;
  for (int64_t n = n_begin; n < n_end; ++n) {
    float* o = out + (n - n_begin) * K;
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const __m256 sv = _mm256_set1_ps(_cvtsh_ss(s[n * ng + blk / gb])), mv = _mm256_set1_ps(_cvtsh_ss(m[n * ng + blk / gb]));
      __m256 w[4];
      widen32_q4(p + n * (K / 2) + blk * QK / 2, w);
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(o + blk * QK + 8 * j, _mm256_fmadd_ps(sv, w[j], mv));
    }
  }
}

void check_q4(const at::Tensor& p, const at::Tensor& s, const at::Tensor& m) {
  TORCH_CHECK(p.device().is_cpu() && s.device().is_cpu() && m.device().is_cpu(), "slm_cpu: CPU tensors only");
  TORCH_CHECK(p.scalar_type() == at::kByte && p.dim() == 2 && p.is_contiguous() && (2 * p.size(1)) % QK == 0,
              "slm_cpu: packed int4 weight must be contiguous uint8 [N, K/2], K a multiple of 32");
  const int64_t nblk = 2 * p.size(1) / QK;
  for (const auto* t : {&s, &m})
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->dim() == 2 && t->size(0) == p.size(0) &&
                    t->size(1) >= 1 && nblk % t->size(1) == 0,
                "slm_cpu: int4 scales and mins must be contiguous fp16 [N, K/G], G a multiple of 32");
}

const uint16_t* half_ptr(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::Half>()); }

at::Tensor dequantize_q4(const at::Tensor& p, const at::Tensor& s, const at::Tensor& m) {
  check_q4(p, s, m);
  const int64_t N = p.size(0), K = 2 * p.size(1), ng = s.size(1);
  auto out = at::empty({N, K}, s.options().dtype(at::kFloat));
  const uint8_t* pp = p.const_data_ptr<uint8_t>();
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, N, grain_rows(K), [&](int64_t n0, int64_t n1) {
    dequant_range_q4(pp, half_ptr(s), half_ptr(m), K, ng, n0, n1, op + n0 * K);
  });
  return out;
}

at::Tensor compute_q4(const at::Tensor& x, const at::Tensor& p, const at::Tensor& s, const at::Tensor& m,
                      const at::Tensor& bias, int64_t max_direct) {
  const int64_t N = p.size(0), K = 2 * p.size(1), ng = s.size(1), B = x.size(0);
  auto y = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return y;
  const uint8_t* pp = p.const_data_ptr<uint8_t>();
  const uint16_t *sp = half_ptr(s), *mp = half_ptr(m);
  const float* xp = x.const_data_ptr<float>();
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float* yp = y.mutable_data_ptr<float>();
  if (B <= max_direct) {
    q4_direct(xp, B, K, pp, sp, mp, ng, N, yp, bp);
    return y;
  }
  const int64_t chunk = std::max<int64_t>(64, ((int64_t(1) << 20) / K + 63) / 64 * 64);
  auto wbuf = at::empty({std::min(chunk, N), K}, x.options());
  for (int64_t c0 = 0; c0 < N; c0 += chunk) {
    const int64_t c1 = std::min(c0 + chunk, N), n = c1 - c0;
    float* wp = wbuf.mutable_data_ptr<float>();
    at::parallel_for(c0, c1, grain_rows(K),
                     [&](int64_t n0, int64_t n1) { dequant_range_q4(pp, sp, mp, K, ng, n0, n1, wp + (n0 - c0) * K); });
    auto w = wbuf.narrow(0, 0, n);
    y.narrow(1, c0, n).copy_(bias.defined() ? at::addmm(bias.narrow(0, c0, n), x, w.t()) : at::mm(x, w.t()));
  }
  return y;
}

at::Tensor linear_q4(const at::Tensor& x_in, const at::Tensor& p, const at::Tensor& s, const at::Tensor& m,
                     const std::optional<at::Tensor>& bias_, int64_t max_direct) {
  check_q4(p, s, m);
  const int64_t N = p.size(0), K = 2 * p.size(1);
  at::Tensor x, bias;
  prepare(x_in, bias_, N, K, x, bias);
  at::Tensor y = compute_q4(x, p, s, m, bias, max_direct);
  return finish(x_in, y, N);
}

}  // namespace slm::cpu
