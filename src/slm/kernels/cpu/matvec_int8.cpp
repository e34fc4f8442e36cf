// Weight-only int8 linear layers for x86 CPUs with AVX2 + FMA (matvec_int4.cpp: int4).
//
// int8: q int8 [N, K], s fp32 [N, K/G], one scale per group of G consecutive input weights
// (G a multiple of 32, read from the shape of s: G = 32 is GGUF's Q8_0, G = K one scale per output
// channel), w[n, k] ~= s[n, k/G] * q[n, k].
//
//   y[b, n] = sum_blk s[n, blk/(G/32)] * sum_{k in blk of 32} x[b, k] * q[n, k]  (+ bias[n])
//
// Activations stay fp32: each int8 weight is widened to int32 and converted to fp32
// (vpmovsxbd + vcvtdq2ps), multiplied into a per-block fp32 sum with FMA, and the block sum is
// scaled into the row accumulator with one more FMA. At batch 1 the product reads 1.125 bytes per
// weight and is bound by memory bandwidth: on a 2-core AVX2 EPYC this loop computes ~18 G
// weights/s per core from L2, ~3x what one core can stream from DRAM, so the arithmetic keeps up
// and quantizing x for vpmaddubsw-style integer dot products would buy nothing but error. What
// does matter is software prefetch (PF bytes ahead, into L2): without it the hardware prefetchers
// leave the loop at about half the bandwidth.
//
// Up to max_direct rows of x (decode, short prompts): the weights are streamed once, 4 output rows
// at a time for one row of x, 16 rows at a time re-read from L1 for each group of 4 rows of x.
// Above it (prefill): blocks of weight rows are dequantized to fp32 and multiplied with ATen's
// GEMM. Threads: ATen's pool (at::parallel_for), split over output rows.

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

// 8 int8 weights -> 8 floats
inline __m256 widen8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// R consecutive output rows (n0 .. n0+R-1) against NB rows of x. y[b * ldy + n].
template <int R, int NB>
inline void tile(const float* __restrict x, int64_t ldx, const int8_t* __restrict q, const float* __restrict s,
                 int64_t K, int64_t ng, int64_t n0, float* __restrict y, int64_t ldy, const float* bias) {
  const int64_t nblk = K / QK, gb = nblk / ng;  // blocks of 32 per scale group
  const int8_t* qr = q + n0 * K;
  const float* sr = s + n0 * ng;
  __m256 acc[R][NB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm256_setzero_ps();
  // Software prefetch PF bytes ahead in the weight stream (and as far in the scales), into L2:
  // the hardware prefetchers alone leave this loop at half the memory bandwidth.
  for (int64_t i = 0; i < (R * ng * 4 + 63) / 64; ++i)
    _mm_prefetch(reinterpret_cast<const char*>(sr) + PF / 8 + 64 * i, _MM_HINT_T1);
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const int64_t k0 = blk * QK;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(qr + r * K + k0 + PF), _MM_HINT_T1);
    __m256 t[R][NB];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      __m256 xv[NB];
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) xv[b] = _mm256_loadu_ps(x + b * ldx + k0 + 8 * j);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 w = widen8(qr + r * K + k0 + 8 * j);
#pragma GCC unroll 8
        for (int b = 0; b < NB; ++b)
          t[r][b] = j == 0 ? _mm256_mul_ps(w, xv[b]) : _mm256_fmadd_ps(w, xv[b], t[r][b]);
      }
    }
    const int64_t g = gb == 1 ? blk : blk / gb;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 sv = _mm256_broadcast_ss(sr + r * ng + g);
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm256_fmadd_ps(sv, t[r][b], acc[r][b]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b)
      y[b * ldy + n0 + r] = hsum(acc[r][b]) + (bias ? bias[n0 + r] : 0.0f);
}

