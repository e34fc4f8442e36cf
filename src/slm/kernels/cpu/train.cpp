// The CPU training step's kernels, fp32, forward and backward (autograd in kernels/cpu_train.py):
// GLU, rotary embedding, RMSNorm, cross-entropy's softmax and causal attention.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "ops.h"
#include "rows.h"
#include "simd.h"

namespace slm::cpu {

// Flush-to-zero and denormals-are-zero for this thread while in scope. Training drives the softmax
// of the loss and of attention towards probabilities below float's smallest normal (1.2e-38), and
// each product that makes or reads such a denormal takes a slow microcode path: without this a run
// slows down as it learns (2.6x slower per step after 1,700 steps of the 60-minute recipe). Every
// parallel section of this file starts with it; the flags go back as they were when it ends.
struct FlushDenormals {
  unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }  // FTZ (bit 15) | DAZ (bit 6)
  ~FlushDenormals() { _mm_setcsr(saved); }
};

// GLU over h [N, 2F] = [gate | up]: y = act(gate) * up, act SiLU or GELU's tanh approximation. The
// backward reads gate, up and dy once and writes both halves of dh, where PyTorch's autograd runs
// act, its derivative, three products and a concatenation as separate passes.
template <bool GELU>
inline void glu_act8(__m256 g, __m256& a, __m256& da) {
  const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
  if constexpr (GELU) {
    const __m256 k0 = _mm256_set1_ps(0.7978845608028654f), k1 = _mm256_set1_ps(0.044715f);
    const __m256 g2 = _mm256_mul_ps(g, g);
    const __m256 z = _mm256_mul_ps(k0, _mm256_fmadd_ps(_mm256_mul_ps(k1, g2), g, g));
    // tanh(z) = 2 / (1 + exp(-2z)) - 1
    const __m256 t = _mm256_sub_ps(_mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(one, exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0f), z)))), one);
    const __m256 onept = _mm256_add_ps(one, t);
    a = _mm256_mul_ps(_mm256_mul_ps(half, g), onept);
    const __m256 dz = _mm256_mul_ps(k0, _mm256_fmadd_ps(_mm256_set1_ps(3.0f * 0.044715f), g2, one));
    da = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_mul_ps(half, g), _mm256_fnmadd_ps(t, t, one)), dz, _mm256_mul_ps(half, onept));
  } else {
    const __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    a = _mm256_mul_ps(g, s);
    da = _mm256_mul_ps(s, _mm256_fmadd_ps(g, _mm256_sub_ps(one, s), one));  // s (1 + g (1 - s))
  }
}

inline void glu_act1(bool gelu, float g, float& a, float& da) {
  if (gelu) {
    const float k0 = 0.7978845608028654f, k1 = 0.044715f, t = std::tanh(k0 * (g + k1 * g * g * g));
    a = 0.5f * g * (1.0f + t);
    da = 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * k0 * (1.0f + 3.0f * k1 * g * g);
  } else {
    const float s = 1.0f / (1.0f + std::exp(-g));
    a = g * s;
    da = s * (1.0f + g * (1.0f - s));
  }
}

template <bool GELU>
void glu_rows(const float* hp, const float* dyp, float* out, int64_t r0, int64_t r1, int64_t F) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* g = hp + r * 2 * F;
    const float* u = g + F;
    int64_t i = 0;
    if (dyp == nullptr) {  // forward: out [N, F]
      float* o = out + r * F;
      for (; i + 8 <= F; i += 8) {
        __m256 a, da;
        glu_act8<GELU>(_mm256_loadu_ps(g + i), a, da);
        _mm256_storeu_ps(o + i, _mm256_mul_ps(a, _mm256_loadu_ps(u + i)));
      }
      for (; i < F; ++i) {
        float a, da;
        glu_act1(GELU, g[i], a, da);
        o[i] = a * u[i];
      }
    } else {  // backward: out [N, 2F] = [dy * up * act'(gate) | dy * act(gate)]
      const float* dy = dyp + r * F;
      float *dg = out + r * 2 * F, *du = dg + F;
      for (; i + 8 <= F; i += 8) {
        __m256 a, da;
        glu_act8<GELU>(_mm256_loadu_ps(g + i), a, da);
        const __m256 d = _mm256_loadu_ps(dy + i);
        _mm256_storeu_ps(dg + i, _mm256_mul_ps(_mm256_mul_ps(d, _mm256_loadu_ps(u + i)), da));
        _mm256_storeu_ps(du + i, _mm256_mul_ps(d, a));
      }
      for (; i < F; ++i) {
        float a, da;
        glu_act1(GELU, g[i], a, da);
        dg[i] = dy[i] * u[i] * da;
        du[i] = dy[i] * a;
      }
    }
  }
}

