// The op schemas, defined once for every backend, and the composite ops built from them:
// score_threshold (the exact k-th largest score: from a sample's bracket and score_candidates
// passes, or by three histogram passes) and reset_most_abnormal_ (threshold + reset). Backends
// register kernels for the element-wise ops in cpu/binding.cpp and cuda/binding.cpp.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"
#include "finepurify/search.h"
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

std::tuple<at::Tensor, at::Tensor> score_sample_op(at::TensorList finetuned, at::TensorList pretrained,
                                                   at::TensorList hessians, const Ranking& r, int64_t stride) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("finepurify::score_sample", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(at::TensorList, at::TensorList, at::TensorList,
                                                                 double, int64_t, double, int64_t,
                                                                 at::IntArrayRef, at::IntArrayRef)>();
  return op.call(finetuned, pretrained, hessians, r.eps, stride, r.hessian_floor, r.random_seed, r.random_keys,
                 r.random_offsets);
}

std::tuple<at::Tensor, at::Tensor> score_candidates_op(at::TensorList finetuned, at::TensorList pretrained,
                                                       at::TensorList hessians, const Ranking& r,
                                                       uint32_t low_key, uint32_t high_key, int64_t capacity) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("finepurify::score_candidates", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(at::TensorList, at::TensorList, at::TensorList,
                                                                 double, int64_t, int64_t, int64_t, double,
                                                                 int64_t, at::IntArrayRef, at::IntArrayRef)>();
  return op.call(finetuned, pretrained, hessians, r.eps, low_key, high_key, capacity, r.hessian_floor,
                 r.random_seed, r.random_keys, r.random_offsets);
}

// ------------------------------------------------------------------ the search from a sample
// The same search as purify_'s (finepurify_ext/threshold.py: bracket_from_sample, search_ranges),
// with its constants: an even sample of about a million scores brackets the k-th largest by six
// standard deviations; a score_candidates pass counts the keys above, at and below the bracket
// and keeps those between (the threshold in one pass), or, where they are too many or the bracket
// missed, names the narrower range the next pass keeps.

// kSampleSearchMinWeights and kCandidateKeys: finepurify/search.h.

// Where the search from a sample runs: search="sample" always, "histograms" never, "auto" on the
// CPU from kSampleSearchMinWeights weights (the CUDA kernels of score_sample and score_candidates
// have not run on a GPU yet: threshold.CANDIDATES_ON).
bool searches_from_sample(const char* op, c10::string_view search, at::Device device, int64_t total) {
  TORCH_CHECK_VALUE(search == "auto" || search == "sample" || search == "histograms", "finepurify.", op,
                    ": search must be 'auto', 'sample' or 'histograms', got '", std::string(search), "'");
  if (search == "auto") return device.is_cpu() && total >= kSampleSearchMinWeights;
  return search == "sample";
}

struct Sample {
  at::Tensor keys;  // int32 on the CPU: the rankable keys first, in no order
  int64_t n;        // how many are rankable
  double moved_fraction;
};

Sample take_sample(at::TensorList finetuned, at::TensorList pretrained, at::TensorList hessians,
                   const Ranking& r, int64_t total) {
  const int64_t stride = std::max<int64_t>(kSampleRun, kSampleRun * (total / sample_budget(total)));
  auto [keys, counts] = score_sample_op(finetuned, pretrained, hessians, r, stride);
  keys = keys.cpu().contiguous();  // the op's own output (or its copy): filtered in place, not copied
  counts = counts.cpu();
  const int64_t n = keys.numel(), unmoved = counts.data_ptr<int64_t>()[1];
  int32_t* k = keys.data_ptr<int32_t>();
  int64_t rankable = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (k[i] >= 0) k[rankable++] = k[i];  // NaN scores: the pass finds and names them
  }
  return {keys, rankable, n > 0 ? 1.0 - static_cast<double>(unmoved) / static_cast<double>(n) : 1.0};
}

struct KeyRange {
  uint32_t low, high;
  int64_t capacity;  // the keys the pass may keep
};

