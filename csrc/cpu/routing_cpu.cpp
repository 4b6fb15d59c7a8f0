// CPU kernel of moelora::router_topk: per row, softmax statistics (max, logsumexp, probs),
// top-k selection on the logits (ties to the lower index, NaN read as -inf) and the gate
// weights; per expert, assignment counts and probability sums reduced in a fixed order.
// A row with +inf logits gets the softmax's limit: probability split equally over its +inf
// entries (0 elsewhere) and lse = +inf.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "../moelora.h"

namespace moelora {
namespace {

// Rows per partial-sum chunk: fixed (not thread-count dependent) so sums are reproducible.
constexpr int64_t kRowsPerChunk = 256;

template <typename scalar_t, typename acc_t>
void router_rows(const scalar_t* logits, int64_t row_begin, int64_t row_end, int64_t E, int64_t k,
                 int64_t mode, bool renormalize, acc_t* weights, int32_t* ids, acc_t* lse,
                 acc_t* psum, int64_t* cnt) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t pos_inf = std::numeric_limits<acc_t>::infinity();
  std::vector<acc_t> v(E);
  std::vector<int32_t> order(E);
  for (int64_t t = row_begin; t < row_end; ++t) {
    const scalar_t* row = logits + t * E;
    acc_t m = neg_inf;
    for (int64_t e = 0; e < E; ++e) {
      acc_t x = static_cast<acc_t>(row[e]);
      if (std::isnan(x)) x = neg_inf;
      v[e] = x;
      m = std::max(m, x);
    }
    const bool masked = (m == neg_inf);  // every logit -inf or NaN
    // exp(v - m), and its limit for a row with +inf logits: 1 on those, 0 elsewhere.
    const auto shifted_exp = [&](acc_t x) {
      return m == pos_inf ? acc_t(x == pos_inf ? 1 : 0) : std::exp(x - m);
    };
    acc_t s = 0;
    if (!masked) {
      for (int64_t e = 0; e < E; ++e) s += shifted_exp(v[e]);
    }
    lse[t] = (masked || m == pos_inf) ? m : m + std::log(s);
    for (int64_t e = 0; e < E; ++e) psum[e] += masked ? acc_t(0) : shifted_exp(v[e]) / s;

    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
      return v[a] > v[b] || (v[a] == v[b] && a < b);
    });
    const acc_t top = v[order[0]];
    acc_t total = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = order[j];
      acc_t w;
      if (mode == kSoftmaxTopk) {
        w = masked ? acc_t(0) : shifted_exp(v[e]) / s;
      } else if (top == pos_inf) {
        w = v[e] == pos_inf ? acc_t(1) : acc_t(0);
      } else {
        w = (top == neg_inf) ? acc_t(0) : std::exp(v[e] - top);
      }
      total += w;
      weights[t * k + j] = w;
      ids[t * k + j] = e;
      cnt[e] += 1;
    }
    if (renormalize || mode == kTopkSoftmax) {
      for (int64_t j = 0; j < k; ++j) {
        weights[t * k + j] = total > 0 ? weights[t * k + j] / total : acc_t(0);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void router_topk_cpu_typed(const at::Tensor& logits, int64_t k, int64_t mode, bool renormalize,
                           at::Tensor& weights, at::Tensor& ids, at::Tensor& counts,
                           at::Tensor& prob_sums, at::Tensor& lse) {
  const int64_t T = logits.size(0), E = logits.size(1);
  const int64_t chunks = (T + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<acc_t> part_sum(chunks * E, acc_t(0));
  std::vector<int64_t> part_cnt(chunks * E, 0);
  const scalar_t* x = logits.data_ptr<scalar_t>();
  acc_t* w = weights.data_ptr<acc_t>();
  int32_t* id = ids.data_ptr<int32_t>();
  acc_t* l = lse.data_ptr<acc_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * kRowsPerChunk, r1 = std::min(T, r0 + kRowsPerChunk);
      router_rows<scalar_t, acc_t>(x, r0, r1, E, k, mode, renormalize, w, id, l,
                                   part_sum.data() + c * E, part_cnt.data() + c * E);
    }
  });
  acc_t* ps = prob_sums.data_ptr<acc_t>();
  int64_t* cn = counts.data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e) {
    acc_t s = 0;
    int64_t n = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      s += part_sum[c * E + e];
      n += part_cnt[c * E + e];
    }
    ps[e] = s;
    cn[e] = n;
  }
}

RouterOut router_topk_cpu(const at::Tensor& logits_in, int64_t top_k, int64_t mode, bool renormalize) {
  check_router_args(logits_in, top_k, mode);
  MOELORA_CHECK_CPU_AS(logits_in, "logits");
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto acc = acc_dtype(logits.scalar_type());
  const auto opts = logits.options();
  at::Tensor weights = at::empty({T, top_k}, opts.dtype(acc));
  at::Tensor ids = at::empty({T, top_k}, opts.dtype(at::kInt));
  at::Tensor counts = at::empty({E}, opts.dtype(at::kLong));
  at::Tensor prob_sums = at::empty({E}, opts.dtype(acc));
  at::Tensor lse = at::empty({T}, opts.dtype(acc));
  switch (logits.scalar_type()) {
    case at::kFloat:
      router_topk_cpu_typed<float, float>(logits, top_k, mode, renormalize, weights, ids, counts, prob_sums, lse);
      break;
    case at::kHalf:
      router_topk_cpu_typed<at::Half, float>(logits, top_k, mode, renormalize, weights, ids, counts, prob_sums, lse);
      break;
    case at::kBFloat16:
      router_topk_cpu_typed<at::BFloat16, float>(logits, top_k, mode, renormalize, weights, ids, counts, prob_sums, lse);
      break;
    default:
      router_topk_cpu_typed<double, double>(logits, top_k, mode, renormalize, weights, ids, counts, prob_sums, lse);
  }
  return {weights, ids, counts, prob_sums, lse};
}

}  // namespace
}  // namespace moelora

TORCH_LIBRARY_IMPL(moelora, CPU, m) { m.impl("router_topk", &moelora::router_topk_cpu); }
