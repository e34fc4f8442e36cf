// Linear layers kept in a GGUF file's own block formats, byte for byte: Q8_0 (34 bytes per 32
// weights), Q4_0 (18), Q4_1 (20), Q5_0 (22), Q5_1 (24), Q4_K (144 per 256), Q5_K (176 per 256) and
// Q6_K (210 per 256), as ggml lays them out (ggml-common.h). One layer may hold several parts of different formats stacked by rows (a fused
// QKV whose V is Q8_0 and Q, K Q5_0): `blocks` is their bytes end to end, part i rows[i] rows of
// types[i].
//
// Up to max_direct rows of x, x is quantized to int8 in blocks of 32 (scale amax / 127, rounded to
// nearest even, as llama.cpp's q8_0 activations), and so is the residual in steps of a 254th of
// that (quantize_x2: ~16 bits of x in a pair of int8 rows); each block of weights is dotted with
// the pair in integers, as one int32 (254 q + q': vpmaddubsw + vpmaddwd per row, or for the types
// that widen cheaply one int16 x against int16 weights, wide16), then scaled in fp32. Q4_K's minimums
// use the sums of the quantized x per block. Each thread walks one contiguous range of rows, so
// the weights arrive as one sequential stream per core: on the 2-core EPYC that reaches the
// memory bandwidth (~16 GB/s), where reading 2-4 rows side by side (several streams, as the int8
// tile in matvec_int8.cpp) drew half of it. Above max_direct rows: dequantize blocks of rows to
// fp32 and GEMM. On a CPU with AVX-512, F32_ROWS to F32_MAX_ROWS rows of x take rows_gguf_f32
// instead: rows of weights dequantized to fp32 in L1, dotted with the unquantized x. On a CPU with
// AVX-512 VNNI, VNNI_ROWS to max_direct rows of x of Q8_0/Q4_0/Q4_1 layers take cols16_vnni: the
// same pairs of int8 x as the one-row path, 16 rows of weights at a time with vpdpbusd (a 16-row
// SmolLM2 step 28 -> 24 ms against rows_gguf_f32); on a CPU with AMX-INT8, from AMX_ROWS rows,
// cols16_amx computes the same numbers through the tile registers (24 -> 20.5 ms).
// The PyTorch fallback (slm.quantize_gguf) computes the same: the same int8 x, the file's weights
// dequantized by gguf.quants.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "matvec.h"
#include "simd.h"

namespace slm::cpu {

constexpr int64_t T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14;
// Q5_0 with its blocks regrouped by 4 (slm's order, the same 22 bytes a block): per group of 4
// blocks the 4 fp16 scales (8 bytes), the 4 x 32 high bits as one 16-byte plane (byte j, bit i: weight
// j of block i; bit 4 + i: weight j + 16 of block i), then the 4 blocks' 16 bytes of low nibbles.
// A row's last K/32 % 4 blocks stay in Q5_0's own layout. The plane spreads to the weights' bytes in
// 2 instructions a block, where Q5_0's 32-bit masks take 5, and the scales convert 4 at a time: the
// loop does ~11 vector operations a block instead of ~19, enough to keep up with the memory.
constexpr int64_t T_Q5_0R4 = 1006;
// From this many rows of x, gguf_direct dots fp32 x with each row of weights dequantized to fp32
// (rows_gguf_f32) instead of quantizing x (measured: benchmarks/batched_decode.py).
constexpr int64_t F32_ROWS = 8;
// ... and up to this many, above max_direct, instead of dequantizing blocks of rows for ATen's GEMM
// (measured: the direct path 1.3-1.5x the GEMM's speed at 32-64 rows, even at 128).
constexpr int64_t F32_MAX_ROWS = 96;

inline int64_t block_weights(int64_t t) { return t == T_Q4_K || t == T_Q5_K || t == T_Q6_K ? 256 : 32; }
inline int64_t block_bytes(int64_t t) {
  switch (t) {
    case T_Q4_0: return 18;
    case T_Q4_1: return 20;
    case T_Q5_1: return 24;
    case T_Q5_K: return 176;
    case T_Q8_0: return 34;
    case T_Q5_0: return 22;
    case T_Q5_0R4: return 22;
    case T_Q4_K: return 144;
    case T_Q6_K: return 210;
    default: TORCH_CHECK(false, "slm_cpu: unsupported GGUF block type ", t);
  }
  return 0;
}
constexpr int64_t block_bytes_c(int64_t t) {
  return t == T_Q4_0 ? 18 : t == T_Q4_1 ? 20 : t == T_Q5_0 ? 22 : t == T_Q5_1 ? 24 : t == T_Q8_0 ? 34 : 0;
}
#define SLM_INLINE inline __attribute__((always_inline))
SLM_INLINE float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

SLM_INLINE __m256i bytes_from_bits_32(const uint8_t* p) {  // byte j = 0xFF where bit j of p's 32 bits is set
  uint32_t v;
  std::memcpy(&v, p, 4);
  const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  const __m256i bytes = _mm256_or_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(int(v)), shuf),
                                        _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
}
SLM_INLINE __m256i nibbles_32(const uint8_t* p) {  // 16 bytes -> 32 nibbles: low ones, then high ones
  const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0F));
}

// v shifted left by s bits (right by -s) in 16-bit lanes; s a constant after unrolling
SLM_INLINE __m256i shift_bits(__m256i v, int s) {
  return s >= 0 ? _mm256_slli_epi16(v, s) : _mm256_srli_epi16(v, -s);
}

// x . w for signed weights w (|w| <= 127) and aw = |w| (vpmaddubsw takes unsigned x signed: |w|
// with x's signs moved by w's), one x row, or with PAIR a row and its residual r bytes further on
// (quantize_x2): 254 (row) + (residual) in int32, exact, in units of the residual's step.
template <bool PAIR>
SLM_INLINE __m256i dot_s(__m256i aw, __m256i w, const int8_t* x, int64_t r) {
  const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)), w));
  if constexpr (!PAIR) return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
  const __m256i p2 = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r)), w));
  return _mm256_add_epi32(_mm256_madd_epi16(p, _mm256_set1_epi16(254)), _mm256_madd_epi16(p2, _mm256_set1_epi16(1)));
}
// the same for unsigned w (0..127)
template <bool PAIR>
SLM_INLINE __m256i dot_u(__m256i w, const int8_t* x, int64_t r) {
  const __m256i p = _mm256_maddubs_epi16(w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  if constexpr (!PAIR) return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
  const __m256i p2 = _mm256_maddubs_epi16(w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r)));
  return _mm256_add_epi32(_mm256_madd_epi16(p, _mm256_set1_epi16(254)), _mm256_madd_epi16(p2, _mm256_set1_epi16(1)));
}

// Scales and minimums of one Q4_K super-block (8 sub-blocks of 32, 6 bits each, packed in 12
// bytes) as two vectors of 8 int32, unpacked in general registers (ggml's utmp trick): writing
// them to memory one by one and loading them as a vector stalls on store forwarding.
SLM_INLINE void q4k_scales(const uint8_t* sc, __m256i& s, __m256i& m) {
  uint32_t u[3];
  std::memcpy(u, sc, 12);
  const uint32_t k1 = 0x3f3f3f3f, k2 = 0x0f0f0f0f, k3 = 0x03030303;
  const uint32_t s0 = u[0] & k1, s1 = (u[2] & k2) | (((u[0] >> 6) & k3) << 4);
  const uint32_t m0 = u[1] & k1, m1 = ((u[2] >> 4) & k2) | (((u[1] >> 6) & k3) << 4);
  s = _mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, int(s1), int(s0)));
  m = _mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, int(m1), int(m0)));
}

// Which types dot_row reads as int16 weights against x16 (PAIR): those whose weights widen to
// int16 lanes as they load (vpmovsxbw/vpmovzxbw from memory, then a mask or a shift); one vpmaddwd
// then takes 16 weights. The pair as two int8 rows costs two vpmaddubsw and two vpmaddwd per 32
// weights, x16 two vpmaddwd, and the vector multiplier bounds these loops when the memory is quick:
// x16 read gemma-3-270m's Q8_0 LM head at ~26 GB/s where the int8 pair reached ~17, and SmolLM2's
// Q4_1 MLP ~12% faster. Q5_0 (regrouped), Q4_K, Q5_K and Q6_K take more instructions to widen than
// they save (measured ~18% slower for Q5_0, even for Q4_K): they keep the int8 pair.
constexpr bool wide16(int64_t T) { return T == T_Q8_0 || T == T_Q4_0 || T == T_Q4_1; }

// One row of weights (type T, nb32 blocks of 32) against NB rows of quantized x (row stride ldq
// for xq, ldb for the per-block dx and xs): out[b] = sum_k w[k] * x_b[k]. With PAIR each x row is
// quantize_x2's pair: the residual r bytes after the row, dx the residual's step (the row's / 254),
// xs the pair's sums, and x16 (row stride ldx) the pair as one int16 (254 q + q'), which the
// wide16 types dot instead; the others dot both int8 rows into one int32 (dot_s/dot_u). Either way
// one conversion and one FMA a block serve 16 bits of x. U independent accumulators per row of x:
// one would chain every block's FMA on the last (4 cycles each), which bounded this loop below the
// memory bandwidth.
template <int64_t T, int NB, bool PAIR, bool W16 = PAIR && wide16(T)>
SLM_INLINE void dot_row(const uint8_t* __restrict w, const int8_t* __restrict xq, int64_t ldq, int64_t r,
                        const int16_t* __restrict x16, int64_t ldx, const float* __restrict dx,
                        const float* __restrict xs, int64_t ldb, int64_t nb32, float* out) {
  // x16 . (wa, wb): 32 int16 weights against the 32 int16 x at x16 + off, in 8 int32 lanes
  auto dot16 = [](__m256i wa, __m256i wb, const int16_t* x) __attribute__((always_inline)) {
    return _mm256_add_epi32(_mm256_madd_epi16(wa, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))),
                            _mm256_madd_epi16(wb, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16))));
  };
  auto u16 = [](const uint8_t* p) __attribute__((always_inline)) {  // 16 bytes zero-extended to int16
    return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  };
  constexpr int U = NB == 1 ? 4 : 2;
  __m256 acc[NB][U], macc[NB];
