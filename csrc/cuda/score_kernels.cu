// The drift-score family on CUDA: scores, the histogram passes of the exact threshold search,
// and the masked reset. Each reads finetuned, pretrained and hessian once per pass and
// recomputes the score in registers; no score vector is materialised.
#include <type_traits>
#include <vector>

#include "../kernels/score_math.h"
#include "kernels.h"
#include "multi_tensor.cuh"

namespace finepurify::cuda {
namespace {

// Lists of a score launch table.
constexpr int kFinetuned = 0, kPretrained = 1, kHessian = 2;

template <int N>
using Count = std::integral_constant<int, N>;

template <typename T, typename Fn>
__device__ __forceinline__ void visit_one(const T* ft, const T* pre, float h, int64_t j, Fn&& fn) {
  const float f[1] = {load_as_float(ft + j)}, p[1] = {load_as_float(pre + j)}, hv[1] = {h};
  fn(j, Count<1>{}, f, p, hv, static_cast<const Pack<T>*>(nullptr), static_cast<const Pack<T>*>(nullptr));
}

// The vector path of visit_scores: every pointer 16-byte aligned.
template <typename T, bool Broadcast, typename Fn>
__device__ __forceinline__ void visit_packs(const T* ft, const T* pre, const float* h, int64_t begin,
                                            int64_t end, Fn&& fn) {
  const float h_all = Broadcast ? h[0] : 0.0f;
  float f[kPack], p[kPack], hv[kPack];
  auto visit_pack = [&](int64_t i, const Pack<T>& f_pack, const Pack<T>& p_pack, const Pack<float>& h_pack) {
#pragma unroll
    for (int j = 0; j < kPack; ++j) {
      f[j] = f_pack.as_float(j);
      p[j] = p_pack.as_float(j);
      hv[j] = Broadcast ? h_all : h_pack.as_float(j);
    }
    fn(i, Count<kPack>{}, f, p, hv, &f_pack, &p_pack);
  };
  constexpr int64_t kStride = int64_t{kThreads} * kPack;  // one block step
  int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kPack;
  // kPacksPerStep packs per thread in flight: every load of the group issued before the first use.
  for (; i + (kPacksPerStep - 1) * kStride + kPack <= end; i += kPacksPerStep * kStride) {
    Pack<T> f_pack[kPacksPerStep], p_pack[kPacksPerStep];
    Pack<float> h_pack[kPacksPerStep];
#pragma unroll
    for (int u = 0; u < kPacksPerStep; ++u) {
      f_pack[u].load(ft + i + u * kStride);
      p_pack[u].load(pre + i + u * kStride);
      if (!Broadcast) h_pack[u].load(h + i + u * kStride);
    }
#pragma unroll
    for (int u = 0; u < kPacksPerStep; ++u) visit_pack(i + u * kStride, f_pack[u], p_pack[u], h_pack[u]);
  }
  for (; kPacksPerStep > 1 && i + kPack <= end; i += kStride) {  // a chunk's last packs, one at a time
    Pack<T> f_pack, p_pack;
    Pack<float> h_pack;
    f_pack.load(ft + i);
    p_pack.load(pre + i);
    if (!Broadcast) h_pack.load(h + i);
    visit_pack(i, f_pack, p_pack, h_pack);
  }
  // Scalar tail: only the thread whose pack straddles `end` has work here.
  for (int64_t j = i; j < end && j < i + kPack; ++j) visit_one<T>(ft, pre, Broadcast ? h_all : h[j], j, fn);
}

// Calls fn(i, Count<n>, f, p, h, f_raw, p_raw) over this block's share of [begin, end) of tensor
// t: f, p, h hold the float32 values of elements i .. i+n-1 (n == kPack on the vector path, 1
// otherwise; a compile-time count, so callers unroll over registers) and, on the vector path,
// f_raw and p_raw the loaded packs of finetuned and pretrained (null otherwise). A broadcast
// hessian (one element for the tensor) is read once, and its loop is compiled apart, so the
// common loop carries no per-element select.
template <typename T, int NumLists, typename Fn>
__device__ __forceinline__ void visit_scores(const LaunchTable<NumLists>& table, int t,
                                             int64_t begin, int64_t end, Fn&& fn) {
  const T* ft = static_cast<const T*>(table.data[kFinetuned][t]);
  const T* pre = static_cast<const T*>(table.data[kPretrained][t]);
  const float* h = static_cast<const float*>(table.data[kHessian][t]);
  const bool broadcast = (table.broadcast_mask >> t) & 1;
  if ((table.aligned_mask >> t) & 1) {
    if (broadcast) {
      visit_packs<T, true>(ft, pre, h, begin, end, fn);
    } else {
      visit_packs<T, false>(ft, pre, h, begin, end, fn);
    }
  } else {
    const float h_all = broadcast ? h[0] : 0.0f;
    for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
      visit_one<T>(ft, pre, broadcast ? h_all : h[j], j, fn);
    }
  }
}

#ifndef FP_SECTOR_STORES
#define FP_SECTOR_STORES 1  // 0: each lane stores its own pack (bench/gpu_variants.sh compares)
#endif
constexpr bool kSectorStores = FP_SECTOR_STORES != 0;

// Stores lane pairs' packs of 8 float32 scores as whole 32-byte sectors: written directly, each of
// a pack's two 16-byte stores covers half of every sector the warp's store touches, and a score
// buffer is not in L2 yet (unlike a reset's weights, just read), so every half-written sector may
// cost the memory a read as well. Lanes 2s and 2s+1 swap a word, then the first store writes lane
// 2s's pack and the second lane 2s+1's. `pair_in_range`: both lanes of the pair hold a pack
// (the same value on both lanes); otherwise each lane stores its own.
__device__ __forceinline__ void store_scores_by_sector(const Pack<float>& scores, float* out, int64_t i,
                                                       bool pair_in_range) {
  if (!pair_in_range) {
    scores.store(out + i);
    return;
  }
  const unsigned lane = threadIdx.x % 32;
  const bool odd = lane & 1u;
  const unsigned pair_mask = 3u << (lane & ~1u);
  const uint4 give = odd ? scores.words[0] : scores.words[1];  // the word the partner writes
  uint4 got;
  got.x = __shfl_xor_sync(pair_mask, give.x, 1);
  got.y = __shfl_xor_sync(pair_mask, give.y, 1);
  got.z = __shfl_xor_sync(pair_mask, give.z, 1);
  got.w = __shfl_xor_sync(pair_mask, give.w, 1);
  // Even lane: its word 0, then the odd lane's word 0. Odd lane: the even lane's word 1, then its
  // word 1. Packs are 8 elements apart.
  uint4* first = reinterpret_cast<uint4*>(out + (odd ? i - kPack + 4 : i));
  uint4* second = reinterpret_cast<uint4*>(out + (odd ? i + 4 : i + kPack));
  *first = odd ? got : scores.words[0];
  *second = odd ? scores.words[1] : got;
}

template <typename T, bool Random>
__global__ void __launch_bounds__(kThreads)
    drift_score_kernel(LaunchTable<4> table, ScoreSpec spec) {
  for_each_chunk(table, [&](int t, int64_t begin, int64_t end) {
    float* out = static_cast<float*>(table.data[3][t]);
    const uint64_t stream = table.stream[t];
    visit_scores<T>(table, t, begin, end, [&](int64_t i, auto count, const float* f,
                                              const float* p, const float* h, const auto*, const auto*) {
      constexpr int n = decltype(count)::value;
      if constexpr (n == kPack) {
        Pack<float> scores;
#pragma unroll
        for (int j = 0; j < kPack; ++j) scores.set_float(j, spec.template score_as<Random>(f[j], p[j], h[j], stream, i + j));
        // Packs of one step are kPack apart, lane by lane; the pair's first pack is at i & ~(2 kPack - 1)
        // relative to the chunk's start (a multiple of 2 kPack).
        const int64_t pair_first = i - ((i - begin) & (2 * kPack - 1));
        store_scores_by_sector(scores, out, i, kSectorStores && kPacksPerStep == 1 && pair_first + 2 * kPack <= end);
      } else {
        out[i] = spec.template score_as<Random>(f[0], p[0], h[0], stream, i);
      }
    });
  });
}

// Calls fn(key) with the score key (score_key) of every element of this block's share of the
// table, counting in `unmoved` those that never moved: the walk of the kernels that count keys.
template <typename T, bool Random, typename Fn>
__device__ __forceinline__ void for_each_key(const LaunchTable<3>& table, const ScoreSpec& spec,
                                             unsigned int& unmoved, Fn&& fn) {
  for_each_chunk(table, [&](int t, int64_t begin, int64_t end) {
    const uint64_t stream = table.stream[t];
    visit_scores<T>(table, t, begin, end, [&](int64_t i, auto count, const float* f,
                                              const float* p, const float* h, const auto*, const auto*) {
#pragma unroll
      for (int j = 0; j < decltype(count)::value; ++j) {
        unmoved += f[j] == p[j];
        fn(score_key(spec.template score_as<Random>(f[j], p[j], h[j], stream, i + j),
                     rankable_inputs(f[j], p[j], h[j])));
      }
    });
  });
}

// Resident blocks per SM the histogram kernel is compiled for: it is bound by latency more than by
// bandwidth, so occupancy is worth a register cap (no spills at this bound; see ptxas -v).
#ifndef FP_HISTOGRAM_BLOCKS_PER_SM
#define FP_HISTOGRAM_BLOCKS_PER_SM 4
#endif
constexpr int kHistogramBlocksPerSM = FP_HISTOGRAM_BLOCKS_PER_SM;

// One block-private histogram in shared memory (32-bit counters), added to the global int64
// counts once per block. Each thread adds runs of equal bins (BinRun): real models hold long runs
// of identical scores (weights that never moved score 0), which would otherwise send a whole warp
// to one bank. Weights that never moved are counted in a register. TopLevel: level 0,
// whose bin is one shift of the score's key (top_level_bin).
template <typename T, bool Random, bool TopLevel>
__global__ void __launch_bounds__(kThreads, kHistogramBlocksPerSM)
    score_histogram_kernel(LaunchTable<3> table, ScoreSpec spec, DigitSelector digit,
                           unsigned long long* counts) {
  __shared__ unsigned int bins[kMaxBins + 1];
  const int num_bins = digit.unrankable_bin() + 1;
  for (int b = threadIdx.x; b < num_bins; b += kThreads) bins[b] = 0;
  __syncthreads();
  BinRun run;  // a thread's run of equal bins (score_math.h)
  // A predicated shared-memory add (red.shared): by static count of the sm_90 code, 4 fewer
  // instructions per element than atomicAdd under `if` (the shared address is formed once).
  // ptxas may still branch around it.
  auto add_to_bin = [&](bool when, int bin, uint32_t count) {
    const auto address = static_cast<uint32_t>(__cvta_generic_to_shared(&bins[bin]));
    asm volatile("{\n\t.reg .pred p;\n\tsetp.ne.u32 p, %2, 0;\n\t@p red.shared.add.u32 [%0], %1;\n\t}"
                 :: "r"(address), "r"(count), "r"(static_cast<uint32_t>(when)) : "memory");
  };
  unsigned int unmoved = 0;  // a block counts fewer than 2^32 elements (launch_multi_tensor)
  for_each_key<T, Random>(table, spec, unmoved, [&](uint32_t key) {
    if constexpr (TopLevel) {
      run.add(top_level_bin(key), add_to_bin);
    } else {
      // Below level 0 few elements count (those under the chosen prefix): skip the run's
      // bookkeeping for the others; a warp with none of them does not enter.
      const int bin = digit.bin_of_key(key);
      if (bin != DigitSelector::kNotCounted) run.add(bin, add_to_bin);
    }
  });
  run.flush(add_to_bin);
  const unsigned long long unmoved_in_warp = warp_sum(unmoved);
  if (threadIdx.x % 32 == 0 && unmoved_in_warp != 0) atomicAdd(counts + num_bins, unmoved_in_warp);
  __syncthreads();
  for (int b = threadIdx.x; b < num_bins; b += kThreads) {
    if (bins[b] != 0) atomicAdd(counts + b, static_cast<unsigned long long>(bins[b]));
  }
}

// score_candidates: the score keys above, at either end of, and strictly between [low_key,
// high_key]; those between are counted in a block-private histogram (BetweenBins, in shared
// memory) and appended to `keys` (at most `capacity`) at slots taken from counts[2], one atomic
// per warp and element position that holds any (a warp-aggregated append: few keys fall
// between). Once a lane's warp has seen the slots run out (or with no room at all, a first pass
// over a bracket too wide to keep: millions of keys, one same-address atomic each step), its
// between keys are counted in a register instead, like the other counts until the block ends.
template <typename T, bool Random>
__global__ void __launch_bounds__(kThreads)
    score_candidates_kernel(LaunchTable<3> table, ScoreSpec spec, uint32_t low_key, uint32_t high_key,
                            int64_t capacity, unsigned long long* counts, int32_t* keys) {
  __shared__ unsigned int bins[kMaxBins];
  for (int b = threadIdx.x; b < kMaxBins; b += kThreads) bins[b] = 0;
  __syncthreads();
  const BetweenBins between_bins(low_key, high_key);
  unsigned int above = 0, at_high = 0, at_low = 0, unrankable = 0, unmoved = 0;  // a block counts < 2^32
  unsigned int between_unkept = 0;  // counted here once no slot is left
  bool slots_left = capacity > 0;
  const unsigned lane = threadIdx.x % 32;
  for_each_key<T, Random>(table, spec, unmoved, [&](uint32_t key) {
    const bool rankable = key != kUnrankableKey;  // above every rankable key: never between
    unrankable += !rankable;
    above += rankable && key > high_key;
    at_high += key == high_key;
    at_low += key == low_key && key != high_key;
    const bool between = key > low_key && key < high_key;
    if (between) atomicAdd(&bins[between_bins.bin(key)], 1u);
    if (!slots_left) {
      between_unkept += between;
      return;
    }
    // The lanes here now (all of them but in a tensor's last step, or once some saw the slots run
    // out) append together: the group sees one base, so slots_left is the same across the group
    // (lanes outside it may differ; the slot check and between_unkept count every key either way).
    const unsigned active = __activemask();
    const unsigned found = __ballot_sync(active, between);
    if (found != 0) {
      const int leader = __ffs(active) - 1;
      unsigned long long base = 0;
      if (lane == static_cast<unsigned>(leader)) base = atomicAdd(counts + 2, static_cast<unsigned long long>(__popc(found)));
      base = __shfl_sync(active, base, leader);
      if (between) {
        const unsigned long long slot = base + __popc(found & ((1u << lane) - 1u));
        if (slot < static_cast<unsigned long long>(capacity)) keys[slot] = static_cast<int32_t>(key);
      }
      slots_left = base + __popc(found) < static_cast<unsigned long long>(capacity);
    }
  });
  const unsigned long long sums[6] = {warp_sum(above), warp_sum(at_high), warp_sum(at_low),
                                      warp_sum(unrankable), warp_sum(unmoved), warp_sum(between_unkept)};
  constexpr int kSlot[6] = {0, 1, 3, 4, 5, 2};
  if (lane == 0) {
#pragma unroll
    for (int c = 0; c < 6; ++c) {
      if (sums[c] != 0) atomicAdd(counts + kSlot[c], sums[c]);
    }
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kMaxBins; b += kThreads) {
    if (bins[b] != 0) atomicAdd(counts + kCandidateCounts + b, static_cast<unsigned long long>(bins[b]));
  }
}

// score_sample: a thread per sampled element; each chunk scores the runs that start in it (a run
// may end in the next chunk of its tensor), a tensor shorter than one stride its head in its
// only chunk. table.data[3][t]: tensor t's first key in the output.
template <typename T, bool Random>
__global__ void __launch_bounds__(kThreads)
    score_sample_kernel(LaunchTable<4> table, ScoreSpec spec, int64_t stride, unsigned long long* counts) {
  unsigned int unrankable = 0, unmoved = 0;  // a block samples fewer than 2^32 elements
  for_each_chunk(table, [&](int t, int64_t begin, int64_t end) {
    const int64_t n = table.numel[t];
    const T* ft = static_cast<const T*>(table.data[kFinetuned][t]);
    const T* pre = static_cast<const T*>(table.data[kPretrained][t]);
    const float* h = static_cast<const float*>(table.data[kHessian][t]);
    const bool scalar_h = (table.broadcast_mask >> t) & 1u;
    int32_t* out = static_cast<int32_t*>(table.data[3][t]);
    int64_t first = 0, last = 0;  // the sample's elements of this chunk
    if (n >= stride) {
      const int64_t runs = n / stride;
      first = min((begin + stride - 1) / stride, runs) * kSampleRun;
      last = min((end + stride - 1) / stride, runs) * kSampleRun;
    } else if (begin == 0) {
      last = sample_size(n, stride);
    }
    for (int64_t j = first + threadIdx.x; j < last; j += kThreads) {
      const int64_t i = sample_position(j, n, stride);
      const float f = load_as_float(ft + i), p = load_as_float(pre + i), hv = h[scalar_h ? 0 : i];
      const uint32_t key = score_key(spec.template score_as<Random>(f, p, hv, table.stream[t], i),
                                     rankable_inputs(f, p, hv));
      out[j] = static_cast<int32_t>(key);
      unrankable += key == kUnrankableKey;
      unmoved += f == p;
    }
  });
  const unsigned long long sums[2] = {warp_sum(unrankable), warp_sum(unmoved)};
  if (threadIdx.x % 32 == 0) {
    if (sums[0] != 0) atomicAdd(counts, sums[0]);
    if (sums[1] != 0) atomicAdd(counts + 1, sums[1]);
  }
}

template <typename T, bool Random>
__global__ void __launch_bounds__(kThreads)
    masked_reset_kernel(LaunchTable<3> table, ScoreSpec spec, float threshold,
                        unsigned long long* counts) {
  for_each_chunk(table, [&](int t, int64_t begin, int64_t end) {
    T* ft = static_cast<T*>(table.data[kFinetuned][t]);
    const uint64_t stream = table.stream[t];
    unsigned int num_reset = 0;  // a chunk has kChunkElems elements
    visit_scores<T>(table, t, begin, end, [&](int64_t i, auto count, const float* f,
                                              const float* p, const float* h,
                                              const auto* f_raw, const auto* p_raw) {
      constexpr int n = decltype(count)::value;
      uint32_t lanes = 0;  // bit j: element i + j is reset
#pragma unroll
      for (int j = 0; j < n; ++j) {
        const bool reset = spec.template score_as<Random>(f[j], p[j], h[j], stream, i + j) >= threshold;
        lanes |= (reset ? 1u : 0u) << j;
      }
      num_reset += __popc(lanes);
      if (lanes == 0) return;
      if constexpr (n == kPack) {
        // The whole pack is written back, its kept elements with the bits just read: one
        // 16-byte store per pack with a reset instead of a scattered store per element.
        Pack<T> out = *f_raw;
        out.blend(*p_raw, lanes);
        out.store(ft + i);
      } else {
        ft[i] = static_cast<const T*>(table.data[kPretrained][t])[i];
      }
    });
    // The chunk lies in one tensor: one atomic per warp and chunk.
    const unsigned long long in_warp = warp_sum(static_cast<unsigned long long>(num_reset));
    if (threadIdx.x % 32 == 0 && in_warp != 0) atomicAdd(counts + table.list_index[t], in_warp);
  });
}

// Launches a score kernel over the lists, once per storage dtype of the weights:
// kernel_for(tag) returns the instance for that dtype (tag: a null pointer of it), e.g. the drift
// or the random ranking's. The hessians may hold one element for a whole tensor.
template <int NumLists, typename KernelFor, typename... Args>
void launch_per_dtype(const TensorArg* const (&lists)[NumLists], int64_t num_tensors, const uint64_t* streams,
                      cudaStream_t stream, KernelFor&& kernel_for, Args... args) {
  const LaunchExtras extras{kHessian, streams};
  for (DType dtype : kAllDTypes) {
    dispatch_storage(dtype, [&](auto* tag) {
      launch_multi_tensor(kernel_for(tag), lists, num_tensors, kFinetuned, dtype, extras, stream, args...);
    });
  }
}

}  // namespace

