// The finepurify ops for C++/libtorch programs. Link the `finepurify::finepurify` CMake target
// (find_package(finepurify)); the ops register with the dispatcher when the library loads, and these
// functions call them through it, so CPU and CUDA tensors both work.
//
// Shapes and dtypes as in the Python API: finetuned/pretrained float32, bfloat16 or float16 (a pair
// shares one dtype); hessians float32; score = (finetuned - pretrained)^2 / (hessian + eps).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace finepurify {

// hessians[i] += scale * grads[i]^2 in one multi-tensor pass; with zero_grads the grads are zeroed.
void accumulate_sq_grads_(at::TensorList hessians, at::TensorList grads, double scale = 1.0,
                          bool zero_grads = false);

// float32 (finetuned - pretrained)^2 / (hessian + eps).
at::Tensor drift_score(const at::Tensor& finetuned, const at::Tensor& pretrained,
                       const at::Tensor& hessian, double eps);

// The exact k-th largest score (k from 1) over every element of every tensor.
double score_threshold(at::TensorList finetuned, at::TensorList pretrained, at::TensorList hessians,
                       int64_t k, double eps);

// In place: elements whose score is >= threshold take their pre-trained value. Per-tensor counts.
at::Tensor masked_reset_(at::TensorList finetuned, at::TensorList pretrained, at::TensorList hessians,
                         double threshold, double eps);

// Keeps the round(reserve_ratio * N) smallest scores, resets the rest. Per-tensor counts.
at::Tensor reset_most_abnormal_(at::TensorList finetuned, at::TensorList pretrained,
                                at::TensorList hessians, double reserve_ratio, double eps);

}  // namespace finepurify
