// CPU kernels of the token dispatch ops:
//   dispatch_metadata: stable counting sort of the (token, slot) pairs p = t*k + j by expert,
//                      optionally padded per expert to block_size rows;
//   dispatch:          out[i] = w[p] * x[p / k] for p = sorted_pairs[i] (zero rows where p = -1);
//   combine:           out[t] = sum_j w[t,j] * y[inverse[t,j]], j in order, accumulated in fp32/fp64;
//   pair_dot:          out[t,j] = <a[t], b[inverse[t,j]]> (the gate-weight gradient).
// Ids outside [0, E) and indices outside the buffers are skipped, never dereferenced.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../moelora.h"

namespace moelora {
namespace {

template <typename id_t>
MetaOut metadata_cpu_typed(const at::Tensor& ids_t, int64_t E, int64_t bs) {
  const int64_t T = ids_t.size(0), k = ids_t.size(1), N = T * k;
  const id_t* ids = ids_t.data_ptr<id_t>();
  const auto lopts = ids_t.options().dtype(at::kLong);
  at::Tensor counts = at::zeros({E}, lopts);
  at::Tensor offsets = at::empty({E + 1}, lopts);
  at::Tensor sorted_pairs = at::full({N}, -1, lopts);
  at::Tensor inverse = at::empty({T, k}, lopts);
  int64_t* cnt = counts.data_ptr<int64_t>();
  int64_t* off = offsets.data_ptr<int64_t>();
  for (int64_t p = 0; p < N; ++p) {
    const int64_t e = static_cast<int64_t>(ids[p]);
    if (e >= 0 && e < E) cnt[e] += 1;
  }
  off[0] = 0;
  for (int64_t e = 0; e < E; ++e) off[e + 1] = off[e] + cnt[e];

  const bool padded = bs > 0;
  const int64_t max_padded = padded ? padded_length(N, E, bs) : 0;
  at::Tensor padded_offsets = at::empty({padded ? E + 1 : 0}, lopts);
  at::Tensor sorted_pairs_padded = at::full({max_padded}, -1, lopts);
  at::Tensor inverse_padded = at::empty({padded ? T : 0, padded ? k : 0}, lopts);
  at::Tensor block_expert = at::full({padded ? max_padded / bs : 0}, -1, ids_t.options().dtype(at::kInt));
  int64_t* poff = padded_offsets.data_ptr<int64_t>();
  if (padded) {
    poff[0] = 0;
    for (int64_t e = 0; e < E; ++e) poff[e + 1] = poff[e] + (cnt[e] + bs - 1) / bs * bs;
    int32_t* be = block_expert.data_ptr<int32_t>();
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t b = poff[e] / bs; b < poff[e + 1] / bs; ++b) be[b] = static_cast<int32_t>(e);
    }
  }

  std::vector<int64_t> next(off, off + E);  // next free sorted position per expert
  int64_t* sp = sorted_pairs.data_ptr<int64_t>();
  int64_t* inv = inverse.data_ptr<int64_t>();
  int64_t* spp = sorted_pairs_padded.data_ptr<int64_t>();
  int64_t* invp = inverse_padded.data_ptr<int64_t>();
  for (int64_t p = 0; p < N; ++p) {
    const int64_t e = static_cast<int64_t>(ids[p]);
    if (e < 0 || e >= E) {
      inv[p] = -1;
      if (padded) invp[p] = -1;
      continue;
    }
    const int64_t pos = next[e]++;
    sp[pos] = p;
    inv[p] = pos;
    if (padded) {
      const int64_t ppos = poff[e] + (pos - off[e]);
      spp[ppos] = p;
      invp[p] = ppos;
    }
  }
  return {counts, offsets, sorted_pairs, inverse, padded_offsets, sorted_pairs_padded, inverse_padded,
          block_expert};
}

MetaOut dispatch_metadata_cpu(const at::Tensor& topk_ids, int64_t num_experts, int64_t block_size) {
  check_meta_args(topk_ids, num_experts, block_size);
  MOELORA_CHECK_CPU(topk_ids);  // the ids are read on the host below
  const at::Tensor ids = topk_ids.contiguous();
  if (ids.scalar_type() == at::kInt) return metadata_cpu_typed<int32_t>(ids, num_experts, block_size);
  return metadata_cpu_typed<int64_t>(ids, num_experts, block_size);
}

// Calls f(scalar_t{}) with the data type of t (fp32, fp16, bf16, fp64).
template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: f(double{});
  }
}

at::Tensor dispatch_cpu(const at::Tensor& x_in, const at::Tensor& sp_in, const at::Tensor& inv_in,
                        const c10::optional<at::Tensor>& w_in) {
  const int64_t N = check_gather_args("dispatch", "x", x_in, sp_in, inv_in, w_in);
  MOELORA_CHECK_CPU_AS(x_in, "x");  // check_gather_args put every other tensor on x's device
  TORCH_CHECK_VALUE(x_in.size(0) == inv_in.size(0), "dispatch: x has ", x_in.size(0),
                    " rows but inverse has ", inv_in.size(0), " tokens");
  const at::Tensor x = x_in.contiguous(), sp = sp_in.contiguous();
  const int64_t P = sp.size(0), d = x.size(1), k = inv_in.size(1);
  const auto acc = acc_dtype(x.scalar_type());
  at::Tensor w;
  if (w_in.has_value()) w = w_in->to(acc).contiguous();
  at::Tensor out = at::empty({P, d}, x.options());
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const scalar_t* xs = x.data_ptr<scalar_t>();
    const int64_t* s = sp.data_ptr<int64_t>();
    const acc_t* ws = w.defined() ? w.data_ptr<acc_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, P, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t p = s[r];
        scalar_t* orow = o + r * d;
        if (p < 0 || p >= N) {
          std::fill(orow, orow + d, scalar_t(0));
          continue;
        }
        const scalar_t* xrow = xs + (p / k) * d;
        if (ws == nullptr) {
          std::copy(xrow, xrow + d, orow);
        } else {
          const acc_t g = ws[p];
          for (int64_t c = 0; c < d; ++c) orow[c] = static_cast<scalar_t>(g * static_cast<acc_t>(xrow[c]));
        }
      }
    });
  });
  return out;
}

