// The drift-score family: scores, the histogram passes of the exact threshold search, and the
// masked reset. Each reads finetuned, pretrained and hessian once and recomputes the score in
// registers, so no score vector is ever materialised.
#include <algorithm>
#include <atomic>
#include <functional>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "../kernels/score_math.h"
#include "kernels.h"
#include "multi_tensor.h"

namespace finepurify::cpu::FP_CPU_NS {
namespace {

// One chunk of a (finetuned, pretrained, hessian) triple and how its scores are computed.
template <typename T>
struct ChunkView {
  T* ft;
  const T* pre;
  const float* h;  // one value for the whole tensor when scalar_h
  bool scalar_h;
  int64_t n;
  int64_t first_index;  // of the chunk's first element in its tensor (the random stream's counter)
  uint64_t stream;
  const ScoreSpec& spec;

  float hessian(int64_t i) const { return scalar_h ? h[0] : h[i]; }
  float score(int64_t i) const {
    return spec.score(static_cast<float>(ft[i]), static_cast<float>(pre[i]), hessian(i), stream,
                      first_index + i);
  }
  bool rankable(int64_t i) const {
    return rankable_inputs(static_cast<float>(ft[i]), static_cast<float>(pre[i]), hessian(i));
  }
};

// Lanes whose inputs are usable: finite weights, finite non-negative hessian.
inline int invalid_lanes(const Vec& finetuned, const Vec& pretrained, const Vec& hessian) {
  const Vec max_finite(FLT_MAX);
  const Vec ok = (finetuned.abs() <= max_finite) & (pretrained.abs() <= max_finite) &
                 (hessian >= Vec(0.0f)) & (hessian <= max_finite);
  return ok.zero_mask();
}

// Calls fn(i, f, p, h, score) for every vector of the chunk (i the first element; the drift score
// in vector registers), and tail(i) for the elements after the last whole vector. The random
// ranking (a baseline) takes the scalar path throughout.
template <typename T, typename VecFn, typename TailFn>
void visit_vectors(const ChunkView<T>& c, const VecFn& fn, const TailFn& tail) {
  int64_t i = 0;
  if (!c.spec.random) {
    const Vec eps(c.spec.eps), floor(c.spec.hessian_floor);
    for (; i + Vec::size() <= c.n; i += Vec::size()) {
      const Vec f = load_float(c.ft + i), p = load_float(c.pre + i);
      const Vec hv = c.scalar_h ? Vec(c.h[0]) : Vec::loadu(c.h + i);
      // max(h, floor) as ScoreSpec::score takes it (h > floor ? h : floor): equal on every
      // rankable input; a NaN hessian is refused by invalid_lanes, which sees the raw value.
      const Vec drift = f - p;
      const Vec score = drift * drift / (Vec::blendv(floor, hv, hv > floor) + eps);
      fn(i, f, p, hv, score);
    }
  }
  for (; i < c.n; ++i) tail(i);
}

template <typename T>
void score_range(const ChunkView<T>& c, float* out) {
  visit_vectors(
      c, [&](int64_t i, const Vec&, const Vec&, const Vec&, const Vec& score) { score.store(out + i); },
      [&](int64_t i) { out[i] = c.score(i); });
}

// Adds one score to `bins` (level_bins + 2 counters: the digit's bins, unrankable, unmoved).
inline void add_to_histogram(const DigitSelector& digit, float score, bool rankable,
                             int64_t* bins) {
  const int bin = digit.bin(score, rankable);
  if (bin != DigitSelector::kNotCounted) ++bins[bin];
}

template <typename T>
void histogram_range(const ChunkView<T>& c, const DigitSelector& digit, int64_t* bins) {
  alignas(64) float scores[Vec::size()];
  int64_t& unmoved = bins[digit.unrankable_bin() + 1];
  visit_vectors(
      c,
      [&](int64_t, const Vec& f, const Vec& p, const Vec& hv, const Vec& score) {
        score.store(scores);
        const int invalid = invalid_lanes(f, p, hv);
        for (int lane = 0; lane < Vec::size(); ++lane) {
          add_to_histogram(digit, scores[lane], ((invalid >> lane) & 1) == 0, bins);
        }
        unmoved += __builtin_popcount(static_cast<unsigned>(true_lanes(f == p)));
      },
      [&](int64_t i) {
        add_to_histogram(digit, c.score(i), c.rankable(i), bins);
        unmoved += static_cast<float>(c.ft[i]) == static_cast<float>(c.pre[i]);
      });
}

// A thread's share of score_candidates: its counters and the keys it kept.
struct CandidateCounts {
  int64_t above = 0, at_high = 0, inside = 0, at_low = 0, unrankable = 0, unmoved = 0;
  std::vector<int64_t> bins = std::vector<int64_t>(kMaxBins, 0);  // the keys inside, by BetweenBins
  std::vector<int32_t> keys;
  int64_t unpublished = 0;  // keys kept since it last added its count to the op's
  bool full = false;        // the op holds more than `capacity`: keep no more
};

// Keys are kept until the threads together have found more than `capacity`: each adds its count
// to the op's (`kept`) every kKeyBlock keys, not per key, which the threads would contend for.
// So the op holds at most capacity + kKeyBlock keys per thread, and never stops short of all of
// them where at most `capacity` are inside.
constexpr int64_t kKeyBlock = 4096;

inline void keep_candidate(uint32_t key, const BetweenBins& between, int64_t capacity,
                           std::atomic<int64_t>& kept, CandidateCounts& out) {
  ++out.inside;
  ++out.bins[between.bin(key)];
  if (out.full) return;
  out.keys.push_back(static_cast<int32_t>(key));
  if (++out.unpublished == kKeyBlock) {
    out.full = kept.fetch_add(kKeyBlock, std::memory_order_relaxed) + kKeyBlock > capacity;
    out.unpublished = 0;
  }
}

inline void add_candidate(uint32_t key, uint32_t low_key, uint32_t high_key, const BetweenBins& between,
                          int64_t capacity, std::atomic<int64_t>& kept, CandidateCounts& out) {
  if (key == kUnrankableKey) {
    ++out.unrankable;
  } else if (key > high_key) {
    ++out.above;
  } else if (key == high_key) {
    ++out.at_high;
  } else if (key == low_key) {
    ++out.at_low;
  } else if (key > low_key) {
    keep_candidate(key, between, capacity, kept, out);
  }
}

// Non-negative int32 keys sorted descending by three 11-bit LSD radix passes (keys are below
// 2^31): the kept keys number about a million per 200M weights, where std::sort took 40 ms here.
inline void sort_keys_descending(int32_t* first, int32_t* last) {
  const size_t n = static_cast<size_t>(last - first);
  if (n < 4096) {
    std::sort(first, last, std::greater<int32_t>());
    return;
  }
  std::vector<int32_t> scratch(n);
  int32_t *from = first, *to = scratch.data();
  for (int shift = 0; shift < 33; shift += 11) {
    std::vector<size_t> offsets(2049, 0);
    // Descending: the digit's complement orders the buckets, stable within each.
    for (size_t i = 0; i < n; ++i) ++offsets[2047 - ((static_cast<uint32_t>(from[i]) >> shift) & 2047) + 1];
    for (size_t b = 1; b <= 2048; ++b) offsets[b] += offsets[b - 1];
    for (size_t i = 0; i < n; ++i) to[offsets[2047 - ((static_cast<uint32_t>(from[i]) >> shift) & 2047)]++] = from[i];
    std::swap(from, to);
  }
  if (from != first) std::copy(from, from + n, first);  // three passes: the result is in scratch
}

template <typename T>
void candidates_range(const ChunkView<T>& c, uint32_t low_key, uint32_t high_key, int64_t capacity,
                      std::atomic<int64_t>& kept, CandidateCounts& out) {
  alignas(64) float scores[Vec::size()];
  // Rankable keys order as the scores' float values (>= +0, up to +Inf), so a vector compares
  // its scores with the range's ends; only the lanes strictly inside (few) are looked at one by one.
  const Vec low(float_from_bits(low_key)), high(float_from_bits(high_key));
  const BetweenBins between(low_key, high_key);
  visit_vectors(
      c,
      [&](int64_t, const Vec& f, const Vec& p, const Vec& hv, const Vec& score) {
        const int unrankable = invalid_lanes(f, p, hv) | true_lanes(score != score);  // NaN score
        const int rankable = ~unrankable;
        const int at_high = true_lanes(score == high) & rankable;
        const int at_low = true_lanes(score == low) & rankable & ~at_high;
        const int inside = true_lanes(score > low) & true_lanes(score < high) & rankable;
        out.unrankable += __builtin_popcount(static_cast<unsigned>(unrankable));
        out.above += __builtin_popcount(static_cast<unsigned>(true_lanes(score > high) & rankable));
        out.at_high += __builtin_popcount(static_cast<unsigned>(at_high));
        out.at_low += __builtin_popcount(static_cast<unsigned>(at_low));
        out.unmoved += __builtin_popcount(static_cast<unsigned>(true_lanes(f == p)));
        if (inside == 0) return;
        score.store(scores);
        for (int lane = 0; lane < Vec::size(); ++lane) {
          if ((inside >> lane) & 1) keep_candidate(float_bits(scores[lane]), between, capacity, kept, out);
        }
      },
      [&](int64_t i) {
        add_candidate(score_key(c.score(i), c.rankable(i)), low_key, high_key, between, capacity, kept, out);
        out.unmoved += static_cast<float>(c.ft[i]) == static_cast<float>(c.pre[i]);
      });
}

template <typename T>
int64_t reset_range(const ChunkView<T>& c, float threshold) {
  const Vec threshold_vec(threshold);
  constexpr int kAllLanes = (1 << Vec::size()) - 1;
  int64_t num_reset = 0;
  visit_vectors(
      c,
      [&](int64_t i, const Vec&, const Vec&, const Vec&, const Vec& score) {
        const int lanes = true_lanes(score >= threshold_vec);
        if (lanes == kAllLanes) {
          std::memcpy(c.ft + i, c.pre + i, Vec::size() * sizeof(T));
        } else if (lanes != 0) {
          for (int lane = 0; lane < Vec::size(); ++lane) {
            if ((lanes >> lane) & 1) c.ft[i + lane] = c.pre[i + lane];
          }
        }
        num_reset += __builtin_popcount(static_cast<unsigned>(lanes));
      },
      [&](int64_t i) {
        if (c.score(i) >= threshold) {
          c.ft[i] = c.pre[i];
          ++num_reset;
        }
      });
  return num_reset;
}

// Calls fn(view) with a typed view of one chunk of a (finetuned, pretrained, hessian) triple.
template <typename Fn>
void visit_chunk(const TensorArg* finetuned, const TensorArg* pretrained,
                 const TensorArg* hessians, const ScoreSpec& spec, const uint64_t* streams,
                 const Chunk& c, const Fn& fn) {
  const TensorArg& h = hessians[c.tensor];
  const bool scalar_h = h.numel == 1;
  dispatch_storage(finetuned[c.tensor].dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const ChunkView<T> view{static_cast<T*>(finetuned[c.tensor].data) + c.begin,
                            static_cast<const T*>(pretrained[c.tensor].data) + c.begin,
                            static_cast<const float*>(h.data) + (scalar_h ? 0 : c.begin),
                            scalar_h,
                            c.end - c.begin,
                            c.begin,
                            streams != nullptr ? streams[c.tensor] : 0,
                            spec};
    fn(view);
  });
}

}  // namespace

