// Weight-only int8 and int4 linear layers for x86 CPUs with AVX2 + FMA.
//
// int8: q int8 [N, K], s fp32 [N, K/G], one scale per group of G consecutive input weights
// (G a multiple of 32, read from the shape of s: G = 32 is GGUF's Q8_0, G = K one scale per output
// channel), w[n, k] ~= s[n, k/G] * q[n, k].
//
//   y[b, n] = sum_blk s[n, blk/(G/32)] * sum_{k in blk of 32} x[b, k] * q[n, k]  (+ bias[n])
//
// int4 (`linear_q4`): p uint8 [N, K/2], two weights a byte; in each block of 32 weights byte j holds
// weight j in its low nibble and weight j + 16 in its high one (GGUF's Q4_0/Q4_1 order). s and m fp16
// [N, K/G] (fp16, not fp32: at G = 32 that is 0.625 bytes a weight instead of 0.75): w[n, k] ~= s[n, g] * q[n, k] + m[n, g] with q in 0..15 (asymmetric, as Q4_1/Q4_K), so
//
//   y[b, n] = sum_g s[n, g] * sum_{k in g} x[b, k] q[n, k]  +  sum_g m[n, g] * xsum[b, g]
//
// where xsum, the sums of x over each group, is computed once per call.
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
//
// Registered as torch.ops.slm_q8.{linear, dequantize, linear_q4, dequantize_q4}; the GGUF-block
// products, the fp32 one-row product and the fused decoding helpers below register themselves too,
// and torch.classes.slm_q8.Decoder runs a whole batch-1 step (the end of this file).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/mm.h>
#include <torch/custom_class.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

namespace {

constexpr int64_t QK = 32;  // weights per scale
constexpr int64_t PF = 8192;  // prefetch distance in bytes of weights

inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// sum of a[i] * b[i] over n floats
inline float dot_f32(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float d = hsum(acc);
  for (; i < n; ++i) d += a[i] * b[i];
  return d;
}

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

// rows per parallel task: at least ~32 KB of weights, so small matrices do not pay for threads
int64_t grain_rows(int64_t K) { return std::max<int64_t>(16, (int64_t(1) << 15) / K); }

// y [B, N] (+ bias) for few rows of x [B, K], straight from the int8 weights.
void q8_direct(const float* xp, int64_t B, int64_t K, const int8_t* qp, const float* sp, int64_t ng, int64_t N, float* yp,
               const float* bp) {
  const int64_t grain = std::max<int64_t>(1, grain_rows(K) / std::max<int64_t>(1, B / 4));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { matvec_range(xp, B, K, qp, sp, ng, n0, n1, yp, N, bp); });
}

void check(const at::Tensor& q, const at::Tensor& s) {
  TORCH_CHECK(q.device().is_cpu() && s.device().is_cpu(), "slm_q8: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous(),
              "slm_q8: qweight must be contiguous int8 [N, K]");
  TORCH_CHECK(q.size(1) % QK == 0, "slm_q8: in_features must be a multiple of 32, got ", q.size(1));
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == 2 && s.size(0) == q.size(0) &&
                  s.size(1) >= 1 && (q.size(1) / QK) % s.size(1) == 0,
              "slm_q8: scales must be contiguous fp32 [N, K/G], G a multiple of 32");
}

at::Tensor dequantize(const at::Tensor& q, const at::Tensor& s) {
  check(q, s);
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
// Each ATen call below costs a dispatch (~1 us): skip those that would do nothing.
void prepare(const at::Tensor& x_in, const std::optional<at::Tensor>& bias_, int64_t N, int64_t K, at::Tensor& x,
             at::Tensor& bias) {
  TORCH_CHECK(x_in.device().is_cpu() && at::isFloatingType(x_in.scalar_type()) && x_in.dim() >= 1 && x_in.size(-1) == K,
              "slm_q8.linear: x must be a floating-point CPU tensor [..., ", K, "]");
  x = x_in.dim() == 2 ? x_in : x_in.reshape({-1, K});
  if (x.scalar_type() != at::kFloat) x = x.to(at::kFloat);
  if (!x.is_contiguous()) x = x.contiguous();
  if (bias_.has_value() && bias_->defined()) {
    bias = *bias_;
    if (bias.scalar_type() != at::kFloat) bias = bias.to(at::kFloat);
    if (!bias.is_contiguous()) bias = bias.contiguous();
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == N, "slm_q8.linear: bias must be [", N, "]");
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
  check(q, s);
  const int64_t N = q.size(0), K = q.size(1);
  at::Tensor x, bias;
  prepare(x_in, bias_, N, K, x, bias);
  return finish(x_in, compute(x, q, s, bias, max_direct), N);
}

// -- int4 --------------------------------------------------------------------------------------
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
  TORCH_CHECK(p.device().is_cpu() && s.device().is_cpu() && m.device().is_cpu(), "slm_q8: CPU tensors only");
  TORCH_CHECK(p.scalar_type() == at::kByte && p.dim() == 2 && p.is_contiguous() && (2 * p.size(1)) % QK == 0,
              "slm_q8: packed int4 weight must be contiguous uint8 [N, K/2], K a multiple of 32");
  const int64_t nblk = 2 * p.size(1) / QK;
  for (const auto* t : {&s, &m})
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->dim() == 2 && t->size(0) == p.size(0) &&
                    t->size(1) >= 1 && nblk % t->size(1) == 0,
                "slm_q8: int4 scales and mins must be contiguous fp16 [N, K/G], G a multiple of 32");
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

// fp32 matrix-vector product for decoding (one row of x): w [N, K] row-major, the same prefetching
// as the int8 loop. MKL's sgemv reaches 4-9 GB/s on the small matrices of a small model; this
// streams them closer to the memory bandwidth.
template <int R>
inline void tile_f32(const float* __restrict x, const float* __restrict w, int64_t K, int64_t n0,
                     float* __restrict y, const float* bias) {
  const float* wr = w + n0 * K;
  __m256 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(wr + r * K + k) + PF, _MM_HINT_T1);
    const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(wr + r * K + k), x0, acc[r]);
      acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(wr + r * K + k + 8), x1, acc[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float v = hsum(acc[r]);
    for (int64_t j = k; j < K; ++j) v += wr[r * K + j] * x[j];
    y[n0 + r] = v + (bias ? bias[n0 + r] : 0.0f);
  }
}

// y [N] (+ bias) = w [N, K] x [K].
void f32_direct(const float* xp, const float* wp, int64_t N, int64_t K, float* yp, const float* bp) {
  at::parallel_for(0, N, grain_rows(K * 4), [&](int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) tile_f32<4>(xp, wp, K, n, yp, bp);
    for (; n < n1; ++n) tile_f32<1>(xp, wp, K, n, yp, bp);
  });
}

// y [N] (+ bias) = x [K] W^T for W stored column-major: wt = W^T [K, N] contiguous (the LM head,
// see checkpoint/hf.py). Each thread owns a range of outputs and adds x[k] times row k of wt into
// it, four rows at a time, so every row segment is read once, in order.
void f32t_direct(const float* xp, const float* wt, int64_t N, int64_t K, float* yp, const float* bp) {
  at::parallel_for(0, (N + 7) / 8, std::max<int64_t>(64, (int64_t(1) << 15) / std::max<int64_t>(1, K)), [&](int64_t c0, int64_t c1) {
    const int64_t n0 = 8 * c0, n1 = std::min(N, 8 * c1);
    for (int64_t n = n0; n < n1; ++n) yp[n] = bp ? bp[n] : 0.0f;
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
      const float *w0 = wt + k * N, *w1 = w0 + N, *w2 = w1 + N, *w3 = w2 + N;
      const __m256 x0 = _mm256_set1_ps(xp[k]), x1 = _mm256_set1_ps(xp[k + 1]), x2 = _mm256_set1_ps(xp[k + 2]),
                   x3 = _mm256_set1_ps(xp[k + 3]);
      int64_t n = n0;
      for (; n + 8 <= n1; n += 8) {
        __m256 acc = _mm256_loadu_ps(yp + n);
        acc = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w0 + n), acc);
        acc = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w1 + n), acc);
        acc = _mm256_fmadd_ps(x2, _mm256_loadu_ps(w2 + n), acc);
        acc = _mm256_fmadd_ps(x3, _mm256_loadu_ps(w3 + n), acc);
        _mm256_storeu_ps(yp + n, acc);
      }
      for (; n < n1; ++n) yp[n] += xp[k] * w0[n] + xp[k + 1] * w1[n] + xp[k + 2] * w2[n] + xp[k + 3] * w3[n];
    }
    for (; k < K; ++k)
      for (int64_t n = n0; n < n1; ++n) yp[n] += xp[k] * wt[k * N + n];
  });
}

// x [1, K] or [K] fp32 -> [1, N] or [N].
at::Tensor matvec_f32(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias_) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.numel() == w.size(1),
              "slm_q8.matvec_f32: x must be one contiguous fp32 row");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2 && w.is_contiguous(), "slm_q8.matvec_f32: w must be contiguous fp32 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  const float* bp = nullptr;
  if (bias_.has_value() && bias_->defined()) {
    TORCH_CHECK(bias_->scalar_type() == at::kFloat && bias_->is_contiguous() && bias_->numel() == N, "slm_q8.matvec_f32: bad bias");
    bp = bias_->const_data_ptr<float>();
  }
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = at::empty(sizes, x.options());
  const float* xp = x.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  f32_direct(xp, wp, N, K, y.mutable_data_ptr<float>(), bp);
  return y;
}

// RMSNorm of each row of x [..., D] (fp32, contiguous): x * rsqrt(mean(x^2) + eps) * (w or 1 + w).
// One call instead of the six small kernels ATen runs, which matters at batch 1 (Gemma 3 runs six
// norms a layer). Sums in fp32 as the reference does.
// One row of RMSNorm: out = x / rms(x) * (w + add), add = 1 for Gemma's (1 + w). Returns 1 / rms(x).
inline float rms_row(const float* x, const float* w, int64_t D, double eps, float add, float* out) {
  const float inv = 1.0f / std::sqrt(dot_f32(x, x, D) / static_cast<float>(D) + static_cast<float>(eps));
  for (int64_t i = 0; i < D; ++i) out[i] = (x[i] * inv) * (w[i] + add);
  return inv;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, bool plus_one) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(), "slm_q8.rms_norm: x must be contiguous fp32");
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == D, "slm_q8.rms_norm: bad weight");
  auto y = at::empty(x.sizes(), x.options());
  const float* xp = x.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  const float add = plus_one ? 1.0f : 0.0f;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * D;
      float* yr = yp + r * D;
      rms_row(xr, wp, D, eps, add, yr);
    }
  });
  return y;
}

// -- GGUF blocks ------------------------------------------------------------------------------
// Linear layers kept in a GGUF file's own block formats, byte for byte: Q8_0 (34 bytes per 32
// weights), Q5_0 (22 per 32), Q4_K (144 per 256) and Q6_K (210 per 256), as ggml lays them out
// (ggml-common.h). One layer may hold several parts of different formats stacked by rows (a fused
// QKV whose V is Q8_0 and Q, K Q5_0): `blocks` is their bytes end to end, part i rows[i] rows of
// types[i].
//
// Up to max_direct rows of x, x is quantized to int8 in blocks of 32 (scale amax / 127, rounded to
// nearest even, as llama.cpp's q8_0 activations) and each block of weights is dotted with it in
// integers (vpmaddubsw + vpmaddwd), then scaled by the two block scales in fp32; Q4_K's minimums
// use the sums of the quantized x per block. Each thread walks one contiguous range of rows, so
// the weights arrive as one sequential stream per core: on the 2-core EPYC that reaches the
// memory bandwidth (~16 GB/s), where reading 2-4 rows side by side (several streams, as the int8
// tile above) drew half of it. Above max_direct rows: dequantize blocks of rows to fp32 and GEMM.
// The PyTorch fallback (slm.quantize_gguf) computes the same: the same int8 x, the file's weights
// dequantized by gguf.quants.

