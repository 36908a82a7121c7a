// CUDA kernels over lists of tensors described by plain TensorArgs, launched on `stream`.
// No torch headers (see cuda/binding.cpp). Every function returns without synchronising; counts
// stay on the device.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../kernels/score_math.h"
#include "../kernels/tensor_arg.h"

namespace finepurify::cuda {

// hessians[i] += scale * grads[i]^2; grads[i] zeroed in the same pass when zero_grads.
void accumulate_sq_grads(const TensorArg* hessians, const TensorArg* grads, int64_t num_tensors,
                         float scale, bool zero_grads, cudaStream_t stream);

// The score family: scores by `spec` (score_math.h); streams[i] is tensor i's random stream
// (host memory, read only when spec.random); a hessian of one element holds for its tensor.

// scores[i] = the scores of tensor i (float32).
void drift_score(const TensorArg* finetuned, const TensorArg* pretrained,
                 const TensorArg* hessians, const TensorArg* scores, int64_t num_tensors,
                 const ScoreSpec& spec, const uint64_t* streams, cudaStream_t stream);

// Adds to counts[0, level_bins(level)] (device memory, zeroed by the caller) the histogram of
// digit `level` of the scores whose higher digits equal `prefix`, at counts[level_bins] the
// elements that cannot be ranked and at counts[level_bins + 1] those that never moved.
void score_histogram(const TensorArg* finetuned, const TensorArg* pretrained,
                     const TensorArg* hessians, int64_t num_tensors, const ScoreSpec& spec,
                     const uint64_t* streams, int level, uint32_t prefix, int64_t* counts,
                     cudaStream_t stream);

// Adds to counts[0..5] (device memory, zeroed by the caller) the score keys above high_key,
// equal to it, strictly between, equal to low_key (below high_key), the unrankable elements and
// those that never moved, and to counts[6, 6 + kMaxBins) the keys between by BetweenBins; writes
// the keys strictly between to keys[0, min(between, capacity)) in no order (the caller sorts them).
void score_candidates(const TensorArg* finetuned, const TensorArg* pretrained,
                      const TensorArg* hessians, int64_t num_tensors, const ScoreSpec& spec,
                      const uint64_t* streams, uint32_t low_key, uint32_t high_key, int64_t capacity,
                      int64_t* counts, int32_t* keys, cudaStream_t stream);

// keys = the score keys (score_key, as int32) of an even sample of every tensor (sample_size,
// sample_position with `stride`), tensor after tensor; adds to counts[0..1] (device memory,
// zeroed by the caller) the unrankable and the unmoved among them.
void score_sample(const TensorArg* finetuned, const TensorArg* pretrained,
                  const TensorArg* hessians, int64_t num_tensors, const ScoreSpec& spec,
                  const uint64_t* streams, int64_t stride, int32_t* keys, int64_t* counts,
                  cudaStream_t stream);

// finetuned[i] = pretrained[i] where score >= threshold; adds the number reset to counts[i]
// (device memory, zeroed by the caller).
void masked_reset(const TensorArg* finetuned, const TensorArg* pretrained,
                  const TensorArg* hessians, int64_t num_tensors, const ScoreSpec& spec,
                  const uint64_t* streams, float threshold, int64_t* counts, cudaStream_t stream);

}  // namespace finepurify::cuda
