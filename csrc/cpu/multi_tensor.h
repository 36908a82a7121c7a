// The CPU multi-tensor launcher: every op splits its tensor list into fixed-size chunks and runs
// them with at::parallel_for, so small and large tensors share the same threads.
//
// Included by the kernel files, which are compiled once per CPU capability (see capability.h):
// everything here lives in that capability's namespace, so the copies never collide.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <vector>

#include "../kernels/tensor_arg.h"
#include "capability.h"

namespace finepurify::cpu::FP_CPU_NS {

using Vec = at::vec::Vectorized<float>;

struct Chunk {
  int64_t tensor;  // index into the op's lists
  int64_t begin;   // element range [begin, end) of that tensor
  int64_t end;
};

// 64K elements: large enough to amortise the per-chunk work, small enough to balance two threads
// on a model whose largest tensor dominates.
constexpr int64_t kChunkElems = int64_t{1} << 16;

inline std::vector<Chunk> split_into_chunks(const TensorArg* tensors, int64_t num_tensors) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < num_tensors; ++t) {
    for (int64_t begin = 0; begin < tensors[t].numel; begin += kChunkElems) {
      chunks.push_back({t, begin, std::min(begin + kChunkElems, tensors[t].numel)});
    }
  }
  return chunks;
}

// Runs fn(first_chunk, last_chunk) over contiguous runs of chunks, one run per thread.
template <typename Fn>
void parallel_over_chunks(const std::vector<Chunk>& chunks, const Fn& fn) {
  const int64_t n = static_cast<int64_t>(chunks.size());
  // One chunk is not worth waking the thread pool for.
  at::parallel_for(0, n, /*grain_size=*/2, [&](int64_t first, int64_t last) {
    fn(chunks.data() + first, chunks.data() + last);
  });
}

// Calls fn with a null pointer of the storage type of `dtype`, for `if constexpr`-free dispatch.
template <typename Fn>
void dispatch_storage(DType dtype, const Fn& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(static_cast<float*>(nullptr)); break;
    case DType::kBFloat16: fn(static_cast<c10::BFloat16*>(nullptr)); break;
    case DType::kFloat16: fn(static_cast<c10::Half*>(nullptr)); break;
  }
}

inline Vec load_float(const float* p) { return Vec::loadu(p); }
inline Vec load_float(const c10::BFloat16* p) {
  Vec out;
  at::vec::load_to_float(p, out);
  return out;
}
inline Vec load_float(const c10::Half* p) {
  Vec out;
  at::vec::load_to_float(p, out);
  return out;
}

// Lane bitmask of a comparison result (all-ones lanes where true).
inline int true_lanes(const Vec& cmp) {
  return ~cmp.zero_mask() & ((1 << Vec::size()) - 1);
}

}  // namespace finepurify::cpu::FP_CPU_NS