#pragma GCC unroll 4
  for (int b = 0; b < NB; ++b) {
    macc[b] = _mm256_setzero_ps();
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) acc[b][u] = _mm256_setzero_ps();
  }
  if constexpr (T == T_Q8_0 || T == T_Q5_0 || T == T_Q4_0 || T == T_Q4_1 || T == T_Q5_1) {
    // Blocks of 32: d (fp16), for Q4_1/Q5_1 m (fp16: w = d q + m, whose x . m is m * the block's
    // sum of the quantized x, xs), then Q5's 32 high bits, then the weights.
    constexpr int64_t BB = block_bytes_c(T);
    constexpr bool has_min = T == T_Q4_1 || T == T_Q5_1;
    float msum[NB];  // sum over blocks of m * xs
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) msum[b] = 0.0f;
    auto weights = [](const uint8_t* p) __attribute__((always_inline)) {
      if constexpr (T == T_Q8_0) {
        return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2));
      } else if constexpr (T == T_Q5_0) {
        const __m256i hi = _mm256_andnot_si256(bytes_from_bits_32(p + 2), _mm256_set1_epi8(char(0xF0)));
        return _mm256_or_si256(nibbles_32(p + 6), hi);  // q - 16 in -16..15
      } else if constexpr (T == T_Q4_0) {
        return _mm256_sub_epi8(nibbles_32(p + 2), _mm256_set1_epi8(8));  // q - 8 in -8..7
      } else if constexpr (T == T_Q4_1) {
        return nibbles_32(p + 4);  // 0..15
      } else {  // Q5_1: 0..31
        return _mm256_or_si256(nibbles_32(p + 8), _mm256_and_si256(bytes_from_bits_32(p + 4), _mm256_set1_epi8(0x10)));
      }
    };
    auto dot = [r](__m256i q, __m256i aq, const int8_t* x) __attribute__((always_inline)) {
      if constexpr (has_min) return dot_u<PAIR>(q, x, r);
      else return dot_s<PAIR>(aq, q, x, r);
    };
    // W16: the block's weights as int16, weights 0..15 and 16..31
    auto weights16 = [&](const uint8_t* p, __m256i& wa, __m256i& wb) __attribute__((always_inline)) {
      if constexpr (T == T_Q8_0) {
        wa = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2)));
        wb = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 18)));
      } else {  // Q4_0 (q - 8), Q4_1 (q): byte j holds weight j (low nibble) and j + 16
        const __m256i n = u16(p + (T == T_Q4_0 ? 2 : 4)), c = _mm256_set1_epi16(T == T_Q4_0 ? 8 : 0);
        wa = _mm256_sub_epi16(_mm256_and_si256(n, _mm256_set1_epi16(0x0F)), c);
        wb = _mm256_sub_epi16(_mm256_srli_epi16(n, 4), c);
      }
    };
    auto block = [&](const uint8_t* p, int64_t bi, int u) __attribute__((always_inline)) {
      const float d = f16(p);
      if constexpr (W16) {
        __m256i wa, wb;
        weights16(p, wa, wb);
#pragma GCC unroll 4
        for (int b = 0; b < NB; ++b) {
          const __m256i v = dot16(wa, wb, x16 + b * ldx + bi * 32);
          acc[b][u] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx[b * ldb + bi]), _mm256_cvtepi32_ps(v), acc[b][u]);
          if constexpr (has_min) msum[b] += f16(p + 2) * xs[b * ldb + bi];
        }
      } else {
        const __m256i q = weights(p), aq = has_min ? q : _mm256_abs_epi8(q);
#pragma GCC unroll 4
        for (int b = 0; b < NB; ++b) {
          const __m256i v = dot(q, aq, xq + b * ldq + bi * 32);
          acc[b][u] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx[b * ldb + bi]), _mm256_cvtepi32_ps(v), acc[b][u]);
          if constexpr (has_min) msum[b] += f16(p + 2) * xs[b * ldb + bi];
        }
      }
    };
    int64_t blk = 0;
    for (; blk + U <= nb32; blk += U, w += U * BB)
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) block(w + u * BB, blk + u, u);
    for (; blk < nb32; ++blk, w += BB) block(w, blk, 0);
    if constexpr (has_min) {
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) macc[b] = _mm256_set_ps(0, 0, 0, 0, 0, 0, 0, -msum[b]);
    }
  } else if constexpr (T == T_Q5_0R4) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), b4 = _mm256_set1_epi8(0x10);
    __m128 corr[NB];  // sum over blocks of d * dx * sum(xq): the -16 of every weight
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) corr[b] = _mm_setzero_ps();
    int64_t blk = 0;
    for (; blk + 4 <= nb32; blk += 4, w += 88) {
      const __m128 d4 = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w)));
      const __m128i p = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 8));
      const __m256i plane = _mm256_set_m128i(_mm_srli_epi16(p, 4), p);
      __m256i q[4];
      q[0] = _mm256_or_si256(nibbles_32(w + 24), _mm256_and_si256(_mm256_slli_epi16(plane, 4), b4));
      q[1] = _mm256_or_si256(nibbles_32(w + 40), _mm256_and_si256(_mm256_slli_epi16(plane, 3), b4));
      q[2] = _mm256_or_si256(nibbles_32(w + 56), _mm256_and_si256(_mm256_slli_epi16(plane, 2), b4));
      q[3] = _mm256_or_si256(nibbles_32(w + 72), _mm256_and_si256(_mm256_slli_epi16(plane, 1), b4));
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) {
        alignas(16) float sd[4];
        _mm_store_ps(sd, _mm_mul_ps(d4, _mm_loadu_ps(dx + b * ldb + blk)));
        corr[b] = _mm_fmadd_ps(d4, _mm_loadu_ps(xs + b * ldb + blk), corr[b]);
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          const __m256i v = dot_u<PAIR>(q[i], xq + b * ldq + (blk + i) * 32, r);
          acc[b][i % U] = _mm256_fmadd_ps(_mm256_broadcast_ss(sd + i), _mm256_cvtepi32_ps(v), acc[b][i % U]);
        }
      }
    }
    for (; blk < nb32; ++blk, w += 22) {  // the row's last blocks, in Q5_0's layout
      const __m256i hi = _mm256_andnot_si256(bytes_from_bits_32(w + 2), _mm256_set1_epi8(char(0xF0)));
      const __m256i q = _mm256_or_si256(nibbles_32(w + 6), hi), aq = _mm256_abs_epi8(q);
      const float d = f16(w);
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) {
        const __m256i v = dot_s<PAIR>(aq, q, xq + b * ldq + blk * 32, r);
        acc[b][0] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx[b * ldb + blk]), _mm256_cvtepi32_ps(v), acc[b][0]);
      }
    }
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) {
      __m128 c = _mm_hadd_ps(corr[b], corr[b]);
      c = _mm_hadd_ps(c, c);
      macc[b] = _mm256_set_ps(0, 0, 0, 0, 0, 0, 0, 16.0f * _mm_cvtss_f32(c));
    }
  } else if constexpr (T == T_Q4_K || T == T_Q5_K) {
    // Q5_K: Q4_K's layout with 32 bytes of high bits (qh, bit s of byte l: weight l of sub-block s)
    // between the scales and the nibbles.
    constexpr int64_t SB = T == T_Q4_K ? 144 : 176, QS = T == T_Q4_K ? 16 : 48;
    const __m256i m4 = _mm256_set1_epi8(0x0F), b4 = _mm256_set1_epi8(0x10);
    for (int64_t sb = 0; sb < nb32 / 8; ++sb, w += SB) {
      __m256i si, mi, qh = _mm256_setzero_si256();
      if constexpr (T == T_Q5_K) qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16));
      q4k_scales(w + 4, si, mi);
      const __m256 sf = _mm256_mul_ps(_mm256_set1_ps(f16(w)), _mm256_cvtepi32_ps(si));
      const __m256 mf = _mm256_mul_ps(_mm256_set1_ps(f16(w + 2)), _mm256_cvtepi32_ps(mi));
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) {
        alignas(32) float sd[8];  // d * sc_j * dx_j, for the 8 sub-blocks
        _mm256_store_ps(sd, _mm256_mul_ps(sf, _mm256_loadu_ps(dx + b * ldb + sb * 8)));
        macc[b] = _mm256_fmadd_ps(mf, _mm256_loadu_ps(xs + b * ldb + sb * 8), macc[b]);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + QS + 32 * j));
          __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
          if constexpr (T == T_Q5_K) {  // bits 2j and 2j + 1 of qh to bit 4
            lo = _mm256_or_si256(lo, _mm256_and_si256(shift_bits(qh, 4 - 2 * j), b4));
            hi = _mm256_or_si256(hi, _mm256_and_si256(shift_bits(qh, 3 - 2 * j), b4));
          }
          const int8_t* x = xq + b * ldq + (sb * 8 + 2 * j) * 32;
          const __m256i p0 = dot_u<PAIR>(lo, x, r);
          const __m256i p1 = dot_u<PAIR>(hi, x + 32, r);
          acc[b][(2 * j) % U] = _mm256_fmadd_ps(_mm256_broadcast_ss(sd + 2 * j), _mm256_cvtepi32_ps(p0), acc[b][(2 * j) % U]);
          acc[b][(2 * j + 1) % U] = _mm256_fmadd_ps(_mm256_broadcast_ss(sd + 2 * j + 1), _mm256_cvtepi32_ps(p1), acc[b][(2 * j + 1) % U]);
        }
      }
    }
  } else if constexpr (T == T_Q6_K) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), c32 = _mm256_set1_epi8(32);
    for (int64_t sb = 0; sb < nb32 / 8; ++sb, w += 210) {
      const float d = f16(w + 208);
      const int8_t* sc = reinterpret_cast<const int8_t*>(w + 192);
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const uint8_t* ql = w + 64 * h;
        const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
        const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
        const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 128 + 32 * h));
        __m256i q[4];
        q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x03)), 4));
        q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x0C)), 2));
        q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(qh, _mm256_set1_epi8(0x30)));
        q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                               _mm256_srli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(char(0xC0))), 2));
        const int8_t* s = sc + 8 * h;
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const __m256i qs = _mm256_sub_epi8(q[j], c32), aqs = _mm256_abs_epi8(qs);  // -32..31
          // 16 weights a scale: int16 pair sums 0..7 take s[2j], 8..15 s[2j + 1]; with PAIR the
          // row's sums take 254 times the scale (|s| <= 127: still int16)
          const int sm = PAIR ? 254 : 1;
          const __m256i scv = _mm256_set_m128i(_mm_set1_epi16(int16_t(sm * s[2 * j + 1])), _mm_set1_epi16(int16_t(sm * s[2 * j])));
          const int64_t blk = sb * 8 + 4 * h + j;
#pragma GCC unroll 4
          for (int b = 0; b < NB; ++b) {
            const int8_t* xb = xq + b * ldq + blk * 32;
            auto part = [&](const int8_t* xp) __attribute__((always_inline)) {
              return _mm256_maddubs_epi16(aqs, _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp)), qs));
            };
            __m256i p = _mm256_madd_epi16(part(xb), scv);
            if constexpr (PAIR) {
              const __m256i scr = _mm256_set_m128i(_mm_set1_epi16(s[2 * j + 1]), _mm_set1_epi16(s[2 * j]));
              p = _mm256_add_epi32(p, _mm256_madd_epi16(part(xb + r), scr));
            }
            acc[b][j % U] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx[b * ldb + blk]), _mm256_cvtepi32_ps(p), acc[b][j % U]);
          }
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int b = 0; b < NB; ++b) {
    __m256 a = acc[b][0];
#pragma GCC unroll 4
    for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[b][u]);
    out[b] = hsum(_mm256_sub_ps(a, macc[b]));
  }
}

