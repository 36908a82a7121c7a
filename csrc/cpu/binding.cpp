// CPU binding: checks arguments, turns tensor lists into TensorArgs and calls the kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "../kernels/score_math.h"
#include "kernels.h"

namespace finepurify {
namespace {

void accumulate_sq_grads_cpu(at::TensorList hessians, at::TensorList grads, double scale,
                             bool zero_grads) {
  check_grad_lists("accumulate_sq_grads_", hessians, grads);
  check_distinct_outputs("accumulate_sq_grads_", "hessians", hessians);
  if (zero_grads) check_distinct_outputs("accumulate_sq_grads_", "grads", grads);
  const ContiguousList h(hessians), g(grads);
  const auto h_args = h.args(), g_args = g.args();
  cpu::accumulate_sq_grads(h_args.data(), g_args.data(), static_cast<int64_t>(h_args.size()),
                           static_cast<float>(scale), zero_grads);
  h.write_back();
  if (zero_grads) g.write_back();
}

at::Tensor float64_sums_cpu(at::TensorList tensors) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK_VALUE(tensors[i].scalar_type() == at::kFloat && tensors[i].device().is_cpu(),
                      "finepurify.float64_sums: tensors[", i, "] must be a float32 CPU tensor, got ",
                      tensors[i].scalar_type(), " on ", tensors[i].device());
  }
  const ContiguousList t(tensors);
  const auto args = t.args();
  at::Tensor sums = at::empty({static_cast<int64_t>(tensors.size())}, at::TensorOptions().dtype(at::kDouble));
  cpu::float64_sums(args.data(), static_cast<int64_t>(args.size()), sums.data_ptr<double>());
  return sums;
}

// The scores of every tensor, one after another, as one float32 vector (`op` names the op in
// errors): one allocation and one pass over all tensors.
at::Tensor scores_of(const char* op, at::TensorList finetuned, at::TensorList pretrained,
                     at::TensorList hessians, double eps, double hessian_floor, int64_t random_seed,
                     at::IntArrayRef random_keys, at::IntArrayRef random_offsets) {
  const CheckedScoring in = check_score_inputs(op, finetuned, pretrained, hessians, eps, hessian_floor,
                                               random_seed, random_keys, random_offsets);
  const WeightArgs args(finetuned, pretrained, hessians);
  at::Tensor scores =
      at::empty({total_numel(finetuned)}, finetuned[0].options().dtype(at::kFloat));
  const auto out_args = consecutive_args(scores, finetuned);
  cpu::drift_score(args.finetuned(), args.pretrained(), args.hessians(), out_args.data(), args.size(),
                   in.spec, in.streams.data());
  return scores;
}

at::Tensor drift_score_cpu(const at::Tensor& finetuned, const at::Tensor& pretrained,
                           const at::Tensor& hessian, double eps, double hessian_floor,
                           int64_t random_seed, int64_t random_key) {
  return scores_of("drift_score", {finetuned}, {pretrained}, {hessian}, eps, hessian_floor,
                   random_seed, {random_key}, {})
      .view(finetuned.sizes());
}

at::Tensor drift_scores_cpu(at::TensorList finetuned, at::TensorList pretrained,
                            at::TensorList hessians, double eps, double hessian_floor,
                            int64_t random_seed, at::IntArrayRef random_keys,
                            at::IntArrayRef random_offsets) {
  return scores_of("drift_scores", finetuned, pretrained, hessians, eps, hessian_floor,
                   random_seed, random_keys, random_offsets);
}

at::Tensor score_histogram_cpu(at::TensorList finetuned, at::TensorList pretrained,
                               at::TensorList hessians, double eps, int64_t level,
                               int64_t prefix, double hessian_floor, int64_t random_seed,
                               at::IntArrayRef random_keys, at::IntArrayRef random_offsets) {
  const CheckedScoring in = check_score_inputs("score_histogram", finetuned, pretrained, hessians, eps,
                                               hessian_floor, random_seed, random_keys, random_offsets);
  check_histogram_level("score_histogram", level, prefix);
  const WeightArgs args(finetuned, pretrained, hessians);
  at::Tensor counts = at::empty({level_bins(level) + 2}, at::TensorOptions().dtype(at::kLong));
  cpu::score_histogram(args.finetuned(), args.pretrained(), args.hessians(), args.size(), in.spec,
                       in.streams.data(), static_cast<int>(level), static_cast<uint32_t>(prefix),
                       counts.data_ptr<int64_t>());
  return counts;
}

