// One-row kernels that several ops and the Decoder share: RMSNorm of a row (norm_rope.cpp,
// attention.cpp, train.cpp, decoder.cpp), gelu_tanh(gate) * up (gelu.cpp, decoder.cpp) and
// silu(gate) * up (decoder.cpp).
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "simd.h"

namespace slm::cpu {

// One row of RMSNorm: out = x / rms(x) * (w + add), add = 1 for Gemma's (1 + w). Returns 1 / rms(x).
inline float rms_row(const float* x, const float* w, int64_t D, double eps, float add, float* out) {
  const float inv = 1.0f / std::sqrt(dot_f32(x, x, D) / static_cast<float>(D) + static_cast<float>(eps));
  for (int64_t i = 0; i < D; ++i) out[i] = (x[i] * inv) * (w[i] + add);
  return inv;
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

// o = silu(g) * u = g / (1 + exp(-g)) * u over F values (SwiGLU's activation), eight at a time:
// a decode step of 16 rows of SmolLM2 takes 737,280 of them, ~3-4 ms of scalar expf on one core.
// exp8 clamps its argument, so a large |g| gives g or 0 as the scalar form does.
inline void silu_mul_row(const float* g, const float* u, float* o, int64_t F) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= F; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
    _mm256_storeu_ps(o + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
  }
  for (; i < F; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

}  // namespace slm::cpu
