// CUDA binding: checks arguments, turns tensor lists into TensorArgs and launches the kernels on
// the current stream of the tensors' device. Compiled only in CUDA builds (setup.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "../kernels/score_math.h"
#include "kernels.h"

namespace finepurify {
namespace {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void accumulate_sq_grads_cuda(at::TensorList hessians, at::TensorList grads, double scale,
                              bool zero_grads) {
  check_grad_lists("accumulate_sq_grads_", hessians, grads);
  check_distinct_outputs("accumulate_sq_grads_", "hessians", hessians);
  if (zero_grads) check_distinct_outputs("accumulate_sq_grads_", "grads", grads);
  if (hessians.empty()) return;
  const c10::cuda::CUDAGuard device_guard(hessians[0].device());
  const ContiguousList h(hessians), g(grads);
  const auto h_args = h.args(), g_args = g.args();
  cuda::accumulate_sq_grads(h_args.data(), g_args.data(), static_cast<int64_t>(h_args.size()),
                            static_cast<float>(scale), zero_grads, current_stream());
  h.write_back();
  if (zero_grads) g.write_back();
}

// The scores of every tensor, one after another, as one float32 vector (`op` names the op in
// errors): one allocation and one pass over all tensors, one launch per 64 tensors of a dtype.
at::Tensor scores_of(const char* op, at::TensorList finetuned, at::TensorList pretrained,
                     at::TensorList hessians, double eps, double hessian_floor, int64_t random_seed,
                     at::IntArrayRef random_keys, at::IntArrayRef random_offsets) {
  const CheckedScoring in = check_score_inputs(op, finetuned, pretrained, hessians, eps, hessian_floor,
                                               random_seed, random_keys, random_offsets);
  const c10::cuda::CUDAGuard device_guard(finetuned[0].device());
  const WeightArgs args(finetuned, pretrained, hessians);
  at::Tensor scores =
      at::empty({total_numel(finetuned)}, finetuned[0].options().dtype(at::kFloat));
  const auto out_args = consecutive_args(scores, finetuned);
  cuda::drift_score(args.finetuned(), args.pretrained(), args.hessians(), out_args.data(), args.size(),
                    in.spec, in.streams.data(), current_stream());
  return scores;
}

at::Tensor drift_score_cuda(const at::Tensor& finetuned, const at::Tensor& pretrained,
                            const at::Tensor& hessian, double eps, double hessian_floor,
                            int64_t random_seed, int64_t random_key) {
  return scores_of("drift_score", {finetuned}, {pretrained}, {hessian}, eps, hessian_floor,
                   random_seed, {random_key}, {})
      .view(finetuned.sizes());
}

at::Tensor drift_scores_cuda(at::TensorList finetuned, at::TensorList pretrained,
                             at::TensorList hessians, double eps, double hessian_floor,
                             int64_t random_seed, at::IntArrayRef random_keys,
                             at::IntArrayRef random_offsets) {
  return scores_of("drift_scores", finetuned, pretrained, hessians, eps, hessian_floor,
                   random_seed, random_keys, random_offsets);
}

at::Tensor score_histogram_cuda(at::TensorList finetuned, at::TensorList pretrained,
                                at::TensorList hessians, double eps, int64_t level,
                                int64_t prefix, double hessian_floor, int64_t random_seed,
                                at::IntArrayRef random_keys, at::IntArrayRef random_offsets) {
  const CheckedScoring in = check_score_inputs("score_histogram", finetuned, pretrained, hessians, eps,
                                               hessian_floor, random_seed, random_keys, random_offsets);
  check_histogram_level("score_histogram", level, prefix);
  const c10::cuda::CUDAGuard device_guard(finetuned[0].device());
  const WeightArgs args(finetuned, pretrained, hessians);
  at::Tensor counts = at::zeros({level_bins(static_cast<int>(level)) + 2},
                                finetuned[0].options().dtype(at::kLong));
  cuda::score_histogram(args.finetuned(), args.pretrained(), args.hessians(), args.size(), in.spec,
                        in.streams.data(), static_cast<int>(level), static_cast<uint32_t>(prefix),
                        counts.data_ptr<int64_t>(), current_stream());
  return counts;
}

std::tuple<at::Tensor, at::Tensor> score_candidates_cuda(
    at::TensorList finetuned, at::TensorList pretrained, at::TensorList hessians, double eps,
    int64_t low_key, int64_t high_key, int64_t capacity, double hessian_floor, int64_t random_seed,
    at::IntArrayRef random_keys, at::IntArrayRef random_offsets) {
  const CheckedScoring in = check_score_inputs("score_candidates", finetuned, pretrained, hessians, eps,
                                               hessian_floor, random_seed, random_keys, random_offsets);
  check_candidate_range("score_candidates", low_key, high_key, capacity);
  const c10::cuda::CUDAGuard device_guard(finetuned[0].device());
  const WeightArgs args(finetuned, pretrained, hessians);
  at::Tensor counts = at::zeros({kCandidateCounts + kMaxBins}, finetuned[0].options().dtype(at::kLong));
  at::Tensor keys = at::full({capacity}, -1, finetuned[0].options().dtype(at::kInt));
  cuda::score_candidates(args.finetuned(), args.pretrained(), args.hessians(), args.size(), in.spec,
                         in.streams.data(), static_cast<uint32_t>(low_key), static_cast<uint32_t>(high_key),
                         capacity, counts.data_ptr<int64_t>(), keys.data_ptr<int32_t>(), current_stream());
  // As the CPU gives them, without reading the counts on the host: none where more than
  // `capacity` fell between, else sorted descending (the -1 of the unused slots last).
  keys.masked_fill_(counts.select(0, 2).gt(capacity), -1);
  return {counts, std::get<0>(keys.sort(/*dim=*/0, /*descending=*/true))};
}

std::tuple<at::Tensor, at::Tensor> score_sample_cuda(
    at::TensorList finetuned, at::TensorList pretrained, at::TensorList hessians, double eps,
    int64_t stride, double hessian_floor, int64_t random_seed, at::IntArrayRef random_keys,
    at::IntArrayRef random_offsets) {
  const CheckedScoring in = check_score_inputs("score_sample", finetuned, pretrained, hessians, eps,
                                               hessian_floor, random_seed, random_keys, random_offsets);
  check_sample_stride("score_sample", stride);
  const c10::cuda::CUDAGuard device_guard(finetuned[0].device());
  const WeightArgs args(finetuned, pretrained, hessians);
  at::Tensor keys = at::empty({sample_size_of(finetuned, stride)}, finetuned[0].options().dtype(at::kInt));
  at::Tensor counts = at::zeros({2}, finetuned[0].options().dtype(at::kLong));
  cuda::score_sample(args.finetuned(), args.pretrained(), args.hessians(), args.size(), in.spec,
                     in.streams.data(), stride, keys.data_ptr<int32_t>(), counts.data_ptr<int64_t>(),
                     current_stream());
  return {keys, counts};
}

at::Tensor masked_reset_cuda(at::TensorList finetuned, at::TensorList pretrained,
                             at::TensorList hessians, double threshold, double eps,
                             double hessian_floor, int64_t random_seed,
                             at::IntArrayRef random_keys, at::IntArrayRef random_offsets) {
  check_weight_lists("masked_reset_", finetuned, pretrained, hessians);
  check_distinct_outputs("masked_reset_", "finetuned", finetuned);
  std::vector<uint64_t> streams;
  const ScoreSpec spec = score_spec("masked_reset_", eps, hessian_floor, random_seed, random_keys,
                                    random_offsets, finetuned.size(), streams);
  const float threshold_f = threshold_as_float("masked_reset_", threshold);
  const c10::cuda::CUDAGuard device_guard(finetuned[0].device());
  const WeightArgs args(finetuned, pretrained, hessians);
  at::Tensor counts = at::zeros({static_cast<int64_t>(finetuned.size())},
                                finetuned[0].options().dtype(at::kLong));
  cuda::masked_reset(args.finetuned(), args.pretrained(), args.hessians(), args.size(), spec,
                     streams.data(), threshold_f, counts.data_ptr<int64_t>(), current_stream());
  args.write_back_finetuned();
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(finepurify, CUDA, m) {
  m.impl("accumulate_sq_grads_", &accumulate_sq_grads_cuda);
  m.impl("drift_score", &drift_score_cuda);
  m.impl("drift_scores", &drift_scores_cuda);
  m.impl("score_histogram", &score_histogram_cuda);
  m.impl("score_candidates", &score_candidates_cuda);
  m.impl("score_sample", &score_sample_cuda);
  m.impl("masked_reset_", &masked_reset_cuda);
}

}  // namespace finepurify