// The bracket of the element at rank_fraction from the top (threshold.bracket_from_sample), and
// the keys the pass may keep (keys_room, finepurify/search.h). Reorders the sample's keys.
KeyRange bracket(Sample& sample, double rank_fraction, double spread, int64_t total) {
  const int64_t n = sample.n;
  int32_t* keys = sample.keys.data_ptr<int32_t>();
  const double centre = rank_fraction * static_cast<double>(n), margin = 6.0 * spread + 2.0;
  const int64_t top = static_cast<int64_t>(std::floor(centre - margin));     // positions from the top
  const int64_t bottom = static_cast<int64_t>(std::ceil(centre + margin));
  auto at_position = [&](int64_t from_top) {  // the key there, by a partial sort in place
    int32_t* nth = keys + (n - 1 - from_top);
    std::nth_element(keys, nth, keys + n);
    return static_cast<uint32_t>(*nth);
  };
  const uint32_t high = top < 0 ? kInfBits : (top < n ? at_position(top) : 0u);
  const uint32_t low = bottom >= n ? 0u : at_position(bottom);
  int64_t inside = 0;
  for (int64_t i = 0; i < n; ++i) {
    inside += static_cast<uint32_t>(keys[i]) > low && static_cast<uint32_t>(keys[i]) < high;
  }
  const double share = static_cast<double>(inside) / static_cast<double>(std::max<int64_t>(n, 1));
  return {low, high, keys_room(share, n, total, kCandidateKeys)};
}

// One score_candidates pass: its counts on the host (above, at_high, between, at_low, unrankable,
// unmoved, then the bins of the keys between) and its keys where it kept them all.
struct Pass {
  at::Tensor counts;  // int64, on the CPU
  at::Tensor keys;    // int32, sorted descending; undefined where more than the capacity fell between
  KeyRange range;
  const int64_t* c() const { return counts.data_ptr<int64_t>(); }
};

Pass candidates_pass(const char* op, at::TensorList finetuned, at::TensorList pretrained, at::TensorList hessians,
                     const Ranking& r, const KeyRange& range) {
  auto [counts, keys] = score_candidates_op(finetuned, pretrained, hessians, r, range.low, range.high, range.capacity);
  Pass pass{counts.cpu(), at::Tensor(), range};
  if (pass.c()[4] > 0) raise_unrankable(op, finetuned, pretrained, hessians, pass.c()[4]);
  if (pass.c()[2] <= range.capacity) pass.keys = keys;
  return pass;
}

// The exact k-th largest of `total` scores from a first pass and, where it did not hold it, the
// passes over the ranges its counts name (threshold.search_ranges, narrower_range).
float search_ranges(const char* op, at::TensorList finetuned, at::TensorList pretrained, at::TensorList hessians,
                    const Ranking& r, Pass pass, int64_t k, int64_t total) {
  for (int passes = 0; passes < 8; ++passes) {
    const int64_t* c = pass.c();
    const int64_t above = c[0], at_high = c[1], between = c[2], at_low = c[3], unrankable = c[4];
    const KeyRange& range = pass.range;
    if (k <= above) {  // above the range: (high, +Inf]
      pass = candidates_pass(op, finetuned, pretrained, hessians, r,
                             {range.high, kInfBits, std::min(above, kCandidateKeys)});
      continue;
    }
    if (k <= above + at_high) return float_from_bits(range.high);
    int64_t rank = k - above - at_high;  // among the keys between, from the top
    if (rank <= between) {
      if (pass.keys.defined()) return float_from_bits(static_cast<uint32_t>(pass.keys[rank - 1].item<int32_t>()));
      const BetweenBins bins(range.low, range.high);
      int64_t b = kMaxBins - 1;
      for (; b > 0 && c[kCandidateCounts + b] < rank; --b) rank -= c[kCandidateCounts + b];
      TORCH_INTERNAL_ASSERT(c[kCandidateCounts + b] >= rank, "candidates bins lost keys");
      const uint32_t first = bins.first + (static_cast<uint32_t>(b) << bins.shift);
      if (bins.shift == 0) return float_from_bits(first);  // a bin of one key
      const uint32_t next = first + (1u << bins.shift);
      pass = candidates_pass(op, finetuned, pretrained, hessians, r,
                             {first - 1u, std::min(next, range.high),
                              std::min(c[kCandidateCounts + b], kCandidateKeys)});
      continue;
    }
    if (rank <= between + at_low) return float_from_bits(range.low);
    const int64_t below = total - unrankable - above - at_high - between - at_low;
    TORCH_INTERNAL_ASSERT(range.low > 0 && rank - between - at_low <= below, "candidates passes lost elements");
    pass = candidates_pass(op, finetuned, pretrained, hessians, r, {0u, range.low, std::min(below, kCandidateKeys)});
  }
  TORCH_INTERNAL_ASSERT(false, "the search from a sample found no threshold in 8 passes");
}