constexpr int64_t T_Q8_0 = 8, T_Q5_0 = 6, T_Q4_K = 12, T_Q6_K = 14;
// Q5_0 with its blocks regrouped by 4 (slm's order, the same 22 bytes a block): per group of 4
// blocks the 4 fp16 scales (8 bytes), the 4 x 32 high bits as one 16-byte plane (byte j, bit i: weight
// j of block i; bit 4 + i: weight j + 16 of block i), then the 4 blocks' 16 bytes of low nibbles.
// A row's last K/32 % 4 blocks stay in Q5_0's own layout. The plane spreads to the weights' bytes in
// 2 instructions a block, where Q5_0's 32-bit masks take 5, and the scales convert 4 at a time: the
// loop does ~11 vector operations a block instead of ~19, enough to keep up with the memory.
constexpr int64_t T_Q5_0R4 = 1006;

inline int64_t block_weights(int64_t t) { return t == T_Q4_K || t == T_Q6_K ? 256 : 32; }
inline int64_t block_bytes(int64_t t) {
  switch (t) {
    case T_Q8_0: return 34;
    case T_Q5_0: return 22;
    case T_Q5_0R4: return 22;
    case T_Q4_K: return 144;
    case T_Q6_K: return 210;
    default: TORCH_CHECK(false, "slm_q8: unsupported GGUF block type ", t);
  }
  return 0;
}
#define SLM_INLINE inline __attribute__((always_inline))
SLM_INLINE float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// |x| and sign-adjusted w for vpmaddubsw (unsigned x signed): x . w in 8 int32 lanes. |w|, |x| <= 127.
SLM_INLINE __m256i dot_i8(__m256i w, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x)), _mm256_set1_epi16(1));
}
// unsigned w (0..127) . signed x in 8 int32 lanes
SLM_INLINE __m256i dot_u8(__m256i w, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
}
SLM_INLINE __m256i bytes_from_bits_32(const uint8_t* p) {  // byte j = 0xFF where bit j of p's 32 bits is set
  uint32_t v;
  std::memcpy(&v, p, 4);
  const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  const __m256i bytes = _mm256_or_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(int(v)), shuf),
                                        _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
}
SLM_INLINE __m256i nibbles_32(const uint8_t* p) {  // 16 bytes -> 32 nibbles: low ones, then high ones
  const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0F));
}

// Scales and minimums of one Q4_K super-block (8 sub-blocks of 32, 6 bits each, packed in 12
// bytes) as two vectors of 8 int32, unpacked in general registers (ggml's utmp trick): writing
// them to memory one by one and loading them as a vector stalls on store forwarding.
SLM_INLINE void q4k_scales(const uint8_t* sc, __m256i& s, __m256i& m) {
  uint32_t u[3];
  std::memcpy(u, sc, 12);
  const uint32_t k1 = 0x3f3f3f3f, k2 = 0x0f0f0f0f, k3 = 0x03030303;
  const uint32_t s0 = u[0] & k1, s1 = (u[2] & k2) | (((u[0] >> 6) & k3) << 4);
  const uint32_t m0 = u[1] & k1, m1 = ((u[2] >> 4) & k2) | (((u[1] >> 6) & k3) << 4);
  s = _mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, int(s1), int(s0)));
  m = _mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, int(m1), int(m0)));
}

// One row of weights (type T, nb32 blocks of 32) against NB rows of quantized x (row stride ldq
// for xq, ldb for the per-block dx and xs): out[b] = sum_k w[k] * x_b[k]. U independent
// accumulators per row of x: one would chain every block's FMA on the last (4 cycles each), which
// bounded this loop below the memory bandwidth.
template <int64_t T, int NB>
SLM_INLINE void dot_row(const uint8_t* __restrict w, const int8_t* __restrict xq, int64_t ldq, const float* __restrict dx,
                    const float* __restrict xs, int64_t ldb, int64_t nb32, float* out) {
  constexpr int U = NB == 1 ? 4 : 2;
  __m256 acc[NB][U], macc[NB];
#pragma GCC unroll 4
  for (int b = 0; b < NB; ++b) {
    macc[b] = _mm256_setzero_ps();
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) acc[b][u] = _mm256_setzero_ps();
  }
  if constexpr (T == T_Q8_0 || T == T_Q5_0) {
    constexpr int64_t BB = T == T_Q8_0 ? 34 : 22;
    auto weights = [](const uint8_t* p) __attribute__((always_inline)) {
      if constexpr (T == T_Q8_0) {
        return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2));
      } else {
        const __m256i hi = _mm256_andnot_si256(bytes_from_bits_32(p + 2), _mm256_set1_epi8(char(0xF0)));
        return _mm256_or_si256(nibbles_32(p + 6), hi);  // q - 16 in -16..15
      }
    };
    int64_t blk = 0;
    for (; blk + U <= nb32; blk += U, w += U * BB) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        const uint8_t* p = w + u * BB;
        const __m256i q = weights(p);
        const float d = f16(p);
#pragma GCC unroll 4
        for (int b = 0; b < NB; ++b) {
          const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * ldq + (blk + u) * 32));
          acc[b][u] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx[b * ldb + blk + u]), _mm256_cvtepi32_ps(dot_i8(q, x)), acc[b][u]);
        }
      }
    }
    for (; blk < nb32; ++blk, w += BB) {
      const __m256i q = weights(w);
      const float d = f16(w);
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * ldq + blk * 32));
        acc[b][0] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx[b * ldb + blk]), _mm256_cvtepi32_ps(dot_i8(q, x)), acc[b][0]);
      }
    }
  } else if constexpr (T == T_Q5_0R4) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), b4 = _mm256_set1_epi8(0x10);
    __m128 corr[NB];  // sum over blocks of d * dx * sum(xq): the -16 of every weight
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) corr[b] = _mm_setzero_ps();
    int64_t blk = 0;
    for (; blk + 4 <= nb32; blk += 4, w += 88) {
      const __m128 d4 = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w)));
      const __m128i p = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 8));
      const __m256i plane = _mm256_set_m128i(_mm_srli_epi16(p, 4), p);
      __m256i q[4];
      q[0] = _mm256_or_si256(nibbles_32(w + 24), _mm256_and_si256(_mm256_slli_epi16(plane, 4), b4));
      q[1] = _mm256_or_si256(nibbles_32(w + 40), _mm256_and_si256(_mm256_slli_epi16(plane, 3), b4));
      q[2] = _mm256_or_si256(nibbles_32(w + 56), _mm256_and_si256(_mm256_slli_epi16(plane, 2), b4));
      q[3] = _mm256_or_si256(nibbles_32(w + 72), _mm256_and_si256(_mm256_slli_epi16(plane, 1), b4));
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) {
        alignas(16) float sd[4];
        _mm_store_ps(sd, _mm_mul_ps(d4, _mm_loadu_ps(dx + b * ldb + blk)));
        corr[b] = _mm_fmadd_ps(d4, _mm_loadu_ps(xs + b * ldb + blk), corr[b]);
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * ldq + (blk + i) * 32));
          acc[b][i % U] = _mm256_fmadd_ps(_mm256_broadcast_ss(sd + i), _mm256_cvtepi32_ps(dot_u8(q[i], x)), acc[b][i % U]);
        }
      }
    }
    for (; blk < nb32; ++blk, w += 22) {  // the row's last blocks, in Q5_0's layout
      const __m256i hi = _mm256_andnot_si256(bytes_from_bits_32(w + 2), _mm256_set1_epi8(char(0xF0)));
      const __m256i q = _mm256_or_si256(nibbles_32(w + 6), hi);
      const float d = f16(w);
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * ldq + blk * 32));
        acc[b][0] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx[b * ldb + blk]), _mm256_cvtepi32_ps(dot_i8(q, x)), acc[b][0]);
      }
    }
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) {
      __m128 c = _mm_hadd_ps(corr[b], corr[b]);
      c = _mm_hadd_ps(c, c);
      macc[b] = _mm256_set_ps(0, 0, 0, 0, 0, 0, 0, 16.0f * _mm_cvtss_f32(c));
    }
  } else if constexpr (T == T_Q4_K) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int64_t sb = 0; sb < nb32 / 8; ++sb, w += 144) {
      __m256i si, mi;
      q4k_scales(w + 4, si, mi);
      const __m256 sf = _mm256_mul_ps(_mm256_set1_ps(f16(w)), _mm256_cvtepi32_ps(si));
      const __m256 mf = _mm256_mul_ps(_mm256_set1_ps(f16(w + 2)), _mm256_cvtepi32_ps(mi));
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) {
        alignas(32) float sd[8];  // d * sc_j * dx_j, for the 8 sub-blocks
        _mm256_store_ps(sd, _mm256_mul_ps(sf, _mm256_loadu_ps(dx + b * ldb + sb * 8)));
        macc[b] = _mm256_fmadd_ps(mf, _mm256_loadu_ps(xs + b * ldb + sb * 8), macc[b]);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 + 32 * j));
          const __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
          const int8_t* x = xq + b * ldq + (sb * 8 + 2 * j) * 32;
          const __m256i p0 = dot_u8(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
          const __m256i p1 = dot_u8(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32)));
          acc[b][(2 * j) % U] = _mm256_fmadd_ps(_mm256_broadcast_ss(sd + 2 * j), _mm256_cvtepi32_ps(p0), acc[b][(2 * j) % U]);
          acc[b][(2 * j + 1) % U] = _mm256_fmadd_ps(_mm256_broadcast_ss(sd + 2 * j + 1), _mm256_cvtepi32_ps(p1), acc[b][(2 * j + 1) % U]);
        }
      }
    }
  } else if constexpr (T == T_Q6_K) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), c32 = _mm256_set1_epi8(32);
    for (int64_t sb = 0; sb < nb32 / 8; ++sb, w += 210) {
      const float d = f16(w + 208);
      const int8_t* sc = reinterpret_cast<const int8_t*>(w + 192);
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const uint8_t* ql = w + 64 * h;
        const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
        const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
        const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 128 + 32 * h));
        __m256i q[4];
        q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x03)), 4));
        q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x0C)), 2));
        q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(qh, _mm256_set1_epi8(0x30)));
        q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                               _mm256_srli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(char(0xC0))), 2));
        const int8_t* s = sc + 8 * h;
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const __m256i qs = _mm256_sub_epi8(q[j], c32);  // -32..31
          // 16 weights a scale: int16 pair sums 0..7 take s[2j], 8..15 s[2j + 1]
          const __m256i scv = _mm256_set_m128i(_mm_set1_epi16(s[2 * j + 1]), _mm_set1_epi16(s[2 * j]));
          const int64_t blk = sb * 8 + 4 * h + j;
#pragma GCC unroll 4
          for (int b = 0; b < NB; ++b) {
            const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * ldq + blk * 32));
            const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(qs, x)), scv);
            acc[b][j % U] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx[b * ldb + blk]), _mm256_cvtepi32_ps(p), acc[b][j % U]);
          }
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int b = 0; b < NB; ++b) {
    __m256 a = acc[b][0];
#pragma GCC unroll 4
    for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[b][u]);
    out[b] = hsum(_mm256_sub_ps(a, macc[b]));
  }
}