// fp32 dequantization of one row (K weights) of type t, as ggml's dequantize_row_*.
void dequant_row(int64_t t, const uint8_t* w, int64_t K, float* o) {
  if (t == T_Q8_0) {
    for (int64_t i = 0; i < K / 32; ++i, w += 34) {
      const float d = f16(w);
      for (int j = 0; j < 32; ++j) o[32 * i + j] = d * float(int8_t(w[2 + j]));
    }
  } else if (t == T_Q5_0) {
    for (int64_t i = 0; i < K / 32; ++i, w += 22) {
      const float d = f16(w);
      uint32_t qh;
      std::memcpy(&qh, w + 2, 4);
      for (int j = 0; j < 16; ++j) {
        const int lo = (w[6 + j] & 0x0F) | (((qh >> j) << 4) & 0x10);
        const int hi = (w[6 + j] >> 4) | ((qh >> (j + 12)) & 0x10);
        o[32 * i + j] = d * float(lo - 16), o[32 * i + j + 16] = d * float(hi - 16);
      }
    }
  } else if (t == T_Q5_0R4) {
    int64_t i = 0;
    for (; i + 4 <= K / 32; i += 4, w += 88) {
      for (int g = 0; g < 4; ++g) {
        const float d = f16(w + 2 * g);
        for (int j = 0; j < 16; ++j) {
          const int lo = (w[24 + 16 * g + j] & 0x0F) | (((w[8 + j] >> g) & 1) << 4);
          const int hi = (w[24 + 16 * g + j] >> 4) | (((w[8 + j] >> (4 + g)) & 1) << 4);
          o[32 * (i + g) + j] = d * float(lo - 16), o[32 * (i + g) + j + 16] = d * float(hi - 16);
        }
      }
    }
    if (i < K / 32) dequant_row(T_Q5_0, w, K - 32 * i, o + 32 * i);
  } else if (t == T_Q4_0 || t == T_Q4_1 || t == T_Q5_1) {
    const int64_t bb = block_bytes(t);
    for (int64_t i = 0; i < K / 32; ++i, w += bb) {
      const float d = f16(w), m = t == T_Q4_0 ? 0.0f : f16(w + 2);
      const uint8_t* q = w + (t == T_Q4_0 ? 2 : t == T_Q4_1 ? 4 : 8);
      uint32_t qh = 0;
      if (t == T_Q5_1) std::memcpy(&qh, w + 4, 4);
      for (int j = 0; j < 16; ++j) {
        int lo = q[j] & 0x0F, hi = q[j] >> 4;
        if (t == T_Q4_0) lo -= 8, hi -= 8;
        if (t == T_Q5_1) lo |= ((qh >> j) & 1) << 4, hi |= ((qh >> (j + 16)) & 1) << 4;
        o[32 * i + j] = d * float(lo) + m, o[32 * i + j + 16] = d * float(hi) + m;
      }
    }
  } else if (t == T_Q4_K || t == T_Q5_K) {
    const bool q5 = t == T_Q5_K;
    for (int64_t i = 0; i < K / 256; ++i, w += q5 ? 176 : 144) {
      const float d = f16(w), dmin = f16(w + 2);
      const uint8_t* sc = w + 4;
      for (int j = 0; j < 8; ++j) {
        int s, m;
        if (j < 4) s = sc[j] & 63, m = sc[j + 4] & 63;
        else s = (sc[j + 4] & 0x0F) | ((sc[j - 4] >> 6) << 4), m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
        const uint8_t* q = w + (q5 ? 48 : 16) + 32 * (j / 2);
        for (int l = 0; l < 32; ++l) {
          const int h = q5 ? ((w[16 + l] >> j) & 1) << 4 : 0;
          o[256 * i + 32 * j + l] = d * s * float((j % 2 ? q[l] >> 4 : q[l] & 0x0F) | h) - dmin * m;
        }
      }
    }
  } else if (t == T_Q6_K) {
    for (int64_t i = 0; i < K / 256; ++i, w += 210) {
      const float d = f16(w + 208);
      const int8_t* sc = reinterpret_cast<const int8_t*>(w + 192);
      for (int h = 0; h < 2; ++h) {
        const uint8_t *ql = w + 64 * h, *qh = w + 128 + 32 * h;
        const int8_t* s = sc + 8 * h;
        float* y = o + 256 * i + 128 * h;
        for (int l = 0; l < 32; ++l) {
          const int is = l / 16;
          y[l] = d * s[is] * float(((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32);
          y[l + 32] = d * s[is + 2] * float(((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32);
          y[l + 64] = d * s[is + 4] * float(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
          y[l + 96] = d * s[is + 6] * float(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
      }
    }
  } else {
    TORCH_CHECK(false, "slm_cpu: unsupported GGUF block type ", t);
  }
}

Parts::Parts(const at::Tensor& blocks, at::IntArrayRef types_, at::IntArrayRef rows, int64_t K) {
  TORCH_CHECK(blocks.device().is_cpu() && blocks.scalar_type() == at::kByte && blocks.dim() == 1 && blocks.is_contiguous(),
              "slm_cpu: GGUF blocks must be a contiguous uint8 CPU tensor");
  TORCH_CHECK(types_.size() == rows.size() && !rows.empty(), "slm_cpu: one type per part");
  int64_t bytes = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    const int64_t t = types_[i];
    TORCH_CHECK(K > 0 && K % block_weights(t) == 0, "slm_cpu: in_features ", K, " is not a whole number of blocks of type ", t);
    types.push_back(t), row0.push_back(N), byte0.push_back(bytes), row_bytes.push_back(K / block_weights(t) * block_bytes(t));
    N += rows[i], bytes += rows[i] * row_bytes.back();
  }
  TORCH_CHECK(blocks.numel() == bytes, "slm_cpu: GGUF blocks hold ", blocks.numel(), " bytes, the parts need ", bytes);
}

// One block of 32 values times id, rounded to nearest even (vcvtps2dq under the default rounding
// mode, as torch.round) to int8 in q (saturated to -127..127: |x * id| <= 127.5 in exact arithmetic);
// returns the sum of the 32 int8 values.
SLM_INLINE int quantize_block(const float* xb, float id, int8_t* out) {
  const __m256 iv = _mm256_set1_ps(id);
  __m256i q[4];
  for (int j = 0; j < 4; ++j)
    q[j] = _mm256_max_epi32(_mm256_set1_epi32(-127),
                            _mm256_min_epi32(_mm256_set1_epi32(127), _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 8 * j), iv))));
  const __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  // int32 -> int8 in order: packs interleave the 128-bit lanes, the permute puts them back
  const __m256i p16 = _mm256_packs_epi32(q[0], q[1]), p16b = _mm256_packs_epi32(q[2], q[3]);
  const __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16, p16b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), p8);
  return _mm_cvtsi128_si32(s4);
}

SLM_INLINE float block_amax(const float* xb) {
  __m256 mx = _mm256_setzero_ps();
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int j = 0; j < 4; ++j) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + 8 * j)));
  return hmax(mx);
}

// Quantize B rows of x [B, K] to int8 blocks of 32 (steps of amax / 127, as llama.cpp's q8_0
// activations): xq [B, K], dx and xs (dx * sum of the block) [B, K/32].
void quantize_x(const float* x, int64_t B, int64_t K, int8_t* xq, float* dx, float* xs) {
  for (int64_t i = 0; i < B * K / 32; ++i) {
    const float d = block_amax(x + 32 * i) / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    const int sum = quantize_block(x + 32 * i, id, xq + 32 * i);
    dx[i] = d, xs[i] = d * float(sum);
  }
}

// x [B, K] as B pairs of int8 rows (xq [2B, K], dx and xs [2B, K/32]): row 2b is x_b quantized
// (quantize_x), row 2b + 1 the residual x_b - d q in steps of d / 254 (|residual| <= d / 2, so
// within int8), dx of row 2b + 1 that step and xs of row 2b the pair's sum (d sum(q) + d/254
// sum(q')). Together ~16 bits of x: one int8 row (llama.cpp's Q8_0/Q8_1/Q8_K activations) moved
// gemma-3-270m's perplexity by ~0.45% from its dequantized weights, the pair by ~0.00%. The fixed
// ratio lets the kernels dot both rows in one int32 (254 q + q', dot_row's PAIR); the weights are
// decoded once for both, so the memory read per token is the same as with one row.
void quantize_x2(const float* x, int64_t B, int64_t K, int8_t* xq, float* dx, float* xs, int32_t* S) {
  const int64_t nb32 = K / 32;
  float r[32];
  for (int64_t b = 0; b < B; ++b) {
    int8_t* q = xq + 2 * b * K;
    float *d = dx + 2 * b * nb32, *sums = xs + 2 * b * nb32;
    for (int64_t i = 0; i < nb32; ++i) {
      const float* xb = x + b * K + 32 * i;
      const float d1 = block_amax(xb) / 127.0f, id1 = d1 != 0.0f ? 1.0f / d1 : 0.0f;
      const int s1 = quantize_block(xb, id1, q + 32 * i);
      for (int j = 0; j < 32; ++j) r[j] = xb[j] - d1 * float(q[32 * i + j]);
      const float d2 = d1 / 254.0f, id2 = d2 != 0.0f ? 1.0f / d2 : 0.0f;
      const int s2 = quantize_block(r, id2, q + K + 32 * i);
      d[nb32 + i] = d2, sums[i] = d1 * float(s1) + d2 * float(s2);  // what dot_row's PAIR reads
      if (S) S[b * nb32 + i] = 254 * s1 + s2;  // the same sum in integers (cols16_vnni's)
    }
  }
}

// Row b of quantize_x2's pairs as one int16 row, 254 q + q' (dot_row's wide16 x), into x16 + b K.
inline void pair16(const int8_t* xq, int64_t b, int64_t K, int16_t* x16) {
  for (int64_t k = 0; k < K; ++k) x16[b * K + k] = int16_t(254 * xq[2 * b * K + k] + xq[(2 * b + 1) * K + k]);
}

// Prefetch distance in bytes for the GGUF-block rows (SLM_PREFETCH overrides it, 0: none).
int64_t prefetch_bytes() {
  static const int64_t v = [] {
    const char* e = std::getenv("SLM_PREFETCH");
    return e ? std::max<int64_t>(0, std::atoll(e)) : int64_t(4096);
  }();
  return v;
}

// How many int8 rows hold each row of x: 2 (x and its residual, quantize_x2), or 1 (x alone, as
// llama.cpp) where SLM_GGUF_X_ROWS=1, read at each call (benchmarks/decode_vs_llamacpp.py times both).
int64_t x_rows() {
  const char* e = std::getenv("SLM_GGUF_X_ROWS");
  return e && e[0] == '1' && e[1] == 0 ? 1 : 2;
}

template <int64_t T>
void rows_gguf(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, const int8_t* xq, const int16_t* x16,
               const float* dx, const float* xs, int64_t B, int64_t R, int64_t K, float* y, int64_t ldy,
               const float* bias, int64_t bias0) {
  const int64_t nb32 = K / 32;
  const int64_t pf = prefetch_bytes();
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * row_bytes;
    // Software prefetch, pf bytes ahead in this thread's stream: the decoding of Q5_0/Q4_K/Q6_K
    // blocks is slow enough that the hardware prefetchers alone let the loop wait on memory.
    if (pf)
      for (int64_t i = 0; i < row_bytes; i += 64) _mm_prefetch(reinterpret_cast<const char*>(wr + pf + i), _MM_HINT_T0);
    // up to 4 rows of x at a time; R = 2: quantize_x2's pairs (row, residual), one dot a pair
    for (int64_t b = 0; b < B;) {
      float out[4];
      const int64_t nb = std::min<int64_t>(B - b, 4);
      if (R == 2) {
        // the pair's rows at 2b, 2b + 1: step of the residual (row 2b + 1) and the pair's sums (row 2b)
        const int8_t* xb = xq + 2 * b * K;
        const float *d2 = dx + (2 * b + 1) * nb32, *s = xs + 2 * b * nb32;
        const int16_t* xw = x16 ? x16 + b * K : nullptr;  // set where T is wide16
        switch (nb) {
          case 1: dot_row<T, 1, true>(wr, xb, 2 * K, K, xw, K, d2, s, 2 * nb32, nb32, out); break;
          case 2: dot_row<T, 2, true>(wr, xb, 2 * K, K, xw, K, d2, s, 2 * nb32, nb32, out); break;
          case 3: dot_row<T, 3, true>(wr, xb, 2 * K, K, xw, K, d2, s, 2 * nb32, nb32, out); break;
          default: dot_row<T, 4, true>(wr, xb, 2 * K, K, xw, K, d2, s, 2 * nb32, nb32, out); break;
        }
      } else {
        const int8_t* xb = xq + b * K;
        const float *d1 = dx + b * nb32, *s = xs + b * nb32;
        switch (nb) {
          case 1: dot_row<T, 1, false>(wr, xb, K, 0, nullptr, 0, d1, s, nb32, nb32, out); break;
          case 2: dot_row<T, 2, false>(wr, xb, K, 0, nullptr, 0, d1, s, nb32, nb32, out); break;
          case 3: dot_row<T, 3, false>(wr, xb, K, 0, nullptr, 0, d1, s, nb32, nb32, out); break;
          default: dot_row<T, 4, false>(wr, xb, K, 0, nullptr, 0, d1, s, nb32, nb32, out); break;
        }
      }
      for (int64_t i = 0; i < nb; ++i) y[(b + i) * ldy + bias0 + n] = out[i] + (bias ? bias[bias0 + n] : 0.0f);
      b += nb;
    }
  }
}

bool cpu_has_avx512();
bool dequant_row_fast(int64_t t, const uint8_t* w, int64_t K, float* out);

