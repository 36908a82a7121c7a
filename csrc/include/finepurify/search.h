// The threshold search from a sample: its constants, shared by the ops (csrc/ops.cpp), the Python
// side (finepurify_ext._C.constants(), which the tests check threshold.py's copies against) and
// programs that use the C++ API.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace finepurify {

// score_threshold's and reset_most_abnormal_'s search="auto" searches from a sample on the CPU from
// this many weights (below it, the three histogram passes cost about what the sample saves).
constexpr int64_t kSampleSearchMinWeights = int64_t{1} << 20;

// About how many of `total` weights the sample that brackets the threshold takes
// (threshold.sample_budget): one in 64 up to a million, then one in 256 up to 4M (16 MB of keys).
// A bracket's share of the weights shrinks as the square root of the sample, so that one pass holds
// the threshold of about 0.8B to 1.4B weights at the default reserve, against 0.4B to 0.7B with a
// million; the sample costs tens of milliseconds where a pass over 1B weights costs a second.
inline int64_t sample_budget(int64_t total) {
  return std::max({int64_t{1} << 14, std::min<int64_t>(total / 64, int64_t{1} << 20),
                   std::min<int64_t>(total / 256, int64_t{4} << 20)});
}

// The keys one score_candidates pass of the search keeps at most (16 MB); where more fall in its
// range it only counts them, in bins, and the next pass keeps the bin that holds the threshold.
constexpr int64_t kCandidateKeys = int64_t{4} << 20;

// The keys a score_candidates pass over `total` weights may keep, for a range that holds the
// fraction `inside` of an even sample of `samples` (threshold.keys_room, the same arithmetic):
// three times those expected, and at least the most it likely holds (the sample's share plus six
// of its standard deviations, the bracket's own margin); 0 where even that is more than `max_keys`
// (the pass then only counts them in its bins).
inline int64_t keys_room(double inside, int64_t samples, int64_t total, int64_t max_keys) {
  const double n = static_cast<double>(std::max<int64_t>(samples, 1)), weights = static_cast<double>(total);
  const double expected = inside * weights;
  const double likely = (inside + 6.0 * std::sqrt(std::max(inside, 1.0 / n) / n)) * weights;
  if (likely > static_cast<double>(max_keys)) return 0;
  return std::min<int64_t>(max_keys, std::max({int64_t{1} << 16, static_cast<int64_t>(std::ceil(3 * expected)),
                                               static_cast<int64_t>(std::ceil(likely))}));
}

}  // namespace finepurify