// fp32 dequantization of one row (K weights) of type t, as ggml's dequantize_row_*.
void dequant_row(int64_t t, const uint8_t* w, int64_t K, float* o) {
  if (t == T_Q8_0) {
    for (int64_t i = 0; i < K / 32; ++i, w += 34) {
      const float d = f16(w);
      for (int j = 0; j < 32; ++j) o[32 * i + j] = d * float(int8_t(w[2 + j]));
    }
  } else if (t == T_Q5_0) {
    for (int64_t i = 0; i < K / 32; ++i, w += 22) {
      const float d = f16(w);
      uint32_t qh;
      std::memcpy(&qh, w + 2, 4);
      for (int j = 0; j < 16; ++j) {
        const int lo = (w[6 + j] & 0x0F) | (((qh >> j) << 4) & 0x10);
        const int hi = (w[6 + j] >> 4) | ((qh >> (j + 12)) & 0x10);
        o[32 * i + j] = d * float(lo - 16), o[32 * i + j + 16] = d * float(hi - 16);
      }
    }
  } else if (t == T_Q5_0R4) {
    int64_t i = 0;
    for (; i + 4 <= K / 32; i += 4, w += 88) {
      for (int g = 0; g < 4; ++g) {
        const float d = f16(w + 2 * g);
        for (int j = 0; j < 16; ++j) {
          const int lo = (w[24 + 16 * g + j] & 0x0F) | (((w[8 + j] >> g) & 1) << 4);
          const int hi = (w[24 + 16 * g + j] >> 4) | (((w[8 + j] >> (4 + g)) & 1) << 4);
          o[32 * (i + g) + j] = d * float(lo - 16), o[32 * (i + g) + j + 16] = d * float(hi - 16);
        }
      }
    }
    if (i < K / 32) dequant_row(T_Q5_0, w, K - 32 * i, o + 32 * i);
  } else if (t == T_Q4_K) {
    for (int64_t i = 0; i < K / 256; ++i, w += 144) {
      const float d = f16(w), dmin = f16(w + 2);
      const uint8_t* sc = w + 4;
      for (int j = 0; j < 8; ++j) {
        int s, m;
        if (j < 4) s = sc[j] & 63, m = sc[j + 4] & 63;
        else s = (sc[j + 4] & 0x0F) | ((sc[j - 4] >> 6) << 4), m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
        const uint8_t* q = w + 16 + 32 * (j / 2);
        for (int l = 0; l < 32; ++l)
          o[256 * i + 32 * j + l] = d * s * float(j % 2 ? q[l] >> 4 : q[l] & 0x0F) - dmin * m;
      }
    }
  } else if (t == T_Q6_K) {
    for (int64_t i = 0; i < K / 256; ++i, w += 210) {
      const float d = f16(w + 208);
      const int8_t* sc = reinterpret_cast<const int8_t*>(w + 192);
      for (int h = 0; h < 2; ++h) {
        const uint8_t *ql = w + 64 * h, *qh = w + 128 + 32 * h;
        const int8_t* s = sc + 8 * h;
        float* y = o + 256 * i + 128 * h;
        for (int l = 0; l < 32; ++l) {
          const int is = l / 16;
          y[l] = d * s[is] * float(((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32);
          y[l + 32] = d * s[is + 2] * float(((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32);
          y[l + 64] = d * s[is + 4] * float(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
          y[l + 96] = d * s[is + 6] * float(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
      }
    }
  } else {
    TORCH_CHECK(false, "slm_q8: unsupported GGUF block type ", t);
  }
}

struct Parts {  // where each part's rows start, in rows and in bytes
  std::vector<int64_t> types, row0, byte0, row_bytes;
  int64_t N = 0;
  Parts(const at::Tensor& blocks, at::IntArrayRef types_, at::IntArrayRef rows, int64_t K) {
    TORCH_CHECK(blocks.device().is_cpu() && blocks.scalar_type() == at::kByte && blocks.dim() == 1 && blocks.is_contiguous(),
                "slm_q8: GGUF blocks must be a contiguous uint8 CPU tensor");
    TORCH_CHECK(types_.size() == rows.size() && !rows.empty(), "slm_q8: one type per part");
    int64_t bytes = 0;
    for (size_t i = 0; i < rows.size(); ++i) {
      const int64_t t = types_[i];
      TORCH_CHECK(K > 0 && K % block_weights(t) == 0, "slm_q8: in_features ", K, " is not a whole number of blocks of type ", t);
      types.push_back(t), row0.push_back(N), byte0.push_back(bytes), row_bytes.push_back(K / block_weights(t) * block_bytes(t));
      N += rows[i], bytes += rows[i] * row_bytes.back();
    }
    TORCH_CHECK(blocks.numel() == bytes, "slm_q8: GGUF blocks hold ", blocks.numel(), " bytes, the parts need ", bytes);
  }
  int64_t part(int64_t n) const {
    int64_t p = 0;
    while (p + 1 < int64_t(types.size()) && n >= row0[p + 1]) ++p;
    return p;
  }
};

// Quantize B rows of x [B, K] to int8 blocks of 32: xq [B, K], dx and xs (dx * sum of the block) [B, K/32].
void quantize_x(const float* x, int64_t B, int64_t K, int8_t* xq, float* dx, float* xs) {
  for (int64_t i = 0; i < B * K / 32; ++i) {
    const float* xb = x + 32 * i;
    __m256 mx = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int j = 0; j < 4; ++j) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + 8 * j)));
    const float d = hmax(mx) / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    // round to nearest even (vcvtps2dq under the default rounding mode), as torch.round
    const __m256 iv = _mm256_set1_ps(id);
    __m256i q[4];
    for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 8 * j), iv));
    const __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    // int32 -> int8 in order: packs interleave the 128-bit lanes, the permute puts them back
    const __m256i p16 = _mm256_packs_epi32(q[0], q[1]), p16b = _mm256_packs_epi32(q[2], q[3]);
    const __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16, p16b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + 32 * i), p8);
    dx[i] = d, xs[i] = d * float(_mm_cvtsi128_si32(s4));
  }
}

// Prefetch distance in bytes for the GGUF-block rows (SLM_PREFETCH overrides it, 0: none).
int64_t prefetch_bytes() {
  static const int64_t v = [] {
    const char* e = std::getenv("SLM_PREFETCH");
    return e ? std::max<int64_t>(0, std::atoll(e)) : int64_t(4096);
  }();
  return v;
}

template <int64_t T>
void rows_gguf(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, const int8_t* xq, const float* dx,
               const float* xs, int64_t B, int64_t K, float* y, int64_t ldy, const float* bias, int64_t bias0) {
  const int64_t nb32 = K / 32;
  const int64_t pf = prefetch_bytes();
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * row_bytes;
    // Software prefetch, pf bytes ahead in this thread's stream: the decoding of Q5_0/Q4_K/Q6_K
    // blocks is slow enough that the hardware prefetchers alone let the loop wait on memory.
    if (pf)
      for (int64_t i = 0; i < row_bytes; i += 64) _mm_prefetch(reinterpret_cast<const char*>(wr + pf + i), _MM_HINT_T0);
    for (int64_t b = 0; b < B;) {
      float out[4];
      const int64_t nb = std::min<int64_t>(B - b, 4);
      const int8_t* xb = xq + b * K;
      switch (nb) {
        case 1: dot_row<T, 1>(wr, xb, K, dx + b * nb32, xs + b * nb32, nb32, nb32, out); break;
        case 2: dot_row<T, 2>(wr, xb, K, dx + b * nb32, xs + b * nb32, nb32, nb32, out); break;
        case 3: dot_row<T, 3>(wr, xb, K, dx + b * nb32, xs + b * nb32, nb32, nb32, out); break;
        default: dot_row<T, 4>(wr, xb, K, dx + b * nb32, xs + b * nb32, nb32, nb32, out); break;
      }
      for (int64_t i = 0; i < nb; ++i) y[(b + i) * ldy + bias0 + n] = out[i] + (bias ? bias[bias0 + n] : 0.0f);
      b += nb;
    }
  }
}

// fp32 rows [n0, n1) of the stacked parts into out (row stride K).
void dequant_rows(const Parts& P, const uint8_t* bp, int64_t K, int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t p = P.part(n);
    dequant_row(P.types[p], bp + P.byte0[p] + (n - P.row0[p]) * P.row_bytes[p], K, out + (n - n0) * K);
  }
}

at::Tensor dequantize_gguf(const at::Tensor& blocks, at::IntArrayRef types, at::IntArrayRef rows, int64_t K,
                           const at::Tensor& ids) {
  const Parts P(blocks, types, rows, K);
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.is_contiguous(), "slm_q8: ids must be int64 [n]");
  const int64_t n = ids.size(0);
  const int64_t* ip = ids.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < P.N, "slm_q8: row ", ip[i], " out of range");
  auto out = at::empty({n, K}, blocks.options().dtype(at::kFloat));
  const uint8_t* bp = blocks.const_data_ptr<uint8_t>();
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, n, grain_rows(K), [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) dequant_rows(P, bp, K, ip[i], ip[i] + 1, op + i * K);
  });
  return out;
}

// y [B, N] (+ bias) for B rows of x [B, K]: x quantized to int8 blocks, then each thread streams
// one contiguous range of weight rows (the direct path, for few rows of x).
void gguf_direct(const Parts& P, const uint8_t* bp, const float* x, int64_t B, int64_t K, float* yp, const float* bias_p) {
  const int64_t N = P.N;
  std::vector<int8_t> xq(B * K);
  std::vector<float> dx(B * K / 32), xs(B * K / 32);
  quantize_x(x, B, K, xq.data(), dx.data(), xs.data());
  // rows per task: ~64 KB of weights
  const int64_t grain = std::max<int64_t>(8, (int64_t(1) << 16) / std::max<int64_t>(1, P.row_bytes[0]));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (size_t p = 0; p < P.types.size(); ++p) {
      const int64_t a = std::max(n0, P.row0[p]), b = std::min(n1, P.row0[p] + (p + 1 < P.types.size() ? P.row0[p + 1] - P.row0[p] : N - P.row0[p]));
      if (a >= b) continue;
      const uint8_t* w = bp + P.byte0[p];
      const int64_t r0 = P.row0[p], rb = P.row_bytes[p];
      switch (P.types[p]) {
        case T_Q8_0: rows_gguf<T_Q8_0>(w, rb, a - r0, b - r0, xq.data(), dx.data(), xs.data(), B, K, yp, N, bias_p, r0); break;
        case T_Q5_0: rows_gguf<T_Q5_0>(w, rb, a - r0, b - r0, xq.data(), dx.data(), xs.data(), B, K, yp, N, bias_p, r0); break;
        case T_Q5_0R4: rows_gguf<T_Q5_0R4>(w, rb, a - r0, b - r0, xq.data(), dx.data(), xs.data(), B, K, yp, N, bias_p, r0); break;
        case T_Q4_K: rows_gguf<T_Q4_K>(w, rb, a - r0, b - r0, xq.data(), dx.data(), xs.data(), B, K, yp, N, bias_p, r0); break;
        default: rows_gguf<T_Q6_K>(w, rb, a - r0, b - r0, xq.data(), dx.data(), xs.data(), B, K, yp, N, bias_p, r0); break;
      }
    }
  });
}

