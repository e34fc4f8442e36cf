// The ops outside the matrix products (matvec.h), for the registration (register.cpp), and the one
// attention step the Decoder shares (attention.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

// The BLAS that ATen links, if it has a Fortran-style sgemm_ (train.cpp's attention; register.cpp
// leaves attn_train out without it).
extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                       const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));

namespace slm::cpu {

// norm_rope.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, bool plus_one);
at::Tensor rms_norm_rope(const at::Tensor& x, const at::Tensor& w, double eps, bool plus_one, const at::Tensor& cos,
                         const at::Tensor& sin);
at::Tensor rms_norm_add(const at::Tensor& x, const at::Tensor& w, double eps, bool plus_one, const at::Tensor& residual);

// gelu.cpp
at::Tensor gelu_tanh_mul(const at::Tensor& x);

// argmax.cpp
at::Tensor argmax_rows(const at::Tensor& x);

// sample.cpp
at::Tensor sample_top_p(const at::Tensor& x, const at::Tensor& temperature, const at::Tensor& top_p, const at::Tensor& u);

// attention.cpp
at::Tensor attn_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);
// One sequence's attn_step (the Decoder's attention, a token at a time).
void attn_step_row(const float* row, int64_t H, int64_t Hkv, int64_t D, int64_t rd, const float* qwp, const float* kwp,
                   double eps, bool plus_one, const float* c, const float* s, float* kp, float* vp, int64_t S, int64_t slot,
                   int64_t read, float sc, float* y);
// attn_step_row for T tokens at once, into caches without a ring (position p in slot p): token t of
// row rows[t] (K, V [rows, Hkv, S, D]) at positions[t], qkv [T, (H + 2 Hkv) D], cos and sin the rope
// tables [positions, rd]. Every key and value is stored first, then each (token, head) attends over
// its row's slots [0, p + 1) (causal: a later token of the same row sits in a later slot), the
// pairs spread over the threads. -> y [T, H D].
void attn_step_rows(int64_t T, const float* qkv, int64_t H, int64_t Hkv, int64_t D, int64_t rd, const float* qwp,
                    const float* kwp, double eps, bool plus_one, const float* cos, const float* sin,
                    const int64_t* positions, const int64_t* rows, float* K, float* V, int64_t S, float sc, float* y);
at::Tensor attn_step(const at::Tensor& qkv, const std::optional<at::Tensor>& qw, const std::optional<at::Tensor>& kw,
                     double eps, bool plus_one, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& K, const at::Tensor& V,
                     int64_t slot, int64_t read, double scale, int64_t H);

// train.cpp
at::Tensor glu_train(const at::Tensor& h, const std::optional<at::Tensor>& dy, bool gelu);
std::tuple<at::Tensor, at::Tensor> rope_qk_train(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                                 int64_t H, int64_t K);
at::Tensor rope_qkv_backward(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& cos,
                             const at::Tensor& sin);
std::tuple<at::Tensor, at::Tensor> rms_norm_train(const at::Tensor& x, const at::Tensor& w, double eps, bool plus_one);
std::tuple<at::Tensor, at::Tensor> rms_norm_train_backward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& r,
                                                           const at::Tensor& dy, bool plus_one);
at::Tensor softmax_xent_(at::Tensor logits, const at::Tensor& targets, int64_t ignore_index, double scale);
std::tuple<at::Tensor, at::Tensor> attn_train(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_train_backward(const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse, const at::Tensor& dout, double scale);

}  // namespace slm::cpu
