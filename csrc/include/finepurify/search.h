// The threshold search from a sample: its constants, shared by the ops (csrc/ops.cpp), the Python
// side (finepurify_ext._C.constants(), which the tests check threshold.py's copies against) and
// programs that use the C++ API.
#pragma once

#include <cstdint>

namespace finepurify {

// score_threshold's and reset_most_abnormal_'s search="auto" searches from a sample on the CPU from
// this many weights (below it, the three histogram passes cost about what the sample saves).
constexpr int64_t kSampleSearchMinWeights = int64_t{1} << 20;

// The keys one score_candidates pass of the search keeps at most (16 MB); where more fall in its
// range it only counts them, in bins, and the next pass keeps the bin that holds the threshold.
constexpr int64_t kCandidateKeys = int64_t{4} << 20;

}  // namespace finepurify
