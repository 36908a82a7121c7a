// The CUDA multi-tensor launcher shared by every op, and the element loads the kernels use.
//
// Host side: the op's tensor lists are packed, one storage dtype at a time, into launch tables
// of up to kMaxTensorsPerLaunch tensors, passed by value as a kernel parameter (no host-to-device
// copy, no synchronisation). Each tensor is cut into chunks of kChunkElems elements; the table
// keeps the prefix sum of chunk counts. Device side: a persistent grid walks the chunk indices
// and each block processes whole chunks, so many small tensors and a few huge ones (64-bit
// sizes) share one launch.
//
// No torch headers: plain pointers, sizes and a stream (see kernels.h).
#pragma once
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../kernels/tensor_arg.h"

namespace finepurify::cuda {

// Throws with the CUDA error string and the place; the binding turns it into a Python error.
inline void check_cuda(cudaError_t status, const char* what, const char* file, int line) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("finepurify CUDA error: ") + what + ": " +
                             cudaGetErrorString(status) + " (" + file + ":" +
                             std::to_string(line) + ")");
  }
}
#define FP_CUDA_CHECK(expr) ::finepurify::cuda::check_cuda((expr), #expr, __FILE__, __LINE__)
// After every launch: reports bad configurations at once, not at the next synchronisation.
#define FP_LAUNCH_CHECK() FP_CUDA_CHECK(cudaGetLastError())

constexpr int kThreads = 256;
// Each thread handles kPack consecutive elements per step: one 16-byte load of 16-bit weights,
// two of float32 ones and of the float32 hessian.
constexpr int kPack = 8;
// 64K elements per chunk: 32 block steps, enough to hide the chunk lookup.
constexpr int64_t kChunkElems = int64_t{1} << 16;
constexpr int kMaxTensorsPerLaunch = 64;  // aligned_mask has 64 bits
// Packs each thread loads before computing on them, in every kernel (1: load, compute, load...;
// 2: two packs in flight per thread, more memory-level parallelism for more registers). A
// build-time choice (FINEPURIFY_NVCC_FLAGS=-DFP_PACKS_PER_STEP=2; bench/gpu_variants.sh).
#ifndef FP_PACKS_PER_STEP
#define FP_PACKS_PER_STEP 1
#endif
constexpr int kPacksPerStep = FP_PACKS_PER_STEP;

// Up to kMaxTensorsPerLaunch tensors of NumLists parallel lists (e.g. finetuned, pretrained,
// hessian), all of one storage dtype. Must fit the 4 KB kernel parameter limit.
template <int NumLists>
struct LaunchTable {
  void* data[NumLists][kMaxTensorsPerLaunch];
  int64_t numel[kMaxTensorsPerLaunch];
  int64_t first_chunk[kMaxTensorsPerLaunch + 1];  // chunk prefix sums; the last is the total
  int32_t list_index[kMaxTensorsPerLaunch];       // position in the op's lists (for counts)
  uint64_t stream[kMaxTensorsPerLaunch];          // per-tensor random stream (score kernels)
  uint64_t aligned_mask;    // bit t: every pointer of tensor t is 16-byte aligned
  uint64_t broadcast_mask;  // bit t: tensor t of the broadcast list has one element, for all
  int32_t num_tensors;
};

// Per-launch options of launch_multi_tensor: a list whose tensors may hold one element that
// stands for the whole tensor (the hessian of a per-tensor ranking), and per-tensor streams.
struct LaunchExtras {
  int broadcast_list = -1;
  const uint64_t* streams = nullptr;  // host array, one per tensor of the op's lists
};


static_assert(sizeof(LaunchTable<4>) <= 4096, "launch table exceeds the kernel parameter limit");

// Calls fn(tensor, begin, end) for every chunk of the table that this block owns, in order;
// `tensor` indexes the table. The chunk lookup walks forward from the previous chunk's tensor,
// since a block's chunk indices only grow.
template <int NumLists, typename Fn>
__device__ __forceinline__ void for_each_chunk(const LaunchTable<NumLists>& table, Fn&& fn) {
  const int64_t num_chunks = table.first_chunk[table.num_tensors];
  int tensor = 0;
  for (int64_t chunk = blockIdx.x; chunk < num_chunks; chunk += gridDim.x) {
    while (table.first_chunk[tensor + 1] <= chunk) ++tensor;
    const int64_t begin = (chunk - table.first_chunk[tensor]) * kChunkElems;
    const int64_t end = min(begin + kChunkElems, table.numel[tensor]);
    fn(tensor, begin, end);
  }
}

