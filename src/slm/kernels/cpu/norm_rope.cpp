// RMSNorm for decoding, alone, followed by the rotary embedding (qk-norm), or added to a residual.
// At batch 1 a Gemma 3 layer runs ~40 small ATen ops around its 4 matrix products, ~5 us each:
// as long as the products themselves for gemma-3-270m. These fuse the common ones, fp32 on the CPU.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ops.h"
#include "rows.h"

namespace slm::cpu {

// RMSNorm of each row of x [..., D] (fp32, contiguous): x * rsqrt(mean(x^2) + eps) * (w or 1 + w).
// One call instead of the six small kernels ATen runs, which matters at batch 1 (Gemma 3 runs six
// norms a layer). Sums in fp32 as the reference does.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, bool plus_one) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(), "slm_cpu.rms_norm: x must be contiguous fp32");
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == D, "slm_cpu.rms_norm: bad weight");
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

// RMSNorm of each row (head) of x [B, H, T, D], then the rotary embedding of its first rd dims:
// y = n * cos + roll(n, rd/2) * sin with cos, sin [B, 1, T, rd] (sin carrying the sign), as
// model.apply_rope(norm(x)).
at::Tensor rms_norm_rope(const at::Tensor& x, const at::Tensor& w, double eps, bool plus_one, const at::Tensor& cos,
                         const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 4,
              "slm_cpu.rms_norm_rope: x must be contiguous fp32 [B, H, T, D]");
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), rd = cos.size(-1);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == D, "slm_cpu.rms_norm_rope: bad weight");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.dim() == 4 && cos.sizes() == sin.sizes() && cos.size(0) == B && cos.size(1) == 1 && cos.size(2) == T &&
                  rd <= D && rd % 2 == 0,
              "slm_cpu.rms_norm_rope: cos and sin must be contiguous fp32 [B, 1, T, rd]");
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
              "slm_cpu.rms_norm_add: residual must be contiguous fp32 shaped as x");
  auto y = rms_norm(x, w, eps, plus_one);
  float* yp = y.mutable_data_ptr<float>();
  const float* rp = residual.const_data_ptr<float>();
  for (int64_t i = 0; i < y.numel(); ++i) yp[i] += rp[i];
  return y;
}

}  // namespace slm::cpu
