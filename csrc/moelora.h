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
// Largest dispatch_metadata block_size: with it, T*k + E*(block_size-1) (the padded layout's
// length) stays far inside int64 for any tensor that fits in memory, so no padded offset or
// buffer size can wrap (csrc/ops.cpp padded_length, cpu/dispatch_cpu.cpp, kernels/dispatch.cuh).
constexpr int64_t kMaxBlockSize = 65536;

// Router modes (the int argument of moelora::router_topk).
enum RouterMode : int64_t { kSoftmaxTopk = 0, kTopkSoftmax = 1 };

// Each check names the tensor: MOELORA_CHECK_*(x, ...) by its expression, the *_AS forms by a
// given name (the Python argument name when the C++ variable has another one).
#define MOELORA_CHECK_DEVICE(x, dev) \
  TORCH_CHECK_VALUE((x).device() == (dev), #x " must be on ", (dev), ", got ", (x).device())
#define MOELORA_CHECK_SHAPE(x, ...)                                         \
  TORCH_CHECK_VALUE((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ \
                    "), got ", (x).sizes())
// CPU kernels read tensor data on the host: a device tensor there would be a host segfault.
#define MOELORA_CHECK_CPU_AS(x, name) \
  TORCH_CHECK_VALUE((x).device().is_cpu(), name " must be a CPU tensor here, got ", (x).device())
#define MOELORA_CHECK_CPU(x) MOELORA_CHECK_CPU_AS(x, #x)
// A Python None passed for a required Tensor argument arrives as an undefined tensor (no device,
// dtype UNKNOWN_SCALAR, shape [0]): refused first, so the other checks never read one.
#define MOELORA_CHECK_DEFINED_AS(x, name) TORCH_CHECK_TYPE((x).defined(), name " must be a tensor, got None")
#define MOELORA_CHECK_DIM_AS(x, name, d) \
  TORCH_CHECK_VALUE((x).dim() == (d), name " must be ", (d), "-D, got shape ", (x).sizes())
#define MOELORA_CHECK_DIM(x, d) MOELORA_CHECK_DIM_AS(x, #x, d)
#define MOELORA_CHECK_INDEX(x) \
  TORCH_CHECK_TYPE((x).scalar_type() == at::kLong, #x " must be int64, got ", (x).scalar_type())
#define MOELORA_CHECK_FLOAT_AS(x, name)                                                          \
  TORCH_CHECK_TYPE((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||         \
                       (x).scalar_type() == at::kBFloat16 || (x).scalar_type() == at::kDouble, \
                   name " must be float16, bfloat16, float32 or float64, got ", (x).scalar_type())
#define MOELORA_CHECK_FLOAT(x) MOELORA_CHECK_FLOAT_AS(x, #x)

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
// Returns T*k (the number of valid pair indices) for the gather/scatter ops; data_name is the
// op's name for `data` (x, y_sorted, b_sorted).
int64_t check_gather_args(const char* op, const char* data_name, const at::Tensor& data,
                          const at::Tensor& sorted_pairs, const at::Tensor& inverse,
                          const c10::optional<at::Tensor>& weights);
// Rows of the padded layout: T*k + E*(block_size-1) rounded up to a multiple of block_size.
// Arguments checked by check_meta_args (block_size in [1, kMaxBlockSize]), so it cannot overflow.
int64_t padded_length(int64_t num_pairs, int64_t num_experts, int64_t block_size);

}  // namespace moelora
