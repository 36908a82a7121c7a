// hessian += scale * grad^2 over many tensors in one launch per grad dtype.
#include "kernels.h"
#include "multi_tensor.cuh"

namespace finepurify::cuda {
namespace {

// The vector path walks quads (four elements per access: whole sectors for the float32 Hessian;
// multi_tensor.cuh), or with FP_ACCUMULATE_QUADS=0 packs of eight, as the score kernels do
// (bench/gpu_variants.sh compares them).
#ifndef FP_ACCUMULATE_QUADS
#define FP_ACCUMULATE_QUADS 1
#endif
constexpr bool kAccumulateQuads = FP_ACCUMULATE_QUADS != 0;

// (scale * g) * g, the order of the CPU kernel and the PyTorch reference.
__device__ __forceinline__ float plus_square(float h, float g, float scale) { return h + (scale * g) * g; }

template <typename G>
__device__ __forceinline__ void accumulate_element(float* hessian, G* grad, int64_t j, float scale,
                                                   bool zero_grads) {
  hessian[j] = plus_square(hessian[j], load_as_float(grad + j), scale);
  if (zero_grads) grad[j] = G{};
}

// n loaded elements (a Quad or a Pack of the grads, of the Hessian) added up and stored back.
template <int n, typename GVector, typename HVector, typename G>
__device__ __forceinline__ void accumulate_vector(float* hessian, G* grad, int64_t at, const GVector& g,
                                                  HVector& h, float scale, bool zero_grads) {
#pragma unroll
  for (int j = 0; j < n; ++j) h.set_float(j, plus_square(h.as_float(j), g.as_float(j), scale));
  h.store(hessian + at);
  if (zero_grads) {
    GVector zero{};
    zero.store(grad + at);
  }
}

template <typename G>
__device__ __forceinline__ void accumulate_quads(float* hessian, G* grad, int64_t begin, int64_t end,
                                                 float scale, bool zero_grads) {
  auto accumulate = [&](int64_t at, const Quad<G>& g, Quad<float>& h) {
    accumulate_vector<kQuad>(hessian, grad, at, g, h, scale, zero_grads);
  };
  walk_quads(
      begin, end, threadIdx.x,
      [&](int64_t i) {  // every load of both quads before the first use
        Quad<G> g0, g1;
        Quad<float> h0, h1;
        g0.load(grad + i);
        g1.load(grad + i + kQuadStride);
        h0.load(hessian + i);
        h1.load(hessian + i + kQuadStride);
        accumulate(i, g0, h0);
        accumulate(i + kQuadStride, g1, h1);
      },
      [&](int64_t i) {
        Quad<G> g;
        Quad<float> h;
        g.load(grad + i);
        h.load(hessian + i);
        accumulate(i, g, h);
      },
      [&](int64_t i) {
        for (int64_t j = i; j < end; ++j) accumulate_element(hessian, grad, j, scale, zero_grads);
      });
}

template <typename G>
__global__ void __launch_bounds__(kThreads)
    accumulate_sq_grads_kernel(LaunchTable<2> table, float scale, bool zero_grads) {
  for_each_chunk(table, [&](int t, int64_t begin, int64_t end) {
    float* hessian = static_cast<float*>(table.data[0][t]);
    G* grad = static_cast<G*>(table.data[1][t]);
    if (kAccumulateQuads && ((table.aligned_mask >> t) & 1)) {
      accumulate_quads(hessian, grad, begin, end, scale, zero_grads);
    } else if ((table.aligned_mask >> t) & 1) {
      auto accumulate = [&](int64_t at, const Pack<G>& g, Pack<float>& h) {
        accumulate_vector<kPack>(hessian, grad, at, g, h, scale, zero_grads);
      };
      constexpr int64_t kStride = int64_t{kThreads} * kPack;  // one block step
      int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kPack;
      // kPacksPerStep packs per thread in flight: every load of the group before the first use.
      for (; i + (kPacksPerStep - 1) * kStride + kPack <= end; i += kPacksPerStep * kStride) {
        Pack<G> g[kPacksPerStep];
        Pack<float> h[kPacksPerStep];
#pragma unroll
        for (int u = 0; u < kPacksPerStep; ++u) {
          g[u].load(grad + i + u * kStride);
          h[u].load(hessian + i + u * kStride);
        }
#pragma unroll
        for (int u = 0; u < kPacksPerStep; ++u) accumulate(i + u * kStride, g[u], h[u]);
      }
      for (; kPacksPerStep > 1 && i + kPack <= end; i += kStride) {  // a chunk's last packs
        Pack<G> g;
        Pack<float> h;
        g.load(grad + i);
        h.load(hessian + i);
        accumulate(i, g, h);
      }
      // Scalar tail: only the thread whose pack straddles `end` has work here.
      for (int64_t j = i; j < end && j < i + kPack; ++j) accumulate_element(hessian, grad, j, scale, zero_grads);
    } else {
      for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
        accumulate_element(hessian, grad, j, scale, zero_grads);
      }
    }
  });
}

}  // namespace

void accumulate_sq_grads(const TensorArg* hessians, const TensorArg* grads, int64_t num_tensors,
                         float scale, bool zero_grads, cudaStream_t stream) {
  const TensorArg* const lists[2] = {hessians, grads};
  for (DType dtype : kAllDTypes) {
    dispatch_storage(dtype, [&](auto* tag) {
      using G = std::remove_pointer_t<decltype(tag)>;
      launch_multi_tensor(accumulate_sq_grads_kernel<G>, lists, num_tensors, /*key_list=*/1,
                          dtype, LaunchExtras{}, stream, scale, zero_grads);
    });
  }
}

}  // namespace finepurify::cuda
