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

// The ranking arguments every score op takes after eps (score_math.h's ScoreSpec).
struct Ranking {
  double eps;
  double hessian_floor;
  int64_t random_seed;
  at::IntArrayRef random_keys;
  at::IntArrayRef random_offsets;
};

at::Tensor score_histogram_op(at::TensorList finetuned, at::TensorList pretrained,
                              at::TensorList hessians, const Ranking& r, int64_t level,
                              int64_t prefix) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("finepurify::score_histogram", "")
                       .typed<at::Tensor(at::TensorList, at::TensorList, at::TensorList, double,
                                         int64_t, int64_t, double, int64_t, at::IntArrayRef,
                                         at::IntArrayRef)>();
  return op.call(finetuned, pretrained, hessians, r.eps, level, prefix, r.hessian_floor,
                 r.random_seed, r.random_keys, r.random_offsets);
}

at::Tensor masked_reset_op(at::TensorList finetuned, at::TensorList pretrained,
                           at::TensorList hessians, double threshold, const Ranking& r) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("finepurify::masked_reset_", "")
                       .typed<at::Tensor(at::TensorList, at::TensorList, at::TensorList, double,
                                         double, double, int64_t, at::IntArrayRef,
                                         at::IntArrayRef)>();
  return op.call(finetuned, pretrained, hessians, threshold, r.eps, r.hessian_floor,
                 r.random_seed, r.random_keys, r.random_offsets);
}

// The exact k-th largest score (k from 1), given the level-0 histogram. Level by level, the bin
// holding the k-th largest score fixes the next digit of its float bits; after kNumLevels passes
// every bit is known. Extra memory: one histogram.
float threshold_search(const char* op, at::TensorList finetuned, at::TensorList pretrained,
                       at::TensorList hessians, const Ranking& r, int64_t k, at::Tensor counts) {
  uint32_t prefix = 0;
  int64_t rank = k;  // rank of the wanted score among those matching `prefix`, from the top
  for (int level = 0; level < kNumLevels; ++level) {
    // The one host read per pass: the next pass depends on it.
    if (level > 0) counts = score_histogram_op(finetuned, pretrained, hessians, r, level, prefix).cpu();
    const int64_t* c = counts.data_ptr<int64_t>();
    const int64_t bins = level_bins(level);
    if (c[bins] > 0) raise_unrankable(op, finetuned, pretrained, hessians, c[bins]);
    int64_t bin = bins - 1;
    for (; bin > 0 && c[bin] < rank; --bin) rank -= c[bin];
    TORCH_INTERNAL_ASSERT(c[bin] >= rank, "score histogram lost elements");
    prefix = (prefix << level_bits(level)) | static_cast<uint32_t>(bin);
  }
  return float_from_bits(prefix);
}

at::Tensor score_threshold(at::TensorList finetuned, at::TensorList pretrained,
                           at::TensorList hessians, int64_t k, double eps, double hessian_floor,
                           int64_t random_seed, at::IntArrayRef random_keys,
                           at::IntArrayRef random_offsets) {
  constexpr const char* kOp = "score_threshold";
  check_weight_lists(kOp, finetuned, pretrained, hessians);
  std::vector<uint64_t> unused;
  score_spec(kOp, eps, hessian_floor, random_seed, random_keys, random_offsets, finetuned.size(),
             unused);
  const int64_t total = total_numel(finetuned);
  TORCH_CHECK_VALUE(k >= 1 && k <= total, "finepurify.", kOp, ": k=", k,
                    " is out of range: the tensors hold ", total,
                    " elements, so k must be in [1, ", total, "]");
  const Ranking r{eps, hessian_floor, random_seed, random_keys, random_offsets};
  const at::Tensor level0 = score_histogram_op(finetuned, pretrained, hessians, r, 0, 0).cpu();
  const float threshold = threshold_search(kOp, finetuned, pretrained, hessians, r, k, level0);
  return at::scalar_tensor(threshold,
                           at::TensorOptions().dtype(at::kFloat).device(finetuned[0].device()));
}