void drift_score(const TensorArg* finetuned, const TensorArg* pretrained,
                 const TensorArg* hessians, const TensorArg* scores, int64_t num_tensors,
                 const ScoreSpec& spec, const uint64_t* streams) {
  const auto chunks = split_into_chunks(finetuned, num_tensors);
  parallel_over_chunks(chunks, [&](const Chunk* first, const Chunk* last) {
    for (const Chunk* c = first; c != last; ++c) {
      float* out = static_cast<float*>(scores[c->tensor].data) + c->begin;
      visit_chunk(finetuned, pretrained, hessians, spec, streams, *c,
                  [&](const auto& view) { score_range(view, out); });
    }
  });
}

void score_histogram(const TensorArg* finetuned, const TensorArg* pretrained,
                     const TensorArg* hessians, int64_t num_tensors, const ScoreSpec& spec,
                     const uint64_t* streams, int level, uint32_t prefix, int64_t* counts) {
  const DigitSelector digit(level, prefix);
  const int64_t num_counts = level_bins(level) + 2;
  std::fill(counts, counts + num_counts, 0);
  const auto chunks = split_into_chunks(finetuned, num_tensors);
  std::vector<int64_t> per_thread(static_cast<size_t>(at::get_num_threads()) * num_counts, 0);
  parallel_over_chunks(chunks, [&](const Chunk* first, const Chunk* last) {
    // Thread-private bins (16 KB: stays in L1), merged once per thread below.
    int64_t* bins = per_thread.data() + at::get_thread_num() * num_counts;
    for (const Chunk* c = first; c != last; ++c) {
      visit_chunk(finetuned, pretrained, hessians, spec, streams, *c,
                  [&](const auto& view) { histogram_range(view, digit, bins); });
    }
  });
  for (size_t t = 0; t < per_thread.size() / num_counts; ++t) {
    for (int64_t b = 0; b < num_counts; ++b) counts[b] += per_thread[t * num_counts + b];
  }
}

