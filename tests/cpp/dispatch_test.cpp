// Calls the finepurify ops through the dispatcher from C++, as a libtorch user would, and checks
// them against ATen arithmetic.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  std::cout << (ok ? "PASS " : "FAIL ") << what << std::endl;
  if (!ok) ++failures;
}

}  // namespace

int main() {
  at::manual_seed(0);
  const double eps = 1e-6;
  const at::Tensor pre = at::randn({1000, 37});
  const at::Tensor ft = pre + 0.01 * at::randn({1000, 37});
  const at::Tensor h = at::rand({1000, 37});

  auto drift_score = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("finepurify::drift_score", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           double)>();
  const at::Tensor drift = ft - pre;
  const at::Tensor expected = drift * drift / (h + eps);
  expect(at::equal(drift_score.call(ft, pre, h, eps), expected), "drift_score equals ATen");

  auto reset = c10::Dispatcher::singleton()
                   .findSchemaOrThrow("finepurify::reset_most_abnormal_", "")
                   .typed<at::Tensor(at::TensorList, at::TensorList, at::TensorList, double,
                                     double)>();
  at::Tensor purified = ft.clone();
  const at::Tensor counts = reset.call({purified}, {pre}, {h}, 0.75, eps);
  const int64_t num_reset = counts.sum().item<int64_t>();
  expect(num_reset == 37000 / 4, "reset_most_abnormal_ resets a quarter");
  const at::Tensor was_reset = purified.eq(pre);
  const at::Tensor reset_scores = expected.masked_select(was_reset);
  const at::Tensor kept_scores = expected.masked_select(was_reset.logical_not());
  expect(reset_scores.min().item<float>() > kept_scores.max().item<float>(),
         "every reset score is above every kept one");
  expect(at::equal(purified.masked_select(was_reset.logical_not()),
                   ft.masked_select(was_reset.logical_not())),
         "kept weights are untouched");

  std::cout << (4 - failures) << " passed, " << failures << " failed" << std::endl;
  return failures == 0 ? 0 : 1;
}