// fp32 rows [n0, n1) of the stacked parts into out (row stride K): dequant_row's values, with
// AVX-512 where the CPU has it and the type allows (prefill's GEMM dequantizes every weight once a
// chunk of prompt: the scalar loop cost gemma-3-270m ~20% of a 512-token prompt).
void dequant_rows(const Parts& P, const uint8_t* bp, int64_t K, int64_t n0, int64_t n1, float* out) {
  const bool wide = cpu_has_avx512();
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t p = P.part(n);
    const uint8_t* w = bp + P.byte0[p] + (n - P.row0[p]) * P.row_bytes[p];
    if (!wide || !dequant_row_fast(P.types[p], w, K, out + (n - n0) * K)) dequant_row(P.types[p], w, K, out + (n - n0) * K);
  }
}

at::Tensor dequantize_gguf(const at::Tensor& blocks, at::IntArrayRef types, at::IntArrayRef rows, int64_t K,
                           const at::Tensor& ids) {
  const Parts P(blocks, types, rows, K);
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.is_contiguous(), "slm_cpu: ids must be int64 [n]");
  const int64_t n = ids.size(0);
  const int64_t* ip = ids.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < P.N, "slm_cpu: row ", ip[i], " out of range");
  auto out = at::empty({n, K}, blocks.options().dtype(at::kFloat));
  const uint8_t* bp = blocks.const_data_ptr<uint8_t>();
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, n, grain_rows(K), [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) dequant_rows(P, bp, K, ip[i], ip[i] + 1, op + i * K);
  });
  return out;
}


// Several rows of x against rows of weights dequantized to fp32 (where the CPU has AVX-512): each
// thread dequantizes 4 rows of weights at a time into a buffer in L1, exactly as dequant_row does,
// and dots them with every row of fp32 x, a register tile of 4 rows of weights by 4 rows of x.
// From F32_ROWS rows of x this beats the int8 path: one FMA takes 16 weights of one row, where the
// int8 pair spends ~5 instructions on 32 (two vpmaddwd, an add, a conversion, a scaled FMA) of 8
// lanes; x is not quantized, so the products are the dequantized weights' exactly, up to the
// order of the sums. AVX-512 doubles the FMAs of 8-wide ones (measured on a Xeon: 100 against 45 G
// multiply-adds a second and core); with AVX2 alone this path was no faster than the int8 one for
// the LM head, so the int8 path serves every row count there.
#define SLM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

// Which types dequantize_row_512 decodes (Q5_0R4 only as whole groups of 4 blocks).
constexpr bool fast_dequant(int64_t t, int64_t K) {
  return t == T_Q8_0 || t == T_Q4_0 || t == T_Q4_1 || t == T_Q4_K || t == T_Q6_K || (t == T_Q5_0R4 && K / 32 % 4 == 0);
}

// 16 bytes of unsigned values as 16 fp32
SLM_AVX512 SLM_INLINE __m512 u8x16_f32(__m128i q) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q)); }
SLM_AVX512 SLM_INLINE __m512 i8x16_f32(__m128i q) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)); }
SLM_INLINE __m128i load16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// One row of weights (a fast_dequant type) to fp32: dequant_row's values exactly (the same
// products and sums, in the same order: the compiler contracts none of them into FMAs).
SLM_AVX512 SLM_INLINE void dequantize_row_512(int64_t t, const uint8_t* w, int64_t K, float* __restrict out) {
  const __m128i m4 = _mm_set1_epi8(0x0F);
  const int64_t nb = K / 32;
  if (t == T_Q8_0) {
    for (int64_t i = 0; i < nb; ++i, w += 34, out += 32) {
      const __m512 d = _mm512_set1_ps(f16(w));
      _mm512_storeu_ps(out, _mm512_mul_ps(d, i8x16_f32(load16(w + 2))));
      _mm512_storeu_ps(out + 16, _mm512_mul_ps(d, i8x16_f32(load16(w + 18))));
    }
  } else if (t == T_Q4_0 || t == T_Q4_1) {  // d (q - 8); d q + m. Byte j: weights j (low nibble), j + 16
    const bool q41 = t == T_Q4_1;
    const __m128i c = _mm_set1_epi8(q41 ? 0 : 8);
    for (int64_t i = 0; i < nb; ++i, w += q41 ? 20 : 18, out += 32) {
      const __m512 d = _mm512_set1_ps(f16(w)), m = _mm512_set1_ps(q41 ? f16(w + 2) : 0.0f);
      const __m128i b = load16(w + (q41 ? 4 : 2));
      const __m128i lo = _mm_sub_epi8(_mm_and_si128(b, m4), c), hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), m4), c);
      const __m512 flo = q41 ? u8x16_f32(lo) : i8x16_f32(lo), fhi = q41 ? u8x16_f32(hi) : i8x16_f32(hi);
      _mm512_storeu_ps(out, q41 ? _mm512_add_ps(_mm512_mul_ps(d, flo), m) : _mm512_mul_ps(d, flo));
      _mm512_storeu_ps(out + 16, q41 ? _mm512_add_ps(_mm512_mul_ps(d, fhi), m) : _mm512_mul_ps(d, fhi));
    }
  } else if (t == T_Q5_0R4) {  // groups of 4 blocks: 4 scales, the high-bit plane, 4 x 16 bytes of nibbles
    const __m128i one = _mm_set1_epi8(1), sixteen = _mm_set1_epi8(16);
    for (int64_t i = 0; i < nb; i += 4, w += 88) {
      const __m128i plane = load16(w + 8);
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g, out += 32) {
        const __m512 d = _mm512_set1_ps(f16(w + 2 * g));
        const __m128i b = load16(w + 24 + 16 * g);
        const __m128i hl = _mm_and_si128(_mm_srli_epi16(plane, g), one), hh = _mm_and_si128(_mm_srli_epi16(plane, 4 + g), one);
        const __m128i lo = _mm_sub_epi8(_mm_or_si128(_mm_and_si128(b, m4), _mm_slli_epi16(hl, 4)), sixteen);
        const __m128i hi = _mm_sub_epi8(_mm_or_si128(_mm_and_si128(_mm_srli_epi16(b, 4), m4), _mm_slli_epi16(hh, 4)), sixteen);
        _mm512_storeu_ps(out, _mm512_mul_ps(d, i8x16_f32(lo)));
        _mm512_storeu_ps(out + 16, _mm512_mul_ps(d, i8x16_f32(hi)));
      }
    }
  } else if (t == T_Q4_K) {  // d sc q - dmin m per sub-block of 32
    for (int64_t i = 0; i < K / 256; ++i, w += 144) {
      const float d = f16(w), dmin = f16(w + 2);
      const uint8_t* sc = w + 4;
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j, out += 32) {
        int s, m;
        if (j < 4) s = sc[j] & 63, m = sc[j + 4] & 63;
        else s = (sc[j + 4] & 0x0F) | ((sc[j - 4] >> 6) << 4), m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
        const __m512 ds = _mm512_set1_ps(d * s), dm = _mm512_set1_ps(dmin * m);
        const uint8_t* q = w + 16 + 32 * (j / 2);
        for (int h = 0; h < 2; ++h) {
          const __m128i b = load16(q + 16 * h);
          const __m128i n = j % 2 ? _mm_and_si128(_mm_srli_epi16(b, 4), m4) : _mm_and_si128(b, m4);
          _mm512_storeu_ps(out + 16 * h, _mm512_sub_ps(_mm512_mul_ps(ds, u8x16_f32(n)), dm));
        }
      }
    }
  } else {  // Q6_K: d sc (q - 32), q of 6 bits: 4 from ql, 2 from qh
    const __m128i m2 = _mm_set1_epi8(3), c32 = _mm_set1_epi8(32);
    for (int64_t i = 0; i < K / 256; ++i, w += 210, out += 256) {
      const float d = f16(w + 208);
      const int8_t* sc = reinterpret_cast<const int8_t*>(w + 192);
      for (int h = 0; h < 2; ++h) {
        const uint8_t *ql = w + 64 * h, *qh = w + 128 + 32 * h;
        float* y = out + 128 * h;
        for (int l = 0; l < 32; l += 16) {
          const int is = 8 * h + l / 16;
          const __m128i a = load16(ql + l), b = load16(ql + l + 32), hb = load16(qh + l);
          auto six = [&](__m128i low4, int shift) __attribute__((always_inline)) {
            const __m128i top = _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(hb, shift), m2), 4);
            return _mm_sub_epi8(_mm_or_si128(low4, top), c32);
          };
          _mm512_storeu_ps(y + l, _mm512_mul_ps(_mm512_set1_ps(d * sc[is]), i8x16_f32(six(_mm_and_si128(a, m4), 0))));
          _mm512_storeu_ps(y + l + 32, _mm512_mul_ps(_mm512_set1_ps(d * sc[is + 2]), i8x16_f32(six(_mm_and_si128(b, m4), 2))));
          _mm512_storeu_ps(y + l + 64, _mm512_mul_ps(_mm512_set1_ps(d * sc[is + 4]),
                                                     i8x16_f32(six(_mm_and_si128(_mm_srli_epi16(a, 4), m4), 4))));
          _mm512_storeu_ps(y + l + 96, _mm512_mul_ps(_mm512_set1_ps(d * sc[is + 6]),
                                                     i8x16_f32(six(_mm_and_si128(_mm_srli_epi16(b, 4), m4), 6))));
        }
      }
    }
  }
}

// dequantize_row_512 where the type allows (true), else nothing (false). Only on a CPU with AVX-512.
SLM_AVX512 bool dequant_row_fast(int64_t t, const uint8_t* w, int64_t K, float* out) {
  if (!fast_dequant(t, K)) return false;
  dequantize_row_512(t, w, K, out);
  return true;
}

// out[i * RX + b] = w_i . x_b for RW rows of fp32 weights w (stride K) and RX rows of fp32 x
// (stride K): each weight and x vector loaded once a step and used RX (RW) times.
template <int RW, int RX>
SLM_AVX512 SLM_INLINE void dot_tile_512(const float* __restrict w, const float* __restrict x, int64_t K, float* out) {
  __m512 acc[RW][RX];
#pragma GCC unroll 8
  for (int i = 0; i < RW; ++i)
#pragma GCC unroll 8
    for (int b = 0; b < RX; ++b) acc[i][b] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 wv[RW];
#pragma GCC unroll 8
    for (int i = 0; i < RW; ++i) wv[i] = _mm512_loadu_ps(w + i * K + k);
#pragma GCC unroll 8
    for (int b = 0; b < RX; ++b) {
      const __m512 xv = _mm512_loadu_ps(x + b * K + k);
#pragma GCC unroll 8
      for (int i = 0; i < RW; ++i) acc[i][b] = _mm512_fmadd_ps(wv[i], xv, acc[i][b]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < RW; ++i)
#pragma GCC unroll 8
    for (int b = 0; b < RX; ++b) out[i * RX + b] = _mm512_reduce_add_ps(acc[i][b]);
}

// y[b, n + i] (+ bias) for the RW dequantized rows in w and every row of x, 4 rows of x at a time.
template <int RW>
SLM_AVX512 void dot_rows_512(const float* w, const float* x, int64_t B, int64_t K, float* y, int64_t ldy, int64_t n,
                             const float* bias) {
  for (int64_t b = 0; b < B;) {
    float out[RW * 4];
    const int64_t nb = std::min<int64_t>(B - b, 4);
    const float* xb = x + b * K;
    switch (nb) {
      case 1: dot_tile_512<RW, 1>(w, xb, K, out); break;
      case 2: dot_tile_512<RW, 2>(w, xb, K, out); break;
      case 3: dot_tile_512<RW, 3>(w, xb, K, out); break;
      default: dot_tile_512<RW, 4>(w, xb, K, out); break;
    }
    for (int i = 0; i < RW; ++i)
      for (int64_t j = 0; j < nb; ++j) y[(b + j) * ldy + n + i] = out[i * nb + j] + (bias ? bias[n + i] : 0.0f);
    b += nb;
  }
}

// acc[r] += x[r * K] wv for RX rows of x (x: the column of x the 16 weights in wv multiply).
template <int RX>
SLM_AVX512 SLM_INLINE void fma_rows(__m512* acc, const float* x, int64_t K, __m512 wv) {
#pragma GCC unroll 16
  for (int r = 0; r < RX; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K]), wv, acc[r]);
}