// The search's first pass (purify.candidate_range): a sample, its bracket of the element `share`
// from the top of all weights or, by_moved, of those the sample says moved, and the
// score_candidates pass over it. The bracket's spread in sample positions: binomial, plus with
// by_moved that of the moved fraction the rank was estimated from.
Pass first_pass_from_sample(const char* op, at::TensorList finetuned, at::TensorList pretrained,
                            at::TensorList hessians, const Ranking& r, int64_t total, double share,
                            bool by_moved) {
  Sample sample = take_sample(finetuned, pretrained, hessians, r, total);
  const double moved = sample.moved_fraction;
  const double rank_fraction = std::min(1.0, share * (by_moved ? moved : 1.0));
  const double n = static_cast<double>(sample.n);
  const double spread = std::sqrt(n * rank_fraction * (1.0 - rank_fraction)) +
                        (by_moved ? share * std::sqrt(n * moved * (1.0 - moved)) : 0.0);
  const KeyRange range = bracket(sample, rank_fraction, spread, total);
  sample.keys.reset();  // up to 16 MB, let go of before the pass's room
  return candidates_pass(op, finetuned, pretrained, hessians, r, range);
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
                           at::IntArrayRef random_offsets, c10::string_view search) {
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
  float threshold;
  if (searches_from_sample(kOp, search, finetuned[0].device(), total)) {
    const Pass first = first_pass_from_sample(kOp, finetuned, pretrained, hessians, r, total,
                                              static_cast<double>(k) / static_cast<double>(total), false);
    threshold = search_ranges(kOp, finetuned, pretrained, hessians, r, first, k, total);
  } else {
    const at::Tensor level0 = score_histogram_op(finetuned, pretrained, hessians, r, 0, 0).cpu();
    threshold = threshold_search(kOp, finetuned, pretrained, hessians, r, k, level0);
  }
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
                                bool count_moved_only, c10::string_view search) {
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
  const bool from_sample = searches_from_sample(kOp, search, device, total);  // checks `search` first
  if (total == 0) return no_reset();
  const Ranking r{eps, hessian_floor, random_seed, random_keys, random_offsets};
  const int64_t all = total;
  const auto reset_count = [&](int64_t counted) {
    return counted - static_cast<int64_t>(std::floor(reserve_ratio * static_cast<double>(counted) + 0.5));
  };
  float threshold;
  if (from_sample) {
    // The rank from the sample's moved fraction (the pass counts the moved weights exactly).
    const Pass first = first_pass_from_sample(kOp, finetuned, pretrained, hessians, r, total,
                                              1.0 - reserve_ratio, count_moved_only);
    if (count_moved_only) total -= first.c()[5];
    const int64_t num_reset = reset_count(total);
    if (num_reset == 0) return no_reset();
    threshold = search_ranges(kOp, finetuned, pretrained, hessians, r, first, num_reset, all);
  } else {
    const at::Tensor level0 = score_histogram_op(finetuned, pretrained, hessians, r, 0, 0).cpu();
    if (count_moved_only) total -= level0.data_ptr<int64_t>()[level_bins(0) + 1];
    const int64_t num_reset = reset_count(total);
    if (num_reset == 0) return no_reset();
    threshold = threshold_search(kOp, finetuned, pretrained, hessians, r, num_reset, level0);
  }
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
  // The float64 sum of each float32 CPU tensor (the no-Hessian ranking's means; on a GPU they
  // come from torch's multi-tensor norm).
  m.def("float64_sums(Tensor[] tensors) -> Tensor");
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
      "float eps, " FP_RANKING_ARGS ", str search='auto') -> Tensor");
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
      "float reserve_ratio, float eps, " FP_RANKING_ARGS ", bool count_moved_only=False, "
      "str search='auto') -> Tensor");
}

// Composite: valid on every backend that implements score_histogram and masked_reset_, and for
// empty lists (which carry no device to dispatch on).
TORCH_LIBRARY_IMPL(finepurify, CompositeExplicitAutograd, m) {
  m.impl("score_threshold", &score_threshold);
  m.impl("reset_most_abnormal_", &reset_most_abnormal_);
}

}  // namespace finepurify
