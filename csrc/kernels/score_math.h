// Element math shared by every backend: the drift score and the digits of its float bits that the
// exact threshold search walks. Host/device inline, no torch headers.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FP_HOST_DEVICE inline
#endif

namespace finepurify {

// r = (ft - pre)^2 / (h + eps), in float32 and in this order, so every backend and the PyTorch
// reference produce the same bits (build with -ffp-contract=off: no fused multiply-add).
FP_HOST_DEVICE float element_score(float finetuned, float pretrained, float hessian, float eps) {
  const float drift = finetuned - pretrained;
  return drift * drift / (hessian + eps);
}

FP_HOST_DEVICE uint32_t float_bits(float value);
FP_HOST_DEVICE float float_from_bits(uint32_t bits);

// The counter-based generator of the random ranking (Fine-mixing's random mask): a score that is a
// pure function of (the tensor's stream, the element's index), so CPU, CUDA, pieces read out of
// core and shards of a process group all draw the same value for one element, and no score tensor
// exists. splitmix64: the element's state is stream + index * golden, so a piece that starts at
// element `offset` of its tensor is the same sequence from stream + offset * golden.
constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;

FP_HOST_DEVICE uint64_t splitmix64_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// One tensor's (or piece's) stream, host side, once per tensor.
inline uint64_t random_stream(uint64_t seed, uint64_t key, uint64_t offset) {
  return splitmix64_mix(seed ^ splitmix64_mix(key + kGolden)) + offset * kGolden;
}

// A positive float whose bits are uniform over [1, 2^30]: random scores rank uniformly, ties are
// rare (2^30 values), and none is 0, the score of a weight that never moved.
FP_HOST_DEVICE float random_score(uint64_t stream, int64_t index) {
  const uint64_t z = splitmix64_mix(stream + static_cast<uint64_t>(index) * kGolden);
  return float_from_bits(static_cast<uint32_t>(z >> 34) + 1u);
}

// How a score is computed: the one scoring spec of every ranking and every backend.
//   drift score: (ft - pre)^2 / (max(h, hessian_floor) + eps), h a tensor's element or, for a
//     hessian of one element, that value for the whole tensor (a per-tensor curvature);
//   random (Fine-mixing): random_score(stream, index) where ft != pre, 0 where the weight never
//     moved (resetting it would change nothing).
struct ScoreSpec {
  float eps;
  float hessian_floor;
  bool random;

  FP_HOST_DEVICE float score(float finetuned, float pretrained, float hessian, uint64_t stream,
                             int64_t index) const {
    return random ? score_as<true>(finetuned, pretrained, hessian, stream, index)
                  : score_as<false>(finetuned, pretrained, hessian, stream, index);
  }

