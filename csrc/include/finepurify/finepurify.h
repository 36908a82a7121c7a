// The finepurify ops for C++/libtorch programs. Link the `finepurify::finepurify` CMake target
// (find_package(finepurify)); the ops register with the dispatcher when the library loads, and these
// functions call them through it, so CPU and CUDA tensors both work.
//
// Shapes and dtypes as in the Python API: finetuned/pretrained float32, bfloat16 or float16 (a pair
// shares one dtype); hessians float32, each of its tensor's shape or of one element (one curvature
// for the whole tensor); score = (finetuned - pretrained)^2 / (max(hessian, floor) + eps), or
// Fine-mixing's random score (see Ranking).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "finepurify/search.h"

namespace finepurify {

// hessians[i] += scale * grads[i]^2 in one multi-tensor pass; with zero_grads the grads are zeroed.
void accumulate_sq_grads_(at::TensorList hessians, at::TensorList grads, double scale = 1.0,
                          bool zero_grads = false);

// How the score ops rank: the Hessian floored at hessian_floor, or (random_seed >= 0) a random
// score per moved weight from a counter-based generator, one stream per tensor keyed by
// random_keys (default: list positions), the same on every device, piece and shard.
struct Ranking {
  double hessian_floor = 0.0;
  int64_t random_seed = -1;
  std::vector<int64_t> random_keys;
  std::vector<int64_t> random_offsets;  // each tensor's first element in the whole tensor
};

// float32 scores of one tensor.
at::Tensor drift_score(const at::Tensor& finetuned, const at::Tensor& pretrained,
                       const at::Tensor& hessian, double eps, double hessian_floor = 0.0,
                       int64_t random_seed = -1, int64_t random_key = 0);

// float32 scores of every tensor, one after another, as one vector of all their elements (one pass
// over all tensors; tensor i's scores start after the elements of tensors 0..i-1).
at::Tensor drift_scores(at::TensorList finetuned, at::TensorList pretrained, at::TensorList hessians,
                        double eps, const Ranking& ranking = {});

// The exact k-th largest score (k from 1) over every element of every tensor. search: "auto"
// (from a sample's bracket on the CPU from 1M weights, else histogram passes), "sample" or
// "histograms".
double score_threshold(at::TensorList finetuned, at::TensorList pretrained, at::TensorList hessians,
                       int64_t k, double eps, const Ranking& ranking = {},
                       c10::string_view search = "auto");

// In place: elements whose score is >= threshold take their pre-trained value. Per-tensor counts.
at::Tensor masked_reset_(at::TensorList finetuned, at::TensorList pretrained, at::TensorList hessians,
                         double threshold, double eps, const Ranking& ranking = {});

// Keeps the round(reserve_ratio * N) smallest scores, resets the rest (N: every element, or with
// count_moved_only the elements that moved). Per-tensor counts.
at::Tensor reset_most_abnormal_(at::TensorList finetuned, at::TensorList pretrained,
                                at::TensorList hessians, double reserve_ratio, double eps,
                                const Ranking& ranking = {}, bool count_moved_only = false,
                                c10::string_view search = "auto");

}  // namespace finepurify