// ------------------------------------------------------------------ element loads, as float32

template <typename T>
struct Storage;  // the raw 16-bit types: bit-exact conversions, no cuda_bf16.h needed
template <>
struct Storage<float> {
  __device__ __forceinline__ static float to_float(float v) { return v; }
};
struct BFloat16Bits {
  uint16_t bits;
};
struct Float16Bits {
  uint16_t bits;
};
template <>
struct Storage<BFloat16Bits> {
  __device__ __forceinline__ static float to_float(BFloat16Bits v) {
    return __uint_as_float(static_cast<uint32_t>(v.bits) << 16);
  }
};
template <>
struct Storage<Float16Bits> {
  __device__ __forceinline__ static float to_float(Float16Bits v) {
    float out;
    asm("cvt.f32.f16 %0, %1;" : "=f"(out) : "h"(v.bits));
    return out;
  }
};

template <typename T>
__device__ __forceinline__ float load_as_float(const T* p) {
  return Storage<T>::to_float(*p);
}

// Sum over the warp, in lane 0 (every lane must call it).
__device__ __forceinline__ unsigned long long warp_sum(unsigned long long value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xFFFFFFFFu, value, offset);
  return value;
}

// Element i of consecutive T values as float32, from the 32-bit word that holds it (word
// i * sizeof(T) / 4 of the run): the element unpacking of Pack and Quad.
template <typename T>
__device__ __forceinline__ float element_as_float(uint32_t word, int i) {
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(word);
  } else {
    T value;
    value.bits = static_cast<uint16_t>(i % 2 == 0 ? (word & 0xFFFFu) : (word >> 16));
    return Storage<T>::to_float(value);
  }
}

// kPack consecutive elements as raw 16-byte words (p must be 16-byte aligned).
template <typename T>
struct Pack {
  static constexpr int kWords = kPack * sizeof(T) / 16;
  uint4 words[kWords];

  __device__ __forceinline__ void load(const T* p) {
    const uint4* src = reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int w = 0; w < kWords; ++w) words[w] = src[w];
  }
  __device__ __forceinline__ void store(T* p) const {
    uint4* dst = reinterpret_cast<uint4*>(p);
#pragma unroll
    for (int w = 0; w < kWords; ++w) dst[w] = words[w];
  }
  // Element i as float32 (i a compile-time constant after unrolling: registers are selected,
  // never spilled to local memory by a run-time index).
  __device__ __forceinline__ float as_float(int i) const {
    return element_as_float<T>(word(i * static_cast<int>(sizeof(T)) / 4), i);
  }
  __device__ __forceinline__ void set_float(int i, float v) {
    static_assert(sizeof(T) == 4, "set_float writes float32 packs");
    uint4& w = words[i / 4];
    const uint32_t bits = __float_as_uint(v);
    switch (i % 4) {
      case 0: w.x = bits; break;
      case 1: w.y = bits; break;
      case 2: w.z = bits; break;
      default: w.w = bits; break;
    }
  }
  // Element i taken from `other` where bit i of `lanes` is set (the raw bits, so every value is
  // kept exactly). Host and device: tests/cpp/pack_test.cu runs it on the host.
  __host__ __device__ __forceinline__ void blend(const Pack& other, uint32_t lanes) {
#pragma unroll
    for (int j = 0; j < kWords * 4; ++j) {
      uint32_t mask;
      if constexpr (sizeof(T) == 4) {
        mask = 0u - ((lanes >> j) & 1u);
      } else {
        mask = (((lanes >> (2 * j)) & 1u) * 0x0000FFFFu) | (((lanes >> (2 * j + 1)) & 1u) * 0xFFFF0000u);
      }
      word_ref(j) = (word(j) & ~mask) | (other.word(j) & mask);
    }
  }
  __host__ __device__ __forceinline__ uint32_t& word_ref(int j) {
    uint4& w = words[j / 4];
    switch (j % 4) {
      case 0: return w.x;
      case 1: return w.y;
      case 2: return w.z;
      default: return w.w;
    }
  }
  __host__ __device__ __forceinline__ uint32_t word(int j) const {
    const uint4& w = words[j / 4];
    switch (j % 4) {
      case 0: return w.x;
      case 1: return w.y;
      case 2: return w.z;
      default: return w.w;
    }
  }
};