void score_candidates(const TensorArg* finetuned, const TensorArg* pretrained,
                      const TensorArg* hessians, int64_t num_tensors, const ScoreSpec& spec,
                      const uint64_t* streams, uint32_t low_key, uint32_t high_key,
                      int64_t capacity, int64_t* counts, int32_t* keys) {
  const auto chunks = split_into_chunks(finetuned, num_tensors);
  std::vector<CandidateCounts> per_thread(static_cast<size_t>(at::get_num_threads()));
  std::atomic<int64_t> kept{0};
  parallel_over_chunks(chunks, [&](const Chunk* first, const Chunk* last) {
    CandidateCounts& out = per_thread[at::get_thread_num()];
    for (const Chunk* c = first; c != last; ++c) {
      visit_chunk(finetuned, pretrained, hessians, spec, streams, *c, [&](const auto& view) {
        candidates_range(view, low_key, high_key, capacity, kept, out);
      });
    }
  });
  CandidateCounts total;
  for (const CandidateCounts& t : per_thread) {
    total.above += t.above;
    total.at_high += t.at_high;
    total.inside += t.inside;
    total.at_low += t.at_low;
    total.unrankable += t.unrankable;
    total.unmoved += t.unmoved;
    for (int64_t b = 0; b < kMaxBins; ++b) total.bins[b] += t.bins[b];
  }
  const int64_t values[kCandidateCounts] = {total.above,  total.at_high,    total.inside,
                                            total.at_low, total.unrankable, total.unmoved};
  std::copy(values, values + kCandidateCounts, counts);
  std::copy(total.bins.begin(), total.bins.end(), counts + kCandidateCounts);
  std::fill(keys, keys + capacity, -1);
  if (total.inside > capacity) return;  // which keys were kept depends on the threads: none
  int32_t* end = keys;
  for (const CandidateCounts& t : per_thread) end = std::copy(t.keys.begin(), t.keys.end(), end);
  sort_keys_descending(keys, end);  // the same output whatever the thread count
}