// What cols16_gguf and cols16_vnni share about 16 rows of weights (stride row_bytes) read across:
// each row's offset (for the gathers), the prefetch of the next 16 rows' bytes (contiguous after
// these) a share a block (without it the first gather of each block waited on memory for ~18% of
// the loop's time), and each block's scales d and, for Q4_1, m (fp16 at the block's start).
struct Rows16 {
  __m512i idx;
  int64_t ahead, share;
  SLM_AVX512 Rows16(int64_t row_bytes, int64_t nb32)
      : idx(_mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                               _mm512_set1_epi32(int32_t(row_bytes)))),
        ahead(16 * row_bytes), share((16 * row_bytes + nb32 - 1) / nb32) {}
  SLM_AVX512 SLM_INLINE void prefetch(const uint8_t* w, int64_t i) const {
    for (int64_t o = i * share; o < std::min(ahead, (i + 1) * share); o += 64)
      _mm_prefetch(reinterpret_cast<const char*>(w + ahead + o), _MM_HINT_T0);
  }
  SLM_AVX512 SLM_INLINE __m512i gather(const uint8_t* p) const { return _mm512_i32gather_epi32(idx, p, 1); }
  template <int64_t T>
  SLM_AVX512 SLM_INLINE void scales(const uint8_t* blk, __m512& d, __m512& m) const {
    const __m512i head = gather(blk);  // d (low 16 bits); Q4_1: m (high 16)
    d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(head));
    m = T == T_Q4_1 ? _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(head, 16))) : d;
  }
  // One block's weights of the 16 rows (Q8_0, Q4_0, Q4_1) as unsigned bytes, as vpdpbusd and the
  // AMX tiles take them: W[j] holds weights 4j .. 4j + 3 of each row (Q4's nibbles; Q8_0's bytes
  // + 128).
  template <int64_t T>
  SLM_AVX512 SLM_INLINE void unsigned_weights(const uint8_t* blk, __m512i* W) const {
    if constexpr (T == T_Q8_0) {
      const __m512i flip = _mm512_set1_epi8(char(0x80));
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) W[j] = _mm512_xor_si512(gather(blk + 2 + 4 * j), flip);
    } else {  // byte j: weight j (low nibble), j + 16 (high)
      const __m512i m4 = _mm512_set1_epi8(0x0F);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m512i q = gather(blk + (T == T_Q4_1 ? 4 : 2) + 4 * j);
        W[j] = _mm512_and_si512(q, m4);
        W[4 + j] = _mm512_and_si512(_mm512_srli_epi32(q, 4), m4);
      }
    }
  }
};

// 254 a + b in int32: a pair's two dots (w . q, w . q') as one, in units of the residual's step.
SLM_AVX512 SLM_INLINE __m512i pair254(__m512i a, __m512i b) {
  return _mm512_add_epi32(_mm512_sub_epi32(_mm512_slli_epi32(a, 8), _mm512_slli_epi32(a, 1)), b);
}

// Block i's integer dots v (254 q + q' of x row `row` against 16 rows of unsigned weights) added to
// that row's accumulator: less what the unsigned weights add (8 for Q4_0, 128 for Q8_0) times the
// pair's integer sum S, times d d', and for Q4_1 m times the pair's sum xs. cols16_vnni and the
// AMX kernels scale through this one function, so their floats agree bit for bit.
template <int64_t T>
SLM_AVX512 SLM_INLINE __m512 add_block(__m512 acc, __m512i v, __m512 d, __m512 m, const float* dx, const float* xs,
                                       const int32_t* S, int64_t nb32, int64_t i, int64_t row) {
  constexpr int32_t OFFSET = T == T_Q8_0 ? 128 : T == T_Q4_0 ? 8 : 0;
  if constexpr (OFFSET != 0) v = _mm512_sub_epi32(v, _mm512_set1_epi32(OFFSET * S[row * nb32 + i]));
  acc = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(dx[(2 * row + 1) * nb32 + i])), _mm512_cvtepi32_ps(v), acc);
  if constexpr (T == T_Q4_1) acc = _mm512_fmadd_ps(m, _mm512_set1_ps(xs[2 * row * nb32 + i]), acc);
  return acc;
}

// y[r, 0..16) (+ bias) for 16 rows of weights w (stride row_bytes; type T: Q8_0, Q4_0 or Q4_1) and
// RX rows of x (stride K), read across the rows: for each k, the 16 rows' weights as one vector,
// their blocks' bytes gathered and decoded in registers (dequant_row's values exactly: d q, d (q -
// 8), d q + m), then multiplied into RX accumulators, x[r, k] broadcast. No row of weights goes
// through memory as fp32 and no sum across lanes is left for the end: rows_gguf_f32's tiles of 4
// rows by 4 rows of x spent ~30% of a 16-row SmolLM2 step decoding rows into a buffer and more
// reducing their 16 accumulators.
template <int64_t T, int RX>
SLM_AVX512 void cols16_gguf(const uint8_t* __restrict w, int64_t row_bytes, const float* __restrict x, int64_t K,
                            int64_t rows, float* y, int64_t ldy, const float* bias) {
  constexpr int64_t BB = block_bytes_c(T);
  const int64_t nb32 = K / 32;
  const Rows16 R(row_bytes, nb32);
  const __m512i m4 = _mm512_set1_epi32(0x0F), eight = _mm512_set1_epi32(8);
  __m512 acc[RX];
#pragma GCC unroll 16
  for (int r = 0; r < RX; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < nb32; ++i) {
    const uint8_t* blk = w + i * BB;
    const float* xb = x + 32 * i;
    R.prefetch(w, i);
    __m512 d, m;
    R.scales<T>(blk, d, m);
    if constexpr (T == T_Q8_0) {
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {  // weights 4j .. 4j + 3 of the 16 rows
        const __m512i q = R.gather(blk + 2 + 4 * j);
#pragma GCC unroll 4
        for (int b = 0; b < 4; ++b) {
          const __m512i v = _mm512_srai_epi32(_mm512_slli_epi32(q, 24 - 8 * b), 24);
          fma_rows<RX>(acc, xb + 4 * j + b, K, _mm512_mul_ps(d, _mm512_cvtepi32_ps(v)));
        }
      }
    } else {
      constexpr int64_t QS = T == T_Q4_1 ? 4 : 2;  // byte j: weight j (low nibble), j + 16 (high)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m512i q = R.gather(blk + QS + 4 * j);
#pragma GCC unroll 8
        for (int h = 0; h < 8; ++h) {  // h = 2 b + high: the nibble at bit 4 h
          __m512i v = _mm512_and_si512(_mm512_srli_epi32(q, 4 * h), m4);
          if constexpr (T == T_Q4_0) v = _mm512_sub_epi32(v, eight);
          const __m512 f = _mm512_mul_ps(d, _mm512_cvtepi32_ps(v));
          fma_rows<RX>(acc, xb + 16 * (h % 2) + 4 * j + h / 2, K, T == T_Q4_1 ? _mm512_add_ps(f, m) : f);
        }
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    _mm512_storeu_ps(y + r * ldy, bias ? _mm512_add_ps(acc[r], _mm512_loadu_ps(bias)) : acc[r]);
}

// cols16_gguf for the 16 rows of weights at w and every row of x, 16 rows of x at a time (the
// last up to 8 or 16 from a zero-padded copy).
template <int64_t T>
SLM_AVX512 void cols16_rows(const uint8_t* w, int64_t row_bytes, const float* x, int64_t B, int64_t K, float* pad,
                            float* y, int64_t ldy, const float* bias) {
  for (int64_t b = 0; b < B; b += 16) {
    const int64_t rows = std::min<int64_t>(16, B - b);
    const float* xs = x + b * K;
    if (rows < 16 && rows != 8) {
      std::memcpy(pad, xs, rows * K * sizeof(float));
      std::memset(pad + rows * K, 0, ((rows < 8 ? 8 : 16) - rows) * K * sizeof(float));
      xs = pad;
    }
    if (rows <= 8) cols16_gguf<T, 8>(w, row_bytes, xs, K, rows, y + b * ldy, ldy, bias);
    else cols16_gguf<T, 16>(w, row_bytes, xs, K, rows, y + b * ldy, ldy, bias);
  }
}

#define SLM_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

// The int8 path's products (quantize_x2's pairs, as for few rows of x) for 16 rows of weights w
// (type T: Q8_0, Q4_0 or Q4_1) and RX pairs of x rows, read across the rows as cols16_gguf does,
// with AVX-512 VNNI: each gathered dword holds 4 weights of each of the 16 rows as unsigned bytes
// (Q4's nibbles; Q8_0's bytes + 128) and vpdpbusd adds their products with 4 bytes of x, for 16
// rows at once. A block's integer dot is 254 (w . q) + (w . q') (within int32: |w| <= 255, 32
// weights), less 8 (Q4_0) or 128 (Q8_0) times the pair's integer sum S; then d d' and, for Q4_1,
// m times the pair's sum xs, as dot_row's wide16 path computes it. xq: 2 RX int8 rows (stride K),
// dx and xs: 2 RX rows of nb32 (quantize_x2's), S: RX rows of nb32.
template <int64_t T, int RX>
SLM_VNNI void cols16_vnni(const uint8_t* __restrict w, int64_t row_bytes, const int8_t* __restrict xq, int64_t K,
                          const float* __restrict dx, const float* __restrict xs, const int32_t* __restrict S,
                          int64_t nb32, int64_t rows, float* y, int64_t ldy, const float* bias) {
  constexpr int64_t BB = block_bytes_c(T);
  const Rows16 R(row_bytes, nb32);
  __m512 acc[RX];
#pragma GCC unroll 16
  for (int r = 0; r < RX; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < nb32; ++i) {
    const uint8_t* blk = w + i * BB;
    R.prefetch(w, i);
    __m512 d, m;
    R.scales<T>(blk, d, m);
    __m512i W[8];  // W[j]: weights 4j .. 4j + 3 of the 16 rows
    R.unsigned_weights<T>(blk, W);
    // G rows of x at a time, their dots side by side: one row's 16 vpdpbusd in a chain would
    // wait on each other's latency.
    constexpr int G = RX < 8 ? RX : 8;
#pragma GCC unroll 2
    for (int r0 = 0; r0 < RX; r0 += G) {
      const int8_t* x1 = xq + 2 * r0 * K + 32 * i;  // row r's pair: x1 + 2 r K, and K further
      __m512i v[G];
#pragma GCC unroll 8
      for (int r = 0; r < G; ++r) v[r] = _mm512_setzero_si512();
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j)
#pragma GCC unroll 8
        for (int r = 0; r < G; ++r)
          v[r] = _mm512_dpbusd_epi32(v[r], W[j], _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x1 + 2 * r * K + 4 * j)));
#pragma GCC unroll 8
      for (int r = 0; r < G; ++r) v[r] = _mm512_sub_epi32(_mm512_slli_epi32(v[r], 8), _mm512_slli_epi32(v[r], 1));  // 254 v
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j)
#pragma GCC unroll 8
        for (int r = 0; r < G; ++r)
          v[r] = _mm512_dpbusd_epi32(v[r], W[j], _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x1 + (2 * r + 1) * K + 4 * j)));
#pragma GCC unroll 8
      for (int r = 0; r < G; ++r) acc[r0 + r] = add_block<T>(acc[r0 + r], v[r], d, m, dx, xs, S, nb32, i, r0 + r);
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    _mm512_storeu_ps(y + r * ldy, bias ? _mm512_add_ps(acc[r], _mm512_loadu_ps(bias)) : acc[r]);
}

