// Greedy decoding's argmax over the logits, split over threads.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "ops.h"

namespace slm::cpu {

// Index of the largest value in each row of x [B, V] fp32 (the first one on ties, the first NaN
// if any, as torch.argmax), split over threads: 262,144 logits take ~0.7 ms in ATen's argmax.
at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 && x.size(1) > 0,
              "slm_cpu.argmax_rows: x must be contiguous fp32 [B, V]");
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

}  // namespace slm::cpu
