// The element math every backend shares (csrc/kernels/score_math.h), on the host: the forms the GPU
// kernels use (|x| compares, the score key, one-shift level-0 bins, runs of bins) against the plain
// forms they replaced, over special values and random bit patterns. The GPU runs the same
// functions, so this is what a machine without a GPU can check of them.
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <random>
#include <vector>

#include "kernels/score_math.h"

namespace {

using finepurify::BetweenBins;
using finepurify::BinRun;
using finepurify::DigitSelector;

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok && failures < 20) std::cout << "FAIL " << what << std::endl;
  if (!ok) ++failures;
}

uint32_t bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

float from_bits(uint32_t b) {
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

// The forms before the GPU diet.
bool plain_rankable(float f, float p, float h) {
  constexpr float kMax = 3.402823466e+38f;
  return (f <= kMax && f >= -kMax) && (p <= kMax && p >= -kMax) && h >= 0.0f && h <= kMax;
}

int plain_bin(int level, uint32_t prefix, float score, bool rankable) {
  const uint32_t key = bits(score);
  if (!rankable || key > finepurify::kInfBits) return static_cast<int>(finepurify::level_bins(level));
  const int prefix_shift = finepurify::level_shift(level) + finepurify::level_bits(level);
  if ((key >> prefix_shift) != prefix) return DigitSelector::kNotCounted;
  return static_cast<int>((key >> finepurify::level_shift(level)) & (finepurify::level_bins(level) - 1));
}

}  // namespace

int main() {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> values = {0.0f, -0.0f, 1.0f, -1.0f, 0.5f, 3.0f, 1e-30f, -1e-30f,
                               FLT_MIN, FLT_TRUE_MIN, -FLT_TRUE_MIN, FLT_MAX, -FLT_MAX,
                               1e30f, -1e30f, inf, -inf, nan, -nan, from_bits(0x7F800001u)};
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int i = 0; i < 12; ++i) values.push_back(normal(rng));
  for (int i = 0; i < 8; ++i) values.push_back(from_bits(static_cast<uint32_t>(rng())));

  // rankable_inputs: the same answer as the plain form, on every triple.
  int64_t triples = 0;
  for (float f : values) {
    for (float p : values) {
      for (float h : values) {
        ++triples;
        expect(finepurify::rankable_inputs(f, p, h) == plain_rankable(f, p, h), "rankable_inputs");
      }
    }
  }

  // The score key and the bins: every level, prefixes that match and that do not; level 0's one
  // shift equals the selector. Special values, then random bit patterns (every float kind).
  std::vector<float> scores = values;
  for (int i = 0; i < 200000; ++i) scores.push_back(from_bits(static_cast<uint32_t>(rng())));
  for (float s : scores) {
    for (bool rankable : {true, false}) {
      const uint32_t key = finepurify::score_key(s, rankable);
      expect(finepurify::top_level_bin(key) == plain_bin(0, 0, s, rankable), "top_level_bin");
      for (int level = 0; level < finepurify::kNumLevels; ++level) {
        const int prefix_shift = finepurify::level_shift(level) + finepurify::level_bits(level);
        const uint32_t own_prefix = prefix_shift >= 32 ? 0u : bits(s) >> prefix_shift;
        for (uint32_t prefix : {own_prefix, own_prefix ^ 1u, 0u}) {
          if (level == 0 && prefix != 0) continue;  // level 0 has no higher digits
          const DigitSelector digit(level, prefix);
          expect(digit.bin(s, rankable) == plain_bin(level, prefix, s, rankable), "DigitSelector::bin");
        }
      }
    }
  }

  // BinRun: runs handed over add up to the plain per-element histogram.
  for (int trial = 0; trial < 200; ++trial) {
    const int num_bins = 1 + static_cast<int>(rng() % 9);
    std::vector<int64_t> expected(num_bins, 0), got(num_bins, 0);
    BinRun run;
    const int n = static_cast<int>(rng() % 300);
    int previous = 0;
    for (int i = 0; i < n; ++i) {
      // Long runs, repeats of the previous bin, and uncounted elements.
      const uint32_t pick = rng() % 4;
      const int bin = pick == 0 ? DigitSelector::kNotCounted
                                : (pick == 1 ? previous : static_cast<int>(rng() % num_bins));
      if (bin != DigitSelector::kNotCounted) {
        ++expected[bin];
        previous = bin;
      }
      run.add(bin, [&](bool when, int b, uint32_t count) { got[b] += when ? count : 0; });
    }
    run.flush([&](bool when, int b, uint32_t count) { got[b] += when ? count : 0; });
    expect(got == expected, "BinRun histogram");
  }

  // BetweenBins: every key strictly between the ends lands in one of kMaxBins bins, in order,
  // the highest key in the last bin used, and the bins are the narrowest that do (shift minimal).
  for (int trial = 0; trial < 2000; ++trial) {
    const uint32_t inf = finepurify::kInfBits;
    uint32_t low = static_cast<uint32_t>(rng()) % (inf + 1u), high = static_cast<uint32_t>(rng()) % (inf + 1u);
    if (trial % 3 == 0) high = low + static_cast<uint32_t>(rng() % 5000u);  // narrow ranges
    if (high > inf) high = inf;
    if (low > high) std::swap(low, high);
    const BetweenBins bins(low, high);
    if (high - low < 2u) {
      expect(bins.shift == 0, "BetweenBins: no key between");
      continue;
    }
    const uint32_t span = high - low - 2u;
    expect(bins.bin(low + 1u) == 0, "BetweenBins: the lowest key in bin 0");
    expect(bins.bin(high - 1u) < finepurify::kMaxBins, "BetweenBins: the highest key in range");
    expect(bins.shift == 0 || (span >> (bins.shift - 1)) >= finepurify::kMaxBins, "BetweenBins: narrowest");
    const uint32_t key = low + 1u + static_cast<uint32_t>(rng() % (span + 1u));
    expect(bins.bin(key) <= bins.bin(key == high - 1u ? key : key + 1u), "BetweenBins: in order");
  }

  std::cout << triples << " input triples, " << scores.size() << " scores: "
            << (failures == 0 ? "all passed" : "FAILED") << " (" << failures << " failures)" << std::endl;
  return failures == 0 ? 0 : 1;
}
