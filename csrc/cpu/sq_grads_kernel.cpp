// The Hessian family: hessian += scale * grad^2 over many tensors in one pass, and the Hessians'
// float64 sums (the per-tensor means of the no-Hessian ranking).
#include <cstring>
#include <vector>

#include "kernels.h"
#include "multi_tensor.h"

namespace finepurify::cpu::FP_CPU_NS {
namespace {

template <typename G>
void accumulate_range(float* hessian, G* grad, int64_t n, float scale, bool zero_grads) {
  const Vec scale_vec(scale);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec g = load_float(grad + i);
    // (scale * g) * g, the order of the PyTorch reference, so results agree bit for bit.
    (Vec::loadu(hessian + i) + (scale_vec * g) * g).store(hessian + i);
    if (zero_grads) std::memset(grad + i, 0, Vec::size() * sizeof(G));
  }
  for (; i < n; ++i) {
    const float g = static_cast<float>(grad[i]);
    hessian[i] = hessian[i] + (scale * g) * g;
    if (zero_grads) grad[i] = G(0.0f);
  }
}

// The float64 sum of n float32 values: eight lanes of sequential sums (the compiler keeps them in
// vector registers: a float64 sum at memory speed, where numpy's buffered cast runs at a fifth),
// added pairwise, then the tail. A fixed order: the same bits on every build.
double sum_range(const float* x, int64_t n) {
  double lanes[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) lanes[j] += static_cast<double>(x[i + j]);
  }
  double total = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
  for (; i < n; ++i) total += static_cast<double>(x[i]);
  return total;
}

}  // namespace

void float64_sums(const TensorArg* tensors, int64_t num_tensors, double* sums) {
  const auto chunks = split_into_chunks(tensors, num_tensors);
  std::vector<double> per_chunk(chunks.size(), 0.0);
  parallel_over_chunks(chunks, [&](const Chunk* first, const Chunk* last) {
    for (const Chunk* c = first; c != last; ++c) {
      per_chunk[c - chunks.data()] = sum_range(static_cast<const float*>(tensors[c->tensor].data) + c->begin,
                                               c->end - c->begin);
    }
  });
  for (int64_t t = 0; t < num_tensors; ++t) sums[t] = 0.0;
  for (size_t i = 0; i < chunks.size(); ++i) sums[chunks[i].tensor] += per_chunk[i];  // in chunk order
}

void accumulate_sq_grads(const TensorArg* hessians, const TensorArg* grads, int64_t num_tensors,
                         float scale, bool zero_grads) {
  const auto chunks = split_into_chunks(hessians, num_tensors);
  parallel_over_chunks(chunks, [&](const Chunk* first, const Chunk* last) {
    for (const Chunk* c = first; c != last; ++c) {
      float* hessian = static_cast<float*>(hessians[c->tensor].data) + c->begin;
      dispatch_storage(grads[c->tensor].dtype, [&](auto* tag) {
        using G = std::remove_pointer_t<decltype(tag)>;
        G* grad = static_cast<G*>(grads[c->tensor].data) + c->begin;
        accumulate_range(hessian, grad, c->end - c->begin, scale, zero_grads);
      });
    }
  });
}

}  // namespace finepurify::cpu::FP_CPU_NS
