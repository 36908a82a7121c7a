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

inline Vec drift_score_vec(const Vec& finetuned, const Vec& pretrained, const Vec& hessian,
                           const Vec& eps) {
  const Vec drift = finetuned - pretrained;
  return drift * drift / (hessian + eps);
}

// Lanes whose inputs are usable: finite weights, finite non-negative hessian.
inline int invalid_lanes(const Vec& finetuned, const Vec& pretrained, const Vec& hessian) {
  const Vec max_finite(FLT_MAX);
  const Vec ok = (finetuned.abs() <= max_finite) & (pretrained.abs() <= max_finite) &
                 (hessian >= Vec(0.0f)) & (hessian <= max_finite);
  return ok.zero_mask();
}

template <typename T>
void score_range(const T* ft, const T* pre, const float* h, float* out, int64_t n, float eps) {
  const Vec eps_vec(eps);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    drift_score_vec(load_float(ft + i), load_float(pre + i), Vec::loadu(h + i), eps_vec)
        .store(out + i);
  }
  for (; i < n; ++i) {
    out[i] = element_score(static_cast<float>(ft[i]), static_cast<float>(pre[i]), h[i], eps);
  }
}

// Adds one score to `bins` (level_bins + 1 counters, the last for unrankable inputs).
inline void add_to_histogram(const DigitSelector& digit, float score, bool rankable,
                             int64_t* bins) {
  const int bin = digit.bin(score, rankable);
  if (bin != DigitSelector::kNotCounted) ++bins[bin];
}

template <typename T>
void histogram_range(const T* ft, const T* pre, const float* h, int64_t n, float eps,
                     const DigitSelector& digit, int64_t* bins) {
  const Vec eps_vec(eps);
  alignas(64) float scores[Vec::size()];
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec f = load_float(ft + i), p = load_float(pre + i), hv = Vec::loadu(h + i);
    drift_score_vec(f, p, hv, eps_vec).store(scores);
    const int invalid = invalid_lanes(f, p, hv);
    for (int lane = 0; lane < Vec::size(); ++lane) {
      add_to_histogram(digit, scores[lane], ((invalid >> lane) & 1) == 0, bins);
    }
  }
  for (; i < n; ++i) {
    const float f = static_cast<float>(ft[i]), p = static_cast<float>(pre[i]);
    add_to_histogram(digit, element_score(f, p, h[i], eps), rankable_inputs(f, p, h[i]), bins);
  }
}

template <typename T>
int64_t reset_range(T* ft, const T* pre, const float* h, int64_t n, float eps, float threshold) {
  const Vec eps_vec(eps), threshold_vec(threshold);
  constexpr int kAllLanes = (1 << Vec::size()) - 1;
  int64_t num_reset = 0;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec score =
        drift_score_vec(load_float(ft + i), load_float(pre + i), Vec::loadu(h + i), eps_vec);
    const int lanes = true_lanes(score >= threshold_vec);
    if (lanes == kAllLanes) {
      std::memcpy(ft + i, pre + i, Vec::size() * sizeof(T));
    } else if (lanes != 0) {
      for (int lane = 0; lane < Vec::size(); ++lane) {
        if ((lanes >> lane) & 1) ft[i + lane] = pre[i + lane];
      }
    }
    num_reset += __builtin_popcount(static_cast<unsigned>(lanes));
  }
  for (; i < n; ++i) {
    if (element_score(static_cast<float>(ft[i]), static_cast<float>(pre[i]), h[i], eps) >=
        threshold) {
      ft[i] = pre[i];
      ++num_reset;
    }
  }
  return num_reset;
}

// Calls fn(ft, pre, h, n) with typed pointers to one chunk of a (finetuned, pretrained, hessian)
// triple.
template <typename Fn>
void visit_chunk(const TensorArg* finetuned, const TensorArg* pretrained,
                 const TensorArg* hessians, const Chunk& c, const Fn& fn) {
  dispatch_storage(finetuned[c.tensor].dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    fn(static_cast<T*>(finetuned[c.tensor].data) + c.begin,
       static_cast<const T*>(pretrained[c.tensor].data) + c.begin,
       static_cast<const float*>(hessians[c.tensor].data) + c.begin, c.end - c.begin);
  });
}

}  // namespace

void drift_score(const TensorArg* finetuned, const TensorArg* pretrained,
                 const TensorArg* hessians, const TensorArg* scores, int64_t num_tensors,
                 float eps) {
  const auto chunks = split_into_chunks(finetuned, num_tensors);
  parallel_over_chunks(chunks, [&](const Chunk* first, const Chunk* last) {
    for (const Chunk* c = first; c != last; ++c) {
      float* out = static_cast<float*>(scores[c->tensor].data) + c->begin;
      visit_chunk(finetuned, pretrained, hessians, *c, [&](auto* ft, auto* pre, auto* h, int64_t n) {
        score_range(ft, pre, h, out, n, eps);
      });
    }
  });
}

void score_histogram(const TensorArg* finetuned, const TensorArg* pretrained,
                     const TensorArg* hessians, int64_t num_tensors, float eps, int level,
                     uint32_t prefix, int64_t* counts) {
  const DigitSelector digit(level, prefix);
  const int64_t num_counts = level_bins(level) + 1;
  std::fill(counts, counts + num_counts, 0);
  const auto chunks = split_into_chunks(finetuned, num_tensors);
  std::vector<int64_t> per_thread(static_cast<size_t>(at::get_num_threads()) * num_counts, 0);
  parallel_over_chunks(chunks, [&](const Chunk* first, const Chunk* last) {
    // Thread-private bins (16 KB: stays in L1), merged once per thread below.
    int64_t* bins = per_thread.data() + at::get_thread_num() * num_counts;
    for (const Chunk* c = first; c != last; ++c) {
      visit_chunk(finetuned, pretrained, hessians, *c, [&](auto* ft, auto* pre, auto* h, int64_t n) {
        histogram_range(ft, pre, h, n, eps, digit, bins);
      });
    }
  });
  for (size_t t = 0; t < per_thread.size() / num_counts; ++t) {
    for (int64_t b = 0; b < num_counts; ++b) counts[b] += per_thread[t * num_counts + b];
  }
}

void masked_reset(const TensorArg* finetuned, const TensorArg* pretrained,
                  const TensorArg* hessians, int64_t num_tensors, float eps, float threshold,
                  int64_t* counts) {
  const auto chunks = split_into_chunks(finetuned, num_tensors);
  std::vector<int64_t> per_chunk(chunks.size(), 0);
  parallel_over_chunks(chunks, [&](const Chunk* first, const Chunk* last) {
    for (const Chunk* c = first; c != last; ++c) {
      visit_chunk(finetuned, pretrained, hessians, *c, [&](auto* ft, auto* pre, auto* h, int64_t n) {
        per_chunk[c - chunks.data()] = reset_range(ft, pre, h, n, eps, threshold);
      });
    }
  });
  std::fill(counts, counts + num_tensors, 0);
  for (size_t i = 0; i < chunks.size(); ++i) counts[chunks[i].tensor] += per_chunk[i];
}

}  // namespace finepurify::cpu::FP_CPU_NS
