#include "checks.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>

#include "kernels/score_math.h"

namespace finepurify {
namespace {

bool is_weight_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_same_device(const char* op, const char* list, int64_t i, const at::Tensor& t,
                       const at::Tensor& first) {
  TORCH_CHECK(t.device() == first.device(), "finepurify.", op, ": ", list, "[", i, "] is on ",
              t.device(), " but the first tensor is on ", first.device(),
              "; move all tensors to one device");
}

}  // namespace

void check_weight_lists(const char* op, at::TensorList finetuned, at::TensorList pretrained,
                        at::TensorList hessians) {
  TORCH_CHECK(finetuned.size() == pretrained.size() && finetuned.size() == hessians.size(),
              "finepurify.", op, ": got ", finetuned.size(), " finetuned, ", pretrained.size(),
              " pretrained and ", hessians.size(),
              " hessians tensors; the three lists must have the same length");
  for (size_t i = 0; i < finetuned.size(); ++i) {
    const at::Tensor& ft = finetuned[i];
    const at::Tensor& pre = pretrained[i];
    const at::Tensor& h = hessians[i];
    TORCH_CHECK(is_weight_dtype(ft.scalar_type()), "finepurify.", op, ": finetuned[", i,
                "] has dtype ", ft.scalar_type(), "; expected float32, bfloat16 or float16");
    TORCH_CHECK(pre.scalar_type() == ft.scalar_type(), "finepurify.", op, ": pretrained[", i,
                "] has dtype ", pre.scalar_type(), " but finetuned[", i, "] has dtype ",
                ft.scalar_type(), "; each pair must share one dtype");
    TORCH_CHECK(h.scalar_type() == at::kFloat, "finepurify.", op, ": hessians[", i,
                "] has dtype ", h.scalar_type(), "; hessians must be float32");
    TORCH_CHECK(pre.sizes() == ft.sizes(), "finepurify.", op, ": pretrained[", i,
                "] has shape ", pre.sizes(), " but finetuned[", i, "] has shape ", ft.sizes());
    // A hessian of one element is that tensor's curvature for every element (per-tensor rankings).
    TORCH_CHECK(h.sizes() == ft.sizes() || h.numel() == 1, "finepurify.", op, ": hessians[", i,
                "] has shape ", h.sizes(), " but finetuned[", i, "] has shape ", ft.sizes(),
                "; give a hessian of the same shape, or of one element for the whole tensor");
    check_same_device(op, "finetuned", i, ft, finetuned[0]);
    check_same_device(op, "pretrained", i, pre, finetuned[0]);
    check_same_device(op, "hessians", i, h, finetuned[0]);
  }
}

void check_grad_lists(const char* op, at::TensorList hessians, at::TensorList grads) {
  TORCH_CHECK(hessians.size() == grads.size(), "finepurify.", op, ": got ", hessians.size(),
              " hessians and ", grads.size(), " grads; the lists must have the same length");
  for (size_t i = 0; i < hessians.size(); ++i) {
    const at::Tensor& h = hessians[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(h.scalar_type() == at::kFloat, "finepurify.", op, ": hessians[", i,
                "] has dtype ", h.scalar_type(), "; hessians must be float32");
    TORCH_CHECK(is_weight_dtype(g.scalar_type()), "finepurify.", op, ": grads[", i,
                "] has dtype ", g.scalar_type(), "; expected float32, bfloat16 or float16");
    TORCH_CHECK(g.sizes() == h.sizes(), "finepurify.", op, ": grads[", i, "] has shape ",
                g.sizes(), " but hessians[", i, "] has shape ", h.sizes());
    check_same_device(op, "hessians", i, h, hessians[0]);
    check_same_device(op, "grads", i, g, hessians[0]);
  }
}

void check_distinct_outputs(const char* op, const char* list, at::TensorList tensors) {
  struct Span {
    uintptr_t begin, end;
    size_t index;
  };
  std::vector<Span> spans;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0 || !t.is_contiguous()) continue;
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    spans.push_back({begin, begin + static_cast<uintptr_t>(t.numel()) * t.element_size(), i});
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  uintptr_t reach = 0;  // the furthest end so far, and whose it is
  size_t reach_index = 0;
  for (const Span& span : spans) {
    TORCH_CHECK_VALUE(span.begin >= reach, "finepurify.", op, ": ", list, "[",
                      std::min(reach_index, span.index), "] and ", list, "[",
                      std::max(reach_index, span.index),
                      "] share memory (the same tensor listed twice?); the op writes them in ",
                      "place: pass each tensor once");
    if (span.end > reach) {
      reach = span.end;
      reach_index = span.index;
    }
  }
}

void check_eps(const char* op, double eps) {
  // The kernels add eps in float32: it must stay positive and finite there too.
  const float eps_f = static_cast<float>(eps);
  TORCH_CHECK_VALUE(std::isfinite(eps_f) && eps_f > 0.0f, "finepurify.", op, ": eps must be a ",
                    "positive finite float32 number (it guards hessian == 0), got ", eps);
}

void check_candidate_range(const char* op, int64_t low_key, int64_t high_key, int64_t capacity) {
  TORCH_CHECK_VALUE(0 <= low_key && low_key <= high_key && high_key <= kInfBits, "finepurify.", op,
                    ": the key range must satisfy 0 <= low_key <= high_key <= ", kInfBits,
                    " (the float bits of +Inf), got [", low_key, ", ", high_key, "]");
  TORCH_CHECK_VALUE(capacity >= 0 && capacity <= std::numeric_limits<int32_t>::max(), "finepurify.",
                    op, ": capacity must be in [0, 2^31), got ", capacity);
}

void check_sample_stride(const char* op, int64_t stride) {
  TORCH_CHECK_VALUE(stride >= kSampleRun, "finepurify.", op, ": stride must be at least ", kSampleRun,
                    " (the elements of one sampled run), got ", stride);
}

int64_t sample_size_of(at::TensorList finetuned, int64_t stride) {
  int64_t size = 0;
  for (const at::Tensor& t : finetuned) size += sample_size(t.numel(), stride);
  return size;
}

void check_histogram_level(const char* op, int64_t level, int64_t prefix) {
  TORCH_CHECK_VALUE(level >= 0 && level < kNumLevels, "finepurify.", op, ": level must be in [0, ",
                    kNumLevels, "), got ", level);
  const int64_t prefix_bits = 31 - level_shift(level) - level_bits(level);
  TORCH_CHECK_VALUE(prefix >= 0 && prefix < (int64_t{1} << prefix_bits), "finepurify.", op,
                    ": prefix ", prefix, " has more than ", prefix_bits, " bits for level ",
                    level);
}

ScoreSpec score_spec(const char* op, double eps, double hessian_floor, int64_t random_seed,
                     at::IntArrayRef random_keys, at::IntArrayRef random_offsets,
                     size_t num_tensors, std::vector<uint64_t>& streams) {
  check_eps(op, eps);
  const float floor_f = static_cast<float>(hessian_floor);
  TORCH_CHECK_VALUE(std::isfinite(floor_f) && floor_f >= 0.0f, "finepurify.", op,
                    ": hessian_floor must be a finite float32 number >= 0, got ", hessian_floor);
  TORCH_CHECK_VALUE(random_seed >= -1, "finepurify.", op,
                    ": random_seed must be >= 0 (the random ranking) or -1 (none), got ",
                    random_seed);
  const bool random = random_seed >= 0;
  TORCH_CHECK_VALUE(random_keys.empty() || random_keys.size() == num_tensors, "finepurify.", op,
                    ": got ", random_keys.size(), " random_keys for ", num_tensors,
                    " tensors; give one key per tensor (or none: the list positions)");
  TORCH_CHECK_VALUE(random_offsets.empty() || random_offsets.size() == num_tensors, "finepurify.",
                    op, ": got ", random_offsets.size(), " random_offsets for ", num_tensors,
                    " tensors; give one offset per tensor (or none: every tensor starts at 0)");
  for (const int64_t offset : random_offsets) {
    TORCH_CHECK_VALUE(offset >= 0, "finepurify.", op, ": random_offsets must be >= 0, got ", offset);
  }
  streams.clear();
  if (random) {
    streams.reserve(num_tensors);
    for (size_t i = 0; i < num_tensors; ++i) {
      const auto key = static_cast<uint64_t>(random_keys.empty() ? static_cast<int64_t>(i)
                                                                 : random_keys[i]);
      const auto offset = static_cast<uint64_t>(random_offsets.empty() ? 0 : random_offsets[i]);
      streams.push_back(random_stream(static_cast<uint64_t>(random_seed), key, offset));
    }
  }
  return ScoreSpec{static_cast<float>(eps), floor_f, random};
}

int64_t total_numel(at::TensorList tensors) {
  int64_t total = 0;
  for (const auto& t : tensors) total += t.numel();
  return total;
}

void raise_unrankable(const char* op, at::TensorList finetuned, at::TensorList pretrained,
                      at::TensorList hessians, int64_t num_unrankable) {
  for (size_t i = 0; i < finetuned.size(); ++i) {
    TORCH_CHECK(at::isfinite(finetuned[i]).all().item<bool>(), "finepurify.", op,
                ": finetuned[", i, "] contains NaN or Inf; scores of non-finite weights ",
                "cannot be ranked (fix or drop this tensor)");
    TORCH_CHECK(at::isfinite(pretrained[i]).all().item<bool>(), "finepurify.", op,
                ": pretrained[", i, "] contains NaN or Inf; scores of non-finite weights ",
                "cannot be ranked (fix or drop this tensor)");
    TORCH_CHECK(at::isfinite(hessians[i]).all().item<bool>(), "finepurify.", op, ": hessians[",
                i, "] contains NaN or Inf; re-estimate the hessian (a diverged loss?)");
    TORCH_CHECK(!(hessians[i] < 0).any().item<bool>(), "finepurify.", op, ": hessians[", i,
                "] contains negative values; a squared-gradient hessian is >= 0");
  }
  TORCH_CHECK(false, "finepurify.", op, ": ", num_unrankable,
              " scores are NaN (hessian + eps overflowed); use a smaller eps");
}

TensorArg tensor_arg(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.is_contiguous());
  DType dtype = DType::kFloat32;
  switch (t.scalar_type()) {
    case at::kFloat: dtype = DType::kFloat32; break;
    case at::kBFloat16: dtype = DType::kBFloat16; break;
    case at::kHalf: dtype = DType::kFloat16; break;
    default: TORCH_INTERNAL_ASSERT(false, "unchecked dtype ", t.scalar_type());
  }
  return {t.data_ptr(), t.numel(), dtype};
}

