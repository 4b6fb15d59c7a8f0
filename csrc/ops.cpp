// moelora._C: operator schemas (TORCH_LIBRARY(moelora)), shared argument checks and the
// Python module stub. Kernels: cpu/*.cpp (always), cuda/*.cu (CUDA builds only).
#include <Python.h>
#include <torch/library.h>

#include <limits>

#include "moelora.h"

namespace moelora {

void check_router_args(const at::Tensor& logits, int64_t top_k, int64_t mode) {
  MOELORA_CHECK_DIM(logits, 2);
  MOELORA_CHECK_FLOAT(logits);
  const int64_t E = logits.size(1);
  TORCH_CHECK_VALUE(E >= 1 && E <= kMaxExperts, "logits.shape[1] (number of experts) must be in [1, ",
                    kMaxExperts, "], got ", E);
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= E, "top_k must be in [1, E = ", E, "], got ", top_k);
  TORCH_CHECK_VALUE(mode == kSoftmaxTopk || mode == kTopkSoftmax,
                    "mode must be 0 (softmax_topk) or 1 (topk_softmax), got ", mode);
}

void check_meta_args(const at::Tensor& topk_ids, int64_t num_experts, int64_t block_size) {
  MOELORA_CHECK_DIM(topk_ids, 2);
  TORCH_CHECK_TYPE(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong,
                   "topk_ids must be int32 or int64, got ", topk_ids.scalar_type());
  TORCH_CHECK_VALUE(num_experts >= 1 && num_experts <= kMaxExperts, "num_experts must be in [1, ",
                    kMaxExperts, "], got ", num_experts);
  TORCH_CHECK_VALUE(topk_ids.size(1) >= 1 && topk_ids.size(1) <= num_experts,
                    "topk_ids.shape[1] (k) must be in [1, num_experts = ", num_experts, "], got ",
                    topk_ids.size(1));
  TORCH_CHECK_VALUE(block_size >= 0 && block_size <= kMaxBlockSize, "block_size must be in [0, ", kMaxBlockSize,
                    "] (0: no padding), got ", block_size);
  // Unreachable for tensors that fit in memory, checked anyway: the padded length must fit int64.
  const int64_t num_pairs = topk_ids.size(0) * topk_ids.size(1);
  TORCH_CHECK_VALUE(block_size == 0 || num_pairs <= std::numeric_limits<int64_t>::max() / 2 -
                                                        num_experts * kMaxBlockSize,
                    "topk_ids has too many pairs (", num_pairs, ") for a padded layout");
}

int64_t check_gather_args(const char* op, const char* data_name, const at::Tensor& data,
                          const at::Tensor& sorted_pairs, const at::Tensor& inverse,
                          const c10::optional<at::Tensor>& weights) {
  TORCH_CHECK_TYPE(data.defined(), op, ": ", data_name, " must be a tensor, got None");
  TORCH_CHECK_TYPE(sorted_pairs.defined(), op, ": sorted_pairs must be a tensor, got None");
  TORCH_CHECK_TYPE(inverse.defined(), op, ": inverse must be a tensor, got None");
  TORCH_CHECK_VALUE(data.dim() == 2, op, ": ", data_name, " must be 2-D, got shape ", data.sizes());
  TORCH_CHECK_TYPE(data.scalar_type() == at::kFloat || data.scalar_type() == at::kHalf ||
                       data.scalar_type() == at::kBFloat16 || data.scalar_type() == at::kDouble,
                   op, ": ", data_name, " must be float16, bfloat16, float32 or float64, got ", data.scalar_type());
  MOELORA_CHECK_DIM(sorted_pairs, 1);
  MOELORA_CHECK_INDEX(sorted_pairs);
  MOELORA_CHECK_DIM(inverse, 2);
  MOELORA_CHECK_INDEX(inverse);
  TORCH_CHECK_VALUE(inverse.size(1) >= 1, op, ": inverse must have shape [T, k] with k >= 1, got ",
                    inverse.sizes());
  TORCH_CHECK_VALUE(sorted_pairs.device() == data.device(), op, ": sorted_pairs must be on ", data_name,
                    "'s device ", data.device(), ", got ", sorted_pairs.device());
  TORCH_CHECK_VALUE(inverse.device() == data.device(), op, ": inverse must be on ", data_name, "'s device ",
                    data.device(), ", got ", inverse.device());
  if (weights.has_value()) {
    const at::Tensor& weights_ = *weights;
    MOELORA_CHECK_FLOAT_AS(weights_, "weights");
    TORCH_CHECK_VALUE(weights_.device() == data.device(), op, ": weights must be on ", data_name, "'s device ",
                      data.device(), ", got ", weights_.device());
    TORCH_CHECK_VALUE(weights_.sizes() == inverse.sizes(), op, ": weights must have the shape of inverse ",
                      inverse.sizes(), ", got ", weights_.sizes());
  }
  return inverse.size(0) * inverse.size(1);
}

int64_t padded_length(int64_t num_pairs, int64_t num_experts, int64_t block_size) {
  const int64_t raw = num_pairs + num_experts * (block_size - 1);
  return (raw + block_size - 1) / block_size * block_size;
}

}  // namespace moelora

TORCH_LIBRARY(moelora, m) {
  m.def(
      "router_topk(Tensor logits, int top_k, int mode, bool renormalize) -> "
      "(Tensor weights, Tensor ids, Tensor counts, Tensor prob_sums, Tensor lse)");
  m.def(
      "dispatch_metadata(Tensor topk_ids, int num_experts, int block_size) -> "
      "(Tensor counts, Tensor offsets, Tensor sorted_pairs, Tensor inverse, Tensor padded_offsets, "
      "Tensor sorted_pairs_padded, Tensor inverse_padded, Tensor block_expert)");
  m.def("dispatch(Tensor x, Tensor sorted_pairs, Tensor inverse, Tensor? weights) -> Tensor");
  m.def("combine(Tensor y_sorted, Tensor sorted_pairs, Tensor inverse, Tensor? weights) -> Tensor");
  m.def("pair_dot(Tensor a, Tensor b_sorted, Tensor sorted_pairs, Tensor inverse) -> Tensor");
}

#ifndef MOELORA_WITH_CUDA
#define MOELORA_WITH_CUDA 0
#endif

static struct PyModuleDef moelora_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                              "moelora native kernels (ops live in torch.ops.moelora)",
                                              -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&moelora_c_module);
  if (module == nullptr) return nullptr;
  PyModule_AddIntConstant(module, "WITH_CUDA", MOELORA_WITH_CUDA);
  PyModule_AddIntConstant(module, "MAX_EXPERTS", static_cast<long>(moelora::kMaxExperts));
  PyModule_AddIntConstant(module, "MAX_BLOCK_SIZE", static_cast<long>(moelora::kMaxBlockSize));
  return module;
}
