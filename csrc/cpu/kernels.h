// CPU kernels over lists of tensors described by plain TensorArgs. Multi-threaded with
// at::parallel_for and vectorised with at::vec; no at::Tensor here (see cpu/binding.cpp).
// Each kernel exists once per CPU capability (capability.h); the unqualified functions in
// finepurify::cpu (dispatch.cpp) pick the best one the running CPU supports.
#pragma once
#include <cstdint>

#include "../kernels/score_math.h"
#include "../kernels/tensor_arg.h"

namespace finepurify::cpu {

#define FP_DECLARE_CPU_KERNELS                                                                  \
  /* hessians[i] += scale * grads[i]^2; grads[i] zeroed in the same pass when zero_grads. */    \
  void accumulate_sq_grads(const TensorArg* hessians, const TensorArg* grads,                   \
                           int64_t num_tensors, float scale, bool zero_grads);                  \
  /* sums[i] = the float64 sum of tensors[i]'s float32 values, in an order fixed by the */       \
  /* tensor's chunks (the same bits whatever the thread count or capability). */                 \
  void float64_sums(const TensorArg* tensors, int64_t num_tensors, double* sums);               \
  /* Score-family kernels: scores by `spec` (score_math.h); streams[i]: tensor i's random */    \
  /* stream (read only when spec.random); a hessian of one element holds for its tensor. */      \
  /* scores[i] = the scores of tensor i (float32). */                                           \
  void drift_score(const TensorArg* finetuned, const TensorArg* pretrained,                     \
                   const TensorArg* hessians, const TensorArg* scores, int64_t num_tensors,     \
                   const ScoreSpec& spec, const uint64_t* streams);                             \
  /* counts[0, level_bins(level)): histogram of digit `level` of the scores whose higher */     \
  /* digits equal `prefix`; counts[level_bins(level)]: elements that cannot be ranked */        \
  /* (NaN/Inf input, negative hessian, NaN score); counts[level_bins(level) + 1]: elements */   \
  /* that never moved (finetuned == pretrained). `counts` is overwritten. */                    \
  void score_histogram(const TensorArg* finetuned, const TensorArg* pretrained,                 \
                       const TensorArg* hessians, int64_t num_tensors, const ScoreSpec& spec,   \
                       const uint64_t* streams, int level, uint32_t prefix, int64_t* counts);   \
  /* For a threshold search in one pass: counts = {rankable keys (score_key) above high_key, */  \
  /* equal to high_key, strictly between, equal to low_key (and not high_key), unrankable */      \
  /* elements, elements that never moved}, then the keys between counted in kMaxBins bins */     \
  /* (BetweenBins); keys[0, min(between, capacity)) = the keys strictly between, sorted */        \
  /* descending, the rest -1 (all -1 when more than `capacity` are between). */                   \
  void score_candidates(const TensorArg* finetuned, const TensorArg* pretrained,                \
                        const TensorArg* hessians, int64_t num_tensors, const ScoreSpec& spec,  \
                        const uint64_t* streams, uint32_t low_key, uint32_t high_key,           \
                        int64_t capacity, int64_t* counts, int32_t* keys);                      \
  /* keys = the score keys (score_key, as int32: unrankable ones negative) of an even sample */ \
  /* of every tensor (sample_size, sample_position with `stride`), tensor after tensor; */       \
  /* counts = {unrankable, unmoved} among them. */                                               \
  void score_sample(const TensorArg* finetuned, const TensorArg* pretrained,                    \
                    const TensorArg* hessians, int64_t num_tensors, const ScoreSpec& spec,      \
                    const uint64_t* streams, int64_t stride, int32_t* keys, int64_t* counts);   \
  /* finetuned[i] = pretrained[i] where score >= threshold; counts[i] = elements reset. */      \
  void masked_reset(const TensorArg* finetuned, const TensorArg* pretrained,                    \
                    const TensorArg* hessians, int64_t num_tensors, const ScoreSpec& spec,      \
                    const uint64_t* streams, float threshold, int64_t* counts);

FP_DECLARE_CPU_KERNELS

namespace baseline {
FP_DECLARE_CPU_KERNELS
}
namespace avx2 {
FP_DECLARE_CPU_KERNELS
}

// "avx2" or "baseline": the kernels in use. FINEPURIFY_CPU_CAPABILITY=baseline forces the
// portable ones (tests run both).
const char* capability();

}  // namespace finepurify::cpu