at::Tensor linear_gguf(const at::Tensor& x_in, const at::Tensor& blocks, at::IntArrayRef types, at::IntArrayRef rows,
                       int64_t K, const std::optional<at::Tensor>& bias_, int64_t max_direct) {
  const Parts P(blocks, types, rows, K);
  const int64_t N = P.N;
  at::Tensor x, bias;
  prepare(x_in, bias_, N, K, x, bias);
  const int64_t B = x.size(0);
  auto y = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return finish(x_in, y, N);
  const uint8_t* bp = blocks.const_data_ptr<uint8_t>();
  const float* bias_p = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float* yp = y.mutable_data_ptr<float>();
  if (B <= max_direct) {
    gguf_direct(P, bp, x.const_data_ptr<float>(), B, K, yp, bias_p);
    return finish(x_in, y, N);
  }
  const int64_t chunk = std::max<int64_t>(64, ((int64_t(1) << 20) / K + 63) / 64 * 64);
  auto wbuf = at::empty({std::min(chunk, N), K}, x.options());
  for (int64_t c0 = 0; c0 < N; c0 += chunk) {
    const int64_t c1 = std::min(c0 + chunk, N), n = c1 - c0;
    float* wp = wbuf.mutable_data_ptr<float>();
    at::parallel_for(c0, c1, 16, [&](int64_t n0, int64_t n1) { dequant_rows(P, bp, K, n0, n1, wp + (n0 - c0) * K); });
    auto w = wbuf.narrow(0, 0, n);
    y.narrow(1, c0, n).copy_(bias.defined() ? at::addmm(bias.narrow(0, c0, n), x, w.t()) : at::mm(x, w.t()));
  }
  return finish(x_in, y, N);
}

// -- decoding helpers ---------------------------------------------------------------------------
// At batch 1 a Gemma 3 layer runs ~40 small ATen ops around its 4 matrix products, ~5 us each:
// as long as the products themselves for gemma-3-270m. These fuse the common ones, fp32 on the CPU.

// RMSNorm of each row (head) of x [B, H, T, D], then the rotary embedding of its first rd dims:
// y = n * cos + roll(n, rd/2) * sin with cos, sin [B, 1, T, rd] (sin carrying the sign), as
// model.apply_rope(norm(x)).
at::Tensor rms_norm_rope(const at::Tensor& x, const at::Tensor& w, double eps, bool plus_one, const at::Tensor& cos,
                         const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 4,
              "slm_q8.rms_norm_rope: x must be contiguous fp32 [B, H, T, D]");
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), rd = cos.size(-1);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == D, "slm_q8.rms_norm_rope: bad weight");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.dim() == 4 && cos.sizes() == sin.sizes() && cos.size(0) == B && cos.size(1) == 1 && cos.size(2) == T &&
                  rd <= D && rd % 2 == 0,
              "slm_q8.rms_norm_rope: cos and sin must be contiguous fp32 [B, 1, T, rd]");
  auto y = at::empty(x.sizes(), x.options());
  const float *xp = x.const_data_ptr<float>(), *wp = w.const_data_ptr<float>();
  const float *cp = cos.const_data_ptr<float>(), *sp = sin.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  const float add = plus_one ? 1.0f : 0.0f;
  std::vector<float> n(D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t r = (b * H + h) * T + t;
        const float* xr = xp + r * D;
        float* yr = yp + r * D;
        rms_row(xr, wp, D, eps, add, n.data());
        const float *c = cp + (b * T + t) * rd, *s = sp + (b * T + t) * rd;
        const int64_t half = rd / 2;
        for (int64_t i = 0; i < rd; ++i) yr[i] = n[i] * c[i] + n[i < half ? i + half : i - half] * s[i];
        for (int64_t i = rd; i < D; ++i) yr[i] = n[i];
      }
  return y;
}

// residual + RMSNorm(x): Gemma 3's sandwich norms, x = x + post_norm(branch).
at::Tensor rms_norm_add(const at::Tensor& x, const at::Tensor& w, double eps, bool plus_one, const at::Tensor& residual) {
  TORCH_CHECK(residual.scalar_type() == at::kFloat && residual.is_contiguous() && residual.sizes() == x.sizes(),
              "slm_q8.rms_norm_add: residual must be contiguous fp32 shaped as x");
  auto y = rms_norm(x, w, eps, plus_one);
  float* yp = y.mutable_data_ptr<float>();
  const float* rp = residual.const_data_ptr<float>();
  for (int64_t i = 0; i < y.numel(); ++i) yp[i] += rp[i];
  return y;
}

// exp for 8 floats (Cephes' polynomial, ~1 ulp), for the GELU below.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// o = gelu_tanh(g) * u over F values (u null: gelu_tanh(g) alone).
inline void gelu_tanh_mul_row(const float* g, const float* u, float* o, int64_t F) {
  const float k0 = 0.7978845608028654f, k1 = 0.044715f;
  int64_t i = 0;
  for (; i + 8 <= F; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 inner = _mm256_mul_ps(_mm256_set1_ps(k0), _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(k1), gv), _mm256_mul_ps(gv, gv), gv));
    // 0.5 * (1 + tanh(z)) = 1 / (1 + exp(-2z))
    const __m256 half1p = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0f), inner))));
    const __m256 a = _mm256_mul_ps(gv, half1p);
    _mm256_storeu_ps(o + i, u ? _mm256_mul_ps(a, _mm256_loadu_ps(u + i)) : a);
  }
  for (; i < F; ++i) {
    const float v = g[i];
    const float a = 0.5f * v * (1.0f + std::tanh(k0 * (v + k1 * v * v * v)));
    o[i] = u ? a * u[i] : a;
  }
}

// x [..., 2F] = [gate | up] -> gelu_tanh(gate) * up [..., F], as F.gelu(gate, approximate="tanh") * up.
at::Tensor gelu_tanh_mul(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(-1) % 2 == 0,
              "slm_q8.gelu_tanh_mul: x must be contiguous fp32 [..., 2F]");
  const int64_t F2 = x.size(-1), F = F2 / 2, rows = F2 ? x.numel() / F2 : 0;
  auto sizes = x.sizes().vec();
  sizes.back() = F;
  auto y = at::empty(sizes, x.options());
  const float* xp = x.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) gelu_tanh_mul_row(xp + r * F2, xp + r * F2 + F, yp + r * F, F);
  return y;
}

// One query row against S cached keys and values (rows ks and vs floats apart):
// o = softmax(q K^T * sc) V, softmax in fp32; p holds S floats of scratch.
inline void attend_row(const float* qr, const float* kb, int64_t ks, const float* vb, int64_t vs, int64_t S,
                       int64_t D, float sc, float* p, float* o) {
  float mx = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    p[s] = dot_f32(qr, kb + s * ks, D) * sc;
    mx = std::max(mx, p[s]);
  }
  float sum = 0.0f;
  for (int64_t s = 0; s < S; ++s) sum += (p[s] = std::exp(p[s] - mx));
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < D; ++i) o[i] = 0.0f;
  for (int64_t s = 0; s < S; ++s) {
    const float* vr = vb + s * vs;
    const __m256 ps = _mm256_set1_ps(p[s] * inv);
    int64_t i = 0;
    for (; i + 8 <= D; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(ps, _mm256_loadu_ps(vr + i), _mm256_loadu_ps(o + i)));
    for (; i < D; ++i) o[i] += p[s] * inv * vr[i];
  }
}

// Attention of one new query per sequence over S cached keys, no mask: q [B, H, 1, D], k and v
// [B, Hkv, S, D] (any strides with the last dimension contiguous), H a multiple of Hkv (grouped
// queries). Softmax in fp32. -> [B, H, 1, D], as F.scaled_dot_product_attention.
at::Tensor attn_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                  v.scalar_type() == at::kFloat && q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1 &&
                  q.is_contiguous() && k.stride(3) == 1 && v.stride(3) == 1,
              "slm_q8.attn_decode: q contiguous fp32 [B, H, 1, D], k and v fp32 [B, Hkv, S, D] with contiguous rows");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D && Hkv > 0 && H % Hkv == 0 && S > 0,
              "slm_q8.attn_decode: shapes do not match");
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

// Index of the largest value in each row of x [B, V] fp32 (the first one on ties, the first NaN
// if any, as torch.argmax), split over threads: 262,144 logits take ~0.7 ms in ATen's argmax.
at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 && x.size(1) > 0,
              "slm_q8.argmax_rows: x must be contiguous fp32 [B, V]");
  const int64_t B = x.size(0), V = x.size(1);
  auto out = at::empty({B}, x.options().dtype(at::kLong));
  int64_t* op = out.mutable_data_ptr<int64_t>();
  const float* xp = x.const_data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const float* r = xp + b * V;
    constexpr int64_t CH = 1 << 15;
    const int64_t nch = (V + CH - 1) / CH;
    std::vector<float> best(nch);
    std::vector<int64_t> idx(nch);
    at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t a = c * CH, e = std::min(V, a + CH);
        // per lane: the largest value so far and where (strict >: the first of equal values)
        __m256 mv = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
        __m256i mi = _mm256_set1_epi32(-1), iv = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256i step = _mm256_set1_epi32(8);
        int64_t i = a;
        for (; i + 8 <= e; i += 8, iv = _mm256_add_epi32(iv, step)) {
          const __m256 v = _mm256_loadu_ps(r + i);
          const __m256 gt = _mm256_cmp_ps(v, mv, _CMP_GT_OQ);
          mv = _mm256_blendv_ps(mv, v, gt);
          mi = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(mi), _mm256_castsi256_ps(iv), gt));
          nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        alignas(32) float t[8];
        alignas(32) int32_t ti[8];
        _mm256_store_ps(t, mv);
        _mm256_store_si256(reinterpret_cast<__m256i*>(ti), mi);
        float m = -INFINITY;
        int64_t at_ = -1;
        for (int j = 0; j < 8; ++j)
          if (ti[j] >= 0 && (t[j] > m || (t[j] == m && a + ti[j] < at_))) m = t[j], at_ = a + ti[j];
        bool has_nan = !_mm256_testz_ps(nan, nan);
        for (; i < e; ++i) {
          has_nan |= std::isnan(r[i]);
          if (r[i] > m || at_ < 0) m = r[i], at_ = i;
        }
        if (has_nan) {
          at_ = a;
          while (!std::isnan(r[at_])) ++at_;
          m = NAN;
        } else if (at_ < 0) {  // every value -inf
          at_ = a, m = r[a];
        }
        best[c] = m, idx[c] = at_;
      }
    });
    int64_t bi = 0;
    for (int64_t c = 1; c < nch; ++c) {
      if (std::isnan(best[bi])) break;
      if (std::isnan(best[c]) || best[c] > best[bi]) bi = c;
    }
    op[b] = idx[bi];
  }
  return out;
}

