// Calls the finepurify ops through the dispatcher from C++, as a libtorch user would, and checks
// them against ATen arithmetic.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>
#include <limits>
#include <string>

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
                                           double, double, int64_t, int64_t)>();
  const at::Tensor drift = ft - pre;
  const at::Tensor expected = drift * drift / (h + eps);
  expect(at::equal(drift_score.call(ft, pre, h, eps, 0.0, -1, 0), expected), "drift_score equals ATen");

  auto reset = c10::Dispatcher::singleton()
                   .findSchemaOrThrow("finepurify::reset_most_abnormal_", "")
                   .typed<at::Tensor(at::TensorList, at::TensorList, at::TensorList, double,
                                     double, double, int64_t, at::IntArrayRef, at::IntArrayRef, bool,
                                     c10::string_view)>();
  at::Tensor purified = ft.clone();
  const at::Tensor counts = reset.call({purified}, {pre}, {h}, 0.75, eps, 0.0, -1, {}, {}, false, "auto");
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

  // An op error reaches a C++ caller as a c10::Error with its whole message.
  auto threshold = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("finepurify::score_threshold", "")
                       .typed<at::Tensor(at::TensorList, at::TensorList, at::TensorList, int64_t,
                                         double, double, int64_t, at::IntArrayRef,
                                         at::IntArrayRef, c10::string_view)>();
  at::Tensor bad = ft.clone();
  bad[3][5] = std::numeric_limits<float>::quiet_NaN();
  std::string message;
  try {
    threshold.call({pre, bad}, {pre, pre}, {h, h}, 10, eps, 0.0, -1, {}, {}, "auto");
  } catch (const c10::Error& error) {
    message = error.what_without_backtrace();
  }
  expect(message.find("finepurify.score_threshold: finetuned[1] contains NaN or Inf; scores of "
                      "non-finite weights cannot be ranked") == 0,
         "a NaN is reported with the whole message");

  std::cout << (5 - failures) << " passed, " << failures << " failed" << std::endl;
  return failures == 0 ? 0 : 1;
}
