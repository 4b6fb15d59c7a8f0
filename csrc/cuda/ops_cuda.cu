// CUDA bindings of moelora._C (TORCH_LIBRARY_IMPL(moelora, CUDA)): argument checks, output
// allocation, dtype switch and launches of the torch-free kernels in ../kernels/*.cuh on the
// current stream. No host synchronisation: grids depend on shapes only; the small prefix sums
// between metadata passes run as ATen ops on the same stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/floor_divide.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../kernels/dispatch.cuh"
#include "../kernels/router_topk.cuh"
#include "../moelora.h"

namespace moelora {
namespace {

namespace K = kernels;

#define MOELORA_CHECK_CUDA_AS(x, name) TORCH_CHECK_VALUE((x).is_cuda(), name " must be a CUDA tensor, got ", (x).device())
#define MOELORA_CHECK_CUDA(x) MOELORA_CHECK_CUDA_AS(x, #x)

// Calls f(T{}) with the CUDA element type of t (float, __half, __nv_bfloat16, double).
template <typename F>
void switch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    case at::kDouble: f(double{}); break;
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", t);
  }
}

template <typename T>
const T* cptr(const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); }
template <typename T>
T* mptr(at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

RouterOut router_topk_cuda(const at::Tensor& logits_in, int64_t top_k, int64_t mode, bool renormalize) {
  check_router_args(logits_in, top_k, mode);
  MOELORA_CHECK_CUDA_AS(logits_in, "logits");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto acc = acc_dtype(logits.scalar_type());
  const auto opts = logits.options();
  at::Tensor weights = at::empty({T, top_k}, opts.dtype(acc));
  at::Tensor ids = at::empty({T, top_k}, opts.dtype(at::kInt));
  at::Tensor counts = at::empty({E}, opts.dtype(at::kLong));
  at::Tensor prob_sums = at::empty({E}, opts.dtype(acc));
  at::Tensor lse = at::empty({T}, opts.dtype(acc));
  const int64_t blocks = K::router_num_blocks(T, E);
  at::Tensor part_sum = at::empty({blocks, E}, opts.dtype(acc));
  at::Tensor part_cnt = at::empty({blocks, E}, opts.dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch_float(logits.scalar_type(), [&](auto tag) {
    using T_ = decltype(tag);
    using A = K::acc_t<T_>;
    const cudaError_t err = K::launch_router_topk<T_, A>(
        cptr<T_>(logits), T, static_cast<int>(E), static_cast<int>(top_k), static_cast<int>(mode), renormalize,
        mptr<A>(weights), mptr<int32_t>(ids), mptr<A>(lse), mptr<A>(part_sum), mptr<int32_t>(part_cnt),
        mptr<A>(prob_sums), mptr<int64_t>(counts), stream);
    C10_CUDA_CHECK(err);
  });
  return {weights, ids, counts, prob_sums, lse};
}

template <typename I>
void meta_cuda_typed(const at::Tensor& ids, int64_t E, int64_t bs, const at::Tensor& base, const at::Tensor& offsets,
                     const at::Tensor& padded_offsets, at::Tensor& sorted_pairs, at::Tensor& inverse,
                     at::Tensor& sorted_padded, at::Tensor& inverse_padded, cudaStream_t stream) {
  const bool padded = bs > 0;
  C10_CUDA_CHECK(K::launch_meta_place<I>(
      cptr<I>(ids), ids.numel(), static_cast<int>(E), cptr<int64_t>(base), cptr<int64_t>(offsets),
      padded ? cptr<int64_t>(padded_offsets) : nullptr, mptr<int64_t>(sorted_pairs), mptr<int64_t>(inverse),
      padded ? mptr<int64_t>(sorted_padded) : nullptr, padded ? mptr<int64_t>(inverse_padded) : nullptr, stream));
}

MetaOut dispatch_metadata_cuda(const at::Tensor& topk_ids, int64_t E, int64_t bs) {
  check_meta_args(topk_ids, E, bs);
  MOELORA_CHECK_CUDA(topk_ids);
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor ids = topk_ids.contiguous();
  const int64_t T = ids.size(0), k = ids.size(1), N = T * k;
  const auto lopts = ids.options().dtype(at::kLong);
  const int64_t chunks = K::ceil_div(N, K::meta_chunk_size(E));

  // Pass 1: per-chunk histograms, expert-major.
  at::Tensor hist = at::empty({E, chunks}, ids.options().dtype(at::kInt));
  if (ids.scalar_type() == at::kInt) {
    C10_CUDA_CHECK(K::launch_meta_histogram<int32_t>(cptr<int32_t>(ids), N, static_cast<int>(E),
                                                     mptr<int32_t>(hist), stream));
  } else {
    C10_CUDA_CHECK(K::launch_meta_histogram<int64_t>(cptr<int64_t>(ids), N, static_cast<int>(E),
                                                     mptr<int32_t>(hist), stream));
  }
  // Prefix sums (integer, hence exact and order-independent).
  at::Tensor counts = at::sum(hist, {1}, false, at::kLong);
  at::Tensor flat = hist.reshape({-1});
  at::Tensor base = at::sub(at::cumsum(flat, 0, at::kLong), flat);
  at::Tensor offsets = at::zeros({E + 1}, lopts);
  at::Tensor offsets_tail = offsets.narrow(0, 1, E);
  at::cumsum_out(offsets_tail, counts, 0);

  const bool padded = bs > 0;
  const int64_t max_padded = padded ? padded_length(N, E, bs) : 0;
  at::Tensor padded_offsets = padded ? at::zeros({E + 1}, lopts) : at::empty({0}, lopts);
  at::Tensor block_expert = at::empty({padded ? max_padded / bs : 0}, ids.options().dtype(at::kInt));
  if (padded) {
    at::Tensor padded_counts = at::mul(at::floor_divide(at::add(counts, bs - 1), bs), bs);
    at::Tensor padded_tail = padded_offsets.narrow(0, 1, E);
    at::cumsum_out(padded_tail, padded_counts, 0);
    C10_CUDA_CHECK(K::launch_block_expert(cptr<int64_t>(padded_offsets), static_cast<int>(E), bs,
                                          block_expert.numel(), mptr<int32_t>(block_expert), stream));
  }

  // Pass 2: stable placement.
  at::Tensor sorted_pairs = at::full({N}, -1, lopts);
  at::Tensor inverse = at::empty({T, k}, lopts);
  at::Tensor sorted_padded = at::full({max_padded}, -1, lopts);
  at::Tensor inverse_padded = at::empty({padded ? T : 0, padded ? k : 0}, lopts);
  if (ids.scalar_type() == at::kInt) {
    meta_cuda_typed<int32_t>(ids, E, bs, base, offsets, padded_offsets, sorted_pairs, inverse, sorted_padded,
                             inverse_padded, stream);
  } else {
    meta_cuda_typed<int64_t>(ids, E, bs, base, offsets, padded_offsets, sorted_pairs, inverse, sorted_padded,
                             inverse_padded, stream);
  }
  return {counts, offsets, sorted_pairs, inverse, padded_offsets, sorted_padded, inverse_padded, block_expert};
}

// Plain row copy as raw bits: 16-byte vectors when rows and pointers allow, else element-sized words.
void gather_rows_raw(const at::Tensor& x, const at::Tensor& sp, int64_t N, int64_t k, at::Tensor& out,
                     cudaStream_t stream) {
  const int64_t P = out.size(0), row_bytes = x.size(1) * x.element_size();
  const unsigned grid = K::row_grid(P);
  const auto aligned16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (row_bytes % 16 == 0 && aligned16(x.data_ptr()) && aligned16(out.data_ptr())) {
    K::gather_rows_kernel<uint4><<<grid, K::kRowThreads, 0, stream>>>(
        cptr<uint4>(x), cptr<int64_t>(sp), P, N, k, row_bytes / 16, mptr<uint4>(out));
  } else if (x.element_size() == 2) {
    K::gather_rows_kernel<uint16_t><<<grid, K::kRowThreads, 0, stream>>>(
        cptr<uint16_t>(x), cptr<int64_t>(sp), P, N, k, x.size(1), mptr<uint16_t>(out));
  } else if (x.element_size() == 4) {
    K::gather_rows_kernel<uint32_t><<<grid, K::kRowThreads, 0, stream>>>(
        cptr<uint32_t>(x), cptr<int64_t>(sp), P, N, k, x.size(1), mptr<uint32_t>(out));
  } else {
    K::gather_rows_kernel<uint64_t><<<grid, K::kRowThreads, 0, stream>>>(
        cptr<uint64_t>(x), cptr<int64_t>(sp), P, N, k, x.size(1), mptr<uint64_t>(out));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor dispatch_cuda(const at::Tensor& x_in, const at::Tensor& sp_in, const at::Tensor& inv_in,
                         const c10::optional<at::Tensor>& w_in) {
  const int64_t N = check_gather_args("dispatch", "x", x_in, sp_in, inv_in, w_in);
  MOELORA_CHECK_CUDA_AS(x_in, "x");
  TORCH_CHECK_VALUE(x_in.size(0) == inv_in.size(0), "dispatch: x has ", x_in.size(0), " rows but inverse has ",
                    inv_in.size(0), " tokens");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor x = x_in.contiguous(), sp = sp_in.contiguous();
  const int64_t P = sp.size(0), d = x.size(1), k = inv_in.size(1);
  at::Tensor out = at::empty({P, d}, x.options());
  if (P == 0 || d == 0) return out;
  if (!w_in.has_value()) {
    gather_rows_raw(x, sp, N, k, out, stream);
    return out;
  }
  const at::Tensor w = w_in->to(acc_dtype(x.scalar_type())).contiguous();
  switch_float(x.scalar_type(), [&](auto tag) {
    using T_ = decltype(tag);
    K::gather_rows_weighted_kernel<T_><<<K::row_grid(P), K::kRowThreads, 0, stream>>>(
        cptr<T_>(x), cptr<int64_t>(sp), cptr<K::acc_t<T_>>(w), P, N, k, d, mptr<T_>(out));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor combine_cuda(const at::Tensor& y_in, const at::Tensor& sp_in, const at::Tensor& inv_in,
                        const c10::optional<at::Tensor>& w_in) {
  check_gather_args("combine", "y_sorted", y_in, sp_in, inv_in, w_in);
  MOELORA_CHECK_CUDA_AS(y_in, "y_sorted");
  TORCH_CHECK_VALUE(y_in.size(0) == sp_in.size(0), "combine: y_sorted has ", y_in.size(0),
                    " rows but sorted_pairs has ", sp_in.size(0), " entries");
  const c10::cuda::CUDAGuard guard(y_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor y = y_in.contiguous(), inv = inv_in.contiguous();
  const int64_t P = y.size(0), d = y.size(1), T = inv.size(0), k = inv.size(1);
  at::Tensor out = at::empty({T, d}, y.options());
  if (T == 0 || d == 0) return out;
  at::Tensor w;
  if (w_in.has_value()) w = w_in->to(acc_dtype(y.scalar_type())).contiguous();
  switch_float(y.scalar_type(), [&](auto tag) {
    using T_ = decltype(tag);
    K::combine_kernel<T_><<<K::row_grid(T), K::kRowThreads, 0, stream>>>(
        cptr<T_>(y), cptr<int64_t>(inv), w.defined() ? cptr<K::acc_t<T_>>(w) : nullptr, T, k, P, d, mptr<T_>(out));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor pair_dot_cuda(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& sp_in,
                         const at::Tensor& inv_in) {
  check_gather_args("pair_dot", "b_sorted", b_in, sp_in, inv_in, c10::nullopt);
  MOELORA_CHECK_CUDA_AS(b_in, "b_sorted");
  MOELORA_CHECK_DEFINED_AS(a_in, "pair_dot: a");
  MOELORA_CHECK_DIM_AS(a_in, "pair_dot: a", 2);
  TORCH_CHECK_VALUE(a_in.device() == b_in.device(), "pair_dot: a must be on b_sorted's device ", b_in.device(),
                    ", got ", a_in.device());
  TORCH_CHECK_TYPE(a_in.scalar_type() == b_in.scalar_type(), "pair_dot: a (", a_in.scalar_type(),
                   ") and b_sorted (", b_in.scalar_type(), ") must share a dtype");
  TORCH_CHECK_VALUE(a_in.size(0) == inv_in.size(0) && a_in.size(1) == b_in.size(1),
                    "pair_dot: a must have shape [T, d] = [", inv_in.size(0), ", ", b_in.size(1), "], got ",
                    a_in.sizes());
  TORCH_CHECK_VALUE(b_in.size(0) == sp_in.size(0), "pair_dot: b_sorted has ", b_in.size(0),
                    " rows but sorted_pairs has ", sp_in.size(0), " entries");
  const c10::cuda::CUDAGuard guard(b_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), inv = inv_in.contiguous();
  const int64_t P = b.size(0), d = b.size(1), T = inv.size(0), k = inv.size(1), N = T * k;
  at::Tensor out = at::empty({T, k}, a.options().dtype(acc_dtype(a.scalar_type())));
  if (N == 0) return out;
  constexpr int kWarps = 8;
  switch_float(a.scalar_type(), [&](auto tag) {
    using T_ = decltype(tag);
    K::pair_dot_kernel<T_><<<K::row_grid(K::ceil_div(N, kWarps)), kWarps * K::kWarpSize, 0, stream>>>(
        cptr<T_>(a), cptr<T_>(b), cptr<int64_t>(inv), N, k, P, d, mptr<K::acc_t<T_>>(out));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace moelora

TORCH_LIBRARY_IMPL(moelora, CUDA, m) {
  m.impl("router_topk", &moelora::router_topk_cuda);
  m.impl("dispatch_metadata", &moelora::dispatch_metadata_cuda);
  m.impl("dispatch", &moelora::dispatch_cuda);
  m.impl("combine", &moelora::combine_cuda);
  m.impl("pair_dot", &moelora::pair_dot_cuda);
}
