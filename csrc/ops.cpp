// The op schemas, defined once for every backend, and the composite ops built from them:
// score_threshold (the exact k-th largest score, by three histogram passes) and
// reset_most_abnormal_ (threshold + reset). Backends register kernels for the element-wise ops in
// cpu/binding.cpp and cuda/binding.cpp.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>

#include "checks.h"
#include "kernels/score_math.h"

namespace finepurify {
namespace {

at::Tensor score_histogram_op(at::TensorList finetuned, at::TensorList pretrained,
                              at::TensorList hessians, double eps, int64_t level,
                              int64_t prefix) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("finepurify::score_histogram", "")
                       .typed<at::Tensor(at::TensorList, at::TensorList, at::TensorList, double,
                                         int64_t, int64_t)>();
  return op.call(finetuned, pretrained, hessians, eps, level, prefix);
}

at::Tensor masked_reset_op(at::TensorList finetuned, at::TensorList pretrained,
                           at::TensorList hessians, double threshold, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("finepurify::masked_reset_", "")
                       .typed<at::Tensor(at::TensorList, at::TensorList, at::TensorList, double,
                                         double)>();
  return op.call(finetuned, pretrained, hessians, threshold, eps);
}

// Exact k-th largest score (k from 1). Level by level, the bin holding the k-th largest score
// fixes the next digit of its float bits; after kNumLevels passes every bit is known. Extra
// memory: one histogram.
at::Tensor score_threshold(at::TensorList finetuned, at::TensorList pretrained,
                           at::TensorList hessians, int64_t k, double eps) {
  constexpr const char* kOp = "score_threshold";
  check_weight_lists(kOp, finetuned, pretrained, hessians);
  check_eps(kOp, eps);
  const int64_t total = total_numel(finetuned);
  TORCH_CHECK_VALUE(k >= 1 && k <= total, "finepurify.", kOp, ": k=", k,
                    " is out of range: the tensors hold ", total,
                    " elements, so k must be in [1, ", total, "]");
  uint32_t prefix = 0;
  int64_t rank = k;  // rank of the wanted score among those matching `prefix`, from the top
  for (int level = 0; level < kNumLevels; ++level) {
    // The one host read per pass: the next pass depends on it.
    const at::Tensor counts =
        score_histogram_op(finetuned, pretrained, hessians, eps, level, prefix).cpu();
    const int64_t* c = counts.data_ptr<int64_t>();
    const int64_t bins = level_bins(level);
    if (c[bins] > 0) raise_unrankable(kOp, finetuned, pretrained, hessians, c[bins]);
    int64_t bin = bins - 1;
    for (; bin > 0 && c[bin] < rank; --bin) rank -= c[bin];
    TORCH_INTERNAL_ASSERT(c[bin] >= rank, "score histogram lost elements");
    prefix = (prefix << level_bits(level)) | static_cast<uint32_t>(bin);
  }
  return at::scalar_tensor(float_from_bits(prefix),
                           at::TensorOptions().dtype(at::kFloat).device(finetuned[0].device()));
}

// Keeps the round(reserve_ratio * N) smallest scores and resets the rest (ties at the threshold
// included) to the pre-trained values. Returns per-tensor counts.
at::Tensor reset_most_abnormal_(at::TensorList finetuned, at::TensorList pretrained,
                                at::TensorList hessians, double reserve_ratio, double eps) {
  constexpr const char* kOp = "reset_most_abnormal_";
  check_weight_lists(kOp, finetuned, pretrained, hessians);
  check_eps(kOp, eps);
  TORCH_CHECK_VALUE(reserve_ratio >= 0.0 && reserve_ratio <= 1.0, "finepurify.", kOp,
                    ": reserve_ratio must be in [0, 1] (the fraction of weights kept), got ",
                    reserve_ratio);
  const int64_t total = total_numel(finetuned);
  const int64_t num_keep =
      static_cast<int64_t>(std::floor(reserve_ratio * static_cast<double>(total) + 0.5));
  const int64_t num_reset = total - num_keep;
  if (num_reset == 0) {
    const auto device = finetuned.empty() ? at::Device(at::kCPU) : finetuned[0].device();
    return at::zeros({static_cast<int64_t>(finetuned.size())},
                     at::TensorOptions().dtype(at::kLong).device(device));
  }
  const double threshold =
      score_threshold(finetuned, pretrained, hessians, num_reset, eps).item<double>();
  return masked_reset_op(finetuned, pretrained, hessians, threshold, eps);
}

}  // namespace

TORCH_LIBRARY(finepurify, m) {
  m.def(
      "accumulate_sq_grads_(Tensor(a!)[] hessians, Tensor(b!)[] grads, float scale=1.0, "
      "bool zero_grads=False) -> ()");
  m.def("drift_score(Tensor finetuned, Tensor pretrained, Tensor hessian, float eps) -> Tensor");
  m.def(
      "score_histogram(Tensor[] finetuned, Tensor[] pretrained, Tensor[] hessians, float eps, "
      "int level, int prefix) -> Tensor");
  m.def(
      "score_threshold(Tensor[] finetuned, Tensor[] pretrained, Tensor[] hessians, int k, "
      "float eps) -> Tensor");
  m.def(
      "masked_reset_(Tensor(a!)[] finetuned, Tensor[] pretrained, Tensor[] hessians, "
      "float threshold, float eps) -> Tensor");
  m.def(
      "reset_most_abnormal_(Tensor(a!)[] finetuned, Tensor[] pretrained, Tensor[] hessians, "
      "float reserve_ratio, float eps) -> Tensor");
}

// Composite: valid on every backend that implements score_histogram and masked_reset_, and for
// empty lists (which carry no device to dispatch on).
TORCH_LIBRARY_IMPL(finepurify, CompositeExplicitAutograd, m) {
  m.impl("score_threshold", &score_threshold);
  m.impl("reset_most_abnormal_", &reset_most_abnormal_);
}

}  // namespace finepurify