// Keeps the round(reserve_ratio * N) smallest scores and resets the rest (ties at the threshold
// included) to the pre-trained values; with count_moved_only, N counts only the weights that
// moved (read from the first histogram pass, at no extra cost). Returns per-tensor counts.
at::Tensor reset_most_abnormal_(at::TensorList finetuned, at::TensorList pretrained,
                                at::TensorList hessians, double reserve_ratio, double eps,
                                double hessian_floor, int64_t random_seed,
                                at::IntArrayRef random_keys, at::IntArrayRef random_offsets,
                                bool count_moved_only) {
  constexpr const char* kOp = "reset_most_abnormal_";
  check_weight_lists(kOp, finetuned, pretrained, hessians);
  std::vector<uint64_t> unused;
  score_spec(kOp, eps, hessian_floor, random_seed, random_keys, random_offsets, finetuned.size(),
             unused);
  TORCH_CHECK_VALUE(reserve_ratio >= 0.0 && reserve_ratio <= 1.0, "finepurify.", kOp,
                    ": reserve_ratio must be in [0, 1] (the fraction of weights kept), got ",
                    reserve_ratio);
  const auto device = finetuned.empty() ? at::Device(at::kCPU) : finetuned[0].device();
  const auto no_reset = [&] {
    return at::zeros({static_cast<int64_t>(finetuned.size())},
                     at::TensorOptions().dtype(at::kLong).device(device));
  };
  int64_t total = total_numel(finetuned);
  if (total == 0) return no_reset();
  const Ranking r{eps, hessian_floor, random_seed, random_keys, random_offsets};
  const at::Tensor level0 = score_histogram_op(finetuned, pretrained, hessians, r, 0, 0).cpu();
  if (count_moved_only) total -= level0.data_ptr<int64_t>()[level_bins(0) + 1];
  const int64_t num_keep =
      static_cast<int64_t>(std::floor(reserve_ratio * static_cast<double>(total) + 0.5));
  const int64_t num_reset = total - num_keep;
  if (num_reset == 0) return no_reset();
  const float threshold =
      threshold_search(kOp, finetuned, pretrained, hessians, r, num_reset, level0);
  return masked_reset_op(finetuned, pretrained, hessians, threshold, r);
}

}  // namespace

// The ranking arguments shared by the score ops (score_math.h's ScoreSpec): hessian_floor (H
// taken as max(H, floor)), random_seed (>= 0: Fine-mixing's random ranking, -1: the drift score)
// random_keys (one per tensor, stable names for the random streams; default: positions) and
// random_offsets (the index of each tensor's first element in the whole tensor it is a piece of,
// so that pieces read out of core or shards of a process group draw the whole tensor's values).
#define FP_RANKING_ARGS \
  "float hessian_floor=0.0, int random_seed=-1, int[] random_keys=[], int[] random_offsets=[]"

TORCH_LIBRARY(finepurify, m) {
  m.def(
      "accumulate_sq_grads_(Tensor(a!)[] hessians, Tensor(b!)[] grads, float scale=1.0, "
      "bool zero_grads=False) -> ()");
  m.def(
      "drift_score(Tensor finetuned, Tensor pretrained, Tensor hessian, float eps, "
      "float hessian_floor=0.0, int random_seed=-1, int random_key=0) -> Tensor");
  m.def(
      "drift_scores(Tensor[] finetuned, Tensor[] pretrained, Tensor[] hessians, float eps, "
      FP_RANKING_ARGS ") -> Tensor");
  m.def(
      "score_histogram(Tensor[] finetuned, Tensor[] pretrained, Tensor[] hessians, float eps, "
      "int level, int prefix, " FP_RANKING_ARGS ") -> Tensor");
  m.def(
      "score_threshold(Tensor[] finetuned, Tensor[] pretrained, Tensor[] hessians, int k, "
      "float eps, " FP_RANKING_ARGS ") -> Tensor");
  m.def(
      "score_candidates(Tensor[] finetuned, Tensor[] pretrained, Tensor[] hessians, float eps, "
      "int low_key, int high_key, int capacity, " FP_RANKING_ARGS ") -> (Tensor, Tensor)");
  m.def(
      "score_sample(Tensor[] finetuned, Tensor[] pretrained, Tensor[] hessians, float eps, "
      "int stride, " FP_RANKING_ARGS ") -> (Tensor, Tensor)");
  m.def(
      "masked_reset_(Tensor(a!)[] finetuned, Tensor[] pretrained, Tensor[] hessians, "
      "float threshold, float eps, " FP_RANKING_ARGS ") -> Tensor");
  m.def(
      "reset_most_abnormal_(Tensor(a!)[] finetuned, Tensor[] pretrained, Tensor[] hessians, "
      "float reserve_ratio, float eps, " FP_RANKING_ARGS ", bool count_moved_only=False) -> Tensor");
}

// Composite: valid on every backend that implements score_histogram and masked_reset_, and for
// empty lists (which carry no device to dispatch on).
TORCH_LIBRARY_IMPL(finepurify, CompositeExplicitAutograd, m) {
  m.impl("score_threshold", &score_threshold);
  m.impl("reset_most_abnormal_", &reset_most_abnormal_);
}

}  // namespace finepurify
