// Sampling's draw for rows with a temperature and top-p (no top-k), as runtime/sampling.py's _pick
// computes it: probabilities exp((x - max) / T) (the most likely token's 1), the smallest set of the
// most likely whose share of the row's sum reaches top_p (every token where top_p is 1), and the
// first of them, in the vocabulary's order, whose cumulative weight exceeds u times their total.
// _pick's dozen ATen ops (max, exp, topk, sort, cumsum, gather, searchsorted) took ~2 ms for 16
// rows of SmolLM2's 49,152 logits and ~0.4 ms for one; here a row is two passes over its logits
// and a sort of the few hundred tokens near the top, and the rows are split over the threads.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "ops.h"
#include "simd.h"

namespace slm::cpu {

// A nucleus almost always lies among the tokens at least this likely against the most likely one:
// sorting those alone gives the sums the whole row's sort would give (every other token has at
// least their share before it, and is dropped), and a row whose nucleus reaches further sorts all.
constexpr float NUCLEUS_FLOOR = 1e-4f;
// exp8 holds its argument at this or above (simd.h); below it, a probability is taken as 0.
constexpr float EXP8_LOWEST = -87.3f;

// The index of the first weight whose cumulative sum exceeds u times the total (cumulative sums
// in double, each read as a float, as torch.cumsum gives them on the CPU; u times the total kept
// below the total, as _draw keeps it).
template <class Weight>
static int64_t draw(int64_t n, Weight weight, float u) {
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) acc += weight(i);
  const float total = float(acc);
  const float r = std::min(u * total, std::nextafter(total, 0.0f));
  acc = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    acc += weight(i);
    if (float(acc) > r) return i;
  }
  return n - 1;
}

static int64_t sample_row(const float* x, int64_t V, float temperature, float top_p, float u, float* p) {
  __m256 mx8 = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) mx8 = _mm256_max_ps(mx8, _mm256_loadu_ps(x + i));
  float mx = hmax(mx8);
  for (; i < V; ++i) mx = std::max(mx, x[i]);
  // a row without a finite logit (every token masked, or NaN): argmax_rows's choice, as greedy decoding's
  if (!(mx > -INFINITY) || !std::isfinite(mx)) {
    for (i = 0; i < V; ++i)
      if (std::isnan(x[i]) || x[i] == mx) return i;
  }
  const float inv = 1.0f / temperature;
  const __m256 m8 = _mm256_set1_ps(mx), inv8 = _mm256_set1_ps(inv), low = _mm256_set1_ps(EXP8_LOWEST);
  __m256 sum8 = _mm256_setzero_ps();
  for (i = 0; i + 8 <= V; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    // below exp8's range (a token at -inf: a logit bias, a grammar's mask) 0, as exp gives, not
    // exp8's smallest value
    const __m256 a = _mm256_mul_ps(_mm256_sub_ps(v, m8), inv8);
    const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(a, low, _CMP_LT_OQ), exp8(a));
    _mm256_storeu_ps(p + i, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  float sum = hsum(sum8);
  for (; i < V; ++i) {
    const float a = (x[i] - mx) * inv;
    sum += (p[i] = a < EXP8_LOWEST ? 0.0f : std::exp(a));
  }
  if (!(top_p < 1.0f)) return draw(V, [p](int64_t j) { return p[j]; }, u);
  // the candidates, most likely first (ties by index: the sort is then the same every time)
  std::vector<std::pair<float, int64_t>> top;
  double near = 0.0;
  for (int64_t j = 0; j < V; ++j)
    if (p[j] >= NUCLEUS_FLOOR) top.emplace_back(p[j], j), near += p[j];
  if (float(near) / sum < top_p) {
    top.clear();
    for (int64_t j = 0; j < V; ++j) top.emplace_back(p[j], j);
  }
  std::sort(top.begin(), top.end(), [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
  // keep a token while the share of those before it is below top_p
  std::vector<std::pair<int64_t, float>> kept;  // (index, share)
  double acc = 0.0;
  for (const auto& [v, j] : top) {
    const float share = v / sum;
    acc += share;
    if (!(float(acc) - share < top_p)) break;
    kept.emplace_back(j, share);
  }
  if (top.empty()) return 0;  // no probability compares (NaN logits): as good a token as any
  if (kept.empty()) kept.emplace_back(top[0].second, top[0].first / sum);  // a top_p of 0 in fp32: the most likely
  std::sort(kept.begin(), kept.end());
  return kept[draw(int64_t(kept.size()), [&kept](int64_t j) { return kept[j].second; }, u)].first;
}

// One token for each row of x [B, V] fp32, with its temperature (> 0), top_p and uniform number u
// ([B] fp32 each).
at::Tensor sample_top_p(const at::Tensor& x, const at::Tensor& temperature, const at::Tensor& top_p, const at::Tensor& u) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 && x.size(1) > 0,
              "slm_cpu.sample_top_p: x must be contiguous fp32 [B, V]");
  const int64_t B = x.size(0), V = x.size(1);
  for (const auto* t : {&temperature, &top_p, &u})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 1 && t->size(0) == B,
                "slm_cpu.sample_top_p: temperature, top_p and u must be contiguous fp32 [B]");
  auto out = at::empty({B}, x.options().dtype(at::kLong));
  int64_t* op = out.mutable_data_ptr<int64_t>();
  const float *xp = x.const_data_ptr<float>(), *tp = temperature.const_data_ptr<float>();
  const float *pp = top_p.const_data_ptr<float>(), *up = u.const_data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(tp[b] > 0.0f && std::isfinite(1.0f / tp[b]), "slm_cpu.sample_top_p: a temperature of 0 or below fp32's smallest");
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> p(V);
    for (int64_t b = b0; b < b1; ++b) {
      op[b] = sample_row(xp + b * V, V, tp[b], pp[b], up[b], p.data());
    }
  });
  return out;
}

}  // namespace slm::cpu