// Output rows [n_begin, n_end) for NB rows of x, R rows at a time, then one at a time.
template <int R, int NB>
void rows(const float* x, int64_t ldx, const int8_t* q, const float* s, int64_t K, int64_t ng, int64_t n_begin,
          int64_t n_end, float* y, int64_t ldy, const float* bias) {
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R) tile<R, NB>(x, ldx, q, s, K, ng, n, y, ldy, bias);
  for (; n < n_end; ++n) tile<1, NB>(x, ldx, q, s, K, ng, n, y, ldy, bias);
}

// All B rows of x against output rows [n_begin, n_end): batch in chunks of 4 (1..3 for the rest),
// each chunk re-reading the weight tile while it is still in L1.
void matvec_range(const float* x, int64_t B, int64_t K, const int8_t* q, const float* s, int64_t ng,
                  int64_t n_begin, int64_t n_end, float* y, int64_t N, const float* bias) {
  constexpr int64_t CHUNK = 16;  // output rows per pass: 16 * K bytes of weights stay in L1/L2
  for (int64_t c0 = n_begin; c0 < n_end; c0 += CHUNK) {
    const int64_t c1 = std::min(c0 + CHUNK, n_end);
    for (int64_t b = 0; b < B;) {
      const float* xb = x + b * K;
      float* yb = y + b * N;
      switch (std::min<int64_t>(B - b, 4)) {
        case 1: rows<4, 1>(xb, K, q, s, K, ng, c0, c1, yb, N, bias); b += 1; break;
        case 2: rows<2, 2>(xb, K, q, s, K, ng, c0, c1, yb, N, bias); b += 2; break;
        case 3: rows<2, 3>(xb, K, q, s, K, ng, c0, c1, yb, N, bias); b += 3; break;
        default: rows<1, 4>(xb, K, q, s, K, ng, c0, c1, yb, N, bias); b += 4; break;
      }
    }
  }
}

// fp32 rows [n_begin, n_end) of the dequantized weight into out (row stride K).
void dequant_range(const int8_t* q, const float* s, int64_t K, int64_t ng, int64_t n_begin, int64_t n_end,
                   float* out) {
  const int64_t nblk = K / QK, gb = nblk / ng;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* qr = q + n * K;
    float* o = out + (n - n_begin) * K;
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const __m256 sv = _mm256_broadcast_ss(s + n * ng + blk / gb);
      for (int j = 0; j < 4; ++j)
        _mm256_storeu_ps(o + blk * QK + 8 * j, _mm256_mul_ps(sv, widen8(qr + blk * QK + 8 * j)));
    }
  }
}

// y [B, N] (+ bias) for few rows of x [B, K], straight from the int8 weights.
void q8_direct(const float* xp, int64_t B, int64_t K, const int8_t* qp, const float* sp, int64_t ng, int64_t N, float* yp,
               const float* bp) {
  const int64_t grain = std::max<int64_t>(1, grain_rows(K) / std::max<int64_t>(1, B / 4));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { matvec_range(xp, B, K, qp, sp, ng, n0, n1, yp, N, bp); });
}

void check_q8(const at::Tensor& q, const at::Tensor& s) {
  TORCH_CHECK(q.device().is_cpu() && s.device().is_cpu(), "slm_cpu: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous(),
              "slm_cpu: qweight must be contiguous int8 [N, K]");
  TORCH_CHECK(q.size(1) % QK == 0, "slm_cpu: in_features must be a multiple of 32, got ", q.size(1));
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == 2 && s.size(0) == q.size(0) &&
                  s.size(1) >= 1 && (q.size(1) / QK) % s.size(1) == 0,
              "slm_cpu: scales must be contiguous fp32 [N, K/G], G a multiple of 32");
}

at::Tensor dequantize(const at::Tensor& q, const at::Tensor& s) {
  check_q8(q, s);
  const int64_t N = q.size(0), K = q.size(1), ng = s.size(1);
  auto out = at::empty({N, K}, q.options().dtype(at::kFloat));
  const int8_t* qp = q.const_data_ptr<int8_t>();
  const float* sp = s.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, N, grain_rows(K), [&](int64_t n0, int64_t n1) { dequant_range(qp, sp, K, ng, n0, n1, op + n0 * K); });
  return out;
}