// dy undefined: the forward, act(gate) * up [N, F]; else the backward, dh [N, 2F].
at::Tensor glu_train(const at::Tensor& h, const std::optional<at::Tensor>& dy, bool gelu) {
  TORCH_CHECK(h.device().is_cpu() && h.scalar_type() == at::kFloat && h.is_contiguous() && h.dim() == 2 &&
                  h.size(1) % 2 == 0,
              "slm_cpu.glu_train: h must be contiguous fp32 [N, 2F]");
  const int64_t N = h.size(0), F = h.size(1) / 2;
  if (dy) TORCH_CHECK(dy->scalar_type() == at::kFloat && dy->is_contiguous() && dy->dim() == 2 && dy->size(0) == N &&
                          dy->size(1) == F, "slm_cpu.glu_train: dy must be contiguous fp32 [N, F]");
  auto out = dy ? at::empty({N, 2 * F}, h.options()) : at::empty({N, F}, h.options());
  const float* hp = h.const_data_ptr<float>();
  const float* dyp = dy ? dy->const_data_ptr<float>() : nullptr;
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 4096 / std::max<int64_t>(F, 1)), [&](int64_t r0, int64_t r1) {
    FlushDenormals flush;
    if (gelu) glu_rows<true>(hp, dyp, op, r0, r1, F);
    else glu_rows<false>(hp, dyp, op, r0, r1, F);
  });
  return out;
}

// y = x * c + roll(x, D/2) * s over one head of D values (model.apply_rope; the sign is in s).
// With `back` the transpose, for the backward: y[j] = x[j] c[j] + x[p] s[p], p = (j + D/2) mod D.
inline void rope_head(const float* x, const float* c, const float* s, float* y, int64_t D, bool back) {
  const int64_t h = D / 2;
  for (int half = 0; half < 2; ++half) {
    const int64_t lo = half * h, other = half ? -h : h;  // j and p = j + other
    const float* sp = back ? s + other : s;
    int64_t j = lo;
    for (; j + 8 <= lo + h; j += 8)
      _mm256_storeu_ps(y + j, _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(c + j),
                                              _mm256_mul_ps(_mm256_loadu_ps(x + j + other), _mm256_loadu_ps(sp + j))));
    for (; j < lo + h; ++j) y[j] = x[j] * c[j] + x[j + other] * sp[j];
  }
}

// Forward: qkv [B, T, (H + 2K) D] contiguous -> rotated Q [B, T, H, D] and K [B, T, K, D], one pass
// (V stays a view of qkv). cos, sin [Bc, T, D] with Bc = 1 or B.
std::tuple<at::Tensor, at::Tensor> rope_qk_train(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                                 int64_t H, int64_t K) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat && qkv.is_contiguous() && qkv.dim() == 3,
              "slm_cpu.rope_qk_train: qkv must be contiguous fp32 [B, T, (H + 2K) D]");
  const int64_t B = qkv.size(0), T = qkv.size(1), D = qkv.size(2) / (H + 2 * K);
  TORCH_CHECK(D * (H + 2 * K) == qkv.size(2) && D % 2 == 0, "slm_cpu.rope_qk_train: bad head split");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 3 &&
                  cos.sizes() == sin.sizes() && (cos.size(0) == 1 || cos.size(0) == B) && cos.size(1) == T && cos.size(2) == D,
              "slm_cpu.rope_qk_train: cos and sin must be contiguous fp32 [1 or B, T, D]");
  auto q = at::empty({B, T, H, D}, qkv.options()), k = at::empty({B, T, K, D}, qkv.options());
  const float *xp = qkv.const_data_ptr<float>(), *cp = cos.const_data_ptr<float>(), *sp = sin.const_data_ptr<float>();
  float *qp = q.mutable_data_ptr<float>(), *kp = k.mutable_data_ptr<float>();
  const bool per_row = cos.size(0) == B && B > 1;
  at::parallel_for(0, B * T, 16, [&](int64_t r0, int64_t r1) {
    FlushDenormals flush;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r % T, ct = ((per_row ? r / T : 0) * T + t) * D;
      const float* x = xp + r * (H + 2 * K) * D;
      for (int64_t hh = 0; hh < H; ++hh) rope_head(x + hh * D, cp + ct, sp + ct, qp + (r * H + hh) * D, D, false);
      for (int64_t hh = 0; hh < K; ++hh) rope_head(x + (H + hh) * D, cp + ct, sp + ct, kp + (r * K + hh) * D, D, false);
    }
  });
  return {q, k};
}

