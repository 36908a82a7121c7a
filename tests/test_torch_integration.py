"""torch.library.opcheck on every op, and torch.compile tracing through them."""
import pytest
import torch

import finepurify_ext  # noqa: F401
from finepurify_ext import ops
from finepurify_ext import reference as ref

from conftest import make_weights

EPS = 1e-6
OPS = torch.ops.finepurify


def weight_samples():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        yield make_weights(70, [(37,), (5, 11), (1,)], dtype)
    # strided inputs
    ft, pre, h = make_weights(71, [(12, 20)], torch.float32)
    yield [ft[0].t()], [pre[0].t()], [h[0].t()]


@pytest.mark.parametrize("sample", list(weight_samples()), ids=["f32", "bf16", "f16", "strided"])
def test_opcheck_weight_ops(sample):
    ft, pre, h = sample
    total = sum(t.numel() for t in ft)
    threshold = ref.score_threshold(ft, pre, h, total // 2, EPS)
    torch.library.opcheck(OPS.drift_score.default, (ft[0], pre[0], h[0], EPS))
    torch.library.opcheck(OPS.drift_scores.default, (ft, pre, h, EPS))
    torch.library.opcheck(OPS.score_histogram.default, (ft, pre, h, EPS, 0, 0))
    torch.library.opcheck(OPS.score_threshold.default, (ft, pre, h, total // 2, EPS))
    key = int(torch.tensor(threshold, dtype=torch.float32).view(torch.int32))
    torch.library.opcheck(OPS.score_candidates.default, (ft, pre, h, EPS, key // 2, key, total))
    torch.library.opcheck(OPS.score_sample.default, (ft, pre, h, EPS, 16))
    torch.library.opcheck(OPS.float64_sums.default, ([t.contiguous() for t in h],))
    torch.library.opcheck(OPS.masked_reset_.default, ([t.clone() for t in ft], pre, h, threshold, EPS))
    torch.library.opcheck(OPS.reset_most_abnormal_.default, ([t.clone() for t in ft], pre, h, 0.4, EPS))


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("zero_grads", [False, True])
def test_opcheck_accumulate_sq_grads(grad_dtype, zero_grads):
    gen = torch.Generator().manual_seed(72)
    hessians = [torch.rand(33, generator=gen), torch.rand(4, 9, generator=gen)]
    grads = [torch.randn(33, generator=gen).to(grad_dtype), torch.randn(4, 9, generator=gen).to(grad_dtype)]
    torch.library.opcheck(OPS.accumulate_sq_grads_.default, (hessians, grads, 0.5, zero_grads))


def test_compiled_function_matches_eager():
    gen = torch.Generator().manual_seed(73)
    pre = torch.randn(257, 31, generator=gen)
    ft = pre + 0.01 * torch.randn(257, 31, generator=gen)
    grad = torch.randn(257, 31, generator=gen).bfloat16()

    def step(hessian, grad, ft, pre):
        ops.accumulate_sq_grads_([hessian], [grad], scale=0.5)
        return ops.drift_score(ft, pre, hessian, EPS).sum(dim=0) * 2.0

    compiled = torch.compile(step, fullgraph=True)
    h_eager = torch.rand(257, 31, generator=gen)
    h_compiled = h_eager.clone()
    expected = step(h_eager, grad, ft, pre)
    got = compiled(h_compiled, grad, ft, pre)
    assert torch.equal(h_compiled, h_eager)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_compiled_reset_matches_eager():
    ft, pre, h = make_weights(74, [(300,), (7, 9)], torch.bfloat16)
    eager, compiled_ft = [t.clone() for t in ft], [t.clone() for t in ft]

    def purify(ft, pre, h):
        return torch.ops.finepurify.reset_most_abnormal_.default(ft, pre, h, 0.5, EPS)

    expected = purify(eager, pre, h)
    got = torch.compile(purify, fullgraph=True)(compiled_ft, pre, h)
    assert torch.equal(got, expected)
    assert all(torch.equal(a, b) for a, b in zip(compiled_ft, eager))


def test_cpu_capability_can_be_forced():
    import subprocess
    import sys

    code = "import finepurify_ext; print(finepurify_ext.cpu_capability())"
    env_forced = dict(__import__("os").environ, FINEPURIFY_CPU_CAPABILITY="baseline")
    forced = subprocess.run([sys.executable, "-c", code], env=env_forced, capture_output=True, text=True, check=True)
    assert forced.stdout.strip() == "baseline"
    assert finepurify_ext.cpu_capability() in ("avx2", "baseline")


def test_compiled_training_step_has_no_graph_break_from_the_op():
    """A whole training step: forward, backward, then the Hessian accumulation. Dynamo may break at
    ``backward()`` (not ours to fix); it must never break at the op, and the result equals eager."""
    torch.manual_seed(75)
    model = torch.nn.Sequential(torch.nn.Linear(9, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x, y = torch.randn(32, 9), torch.randint(0, 3, (32,))

    def step(hessians):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        params = list(model.parameters())
        ops.accumulate_sq_grads_(hessians, [p.grad for p in params], scale=0.25, zero_grads=True)
        return loss.detach()

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)([torch.zeros_like(p) for p in model.parameters()])
    reasons = [str(r) for r in explanation.break_reasons]
    assert not [r for r in reasons if "finepurify" in r or "accumulate_sq_grads" in r], reasons

    model.zero_grad(set_to_none=True)
    eager = [torch.zeros_like(p) for p in model.parameters()]
    step(eager)
    model.zero_grad(set_to_none=True)
    compiled = [torch.zeros_like(p) for p in model.parameters()]
    torch._dynamo.reset()
    torch.compile(step)(compiled)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)  # inductor reorders the forward sums

    # the accumulation after backward on its own compiles as one graph
    grads = [torch.randn_like(p) for p in model.parameters()]

    def accumulate(hessians, grads):
        ops.accumulate_sq_grads_(hessians, grads, scale=0.25)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(accumulate)(compiled, grads)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@pytest.mark.parametrize("ranking", [ops.Ranking(hessian_floor=0.01), ops.Ranking(random_seed=2, random_keys=(5, 6),
                                                                               random_offsets=(0, 10))])
def test_opcheck_ranking_arguments(ranking):
    ft, pre, h = make_weights(74, [(65, 3), (129,)], torch.bfloat16)
    h[1] = torch.rand(1)  # a per-tensor hessian
    args = ranking.args()
    total = sum(t.numel() for t in ft)
    threshold = ops.score_threshold(ft, pre, h, total // 2, EPS, ranking=ranking)
    torch.library.opcheck(OPS.drift_score.default, (ft[0], pre[0], h[0], EPS, args[0], args[1], 5))
    torch.library.opcheck(OPS.drift_scores.default, (ft, pre, h, EPS, *args))
    torch.library.opcheck(OPS.score_histogram.default, (ft, pre, h, EPS, 0, 0, *args))
    torch.library.opcheck(OPS.score_threshold.default, (ft, pre, h, total // 2, EPS, *args))
    torch.library.opcheck(OPS.masked_reset_.default, ([t.clone() for t in ft], pre, h, threshold, EPS, *args))
    torch.library.opcheck(OPS.reset_most_abnormal_.default, ([t.clone() for t in ft], pre, h, 0.4, EPS, *args, True))