  // The score with `random` known at compile time: GPU kernels are instantiated per ranking kind,
  // so the drift-score kernels carry none of the generator's registers.
  template <bool Random>
  FP_HOST_DEVICE float score_as(float finetuned, float pretrained, float hessian, uint64_t stream,
                                int64_t index) const {
    if constexpr (Random) {
      return finetuned != pretrained ? random_score(stream, index) : 0.0f;
    } else {
      // max(h, floor) written so that a NaN hessian stays out of the score's way: it is refused
      // by rankable_inputs, which sees the raw value. (Not fmax: the host's returns NaN for a
      // signaling NaN.)
      const float h = hessian > hessian_floor ? hessian : hessian_floor;
      return element_score(finetuned, pretrained, h, eps);
    }
  }
};

FP_HOST_DEVICE uint32_t float_bits(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

FP_HOST_DEVICE float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

// +Inf. Scores are non-negative, so as unsigned integers their bits order like their values; any
// pattern above +Inf is a NaN or has the sign bit set and cannot be ranked.
constexpr uint32_t kInfBits = 0x7F800000u;

// The 31 value bits of a non-negative float, split into three digits (11, 10, 10 bits), most
// significant first. Level L histograms digit L of the scores whose higher digits equal `prefix`.
// 2048 bins fit in L1 on a CPU and in shared memory on a GPU.
constexpr int kNumLevels = 3;
constexpr int64_t kMaxBins = 2048;

FP_HOST_DEVICE int level_bits(int level) { return level == 0 ? 11 : 10; }
FP_HOST_DEVICE int level_shift(int level) { return level == 0 ? 20 : (level == 1 ? 10 : 0); }
FP_HOST_DEVICE int64_t level_bins(int level) { return int64_t{1} << level_bits(level); }

// Whether the inputs of a score can be ranked: finite weights, finite non-negative hessian.
// Written as |x| <= max (a NaN fails every comparison): one compare per weight on a GPU.
FP_HOST_DEVICE bool rankable_inputs(float finetuned, float pretrained, float hessian) {
  constexpr float kMaxFinite = 3.402823466e+38f;
#if defined(__CUDA_ARCH__)
  const float abs_f = fabsf(finetuned), abs_p = fabsf(pretrained);
#else
  const float abs_f = std::fabs(finetuned), abs_p = std::fabs(pretrained);
#endif
  return abs_f <= kMaxFinite && abs_p <= kMaxFinite && hessian >= 0.0f && hessian <= kMaxFinite;
}

// The 32-bit key of one score in the threshold search: its float bits where the inputs are
// rankable and the score is >= +0 and not NaN (such bits order like the values, up to +Inf's),
// else kUnrankableKey, which is above every rankable key.
constexpr uint32_t kUnrankableKey = 0x80000000u;

FP_HOST_DEVICE uint32_t score_key(float score, bool rankable) {
  const uint32_t key = float_bits(score);
  return rankable && key <= kInfBits ? key : kUnrankableKey;
}

// Where one score goes in the histogram of digit `level` among the scores whose higher digits
// equal `prefix`: its bin, kUnrankable (the extra counter at index level_bins(level)), or
// kNotCounted when its higher digits differ.
struct DigitSelector {
  static constexpr int kNotCounted = -1;
  int shift;         // position of this level's digit
  int prefix_shift;  // position of the higher digits
  uint32_t prefix;   // required value of the higher digits
  uint32_t bin_mask;

  FP_HOST_DEVICE DigitSelector(int level, uint32_t prefix_value)
      : shift(level_shift(level)),
        prefix_shift(level_shift(level) + level_bits(level)),
        prefix(prefix_value),
        bin_mask(static_cast<uint32_t>(level_bins(level) - 1)) {}

  FP_HOST_DEVICE int unrankable_bin() const { return static_cast<int>(bin_mask) + 1; }

  FP_HOST_DEVICE int bin(float score, bool rankable) const {
    return bin_of_key(score_key(score, rankable));
  }

  // Written as selects, no branches (a GPU kernel calls it per element). prefix_shift is 31 at
  // level 0: every rankable key has a zero sign bit, so all count there (see top_level_bin).
  FP_HOST_DEVICE int bin_of_key(uint32_t key) const {
    const int digit = static_cast<int>((key >> shift) & bin_mask);
    const int counted = (key >> prefix_shift) == prefix ? digit : kNotCounted;
    return key == kUnrankableKey ? unrankable_bin() : counted;
  }
};

// bin_of_key at level 0 in one shift: the top digit of a rankable key, and for kUnrankableKey
// level_bins(0), the unrankable bin of that level.
FP_HOST_DEVICE int top_level_bin(uint32_t key) { return static_cast<int>(key >> 20); }
static_assert((kUnrankableKey >> 20) == kMaxBins && (kInfBits >> 20) < kMaxBins,
              "level 0's digit is the top 11 bits; the unrankable key must land on the extra bin");

// score_candidates' counts: above, at_high, between, at_low, unrankable, unmoved, then the
// histogram of the keys strictly between low_key and high_key (kMaxBins bins).
constexpr int64_t kCandidateCounts = 6;

// That histogram's bins: 2^shift consecutive keys each from low_key + 1, the narrowest that cover
// the range. A pass that finds more keys between than it may keep still tells which 2^shift keys
// hold the k-th largest; the next pass keeps just those (the range shrinks 2^11-fold a pass).
struct BetweenBins {
  uint32_t first;  // the lowest key between: low_key + 1
  int shift;

  FP_HOST_DEVICE BetweenBins(uint32_t low_key, uint32_t high_key) : first(low_key + 1u), shift(0) {
    // The offset of the highest key between (high_key <= +Inf's bits: below 2^31, so shift <= 20).
    const uint32_t span = high_key > low_key + 1u ? high_key - low_key - 2u : 0u;
    while ((span >> shift) >= static_cast<uint32_t>(kMaxBins)) ++shift;
  }
  // For a key strictly between the ends only.
  FP_HOST_DEVICE int bin(uint32_t key) const { return static_cast<int>((key - first) >> shift); }
};

// score_sample's even sample of one tensor of n elements: runs of kSampleRun consecutive elements
// (whole 64-byte lines of float32: a sample of single elements reads a line per element) at every
// multiple of `stride` that starts a whole stride, or, in a tensor shorter than one stride, its
// first n * kSampleRun / stride elements (at least one): about n * kSampleRun / stride in all.
constexpr int64_t kSampleRun = 16;

FP_HOST_DEVICE int64_t sample_size(int64_t n, int64_t stride) {
  if (n <= 0) return 0;
  if (n >= stride) return (n / stride) * kSampleRun;
  const int64_t head = n * kSampleRun / stride;  // n < stride: no overflow
  return head > 0 ? head : 1;
}

// The position in its tensor of the sample's j-th element (j < sample_size(n, stride)).
FP_HOST_DEVICE int64_t sample_position(int64_t j, int64_t n, int64_t stride) {
  return n >= stride ? (j / kSampleRun) * stride + j % kSampleRun : j;
}

// One thread's run of equal histogram bins, handed over when the bin changes (the GPU histogram
// adds runs to shared memory with one atomic each): add_if(when, bin, length) must add length to
// bin where `when` holds. Branch-free: the callee may predicate its one store (a warp's lanes see
// different bins, and a branch per element costs more than it saves). bin ==
// DigitSelector::kNotCounted is skipped. The empty first run may be handed over as (0, 0), which
// adds nothing.
struct BinRun {
  int bin = 0;
  uint32_t length = 0;  // a GPU block counts fewer than 2^32 elements

  template <typename AddIf>
  FP_HOST_DEVICE void add(int next_bin, AddIf&& add_if) {
    const bool counted = next_bin != DigitSelector::kNotCounted;
    const bool change = counted && next_bin != bin;
    add_if(change, bin, length);
    length = change ? 1u : length + (counted ? 1u : 0u);
    bin = change ? next_bin : bin;
  }
  template <typename AddIf>
  FP_HOST_DEVICE void flush(AddIf&& add_if) const {
    add_if(length != 0, bin, length);
  }
};

}  // namespace finepurify