// ---- training (fp32, autograd in kernels/cpu_train.py) -------------------------------------------
// GLU over h [N, 2F] = [gate | up]: y = act(gate) * up, act SiLU or GELU's tanh approximation. The
// backward reads gate, up and dy once and writes both halves of dh, where PyTorch's autograd runs
// act, its derivative, three products and a concatenation as separate passes.
template <bool GELU>
inline void glu_act8(__m256 g, __m256& a, __m256& da) {
  const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
  if constexpr (GELU) {
    const __m256 k0 = _mm256_set1_ps(0.7978845608028654f), k1 = _mm256_set1_ps(0.044715f);
    const __m256 g2 = _mm256_mul_ps(g, g);
    const __m256 z = _mm256_mul_ps(k0, _mm256_fmadd_ps(_mm256_mul_ps(k1, g2), g, g));
    // tanh(z) = 2 / (1 + exp(-2z)) - 1
    const __m256 t = _mm256_sub_ps(_mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(one, exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0f), z)))), one);
    const __m256 onept = _mm256_add_ps(one, t);
    a = _mm256_mul_ps(_mm256_mul_ps(half, g), onept);
    const __m256 dz = _mm256_mul_ps(k0, _mm256_fmadd_ps(_mm256_set1_ps(3.0f * 0.044715f), g2, one));
    da = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_mul_ps(half, g), _mm256_fnmadd_ps(t, t, one)), dz, _mm256_mul_ps(half, onept));
  } else {
    const __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    a = _mm256_mul_ps(g, s);
    da = _mm256_mul_ps(s, _mm256_fmadd_ps(g, _mm256_sub_ps(one, s), one));  // s (1 + g (1 - s))
  }
}

inline void glu_act1(bool gelu, float g, float& a, float& da) {
  if (gelu) {
    const float k0 = 0.7978845608028654f, k1 = 0.044715f, t = std::tanh(k0 * (g + k1 * g * g * g));
    a = 0.5f * g * (1.0f + t);
    da = 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * k0 * (1.0f + 3.0f * k1 * g * g);
  } else {
    const float s = 1.0f / (1.0f + std::exp(-g));
    a = g * s;
    da = s * (1.0f + g * (1.0f - s));
  }
}

template <bool GELU>
void glu_rows(const float* hp, const float* dyp, float* out, int64_t r0, int64_t r1, int64_t F) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* g = hp + r * 2 * F;
    const float* u = g + F;
    int64_t i = 0;
    if (dyp == nullptr) {  // forward: out [N, F]
      float* o = out + r * F;
      for (; i + 8 <= F; i += 8) {
        __m256 a, da;
        glu_act8<GELU>(_mm256_loadu_ps(g + i), a, da);
        _mm256_storeu_ps(o + i, _mm256_mul_ps(a, _mm256_loadu_ps(u + i)));
      }
      for (; i < F; ++i) {
        float a, da;
        glu_act1(GELU, g[i], a, da);
        o[i] = a * u[i];
      }
    } else {  // backward: out [N, 2F] = [dy * up * act'(gate) | dy * act(gate)]
      const float* dy = dyp + r * F;
      float *dg = out + r * 2 * F, *du = dg + F;
      for (; i + 8 <= F; i += 8) {
        __m256 a, da;
        glu_act8<GELU>(_mm256_loadu_ps(g + i), a, da);
        const __m256 d = _mm256_loadu_ps(dy + i);
        _mm256_storeu_ps(dg + i, _mm256_mul_ps(_mm256_mul_ps(d, _mm256_loadu_ps(u + i)), da));
        _mm256_storeu_ps(du + i, _mm256_mul_ps(d, a));
      }
      for (; i < F; ++i) {
        float a, da;
        glu_act1(GELU, g[i], a, da);
        dg[i] = dy[i] * u[i] * da;
        du[i] = dy[i] * a;
      }
    }
  }
}

// dy undefined: the forward, act(gate) * up [N, F]; else the backward, dh [N, 2F].
at::Tensor glu_train(const at::Tensor& h, const std::optional<at::Tensor>& dy, bool gelu) {
  TORCH_CHECK(h.device().is_cpu() && h.scalar_type() == at::kFloat && h.is_contiguous() && h.dim() == 2 &&
                  h.size(1) % 2 == 0,
              "slm_q8.glu_train: h must be contiguous fp32 [N, 2F]");
  const int64_t N = h.size(0), F = h.size(1) / 2;
  if (dy) TORCH_CHECK(dy->scalar_type() == at::kFloat && dy->is_contiguous() && dy->dim() == 2 && dy->size(0) == N &&
                          dy->size(1) == F, "slm_q8.glu_train: dy must be contiguous fp32 [N, F]");
  auto out = dy ? at::empty({N, 2 * F}, h.options()) : at::empty({N, F}, h.options());
  const float* hp = h.const_data_ptr<float>();
  const float* dyp = dy ? dy->const_data_ptr<float>() : nullptr;
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 4096 / std::max<int64_t>(F, 1)), [&](int64_t r0, int64_t r1) {
    if (gelu) glu_rows<true>(hp, dyp, op, r0, r1, F);
    else glu_rows<false>(hp, dyp, op, r0, r1, F);
  });
  return out;
}

// y = x * c + roll(x, D/2) * s over one head of D values (model.apply_rope; the sign is in s).
// With `back` the transpose, for the backward: y[j] = x[j] c[j] + x[p] s[p], p = (j + D/2) mod D.
inline void rope_head(const float* x, const float* c, const float* s, float* y, int64_t D, bool back) {
  const int64_t h = D / 2;
  for (int half = 0; half < 2; ++half) {
    const int64_t lo = half * h, other = half ? -h : h;  // j and p = j + other
    const float* sp = back ? s + other : s;
    int64_t j = lo;
    for (; j + 8 <= lo + h; j += 8)
      _mm256_storeu_ps(y + j, _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(c + j),
                                              _mm256_mul_ps(_mm256_loadu_ps(x + j + other), _mm256_loadu_ps(sp + j))));
    for (; j < lo + h; ++j) y[j] = x[j] * c[j] + x[j + other] * sp[j];
  }
}

// Forward: qkv [B, T, (H + 2K) D] contiguous -> rotated Q [B, T, H, D] and K [B, T, K, D], one pass
// (V stays a view of qkv). cos, sin [Bc, T, D] with Bc = 1 or B.
std::tuple<at::Tensor, at::Tensor> rope_qk_train(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                                 int64_t H, int64_t K) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat && qkv.is_contiguous() && qkv.dim() == 3,
              "slm_q8.rope_qk_train: qkv must be contiguous fp32 [B, T, (H + 2K) D]");
  const int64_t B = qkv.size(0), T = qkv.size(1), D = qkv.size(2) / (H + 2 * K);
  TORCH_CHECK(D * (H + 2 * K) == qkv.size(2) && D % 2 == 0, "slm_q8.rope_qk_train: bad head split");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 3 &&
                  cos.sizes() == sin.sizes() && (cos.size(0) == 1 || cos.size(0) == B) && cos.size(1) == T && cos.size(2) == D,
              "slm_q8.rope_qk_train: cos and sin must be contiguous fp32 [1 or B, T, D]");
  auto q = at::empty({B, T, H, D}, qkv.options()), k = at::empty({B, T, K, D}, qkv.options());
  const float *xp = qkv.const_data_ptr<float>(), *cp = cos.const_data_ptr<float>(), *sp = sin.const_data_ptr<float>();
  float *qp = q.mutable_data_ptr<float>(), *kp = k.mutable_data_ptr<float>();
  const bool per_row = cos.size(0) == B && B > 1;
  at::parallel_for(0, B * T, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r % T, ct = ((per_row ? r / T : 0) * T + t) * D;
      const float* x = xp + r * (H + 2 * K) * D;
      for (int64_t hh = 0; hh < H; ++hh) rope_head(x + hh * D, cp + ct, sp + ct, qp + (r * H + hh) * D, D, false);
      for (int64_t hh = 0; hh < K; ++hh) rope_head(x + (H + hh) * D, cp + ct, sp + ct, kp + (r * K + hh) * D, D, false);
    }
  });
  return {q, k};
}

// Backward: dq [B, T, H, D], dk and dv [B, T, K, D] in any strides with unit stride over D (as
// attention's backward leaves them) -> d qkv [B, T, (H + 2K) D], one pass.
at::Tensor rope_qkv_backward(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& cos,
                             const at::Tensor& sin) {
  for (const at::Tensor* g : {&dq, &dk, &dv})
    TORCH_CHECK(g->scalar_type() == at::kFloat && g->dim() == 4 && g->stride(3) == 1,
                "slm_q8.rope_qkv_backward: gradients must be fp32 [B, T, heads, D] with unit stride over D");
  const int64_t B = dq.size(0), T = dq.size(1), H = dq.size(2), K = dk.size(2), D = dq.size(3);
  TORCH_CHECK(cos.size(0) == 1 || cos.size(0) == B, "slm_q8.rope_qkv_backward: cos must be [1 or B, T, D]");
  auto out = at::empty({B, T, (H + 2 * K) * D}, dq.options());
  const float *cp = cos.const_data_ptr<float>(), *sp = sin.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const bool per_row = cos.size(0) == B && B > 1;
  at::parallel_for(0, B * T, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / T, t = r % T, ct = ((per_row ? b : 0) * T + t) * D;
      float* o = op + r * (H + 2 * K) * D;
      const float* q = dq.const_data_ptr<float>() + b * dq.stride(0) + t * dq.stride(1);
      const float* k = dk.const_data_ptr<float>() + b * dk.stride(0) + t * dk.stride(1);
      const float* v = dv.const_data_ptr<float>() + b * dv.stride(0) + t * dv.stride(1);
      for (int64_t hh = 0; hh < H; ++hh) rope_head(q + hh * dq.stride(2), cp + ct, sp + ct, o + hh * D, D, true);
      for (int64_t hh = 0; hh < K; ++hh) rope_head(k + hh * dk.stride(2), cp + ct, sp + ct, o + (H + hh) * D, D, true);
      for (int64_t hh = 0; hh < K; ++hh) std::memcpy(o + (H + K + hh) * D, v + hh * dv.stride(2), D * sizeof(float));
    }
  });
  return out;
}

// RMSNorm for training: y = x * r * w (w + 1 with plus_one), r = 1 / sqrt(mean(x^2) + eps) per row,
// r kept for the backward. One pass each way where autograd runs some ten small ops over [N, d].
std::tuple<at::Tensor, at::Tensor> rms_norm_train(const at::Tensor& x, const at::Tensor& w, double eps, bool plus_one) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 &&
                  w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == x.size(1),
              "slm_q8.rms_norm_train: x must be contiguous fp32 [N, d], w fp32 [d]");
  const int64_t N = x.size(0), d = x.size(1);
  auto y = at::empty_like(x);
  auto r = at::empty({N}, x.options());
  const float *xp = x.const_data_ptr<float>(), *wp = w.const_data_ptr<float>();
  float *yp = y.mutable_data_ptr<float>(), *rp = r.mutable_data_ptr<float>();
  const float off = plus_one ? 1.0f : 0.0f;
  at::parallel_for(0, N, std::max<int64_t>(1, 8192 / std::max<int64_t>(d, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) rp[i] = rms_row(xp + i * d, wp, d, eps, off, yp + i * d);
  });
  return {y, r};
}