void drift_score(const TensorArg* finetuned, const TensorArg* pretrained,
                 const TensorArg* hessians, const TensorArg* scores, int64_t num_tensors,
                 const ScoreSpec& spec, const uint64_t* streams, cudaStream_t stream) {
  const TensorArg* const lists[4] = {finetuned, pretrained, hessians, scores};
  launch_per_dtype(lists, num_tensors, streams, stream, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return spec.random ? drift_score_kernel<T, true> : drift_score_kernel<T, false>;
  }, spec);
}

void score_histogram(const TensorArg* finetuned, const TensorArg* pretrained,
                     const TensorArg* hessians, int64_t num_tensors, const ScoreSpec& spec,
                     const uint64_t* streams, int level, uint32_t prefix, int64_t* counts,
                     cudaStream_t stream) {
  const TensorArg* const lists[3] = {finetuned, pretrained, hessians};
  launch_per_dtype(lists, num_tensors, streams, stream, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return spec.random ? (level == 0 ? score_histogram_kernel<T, true, true> : score_histogram_kernel<T, true, false>)
                       : (level == 0 ? score_histogram_kernel<T, false, true> : score_histogram_kernel<T, false, false>);
  }, spec, DigitSelector(level, prefix), reinterpret_cast<unsigned long long*>(counts));
}