// fn(rows, group) for each group of 16 rows of x, the last one maybe short: a group's pairs, scales
// and sums start at row 16 group of xq (2 K a row), dx and xs (2 nb32), S (nb32), its outputs at
// that row of y (ldy).
struct XGroup {
  const int8_t* q;
  const float *d, *sx;
  const int32_t* sb;
  float* y;
};
template <class F>
SLM_INLINE void each_x_group(const int8_t* xq, const float* dx, const float* xs, const int32_t* S, int64_t B, int64_t K,
                             float* y, int64_t ldy, F&& fn) {
  const int64_t nb32 = K / 32;
  for (int64_t b = 0; b < B; b += 16)
    fn(std::min<int64_t>(16, B - b), b / 16, XGroup{xq + 2 * b * K, dx + 2 * b * nb32, xs + 2 * b * nb32, S + b * nb32, y + b * ldy});
}

// cols16_vnni for one group of up to 16 rows of x (padded with zero rows to 4, 8 or 16).
template <int64_t T>
SLM_VNNI void cols16_vnni_group(const uint8_t* w, int64_t row_bytes, const XGroup& g, int64_t rows, int64_t K,
                                int64_t ldy, const float* bias) {
  const int64_t nb32 = K / 32;
  if (rows <= 4) cols16_vnni<T, 4>(w, row_bytes, g.q, K, g.d, g.sx, g.sb, nb32, rows, g.y, ldy, bias);
  else if (rows <= 8) cols16_vnni<T, 8>(w, row_bytes, g.q, K, g.d, g.sx, g.sb, nb32, rows, g.y, ldy, bias);
  else cols16_vnni<T, 16>(w, row_bytes, g.q, K, g.d, g.sx, g.sb, nb32, rows, g.y, ldy, bias);
}

// cols16_vnni for the 16 rows of weights at w and every row of x, 16 rows of x at a time (the
// arrays hold zero rows up to a multiple of 8, for the last 4, 8 or 16).
template <int64_t T>
SLM_VNNI void cols16_vnni_rows(const uint8_t* w, int64_t row_bytes, const int8_t* xq, const float* dx, const float* xs,
                               const int32_t* S, int64_t B, int64_t K, float* y, int64_t ldy, const float* bias) {
  each_x_group(xq, dx, xs, S, B, K, y, ldy, [&](int64_t rows, int64_t, const XGroup& g) {
    cols16_vnni_group<T>(w, row_bytes, g, rows, K, ldy, bias);
  });
}

bool cpu_has_vnni();

#if __has_include(<amxtileintrin.h>) || __has_include(<amxintrin.h>)  // GCC 11+, Clang 12+
#define SLM_HAS_AMX 1
#define SLM_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,amx-tile,amx-int8")))

// Intel AMX (Sapphire Rapids and later): tile registers of up to 16 rows of 64 bytes, and one
// instruction (tdpbsud) that adds a 16 x 16 block of int32 dot products of signed bytes (x) with
// unsigned bytes (weights), 16 x 16 x 32 products where cols16_vnni spends 256 vpdpbusd on a
// block of 16 rows of weights, 32 of K and 16 pairs of x rows. The gathered weights are already in
// the layout the instruction reads (W[j]: bytes 4j .. 4j + 3 of the 16 rows), and each block's
// integers are 254 (w . q) + (w . q') and scale as in cols16_vnni, in the same order: the same
// numbers bit for bit. Linux hands out the tiles' 8 KB of state only on request (arch_prctl).
bool amx_permitted() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25))) return false;  // AMX-TILE, AMX-INT8
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

// (SLM_NO_AMX is read at each call: tests and benchmarks compare both paths.)
bool cpu_has_amx() {
  const char* e = std::getenv("SLM_NO_AMX");
  return cpu_has_vnni() && !(e && *e && std::strcmp(e, "0") != 0) && amx_permitted();
}

// The tiles cols16_amx uses, set up on the calling thread (tile configuration is per thread):
// 0-3: two blocks' two 16 x 16 int32 products; 4, 5: 16 rows of 32 bytes (one block: x and its
// residuals; cols16_amx_q8: the weights); 6, 7: 8 rows of 64 bytes (4 of K by 16 rows: one block
// of weights; cols16_amx_q8: of x, of the residuals).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
// (A static object: GCC 12 drops the stores into a local one that only ldtilecfg reads.)
const TileConfig AMX_TILES = [] {
  TileConfig c;
  for (int t = 0; t < 4; ++t) c.rows[t] = 16, c.colsb[t] = 64;
  c.rows[4] = c.rows[5] = 16, c.colsb[4] = c.colsb[5] = 32;
  c.rows[6] = c.rows[7] = 8, c.colsb[6] = c.colsb[7] = 64;
  return c;
}();
SLM_AMX void amx_begin() { _tile_loadconfig(&AMX_TILES); }
SLM_AMX void amx_end() { _tile_release(); }

// One block of 16 rows of weights as the tiles read them: the gathered bytes (cols16_vnni's W) into
// wt, and the block's scales.
template <int64_t T>
SLM_AMX SLM_INLINE void amx_weights(const uint8_t* blk, const Rows16& R, uint8_t* wt, __m512& d, __m512& m) {
  R.scales<T>(blk, d, m);
  __m512i W[8];
  R.unsigned_weights<T>(blk, W);
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) _mm512_store_si512(wt + 64 * j, W[j]);
}

// Block i's weights (wt) into tile 6, its x and residuals into tiles 4 and 5, their products into
// tiles C1 and C2 (the tile intrinsics take their registers' numbers as literals: a macro).
#define SLM_AMX_PRODUCTS(C1, C2, wt, xq, K, i)     \
  do {                                             \
    _tile_loadd(6, wt, 64);                        \
    _tile_loadd(4, (xq) + 32 * (i), 2 * (K));      \
    _tile_loadd(5, (xq) + (K) + 32 * (i), 2 * (K)); \
    _tile_zero(C1);                                \
    _tile_zero(C2);                                \
    _tile_dpbsud(C1, 4, 6);                        \
    _tile_dpbsud(C2, 5, 6);                        \
  } while (0)

// Block i's integers (c1: w . q, c2: w . q' for each pair of x rows) into the accumulators, as
// cols16_vnni adds them.
template <int64_t T, int RX>
SLM_AMX SLM_INLINE void amx_add(__m512* acc, const int32_t* c1, const int32_t* c2, __m512 d, __m512 m,
                                const float* dx, const float* xs, const int32_t* S, int64_t nb32, int64_t i) {
#pragma GCC unroll 16
  for (int r = 0; r < RX; ++r)
    acc[r] = add_block<T>(acc[r], pair254(_mm512_load_si512(c1 + 16 * r), _mm512_load_si512(c2 + 16 * r)), d, m, dx, xs,
                          S, nb32, i, r);
}

// Block i's integers of cols16_amx_q8 (c1: w . q, c2: w . q', rows: weight rows) into its
// accumulators: d (lanes: weight rows) the weights' scales, dxv the x rows' residual steps.
SLM_AMX SLM_INLINE void amx_add_q8(__m512* acc, const int32_t* c1, const int32_t* c2, __m512 d, const float* dxv) {
  const __m512 dx = _mm512_loadu_ps(dxv);
#pragma GCC unroll 16
  for (int n = 0; n < 16; ++n) {
    const __m512i v = pair254(_mm512_load_si512(c1 + 16 * n), _mm512_load_si512(c2 + 16 * n));
    const __m512 dn = _mm512_permutexvar_ps(_mm512_set1_epi32(n), d);
    acc[n] = _mm512_fmadd_ps(_mm512_mul_ps(dn, dx), _mm512_cvtepi32_ps(v), acc[n]);
  }
}

// cols16_vnni's numbers for 16 rows of weights and up to 16 pairs of x rows (RX, of which `rows`
// are stored; xq, dx, xs and S hold 16 rows, zeros past the real ones) through the tiles. The
// blocks go through a pipeline, each stage on another block: block i's products run in one pair
// of tiles while block i - 1's (stored from the other pair) go into the accumulators and block
// i + 1's weights are gathered into the other buffer, which the tiles read only a step later
// (a tile load straight after the stores that wrote its bytes waited for them; one block at a
// time added the three stages' times: 76 ns a block against 58 without the accumulators).
template <int64_t T, int RX>
SLM_AMX void cols16_amx(const uint8_t* __restrict w, int64_t row_bytes, const int8_t* __restrict xq, int64_t K,
                        const float* __restrict dx, const float* __restrict xs, const int32_t* __restrict S,
                        int64_t nb32, int64_t rows, float* y, int64_t ldy, const float* bias) {
  constexpr int64_t BB = block_bytes_c(T);
  const Rows16 R(row_bytes, nb32);
  alignas(64) uint8_t wt[2][8 * 64];     // [block parity]: weights as tile 6 reads them
  alignas(64) int32_t c[2][2][16 * 16];  // [block parity][w . q, w . q']
  __m512 acc[RX], d[2], m[2];
#pragma GCC unroll 16
  for (int r = 0; r < RX; ++r) acc[r] = _mm512_setzero_ps();
  R.prefetch(w, 0);
  amx_weights<T>(w, R, wt[0], d[0], m[0]);
  // block i of parity P: its products into tiles C1, C2 (block i's weights are in wt[P]), block
  // i - 1's into the accumulators, block i + 1's weights into wt[1 - P], then block i's products out
#define SLM_AMX_STAGE(P, C1, C2)                                                                    \
  {                                                                                                 \
    SLM_AMX_PRODUCTS(C1, C2, wt[P], xq, K, i);                                                      \
    if (i > 0) amx_add<T, RX>(acc, c[1 - P][0], c[1 - P][1], d[1 - P], m[1 - P], dx, xs, S, nb32, i - 1); \
    if (i + 1 < nb32) {                                                                             \
      R.prefetch(w, i + 1);                                                                         \
      amx_weights<T>(w + (i + 1) * BB, R, wt[1 - P], d[1 - P], m[1 - P]);                           \
    }                                                                                               \
    _tile_stored(C1, c[P][0], 64);                                                                  \
    _tile_stored(C2, c[P][1], 64);                                                                  \
  }
  for (int64_t i = 0; i < nb32; ++i) {
    if (i % 2 == 0) SLM_AMX_STAGE(0, 0, 1)
    else SLM_AMX_STAGE(1, 2, 3)
  }
#undef SLM_AMX_STAGE
  const int L = (nb32 - 1) % 2;
  amx_add<T, RX>(acc, c[L][0], c[L][1], d[L], m[L], dx, xs, S, nb32, nb32 - 1);
  for (int64_t r = 0; r < rows; ++r)
    _mm512_storeu_ps(y + r * ldy, bias ? _mm512_add_ps(acc[r], _mm512_loadu_ps(bias)) : acc[r]);
}

// Q8_0 weights need no gather: their bytes are signed, as tdpbssd's first matrix, and 16 rows of
// a block are one strided tile load straight from the file's blocks (16 rows of 32 bytes, the
// rows row_bytes apart). x then goes in the layout of the second matrix (amx_x_layout, once a
// call) and the products come out transposed: C[n][m] for weight row n and x row m, each row of
// C one weight row's dots with the 16 x rows. The accumulators hold weight rows too (acc[n],
// lanes: x rows) and are transposed into y at the end. Each product d d' v and each sum is the one
// cols16_vnni makes, in the same order: the same floats bit for bit.
//
// x's pairs of one group of 16 rows (xq + 2 b K: row b's x, then its residual K further) as the
// tiles' second matrix: block i's x at xv + (2 i) 512, its residuals at xv + (2 i + 1) 512, each
// 8 rows of 64 bytes (4 of K by 16 rows of x); dxv + 16 i: the 16 rows' residual steps of block i.
inline void amx_x_layout(const int8_t* xq, const float* dx, int64_t K, int64_t nb32, int64_t i, int8_t* xv, float* dxv) {
  for (int h = 0; h < 2; ++h) {
    int8_t* out = xv + (2 * i + h) * 512;
    for (int m = 0; m < 16; ++m) {
      const int8_t* src = xq + (2 * m + h) * K + 32 * i;
      for (int kk = 0; kk < 8; ++kk) std::memcpy(out + 64 * kk + 4 * m, src + 4 * kk, 4);
    }
  }
  for (int m = 0; m < 16; ++m) dxv[16 * i + m] = dx[(2 * m + 1) * nb32 + i];
}