// Its backward: with g = dy * w and xh = x * r, dx = r * (g - xh * mean(g * xh)) and dw = sum over
// rows of dy * xh (per-thread partial sums, added at the end).
std::tuple<at::Tensor, at::Tensor> rms_norm_train_backward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& r,
                                                           const at::Tensor& dy, bool plus_one) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 && dy.sizes() == x.sizes() &&
                  dy.scalar_type() == at::kFloat && dy.is_contiguous() && r.numel() == x.size(0) && w.numel() == x.size(1),
              "slm_q8.rms_norm_train_backward: x, dy contiguous fp32 [N, d], r [N], w [d]");
  const int64_t N = x.size(0), d = x.size(1);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N));
  auto dx = at::empty_like(x);
  auto dwp = at::zeros({parts, d}, x.options());
  const float *xp = x.const_data_ptr<float>(), *wp = w.const_data_ptr<float>(), *rp = r.const_data_ptr<float>(),
              *gp = dy.const_data_ptr<float>();
  float *dxp = dx.mutable_data_ptr<float>(), *pp = dwp.mutable_data_ptr<float>();
  const float off = plus_one ? 1.0f : 0.0f;
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* dw = pp + p * d;
      for (int64_t i = N * p / parts; i < N * (p + 1) / parts; ++i) {
        const float *xi = xp + i * d, *gi = gp + i * d;
        const float ri = rp[i];
        const __m256 rv = _mm256_set1_ps(ri), ov = _mm256_set1_ps(off);
        __m256 acc = _mm256_setzero_ps();  // sum of dy * w * x
        int64_t j = 0;
        for (; j + 8 <= d; j += 8) {
          const __m256 xv = _mm256_loadu_ps(xi + j), gv = _mm256_loadu_ps(gi + j);
          acc = _mm256_fmadd_ps(_mm256_mul_ps(gv, _mm256_add_ps(_mm256_loadu_ps(wp + j), ov)), xv, acc);
          _mm256_storeu_ps(dw + j, _mm256_fmadd_ps(gv, _mm256_mul_ps(xv, rv), _mm256_loadu_ps(dw + j)));
        }
        float dot = hsum(acc);
        for (; j < d; ++j) {
          dot += gi[j] * (wp[j] + off) * xi[j];
          dw[j] += gi[j] * xi[j] * ri;
        }
        // dx = r g - x r^3 mean(g x)
        const float k = ri * ri * ri * dot / d;
        const __m256 kv = _mm256_set1_ps(k);
        float* dxi = dxp + i * d;
        for (j = 0; j + 8 <= d; j += 8) {
          const __m256 g = _mm256_mul_ps(_mm256_loadu_ps(gi + j), _mm256_add_ps(_mm256_loadu_ps(wp + j), ov));
          _mm256_storeu_ps(dxi + j, _mm256_fmsub_ps(g, rv, _mm256_mul_ps(_mm256_loadu_ps(xi + j), kv)));
        }
        for (; j < d; ++j) dxi[j] = gi[j] * (wp[j] + off) * ri - xi[j] * k;
      }
    }
  });
  return {dx, dwp.sum(0)};
}

// One row of scores s [L]: s[j] = exp(s[j] - m) for j < n (the keys a causal row sees; n = L for a
// full row), 0 after; returns the sum. m is the row's maximum, found here unless `known` (attention's
// backward passes the logsumexp, which turns the same pass into the probabilities themselves).
inline float exp_row(float* s, int64_t n, int64_t L, float& m, bool known) {
  if (!known) {
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + j));
    m = hmax(m8);
    for (; j < n; ++j) m = std::max(m, s[j]);
  }
  const __m256 mv = _mm256_set1_ps(m);
  __m256 s8 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
    _mm256_storeu_ps(s + j, e);
    s8 = _mm256_add_ps(s8, e);
  }
  float sum = hsum(s8);
  for (; j < n; ++j) sum += (s[j] = std::exp(s[j] - m));
  std::fill(s + n, s + L, 0.0f);
  return sum;
}

// Cross-entropy's softmax and its gradient, in place, for training's fused LM head (train/loss.py).
// Each row x of logits [n, V] becomes scale * (softmax(x) - onehot(target)); nll[r] is
// logsumexp(x) - x[target]. A row whose target is ignore_index becomes 0 with nll 0. One exp per
// logit, and the row (128 KB at V = 32000) stays in L2 across the three passes, so DRAM sees one
// read and one write where log_softmax, exp_ and the one-hot update made five passes.
at::Tensor softmax_xent_(at::Tensor logits, const at::Tensor& targets, int64_t ignore_index, double scale) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.is_contiguous() &&
                  logits.dim() == 2 && logits.size(1) > 0,
              "slm_q8.softmax_xent_: logits must be contiguous fp32 [n, V]");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == logits.size(0),
              "slm_q8.softmax_xent_: targets must be int64 [n]");
  const int64_t n = logits.size(0), V = logits.size(1);
  const at::Tensor tc = targets.contiguous();
  const int64_t* tp = tc.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r)
    TORCH_CHECK(tp[r] == ignore_index || (tp[r] >= 0 && tp[r] < V), "slm_q8.softmax_xent_: target ", tp[r],
                " out of range for ", V, " classes");
  auto nll = at::empty({n}, logits.options());
  float* np = nll.mutable_data_ptr<float>();
  float* xp = logits.mutable_data_ptr<float>();
  const float s = static_cast<float>(scale);
  at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* x = xp + r * V;
      const int64_t t = tp[r];
      if (t == ignore_index) {
        std::memset(x, 0, V * sizeof(float));
        np[r] = 0.0f;
        continue;
      }
      const float xt = x[t];
      float mx;
      const float sum = exp_row(x, V, V, mx, false);
      const __m256 k8 = _mm256_set1_ps(s / sum);
      int64_t j = 0;
      for (; j + 8 <= V; j += 8) _mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), k8));
      for (; j < V; ++j) x[j] *= s / sum;
      x[t] -= s;
      np[r] = std::log(sum) + mx - xt;
    }
  });
  return nll;
}

// Causal self-attention for training, forward and backward, as FlashAttention computes it: the
// forward keeps only each row's logsumexp, the backward recomputes the probabilities from it. Per
// block of BM query rows, the scores against the keys up to the block's last row are one product
// (keys after it are masked for every row of the block, so they are not computed), the softmax is
// one pass in L2, and the output is a second product; the products go to the BLAS that ATen links
// (sgemm_). PyTorch's CPU flash kernel does the same work with online-softmax rescaling and more
// passes: at the stories15M shape ([8 x 256] tokens, 6 heads of 48) it takes ~22 ms a layer forward
// and backward, this ~15 (benchmarks/cpu_train_kernels.py).
extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                       const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));

// Row-major C [M, N] = alpha op(A) op(B) + beta C (op: transposed when ta/tb), through the
// column-major BLAS as C^T = op(B)^T op(A)^T.
inline void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                    const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const char a = tb ? 'T' : 'N', b = ta ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  sgemm_(&a, &b, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
}

constexpr int64_t ATT_BM = 64;  // query rows a block (32 and 128 measured the same at the stories15M shape)

// A [B, T, heads, D] tensor in any strides with unit stride over D; rows of one head are st apart.
struct HeadRows {
  float* p;
  int64_t sb, st, sh;
  explicit HeadRows(const at::Tensor& x)
      : p(const_cast<float*>(x.const_data_ptr<float>())), sb(x.stride(0)), st(x.stride(1)), sh(x.stride(2)) {}
  float* at(int64_t b, int64_t t, int64_t h) const { return p + b * sb + t * st + h * sh; }
};

void check_attn(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const auto* x : {&q, &k, &v})
    TORCH_CHECK(x->scalar_type() == at::kFloat && x->dim() == 4 && x->stride(3) == 1,
                "slm_q8.attn_train: q, k, v must be fp32 [B, T, heads, D] with unit stride over D");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3) &&
              q.size(2) % k.size(2) == 0, "slm_q8.attn_train: k and v [B, T, Hkv, D] with Hkv dividing q's heads");
}

// q [B, T, H, D], k and v [B, T, Hkv, D] (grouped-query when Hkv < H) -> o [B, T, H, D] (contiguous,
// so the output projection reads it as [B, T, H D]) and the logsumexp of each row [B, H, T].
std::tuple<at::Tensor, at::Tensor> attn_train(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  check_attn(q, k, v);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), g = H / k.size(2);
  auto o = at::empty({B, T, H, D}, q.options());
  auto lse = at::empty({B, H, T}, q.options());
  const HeadRows Q(q), K(k), V(v), O(o);
  float* lp = lse.mutable_data_ptr<float>();
  const int64_t nb = (T + ATT_BM - 1) / ATT_BM;
  at::parallel_for(0, B * H * nb, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> S(ATT_BM * T), inv(ATT_BM);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (H * nb), h = i / nb % H, r0 = i % nb * ATT_BM, M = std::min(ATT_BM, T - r0), L = r0 + M;
      gemm_rm(false, true, M, L, D, scale, Q.at(b, r0, h), Q.st, K.at(b, 0, h / g), K.st, 0.0f, S.data(), L);
      float* lr = lp + (b * H + h) * T + r0;
      for (int64_t r = 0; r < M; ++r) {
        float m;
        const float sum = exp_row(S.data() + r * L, r0 + r + 1, L, m, false);
        lr[r] = m + std::log(sum);
        inv[r] = 1.0f / sum;
      }
      gemm_rm(false, false, M, D, L, 1.0f, S.data(), L, V.at(b, 0, h / g), V.st, 0.0f, O.at(b, r0, h), O.st);
      for (int64_t r = 0; r < M; ++r) {
        float* y = O.at(b, r0 + r, h);
        for (int64_t d = 0; d < D; ++d) y[d] *= inv[r];
      }
    }
  });
  return {o, lse};
}

// The backward, from the forward's o and logsumexp and do [B, T, H, D] -> dq, dk, dv. Per block:
// P = exp(scale Q K^T - lse); dV += P^T dO; dS = P (dO V^T - rowsum(dO o)); dQ = scale dS K;
// dK += scale dS^T Q. Threads take (batch, kv head) pairs, so each owns its dK and dV rows.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_train_backward(const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse, const at::Tensor& dout, double scale) {
  check_attn(q, k, v);
  TORCH_CHECK(o.sizes() == q.sizes() && dout.sizes() == q.sizes() && o.stride(3) == 1 && dout.stride(3) == 1 &&
              dout.scalar_type() == at::kFloat && lse.is_contiguous(), "slm_q8.attn_train_backward: o, do like q");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), Hkv = k.size(2), g = H / Hkv;
  auto dq = at::empty({B, T, H, D}, q.options());
  auto dk = at::zeros({B, T, Hkv, D}, q.options());
  auto dv = at::zeros({B, T, Hkv, D}, q.options());
  const HeadRows Q(q), K(k), V(v), O(o), dO(dout), dQ(dq), dK(dk), dV(dv);
  const float* lp = lse.const_data_ptr<float>();
  const int64_t nb = (T + ATT_BM - 1) / ATT_BM;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> P(ATT_BM * T), dS(ATT_BM * T);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hkv, hk = i % Hkv;
      for (int64_t h = hk * g; h < (hk + 1) * g; ++h) {
        for (int64_t r0 = 0; r0 < T; r0 += ATT_BM) {
          const int64_t M = std::min(ATT_BM, T - r0), L = r0 + M;
          const float* lr = lp + (b * H + h) * T + r0;
          gemm_rm(false, true, M, L, D, scale, Q.at(b, r0, h), Q.st, K.at(b, 0, hk), K.st, 0.0f, P.data(), L);
          for (int64_t r = 0; r < M; ++r) {
            float m = lr[r];
            exp_row(P.data() + r * L, r0 + r + 1, L, m, true);
          }
          gemm_rm(true, false, L, D, M, 1.0f, P.data(), L, dO.at(b, r0, h), dO.st, 1.0f, dV.at(b, 0, hk), dV.st);
          gemm_rm(false, true, M, L, D, 1.0f, dO.at(b, r0, h), dO.st, V.at(b, 0, hk), V.st, 0.0f, dS.data(), L);
          for (int64_t r = 0; r < M; ++r) {
            const __m256 delta = _mm256_set1_ps(dot_f32(dO.at(b, r0 + r, h), O.at(b, r0 + r, h), D));
            const float* p = P.data() + r * L;
            float* ds = dS.data() + r * L;
            int64_t j = 0;  // past the causal end p is 0, and so is ds
            for (; j + 8 <= L; j += 8)
              _mm256_storeu_ps(ds + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), _mm256_sub_ps(_mm256_loadu_ps(ds + j), delta)));
            for (; j < L; ++j) ds[j] = p[j] * (ds[j] - _mm256_cvtss_f32(delta));
          }
          gemm_rm(false, false, M, D, L, scale, dS.data(), L, K.at(b, 0, hk), K.st, 0.0f, dQ.at(b, r0, h), dQ.st);
          gemm_rm(true, false, L, D, M, scale, dS.data(), L, Q.at(b, r0, h), Q.st, 1.0f, dK.at(b, 0, hk), dK.st);
        }
      }
    }
  });
  return {dq, dk, dv};
}

