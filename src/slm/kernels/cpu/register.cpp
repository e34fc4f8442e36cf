// The ops and the Decoder class, registered with the dispatcher when the library is loaded:
// torch.ops.slm_cpu.<op> and torch.classes.slm_cpu.Decoder.

#include <torch/library.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "abi.h"
#include "decoder.h"
#include "matvec.h"
#include "ops.h"

using namespace slm::cpu;

namespace {

// abi.h's table as two lists, names and values, for tests/test_kernels_abi.py.
std::tuple<std::vector<std::string>, std::vector<int64_t>> abi_constants() {
  std::vector<std::string> names;
  std::vector<int64_t> values;
  for (const auto& [name, value] : abi_table()) names.emplace_back(name), values.push_back(value);
  return {names, values};
}

}  // namespace

TORCH_LIBRARY(slm_cpu, m) {
  m.def("abi_constants() -> (str[], int[])", &abi_constants);
  m.def("cpu_has_amx() -> bool", &cpu_has_amx);
  m.def("rms_norm(Tensor x, Tensor w, float eps, bool plus_one) -> Tensor");
  m.def("rms_norm_rope(Tensor x, Tensor w, float eps, bool plus_one, Tensor cos, Tensor sin) -> Tensor");
  m.def("rms_norm_add(Tensor x, Tensor w, float eps, bool plus_one, Tensor residual) -> Tensor");
  m.def("gelu_tanh_mul(Tensor x) -> Tensor");
  m.def("attn_decode(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("sample_top_p(Tensor x, Tensor temperature, Tensor top_p, Tensor u) -> Tensor");
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
      .def("step", &Decoder::step)
      .def("step_rows", &Decoder::step_rows);
}

TORCH_LIBRARY_IMPL(slm_cpu, CPU, m) {
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
  m.impl("sample_top_p", &sample_top_p);
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
