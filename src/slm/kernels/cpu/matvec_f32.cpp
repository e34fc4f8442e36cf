// fp32 matrix-vector product for decoding (one row of x): w [N, K] row-major, the same prefetching
// as the int8 loop. MKL's sgemv reaches 4-9 GB/s on the small matrices of a small model; this
// streams them closer to the memory bandwidth.

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
              "slm_cpu.matvec_f32: x must be one contiguous fp32 row");
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
  f32_direct(xp, wp, N, K, y.mutable_data_ptr<float>(), bp);
  return y;
}

}  // namespace slm::cpu
