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
// Registered as torch.ops.slm_q8.{linear, dequantize, linear_q4, dequantize_q4}.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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

void check(const at::Tensor& q, const at::Tensor& s) {
  TORCH_CHECK(q.device().is_cpu() && s.device().is_cpu(), "slm_q8: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous(),
              "slm_q8: qweight must be contiguous int8 [N, K]");
  TORCH_CHECK(q.size(1) % QK == 0, "slm_q8: in_features must be a multiple of 32, got ", q.size(1));
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == 2 && s.size(0) == q.size(0) &&
                  s.size(1) >= 1 && (q.size(1) / QK) % s.size(1) == 0,
              "slm_q8: scales must be contiguous fp32 [N, K/G], G a multiple of 32");
}

// rows per parallel task: at least ~32 KB of weights, so small matrices do not pay for threads
int64_t grain_rows(int64_t K) { return std::max<int64_t>(16, (int64_t(1) << 15) / K); }

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
    const int64_t grain = std::max<int64_t>(1, grain_rows(K) / std::max<int64_t>(1, B / 4));
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { matvec_range(xp, B, K, qp, sp, ng, n0, n1, yp, N, bp); });
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
  const int64_t N = p.size(0), K = 2 * p.size(1), ng = s.size(1), G = K / ng, B = x.size(0);
  auto y = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return y;
  const uint8_t* pp = p.const_data_ptr<uint8_t>();
  const uint16_t *sp = half_ptr(s), *mp = half_ptr(m);
  const float* xp = x.const_data_ptr<float>();
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float* yp = y.mutable_data_ptr<float>();
  if (B <= max_direct) {
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
  float* yp = y.mutable_data_ptr<float>();
  at::parallel_for(0, N, grain_rows(K * 4), [&](int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) tile_f32<4>(xp, wp, K, n, yp, bp);
    for (; n < n1; ++n) tile_f32<1>(xp, wp, K, n, yp, bp);
  });
  return y;
}

// RMSNorm of each row of x [..., D] (fp32, contiguous): x * rsqrt(mean(x^2) + eps) * (w or 1 + w).
// One call instead of the six small kernels ATen runs, which matters at batch 1 (Gemma 3 runs six
// norms a layer). Sums in fp32 as the reference does.
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
      float ss = 0.0f;
      for (int64_t i = 0; i < D; ++i) ss += xr[i] * xr[i];
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
      for (int64_t i = 0; i < D; ++i) yr[i] = (xr[i] * inv) * (wp[i] + add);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(slm_q8, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps, bool plus_one) -> Tensor");
  m.def("matvec_f32(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, int max_direct) -> Tensor");
  m.def("dequantize(Tensor qweight, Tensor scales) -> Tensor");
  m.def("linear_q4(Tensor x, Tensor packed, Tensor scales, Tensor mins, Tensor? bias, int max_direct) -> Tensor");
  m.def("dequantize_q4(Tensor packed, Tensor scales, Tensor mins) -> Tensor");
}

TORCH_LIBRARY_IMPL(slm_q8, CPU, m) {
  m.impl("linear", &linear);
  m.impl("dequantize", &dequantize);
  m.impl("linear_q4", &linear_q4);
  m.impl("dequantize_q4", &dequantize_q4);
  m.impl("matvec_f32", &matvec_f32);
  m.impl("rms_norm", &rms_norm);
}