// attn_step for one sequence: row its qkv [(H + 2 Hkv) D], K and V its caches [Hkv, S, D], y [H D].
void attn_step_row(const float* row, int64_t H, int64_t Hkv, int64_t D, int64_t rd, const float* qwp, const float* kwp,
                   double eps, bool plus_one, const float* c, const float* s, float* kp, float* vp, int64_t S, int64_t slot,
                   int64_t read, float sc, float* y) {
  const float add = plus_one ? 1.0f : 0.0f;
  std::vector<float> n(D), q(H * D), p(read);
  // norm (if w) and rope of one head: in -> out
  auto prep = [&](const float* in, const float* w, float* out) {
    if (w) {
      rms_row(in, w, D, eps, add, n.data());
    } else {
      for (int64_t i = 0; i < D; ++i) n[i] = in[i];
    }
    const int64_t half = rd / 2;
    for (int64_t i = 0; i < rd; ++i) out[i] = n[i] * c[i] + n[i < half ? i + half : i - half] * s[i];
    for (int64_t i = rd; i < D; ++i) out[i] = n[i];
  };
  for (int64_t j = 0; j < Hkv; ++j) {
    prep(row + (H + j) * D, kwp, kp + (j * S + slot) * D);
    std::memcpy(vp + (j * S + slot) * D, row + (H + Hkv + j) * D, D * sizeof(float));
  }
  for (int64_t h = 0; h < H; ++h) prep(row + h * D, qwp, q.data() + h * D);
  const int64_t g = H / Hkv;
  for (int64_t h = 0; h < H; ++h)
    attend_row(q.data() + h * D, kp + (h / g) * S * D, D, vp + (h / g) * S * D, D, read, D, sc, p.data(), y + h * D);
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
                  qkv.size(1) == 1, "slm_q8.attn_step: qkv must be contiguous fp32 [B, 1, (H + 2 Hkv) D]");
  TORCH_CHECK(K.scalar_type() == at::kFloat && V.scalar_type() == at::kFloat && K.is_contiguous() && V.is_contiguous() &&
                  K.dim() == 4 && K.sizes() == V.sizes(), "slm_q8.attn_step: K and V caches must be contiguous fp32 [B, Hkv, S, D]");
  const int64_t B = qkv.size(0), Hkv = K.size(1), S = K.size(2), D = K.size(3), rd = cos.size(-1);
  TORCH_CHECK(K.size(0) >= B && H % Hkv == 0 && qkv.size(2) == (H + 2 * Hkv) * D && slot >= 0 && slot < S &&
                  read > 0 && read <= S && rd <= D && rd % 2 == 0, "slm_q8.attn_step: shapes do not match");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.numel() == B * rd && sin.numel() == B * rd, "slm_q8.attn_step: cos and sin must be fp32 [B, 1, 1, rd]");
  for (const auto* w : {&qw, &kw})
    TORCH_CHECK(!w->has_value() || ((*w)->scalar_type() == at::kFloat && (*w)->is_contiguous() && (*w)->numel() == D),
                "slm_q8.attn_step: norm weights must be fp32 [D]");
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


// -- whole decode steps -------------------------------------------------------------------------
// A batch-1 decode step of the whole model in one call (`Decoder.step`), for models small enough
// that Python and ATen dispatch dominate a token: make demo's 2M-parameter model spent ~1.7 ms a
// token in ~150 module calls and ops around ~0.2 ms of arithmetic. The step runs exactly the
// kernels the module path calls (the same products, norms, rope and attention), in the order of
// model.Block.forward, and writes the KV cache and its positions as KVCache.plan/update do.
// slm.kernels.decoder builds it from a Transformer and falls back to the modules otherwise.

// A linear layer as one of the weight layouts: 0 fp32 [N, K], 1 int8 (q, scales), 2 int4 (packed,
// scales, mins), 3 a GGUF file's blocks, 4 fp32 stored column-major (a = W^T [K, N]).
struct Lin {
  int64_t kind = -1, N = 0, K = 0;
  at::Tensor a, b, c, bias;
  std::optional<Parts> parts;
  // y [B, N] = x [B, K] W^T (+ bias), B at most the direct paths' max_direct, as the modules run it
  void rows(const float* x, int64_t B, float* y) const {
    const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
    switch (kind) {
      case 0:
        if (B == 1) {
          f32_direct(x, a.const_data_ptr<float>(), N, K, y, bp);
        } else {  // F.linear's GEMM
          auto xt = at::from_blob(const_cast<float*>(x), {B, K}, at::kFloat);
          auto yt = at::from_blob(y, {B, N}, at::kFloat);
          bias.defined() ? at::addmm_out(yt, bias, xt, a.t()) : at::mm_out(yt, xt, a.t());
        }
        break;
      case 4:
        if (B == 1) {
          f32t_direct(x, a.const_data_ptr<float>(), N, K, y, bp);
        } else {
          auto xt = at::from_blob(const_cast<float*>(x), {B, K}, at::kFloat);
          auto yt = at::from_blob(y, {B, N}, at::kFloat);
          bias.defined() ? at::addmm_out(yt, bias, xt, a) : at::mm_out(yt, xt, a);
        }
        break;
      case 1: q8_direct(x, B, K, a.const_data_ptr<int8_t>(), b.const_data_ptr<float>(), b.size(1), N, y, bp); break;
      case 2: q4_direct(x, B, K, a.const_data_ptr<uint8_t>(), half_ptr(b), half_ptr(c), b.size(1), N, y, bp); break;
      default: gguf_direct(*parts, a.const_data_ptr<uint8_t>(), x, B, K, y, bp); break;
    }
  }
  void row(int64_t n, float* out) const {  // fp32 row n of W (a tied embedding's lookup)
    switch (kind) {
      case 0: std::memcpy(out, a.const_data_ptr<float>() + n * K, K * sizeof(float)); break;
      case 4:
        for (int64_t k = 0; k < K; ++k) out[k] = a.const_data_ptr<float>()[k * N + n];
        break;
      case 1: dequant_range(a.const_data_ptr<int8_t>(), b.const_data_ptr<float>(), K, b.size(1), n, n + 1, out); break;
      case 2: dequant_range_q4(a.const_data_ptr<uint8_t>(), half_ptr(b), half_ptr(c), K, b.size(1), n, n + 1, out); break;
      default: dequant_rows(*parts, a.const_data_ptr<uint8_t>(), K, n, n + 1, out); break;
    }
  }
};

// 0 none, 1 RMSNorm (add = 1: Gemma's 1 + w), 2 LayerNorm with bias.
struct Norm {
  int64_t kind = 0;
  at::Tensor w, b;
  double eps = 0.0;
  float add = 0.0f;
  void operator()(const float* x, float* out, int64_t D) const {
    const float* wp = w.const_data_ptr<float>();
    if (kind == 1) {
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
};

struct Layer {
  Norm norm[6];  // attn_norm, mlp_norm, post_attn_norm, post_mlp_norm, q_norm, k_norm
  Lin lin[4];    // qkv_proj, o_proj, gate_up_proj (or up_proj), down_proj
  at::Tensor cos, sin;  // this layer's rope tables [positions, rotary dims]
};

struct Decoder : torch::CustomClassHolder {
  // dims: hidden, heads, kv heads, head dim, rotary dims, MLP width, vocab, layers, block (0
  // sequential, 1 parallel (Phi), 2 sandwich (Gemma 3)), MLP (0 SwiGLU, 1 GeGLU, 2 GELU);
  // scales: attention scale, embedding scale (0: none)
  int64_t d, H, Hkv, D, rd, F, V, block, act;
  double scale, embed_scale;
  std::vector<Layer> layers;
  Norm final_norm;
  Lin head, embed;  // embed: its fp32 or int8 table as a Lin (only rows are read), or the head's

  Decoder(std::vector<int64_t> dims, std::vector<double> scales) {
    TORCH_CHECK(dims.size() == 10 && scales.size() == 2, "slm_q8.Decoder: 10 dims and 2 scales");
    d = dims[0], H = dims[1], Hkv = dims[2], D = dims[3], rd = dims[4], F = dims[5], V = dims[6], block = dims[8], act = dims[9];
    TORCH_CHECK(d > 0 && H > 0 && Hkv > 0 && H % Hkv == 0 && D > 0 && rd <= D && rd % 2 == 0 && F > 0 && V > 0,
                "slm_q8.Decoder: bad dims");
    scale = scales[0], embed_scale = scales[1];
    layers.resize(dims[7]);
  }

  Layer& layer(int64_t i) {
    TORCH_CHECK(i >= 0 && i < int64_t(layers.size()), "slm_q8.Decoder: no layer ", i);
    return layers[i];
  }

  static void fp32(const at::Tensor& t, int64_t n, const char* what) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n,
                "slm_q8.Decoder: ", what, " must be contiguous fp32 with ", n, " values");
  }

  // layer -1: the LM head (role 0) or the embedding table (role 1); else role 0..3 of the layer.
  void set_linear(int64_t i, int64_t role, int64_t kind, std::vector<at::Tensor> t, std::optional<at::Tensor> bias,
                  std::vector<int64_t> types, std::vector<int64_t> rows, int64_t K) {
    TORCH_CHECK(role >= 0 && role < (i < 0 ? 2 : 4), "slm_q8.Decoder: bad role");
    Lin& L = i < 0 ? (role == 0 ? head : embed) : layer(i).lin[role];
    L = Lin();
    L.kind = kind, L.K = K;
    if (kind == 0 || kind == 4) {
      TORCH_CHECK(t.size() == 1 && t[0].dim() == 2 && t[0].size(kind == 0 ? 1 : 0) == K,
                  "slm_q8.Decoder: fp32 weight [N, K], or its transpose [K, N]");
      L.N = t[0].size(kind == 0 ? 0 : 1), L.a = t[0];
      fp32(t[0], L.N * K, "an fp32 weight");
    } else if (kind == 1) {
      TORCH_CHECK(t.size() == 2 && t[0].dim() == 2 && t[0].size(1) == K, "slm_q8.Decoder: int8 weight [N, K]");
      check(t[0], t[1]);
      L.N = t[0].size(0), L.a = t[0], L.b = t[1];
    } else if (kind == 2) {
      TORCH_CHECK(t.size() == 3 && t[0].dim() == 2 && 2 * t[0].size(1) == K, "slm_q8.Decoder: int4 weight [N, K/2]");
      check_q4(t[0], t[1], t[2]);
      L.N = t[0].size(0), L.a = t[0], L.b = t[1], L.c = t[2];
    } else {
      TORCH_CHECK(kind == 3 && t.size() == 1, "slm_q8.Decoder: unknown layout ", kind);
      L.parts.emplace(t[0], types, rows, K);
      L.N = L.parts->N, L.a = t[0];
    }
    if (bias.has_value() && bias->defined()) {
      fp32(*bias, L.N, "a bias");
      L.bias = *bias;
    }
  }