void score_sample(const TensorArg* finetuned, const TensorArg* pretrained,
                  const TensorArg* hessians, int64_t num_tensors, const ScoreSpec& spec,
                  const uint64_t* streams, int64_t stride, int32_t* keys, int64_t* counts) {
  std::vector<int64_t> offsets(static_cast<size_t>(num_tensors) + 1, 0);  // each tensor's first key
  for (int64_t t = 0; t < num_tensors; ++t) offsets[t + 1] = offsets[t] + sample_size(finetuned[t].numel, stride);
  std::atomic<int64_t> unrankable{0}, unmoved{0};
  // Scalar scores (the sampled runs are 16 elements): a few milliseconds for a million.
  at::parallel_for(0, offsets.back(), int64_t{1} << 14, [&](int64_t begin, int64_t end) {
    int64_t bad = 0, still = 0;
    int64_t t = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    for (int64_t j = begin; j < end; ++t) {
      const int64_t stop = std::min(end, offsets[t + 1]);  // empty tensors: stop == j
      // The whole tensor's view; only the sampled positions are read.
      const Chunk whole{t, 0, finetuned[t].numel};
      visit_chunk(finetuned, pretrained, hessians, spec, streams, whole, [&](const auto& c) {
        for (; j < stop; ++j) {
          const int64_t i = sample_position(j - offsets[t], c.n, stride);
          const uint32_t key = score_key(c.score(i), c.rankable(i));
          keys[j] = static_cast<int32_t>(key);
          bad += key == kUnrankableKey;
          still += static_cast<float>(c.ft[i]) == static_cast<float>(c.pre[i]);
        }
      });
    }
    unrankable += bad;
    unmoved += still;
  });
  counts[0] = unrankable.load();
  counts[1] = unmoved.load();
}

void masked_reset(const TensorArg* finetuned, const TensorArg* pretrained,
                  const TensorArg* hessians, int64_t num_tensors, const ScoreSpec& spec,
                  const uint64_t* streams, float threshold, int64_t* counts) {
  const auto chunks = split_into_chunks(finetuned, num_tensors);
  std::vector<int64_t> per_chunk(chunks.size(), 0);
  parallel_over_chunks(chunks, [&](const Chunk* first, const Chunk* last) {
    for (const Chunk* c = first; c != last; ++c) {
      visit_chunk(finetuned, pretrained, hessians, spec, streams, *c, [&](const auto& view) {
        per_chunk[c - chunks.data()] = reset_range(view, threshold);
      });
    }
  });
  std::fill(counts, counts + num_tensors, 0);
  for (size_t i = 0; i < chunks.size(); ++i) counts[chunks[i].tensor] += per_chunk[i];
}

}  // namespace finepurify::cpu::FP_CPU_NS