// Four consecutive elements as one access: 16 bytes of float32, 8 of 16-bit values (p aligned to
// that). A warp's quads are contiguous, so each access covers whole 32-byte sectors (a Pack of
// float32 takes two 16-byte accesses, each over half of every sector it touches).
template <typename T>
struct Quad {
  using Bits = typename std::conditional<sizeof(T) == 4, uint4, uint2>::type;
  Bits bits;

  __device__ __forceinline__ void load(const T* p) { bits = *reinterpret_cast<const Bits*>(p); }
  __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<Bits*>(p) = bits; }
  __device__ __forceinline__ uint32_t word(int j) const {
    if constexpr (sizeof(T) == 4) {
      return j == 0 ? bits.x : (j == 1 ? bits.y : (j == 2 ? bits.z : bits.w));
    } else {
      return j == 0 ? bits.x : bits.y;
    }
  }
  __device__ __forceinline__ float as_float(int i) const {
    return element_as_float<T>(word(i * static_cast<int>(sizeof(T)) / 4), i);
  }
  __device__ __forceinline__ void set_float(int i, float v) {
    static_assert(sizeof(T) == 4, "set_float writes float32 quads");
    const uint32_t b = __float_as_uint(v);
    switch (i) {
      case 0: bits.x = b; break;
      case 1: bits.y = b; break;
      case 2: bits.z = b; break;
      default: bits.w = b; break;
    }
  }
};

constexpr int kQuad = 4;
constexpr int64_t kQuadStride = int64_t{kThreads} * kQuad;  // one access of the whole block

// The quads of [begin, end) for thread `thread` of a block: begin + 4 thread + kQuadStride k.
// pair(i): the quads at i and i + kQuadStride, both in range (two in flight); one(i): the quad at
// i; tail(i): the elements from i to end, fewer than kQuad. Host and device: tests/cpp/pack_test.cu
// checks on the host that every element is visited once.
// (Host callables in the host test, device lambdas in the kernels: no cross-space check.)
#pragma nv_exec_check_disable
template <typename Pair, typename One, typename Tail>
__host__ __device__ __forceinline__ void walk_quads(int64_t begin, int64_t end, int thread, Pair&& pair,
                                                    One&& one, Tail&& tail) {
  int64_t i = begin + int64_t{thread} * kQuad;
  for (; i + kQuadStride + kQuad <= end; i += 2 * kQuadStride) pair(i);
  for (; i + kQuad <= end; i += kQuadStride) one(i);
  if (i < end) tail(i);
}

// ------------------------------------------------------------------------------ host side

// SMs of the current device (cached per device): sizes the persistent grid.
inline int multiprocessor_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};  // 0: not read yet
  int device = 0;
  FP_CUDA_CHECK(cudaGetDevice(&device));
  if (device < kMaxDevices && cached[device] != 0) return cached[device];
  int count = 0;
  FP_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device < kMaxDevices) cached[device] = count;
  return count;
}

// The persistent grid for `kernel`: as many blocks as fit on the device at once.
template <typename Kernel>
int64_t resident_grid(Kernel kernel) {
  int blocks_per_sm = 0;
  FP_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads, 0));
  return static_cast<int64_t>(blocks_per_sm > 0 ? blocks_per_sm : 1) * multiprocessor_count();
}