// Backward: dq [B, T, H, D], dk and dv [B, T, K, D] in any strides with unit stride over D (as
// attention's backward leaves them) -> d qkv [B, T, (H + 2K) D], one pass.
at::Tensor rope_qkv_backward(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& cos,
                             const at::Tensor& sin) {
  for (const at::Tensor* g : {&dq, &dk, &dv})
    TORCH_CHECK(g->scalar_type() == at::kFloat && g->dim() == 4 && g->stride(3) == 1,
                "slm_cpu.rope_qkv_backward: gradients must be fp32 [B, T, heads, D] with unit stride over D");
  const int64_t B = dq.size(0), T = dq.size(1), H = dq.size(2), K = dk.size(2), D = dq.size(3);
  TORCH_CHECK(cos.size(0) == 1 || cos.size(0) == B, "slm_cpu.rope_qkv_backward: cos must be [1 or B, T, D]");
  auto out = at::empty({B, T, (H + 2 * K) * D}, dq.options());
  const float *cp = cos.const_data_ptr<float>(), *sp = sin.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const bool per_row = cos.size(0) == B && B > 1;
  at::parallel_for(0, B * T, 16, [&](int64_t r0, int64_t r1) {
    FlushDenormals flush;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / T, t = r % T, ct = ((per_row ? b : 0) * T + t) * D;
      float* o = op + r * (H + 2 * K) * D;
      const float* q = dq.const_data_ptr<float>() + b * dq.stride(0) + t * dq.stride(1);
      const float* k = dk.const_data_ptr<float>() + b * dk.stride(0) + t * dk.stride(1);
      const float* v = dv.const_data_ptr<float>() + b * dv.stride(0) + t * dv.stride(1);
      for (int64_t hh = 0; hh < H; ++hh) rope_head(q + hh * dq.stride(2), cp + ct, sp + ct, o + hh * D, D, true);
      for (int64_t hh = 0; hh < K; ++hh) rope_head(k + hh * dk.stride(2), cp + ct, sp + ct, o + (H + hh) * D, D, true);
      for (int64_t hh = 0; hh < K; ++hh) std::memcpy(o + (H + K + hh) * D, v + hh * dv.stride(2), D * sizeof(float));
    }
  });
  return out;
}

// RMSNorm for training: y = x * r * w (w + 1 with plus_one), r = 1 / sqrt(mean(x^2) + eps) per row,
// r kept for the backward. One pass each way where autograd runs some ten small ops over [N, d].
std::tuple<at::Tensor, at::Tensor> rms_norm_train(const at::Tensor& x, const at::Tensor& w, double eps, bool plus_one) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 &&
                  w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == x.size(1),
              "slm_cpu.rms_norm_train: x must be contiguous fp32 [N, d], w fp32 [d]");
  const int64_t N = x.size(0), d = x.size(1);
  auto y = at::empty_like(x);
  auto r = at::empty({N}, x.options());
  const float *xp = x.const_data_ptr<float>(), *wp = w.const_data_ptr<float>();
  float *yp = y.mutable_data_ptr<float>(), *rp = r.mutable_data_ptr<float>();
  const float off = plus_one ? 1.0f : 0.0f;
  at::parallel_for(0, N, std::max<int64_t>(1, 8192 / std::max<int64_t>(d, 1)), [&](int64_t r0, int64_t r1) {
    FlushDenormals flush;
    for (int64_t i = r0; i < r1; ++i) rp[i] = rms_row(xp + i * d, wp, d, eps, off, yp + i * d);
  });
  return {y, r};
}