  // layer -1: the final norm; else role 0..5 of the layer (kind 0: none).
  void set_norm(int64_t i, int64_t role, int64_t kind, std::optional<at::Tensor> w, std::optional<at::Tensor> b,
                double eps, bool plus_one) {
    TORCH_CHECK(role >= 0 && role < 6 && kind >= 0 && kind <= 2, "slm_q8.Decoder: bad norm");
    Norm& n = i < 0 ? final_norm : layer(i).norm[role];
    n = Norm();
    n.kind = kind, n.eps = eps, n.add = plus_one ? 1.0f : 0.0f;
    if (kind == 0) return;
    const int64_t dim = role >= 4 ? D : d;
    fp32(*w, dim, "a norm weight");
    n.w = *w;
    if (kind == 2 && b.has_value() && b->defined()) {
      fp32(*b, dim, "a norm bias");
      n.b = *b;
    }
  }

  void set_rope(int64_t i, at::Tensor cos, at::Tensor sin) {
    TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                    sin.is_contiguous() && cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(1) == rd,
                "slm_q8.Decoder: rope tables must be contiguous fp32 [positions, ", rd, "]");
    layer(i).cos = cos, layer(i).sin = sin;
  }

  // T tokens at positions seen .. seen + T - 1 (batch 1, no padding) through every layer, their keys
  // and values stored in the caches K[i], V[i] [1, Hkv, S, D] (slot p, or p % S where rolling[i]:
  // a sliding window's ring) and pos[i] [1, S] recording the positions. The rows' products run
  // together (the weights are read once); attention runs one row after another, each after storing
  // its key, which is causal attention, sliding windows included. -> logits [1, T, V], or [1, 1, V]
  // for the last token only.
  at::Tensor step(std::vector<int64_t> tokens, int64_t seen, std::vector<at::Tensor> K, std::vector<at::Tensor> Vc,
                  std::vector<at::Tensor> pos, std::vector<int64_t> rolling, bool last_only) {
    const int64_t n = layers.size(), Q = (H + 2 * Hkv) * D, T = tokens.size();
    TORCH_CHECK(int64_t(K.size()) == n && int64_t(Vc.size()) == n && int64_t(pos.size()) == n && int64_t(rolling.size()) == n,
                "slm_q8.Decoder.step: one cache per layer");
    TORCH_CHECK(T > 0 && embed.kind >= 0 && head.kind >= 0, "slm_q8.Decoder.step: no tokens, or the decoder is incomplete");
    for (int64_t t : tokens) TORCH_CHECK(t >= 0 && t < V, "slm_q8.Decoder.step: token ", t, " out of range");
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(K[i].scalar_type() == at::kFloat && Vc[i].scalar_type() == at::kFloat && K[i].is_contiguous() &&
                      Vc[i].is_contiguous() && K[i].dim() == 4 && K[i].sizes() == Vc[i].sizes() && K[i].size(0) == 1 &&
                      K[i].size(1) == Hkv && K[i].size(3) == D,
                  "slm_q8.Decoder.step: caches must be contiguous fp32 [1, ", Hkv, ", S, ", D, "]");
      TORCH_CHECK(pos[i].scalar_type() == at::kLong && pos[i].is_contiguous() && pos[i].numel() == K[i].size(2),
                  "slm_q8.Decoder.step: positions must be int64 [1, S]");
      TORCH_CHECK(seen >= 0 && (rolling[i] || seen + T <= K[i].size(2)) && seen + T <= layers[i].cos.size(0),
                  "slm_q8.Decoder.step: positions up to ", seen + T, " are beyond the cache or the rope table");
    }
    std::vector<float> x(T * d), h(T * d), a(T * d), m(T * d), qkv(T * Q), y(T * H * D), up(T * (act == 2 ? F : 2 * F)), g(T * F);
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
      L.lin[0].rows(in, T, qkv.data());
      for (int64_t t = 0; t < T; ++t) {
        const int64_t p = seen + t, slot = rolling[i] ? p % S : p;
        pos[i].mutable_data_ptr<int64_t>()[slot] = p;
        attn_step_row(qkv.data() + t * Q, H, Hkv, D, rd, L.norm[4].kind ? L.norm[4].w.const_data_ptr<float>() : nullptr,
                      L.norm[5].kind ? L.norm[5].w.const_data_ptr<float>() : nullptr, L.norm[4].eps, L.norm[4].add != 0.0f,
                      L.cos.const_data_ptr<float>() + p * rd, L.sin.const_data_ptr<float>() + p * rd,
                      K[i].mutable_data_ptr<float>(), Vc[i].mutable_data_ptr<float>(), S, slot, std::min(p + 1, S),
                      float(scale), y.data() + t * H * D);
      }
      L.lin[1].rows(y.data(), T, out);
    };
    auto mlp = [&](int64_t i, const float* in, float* out) {
      Layer& L = layers[i];
      L.lin[2].rows(in, T, up.data());
      const int64_t W = act == 2 ? F : 2 * F;
      for (int64_t t = 0; t < T; ++t) {
        const float* u = up.data() + t * W;
        float* o = g.data() + t * F;
        if (act == 0) {  // SwiGLU: silu(gate) * up
          for (int64_t j = 0; j < F; ++j) o[j] = u[j] / (1.0f + std::exp(-u[j])) * u[F + j];
        } else {
          gelu_tanh_mul_row(u, act == 1 ? u + F : nullptr, o, F);
        }
      }
      L.lin[3].rows(g.data(), T, out);
    };
    for (int64_t i = 0; i < n; ++i) {
      Layer& L = layers[i];
      norm(L.norm[0], x.data(), h.data());
      if (block == 1) {  // Phi: x = attn(h) + mlp(h) + x
        attention(i, h.data(), a.data());
        mlp(i, h.data(), m.data());
        for (int64_t j = 0; j < T * d; ++j) x[j] = (a[j] + m[j]) + x[j];
        continue;
      }
      attention(i, h.data(), a.data());
      if (block == 2) {  // Gemma 3: x = post_norm(branch) + x
        norm(L.norm[2], a.data(), h.data());
        for (int64_t j = 0; j < T * d; ++j) x[j] = h[j] + x[j];
      } else {
        for (int64_t j = 0; j < T * d; ++j) x[j] = x[j] + a[j];
      }
      norm(L.norm[1], x.data(), h.data());
      mlp(i, h.data(), m.data());
      if (block == 2) {
        norm(L.norm[3], m.data(), h.data());
        for (int64_t j = 0; j < T * d; ++j) x[j] = h[j] + x[j];
      } else {
        for (int64_t j = 0; j < T * d; ++j) x[j] = x[j] + m[j];
      }
    }
    const int64_t R = last_only ? 1 : T;
    const float* last = x.data() + (T - R) * d;
    for (int64_t t = 0; t < R; ++t) final_norm(last + t * d, h.data() + t * d, d);
    auto logits = at::empty({1, R, head.N}, at::TensorOptions().dtype(at::kFloat));
    head.rows(h.data(), R, logits.mutable_data_ptr<float>());
    return logits;
  }
};
}  // namespace

TORCH_LIBRARY(slm_q8, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps, bool plus_one) -> Tensor");
  m.def("rms_norm_rope(Tensor x, Tensor w, float eps, bool plus_one, Tensor cos, Tensor sin) -> Tensor");
  m.def("rms_norm_add(Tensor x, Tensor w, float eps, bool plus_one, Tensor residual) -> Tensor");
  m.def("gelu_tanh_mul(Tensor x) -> Tensor");
  m.def("attn_decode(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("glu_train(Tensor h, Tensor? dy, bool gelu) -> Tensor");
  m.def("rope_qk_train(Tensor qkv, Tensor cos, Tensor sin, int H, int K) -> (Tensor, Tensor)");
  m.def("rope_qkv_backward(Tensor dq, Tensor dk, Tensor dv, Tensor cos, Tensor sin) -> Tensor");
  m.def("rms_norm_train(Tensor x, Tensor w, float eps, bool plus_one) -> (Tensor, Tensor)");
  m.def("rms_norm_train_backward(Tensor x, Tensor w, Tensor r, Tensor dy, bool plus_one) -> (Tensor, Tensor)");
  m.def("softmax_xent_(Tensor(a!) logits, Tensor targets, int ignore_index, float scale) -> Tensor");
  if (sgemm_ != nullptr) {  // a torch without a Fortran-style BLAS leaves them out: cpu_train falls back to SDPA
    m.def("attn_train(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
    m.def("attn_train_backward(Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor dout, float scale) -> (Tensor, Tensor, Tensor)");
  }
  m.def("attn_step(Tensor qkv, Tensor? qw, Tensor? kw, float eps, bool plus_one, Tensor cos, Tensor sin, Tensor(a!) K, Tensor(b!) V, int slot, int read, float scale, int H) -> Tensor");
  m.def("matvec_f32(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, int max_direct) -> Tensor");
  m.def("dequantize(Tensor qweight, Tensor scales) -> Tensor");
  m.def("linear_q4(Tensor x, Tensor packed, Tensor scales, Tensor mins, Tensor? bias, int max_direct) -> Tensor");
  m.def("dequantize_q4(Tensor packed, Tensor scales, Tensor mins) -> Tensor");
  m.def("linear_gguf(Tensor x, Tensor blocks, int[] types, int[] rows, int K, Tensor? bias, int max_direct) -> Tensor");
  m.def("dequantize_gguf(Tensor blocks, int[] types, int[] rows, int K, Tensor ids) -> Tensor");
  m.class_<Decoder>("Decoder")
      .def(torch::init<std::vector<int64_t>, std::vector<double>>())
      .def("set_linear", &Decoder::set_linear)
      .def("set_norm", &Decoder::set_norm)
      .def("set_rope", &Decoder::set_rope)
      .def("step", &Decoder::step);
}

TORCH_LIBRARY_IMPL(slm_q8, CPU, m) {
  m.impl("linear", &linear);
  m.impl("dequantize", &dequantize);
  m.impl("linear_q4", &linear_q4);
  m.impl("dequantize_q4", &dequantize_q4);
  m.impl("linear_gguf", &linear_gguf);
  m.impl("dequantize_gguf", &dequantize_gguf);
  m.impl("matvec_f32", &matvec_f32);
  m.impl("rms_norm", &rms_norm);
  m.impl("rms_norm_rope", &rms_norm_rope);
  m.impl("rms_norm_add", &rms_norm_add);
  m.impl("gelu_tanh_mul", &gelu_tanh_mul);
  m.impl("attn_decode", &attn_decode);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("softmax_xent_", &softmax_xent_);
  m.impl("rms_norm_train", &rms_norm_train);
  m.impl("rms_norm_train_backward", &rms_norm_train_backward);
  m.impl("glu_train", &glu_train);
  m.impl("rope_qk_train", &rope_qk_train);
  m.impl("rope_qkv_backward", &rope_qkv_backward);
  m.impl("attn_step", &attn_step);
  if (sgemm_ != nullptr) {
    m.impl("attn_train", &attn_train);
    m.impl("attn_train_backward", &attn_train_backward);
  }
}
