"""Bad input fails with a message naming the argument, the list index and what was expected."""
import math

import pytest
import torch

from finepurify_ext import ops

from conftest import make_weights

EPS = 1e-8


def weights(n=3, dtype=torch.float32):
    return make_weights(60, [(10,), (4, 5), (7,)][:n], dtype)


def test_list_lengths_differ():
    ft, pre, h = weights()
    with pytest.raises(RuntimeError, match=r"got 3 finetuned, 2 pretrained and 3 hessians"):
        ops.masked_reset_(ft, pre[:2], h, 0.1, EPS)
    with pytest.raises(RuntimeError, match=r"got 3 finetuned, 3 pretrained and 2 hessians"):
        ops.drift_scores(ft, pre, h[:2], EPS)
    with pytest.raises(RuntimeError, match=r"got 2 hessians and 1 grads"):
        ops.accumulate_sq_grads_(h[:2], [torch.randn(10)])


def test_shape_mismatch_names_index():
    ft, pre, h = weights()
    pre[1] = torch.randn(5, 4)
    with pytest.raises(RuntimeError, match=r"pretrained\[1\] has shape \[5, 4\] but finetuned\[1\] has shape \[4, 5\]"):
        ops.score_threshold(ft, pre, h, 1, EPS)
    ft, pre, h = weights()
    h[2] = torch.rand(8)
    with pytest.raises(RuntimeError, match=r"hessians\[2\] has shape \[8\]"):
        ops.reset_most_abnormal_(ft, pre, h, 0.5, EPS)
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape \[3\] but hessians\[0\] has shape \[10\]"):
        ops.accumulate_sq_grads_([torch.rand(10)], [torch.randn(3)])


def test_unsupported_dtypes():
    ft, pre, h = weights()
    ft[2], pre[2] = ft[2].double(), pre[2].double()
    with pytest.raises(RuntimeError, match=r"finetuned\[2\] has dtype Double; expected float32, bfloat16 or float16"):
        ops.masked_reset_(ft, pre, h, 0.1, EPS)
    ft, pre, h = weights()
    pre[0] = pre[0].bfloat16()
    with pytest.raises(RuntimeError, match=r"pretrained\[0\] has dtype BFloat16 but finetuned\[0\] has dtype Float"):
        ops.score_threshold(ft, pre, h, 1, EPS)
    ft, pre, h = weights()
    h[1] = h[1].bfloat16()
    with pytest.raises(RuntimeError, match=r"hessians\[1\] has dtype BFloat16; hessians must be float32"):
        ops.reset_most_abnormal_(ft, pre, h, 0.5, EPS)
    with pytest.raises(RuntimeError, match=r"grads\[0\] has dtype Int"):
        ops.accumulate_sq_grads_([torch.rand(3)], [torch.ones(3, dtype=torch.int32)])
    with pytest.raises(RuntimeError, match=r"hessians\[0\] has dtype Half; hessians must be float32"):
        ops.accumulate_sq_grads_([torch.rand(3).half()], [torch.ones(3)])


def test_mixed_devices():
    ft, pre, h = weights()
    pre[1] = pre[1].to("meta")
    with pytest.raises(RuntimeError, match=r"pretrained\[1\] is on meta but the first tensor is on cpu"):
        ops.masked_reset_(ft, pre, h, 0.1, EPS)


def test_k_out_of_range():
    ft, pre, h = weights()
    total = sum(t.numel() for t in ft)
    for k in (0, -3, total + 1):
        with pytest.raises(ValueError, match=rf"k={k} is out of range: the tensors hold {total} elements"):
            ops.score_threshold(ft, pre, h, k, EPS)


@pytest.mark.parametrize("ratio", [-0.01, 1.5, math.nan])
def test_reserve_ratio_out_of_range(ratio):
    ft, pre, h = weights()
    before = [t.clone() for t in ft]
    with pytest.raises(ValueError, match=r"reserve_ratio must be in \[0, 1\]"):
        ops.reset_most_abnormal_(ft, pre, h, ratio, EPS)
    assert all(torch.equal(a, b) for a, b in zip(ft, before))