// Its backward: with g = dy * w and xh = x * r, dx = r * (g - xh * mean(g * xh)) and dw = sum over
// rows of dy * xh (per-thread partial sums, added at the end).
std::tuple<at::Tensor, at::Tensor> rms_norm_train_backward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& r,
                                                           const at::Tensor& dy, bool plus_one) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 && dy.sizes() == x.sizes() &&
                  dy.scalar_type() == at::kFloat && dy.is_contiguous() && r.numel() == x.size(0) && w.numel() == x.size(1),
              "slm_cpu.rms_norm_train_backward: x, dy contiguous fp32 [N, d], r [N], w [d]");
  const int64_t N = x.size(0), d = x.size(1);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N));
  auto dx = at::empty_like(x);
  auto dwp = at::zeros({parts, d}, x.options());
  const float *xp = x.const_data_ptr<float>(), *wp = w.const_data_ptr<float>(), *rp = r.const_data_ptr<float>(),
              *gp = dy.const_data_ptr<float>();
  float *dxp = dx.mutable_data_ptr<float>(), *pp = dwp.mutable_data_ptr<float>();
  const float off = plus_one ? 1.0f : 0.0f;
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    FlushDenormals flush;
    for (int64_t p = p0; p < p1; ++p) {
      float* dw = pp + p * d;
      for (int64_t i = N * p / parts; i < N * (p + 1) / parts; ++i) {
        const float *xi = xp + i * d, *gi = gp + i * d;
        const float ri = rp[i];
        const __m256 rv = _mm256_set1_ps(ri), ov = _mm256_set1_ps(off);
        __m256 acc = _mm256_setzero_ps();  // sum of dy * w * x
        int64_t j = 0;
        for (; j + 8 <= d; j += 8) {
          const __m256 xv = _mm256_loadu_ps(xi + j), gv = _mm256_loadu_ps(gi + j);
          acc = _mm256_fmadd_ps(_mm256_mul_ps(gv, _mm256_add_ps(_mm256_loadu_ps(wp + j), ov)), xv, acc);
          _mm256_storeu_ps(dw + j, _mm256_fmadd_ps(gv, _mm256_mul_ps(xv, rv), _mm256_loadu_ps(dw + j)));
        }
        float dot = hsum(acc);
        for (; j < d; ++j) {
          dot += gi[j] * (wp[j] + off) * xi[j];
          dw[j] += gi[j] * xi[j] * ri;
        }
        // dx = r g - x r^3 mean(g x)
        const float k = ri * ri * ri * dot / d;
        const __m256 kv = _mm256_set1_ps(k);
        float* dxi = dxp + i * d;
        for (j = 0; j + 8 <= d; j += 8) {
          const __m256 g = _mm256_mul_ps(_mm256_loadu_ps(gi + j), _mm256_add_ps(_mm256_loadu_ps(wp + j), ov));
          _mm256_storeu_ps(dxi + j, _mm256_fmsub_ps(g, rv, _mm256_mul_ps(_mm256_loadu_ps(xi + j), kv)));
        }
        for (; j < d; ++j) dxi[j] = gi[j] * (wp[j] + off) * ri - xi[j] * k;
      }
    }
  });
  return {dx, dwp.sum(0)};
}

// One row of scores s [L]: s[j] = exp(s[j] - m) for j < n (the keys a causal row sees; n = L for a
// full row), 0 after; returns the sum. m is the row's maximum, found here unless `known` (attention's
// backward passes the logsumexp, which turns the same pass into the probabilities themselves).
inline float exp_row(float* s, int64_t n, int64_t L, float& m, bool known) {
  if (!known) {
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + j));
    m = hmax(m8);
    for (; j < n; ++j) m = std::max(m, s[j]);
  }
  const __m256 mv = _mm256_set1_ps(m);
  __m256 s8 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
    _mm256_storeu_ps(s + j, e);
    s8 = _mm256_add_ps(s8, e);
  }
  float sum = hsum(s8);
  for (; j < n; ++j) sum += (s[j] = std::exp(s[j] - m));
  std::fill(s + n, s + L, 0.0f);
  return sum;
}