std::tuple<at::Tensor, at::Tensor> score_candidates_cpu(
    at::TensorList finetuned, at::TensorList pretrained, at::TensorList hessians, double eps,
    int64_t low_key, int64_t high_key, int64_t capacity, double hessian_floor, int64_t random_seed,
    at::IntArrayRef random_keys, at::IntArrayRef random_offsets) {
  const CheckedScoring in = check_score_inputs("score_candidates", finetuned, pretrained, hessians, eps,
                                               hessian_floor, random_seed, random_keys, random_offsets);
  check_candidate_range("score_candidates", low_key, high_key, capacity);
  const WeightArgs args(finetuned, pretrained, hessians);
  at::Tensor counts = at::empty({kCandidateCounts + kMaxBins}, at::TensorOptions().dtype(at::kLong));
  at::Tensor keys = at::empty({capacity}, at::TensorOptions().dtype(at::kInt));
  cpu::score_candidates(args.finetuned(), args.pretrained(), args.hessians(), args.size(), in.spec,
                        in.streams.data(), static_cast<uint32_t>(low_key), static_cast<uint32_t>(high_key),
                        capacity, counts.data_ptr<int64_t>(), keys.data_ptr<int32_t>());
  return {counts, keys};
}

std::tuple<at::Tensor, at::Tensor> score_sample_cpu(
    at::TensorList finetuned, at::TensorList pretrained, at::TensorList hessians, double eps,
    int64_t stride, double hessian_floor, int64_t random_seed, at::IntArrayRef random_keys,
    at::IntArrayRef random_offsets) {
  const CheckedScoring in = check_score_inputs("score_sample", finetuned, pretrained, hessians, eps,
                                               hessian_floor, random_seed, random_keys, random_offsets);
  check_sample_stride("score_sample", stride);
  const WeightArgs args(finetuned, pretrained, hessians);
  at::Tensor keys = at::empty({sample_size_of(finetuned, stride)}, at::TensorOptions().dtype(at::kInt));
  at::Tensor counts = at::empty({2}, at::TensorOptions().dtype(at::kLong));
  cpu::score_sample(args.finetuned(), args.pretrained(), args.hessians(), args.size(), in.spec,
                    in.streams.data(), stride, keys.data_ptr<int32_t>(), counts.data_ptr<int64_t>());
  return {keys, counts};
}

at::Tensor masked_reset_cpu(at::TensorList finetuned, at::TensorList pretrained,
                            at::TensorList hessians, double threshold, double eps,
                            double hessian_floor, int64_t random_seed,
                            at::IntArrayRef random_keys, at::IntArrayRef random_offsets) {
  check_weight_lists("masked_reset_", finetuned, pretrained, hessians);
  check_distinct_outputs("masked_reset_", "finetuned", finetuned);
  std::vector<uint64_t> streams;
  const ScoreSpec spec = score_spec("masked_reset_", eps, hessian_floor, random_seed, random_keys,
                                    random_offsets, finetuned.size(), streams);
  const float threshold_f = threshold_as_float("masked_reset_", threshold);
  const WeightArgs args(finetuned, pretrained, hessians);
  at::Tensor counts =
      at::empty({static_cast<int64_t>(finetuned.size())}, at::TensorOptions().dtype(at::kLong));
  cpu::masked_reset(args.finetuned(), args.pretrained(), args.hessians(), args.size(), spec,
                    streams.data(), threshold_f, counts.data_ptr<int64_t>());
  args.write_back_finetuned();
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(finepurify, CPU, m) {
  m.impl("accumulate_sq_grads_", &accumulate_sq_grads_cpu);
  m.impl("float64_sums", &float64_sums_cpu);
  m.impl("drift_score", &drift_score_cpu);
  m.impl("drift_scores", &drift_scores_cpu);
  m.impl("score_histogram", &score_histogram_cpu);
  m.impl("score_candidates", &score_candidates_cpu);
  m.impl("score_sample", &score_sample_cpu);
  m.impl("masked_reset_", &masked_reset_cpu);
}

}  // namespace finepurify
