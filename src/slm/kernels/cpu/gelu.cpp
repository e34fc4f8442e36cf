// GeGLU's activation for decoding, fp32 on the CPU (the row kernel is in rows.h).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>

#include "ops.h"
#include "rows.h"

namespace slm::cpu {

// x [..., 2F] = [gate | up] -> gelu_tanh(gate) * up [..., F], as F.gelu(gate, approximate="tanh") * up.
at::Tensor gelu_tanh_mul(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(-1) % 2 == 0,
              "slm_cpu.gelu_tanh_mul: x must be contiguous fp32 [..., 2F]");
  const int64_t F2 = x.size(-1), F = F2 / 2, rows = F2 ? x.numel() / F2 : 0;
  auto sizes = x.sizes().vec();
  sizes.back() = F;
  auto y = at::empty(sizes, x.options());
  const float* xp = x.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) gelu_tanh_mul_row(xp + r * F2, xp + r * F2 + F, yp + r * F, F);
  return y;
}

}  // namespace slm::cpu
