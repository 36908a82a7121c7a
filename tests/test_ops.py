"""Every op against the pure-PyTorch reference (finepurify_ext.reference) on fresh random inputs."""
import dataclasses
import itertools
import math
import os

import pytest
import torch

from finepurify_ext import ops
from finepurify_ext import reference as ref

from conftest import (DTYPES, RANKINGS, SIZES, assert_bitwise, clones, make_weights, many_shapes, misleading_sample,
                      ranked_weights, sorted_scores_desc)

EPS = 1e-8


# ----------------------------------------------------------------------- accumulate_sq_grads_


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("zero_grads", [False, True])
def test_accumulate_sq_grads_matches_reference(dtype, size, zero_grads):
    gen = torch.Generator().manual_seed(size)
    hessians = [torch.rand(size, generator=gen), torch.rand(3, 5, generator=gen)]
    grads = [torch.randn(size, generator=gen).to(dtype), torch.randn(3, 5, generator=gen).to(dtype)]
    h_ref, g_ref = clones(hessians), clones(grads)
    ops.accumulate_sq_grads_(hessians, grads, scale=0.37, zero_grads=zero_grads)
    ref.accumulate_sq_grads_(h_ref, g_ref, scale=0.37, zero_grads=zero_grads)
    assert_bitwise(hessians, h_ref)
    assert_bitwise(grads, g_ref)
    if not zero_grads:
        assert any(g.abs().sum() > 0 for g in grads)


def test_accumulate_sq_grads_many_tensors_mixed_dtypes():
    shapes = many_shapes(1, 333)
    gen = torch.Generator().manual_seed(2)
    hessians = [torch.rand(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(DTYPES[i % 3]) for i, s in enumerate(shapes)]
    h_ref = clones(hessians)
    ops.accumulate_sq_grads_(hessians, grads, scale=2.0)
    ref.accumulate_sq_grads_(h_ref, grads, scale=2.0)
    assert_bitwise(hessians, h_ref)


def test_accumulate_sq_grads_repeated_equals_sum():
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(1000, generator=gen) for _ in range(4)]
    hessian = torch.zeros(1000)
    for g in grads:
        ops.accumulate_sq_grads_([hessian], [g], scale=0.25)
    expected = torch.zeros(1000)
    for g in grads:
        expected += 0.25 * g * g
    torch.testing.assert_close(hessian, expected, rtol=1e-6, atol=0)


def test_accumulate_sq_grads_non_contiguous_written_back(dtype):
    gen = torch.Generator().manual_seed(4)
    hessian = torch.rand(33, 64, generator=gen).t()  # transposed view
    grad_strided = torch.randn(64, 66, generator=gen).to(dtype)[:, ::2]
    h_ref = hessian.clone()
    g_ref = grad_strided.clone()
    ops.accumulate_sq_grads_([hessian], [grad_strided], zero_grads=True)
    ref.accumulate_sq_grads_([h_ref], [g_ref], zero_grads=True)
    assert torch.equal(hessian, h_ref)
    assert not hessian.is_contiguous() and not grad_strided.is_contiguous()
    assert torch.equal(grad_strided, torch.zeros_like(grad_strided))


# ------------------------------------------------------------------------------ drift_score


@pytest.mark.parametrize("size", SIZES)
def test_drift_score_matches_reference(dtype, size):
    (ft,), (pre,), (h,) = make_weights(size, [(size,)], dtype)
    out = ops.drift_score(ft, pre, h, EPS)
    expected = ref.drift_score(ft, pre, h, EPS)
    assert out.dtype == torch.float32 and out.shape == ft.shape
    assert torch.equal(out, expected)
    if size > 10:
        assert (out > 0).any()


def test_drift_score_non_contiguous():
    (ft,), (pre,), (h,) = make_weights(5, [(40, 70)], torch.float32)
    out = ops.drift_score(ft.t(), pre.t(), h.t(), 1e-3)
    assert torch.equal(out, ref.drift_score(ft.t(), pre.t(), h.t(), 1e-3))


@pytest.mark.parametrize("name", RANKINGS)
def test_drift_scores_match_reference_per_tensor(dtype, name):
    """The list op: each tensor's scores, of its shape, bitwise the reference's, over odd sizes, an
    empty tensor, one-element hessians and every ranking (random streams keyed per tensor)."""
    ranking = RANKINGS[name]
    ft, pre, h = ranked_weights(dtype, seed=52)
    got = ops.drift_scores(ft, pre, h, EPS, ranking=ranking)
    kws = ref._per_tensor(ranking, len(ft))
    assert_bitwise(got, [ref.drift_score(f, p, hh, EPS, **kw) for f, p, hh, kw in zip(ft, pre, h, kws)])
    assert [g.shape for g in got] == [f.shape for f in ft]
    assert torch.equal(torch.cat([g.flatten() for g in got]), ref.all_scores(ft, pre, h, EPS, ranking))
    assert (torch.cat([g.flatten() for g in got]) > 0).any()


def test_drift_scores_many_tensors_mixed_dtypes_and_strides():
    shapes = many_shapes(3, 150)
    gen = torch.Generator().manual_seed(3)
    ft, pre, h = [], [], []
    for i, s in enumerate(shapes):
        dtype = DTYPES[i % 3]
        p = torch.randn(s, generator=gen).to(dtype)
        ft.append((p.float() + 0.1 * torch.randn(s, generator=gen)).to(dtype))
        pre.append(p)
        h.append(torch.rand(s, generator=gen) if i % 5 else torch.rand(1, generator=gen))
    ft[6], pre[6], h[6] = ft[6].t(), pre[6].t(), h[6].t()  # strided views are read, not refused
    assert not ft[6].is_contiguous()
    got = ops.drift_scores(ft, pre, h, EPS)
    assert_bitwise(got, [ref.drift_score(f, p, hh, EPS) for f, p, hh in zip(ft, pre, h)])
    assert ops.drift_scores([], [], [], EPS) == []


