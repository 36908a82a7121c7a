// Element math shared by every backend: the drift score and the digits of its float bits that the
// exact threshold search walks. Host/device inline, no torch headers.
#pragma once
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
FP_HOST_DEVICE bool rankable_inputs(float finetuned, float pretrained, float hessian) {
  constexpr float kMaxFinite = 3.402823466e+38f;
  return (finetuned <= kMaxFinite && finetuned >= -kMaxFinite) &&
         (pretrained <= kMaxFinite && pretrained >= -kMaxFinite) && hessian >= 0.0f &&
         hessian <= kMaxFinite;
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
    const uint32_t key = float_bits(score);
    if (!rankable || key > kInfBits) return unrankable_bin();
    // prefix_shift is 31 at level 0: every rankable key has a zero sign bit, so all count.
    if ((key >> prefix_shift) != prefix) return kNotCounted;
    return static_cast<int>((key >> shift) & bin_mask);
  }
};

}  // namespace finepurify