// Cross-entropy's softmax and its gradient, in place, for training's fused LM head (train/loss.py).
// Each row x of logits [n, V] becomes scale * (softmax(x) - onehot(target)); nll[r] is
// logsumexp(x) - x[target]. A row whose target is ignore_index becomes 0 with nll 0. One exp per
// logit, and the row (128 KB at V = 32000) stays in L2 across the three passes, so DRAM sees one
// read and one write where log_softmax, exp_ and the one-hot update made five passes.
at::Tensor softmax_xent_(at::Tensor logits, const at::Tensor& targets, int64_t ignore_index, double scale) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.is_contiguous() &&
                  logits.dim() == 2 && logits.size(1) > 0,
              "slm_cpu.softmax_xent_: logits must be contiguous fp32 [n, V]");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == logits.size(0),
              "slm_cpu.softmax_xent_: targets must be int64 [n]");
  const int64_t n = logits.size(0), V = logits.size(1);
  const at::Tensor tc = targets.contiguous();
  const int64_t* tp = tc.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r)
    TORCH_CHECK(tp[r] == ignore_index || (tp[r] >= 0 && tp[r] < V), "slm_cpu.softmax_xent_: target ", tp[r],
                " out of range for ", V, " classes");
  auto nll = at::empty({n}, logits.options());
  float* np = nll.mutable_data_ptr<float>();
  float* xp = logits.mutable_data_ptr<float>();
  const float s = static_cast<float>(scale);
  at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
    FlushDenormals flush;
    for (int64_t r = r0; r < r1; ++r) {
      float* x = xp + r * V;
      const int64_t t = tp[r];
      if (t == ignore_index) {
        std::memset(x, 0, V * sizeof(float));
        np[r] = 0.0f;
        continue;
      }
      const float xt = x[t];
      float mx;
      const float sum = exp_row(x, V, V, mx, false);
      const __m256 k8 = _mm256_set1_ps(s / sum);
      int64_t j = 0;
      for (; j + 8 <= V; j += 8) _mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), k8));
      for (; j < V; ++j) x[j] *= s / sum;
      x[t] -= s;
      np[r] = std::log(sum) + mx - xt;
    }
  });
  return nll;
}

// Causal self-attention for training, forward and backward, as FlashAttention computes it: the
// forward keeps only each row's logsumexp, the backward recomputes the probabilities from it. Per
// block of BM query rows, the scores against the keys up to the block's last row are one product
// (keys after it are masked for every row of the block, so they are not computed), the softmax is
// one pass in L2, and the output is a second product; the products go to the BLAS that ATen links
// (sgemm_). PyTorch's CPU flash kernel does the same work with online-softmax rescaling and more
// passes: at the stories15M shape ([8 x 256] tokens, 6 heads of 48) it takes ~22 ms a layer forward
// and backward, this ~15 (benchmarks/cpu_train_kernels.py).
// Row-major C [M, N] = alpha op(A) op(B) + beta C (op: transposed when ta/tb), through the
// column-major BLAS as C^T = op(B)^T op(A)^T.
inline void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                    const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const char a = tb ? 'T' : 'N', b = ta ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  sgemm_(&a, &b, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
}

constexpr int64_t ATT_BM = 64;  // query rows a block (32 and 128 measured the same at the stories15M shape)

// A [B, T, heads, D] tensor in any strides with unit stride over D; rows of one head are st apart.
struct HeadRows {
  float* p;
  int64_t sb, st, sh;
  explicit HeadRows(const at::Tensor& x)
      : p(const_cast<float*>(x.const_data_ptr<float>())), sb(x.stride(0)), st(x.stride(1)), sh(x.stride(2)) {}
  float* at(int64_t b, int64_t t, int64_t h) const { return p + b * sb + t * st + h * sh; }
};

void check_attn(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const auto* x : {&q, &k, &v})
    TORCH_CHECK(x->scalar_type() == at::kFloat && x->dim() == 4 && x->stride(3) == 1,
                "slm_cpu.attn_train: q, k, v must be fp32 [B, T, heads, D] with unit stride over D");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3) &&
              q.size(2) % k.size(2) == 0, "slm_cpu.attn_train: k and v [B, T, Hkv, D] with Hkv dividing q's heads");
}

// q [B, T, H, D], k and v [B, T, Hkv, D] (grouped-query when Hkv < H) -> o [B, T, H, D] (contiguous,
// so the output projection reads it as [B, T, H D]) and the logsumexp of each row [B, H, T].
std::tuple<at::Tensor, at::Tensor> attn_train(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  check_attn(q, k, v);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), g = H / k.size(2);
  auto o = at::empty({B, T, H, D}, q.options());
  auto lse = at::empty({B, H, T}, q.options());
  const HeadRows Q(q), K(k), V(v), O(o);
  float* lp = lse.mutable_data_ptr<float>();
  const int64_t nb = (T + ATT_BM - 1) / ATT_BM;
  at::parallel_for(0, B * H * nb, 1, [&](int64_t i0, int64_t i1) {
    FlushDenormals flush;
    std::vector<float> S(ATT_BM * T), inv(ATT_BM);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (H * nb), h = i / nb % H, r0 = i % nb * ATT_BM, M = std::min(ATT_BM, T - r0), L = r0 + M;
      gemm_rm(false, true, M, L, D, scale, Q.at(b, r0, h), Q.st, K.at(b, 0, h / g), K.st, 0.0f, S.data(), L);
      float* lr = lp + (b * H + h) * T + r0;
      for (int64_t r = 0; r < M; ++r) {
        float m;
        const float sum = exp_row(S.data() + r * L, r0 + r + 1, L, m, false);
        lr[r] = m + std::log(sum);
        inv[r] = 1.0f / sum;
      }
      gemm_rm(false, false, M, D, L, 1.0f, S.data(), L, V.at(b, 0, h / g), V.st, 0.0f, O.at(b, r0, h), O.st);
      for (int64_t r = 0; r < M; ++r) {
        float* y = O.at(b, r0 + r, h);
        for (int64_t d = 0; d < D; ++d) y[d] *= inv[r];
      }
    }
  });
  return {o, lse};
}