// The grid of a launch of num_chunks chunks. Default: the whole resident grid (the most warps in
// flight; the last round may leave blocks idle). FP_BALANCED_GRID=1: the fewest rounds, then as few
// blocks as still take that many, so every block walks the same number of chunks (+-1). Side by
// side at 6219ec1 on an H200 (bench/results/gpu_variants.json) neither won: the balanced grid was
// faster on 7 of the 12 passes at 1.3B, by up to 6 points of copy bandwidth, and slower on the
// bfloat16 masked reset by 6, within what two runs of one build differ by.
#ifndef FP_BALANCED_GRID
#define FP_BALANCED_GRID 0
#endif
constexpr bool kBalancedGrid = FP_BALANCED_GRID != 0;

inline int64_t balanced_grid(int64_t num_chunks, int64_t max_grid) {
  const int64_t rounds = (num_chunks + max_grid - 1) / max_grid;
  return (num_chunks + rounds - 1) / rounds;
}

// Launches kernel<<<grid, kThreads, 0, stream>>>(table, args...) over launch tables packing the
// tensors of `lists` (NumLists parallel arrays of num_tensors TensorArgs) whose
// lists[key_list][i].dtype == dtype; the grid is at most the kernel's resident grid. Empty
// tensors are skipped.
template <int NumLists, typename... KernelArgs, typename... Args>
void launch_multi_tensor(void (*kernel)(LaunchTable<NumLists>, KernelArgs...),
                         const TensorArg* const (&lists)[NumLists], int64_t num_tensors,
                         int key_list, DType dtype, const LaunchExtras& extras,
                         cudaStream_t stream, Args... args) {
  LaunchTable<NumLists> table{};
  int64_t max_grid = 0;  // read from the device at the first launch only
  auto flush = [&]() {
    if (table.num_tensors == 0) return;
    if (max_grid == 0) max_grid = resident_grid(kernel);
    const int64_t num_chunks = table.first_chunk[table.num_tensors];
    const int grid = static_cast<int>(kBalancedGrid ? balanced_grid(num_chunks, max_grid)
                                                    : (num_chunks < max_grid ? num_chunks : max_grid));
    // Kernels may count per block in 32 bits (the histograms' shared counters).
    if ((num_chunks + grid - 1) / grid * kChunkElems > int64_t{0xFFFFFFFF}) {
      throw std::runtime_error("finepurify: more than 2^32 elements per block; split the tensor");
    }
    kernel<<<grid, kThreads, 0, stream>>>(table, args...);
    FP_LAUNCH_CHECK();
    table = LaunchTable<NumLists>{};
  };
  for (int64_t i = 0; i < num_tensors; ++i) {
    if (lists[key_list][i].dtype != dtype || lists[key_list][i].numel == 0) continue;
    const int t = table.num_tensors;
    bool aligned = true;
    const bool broadcast = extras.broadcast_list >= 0 &&
                           lists[extras.broadcast_list][i].numel != lists[key_list][i].numel;
    for (int l = 0; l < NumLists; ++l) {
      table.data[l][t] = lists[l][i].data;
      // A broadcast element is read as a scalar, never as a vector.
      if (!(broadcast && l == extras.broadcast_list)) {
        aligned = aligned && reinterpret_cast<uintptr_t>(lists[l][i].data) % 16 == 0;
      }
    }
    if (broadcast) table.broadcast_mask |= uint64_t{1} << t;
    table.stream[t] = extras.streams != nullptr ? extras.streams[i] : 0;
    table.numel[t] = lists[key_list][i].numel;
    table.list_index[t] = static_cast<int32_t>(i);
    if (aligned) table.aligned_mask |= uint64_t{1} << t;
    table.first_chunk[t + 1] =
        table.first_chunk[t] + (table.numel[t] + kChunkElems - 1) / kChunkElems;
    table.num_tensors = t + 1;
    if (table.num_tensors == kMaxTensorsPerLaunch) flush();
  }
  flush();
}

// Calls fn(T*) with a null pointer of the storage type of `dtype`.
template <typename Fn>
void dispatch_storage(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(static_cast<float*>(nullptr)); break;
    case DType::kBFloat16: fn(static_cast<BFloat16Bits*>(nullptr)); break;
    case DType::kFloat16: fn(static_cast<Float16Bits*>(nullptr)); break;
  }
}

constexpr DType kAllDTypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};

}  // namespace finepurify::cuda
