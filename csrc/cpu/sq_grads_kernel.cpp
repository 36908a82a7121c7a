// hessian += scale * grad^2 over many tensors in one pass.
#include <cstring>

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

}  // namespace

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
