// Shared declarations of moelora._C: limits, op entry points (CPU and CUDA) and the
// flash-attention-style argument checks used by both.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <tuple>

namespace moelora {

// Largest expert count the routing and dispatch kernels accept (CPU and CUDA).
constexpr int64_t kMaxExperts = 4096;

// Router modes (the int argument of moelora::router_topk).
enum RouterMode : int64_t { kSoftmaxTopk = 0, kTopkSoftmax = 1 };

#define MOELORA_CHECK_DEVICE(x, dev) \
  TORCH_CHECK_VALUE((x).device() == (dev), #x " must be on ", (dev), ", got ", (x).device())
#define MOELORA_CHECK_SHAPE(x, ...)                                         \
  TORCH_CHECK_VALUE((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ \
                    "), got ", (x).sizes())
// CPU kernels read tensor data on the host: a device tensor there would be a host segfault.
#define MOELORA_CHECK_CPU(x) \
  TORCH_CHECK_VALUE((x).device().is_cpu(), #x " must be a CPU tensor here, got ", (x).device())
#define MOELORA_CHECK_DIM(x, d) \
  TORCH_CHECK_VALUE((x).dim() == (d), #x " must be ", (d), "-D, got shape ", (x).sizes())
#define MOELORA_CHECK_INDEX(x) \
  TORCH_CHECK_TYPE((x).scalar_type() == at::kLong, #x " must be int64, got ", (x).scalar_type())
#define MOELORA_CHECK_FLOAT(x)                                                                  \
  TORCH_CHECK_TYPE((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||         \
                       (x).scalar_type() == at::kBFloat16 || (x).scalar_type() == at::kDouble, \
                   #x " must be float16, bfloat16, float32 or float64, got ", (x).scalar_type())

// Accumulation dtype: float64 for float64 data, float32 otherwise.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

using RouterOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using MetaOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor, at::Tensor>;

// Argument checks shared by the CPU and CUDA entry points (devices checked by the callers).
void check_router_args(const at::Tensor& logits, int64_t top_k, int64_t mode);
void check_meta_args(const at::Tensor& topk_ids, int64_t num_experts, int64_t block_size);
// Returns T*k (the number of valid pair indices) for the gather/scatter ops.
int64_t check_gather_args(const char* op, const at::Tensor& data, const at::Tensor& sorted_pairs,
                          const at::Tensor& inverse, const c10::optional<at::Tensor>& weights);
int64_t padded_length(int64_t num_pairs, int64_t num_experts, int64_t block_size);

}  // namespace moelora
