// Purifies a few tensors through the installed C++ API and checks the result with ATen.
#include <finepurify/finepurify.h>

#include <iostream>

int main() {
  at::manual_seed(1);
  const double eps = 1e-6;
  const at::Tensor pre = at::randn({301, 7});
  at::Tensor ft = pre + 0.01 * at::randn({301, 7});
  const at::Tensor h = at::rand({301, 7});
  const at::Tensor scores = finepurify::drift_score(ft, pre, h, eps);
  const int64_t k = 500;
  const double threshold = finepurify::score_threshold({ft}, {pre}, {h}, k, eps);
  const double expected = std::get<0>(scores.flatten().topk(k)).min().item<double>();
  const at::Tensor counts = finepurify::masked_reset_({ft}, {pre}, {h}, threshold, eps);
  at::Tensor hessian = at::zeros({301, 7});
  finepurify::accumulate_sq_grads_({hessian}, {h}, 2.0);
  // Empty lists, as from a model without matched parameters: nothing to do, empty results.
  finepurify::accumulate_sq_grads_({}, {});
  const bool empty_ok = finepurify::drift_scores({}, {}, {}, eps).numel() == 0 &&
                        finepurify::masked_reset_({}, {}, {}, 0.5, eps).numel() == 0 &&
                        finepurify::reset_most_abnormal_({}, {}, {}, 0.5, eps).numel() == 0;
  const bool ok = threshold == expected && counts.item<int64_t>() == k &&
                  at::equal(ft.eq(pre), scores.ge(threshold)) && at::allclose(hessian, 2.0 * h * h) &&
                  empty_ok;
  std::cout << (ok ? "PASS" : "FAIL") << " installed finepurify C++ API (threshold " << threshold
            << ", reset " << counts.item<int64_t>() << ")" << std::endl;
  return ok ? 0 : 1;
}