// x [B, K] fp32 contiguous -> [B, N] fp32.
at::Tensor compute(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, const at::Tensor& bias,
                   int64_t max_direct) {
  const int64_t N = q.size(0), K = q.size(1), ng = s.size(1);
  const int64_t B = x.size(0);
  auto y = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return y;
  const int8_t* qp = q.const_data_ptr<int8_t>();
  const float* sp = s.const_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float* yp = y.mutable_data_ptr<float>();

  if (B <= max_direct) {
    q8_direct(xp, B, K, qp, sp, ng, N, yp, bp);
    return y;
  }
  // Prefill: a few MB of dequantized rows at a time, each multiplied by ATen's GEMM.
  const int64_t chunk = std::max<int64_t>(64, ((int64_t(1) << 20) / K + 63) / 64 * 64);
  auto wbuf = at::empty({std::min(chunk, N), K}, x.options());
  for (int64_t c0 = 0; c0 < N; c0 += chunk) {
    const int64_t c1 = std::min(c0 + chunk, N), n = c1 - c0;
    float* wp = wbuf.mutable_data_ptr<float>();
    at::parallel_for(c0, c1, grain_rows(K),
                     [&](int64_t n0, int64_t n1) { dequant_range(qp, sp, K, ng, n0, n1, wp + (n0 - c0) * K); });
    auto w = wbuf.narrow(0, 0, n);
    y.narrow(1, c0, n).copy_(bias.defined() ? at::addmm(bias.narrow(0, c0, n), x, w.t()) : at::mm(x, w.t()));
  }
  return y;
}


// x [..., K] (any float dtype) -> x as contiguous fp32 [rows, K]; bias (if any) as contiguous fp32 [N].
// (The int4 and GGUF layers use prepare and finish too.)
// Each ATen call below costs a dispatch (~1 us): skip those that would do nothing.
void prepare(const at::Tensor& x_in, const std::optional<at::Tensor>& bias_, int64_t N, int64_t K, at::Tensor& x,
             at::Tensor& bias) {
  TORCH_CHECK(x_in.device().is_cpu() && at::isFloatingType(x_in.scalar_type()) && x_in.dim() >= 1 && x_in.size(-1) == K,
              "slm_cpu.linear: x must be a floating-point CPU tensor [..., ", K, "]");
  x = x_in.dim() == 2 ? x_in : x_in.reshape({-1, K});
  if (x.scalar_type() != at::kFloat) x = x.to(at::kFloat);
  if (!x.is_contiguous()) x = x.contiguous();
  if (bias_.has_value() && bias_->defined()) {
    bias = *bias_;
    if (bias.scalar_type() != at::kFloat) bias = bias.to(at::kFloat);
    if (!bias.is_contiguous()) bias = bias.contiguous();
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == N, "slm_cpu.linear: bias must be [", N, "]");
  }
}

// y [rows, N] fp32 -> [..., N] in x's dtype.
at::Tensor finish(const at::Tensor& x_in, at::Tensor y, int64_t N) {
  if (x_in.dim() != 2) {
    auto out_shape = x_in.sizes().vec();
    out_shape.back() = N;
    y = y.view(out_shape);
  }
  return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
}

// x [..., K] (any float dtype) -> [..., N] in x's dtype, computed in fp32. Above max_direct rows
// of x: dequantize and GEMM.
at::Tensor linear(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& s,
                  const std::optional<at::Tensor>& bias_, int64_t max_direct) {
  check_q8(q, s);
  const int64_t N = q.size(0), K = q.size(1);
  at::Tensor x, bias;
  prepare(x_in, bias_, N, K, x, bias);
  return finish(x_in, compute(x, q, s, bias, max_direct), N);
}

}  // namespace slm::cpu
