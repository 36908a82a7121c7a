// The drift-score family: scores, the histogram passes of the exact threshold search, and the
// masked reset. Each reads finetuned, pretrained and hessian once and recomputes the score in
// registers, so no score vector is ever materialised.
#include <algorithm>
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