void score_candidates(const TensorArg* finetuned, const TensorArg* pretrained,
                      const TensorArg* hessians, int64_t num_tensors, const ScoreSpec& spec,
                      const uint64_t* streams, uint32_t low_key, uint32_t high_key, int64_t capacity,
                      int64_t* counts, int32_t* keys, cudaStream_t stream) {
  const TensorArg* const lists[3] = {finetuned, pretrained, hessians};
  launch_per_dtype(lists, num_tensors, streams, stream, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return spec.random ? score_candidates_kernel<T, true> : score_candidates_kernel<T, false>;
  }, spec, low_key, high_key, capacity, reinterpret_cast<unsigned long long*>(counts), keys);
}

void score_sample(const TensorArg* finetuned, const TensorArg* pretrained,
                  const TensorArg* hessians, int64_t num_tensors, const ScoreSpec& spec,
                  const uint64_t* streams, int64_t stride, int32_t* keys, int64_t* counts,
                  cudaStream_t stream) {
  std::vector<TensorArg> out(static_cast<size_t>(num_tensors));  // each tensor's first key
  int64_t offset = 0;
  for (int64_t t = 0; t < num_tensors; ++t) {
    out[t] = TensorArg{keys + offset, sample_size(finetuned[t].numel, stride), DType::kFloat32};
    offset += out[t].numel;
  }
  const TensorArg* const lists[4] = {finetuned, pretrained, hessians, out.data()};
  launch_per_dtype(lists, num_tensors, streams, stream, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return spec.random ? score_sample_kernel<T, true> : score_sample_kernel<T, false>;
  }, spec, stride, reinterpret_cast<unsigned long long*>(counts));
}

void masked_reset(const TensorArg* finetuned, const TensorArg* pretrained,
                  const TensorArg* hessians, int64_t num_tensors, const ScoreSpec& spec,
                  const uint64_t* streams, float threshold, int64_t* counts, cudaStream_t stream) {
  const TensorArg* const lists[3] = {finetuned, pretrained, hessians};
  launch_per_dtype(lists, num_tensors, streams, stream, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return spec.random ? masked_reset_kernel<T, true> : masked_reset_kernel<T, false>;
  }, spec, threshold, reinterpret_cast<unsigned long long*>(counts));
}

}  // namespace finepurify::cuda