@pytest.mark.parametrize("eps", [0.0, -1e-8, math.inf, math.nan, 1e-50, 1e39])
def test_eps_must_be_positive(eps):
    ft, pre, h = weights()
    with pytest.raises(ValueError, match=r"eps must be a positive finite float32 number"):
        ops.score_threshold(ft, pre, h, 1, eps)
    with pytest.raises(ValueError, match=r"eps must be a positive finite float32 number"):
        ops.drift_score(ft[0], pre[0], h[0], eps)
    with pytest.raises(ValueError, match=r"finepurify.drift_scores: eps must be a positive finite float32 number"):
        ops.drift_scores(ft, pre, h, eps)
    from finepurify_ext.purify import PurifyConfig  # refused where it is set, not at the first op

    with pytest.raises(ValueError, match=r"^eps must be a positive finite float32 number"):
        PurifyConfig(eps=eps)


def test_num_reset_arguments():
    ft, pre, h = weights()
    with pytest.raises(ValueError, match="exactly one of reserve_ratio and num_reset"):
        ops.reset_most_abnormal_(ft, pre, h, 0.5, EPS, num_reset=3)
    with pytest.raises(ValueError, match=r"num_reset=1000 is out of range \[0, 37\]"):
        ops.reset_most_abnormal_(ft, pre, h, None, EPS, num_reset=1000)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["finetuned", "pretrained", "hessians"])
def test_non_finite_input_is_named(dtype, bad, where):
    ft, pre, h = make_weights(61, [(10,), (300,), (4, 5), (70000,)], dtype)
    target = {"finetuned": ft, "pretrained": pre, "hessians": h}[where]
    target[3].view(-1)[12345] = bad
    before = [t.clone() for t in ft]
    with pytest.raises(RuntimeError, match=rf"{where}\[3\] contains NaN or Inf"):
        ops.score_threshold(ft, pre, h, 5, EPS)
    with pytest.raises(RuntimeError, match=rf"{where}\[3\] contains NaN or Inf"):
        ops.reset_most_abnormal_(ft, pre, h, 0.5, EPS)
    # nothing was reset before the error (compared bit for bit: NaN == NaN here)
    assert all(torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                           b.view(torch.int16 if b.element_size() == 2 else torch.int32)) for a, b in zip(ft, before))


def test_negative_hessian_is_named():
    ft, pre, h = weights()
    h[1][2, 3] = -1.0
    with pytest.raises(RuntimeError, match=r"hessians\[1\] contains negative values"):
        ops.score_threshold(ft, pre, h, 2, EPS)


def test_nan_threshold():
    ft, pre, h = weights()
    with pytest.raises(ValueError, match="threshold is NaN"):
        ops.masked_reset_(ft, pre, h, math.nan, EPS)


def test_in_place_outputs_listed_twice_are_refused():
    """A tensor the op writes in place, listed twice (or two overlapping views): a GPU kernel writes
    whole packs, so the listings would race. Disjoint views of one buffer are fine."""
    ft, pre, h = weights()
    with pytest.raises(ValueError, match=r"masked_reset_: finetuned\[0\] and finetuned\[2\] share memory"):
        ops.masked_reset_([ft[0], ft[1], ft[0]], [pre[0], pre[1], pre[0]], [h[0], h[1], h[0]], 0.1, EPS)
    with pytest.raises(ValueError, match=r"accumulate_sq_grads_: hessians\[0\] and hessians\[1\] share memory"):
        ops.accumulate_sq_grads_([h[0], h[0]], [torch.randn(10), torch.randn(10)])
    buffer = torch.rand(20)
    with pytest.raises(ValueError, match=r"hessians\[0\] and hessians\[1\] share memory"):
        ops.accumulate_sq_grads_([buffer[0:10], buffer[5:15]], [torch.randn(10), torch.randn(10)])
    with pytest.raises(ValueError, match=r"grads\[0\] and grads\[1\] share memory"):
        g = torch.randn(10)
        ops.accumulate_sq_grads_([torch.zeros(10), torch.zeros(10)], [g, g], zero_grads=True)
    ops.accumulate_sq_grads_([buffer[0:10], buffer[10:20]], [torch.randn(10), torch.randn(10)])  # disjoint
    g = torch.randn(10)
    ops.accumulate_sq_grads_([torch.zeros(10), torch.zeros(10)], [g, g])  # grads only read
    flat = ft[0].clone()
    pieces = [flat[0:5], flat[5:10]]
    ops.masked_reset_(pieces, [pre[0][0:5], pre[0][5:10]], [h[0][0:5], h[0][5:10]], 0.0, EPS)
    assert torch.equal(flat, pre[0])