// y[0..rows, 0..16) (+ bias) for 16 rows of Q8_0 weights and one group of 16 rows of x laid out by
// amx_x_layout (xv, dxv), as cols16_vnni<T_Q8_0> computes them.
SLM_AMX void cols16_amx_q8(const uint8_t* __restrict w, int64_t row_bytes, const int8_t* __restrict xv,
                           const float* __restrict dxv, int64_t nb32, int64_t rows, float* y, int64_t ldy,
                           const float* bias) {
  constexpr int64_t BB = 34;
  const Rows16 R(row_bytes, nb32);
  alignas(64) int32_t c[2][2][16 * 16];  // [block parity][w . q, w . q'], rows: weight rows
  __m512 acc[16], d[2], unused;
#pragma GCC unroll 16
  for (int n = 0; n < 16; ++n) acc[n] = _mm512_setzero_ps();
  R.scales<T_Q8_0>(w, d[0], unused);
#define SLM_AMX_Q8_STAGE(P, C1, C2)                                                                 \
  {                                                                                                 \
    _tile_loadd(4, w + i * BB + 2, row_bytes);                                                      \
    _tile_loadd(6, xv + 2 * i * 512, 64);                                                           \
    _tile_loadd(7, xv + (2 * i + 1) * 512, 64);                                                     \
    _tile_zero(C1);                                                                                 \
    _tile_zero(C2);                                                                                 \
    _tile_dpbssd(C1, 4, 6);                                                                         \
    _tile_dpbssd(C2, 4, 7);                                                                         \
    if (i > 0) amx_add_q8(acc, c[1 - P][0], c[1 - P][1], d[1 - P], dxv + 16 * (i - 1));             \
    if (i + 1 < nb32) {                                                                             \
      R.prefetch(w, i + 1);                                                                         \
      R.scales<T_Q8_0>(w + (i + 1) * BB, d[1 - P], unused);                                         \
    }                                                                                               \
    _tile_stored(C1, c[P][0], 64);                                                                  \
    _tile_stored(C2, c[P][1], 64);                                                                  \
  }
  R.prefetch(w, 0);
  for (int64_t i = 0; i < nb32; ++i) {
    if (i % 2 == 0) SLM_AMX_Q8_STAGE(0, 0, 1)
    else SLM_AMX_Q8_STAGE(1, 2, 3)
  }
#undef SLM_AMX_Q8_STAGE
  const int L = (nb32 - 1) % 2;
  amx_add_q8(acc, c[L][0], c[L][1], d[L], dxv + 16 * (nb32 - 1));
  alignas(64) float t[16 * 16];  // [weight row][x row]
#pragma GCC unroll 16
  for (int n = 0; n < 16; ++n) _mm512_store_ps(t + 16 * n, acc[n]);
  for (int64_t m = 0; m < rows; ++m)
    for (int n = 0; n < 16; ++n) y[m * ldy + n] = bias ? t[16 * n + m] + bias[n] : t[16 * n + m];
}

// cols16_amx for the 16 rows of weights at w and every row of x, 16 rows of x at a time (the
// arrays hold zero rows up to a multiple of 16), a last 8 or fewer through cols16_vnni.
template <int64_t T>
SLM_AMX void cols16_amx_rows(const uint8_t* w, int64_t row_bytes, const int8_t* xq, const float* dx, const float* xs,
                             const int32_t* S, int64_t B, int64_t K, float* y, int64_t ldy, const float* bias) {
  const int64_t nb32 = K / 32;
  each_x_group(xq, dx, xs, S, B, K, y, ldy, [&](int64_t rows, int64_t, const XGroup& g) {
    // a tile's products cost the same for 1 to 16 rows of x: 8 rows or fewer go faster through vpdpbusd
    if (rows <= 8) cols16_vnni_group<T>(w, row_bytes, g, rows, K, ldy, bias);
    else cols16_amx<T, 16>(w, row_bytes, g.q, K, g.d, g.sx, g.sb, nb32, rows, g.y, ldy, bias);
  });
}
// cols16_amx_q8 for the 16 rows of Q8_0 weights at w and every row of x (xv, dxv: amx_x_layout's,
// one group of 16 rows after another), a group of 8 rows or fewer through cols16_vnni.
void cols16_amx_q8_rows(const uint8_t* w, int64_t row_bytes, const int8_t* xq, const float* dx, const float* xs,
                        const int32_t* S, const int8_t* xv, const float* dxv, int64_t B, int64_t K, float* y,
                        int64_t ldy, const float* bias) {
  const int64_t nb32 = K / 32;
  each_x_group(xq, dx, xs, S, B, K, y, ldy, [&](int64_t rows, int64_t group, const XGroup& g) {
    if (rows <= 8) cols16_vnni_group<T_Q8_0>(w, row_bytes, g, rows, K, ldy, bias);
    else cols16_amx_q8(w, row_bytes, xv + group * nb32 * 1024, dxv + group * nb32 * 16, nb32, rows, g.y, ldy, bias);
  });
}
#else  // a compiler without the AMX intrinsics: cols16_vnni alone
bool cpu_has_amx() { return false; }
inline void amx_begin() {}
inline void amx_end() {}
inline void amx_x_layout(const int8_t*, const float*, int64_t, int64_t, int64_t, int8_t*, float*) {}
void cols16_amx_q8_rows(const uint8_t* w, int64_t row_bytes, const int8_t* xq, const float* dx, const float* xs,
                        const int32_t* S, const int8_t*, const float*, int64_t B, int64_t K, float* y,
                        int64_t ldy, const float* bias) {
  cols16_vnni_rows<T_Q8_0>(w, row_bytes, xq, dx, xs, S, B, K, y, ldy, bias);
}
template <int64_t T>
void cols16_amx_rows(const uint8_t* w, int64_t row_bytes, const int8_t* xq, const float* dx, const float* xs,
                     const int32_t* S, int64_t B, int64_t K, float* y, int64_t ldy, const float* bias) {
  cols16_vnni_rows<T>(w, row_bytes, xq, dx, xs, S, B, K, y, ldy, bias);
}
#endif

// Rows [n0, n1) of one part (type t) for B rows of fp32 x: Q8_0, Q4_0 and Q4_1 sixteen rows of
// weights at a time (cols16_rows; pad: 16K floats), the rest four rows at a time (buf: 4K floats).
// bias0: where the part's rows start in y and bias.
SLM_AVX512 void rows_gguf_f32(int64_t t, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, const float* x,
                              int64_t B, int64_t K, float* buf, float* y, int64_t ldy, const float* bias, int64_t bias0) {
  y += bias0;
  if (bias) bias += bias0;
  int64_t n = n0;
  if (t == T_Q8_0 || t == T_Q4_0 || t == T_Q4_1) {
    std::vector<float> pad(B % 16 == 0 || B % 16 == 8 ? 0 : 16 * K);  // only the last rows of x need it
    for (; n + 16 <= n1; n += 16) {
      const uint8_t* wn = w + n * row_bytes;
      const float* bn = bias ? bias + n : nullptr;
      if (t == T_Q8_0) cols16_rows<T_Q8_0>(wn, row_bytes, x, B, K, pad.data(), y + n, ldy, bn);
      else if (t == T_Q4_0) cols16_rows<T_Q4_0>(wn, row_bytes, x, B, K, pad.data(), y + n, ldy, bn);
      else cols16_rows<T_Q4_1>(wn, row_bytes, x, B, K, pad.data(), y + n, ldy, bn);
    }
  }
  for (; n + 4 <= n1; n += 4) {
    for (int i = 0; i < 4; ++i) dequantize_row_512(t, w + (n + i) * row_bytes, K, buf + i * K);
    dot_rows_512<4>(buf, x, B, K, y, ldy, n, bias);
  }
  for (; n < n1; ++n) {
    dequantize_row_512(t, w + n * row_bytes, K, buf);
    dot_rows_512<1>(buf, x, B, K, y, ldy, n, bias);
  }
}

// Whether the CPU has AVX-512 (F, BW, VL, DQ) and SLM_NO_AVX512 is unset.
bool cpu_has_avx512() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  const char* e = std::getenv("SLM_NO_AVX512");  // read at each call: tests and benchmarks compare both paths
  return has && !(e && *e && std::strcmp(e, "0") != 0);
}

// The least rows of x for which gguf_direct takes rows_gguf_f32 (SLM_GGUF_F32_ROWS overrides it,
// read at each call).
int64_t f32_rows() {
  const char* e = std::getenv("SLM_GGUF_F32_ROWS");
  return e ? std::max<int64_t>(1, std::atoll(e)) : int64_t(F32_ROWS);
}

// Whether gguf_direct takes rows_gguf_f32 for B rows of x.
bool f32_path(const Parts& P, int64_t B, int64_t K) {
  return B >= f32_rows() && cpu_has_avx512() &&
         std::all_of(P.types.begin(), P.types.end(), [K](int64_t t) { return fast_dequant(t, K); });
}

// The rows of weights a thread takes from a shared counter at a time (whole 16s, ~32 KB of blocks),
// and the threads worth starting for N rows. The threads take chunks as they finish, not half the
// rows each: with halves, whichever thread had been held up (a shared host, a late wake-up) kept
// the other waiting at the end of every product, ~10% of a 16-row SmolLM2 step.
struct SharedChunks {
  int64_t chunk, threads;
  std::atomic<int64_t> next{0};
  explicit SharedChunks(const Parts& P)
      : chunk(16 * std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, 16 * P.row_bytes[0]))),
        threads(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (P.N + chunk - 1) / chunk))) {}
  // fn(p, a, b) for each part p with rows in the chunks this thread takes: its rows [a, b), counted
  // from the part's first row
  template <class F>
  void each(const Parts& P, F&& fn) {
    for (int64_t n0; (n0 = next.fetch_add(chunk)) < P.N;) {
      const int64_t n1 = std::min(P.N, n0 + chunk);
      for (size_t p = 0; p < P.types.size(); ++p) {
        const int64_t a = std::max(n0, P.row0[p]), b = std::min(n1, p + 1 < P.types.size() ? P.row0[p + 1] : P.N);
        if (a < b) fn(p, a - P.row0[p], b - P.row0[p]);
      }
    }
  }
};

// y [B, N] (+ bias) for B rows of fp32 x through rows_gguf_f32 (x as it is; AVX-512).
void gguf_f32(const Parts& P, const uint8_t* bp, const float* x, int64_t B, int64_t K, float* yp, const float* bias_p) {
  SharedChunks work(P);
  at::parallel_for(0, work.threads, 1, [&](int64_t, int64_t) {
    std::vector<float> buf(4 * K);
    work.each(P, [&](size_t p, int64_t a, int64_t b) {
      rows_gguf_f32(P.types[p], bp + P.byte0[p], P.row_bytes[p], a, b, x, B, K, buf.data(), yp, P.N, bias_p, P.row0[p]);
    });
  });
}

// Whether the CPU has AVX-512 with VNNI and neither SLM_NO_AVX512 nor SLM_NO_VNNI is set.
bool cpu_has_vnni() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni");
  }();
  const char* e = std::getenv("SLM_NO_VNNI");  // read at each call: tests and benchmarks compare both paths
  return has && cpu_has_avx512() && !(e && *e && std::strcmp(e, "0") != 0);
}

// From this many rows of x, Q8_0/Q4_0/Q4_1 layers take cols16_vnni on a CPU with AVX-512 VNNI
// (SLM_GGUF_VNNI_ROWS overrides it, read at each call).
constexpr int64_t VNNI_ROWS = 4;

