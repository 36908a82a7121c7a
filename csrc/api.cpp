// The C++ API of include/finepurify/finepurify.h: thin calls through the dispatcher.
#include "finepurify/finepurify.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace finepurify {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// No tensors, no device to dispatch on: the list ops answer empty lists here, as the Python
// wrappers do (the dispatcher would refuse a call without tensor arguments).
bool all_empty(at::TensorList a, at::TensorList b, at::TensorList c = {}) {
  return a.empty() && b.empty() && c.empty();
}

}  // namespace

void accumulate_sq_grads_(at::TensorList hessians, at::TensorList grads, double scale,
                          bool zero_grads) {
  static auto handle =
      op<void(at::TensorList, at::TensorList, double, bool)>("finepurify::accumulate_sq_grads_");
  if (all_empty(hessians, grads)) return;
  handle.call(hessians, grads, scale, zero_grads);
}

at::Tensor drift_score(const at::Tensor& finetuned, const at::Tensor& pretrained,
                       const at::Tensor& hessian, double eps, double hessian_floor,
                       int64_t random_seed, int64_t random_key) {
  static auto handle = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     double, double, int64_t, int64_t)>("finepurify::drift_score");
  return handle.call(finetuned, pretrained, hessian, eps, hessian_floor, random_seed, random_key);
}

at::Tensor drift_scores(at::TensorList finetuned, at::TensorList pretrained, at::TensorList hessians,
                        double eps, const Ranking& r) {
  static auto handle = op<at::Tensor(at::TensorList, at::TensorList, at::TensorList, double, double,
                                     int64_t, at::IntArrayRef, at::IntArrayRef)>(
      "finepurify::drift_scores");
  if (all_empty(finetuned, pretrained, hessians)) return at::empty({0}, at::kFloat);
  return handle.call(finetuned, pretrained, hessians, eps, r.hessian_floor, r.random_seed,
                     r.random_keys, r.random_offsets);
}

double score_threshold(at::TensorList finetuned, at::TensorList pretrained, at::TensorList hessians,
                       int64_t k, double eps, const Ranking& r, c10::string_view search) {
  static auto handle = op<at::Tensor(at::TensorList, at::TensorList, at::TensorList, int64_t,
                                     double, double, int64_t, at::IntArrayRef, at::IntArrayRef,
                                     c10::string_view)>("finepurify::score_threshold");
  return handle.call(finetuned, pretrained, hessians, k, eps, r.hessian_floor, r.random_seed,
                     r.random_keys, r.random_offsets, search)
      .item<double>();
}

at::Tensor masked_reset_(at::TensorList finetuned, at::TensorList pretrained, at::TensorList hessians,
                         double threshold, double eps, const Ranking& r) {
  static auto handle = op<at::Tensor(at::TensorList, at::TensorList, at::TensorList, double, double,
                                     double, int64_t, at::IntArrayRef, at::IntArrayRef)>(
      "finepurify::masked_reset_");
  if (all_empty(finetuned, pretrained, hessians)) return at::empty({0}, at::kLong);
  return handle.call(finetuned, pretrained, hessians, threshold, eps, r.hessian_floor,
                     r.random_seed, r.random_keys, r.random_offsets);
}

at::Tensor reset_most_abnormal_(at::TensorList finetuned, at::TensorList pretrained,
                                at::TensorList hessians, double reserve_ratio, double eps,
                                const Ranking& r, bool count_moved_only, c10::string_view search) {
  static auto handle = op<at::Tensor(at::TensorList, at::TensorList, at::TensorList, double, double,
                                     double, int64_t, at::IntArrayRef, at::IntArrayRef, bool,
                                     c10::string_view)>("finepurify::reset_most_abnormal_");
  return handle.call(finetuned, pretrained, hessians, reserve_ratio, eps, r.hessian_floor,
                     r.random_seed, r.random_keys, r.random_offsets, count_moved_only, search);
}

}  // namespace finepurify
