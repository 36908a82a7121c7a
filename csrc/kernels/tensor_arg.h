// Plain description of one tensor for the kernels: no torch types, so nvcc can compile the CUDA
// kernels on machines whose torch has no CUDA, and the CPU kernels stay free of at::Tensor.
#pragma once
#include <cstdint>

namespace finepurify {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct TensorArg {
  void* data;     // contiguous storage
  int64_t numel;  // 64-bit: single tensors may exceed 2^31 elements
  DType dtype;
};

}  // namespace finepurify
