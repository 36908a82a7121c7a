// CPU kernels over lists of tensors described by plain TensorArgs. Multi-threaded with
// at::parallel_for and vectorised with at::vec; no at::Tensor here (see cpu/binding.cpp).
#pragma once
#include <cstdint>

#include "../kernels/tensor_arg.h"

namespace finepurify::cpu {

// hessians[i] += scale * grads[i]^2; grads[i] zeroed in the same pass when zero_grads.
void accumulate_sq_grads(const TensorArg* hessians, const TensorArg* grads, int64_t num_tensors,
                         float scale, bool zero_grads);

// scores[i] = drift_score(finetuned[i], pretrained[i], hessians[i]) (scores float32).
void drift_score(const TensorArg* finetuned, const TensorArg* pretrained,
                 const TensorArg* hessians, const TensorArg* scores, int64_t num_tensors,
                 float eps);

// counts[0, level_bins(level)): histogram of digit `level` of the scores whose higher digits equal
// `prefix`; counts[level_bins(level)]: elements that cannot be ranked (NaN/Inf input, negative
// hessian, NaN score). `counts` is overwritten.
void score_histogram(const TensorArg* finetuned, const TensorArg* pretrained,
                     const TensorArg* hessians, int64_t num_tensors, float eps, int level,
                     uint32_t prefix, int64_t* counts);

// finetuned[i] = pretrained[i] where score >= threshold; counts[i] = elements reset in tensor i.
void masked_reset(const TensorArg* finetuned, const TensorArg* pretrained,
                  const TensorArg* hessians, int64_t num_tensors, float eps, float threshold,
                  int64_t* counts);

}  // namespace finepurify::cpu