at::Tensor combine_cpu(const at::Tensor& y_in, const at::Tensor& sp_in, const at::Tensor& inv_in,
                       const c10::optional<at::Tensor>& w_in) {
  check_gather_args("combine", "y_sorted", y_in, sp_in, inv_in, w_in);
  MOELORA_CHECK_CPU_AS(y_in, "y_sorted");
  TORCH_CHECK_VALUE(y_in.size(0) == sp_in.size(0), "combine: y_sorted has ", y_in.size(0),
                    " rows but sorted_pairs has ", sp_in.size(0), " entries");
  const at::Tensor y = y_in.contiguous(), inv = inv_in.contiguous();
  const int64_t P = y.size(0), d = y.size(1), T = inv.size(0), k = inv.size(1);
  const auto acc = acc_dtype(y.scalar_type());
  at::Tensor w;
  if (w_in.has_value()) w = w_in->to(acc).contiguous();
  at::Tensor out = at::empty({T, d}, y.options());
  dispatch_float(y.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const scalar_t* ys = y.data_ptr<scalar_t>();
    const int64_t* iv = inv.data_ptr<int64_t>();
    const acc_t* ws = w.defined() ? w.data_ptr<acc_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> a(d);
      for (int64_t t = t0; t < t1; ++t) {
        std::fill(a.begin(), a.end(), acc_t(0));
        for (int64_t j = 0; j < k; ++j) {
          const int64_t pos = iv[t * k + j];
          if (pos < 0 || pos >= P) continue;
          const scalar_t* yrow = ys + pos * d;
          if (ws == nullptr) {
            for (int64_t c = 0; c < d; ++c) a[c] += static_cast<acc_t>(yrow[c]);
          } else {
            const acc_t g = ws[t * k + j];
            for (int64_t c = 0; c < d; ++c) a[c] += g * static_cast<acc_t>(yrow[c]);
          }
        }
        for (int64_t c = 0; c < d; ++c) o[t * d + c] = static_cast<scalar_t>(a[c]);
      }
    });
  });
  return out;
}

at::Tensor pair_dot_cpu(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& sp_in,
                        const at::Tensor& inv_in) {
  check_gather_args("pair_dot", "b_sorted", b_in, sp_in, inv_in, c10::nullopt);
  MOELORA_CHECK_CPU_AS(b_in, "b_sorted");
  TORCH_CHECK_VALUE(b_in.size(0) == sp_in.size(0), "pair_dot: b_sorted has ", b_in.size(0),
                    " rows but sorted_pairs has ", sp_in.size(0), " entries");
  MOELORA_CHECK_DEFINED_AS(a_in, "pair_dot: a");
  TORCH_CHECK_VALUE(a_in.device() == b_in.device(), "pair_dot: a must be on b_sorted's device ", b_in.device(),
                    ", got ", a_in.device());
  MOELORA_CHECK_DIM_AS(a_in, "pair_dot: a", 2);
  TORCH_CHECK_TYPE(a_in.scalar_type() == b_in.scalar_type(), "pair_dot: a (", a_in.scalar_type(),
                   ") and b_sorted (", b_in.scalar_type(), ") must share a dtype");
  TORCH_CHECK_VALUE(a_in.size(0) == inv_in.size(0) && a_in.size(1) == b_in.size(1),
                    "pair_dot: a must have shape [T, d] = [", inv_in.size(0), ", ", b_in.size(1), "], got ",
                    a_in.sizes());
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), inv = inv_in.contiguous();
  const int64_t P = b.size(0), d = b.size(1), T = inv.size(0), k = inv.size(1);
  at::Tensor out = at::empty({T, k}, a.options().dtype(acc_dtype(a.scalar_type())));
  dispatch_float(a.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const scalar_t* as = a.data_ptr<scalar_t>();
    const scalar_t* bs = b.data_ptr<scalar_t>();
    const int64_t* iv = inv.data_ptr<int64_t>();
    acc_t* o = out.data_ptr<acc_t>();
    at::parallel_for(0, T * k, 64, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t pos = iv[q];
        acc_t s = 0;
        if (pos >= 0 && pos < P) {
          const scalar_t* arow = as + (q / k) * d;
          const scalar_t* brow = bs + pos * d;
          for (int64_t c = 0; c < d; ++c) s += static_cast<acc_t>(arow[c]) * static_cast<acc_t>(brow[c]);
        }
        o[q] = s;
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace moelora

TORCH_LIBRARY_IMPL(moelora, CPU, m) {
  m.impl("dispatch_metadata", &moelora::dispatch_metadata_cpu);
  m.impl("dispatch", &moelora::dispatch_cpu);
  m.impl("combine", &moelora::combine_cpu);
  m.impl("pair_dot", &moelora::pair_dot_cpu);
}
