// Weight-only int8 linear layer for x86 CPUs with AVX2 + FMA.
//
// Format (as GGUF's Q8_0, with the scales kept apart): q int8 [N, K], s fp32 [N, K/32], one scale
// per block of 32 consecutive input weights, w[n, k] ~= s[n, k/32] * q[n, k].
//
//   y[b, n] = sum_blk s[n, blk] * sum_{k in blk} x[b, k] * q[n, k]  (+ bias[n])
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
// Registered as torch.ops.slm_q8.{linear, dequantize}.

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
                 int64_t K, int64_t n0, float* __restrict y, int64_t ldy, const float* bias) {
  const int64_t nblk = K / QK;
  const int8_t* qr = q + n0 * K;
  const float* sr = s + n0 * nblk;
  __m256 acc[R][NB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm256_setzero_ps();
  // Software prefetch PF bytes ahead in the weight stream (and as far in the scales), into L2:
  // the hardware prefetchers alone leave this loop at half the memory bandwidth.
  for (int64_t i = 0; i < (R * nblk * 4 + 63) / 64; ++i)
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
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 sv = _mm256_broadcast_ss(sr + r * nblk + blk);
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
void rows(const float* x, int64_t ldx, const int8_t* q, const float* s, int64_t K, int64_t n_begin,
          int64_t n_end, float* y, int64_t ldy, const float* bias) {
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R) tile<R, NB>(x, ldx, q, s, K, n, y, ldy, bias);
  for (; n < n_end; ++n) tile<1, NB>(x, ldx, q, s, K, n, y, ldy, bias);
}

// All B rows of x against output rows [n_begin, n_end): batch in chunks of 4 (1..3 for the rest),
// each chunk re-reading the weight tile while it is still in L1.
void matvec_range(const float* x, int64_t B, int64_t K, const int8_t* q, const float* s, int64_t n_begin,
                  int64_t n_end, float* y, int64_t N, const float* bias) {
  constexpr int64_t CHUNK = 16;  // output rows per pass: 16 * K bytes of weights stay in L1/L2
  for (int64_t c0 = n_begin; c0 < n_end; c0 += CHUNK) {
    const int64_t c1 = std::min(c0 + CHUNK, n_end);
    for (int64_t b = 0; b < B;) {
      const float* xb = x + b * K;
      float* yb = y + b * N;
      switch (std::min<int64_t>(B - b, 4)) {
        case 1: rows<4, 1>(xb, K, q, s, K, c0, c1, yb, N, bias); b += 1; break;
        case 2: rows<2, 2>(xb, K, q, s, K, c0, c1, yb, N, bias); b += 2; break;
        case 3: rows<2, 3>(xb, K, q, s, K, c0, c1, yb, N, bias); b += 3; break;
        default: rows<1, 4>(xb, K, q, s, K, c0, c1, yb, N, bias); b += 4; break;
      }
    }
  }
}

// fp32 rows [n_begin, n_end) of the dequantized weight into out (row stride K).
void dequant_range(const int8_t* q, const float* s, int64_t K, int64_t n_begin, int64_t n_end, float* out) {
  const int64_t nblk = K / QK;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* qr = q + n * K;
    float* o = out + (n - n_begin) * K;
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const __m256 sv = _mm256_broadcast_ss(s + n * nblk + blk);
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
                  s.size(1) == q.size(1) / QK,
              "slm_q8: scales must be contiguous fp32 [N, K/32]");
}

// rows per parallel task: at least ~32 KB of weights, so small matrices do not pay for threads
int64_t grain_rows(int64_t K) { return std::max<int64_t>(16, (int64_t(1) << 15) / K); }

at::Tensor dequantize(const at::Tensor& q, const at::Tensor& s) {
  check(q, s);
  const int64_t N = q.size(0), K = q.size(1);
  auto out = at::empty({N, K}, q.options().dtype(at::kFloat));
  const int8_t* qp = q.const_data_ptr<int8_t>();
  const float* sp = s.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, N, grain_rows(K), [&](int64_t n0, int64_t n1) { dequant_range(qp, sp, K, n0, n1, op + n0 * K); });
  return out;
}

// x [B, K] fp32 contiguous -> [B, N] fp32.
at::Tensor compute(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, const at::Tensor& bias,
                   int64_t max_direct) {
  const int64_t N = q.size(0), K = q.size(1);
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
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { matvec_range(xp, B, K, qp, sp, n0, n1, yp, N, bp); });
    return y;
  }
  // Prefill: a few MB of dequantized rows at a time, each multiplied by ATen's GEMM.
  const int64_t chunk = std::max<int64_t>(64, ((int64_t(1) << 20) / K + 63) / 64 * 64);
  auto wbuf = at::empty({std::min(chunk, N), K}, x.options());
  for (int64_t c0 = 0; c0 < N; c0 += chunk) {
    const int64_t c1 = std::min(c0 + chunk, N), n = c1 - c0;
    float* wp = wbuf.mutable_data_ptr<float>();
    at::parallel_for(c0, c1, grain_rows(K),
                     [&](int64_t n0, int64_t n1) { dequant_range(qp, sp, K, n0, n1, wp + (n0 - c0) * K); });
    auto w = wbuf.narrow(0, 0, n);
    y.narrow(1, c0, n).copy_(bias.defined() ? at::addmm(bias.narrow(0, c0, n), x, w.t()) : at::mm(x, w.t()));
  }
  return y;
}


// x [..., K] (any float dtype) -> [..., N] in x's dtype, computed in fp32. Above max_direct rows
// of x: dequantize and GEMM.
at::Tensor linear(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& s,
                  const std::optional<at::Tensor>& bias_, int64_t max_direct) {
  check(q, s);
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(x_in.device().is_cpu() && at::isFloatingType(x_in.scalar_type()) && x_in.dim() >= 1 && x_in.size(-1) == K,
              "slm_q8.linear: x must be a floating-point CPU tensor [..., ", K, "]");
  // Each ATen call below costs a dispatch (~1 us): skip those that would do nothing.
  at::Tensor x = x_in.dim() == 2 ? x_in : x_in.reshape({-1, K});
  if (x.scalar_type() != at::kFloat) x = x.to(at::kFloat);
  if (!x.is_contiguous()) x = x.contiguous();
  at::Tensor bias;
  if (bias_.has_value() && bias_->defined()) {
    bias = *bias_;
    if (bias.scalar_type() != at::kFloat) bias = bias.to(at::kFloat);
    if (!bias.is_contiguous()) bias = bias.contiguous();
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == N, "slm_q8.linear: bias must be [", N, "]");
  }
  at::Tensor y = compute(x, q, s, bias, max_direct);
  if (x_in.dim() != 2) {
    auto out_shape = x_in.sizes().vec();
    out_shape.back() = N;
    y = y.view(out_shape);
  }
  return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
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
}

TORCH_LIBRARY_IMPL(slm_q8, CPU, m) {
  m.impl("linear", &linear);
  m.impl("dequantize", &dequantize);
  m.impl("matvec_f32", &matvec_f32);
  m.impl("rms_norm", &rms_norm);
}