// The backward, from the forward's o and logsumexp and do [B, T, H, D] -> dq, dk, dv. Per block:
// P = exp(scale Q K^T - lse); dV += P^T dO; dS = P (dO V^T - rowsum(dO o)); dQ = scale dS K;
// dK += scale dS^T Q. Threads take (batch, kv head) pairs, so each owns its dK and dV rows.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_train_backward(const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse, const at::Tensor& dout, double scale) {
  check_attn(q, k, v);
  TORCH_CHECK(o.sizes() == q.sizes() && dout.sizes() == q.sizes() && o.stride(3) == 1 && dout.stride(3) == 1 &&
              dout.scalar_type() == at::kFloat && lse.is_contiguous(), "slm_cpu.attn_train_backward: o, do like q");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), Hkv = k.size(2), g = H / Hkv;
  auto dq = at::empty({B, T, H, D}, q.options());
  auto dk = at::zeros({B, T, Hkv, D}, q.options());
  auto dv = at::zeros({B, T, Hkv, D}, q.options());
  const HeadRows Q(q), K(k), V(v), O(o), dO(dout), dQ(dq), dK(dk), dV(dv);
  const float* lp = lse.const_data_ptr<float>();
  const int64_t nb = (T + ATT_BM - 1) / ATT_BM;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
    FlushDenormals flush;
    std::vector<float> P(ATT_BM * T), dS(ATT_BM * T);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hkv, hk = i % Hkv;
      for (int64_t h = hk * g; h < (hk + 1) * g; ++h) {
        for (int64_t r0 = 0; r0 < T; r0 += ATT_BM) {
          const int64_t M = std::min(ATT_BM, T - r0), L = r0 + M;
          const float* lr = lp + (b * H + h) * T + r0;
          gemm_rm(false, true, M, L, D, scale, Q.at(b, r0, h), Q.st, K.at(b, 0, hk), K.st, 0.0f, P.data(), L);
          for (int64_t r = 0; r < M; ++r) {
            float m = lr[r];
            exp_row(P.data() + r * L, r0 + r + 1, L, m, true);
          }
          gemm_rm(true, false, L, D, M, 1.0f, P.data(), L, dO.at(b, r0, h), dO.st, 1.0f, dV.at(b, 0, hk), dV.st);
          gemm_rm(false, true, M, L, D, 1.0f, dO.at(b, r0, h), dO.st, V.at(b, 0, hk), V.st, 0.0f, dS.data(), L);
          for (int64_t r = 0; r < M; ++r) {
            const __m256 delta = _mm256_set1_ps(dot_f32(dO.at(b, r0 + r, h), O.at(b, r0 + r, h), D));
            const float* p = P.data() + r * L;
            float* ds = dS.data() + r * L;
            int64_t j = 0;  // past the causal end p is 0, and so is ds
            for (; j + 8 <= L; j += 8)
              _mm256_storeu_ps(ds + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), _mm256_sub_ps(_mm256_loadu_ps(ds + j), delta)));
            for (; j < L; ++j) ds[j] = p[j] * (ds[j] - _mm256_cvtss_f32(delta));
          }
          gemm_rm(false, false, M, D, L, scale, dS.data(), L, K.at(b, 0, hk), K.st, 0.0f, dQ.at(b, r0, h), dQ.st);
          gemm_rm(true, false, L, D, M, scale, dS.data(), L, Q.at(b, r0, h), Q.st, 1.0f, dK.at(b, 0, hk), dK.st);
        }
      }
    }
  });
  return {dq, dk, dv};
}

}  // namespace slm::cpu