# -------------------------------------------------------------------------- score_threshold


@pytest.mark.parametrize("size", [1, 7, 1023, 65537, 100_003])
def test_score_threshold_exact(dtype, size):
    ft, pre, h = make_weights(10 + size, [(size,), (13, 17), (0,)], dtype)
    scores = sorted_scores_desc(ft, pre, h)
    total = scores.numel()
    gen = torch.Generator().manual_seed(size)
    ks = {1, total, max(1, total // 2), int(torch.randint(1, total + 1, (1,), generator=gen))}
    for k in ks:
        assert ops.score_threshold(ft, pre, h, k, EPS) == scores[k - 1].item(), k


def test_score_threshold_many_tensors_mixed_dtypes():
    shapes = many_shapes(7, 320)
    ft, pre, h = make_weights(8, shapes, [DTYPES[i % 3] for i in range(len(shapes))])
    scores = sorted_scores_desc(ft, pre, h)
    for k in (1, 17, scores.numel() // 3, scores.numel()):
        assert ops.score_threshold(ft, pre, h, k, EPS) == scores[k - 1].item()


def test_score_threshold_ties():
    # Only four distinct scores, each shared by many elements (and across tensors).
    gen = torch.Generator().manual_seed(9)
    ft, pre, h = [], [], []
    for n in (1000, 777, 65536 + 3):
        p = torch.randn(n, generator=gen)
        level = torch.randint(0, 4, (n,), generator=gen).float()
        ft.append(p + 0.5 * level.sqrt() * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0))
        pre.append(p)
        h.append(torch.full((n,), 0.25))
    scores = sorted_scores_desc(ft, pre, h)
    assert scores.unique().numel() < 50  # ties dominate
    for k in range(1, scores.numel() + 1, 4099):
        t = ops.score_threshold(ft, pre, h, k, EPS)
        assert t == scores[k - 1].item()
        # the reset at that threshold takes every tie
        work = clones(ft)
        counts = ops.masked_reset_(work, pre, h, t, EPS)
        assert int(counts.sum()) == int((scores >= t).sum()) >= k


def test_score_threshold_extreme_scores():
    # Zero drift (score 0), denormal scores, and drifts large enough to overflow to +Inf rank too.
    ft = [torch.tensor([1.0, 2.0, 1e-30, 3e19, -3e19, 5.0])]
    pre = [torch.tensor([1.0, 2.5, 0.0, 0.0, 0.0, 5.0])]
    h = [torch.tensor([0.0, 1.0, 1.0, 1.0, 0.5, 2.0])]
    scores = sorted_scores_desc(ft, pre, h, 1e-3)
    assert math.isinf(scores[0].item())
    for k in range(1, 7):
        assert ops.score_threshold(ft, pre, h, k, 1e-3) == scores[k - 1].item()


# ---------------------------------------------------------------------------- masked_reset_


@pytest.mark.parametrize("size", SIZES)
def test_masked_reset_bitwise(dtype, size):
    ft, pre, h = make_weights(20 + size, [(size,), (5, 9)], dtype)
    scores = sorted_scores_desc(ft, pre, h)
    threshold = scores[scores.numel() // 3].item()
    pre_before = clones(pre)
    got, expected = clones(ft), clones(ft)
    counts = ops.masked_reset_(got, pre, h, threshold, EPS)
    expected_counts = ref.masked_reset_(expected, pre, h, threshold, EPS)
    assert_bitwise(got, expected)
    assert torch.equal(counts, expected_counts)
    assert_bitwise(pre, pre_before)
    assert int(counts.sum()) == int((scores >= threshold).sum())


def test_masked_reset_threshold_between_floats():
    # A double threshold between two floats: score >= threshold compares exactly.
    ft, pre, h = make_weights(30, [(5000,)], torch.float32)
    score = sorted_scores_desc(ft, pre, h)[100].item()
    above = score + abs(score) * 1e-9  # rounds back to `score` as a float32
    assert torch.tensor(above, dtype=torch.float32).item() == score
    work = clones(ft)
    count_above = ops.masked_reset_(work, pre, h, above, EPS)
    work = clones(ft)
    count_at = ops.masked_reset_(work, pre, h, score, EPS)
    assert int(count_at) == int(count_above) + 1


def test_masked_reset_non_contiguous_written_back(dtype):
    ft, pre, h = make_weights(31, [(50, 70)], dtype)
    ft_t, pre_t, h_t = ft[0].t(), pre[0].t().contiguous(), h[0].t()
    expected = ft_t.clone()
    threshold = sorted_scores_desc([ft_t], [pre_t], [h_t])[500].item()
    ref.masked_reset_([expected], [pre_t], [h_t], threshold, EPS)
    counts = ops.masked_reset_([ft_t], [pre_t], [h_t], threshold, EPS)
    assert not ft_t.is_contiguous()
    assert torch.equal(ft_t, expected) and int(counts[0]) == 501
    assert torch.equal(ft[0], expected.t())  # the written-back storage is the caller's


# --------------------------------------------------------------------- reset_most_abnormal_


@pytest.mark.parametrize("reserve_ratio", [0.0, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_reset_most_abnormal_matches_reference(dtype, reserve_ratio):
    ft, pre, h = make_weights(40, [(1000,), (17, 33), (65537,), (1,)], dtype)
    got, expected = clones(ft), clones(ft)
    counts = ops.reset_most_abnormal_(got, pre, h, reserve_ratio, EPS)
    expected_counts = ref.reset_most_abnormal_(expected, pre, h, reserve_ratio, EPS)
    assert_bitwise(got, expected)
    assert torch.equal(counts, expected_counts)
    total = sum(f.numel() for f in ft)
    assert int(counts.sum()) >= ops.num_reset_for(total, reserve_ratio)
    if reserve_ratio == 1.0:
        assert int(counts.sum()) == 0
    if reserve_ratio == 0.0:
        assert all(torch.equal(g, p) for g, p in zip(got, pre))


def test_reset_most_abnormal_many_tensors():
    shapes = many_shapes(41, 305)
    ft, pre, h = make_weights(42, shapes, [DTYPES[i % 3] for i in range(len(shapes))])
    got, expected = clones(ft), clones(ft)
    counts = ops.reset_most_abnormal_(got, pre, h, 0.6, EPS)
    assert torch.equal(counts, ref.reset_most_abnormal_(expected, pre, h, 0.6, EPS))
    assert_bitwise(got, expected)


def test_reset_most_abnormal_num_reset():
    ft, pre, h = make_weights(43, [(3000,), (7, 7)], torch.bfloat16)
    got, expected = clones(ft), clones(ft)
    counts = ops.reset_most_abnormal_(got, pre, h, None, EPS, num_reset=1234)
    t = ref.score_threshold(ft, pre, h, 1234, EPS)
    assert torch.equal(counts, ref.masked_reset_(expected, pre, h, t, EPS))
    assert int(counts.sum()) == 1234  # continuous random scores: no ties
    assert_bitwise(got, expected)


def test_fast_baseline_agrees_with_reference():
    """The benchmark baseline must compute the same thing, or its timings mean nothing."""
    ft, pre, h = make_weights(44, [(1000,), (65537,), (9, 9)], torch.bfloat16)
    got, expected = clones(ft), clones(ft)
    counts = ref.fast_reset_most_abnormal_(got, pre, h, 0.7, EPS)
    assert torch.equal(counts, ref.reset_most_abnormal_(expected, pre, h, 0.7, EPS))
    assert_bitwise(got, expected)
    hs = [torch.rand(100), torch.rand(5, 5)]
    hs_ref = clones(hs)
    grads = [torch.randn(100).bfloat16(), torch.randn(5, 5).bfloat16()]
    ref.fast_accumulate_sq_grads_(hs, grads, 0.5)
    ref.accumulate_sq_grads_(hs_ref, grads, 0.5)
    for a, b in zip(hs, hs_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)



@pytest.mark.parametrize("dtype", DTYPES)
def test_lean_baselines_agree_with_reference(dtype):
    """The radix-select and chunked-topk baselines, with chunks smaller than a tensor so the
    chunking is exercised, on both sides of the median for topk."""
    ft, pre, h = make_weights(45, [(1000,), (4099,), (9, 9), (1,)], dtype)
    total = sum(f.numel() for f in ft)
    for k in (1, 2, total // 3, total // 2, total - 5, total):
        expected = ref.score_threshold(ft, pre, h, k, EPS)
        assert ref.radix_score_threshold(ft, pre, h, k, EPS, chunk=777) == expected
        assert ref.topk_score_threshold(ft, pre, h, k, EPS, chunk=777) == expected
    got, expected = clones(ft), clones(ft)
    counts = ref.radix_reset_most_abnormal_(got, pre, h, 0.3, EPS, chunk=777)
    assert torch.equal(counts, ref.reset_most_abnormal_(expected, pre, h, 0.3, EPS))
    assert_bitwise(got, expected)

# ---------------------------------------------------------------------- empty inputs


def test_empty_lists():
    assert ops.accumulate_sq_grads_([], []) is None
    assert ops.masked_reset_([], [], [], 0.5, EPS).numel() == 0
    assert ops.reset_most_abnormal_([], [], [], 0.5, EPS).numel() == 0
    with pytest.raises(ValueError, match=r"k=1 is out of range: the tensors hold 0 elements"):
        ops.score_threshold([], [], [], 1, EPS)


def test_empty_tensors_only(dtype):
    ft, pre, h = make_weights(50, [(0,), (0, 3)], dtype)
    hessians, grads = [torch.zeros(0)], [torch.zeros(0, dtype=dtype)]
    ops.accumulate_sq_grads_(hessians, grads)
    assert ops.drift_score(ft[0], pre[0], h[0], EPS).shape == (0,)
    assert torch.equal(ops.masked_reset_(ft, pre, h, 0.0, EPS), torch.zeros(2, dtype=torch.int64))
    assert torch.equal(ops.reset_most_abnormal_(ft, pre, h, 0.5, EPS), torch.zeros(2, dtype=torch.int64))


# ------------------------------------------------------------ rankings: one scoring spec, every op

@pytest.mark.parametrize("name", RANKINGS)
def test_rankings_match_reference(dtype, name):
    ranking = RANKINGS[name]
    ft, pre, h = ranked_weights(dtype)
    for i, (f, p, hh) in enumerate(zip(ft, pre, h)):
        kw = ref._per_tensor(ranking, len(ft))[i]
        got = ops.drift_score(f, p, hh, EPS, hessian_floor=kw.get("hessian_floor", 0.0),
                              random_seed=kw.get("random_seed", -1), random_key=kw.get("random_key", 0))
        assert_bitwise([got], [ref.drift_score(f, p, hh, EPS, **kw)])
    total = sum(f.numel() for f in ft)
    for k in (1, 2, total // 3, total - 1):
        assert ops.score_threshold(ft, pre, h, k, EPS, ranking=ranking) == ref.score_threshold(ft, pre, h, k, EPS, ranking)
    for moved_only in (False, True):
        got, expected = clones(ft), clones(ft)
        counts = ops.reset_most_abnormal_(got, pre, h, 0.3, EPS, ranking=ranking, count_moved_only=moved_only)
        assert torch.equal(counts, ref.reset_most_abnormal_(expected, pre, h, 0.3, EPS, ranking, moved_only))
        assert_bitwise(got, expected)


def test_histogram_counts_unrankable_then_unmoved(dtype):
    ft, pre, h = ranked_weights(dtype, seed=51)
    total = sum(f.numel() for f in ft)
    unmoved = sum(int((f.float() == p.float()).sum()) for f, p in zip(ft, pre))
    assert 0 < unmoved < total
    for level, prefix in ((0, 0), (1, 3), (2, 5)):
        counts = ops.score_histogram(ft, pre, h, EPS, level, prefix)
        assert counts.numel() == (2048 if level == 0 else 1024) + 2
        assert int(counts[-2]) == 0 and int(counts[-1]) == unmoved
    assert int(ops.score_histogram(ft, pre, h, EPS, 0, 0)[:-2].sum()) == total


# -------------------------------------------------------------------------- score_candidates


@pytest.mark.parametrize("ranking_name", list(RANKINGS))
def test_candidates_match_reference_and_give_the_threshold(dtype, ranking_name):
    """Odd and chunk-straddling sizes, an empty tensor, per-tensor hessians, a third unmoved (tied
    at 0): the counts and the sorted keys equal the reference's, and the k-th largest score read
    from them is the exact threshold of the histogram search, for ranges around it of several
    widths (0: both ends on it)."""
    from finepurify_ext.threshold import key_of, threshold_from_candidates

    ranking = RANKINGS[ranking_name]
    ft, pre, h = ranked_weights(dtype, seed=53)
    total = sum(f.numel() for f in ft)
    unmoved = sum(int((f.float() == p.float()).sum()) for f, p in zip(ft, pre))
    scores = torch.sort(ref.all_scores(ft, pre, h, EPS, ranking), descending=True).values
    for k in (1, 2, total // 3, total // 2, total - 1, total):
        threshold = ops.score_threshold(ft, pre, h, k, EPS, ranking=ranking)
        for width in (0, 3, 400, total):  # the range: the scores `width` ranks above and below
            high = key_of(scores[max(0, k - 1 - width)].item())
            low = key_of(scores[min(total - 1, k - 1 + width)].item())
            counts, keys = ops.score_candidates(ft, pre, h, EPS, low, high, 2 * width + 64, ranking=ranking)
            expected = ref.score_candidates(ft, pre, h, EPS, low, high, 2 * width + 64, ranking=ranking)
            assert torch.equal(counts, expected[0]) and torch.equal(keys, expected[1])
            assert counts.tolist()[4:6] == [0, unmoved] and int(counts[:4].sum()) <= total
            between = int(counts[2])
            got = threshold_from_candidates(counts, keys[:between] if between <= keys.numel() else None, low, high, k)
            assert got == threshold or (got is None and between > keys.numel()), (k, width)
            if got is not None:  # the same from a pass per tensor, its keys as the list of each one's
                alone = [ranking.subset([i]) if ranking.random_keys else dataclasses.replace(ranking, random_keys=(i,))
                         for i in range(len(ft))]  # each tensor's own key (by default its place in the list)
                parts = [ops.score_candidates([f], [p], [g], EPS, low, high, 2 * width + 64, ranking=alone[i])
                         for i, (f, p, g) in enumerate(zip(ft, pre, h))]
                summed = torch.stack([c for c, _ in parts]).sum(0)
                kept = [part_keys[:int(c[2])] for c, part_keys in parts]
                assert torch.equal(summed[:6], counts[:6]) and threshold_from_candidates(summed, kept, low, high, k) == got


def test_the_python_search_shares_the_kernels_constants():
    """threshold.py's copies of the constants (what the searches over groups, pieces and ranks use)
    are the C++ side's: the histogram levels, the candidates' counts and bins, the sample's run, and
    the ops' own search's key room and the size from which "auto" takes it."""
    from finepurify_ext import _C, threshold

    built = _C.constants()
    assert built == {"level_bits": threshold.LEVEL_BITS, "between_bins": threshold.BETWEEN_BINS,
                     "candidate_counts": threshold.CANDIDATE_COUNTS, "sample_run": threshold.SAMPLE_RUN,
                     "candidate_keys": threshold.CANDIDATE_KEYS,
                     "sample_search_min_weights": threshold.CANDIDATES_MIN_WEIGHTS, "inf_key": threshold.INF_KEY}
    assert threshold.LEVEL_BINS[0] + 2 == ops.score_histogram([torch.ones(3)], [torch.zeros(3)], [torch.ones(3)],
                                                             1e-3, 0, 0).numel()


def test_candidates_on_follows_the_environment_where_it_names_device_types():
    """FINEPURIFY_CANDIDATES_ON (how the GPU check times the sample's search on a GPU) reaches every
    module that decides where it runs; a value that names no device type is ignored with a warning."""
    import subprocess
    import sys

    show = ("import warnings; warnings.simplefilter('always')\n"
            "from finepurify_ext import checkpoint, purify, threshold\n"
            "print(threshold.CANDIDATES_ON, purify.CANDIDATES_ON, checkpoint.CANDIDATES_ON)")
    for value, expected, warned in ((None, ("cpu",), False), ("cpu,cuda", ("cpu", "cuda"), False),
                                    (" cuda ", ("cuda",), False), ("gpu", ("cpu",), True), ("", ("cpu",), True)):
        env = {k: v for k, v in os.environ.items() if k != "FINEPURIFY_CANDIDATES_ON"}
        if value is not None:
            env["FINEPURIFY_CANDIDATES_ON"] = value
        run = subprocess.run([sys.executable, "-c", show], env=env, capture_output=True, text=True, check=True)
        assert run.stdout.strip() == " ".join([str(expected)] * 3), (value, run.stdout)
        assert (f"FINEPURIFY_CANDIDATES_ON={value!r} is ignored" in run.stderr) == warned, run.stderr


def test_the_ops_search_keeps_the_keys_room_and_sample_purify_keeps():
    """finepurify/search.h keys_room and sample_budget (the ops' own search) are threshold's: the same
    room over shares, sample sizes and model sizes, from the expected keys (three times them)
    through the most the bracket likely holds up to no room (a model of billions: the pass only
    counts), and the same sample size from 16K to 4M."""
    from finepurify_ext import _C, threshold
    from finepurify_ext.threshold import keys_room

    rooms = set()
    for inside in (0.0, 1e-7, 3e-6, 0.0012, 0.0054, 0.02, 0.3, 1.0):
        for samples in (1, 97, 16384, 1 << 20, 8 << 20):
            for total in (1, 5000, 1 << 20, 400_000_000, 700_000_000, 3_000_000_000, 70_000_000_000):
                for max_keys in (8, 4 << 20, 16 << 20):
                    room = keys_room(inside, samples, total, max_keys)
                    assert _C.keys_room(inside, samples, total, max_keys) == room, (inside, samples, total, max_keys)
                    rooms.add("none" if room == 0 else "full" if room == max_keys else "some")
    assert rooms == {"none", "full", "some"}
    for total in (0, 1, 1 << 20, 64 << 20, 100_000_000, 268_435_455, 1 << 28, 400_000_000, 1 << 30, 1 << 34):
        assert _C.sample_budget(total) == threshold.sample_budget(total), total
    assert [threshold.sample_budget(t) for t in (1 << 20, 1 << 28, 1 << 30, 1 << 34)] == \
        [16384, 1 << 20, 4 << 20, 4 << 20]
    # Where three times the expected keys fit, that is the room; the likely most decides only past it.
    assert keys_room(0.005, 1 << 20, 200_000_000, 4 << 20) == 3_000_000
    assert keys_room(0.0054, 1 << 20, 700_000_000, 4 << 20) == 4 << 20  # 3.8M expected, likely 3.94M
    assert keys_room(0.0054, 1 << 20, 800_000_000, 4 << 20) == 0  # likely 4.5M


def test_kth_largest_key_of_sorted_parts():
    """One descending tensor is read in place; a list of descending parts (some empty, of any
    lengths) gives the r-th largest of them all, as a sort of their concatenation does."""
    from finepurify_ext.threshold import kth_largest_key

    gen = torch.Generator().manual_seed(3)
    parts = [torch.sort(torch.randint(0, 1 << 20, (n,), generator=gen, dtype=torch.int32), descending=True).values
             for n in (0, 5, 1, 300, 0, 77)]
    everything = torch.sort(torch.cat(parts), descending=True).values
    for r in (1, 2, 50, 191, everything.numel()):
        assert kth_largest_key(parts, r) == int(everything[r - 1]) == kth_largest_key(everything, r)
        assert kth_largest_key([everything], r) == int(everything[r - 1])


@pytest.mark.parametrize("ranking_name", list(RANKINGS))
def test_search_ranges_finds_the_threshold_from_any_bracket(dtype, ranking_name):
    """A bracket holding the k-th largest score, one wholly below it and one above it: the passes
    search_ranges runs find the exact threshold of the histogram search, none keeping more than
    max_keys keys; with room for every key a holding bracket needs its one pass, with room for 16
    a second pass (keys in 2048 bins: the bin of the k-th holds few), and with none the bins
    alone narrow it to one key (at most three more passes)."""
    from finepurify_ext.threshold import key_of, search_ranges

    ranking = RANKINGS[ranking_name]
    ft, pre, h = ranked_weights(dtype, seed=57)
    total = sum(f.numel() for f in ft)
    scores = torch.sort(ref.all_scores(ft, pre, h, EPS, ranking), descending=True).values

    def key_at(rank):  # the key of the score at this position from the top, clamped
        return key_of(scores[min(max(rank, 0), total - 1)].item())

    for k in (1, total // 3, total // 2, total - 5, total):
        threshold = ops.score_threshold(ft, pre, h, k, EPS, ranking=ranking)
        holding, below, above = ((k - 1 + 400, k - 1 - 400), (k - 1 + 900, k - 1 + 300), (k - 1 - 300, k - 1 - 900))
        for (low_rank, high_rank), max_keys in itertools.product((holding, below, above), (total, 16, 0)):
            low, high = key_at(low_rank), key_at(high_rank)
            passes = []

            def candidates_of(lo, hi, capacity):
                assert capacity <= max_keys and lo <= hi
                passes.append((lo, hi))
                counts, keys = ops.score_candidates(ft, pre, h, EPS, lo, hi, capacity, ranking=ranking)
                between = int(counts[2])
                return counts, keys[:between] if between <= capacity else None

            first = candidates_of(low, high, max_keys)
            got = search_ranges((*first, low, high), candidates_of, k, total, max_keys)
            assert got == threshold, (k, low_rank, high_rank, max_keys, passes)
            if (low_rank, high_rank) == holding and k - 1 - 400 > 0 and k - 1 + 400 < total:
                assert len(passes) <= {total: 1, 16: 2, 0: 4}[max_keys], passes
            assert len(passes) <= 5, passes


def test_between_shift_is_the_narrowest_cover():
    """score_candidates' bins of the keys between: 2048 of 2^shift keys from low_key + 1, the
    narrowest width whose bins cover the range; the op's bins sum to the keys between."""
    from finepurify_ext.threshold import BETWEEN_BINS, CANDIDATE_COUNTS, between_shift

    for low, high in ((0, 0), (5, 6), (5, 7), (0, 2049), (0, 2050), (0, 4097), (100, 0x7F800000), (0, 0x7F800000)):
        shift = between_shift(low, high)
        highest = max(high - low - 2, 0)  # the offset of the highest key between
        assert highest >> shift < BETWEEN_BINS and (shift == 0 or highest >> (shift - 1) >= BETWEEN_BINS)
    ft, pre, h = make_weights(58, [(5000,), (333,)], torch.float32)
    counts, _ = ops.score_candidates(ft, pre, h, EPS, 0, 0x7F800000, 0)
    assert counts.numel() == CANDIDATE_COUNTS + BETWEEN_BINS
    assert int(counts[CANDIDATE_COUNTS:].sum()) == int(counts[2]) > 0


def test_narrower_range_refuses_bins_that_lost_keys():
    """The next range is read from the bins of the keys between, walked from the top. Bins that hold
    fewer keys than the pass counted between (an op's bug, e.g. a kernel's lost count) stop the
    search with an error instead of reading past the lowest bin."""
    from finepurify_ext.threshold import BETWEEN_BINS, CANDIDATE_COUNTS, INF_KEY, narrower_range

    low, high = 1000, 1000 + 2 + 4 * BETWEEN_BINS - 1  # bins of 4 keys
    counts = torch.zeros(CANDIDATE_COUNTS + BETWEEN_BINS, dtype=torch.int64)
    counts[:CANDIDATE_COUNTS] = torch.tensor([3, 1, 10, 0, 0, 0])  # above, at high, between, at low, ...
    counts[CANDIDATE_COUNTS + 7] = 6
    counts[CANDIDATE_COUNTS + 2] = 4
    # The 3 + 1 + 8-th largest: the 8th key between, in the bin of 4 keys at index 2 (6 keys above it).
    assert narrower_range(counts, low, high, 12, 100) == (low + 1 + 8 - 1, low + 1 + 8 + 4, 4)
    assert narrower_range(counts, low, high, 3, 100) == (high, INF_KEY, 3)  # among the keys above
    counts[CANDIDATE_COUNTS + 2] = 1  # 3 keys lost
    with pytest.raises(AssertionError, match="hold 7 keys, the pass counted 10"):
        narrower_range(counts, low, high, 12, 100)


@pytest.mark.parametrize("size", SIZES)
def test_candidates_over_sizes_and_capacity(dtype, size):
    """Every size around the vector width and the chunk: above, at either end, between and below
    all counted; one key fewer of capacity than between leaves no key; capacity 0 counts only."""
    from finepurify_ext.threshold import key_of

    ft, pre, h = make_weights(size + 7, [(size,), (3,)], dtype)
    scores = sorted_scores_desc(ft, pre, h)
    n = scores.numel()
    low, high = key_of(scores[(2 * n) // 3].item()), key_of(scores[n // 5].item())
    between = int(ref.score_candidates(ft, pre, h, EPS, low, high, n)[0][2])
    assert between > 0 or n < 10
    for capacity in sorted({n, between, max(between - 1, 0), 0}):
        counts, keys = ops.score_candidates(ft, pre, h, EPS, low, high, capacity)
        ref_counts, ref_keys = ref.score_candidates(ft, pre, h, EPS, low, high, capacity)
        assert torch.equal(counts, ref_counts) and torch.equal(keys, ref_keys)
        assert keys.numel() == capacity and (capacity >= between or bool((keys == -1).all()))
        assert int(counts[:4].sum()) == n - int((scores < scores[(2 * n) // 3]).sum())  # all but those below


def test_candidates_count_unrankable_scores():
    """NaN and Inf weights and negative hessians count as unrankable, never in range; the whole
    range [0, +Inf] then holds every other element."""
    ft, pre, h = make_weights(54, [(1000,), (77,)], torch.float32)
    ft[0][3] = float("nan")
    pre[0][10] = float("inf")
    h[1][5] = -1.0
    counts, keys = ops.score_candidates(ft, pre, h, EPS, 0, 0x7F800000, 2000)
    assert torch.equal(counts, ref.score_candidates(ft, pre, h, EPS, 0, 0x7F800000, 2000)[0])
    assert counts.tolist()[0] == 0 and int(counts[:4].sum()) == 1074 and counts.tolist()[4] == 3
    between = int(counts[2])
    assert bool((keys[:between] > 0).all()) and bool((keys[between:] == -1).all())


# -------------------------------------------------------------------------- score_sample


@pytest.mark.parametrize("ranking_name", list(RANKINGS))
def test_sample_matches_reference(dtype, ranking_name):
    """Odd and chunk-straddling sizes, an empty tensor, one-element hessians, a third unmoved: the
    keys of the sampled runs (and short tensors' heads) equal the reference's, tensor after tensor,
    for strides from every run (16) to longer than any tensor; the unmoved count is theirs."""
    ranking = RANKINGS[ranking_name]
    ft, pre, h = ranked_weights(dtype, seed=59)
    for stride in (16, 17, 64, 1000, 65536, 70_001, 1 << 20):
        keys, counts = ops.score_sample(ft, pre, h, EPS, stride, ranking=ranking)
        expected_keys, expected_counts = ref.score_sample(ft, pre, h, EPS, stride, ranking=ranking)
        assert keys.dtype == torch.int32 and keys.numel() == sum(ops.sample_size(f.numel(), stride) for f in ft)
        assert torch.equal(keys, expected_keys) and torch.equal(counts, expected_counts), stride
        assert int(counts[0]) == 0 and 0 < int(counts[1]) < keys.numel()


@pytest.mark.parametrize("size", SIZES)
def test_sample_over_sizes(dtype, size):
    """Every size around the vector width and the chunk, beside a tensor of 3; a sample of every
    element (stride 16) holds every run's keys; a stride longer than the tensor takes its head."""
    ft, pre, h = make_weights(size + 13, [(size,), (3,)], dtype)
    for stride in (16, 48, size + 1):
        stride = max(stride, 16)
        keys, counts = ops.score_sample(ft, pre, h, EPS, stride)
        expected_keys, expected_counts = ref.score_sample(ft, pre, h, EPS, stride)
        assert torch.equal(keys, expected_keys) and torch.equal(counts, expected_counts), stride
    keys, _ = ops.score_sample(ft, pre, h, EPS, 16)
    whole = ref.all_scores(ft[:1], pre[:1], h[:1], EPS).view(torch.int32)[:(size // 16) * 16]
    assert torch.equal(keys[:whole.numel()], whole)


def test_sample_counts_unrankable_scores_and_refuses_a_short_stride():
    ft, pre, h = make_weights(60, [(1000,), (77,)], torch.float32)
    ft[0][3] = float("nan")
    h[1][5] = -1.0
    keys, counts = ops.score_sample(ft, pre, h, EPS, 16)
    assert counts.tolist()[0] == 2 and int((keys < 0).sum()) == 2
    assert torch.equal(keys, ref.score_sample(ft, pre, h, EPS, 16)[0])
    for stride in (15, 0, -16):
        with pytest.raises(ValueError, match="score_sample: stride must be at least 16"):
            ops.score_sample(ft, pre, h, EPS, stride)
    empty = ops.score_sample([], [], [], EPS, 16)
    assert empty[0].numel() == 0 and empty[1].tolist() == [0, 0]


@pytest.mark.parametrize("case", ["low", "tied", "unmoved"])
def test_the_ops_search_from_a_misleading_sample(case):
    """From 1M weights the ops search from a sample (on the CPU): where the sample misleads, the
    passes over the ranges its counts name still give the exact threshold and reset, and the same
    as purify_'s search (threshold.search_ranges) on the same weights. (A wrong narrowing costs
    passes, not bits: the ops' pass count is not observable here; tests/test_pipeline.py counts
    purify_'s.)"""
    from finepurify_ext.purify import CANDIDATE_KEYS, Feed, PurifyConfig, Scoring, _candidate_pass
    from finepurify_ext.threshold import search_ranges

    ft, pre, h = misleading_sample(case)
    n = ft[0].numel()
    for k in (1, n // 3, n // 2, n - 1):
        expected = ref.score_threshold(ft, pre, h, k, EPS)
        assert ops.score_threshold(ft, pre, h, k, EPS) == expected, k
        scoring = Scoring(h, EPS, ops.PLAIN)
        first = _candidate_pass(Feed(ft, pre, scoring), scoring, PurifyConfig(reserve_ratio=1 - k / n), n)
        assert search_ranges(first, Feed(ft, pre, scoring).candidates, k, n, CANDIDATE_KEYS) == expected, k
    for reserve_ratio, count_moved_only in ((0.3, True), (0.5, False), (0.9, True)):
        got, want = clones(ft), clones(ft)
        counts = ops.reset_most_abnormal_(got, pre, h, reserve_ratio, EPS, count_moved_only=count_moved_only)
        expected = ref.reset_most_abnormal_(want, pre, h, reserve_ratio, EPS, count_moved_only=count_moved_only)
        assert torch.equal(counts, expected) and torch.equal(got[0], want[0]), (reserve_ratio, count_moved_only)


@pytest.mark.parametrize("ranking_name", list(RANKINGS))
def test_the_ops_searches_give_the_same_bits(dtype, ranking_name):
    """score_threshold and reset_most_abnormal_ asked for the search from a sample (here below the
    1M weights where "auto" takes it), for the histogram passes, or "auto": the same threshold and
    the same reset, moved-only counting included; an unknown search is refused by name."""
    ranking = RANKINGS[ranking_name]
    ft, pre, h = ranked_weights(dtype, seed=73)
    total = sum(f.numel() for f in ft)
    for k in (1, total // 3, total - 2):
        found = {s: ops.score_threshold(ft, pre, h, k, EPS, ranking=ranking, search=s)
                 for s in ("auto", "sample", "histograms")}
        assert len(set(found.values())) == 1 and found["auto"] == ref.score_threshold(ft, pre, h, k, EPS, ranking), k
    for count_moved_only in (False, True):
        results = []
        for search in ("sample", "histograms"):
            got = clones(ft)
            counts = ops.reset_most_abnormal_(got, pre, h, 0.3, EPS, ranking=ranking, count_moved_only=count_moved_only,
                                              search=search)
            results.append((counts, got))
        assert torch.equal(results[0][0], results[1][0])
        assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    for op in (lambda: ops.score_threshold(ft, pre, h, 1, EPS, search="radix"),
               lambda: ops.reset_most_abnormal_(clones(ft), pre, h, 0.5, EPS, search="radix")):
        with pytest.raises(ValueError, match="search must be 'auto', 'sample' or 'histograms', got 'radix'"):
            op()


def test_candidates_refuse_a_bad_range():
    ft, pre, h = make_weights(55, [(10,)], torch.float32)
    for low, high, capacity in ((5, 4, 1), (-1, 4, 1), (0, 0x7F800001, 1), (0, 4, -1), (0, 4, 2**31)):
        with pytest.raises(ValueError, match="score_candidates"):
            ops.score_candidates(ft, pre, h, EPS, low, high, capacity)


def test_random_pieces_draw_the_whole_tensor():
    """A tensor cut into pieces (as read out of core), each given its offset, ranks exactly as the
    whole tensor: same threshold, same reset."""
    ft, pre, h = make_weights(52, [(5000,), (333,)], torch.bfloat16)
    ranking = ops.Ranking(random_seed=4, random_keys=(ops.tensor_key("a"), ops.tensor_key("b")))
    cuts = [0, 1, 1234, 4096, 5000]
    pieces = [(f0, p0, o) for f0, p0, o in
              [(ft[0][a:b], pre[0][a:b], a) for a, b in zip(cuts, cuts[1:])]] + [(ft[1], pre[1], 0)]
    keys = (ranking.random_keys[0],) * (len(cuts) - 1) + (ranking.random_keys[1],)
    piece_ranking = ops.Ranking(random_seed=4, random_keys=keys, random_offsets=tuple(o for _, _, o in pieces))
    zeros = [torch.zeros(1)] * len(pieces)
    k = 1700
    whole = ops.score_threshold(ft, pre, [torch.zeros(1)] * 2, k, EPS, ranking=ranking)
    assert ops.score_threshold([f for f, _, _ in pieces], [p for _, p, _ in pieces], zeros, k, EPS,
                               ranking=piece_ranking) == whole
    got = clones(ft)
    views = [got[0][a:b] for a, b in zip(cuts, cuts[1:])] + [got[1]]
    ops.masked_reset_(views, [p for _, p, _ in pieces], zeros, whole, EPS, ranking=piece_ranking)
    expected = clones(ft)
    ops.masked_reset_(expected, pre, [torch.zeros(1)] * 2, whole, EPS, ranking=ranking)
    assert_bitwise(got, expected)
    # Another seed, another mask; the same seed and keys, the same mask in another list order.
    other = ops.score_threshold(ft, pre, [torch.zeros(1)] * 2, k, EPS, ranking=ops.Ranking(random_seed=5))
    assert other != whole
    swapped = ops.Ranking(random_seed=4, random_keys=ranking.random_keys[::-1])
    assert ops.score_threshold(ft[::-1], pre[::-1], [torch.zeros(1)] * 2, k, EPS, ranking=swapped) == whole


def test_ranking_subset_keeps_each_tensors_key_and_offset():
    r = ops.Ranking(random_seed=1, random_keys=(5, 6, 7), random_offsets=(0, 10, 20))
    assert r.subset([2, 0]) == ops.Ranking(random_seed=1, random_keys=(7, 5), random_offsets=(20, 0))
    assert ops.Ranking(random_seed=1, random_keys=(5, 6)).subset([1]) == ops.Ranking(random_seed=1, random_keys=(6,))
    assert ops.PLAIN.subset([3]) is ops.PLAIN


def test_ranking_argument_errors():
    ft, pre, h = make_weights(53, [(10,), (4, 4)], torch.float32)
    with pytest.raises(ValueError, match="hessian_floor must be a finite float32 number >= 0"):
        ops.score_threshold(ft, pre, h, 3, EPS, ranking=ops.Ranking(hessian_floor=-1.0))
    with pytest.raises(ValueError, match="got 1 random_keys for 2 tensors"):
        ops.score_threshold(ft, pre, h, 3, EPS, ranking=ops.Ranking(random_seed=0, random_keys=(1,)))
    with pytest.raises(ValueError, match="random_offsets must be >= 0"):
        ops.masked_reset_(ft, pre, h, 0.5, EPS, ranking=ops.Ranking(random_seed=0, random_offsets=(0, -2)))
    with pytest.raises(RuntimeError, match=r"hessians\[1\] has shape \[2\] .* or of one element"):
        ops.score_threshold(ft, pre, [h[0], torch.rand(2)], 3, EPS)
