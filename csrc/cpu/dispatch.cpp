// Picks the CPU kernels once per process: AVX2 where the CPU has AVX2, FMA and F16C (and
// FINEPURIFY_CPU_CAPABILITY does not ask for the baseline), the portable build otherwise.
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace finepurify::cpu {
namespace {

bool use_avx2() {
  static const bool use = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    const char* forced = std::getenv("FINEPURIFY_CPU_CAPABILITY");
    if (forced != nullptr && std::strcmp(forced, "baseline") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
#else
    return false;
#endif
  }();
  return use;
}

}  // namespace

const char* capability() { return use_avx2() ? "avx2" : "baseline"; }

#if defined(__x86_64__) && defined(__GNUC__)
#define FP_CPU_CALL(fn, ...) (use_avx2() ? avx2::fn(__VA_ARGS__) : baseline::fn(__VA_ARGS__))
#else
#define FP_CPU_CALL(fn, ...) baseline::fn(__VA_ARGS__)
#endif

void accumulate_sq_grads(const TensorArg* hessians, const TensorArg* grads, int64_t num_tensors,
                         float scale, bool zero_grads) {
  FP_CPU_CALL(accumulate_sq_grads, hessians, grads, num_tensors, scale, zero_grads);
}

void float64_sums(const TensorArg* tensors, int64_t num_tensors, double* sums) {
  FP_CPU_CALL(float64_sums, tensors, num_tensors, sums);
}

void drift_score(const TensorArg* finetuned, const TensorArg* pretrained,
                 const TensorArg* hessians, const TensorArg* scores, int64_t num_tensors,
                 const ScoreSpec& spec, const uint64_t* streams) {
  FP_CPU_CALL(drift_score, finetuned, pretrained, hessians, scores, num_tensors, spec, streams);
}

void score_histogram(const TensorArg* finetuned, const TensorArg* pretrained,
                     const TensorArg* hessians, int64_t num_tensors, const ScoreSpec& spec,
                     const uint64_t* streams, int level, uint32_t prefix, int64_t* counts) {
  FP_CPU_CALL(score_histogram, finetuned, pretrained, hessians, num_tensors, spec, streams, level,
              prefix, counts);
}

void score_sample(const TensorArg* finetuned, const TensorArg* pretrained,
                  const TensorArg* hessians, int64_t num_tensors, const ScoreSpec& spec,
                  const uint64_t* streams, int64_t stride, int32_t* keys, int64_t* counts) {
  FP_CPU_CALL(score_sample, finetuned, pretrained, hessians, num_tensors, spec, streams, stride, keys,
              counts);
}

void score_candidates(const TensorArg* finetuned, const TensorArg* pretrained,
                      const TensorArg* hessians, int64_t num_tensors, const ScoreSpec& spec,
                      const uint64_t* streams, uint32_t low_key, uint32_t high_key,
                      int64_t capacity, int64_t* counts, int32_t* keys) {
  FP_CPU_CALL(score_candidates, finetuned, pretrained, hessians, num_tensors, spec, streams,
              low_key, high_key, capacity, counts, keys);
}

void masked_reset(const TensorArg* finetuned, const TensorArg* pretrained,
                  const TensorArg* hessians, int64_t num_tensors, const ScoreSpec& spec,
                  const uint64_t* streams, float threshold, int64_t* counts) {
  FP_CPU_CALL(masked_reset, finetuned, pretrained, hessians, num_tensors, spec, streams, threshold,
              counts);
}

}  // namespace finepurify::cpu