std::vector<TensorArg> consecutive_args(const at::Tensor& flat, at::TensorList like) {
  TORCH_INTERNAL_ASSERT(flat.is_contiguous() && flat.scalar_type() == at::kFloat &&
                        flat.numel() == total_numel(like));
  std::vector<TensorArg> out;
  out.reserve(like.size());
  float* data = flat.data_ptr<float>();
  for (const auto& t : like) {
    out.push_back({data, t.numel(), DType::kFloat32});
    data += t.numel();
  }
  return out;
}

ContiguousList::ContiguousList(at::TensorList tensors) {
  originals_.reserve(tensors.size());
  contiguous_.reserve(tensors.size());
  for (const auto& t : tensors) {
    originals_.push_back(t);
    contiguous_.push_back(t.contiguous());
  }
}

std::vector<TensorArg> ContiguousList::args() const {
  std::vector<TensorArg> out;
  out.reserve(contiguous_.size());
  for (const auto& t : contiguous_) out.push_back(tensor_arg(t));
  return out;
}

void ContiguousList::write_back() const {
  for (size_t i = 0; i < originals_.size(); ++i) {
    if (!originals_[i].is_same(contiguous_[i])) originals_[i].copy_(contiguous_[i]);
  }
}

CheckedScoring check_score_inputs(const char* op, at::TensorList finetuned, at::TensorList pretrained,
                                  at::TensorList hessians, double eps, double hessian_floor,
                                  int64_t random_seed, at::IntArrayRef random_keys,
                                  at::IntArrayRef random_offsets) {
  check_weight_lists(op, finetuned, pretrained, hessians);
  CheckedScoring checked;
  checked.spec = score_spec(op, eps, hessian_floor, random_seed, random_keys, random_offsets,
                            finetuned.size(), checked.streams);
  return checked;
}

WeightArgs::WeightArgs(at::TensorList finetuned, at::TensorList pretrained, at::TensorList hessians)
    : ft_(finetuned), pre_(pretrained), h_(hessians), ft_args_(ft_.args()), pre_args_(pre_.args()),
      h_args_(h_.args()) {}

}  // namespace finepurify

namespace finepurify {

float threshold_as_float(const char* op, double threshold) {
  TORCH_CHECK_VALUE(!std::isnan(threshold), "finepurify.", op, ": threshold is NaN");
  float t = static_cast<float>(threshold);
  if (static_cast<double>(t) < threshold) t = std::nextafter(t, INFINITY);
  return t;
}

}  // namespace finepurify
