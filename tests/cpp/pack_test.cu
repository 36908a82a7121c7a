// Pack::blend (csrc/cuda/multi_tensor.cuh), the masked reset's merge of kept and reset elements in
// one 16-byte store, run on the host: every lane mask, for 16-bit and 32-bit packs, against a
// per-element copy. Built and run by `make check-cuda` where nvcc exists (no GPU needed).
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>

#include "../../csrc/cuda/multi_tensor.cuh"

using finepurify::cuda::BFloat16Bits;
using finepurify::cuda::kPack;
using finepurify::cuda::Pack;

template <typename T>
int check_blend(std::mt19937& rng) {
  int failures = 0;
  for (uint32_t lanes = 0; lanes < (1u << kPack); ++lanes) {
    T kept[kPack], reset[kPack];
    for (auto* values : {kept, reset}) {
      for (int j = 0; j < kPack; ++j) {
        const uint32_t bits = static_cast<uint32_t>(rng());
        std::memcpy(&values[j], &bits, sizeof(T));  // the low bytes: any bit pattern
      }
    }
    Pack<T> out, other;
    std::memcpy(out.words, kept, sizeof kept);
    std::memcpy(other.words, reset, sizeof reset);
    out.blend(other, lanes);
    T got[kPack];
    std::memcpy(got, out.words, sizeof got);
    for (int j = 0; j < kPack; ++j) {
      const T& want = (lanes >> j) & 1 ? reset[j] : kept[j];
      if (std::memcmp(&got[j], &want, sizeof(T)) != 0) ++failures;
    }
  }
  return failures;
}

int main() {
  std::mt19937 rng(7);
  const int failures = check_blend<float>(rng) + check_blend<BFloat16Bits>(rng);
  std::printf("Pack::blend over %d lane masks, float32 and 16-bit: %s (%d failures)\n", 1 << kPack,
              failures == 0 ? "all passed" : "FAILED", failures);
  return failures == 0 ? 0 : 1;
}
