// fp32 matrix-vector products for decoding (one row of x, or a few): w [N, K] row-major, the same
// prefetching as the int8 loop. MKL's sgemv reaches 4-9 GB/s on the small matrices of a small
// model; this streams them closer to the memory bandwidth.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "matvec.h"
#include "simd.h"

namespace slm::cpu {

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

// R consecutive output rows (n0 .. n0+R-1) against NB rows of x [NB, K] (row stride K): y[b * N + n].
// The R rows of weights are read once for all NB rows of x.
template <int R, int NB>
inline void tile_f32_rows(const float* __restrict x, const float* __restrict w, int64_t K, int64_t n0,
                          float* __restrict y, int64_t N, const float* bias) {
  const float* wr = w + n0 * K;
  __m256 acc[R][NB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if ((k & 15) == 0) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(wr + r * K + k) + PF, _MM_HINT_T1);
    }
    __m256 xv[NB];
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) xv[b] = _mm256_loadu_ps(x + b * K + k);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 wv = _mm256_loadu_ps(wr + r * K + k);
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm256_fmadd_ps(wv, xv[b], acc[r][b]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) {
      float v = hsum(acc[r][b]);
      for (int64_t j = k; j < K; ++j) v += wr[r * K + j] * x[b * K + j];
      y[b * N + n0 + r] = v + (bias ? bias[n0 + r] : 0.0f);
    }
}

template <int R, int NB>
void f32_tiles(const float* x, const float* w, int64_t K, int64_t n_begin, int64_t n_end, float* y, int64_t N,
               const float* bias) {
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R) tile_f32_rows<R, NB>(x, w, K, n, y, N, bias);
  for (; n < n_end; ++n) tile_f32_rows<1, NB>(x, w, K, n, y, N, bias);
}

// y [B, N] (+ bias) = x [B, K] w^T for a few rows of x. ATen's GEMM (MKL) takes 1.4x one row's
// time for 2 rows and 2.5x for 4 on a model's small matrices; here a chunk of output rows is read
// from memory once and re-read from L1 for each group of up to 4 rows of x.
void f32_rows_direct(const float* xp, int64_t B, const float* wp, int64_t N, int64_t K, float* yp, const float* bp) {
  constexpr int64_t CHUNK = 8;  // output rows whose weights stay in L1 while the groups of x pass
  const int64_t grain = std::max<int64_t>(CHUNK, grain_rows(K * 4) / std::max<int64_t>(1, B / 4));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t c0 = n0; c0 < n1; c0 += CHUNK) {
      const int64_t c1 = std::min(c0 + CHUNK, n1);
      for (int64_t b = 0; b < B;) {
        const float* xb = xp + b * K;
        float* yb = yp + b * N;
        switch (std::min<int64_t>(B - b, 4)) {
          case 1: f32_tiles<4, 1>(xb, wp, K, c0, c1, yb, N, bp); b += 1; break;
          case 2: f32_tiles<4, 2>(xb, wp, K, c0, c1, yb, N, bp); b += 2; break;
          case 3: f32_tiles<2, 3>(xb, wp, K, c0, c1, yb, N, bp); b += 3; break;
          default: f32_tiles<2, 4>(xb, wp, K, c0, c1, yb, N, bp); b += 4; break;
        }
      }
    }
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

// x [..., K] fp32 -> [..., N]: one row through f32_direct, several through f32_rows_direct.
at::Tensor matvec_f32(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias_) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1 &&
                  x.size(-1) == w.size(1),
              "slm_cpu.matvec_f32: x must be contiguous fp32 [..., in_features]");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2 && w.is_contiguous(), "slm_cpu.matvec_f32: w must be contiguous fp32 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  const float* bp = nullptr;
  if (bias_.has_value() && bias_->defined()) {
    TORCH_CHECK(bias_->scalar_type() == at::kFloat && bias_->is_contiguous() && bias_->numel() == N, "slm_cpu.matvec_f32: bad bias");
    bp = bias_->const_data_ptr<float>();
  }
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = at::empty(sizes, x.options());
  const float* xp = x.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  const int64_t B = x.numel() / K;
  if (B == 1) {
    f32_direct(xp, wp, N, K, y.mutable_data_ptr<float>(), bp);
  } else if (B > 1) {
    f32_rows_direct(xp, B, wp, N, K, y.mutable_data_ptr<float>(), bp);
  }
  return y;
}

}  // namespace slm::cpu
