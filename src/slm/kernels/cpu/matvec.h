// The linear layers' matrix products: int8 (matvec_int8.cpp), int4 (matvec_int4.cpp), a GGUF
// file's blocks (matvec_gguf.cpp) and fp32 (matvec_f32.cpp). The ops are registered in
// register.cpp; the direct paths (few rows of x) and the row lookups also serve the Decoder.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace slm::cpu {

constexpr int64_t QK = 32;  // weights per scale
constexpr int64_t PF = 8192;  // prefetch distance in bytes of weights

// rows per parallel task: at least ~32 KB of weights, so small matrices do not pay for threads
inline int64_t grain_rows(int64_t K) { return std::max<int64_t>(16, (int64_t(1) << 15) / K); }

// -- shared by the quantized layers (matvec_int8.cpp) ------------------------------------------------
// x [..., K] (any float dtype) -> x as contiguous fp32 [rows, K]; bias (if any) as contiguous fp32 [N].
void prepare(const at::Tensor& x_in, const std::optional<at::Tensor>& bias_, int64_t N, int64_t K, at::Tensor& x,
             at::Tensor& bias);
// y [rows, N] fp32 -> [..., N] in x's dtype.
at::Tensor finish(const at::Tensor& x_in, at::Tensor y, int64_t N);

// -- int8 (matvec_int8.cpp) ------------------------------------------------------------------------
void check_q8(const at::Tensor& q, const at::Tensor& s);
// y [B, N] (+ bias) for few rows of x [B, K], straight from the int8 weights.
void q8_direct(const float* xp, int64_t B, int64_t K, const int8_t* qp, const float* sp, int64_t ng, int64_t N, float* yp,
               const float* bp);
// fp32 rows [n_begin, n_end) of the dequantized weight into out (row stride K).
void dequant_range(const int8_t* q, const float* s, int64_t K, int64_t ng, int64_t n_begin, int64_t n_end,
                   float* out);
at::Tensor dequantize(const at::Tensor& q, const at::Tensor& s);
at::Tensor linear(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& s,
                  const std::optional<at::Tensor>& bias_, int64_t max_direct);

// -- int4 (matvec_int4.cpp) ------------------------------------------------------------------------
void check_q4(const at::Tensor& p, const at::Tensor& s, const at::Tensor& m);
const uint16_t* half_ptr(const at::Tensor& t);  // an fp16 tensor's data as raw 16-bit values
// y [B, N] (+ bias) for few rows of x [B, K], straight from the int4 weights.
void q4_direct(const float* xp, int64_t B, int64_t K, const uint8_t* pp, const uint16_t* sp, const uint16_t* mp, int64_t ng,
               int64_t N, float* yp, const float* bp);
void dequant_range_q4(const uint8_t* p, const uint16_t* s, const uint16_t* m, int64_t K, int64_t ng, int64_t n_begin,
                      int64_t n_end, float* out);
at::Tensor dequantize_q4(const at::Tensor& p, const at::Tensor& s, const at::Tensor& m);
at::Tensor linear_q4(const at::Tensor& x_in, const at::Tensor& p, const at::Tensor& s, const at::Tensor& m,
                     const std::optional<at::Tensor>& bias_, int64_t max_direct);

// -- GGUF blocks (matvec_gguf.cpp) -----------------------------------------------------------------
struct Parts {  // where each part's rows start, in rows and in bytes
  std::vector<int64_t> types, row0, byte0, row_bytes;
  int64_t N = 0;
  Parts(const at::Tensor& blocks, at::IntArrayRef types_, at::IntArrayRef rows, int64_t K);
  int64_t part(int64_t n) const {
    int64_t p = 0;
    while (p + 1 < int64_t(types.size()) && n >= row0[p + 1]) ++p;
    return p;
  }
};

// y [B, N] (+ bias) for B rows of x [B, K] (the direct path, for few rows of x).
void gguf_direct(const Parts& P, const uint8_t* bp, const float* x, int64_t B, int64_t K, float* yp, const float* bias_p);
// fp32 rows [n0, n1) of the stacked parts into out (row stride K).
void dequant_rows(const Parts& P, const uint8_t* bp, int64_t K, int64_t n0, int64_t n1, float* out);
at::Tensor dequantize_gguf(const at::Tensor& blocks, at::IntArrayRef types, at::IntArrayRef rows, int64_t K,
                           const at::Tensor& ids);
at::Tensor linear_gguf(const at::Tensor& x_in, const at::Tensor& blocks, at::IntArrayRef types, at::IntArrayRef rows,
                       int64_t K, const std::optional<at::Tensor>& bias_, int64_t max_direct);
// Whether linear_gguf's Q8_0/Q4_0/Q4_1 products of 9 or more rows of x go through AMX tiles: the
// CPU has AMX-INT8 and AVX-512 VNNI, Linux let this process use the tiles, SLM_NO_AMX is unset.
bool cpu_has_amx();

// -- fp32 (matvec_f32.cpp) -------------------------------------------------------------------------
// y [N] (+ bias) = w [N, K] x [K].
void f32_direct(const float* xp, const float* wp, int64_t N, int64_t K, float* yp, const float* bp);
// y [B, N] (+ bias) = x [B, K] w^T, w [N, K], for a few rows of x (each weight read once for them all).
void f32_rows_direct(const float* xp, int64_t B, const float* wp, int64_t N, int64_t K, float* yp, const float* bp);
// y [N] (+ bias) = x [K] W^T for W stored column-major: wt = W^T [K, N] contiguous.
void f32t_direct(const float* xp, const float* wt, int64_t N, int64_t K, float* yp, const float* bp);
at::Tensor matvec_f32(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias_);

}  // namespace slm::cpu
