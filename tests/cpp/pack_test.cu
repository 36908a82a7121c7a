// Device code of csrc/cuda/multi_tensor.cuh run on the host. Pack::blend, the masked reset's merge
// of kept and reset elements in one 16-byte store: every lane mask, for 16-bit and 32-bit packs,
// against a per-element copy. walk_quads, the accumulation's walk: every element of a chunk visited
// once over the block's threads. Built and run by `make check-cuda` where nvcc exists (no GPU).
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

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

// Chunks of many lengths (the kernels' begin is a multiple of the chunk size; odd ones here too):
// the pairs, single quads and tails of all threads cover [begin, end) once, and nothing else.
int check_walk_quads(std::mt19937& rng, int& ranges) {
  using finepurify::cuda::kQuad;
  using finepurify::cuda::kQuadStride;
  using finepurify::cuda::kThreads;
  int failures = 0;
  std::vector<int64_t> lengths = {0, 1, 3, 4, 5, 1023, 1024, 1027, 2047, 2048, 2049, 4095, 4096, 4100, 65536};
  for (int k = 0; k < 40; ++k) lengths.push_back(static_cast<int64_t>(rng() % 70000));
  for (int64_t begin : {int64_t{0}, int64_t{65536}, int64_t{3 * 65536}, int64_t{5}}) {
    for (int64_t length : lengths) {
      const int64_t end = begin + length;
      std::vector<int> visits(static_cast<size_t>(end + 2 * kQuadStride + kQuad), 0);
      auto mark = [&](int64_t i, int64_t n) {
        for (int64_t j = i; j < i + n; ++j) ++visits[static_cast<size_t>(j)];
      };
      for (int thread = 0; thread < kThreads; ++thread) {
        finepurify::cuda::walk_quads(
            begin, end, thread, [&](int64_t i) { mark(i, kQuad); mark(i + kQuadStride, kQuad); },
            [&](int64_t i) { mark(i, kQuad); }, [&](int64_t i) { mark(i, end - i); });
      }
      for (size_t j = 0; j < visits.size(); ++j) {
        const int want = static_cast<int64_t>(j) >= begin && static_cast<int64_t>(j) < end ? 1 : 0;
        if (visits[j] != want) ++failures;
      }
      ++ranges;
    }
  }
  return failures;
}

int main() {
  std::mt19937 rng(7);
  const int failures = check_blend<float>(rng) + check_blend<BFloat16Bits>(rng);
  std::printf("Pack::blend over %d lane masks, float32 and 16-bit: %s (%d failures)\n", 1 << kPack,
              failures == 0 ? "all passed" : "FAILED", failures);
  int ranges = 0;
  const int walk_failures = check_walk_quads(rng, ranges);
  std::printf("walk_quads over %d chunks: %s (%d elements wrong)\n", ranges,
              walk_failures == 0 ? "all passed" : "FAILED", walk_failures);
  return failures == 0 && walk_failures == 0 ? 0 : 1;
}