// Whether gguf_direct takes cols16_vnni for B rows of x: every part Q8_0, Q4_0 or Q4_1, x in pairs.
bool vnni_path(const Parts& P, int64_t B) {
  const char* e = std::getenv("SLM_GGUF_VNNI_ROWS");
  const int64_t least = e ? std::max<int64_t>(1, std::atoll(e)) : VNNI_ROWS;
  return B >= least && x_rows() == 2 && cpu_has_vnni() &&
         std::all_of(P.types.begin(), P.types.end(), [](int64_t t) { return t == T_Q8_0 || t == T_Q4_0 || t == T_Q4_1; });
}

// From this many rows of x, gguf_vnni takes cols16_amx where the CPU has AMX-INT8
// (SLM_GGUF_AMX_ROWS overrides it, read at each call).
constexpr int64_t AMX_ROWS = 9;

bool amx_path(int64_t B) {
  const char* e = std::getenv("SLM_GGUF_AMX_ROWS");
  return B >= (e ? std::max<int64_t>(1, std::atoll(e)) : AMX_ROWS) && cpu_has_amx();
}

// y [B, N] (+ bias) for B rows of x through cols16_vnni (the int8 path's numbers, 16 rows of weights
// at a time; a part's rows short of 16 through rows_gguf). The threads take chunks of rows from a
// shared counter, as in the fp32 path.
void gguf_vnni(const Parts& P, const uint8_t* bp, const float* x, int64_t B, int64_t K, float* yp, const float* bias_p) {
  const bool amx = amx_path(B);
  // rows of x padded with zeros to a multiple of 8 (16 for the tiles, which load 16 rows)
  const int64_t N = P.N, nb32 = K / 32, Bp = amx ? (B + 15) / 16 * 16 : (B + 7) / 8 * 8;
  std::vector<int8_t> xq(2 * Bp * K, 0);
  std::vector<float> dx(2 * Bp * nb32, 0.0f), xs(2 * Bp * nb32, 0.0f);
  std::vector<int32_t> S(Bp * nb32, 0);  // each pair's block sums, 254 q + q'
  // the pairs as int16, for rows_gguf: where a part's rows are not whole 16s
  const bool tails = N % 16 != 0 || std::any_of(P.row0.begin(), P.row0.end(), [](int64_t r) { return r % 16 != 0; });
  std::vector<int16_t> x16(tails ? B * K : 0);
  // x as cols16_amx_q8's tiles read it, for Q8_0 parts
  const bool q8 = amx && std::any_of(P.types.begin(), P.types.end(), [](int64_t t) { return t == T_Q8_0; });
  std::vector<int8_t> xv(q8 ? 2 * Bp * K : 0);
  std::vector<float> dxv(q8 ? Bp * nb32 : 0);
  SharedChunks work(P);
  // One parallel region: the threads quantize the rows of x between them, then take chunks of
  // rows of weights from a shared counter (a quantization before the region kept the other
  // thread waiting, as did a second region's start).
#pragma omp parallel num_threads(int(work.threads))
  {
    if (amx) amx_begin();
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      quantize_x2(x + b * K, 1, K, xq.data() + 2 * b * K, dx.data() + 2 * b * nb32, xs.data() + 2 * b * nb32,
                  S.data() + b * nb32);
      if (tails) pair16(xq.data(), b, K, x16.data());
    }
    if (q8) {
#pragma omp for schedule(static)
      for (int64_t gi = 0; gi < Bp / 16 * nb32; ++gi) {
        const int64_t g = gi / nb32, i = gi % nb32;
        amx_x_layout(xq.data() + 2 * 16 * g * K, dx.data() + 2 * 16 * g * nb32, K, nb32, i,
                     xv.data() + g * nb32 * 1024, dxv.data() + g * nb32 * 16);
      }
    }
    work.each(P, [&](size_t p, int64_t a, int64_t b) {
      const int64_t t = P.types[p], rb = P.row_bytes[p], r0 = P.row0[p];
      const uint8_t* w = bp + P.byte0[p];
      int64_t n = a;
      for (; n + 16 <= b; n += 16) {
        const float* bn = bias_p ? bias_p + r0 + n : nullptr;
        if (amx) {
          if (t == T_Q8_0) cols16_amx_q8_rows(w + n * rb, rb, xq.data(), dx.data(), xs.data(), S.data(), xv.data(), dxv.data(), B, K, yp + r0 + n, N, bn);
          else if (t == T_Q4_0) cols16_amx_rows<T_Q4_0>(w + n * rb, rb, xq.data(), dx.data(), xs.data(), S.data(), B, K, yp + r0 + n, N, bn);
          else cols16_amx_rows<T_Q4_1>(w + n * rb, rb, xq.data(), dx.data(), xs.data(), S.data(), B, K, yp + r0 + n, N, bn);
        } else if (t == T_Q8_0) cols16_vnni_rows<T_Q8_0>(w + n * rb, rb, xq.data(), dx.data(), xs.data(), S.data(), B, K, yp + r0 + n, N, bn);
        else if (t == T_Q4_0) cols16_vnni_rows<T_Q4_0>(w + n * rb, rb, xq.data(), dx.data(), xs.data(), S.data(), B, K, yp + r0 + n, N, bn);
        else cols16_vnni_rows<T_Q4_1>(w + n * rb, rb, xq.data(), dx.data(), xs.data(), S.data(), B, K, yp + r0 + n, N, bn);
      }
      if (n < b) {
        if (t == T_Q8_0) rows_gguf<T_Q8_0>(w, rb, n, b, xq.data(), x16.data(), dx.data(), xs.data(), B, 2, K, yp, N, bias_p, r0);
        else if (t == T_Q4_0) rows_gguf<T_Q4_0>(w, rb, n, b, xq.data(), x16.data(), dx.data(), xs.data(), B, 2, K, yp, N, bias_p, r0);
        else rows_gguf<T_Q4_1>(w, rb, n, b, xq.data(), x16.data(), dx.data(), xs.data(), B, 2, K, yp, N, bias_p, r0);
      }
    });
    if (amx) amx_end();
  }
}

// y [B, N] (+ bias) for B rows of x [B, K]: x quantized to int8 blocks, then each thread streams
// one contiguous range of weight rows (the direct path, for few rows of x). From f32_rows() rows of
// x, on a CPU with AVX-512 and where every part is a fast_dequant type: rows_gguf_f32.
void gguf_direct(const Parts& P, const uint8_t* bp, const float* x, int64_t B, int64_t K, float* yp, const float* bias_p) {
  const int64_t N = P.N;
  if (vnni_path(P, B)) {
    gguf_vnni(P, bp, x, B, K, yp, bias_p);
    return;
  }
  if (f32_path(P, B, K)) {
    gguf_f32(P, bp, x, B, K, yp, bias_p);
    return;
  }
  const int64_t R = x_rows();
  std::vector<int8_t> xq(R * B * K);
  std::vector<float> dx(R * B * K / 32), xs(R * B * K / 32);
  std::vector<int16_t> x16;
  if (R == 2) {
    quantize_x2(x, B, K, xq.data(), dx.data(), xs.data(), nullptr);
    if (std::any_of(P.types.begin(), P.types.end(), wide16)) {  // the pairs as int16, for dot_row
      x16.resize(B * K);
      for (int64_t b = 0; b < B; ++b) pair16(xq.data(), b, K, x16.data());
    }
  } else {
    quantize_x(x, B, K, xq.data(), dx.data(), xs.data());
  }
  // rows per task: ~64 KB of weights
  const int64_t grain = std::max<int64_t>(8, (int64_t(1) << 16) / std::max<int64_t>(1, P.row_bytes[0]));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (size_t p = 0; p < P.types.size(); ++p) {
      const int64_t a = std::max(n0, P.row0[p]), b = std::min(n1, P.row0[p] + (p + 1 < P.types.size() ? P.row0[p + 1] - P.row0[p] : N - P.row0[p]));
      if (a >= b) continue;
      const uint8_t* w = bp + P.byte0[p];
      const int64_t r0 = P.row0[p], rb = P.row_bytes[p];
      switch (P.types[p]) {
        case T_Q8_0: rows_gguf<T_Q8_0>(w, rb, a - r0, b - r0, xq.data(), x16.empty() ? nullptr : x16.data(), dx.data(), xs.data(), B, R, K, yp, N, bias_p, r0); break;
        case T_Q4_0: rows_gguf<T_Q4_0>(w, rb, a - r0, b - r0, xq.data(), x16.empty() ? nullptr : x16.data(), dx.data(), xs.data(), B, R, K, yp, N, bias_p, r0); break;
        case T_Q4_1: rows_gguf<T_Q4_1>(w, rb, a - r0, b - r0, xq.data(), x16.empty() ? nullptr : x16.data(), dx.data(), xs.data(), B, R, K, yp, N, bias_p, r0); break;
        case T_Q5_1: rows_gguf<T_Q5_1>(w, rb, a - r0, b - r0, xq.data(), x16.empty() ? nullptr : x16.data(), dx.data(), xs.data(), B, R, K, yp, N, bias_p, r0); break;
        case T_Q5_K: rows_gguf<T_Q5_K>(w, rb, a - r0, b - r0, xq.data(), x16.empty() ? nullptr : x16.data(), dx.data(), xs.data(), B, R, K, yp, N, bias_p, r0); break;
        case T_Q5_0: rows_gguf<T_Q5_0>(w, rb, a - r0, b - r0, xq.data(), x16.empty() ? nullptr : x16.data(), dx.data(), xs.data(), B, R, K, yp, N, bias_p, r0); break;
        case T_Q5_0R4: rows_gguf<T_Q5_0R4>(w, rb, a - r0, b - r0, xq.data(), x16.empty() ? nullptr : x16.data(), dx.data(), xs.data(), B, R, K, yp, N, bias_p, r0); break;
        case T_Q4_K: rows_gguf<T_Q4_K>(w, rb, a - r0, b - r0, xq.data(), x16.empty() ? nullptr : x16.data(), dx.data(), xs.data(), B, R, K, yp, N, bias_p, r0); break;
        default: rows_gguf<T_Q6_K>(w, rb, a - r0, b - r0, xq.data(), x16.empty() ? nullptr : x16.data(), dx.data(), xs.data(), B, R, K, yp, N, bias_p, r0); break;
      }
    }
  });
}

at::Tensor linear_gguf(const at::Tensor& x_in, const at::Tensor& blocks, at::IntArrayRef types, at::IntArrayRef rows,
                       int64_t K, const std::optional<at::Tensor>& bias_, int64_t max_direct) {
  const Parts P(blocks, types, rows, K);
  const int64_t N = P.N;
  at::Tensor x, bias;
  prepare(x_in, bias_, N, K, x, bias);
  const int64_t B = x.size(0);
  auto y = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return finish(x_in, y, N);
  const uint8_t* bp = blocks.const_data_ptr<uint8_t>();
  const float* bias_p = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float* yp = y.mutable_data_ptr<float>();
  if (B <= max_direct) {
    gguf_direct(P, bp, x.const_data_ptr<float>(), B, K, yp, bias_p);
    return finish(x_in, y, N);
  }
  if (B <= F32_MAX_ROWS && f32_path(P, B, K)) {  // x as it is, as the GEMM below takes it
    gguf_f32(P, bp, x.const_data_ptr<float>(), B, K, yp, bias_p);
    return finish(x_in, y, N);
  }
  const int64_t chunk = std::max<int64_t>(64, ((int64_t(1) << 20) / K + 63) / 64 * 64);
  auto wbuf = at::empty({std::min(chunk, N), K}, x.options());
  for (int64_t c0 = 0; c0 < N; c0 += chunk) {
    const int64_t c1 = std::min(c0 + chunk, N), n = c1 - c0;
    float* wp = wbuf.mutable_data_ptr<float>();
    at::parallel_for(c0, c1, 16, [&](int64_t n0, int64_t n1) { dequant_rows(P, bp, K, n0, n1, wp + (n0 - c0) * K); });
    auto w = wbuf.narrow(0, 0, n);
    y.narrow(1, c0, n).copy_(bias.defined() ? at::addmm(bias.narrow(0, c0, n), x, w.t()) : at::mm(x, w.t()));
  }
  return finish(x_in, y, N);
}

}  // namespace slm::cpu
