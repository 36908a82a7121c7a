// Argument checks shared by every backend and the composite ops, and the conversion of tensor
// lists into the kernels' plain TensorArgs. Messages name the op, the list and index, what was
// received and what was expected.
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "kernels/score_math.h"
#include "kernels/tensor_arg.h"

namespace finepurify {

// finetuned/pretrained: same length, shapes, dtypes (float32, bfloat16 or float16);
// hessians: float32 of the same shapes or of one element; everything on the device of the first
// tensor.
void check_weight_lists(const char* op, at::TensorList finetuned, at::TensorList pretrained,
                        at::TensorList hessians);

// hessians float32; grads float32, bfloat16 or float16; same shapes, one device.
void check_grad_lists(const char* op, at::TensorList hessians, at::TensorList grads);

// The tensors an in-place op writes directly (contiguous ones: others are written through copies)
// share no memory: a GPU kernel writes whole 16-byte packs, so two listings of one tensor would
// race and lose one listing's writes. Names both indices.
void check_distinct_outputs(const char* op, const char* list, at::TensorList tensors);

void check_eps(const char* op, double eps);

// 0 <= low_key <= high_key <= the key of +Inf; capacity in [0, 2^31).
void check_candidate_range(const char* op, int64_t low_key, int64_t high_key, int64_t capacity);
void check_sample_stride(const char* op, int64_t stride);
// The keys score_sample returns for these tensors (sample_size summed).
int64_t sample_size_of(at::TensorList finetuned, int64_t stride);

// level in [0, kNumLevels); prefix holds only the digits above that level.
void check_histogram_level(const char* op, int64_t level, int64_t prefix);

// The scoring spec of the ops' ranking arguments (checked), and into `streams` each tensor's
// random stream when the ranking is random (random_seed >= 0; keys default to list positions).
ScoreSpec score_spec(const char* op, double eps, double hessian_floor, int64_t random_seed,
                     at::IntArrayRef random_keys, at::IntArrayRef random_offsets,
                     size_t num_tensors, std::vector<uint64_t>& streams);

int64_t total_numel(at::TensorList tensors);

// Raises naming the first tensor whose inputs cannot be ranked (NaN/Inf, negative hessian).
[[noreturn]] void raise_unrankable(const char* op, at::TensorList finetuned,
                                   at::TensorList pretrained, at::TensorList hessians,
                                   int64_t num_unrankable);

// Contiguous versions of a tensor list, for the kernels. For in-place outputs, write_back() copies
// the results into those originals that were not contiguous, so strided inputs are handled, not
// refused.
class ContiguousList {
 public:
  explicit ContiguousList(at::TensorList tensors);
  std::vector<TensorArg> args() const;
  void write_back() const;

 private:
  std::vector<at::Tensor> originals_;
  std::vector<at::Tensor> contiguous_;
};

TensorArg tensor_arg(const at::Tensor& t);

// A score op's entry: its three lists checked (check_weight_lists) and its ranking arguments
// turned into the scoring spec and random streams (score_spec).
struct CheckedScoring {
  ScoreSpec spec;
  std::vector<uint64_t> streams;
};
CheckedScoring check_score_inputs(const char* op, at::TensorList finetuned, at::TensorList pretrained,
                                  at::TensorList hessians, double eps, double hessian_floor,
                                  int64_t random_seed, at::IntArrayRef random_keys,
                                  at::IntArrayRef random_offsets);

// A score op's three lists made contiguous, as the kernels' TensorArgs.
class WeightArgs {
 public:
  WeightArgs(at::TensorList finetuned, at::TensorList pretrained, at::TensorList hessians);
  const TensorArg* finetuned() const { return ft_args_.data(); }
  const TensorArg* pretrained() const { return pre_args_.data(); }
  const TensorArg* hessians() const { return h_args_.data(); }
  int64_t size() const { return static_cast<int64_t>(ft_args_.size()); }
  // For an op that writes the finetuned list in place: ContiguousList::write_back.
  void write_back_finetuned() const { ft_.write_back(); }

 private:
  ContiguousList ft_, pre_, h_;
  std::vector<TensorArg> ft_args_, pre_args_, h_args_;
};

// The pieces of `flat` (float32, contiguous, total_numel(like) elements) that hold the tensors of
// `like` one after another, in order: the outputs of a list op that returns one vector.
std::vector<TensorArg> consecutive_args(const at::Tensor& flat, at::TensorList like);

}  // namespace finepurify

namespace finepurify {

// The smallest float32 t with t >= threshold, so that for float32 scores `score >= t` means
// exactly `score >= threshold` even when the threshold is a double between two floats.
float threshold_as_float(const char* op, double threshold);

}  // namespace finepurify
