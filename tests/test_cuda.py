"""The CUDA kernels: every op against the CPU op (bitwise) and the pure-PyTorch reference, on CUDA
tensors. Skipped, with the reason, where there is no GPU or the build holds no CUDA kernels."""
import math
import struct

import pytest
import torch

import finepurify_ext
from finepurify_ext import ops
from finepurify_ext import reference as ref

from conftest import (DTYPES, RANKINGS, SIZES, assert_bitwise, clones, make_weights, many_shapes, misleading_sample,
                      ranked_weights, sorted_scores_desc)

if not torch.cuda.is_available():
    pytest.skip("no CUDA device (torch.cuda.is_available() is False)", allow_module_level=True)
if not finepurify_ext.built_with_cuda():
    pytest.skip(
        "finepurify_ext was built without its CUDA kernels (see the choice setup.py prints; "
        "FINEPURIFY_CUDA=1 forces them)",
        allow_module_level=True,
    )

EPS = 1e-8
CUDA = torch.device("cuda")
OPS = torch.ops.finepurify
# Around the CUDA chunk (65536 elements) and the 8-element pack, and more tensors than one launch.
CUDA_SIZES = SIZES + [8, 9, 2 * 65536 + 5]


def to_cuda(tensors):
    return [t.to(CUDA) for t in tensors]


def to_cpu(tensors):
    return [t.cpu() for t in tensors]


# ----------------------------------------------------------------------- accumulate_sq_grads_


@pytest.mark.parametrize("size", CUDA_SIZES)
@pytest.mark.parametrize("zero_grads", [False, True])
def test_accumulate_sq_grads_matches_cpu(dtype, size, zero_grads):
    gen = torch.Generator().manual_seed(size)
    hessians = [torch.rand(size, generator=gen), torch.rand(3, 5, generator=gen)]
    grads = [torch.randn(size, generator=gen).to(dtype), torch.randn(3, 5, generator=gen).to(dtype)]
    h_gpu, g_gpu = to_cuda(hessians), to_cuda(grads)
    ops.accumulate_sq_grads_(h_gpu, g_gpu, scale=0.37, zero_grads=zero_grads)
    ops.accumulate_sq_grads_(hessians, grads, scale=0.37, zero_grads=zero_grads)
    assert_bitwise(h_gpu, hessians)
    assert_bitwise(g_gpu, grads)


def test_accumulate_sq_grads_many_tensors_mixed_dtypes():
    shapes = many_shapes(1, 333)
    gen = torch.Generator().manual_seed(2)
    hessians = [torch.rand(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(DTYPES[i % 3]) for i, s in enumerate(shapes)]
    h_gpu = to_cuda(hessians)
    ops.accumulate_sq_grads_(h_gpu, to_cuda(grads), scale=2.0)
    ref.accumulate_sq_grads_(hessians, grads, scale=2.0)
    assert_bitwise(h_gpu, hessians)


def test_accumulate_sq_grads_misaligned_and_strided(dtype):
    # Views at an odd element offset (not 16-byte aligned: the scalar path) and transposed views.
    gen = torch.Generator().manual_seed(3)
    h_base, g_base = torch.rand(70_001, generator=gen), torch.randn(70_001, generator=gen).to(dtype)
    h_t, g_t = torch.rand(33, 64, generator=gen), torch.randn(64, 33, generator=gen).to(dtype)
    h_gpu = [h_base.to(CUDA)[1:], h_t.to(CUDA).t()]
    g_gpu = [g_base.to(CUDA)[1:], g_t.to(CUDA)]
    h_cpu = [h_base[1:].clone(), h_t.t().clone()]
    ops.accumulate_sq_grads_(h_gpu, g_gpu, zero_grads=True)
    ref.accumulate_sq_grads_(h_cpu, [g_base[1:].clone(), g_t.clone()])
    assert_bitwise(h_gpu, h_cpu)
    assert all(int(g.count_nonzero()) == 0 for g in g_gpu)


# ------------------------------------------------------------------------------ drift_score


@pytest.mark.parametrize("size", CUDA_SIZES)
def test_drift_score_matches_cpu(dtype, size):
    (ft,), (pre,), (h,) = make_weights(size, [(size,)], dtype)
    out = ops.drift_score(ft.to(CUDA), pre.to(CUDA), h.to(CUDA), EPS)
    assert out.device.type == "cuda" and out.dtype == torch.float32
    assert_bitwise([out], [ops.drift_score(ft, pre, h, EPS)])
    assert_bitwise([out], [ref.drift_score(ft.to(CUDA), pre.to(CUDA), h.to(CUDA), EPS)])


def test_drift_score_misaligned():
    (ft,), (pre,), (h,) = make_weights(4, [(10_001,)], torch.bfloat16)
    out = ops.drift_score(ft.to(CUDA)[3:], pre.to(CUDA)[3:], h.to(CUDA)[3:], EPS)
    assert_bitwise([out], [ops.drift_score(ft[3:], pre[3:], h[3:], EPS)])


def test_drift_scores_match_cpu_over_many_tensors(dtype):
    """The list op on the GPU: more than one launch table (64 tensors), odd sizes (later outputs
    misaligned in the one output vector: the scalar path), one-element hessians, every ranking."""
    shapes = many_shapes(8, 150) + [(65_537,), (70_001,)]
    gen = torch.Generator().manual_seed(8)
    ft, pre, h = make_weights(8, shapes, dtype)
    for i in range(0, len(h), 7):
        h[i] = torch.rand(1, generator=gen)
    for ranking in RANKINGS.values():
        ranking = ops.Ranking(hessian_floor=ranking.hessian_floor, random_seed=ranking.random_seed)  # keys: positions
        got = ops.drift_scores(to_cuda(ft), to_cuda(pre), to_cuda(h), EPS, ranking=ranking)
        assert all(g.device.type == "cuda" for g in got)
        assert_bitwise(got, ops.drift_scores(ft, pre, h, EPS, ranking=ranking))


@pytest.mark.parametrize("offset", [0, 3])  # the 16-byte vector path, and the scalar path
def test_unmoved_weights_score_zero_beside_moved_ones(dtype, offset):
    """A weight that never moved scores +0: every such lane beside moved ones in a pack (the mix a
    bfloat16 fine-tune leaves), over hessians of 0, tiny, huge, +Inf and NaN (floored), at several
    floors; the scores, the histogram and the reset equal the CPU's bits."""
    gen = torch.Generator().manual_seed(63)
    n = 70_001
    pre = torch.randn(n, generator=gen)
    drift = torch.randn(n, generator=gen) * 1e-3
    drift[torch.rand(n, generator=gen) < 0.4] = 0.0  # 40 % never moved, spread through every pack
    drift[:64] = 0.0  # whole packs of them
    h = torch.rand(n, generator=gen) * 10.0 ** torch.randint(-12, 3, (n,), generator=gen)
    h[::97] = 0.0
    h[5::97] = float("inf")
    h[7::97] = float("nan")
    h[11::97] = 3e38
    ft = [(pre + drift).to(dtype)[offset:]]
    pres = [pre.to(dtype)[offset:]]
    hs = [h[offset:]]
    assert int((ft[0] == pres[0]).sum()) > n // 3
    for floor in (0.0, 1e-30, 1e-6):
        ranking = ops.Ranking(hessian_floor=floor)
        got = ops.drift_scores(to_cuda(ft), to_cuda(pres), to_cuda(hs), EPS, ranking=ranking)
        expected = ops.drift_scores(ft, pres, hs, EPS, ranking=ranking)
        assert_bitwise(got, expected)
        unmoved = ft[0] == pres[0]
        assert int((expected[0][unmoved] == 0).sum()) == int(unmoved.sum())
        assert not bool(torch.signbit(expected[0][unmoved]).any())
    # NaN and +Inf hessians are unrankable for the histogram and the reset: finite ones only there
    finite = [torch.nan_to_num(hs[0], nan=0.5, posinf=2.0)]
    for level, prefix in ((0, 0), (1, 0x1F0)):
        assert torch.equal(ops.score_histogram(to_cuda(ft), to_cuda(pres), to_cuda(finite), EPS, level, prefix).cpu(),
                           ops.score_histogram(ft, pres, finite, EPS, level, prefix))
    scores = sorted_scores_desc(ft, pres, finite)
    for threshold in (scores[scores.numel() // 4].item(), 0.0):  # at 0 the unmoved weights count as reset too
        work_g, work = clones(to_cuda(ft)), clones(ft)
        counted = [ops.masked_reset_(work_g, to_cuda(pres), to_cuda(finite), threshold, EPS),
                   ops.masked_reset_(work, pres, finite, threshold, EPS)]
        assert torch.equal(counted[0].cpu(), counted[1])
        assert_bitwise(work_g, work)


# -------------------------------------------------------------------------- score_threshold


@pytest.mark.parametrize("size", [1, 7, 1023, 65536, 65537, 2 * 65536 + 5])
def test_score_threshold_matches_cpu_and_sort(dtype, size):
    ft, pre, h = make_weights(10 + size, [(size,), (13, 17), (0,)], dtype)
    scores = sorted_scores_desc(ft, pre, h)
    total = scores.numel()
    gen = torch.Generator().manual_seed(size)
    ks = {1, total, max(1, total // 2), int(torch.randint(1, total + 1, (1,), generator=gen))}
    ft_g, pre_g, h_g = to_cuda(ft), to_cuda(pre), to_cuda(h)
    for k in ks:
        got = ops.score_threshold(ft_g, pre_g, h_g, k, EPS)
        assert got == scores[k - 1].item() == ops.score_threshold(ft, pre, h, k, EPS), k


def test_score_threshold_many_tensors_mixed_dtypes():
    shapes = many_shapes(7, 320)
    ft, pre, h = make_weights(8, shapes, [DTYPES[i % 3] for i in range(len(shapes))])
    scores = sorted_scores_desc(ft, pre, h)
    ft_g, pre_g, h_g = to_cuda(ft), to_cuda(pre), to_cuda(h)
    for k in (1, 17, scores.numel() // 3, scores.numel()):
        assert ops.score_threshold(ft_g, pre_g, h_g, k, EPS) == scores[k - 1].item()


def test_score_histogram_matches_cpu():
    ft, pre, h = make_weights(9, [(100_003,), (65536,), (31, 7)], torch.bfloat16)
    cpu = OPS.score_histogram(ft, pre, h, EPS, 0, 0)
    gpu = OPS.score_histogram(to_cuda(ft), to_cuda(pre), to_cuda(h), EPS, 0, 0)
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
    top = int(cpu[:-1].nonzero().max())
    for level, prefix in ((1, top), (2, (top << 10) | 3)):
        cpu = OPS.score_histogram(ft, pre, h, EPS, level, prefix)
        gpu = OPS.score_histogram(to_cuda(ft), to_cuda(pre), to_cuda(h), EPS, level, prefix)
        assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("offset", [0, 3])  # the 16-byte vector path, and the scalar path
def test_every_level_with_one_element_hessians_and_unrankable_inputs(dtype, offset):
    """The histogram at each level of a real search (the prefixes of the CPU threshold), with
    one-element hessians beside full ones, runs of weights that never moved, and a NaN and an Inf
    (the unrankable counter); then the masked reset at that threshold. GPU bits equal the CPU's."""
    ft, pre, h = ranked_weights(dtype, seed=62)
    view = lambda ts: [t.flatten()[offset:] if t.numel() > 1 else t for t in ts]  # noqa: E731
    total = sum(f.numel() for f in view(ft))
    threshold = ops.score_threshold(view(ft), view(pre), view(h), total // 4, EPS)
    key = struct.unpack("<I", struct.pack("<f", threshold))[0]
    ft_g, pre_g, h_g = to_cuda(ft), to_cuda(pre), to_cuda(h)
    damaged, damaged_g = clones(ft), clones(ft_g)
    for f in (damaged, damaged_g):
        f[0].view(-1)[offset + 5] = float("nan")
        f[-1].view(-1)[offset + 7] = float("inf")
    for level, prefix in ((0, 0), (1, key >> 20), (2, key >> 10)):
        gpu = ops.score_histogram(view(damaged_g), view(pre_g), view(h_g), EPS, level, prefix).cpu()
        cpu = ops.score_histogram(view(damaged), view(pre), view(h), EPS, level, prefix)
        assert torch.equal(gpu, cpu)
        bins = cpu.numel() - 2
        assert int(cpu[bins]) == 2 and int(cpu[:bins].sum()) > 0 and int(cpu[bins + 1]) > 0
    counted = [ops.masked_reset_(view(ft_g), view(pre_g), view(h_g), threshold, EPS),
               ops.masked_reset_(view(ft), view(pre), view(h), threshold, EPS)]
    assert torch.equal(counted[0].cpu(), counted[1]) and int(counted[1].sum()) >= total // 4
    assert_bitwise(ft_g, ft)


def test_score_threshold_ties_and_zero_drift():
    # Few distinct scores, long runs of identical ones (zero drift), shared across tensors.
    gen = torch.Generator().manual_seed(9)
    ft, pre, h = [], [], []
    for n in (1000, 777, 65536 + 3, 300_000):
        p = torch.randn(n, generator=gen)
        level = torch.randint(0, 4, (n,), generator=gen).float()
        level[: n // 2] = 0.0  # a run of weights that never moved
        ft.append(p + 0.5 * level.sqrt())
        pre.append(p)
        h.append(torch.full((n,), 0.25))
    scores = sorted_scores_desc(ft, pre, h)
    ft_g, pre_g, h_g = to_cuda(ft), to_cuda(pre), to_cuda(h)
    for k in range(1, scores.numel() + 1, 40_009):
        t = ops.score_threshold(ft_g, pre_g, h_g, k, EPS)
        assert t == scores[k - 1].item()
        work = clones(ft_g)
        counts = ops.masked_reset_(work, pre_g, h_g, t, EPS)
        assert int(counts.sum()) == int((scores >= t).sum()) >= k


def test_non_finite_input_is_named():
    ft, pre, h = make_weights(11, [(100,), (70_000,)], torch.float16)
    ft_g, pre_g, h_g = to_cuda(ft), to_cuda(pre), to_cuda(h)
    ft_g[1][12345] = float("nan")
    with pytest.raises(RuntimeError, match=r"finetuned\[1\] contains NaN or Inf"):
        ops.score_threshold(ft_g, pre_g, h_g, 10, EPS)


# ---------------------------------------------------------------------------- masked_reset_


@pytest.mark.parametrize("size", CUDA_SIZES)
def test_masked_reset_matches_cpu(dtype, size):
    ft, pre, h = make_weights(20 + size, [(size,), (5, 9)], dtype)
    scores = sorted_scores_desc(ft, pre, h)
    threshold = scores[scores.numel() // 3].item()
    ft_g, pre_g, h_g = to_cuda(ft), to_cuda(pre), to_cuda(h)
    pre_before = clones(pre_g)
    counts_g = ops.masked_reset_(ft_g, pre_g, h_g, threshold, EPS)
    counts = ops.masked_reset_(ft, pre, h, threshold, EPS)
    assert counts_g.device.type == "cuda"
    assert torch.equal(counts_g.cpu(), counts)
    assert_bitwise(ft_g, ft)
    assert_bitwise(pre_g, pre_before)


def test_masked_reset_misaligned_and_strided(dtype):
    ft, pre, h = make_weights(31, [(50, 70), (70_001,)], dtype)
    cpu_views = lambda ts: [ts[0].t(), ts[1][1:]]  # noqa: E731
    scores = sorted_scores_desc(cpu_views(ft), cpu_views(pre), cpu_views(h))
    threshold = scores[5000].item()
    ft_g = to_cuda(ft)
    views_g = cpu_views(ft_g)
    counts_g = ops.masked_reset_(views_g, cpu_views(to_cuda(pre)), cpu_views(to_cuda(h)), threshold, EPS)
    views = cpu_views(ft)
    counts = ops.masked_reset_(views, cpu_views(pre), cpu_views(h), threshold, EPS)
    assert torch.equal(counts_g.cpu(), counts)
    assert int(counts.sum()) == int((scores >= threshold).sum()) >= 5001
    assert_bitwise(ft_g, ft)  # written back into the caller's (strided) storage


@pytest.mark.parametrize("reserve_ratio", [0.0, 0.3, 0.9, 1.0])
def test_reset_most_abnormal_many_tensors(reserve_ratio):
    shapes = many_shapes(41, 305)
    ft, pre, h = make_weights(42, shapes, [DTYPES[i % 3] for i in range(len(shapes))])
    ft_g = to_cuda(ft)
    counts_g = ops.reset_most_abnormal_(ft_g, to_cuda(pre), to_cuda(h), reserve_ratio, EPS)
    counts = ops.reset_most_abnormal_(ft, pre, h, reserve_ratio, EPS)
    assert torch.equal(counts_g.cpu(), counts)
    assert_bitwise(ft_g, ft)


def test_ops_follow_the_current_stream():
    ft, pre, h = make_weights(50, [(300_001,), (77,)], torch.bfloat16)
    ft_g, pre_g, h_g = to_cuda(ft), to_cuda(pre), to_cuda(h)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        counts_g = ops.reset_most_abnormal_(ft_g, pre_g, h_g, 0.5, EPS)
    stream.synchronize()
    counts = ops.reset_most_abnormal_(ft, pre, h, 0.5, EPS)
    assert torch.equal(counts_g.cpu(), counts)
    assert_bitwise(ft_g, ft)


def test_cuda_graph_capture_and_replay():
    """The per-step ops (accumulation after backward, the reset at a known threshold) launch no host
    sync, so they can be captured in a CUDA graph and replayed (score_threshold reads its histogram
    on the host between passes and cannot be captured)."""
    gen = torch.Generator().manual_seed(53)
    grads = [torch.randn(s, generator=gen).to(CUDA) for s in [(4097,), (33, 5)]]
    hessians = [torch.zeros_like(g) for g in grads]
    ft, pre, h = make_weights(54, [(70_001,)], torch.bfloat16)
    ft_g, pre_g, h_g = to_cuda(ft), to_cuda(pre), to_cuda(h)
    threshold = ops.score_threshold(ft, pre, h, 1000, EPS)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs asks
        ops.accumulate_sq_grads_(hessians, grads, scale=0.5)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for t in hessians:
        t.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.accumulate_sq_grads_(hessians, grads, scale=0.5)
        counts_g = ops.masked_reset_(ft_g, pre_g, h_g, threshold, EPS)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    for hh, g in zip(hessians, grads):
        torch.testing.assert_close(hh, 3 * 0.5 * g * g, rtol=1e-6, atol=0)
    counts = ops.masked_reset_(ft, pre, h, threshold, EPS)
    assert int(counts.sum()) >= 1000
    assert int(counts_g.sum()) == 0  # the last replay finds every abnormal weight reset by the first
    assert_bitwise(ft_g, ft)


def test_mixed_devices_refused():
    ft, pre, h = make_weights(51, [(10,), (10,)], torch.float32)
    with pytest.raises(RuntimeError, match=r"pretrained\[1\] is on cpu but the first tensor is on cuda"):
        ops.masked_reset_(to_cuda(ft), [pre[0].to(CUDA), pre[1]], to_cuda(h), 0.5, EPS)


def test_in_place_outputs_listed_twice_refused_on_cuda():
    """The GPU reset writes whole 16-byte packs: a tensor listed twice would race with itself."""
    ft, pre, h = (to_cuda(t) for t in make_weights(53, [(1000,), (64,)], torch.bfloat16))
    with pytest.raises(ValueError, match=r"finetuned\[0\] and finetuned\[2\] share memory"):
        ops.masked_reset_([ft[0], ft[1], ft[0]], [pre[0], pre[1], pre[0]], [h[0], h[1], h[0]], 0.5, EPS)
    with pytest.raises(ValueError, match=r"hessians\[0\] and hessians\[1\] share memory"):
        ops.accumulate_sq_grads_([h[0], h[0]], [pre[0], pre[0]])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_device():
    dev = torch.device("cuda", 1)
    ft, pre, h = make_weights(52, [(100_000,)], torch.bfloat16)
    ft_g = [t.to(dev) for t in ft]
    counts_g = ops.reset_most_abnormal_(ft_g, [t.to(dev) for t in pre], [t.to(dev) for t in h], 0.5, EPS)
    counts = ops.reset_most_abnormal_(ft, pre, h, 0.5, EPS)
    assert counts_g.device == dev and torch.equal(counts_g.cpu(), counts)
    assert_bitwise(ft_g, ft)


# -------------------------------------------------------------------------- score_candidates


def _candidate_ranges(ft, pre, h, ranking):
    """Key ranges around several ranks: a point (both ends on one score), narrow, wide, all."""
    from finepurify_ext.threshold import key_of

    scores = torch.sort(ref.all_scores(to_cpu(ft), to_cpu(pre), to_cpu(h), EPS, ranking), descending=True).values
    n = scores.numel()
    for k in (1, n // 3, n // 2, n):
        for width in (0, 5, 3000, n):
            yield k, key_of(scores[max(0, k - 1 - width)].item()), key_of(scores[min(n - 1, k - 1 + width)].item())


@pytest.mark.parametrize("offset", [0, 3])  # the 16-byte vector path, and the scalar path
@pytest.mark.parametrize("ranking_name", list(RANKINGS))
def test_score_candidates_match_cpu(dtype, ranking_name, offset):
    """Odd and chunk-straddling sizes, an empty tensor, per-tensor hessians, a third unmoved: the
    counts and the sorted keys equal the CPU's, with room for all keys, for one too few and for
    none (the keys the warps appended past the capacity are dropped; the warps count the rest)."""
    ranking = RANKINGS[ranking_name]
    view = lambda ts: [t.flatten()[offset:] if t.numel() > 1 else t for t in ts]  # noqa: E731
    ft, pre, h = (view(ts) for ts in ranked_weights(dtype, seed=57))
    ft_g, pre_g, h_g = to_cuda(ft), to_cuda(pre), to_cuda(h)
    for _, high, low in _candidate_ranges(ft, pre, h, ranking):
        expected = ops.score_candidates(ft, pre, h, EPS, low, high, 8192, ranking=ranking)
        between = int(expected[0][2])
        for capacity in sorted({8192, between, max(between - 1, 0), 0}):
            counts, keys = ops.score_candidates(ft_g, pre_g, h_g, EPS, low, high, capacity, ranking=ranking)
            cpu_counts, cpu_keys = ops.score_candidates(ft, pre, h, EPS, low, high, capacity, ranking=ranking)
            assert counts.device.type == "cuda" and keys.device.type == "cuda"
            assert torch.equal(counts.cpu(), cpu_counts) and torch.equal(keys.cpu(), cpu_keys), (low, high, capacity)


@pytest.mark.parametrize("size", CUDA_SIZES)
def test_score_candidates_over_sizes(size):
    """Every size around the pack and the chunk, bfloat16 and float32 in one list (two launches
    adding to the same counts and slots), against the CPU."""
    ft, pre, h = make_weights(size + 11, [(size,), (size + 3,)], [torch.bfloat16, torch.float32])
    scores = sorted_scores_desc(ft, pre, h)
    n = scores.numel()
    from finepurify_ext.threshold import key_of

    low, high = key_of(scores[(3 * n) // 4].item()), key_of(scores[n // 4].item())
    got = ops.score_candidates(to_cuda(ft), to_cuda(pre), to_cuda(h), EPS, low, high, n)
    expected = ops.score_candidates(ft, pre, h, EPS, low, high, n)
    assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])


@pytest.mark.parametrize("ranking_name", list(RANKINGS))
def test_score_sample_matches_cpu(dtype, ranking_name):
    """The sampled runs' keys and counts on the GPU are the CPU's, for strides from every run to
    longer than any tensor (a chunk holding several runs, runs crossing into the next chunk, heads)."""
    ranking = RANKINGS[ranking_name]
    ft, pre, h = ranked_weights(dtype, seed=59)
    ft_g, pre_g, h_g = to_cuda(ft), to_cuda(pre), to_cuda(h)
    for stride in (16, 17, 1000, 65_530, 70_001, 1 << 20):
        keys, counts = ops.score_sample(ft_g, pre_g, h_g, EPS, stride, ranking=ranking)
        cpu_keys, cpu_counts = ops.score_sample(ft, pre, h, EPS, stride, ranking=ranking)
        assert keys.device.type == "cuda" and counts.device.type == "cuda"
        assert torch.equal(keys.cpu(), cpu_keys) and torch.equal(counts.cpu(), cpu_counts), stride


def test_score_sample_and_candidates_over_many_tensors():
    """More tensors than one launch table holds (64): the sample's per-tensor output offsets and the
    candidates' counts and slots carry across tables."""
    from finepurify_ext.threshold import key_of

    ft, pre, h = make_weights(64, many_shapes(9, 150), torch.bfloat16)
    ft_g, pre_g, h_g = to_cuda(ft), to_cuda(pre), to_cuda(h)
    for stride in (16, 17):
        keys, counts = ops.score_sample(ft_g, pre_g, h_g, EPS, stride)
        cpu_keys, cpu_counts = ops.score_sample(ft, pre, h, EPS, stride)
        assert torch.equal(keys.cpu(), cpu_keys) and torch.equal(counts.cpu(), cpu_counts), stride
    scores = sorted_scores_desc(ft, pre, h)
    n = scores.numel()
    low, high = key_of(scores[(3 * n) // 4].item()), key_of(scores[n // 4].item())
    got = ops.score_candidates(ft_g, pre_g, h_g, EPS, low, high, n)
    expected = ops.score_candidates(ft, pre, h, EPS, low, high, n)
    assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])


def test_sample_and_candidates_count_unrankable_inputs_as_the_cpu(dtype):
    """A NaN weight (at stride 17, one in a run that crosses a chunk's end), an Inf pre-trained value and a
    negative Hessian beside rankable ones: the sample's keys and counts, and the candidates' counts
    and keys over the whole range, on the GPU are the CPU's; the four are counted unrankable."""
    from finepurify_ext.threshold import INF_KEY

    ft, pre, h = make_weights(63, [(1000,), (77,), (70_001,)], dtype)
    ft[0][3] = float("nan")
    pre[0][10] = float("inf")
    h[1][5] = -1.0
    ft[2][65_540] = float("nan")
    ft_g, pre_g, h_g = to_cuda(ft), to_cuda(pre), to_cuda(h)
    for stride in (16, 17, 1000):  # 17: the run from 65_535 crosses the chunk's end at 65_536
        keys, counts = ops.score_sample(ft_g, pre_g, h_g, EPS, stride)
        cpu_keys, cpu_counts = ops.score_sample(ft, pre, h, EPS, stride)
        assert torch.equal(keys.cpu(), cpu_keys) and torch.equal(counts.cpu(), cpu_counts), stride
    assert int(cpu_counts[0]) >= 1 and int(ops.score_sample(ft, pre, h, EPS, 16)[1][0]) == 4
    total = sum(f.numel() for f in ft)
    counts, keys = ops.score_candidates(ft_g, pre_g, h_g, EPS, 0, INF_KEY, total)
    cpu_counts, cpu_keys = ops.score_candidates(ft, pre, h, EPS, 0, INF_KEY, total)
    assert torch.equal(counts.cpu(), cpu_counts) and torch.equal(keys.cpu(), cpu_keys)
    assert int(cpu_counts[4]) == 4


@pytest.mark.parametrize("case", ["low", "tied", "unmoved"])
def test_the_ops_search_from_a_misleading_sample_on_cuda(case):
    """Where the sample misleads (its bracket misses, holds far more keys than foreseen, or sees
    nothing moved), the ops' search on the GPU narrows over the ranges the counts name (the C++
    search_ranges, reading score_candidates' GPU bins) and purify_'s (threshold.search_ranges over
    a CUDA Feed) do too: the CPU's threshold and reset."""
    from finepurify_ext.purify import CANDIDATE_KEYS, Feed, PurifyConfig, Scoring, _candidate_pass
    from finepurify_ext.threshold import search_ranges

    ft, pre, h = misleading_sample(case)
    ft_g, pre_g, h_g = to_cuda(ft), to_cuda(pre), to_cuda(h)
    n = ft[0].numel()
    for k in (1, n // 3, n // 2, n - 1):
        expected = ops.score_threshold(ft, pre, h, k, EPS)
        assert ops.score_threshold(ft_g, pre_g, h_g, k, EPS, search="sample") == expected, k
        scoring = Scoring(h_g, EPS, ops.PLAIN)
        first = _candidate_pass(Feed(ft_g, pre_g, scoring), scoring, PurifyConfig(reserve_ratio=1 - k / n), n)
        assert search_ranges(first, Feed(ft_g, pre_g, scoring).candidates, k, n, CANDIDATE_KEYS) == expected, k
    for reserve_ratio, count_moved_only in ((0.3, True), (0.5, False)):
        got, want = to_cuda(ft), clones(ft)
        counts = ops.reset_most_abnormal_(got, pre_g, h_g, reserve_ratio, EPS, count_moved_only=count_moved_only,
                                          search="sample")
        expected = ops.reset_most_abnormal_(want, pre, h, reserve_ratio, EPS, count_moved_only=count_moved_only)
        assert torch.equal(counts.cpu(), expected) and torch.equal(got[0].cpu(), want[0]), reserve_ratio


@pytest.mark.parametrize("ranking_name", list(RANKINGS))
def test_the_ops_search_from_a_sample_on_cuda(dtype, ranking_name):
    """score_threshold and reset_most_abnormal_ with search="sample" on the GPU (score_sample and
    score_candidates there, sorted keys read back): the CPU's threshold and reset, moved-only
    counting included. "auto" keeps the histogram passes on CUDA until this has passed."""
    ranking = RANKINGS[ranking_name]
    ft, pre, h = ranked_weights(dtype, seed=73)
    total = sum(f.numel() for f in ft)
    for k in (1, total // 3, total - 2):
        assert ops.score_threshold(to_cuda(ft), to_cuda(pre), to_cuda(h), k, EPS, ranking=ranking, search="sample") \
            == ops.score_threshold(ft, pre, h, k, EPS, ranking=ranking), k
    for count_moved_only in (False, True):
        got, want = to_cuda(ft), clones(ft)
        counts = ops.reset_most_abnormal_(got, to_cuda(pre), to_cuda(h), 0.3, EPS, ranking=ranking,
                                          count_moved_only=count_moved_only, search="sample")
        expected = ops.reset_most_abnormal_(want, pre, h, 0.3, EPS, ranking=ranking, count_moved_only=count_moved_only)
        assert torch.equal(counts.cpu(), expected)
        assert_bitwise([t.cpu() for t in got], want)


def test_opcheck_on_cuda():
    for dtype in DTYPES:
        ft, pre, h = (to_cuda(ts) for ts in make_weights(70, [(37,), (5, 11), (1,)], dtype))
        total = sum(t.numel() for t in ft)
        threshold = ref.score_threshold(ft, pre, h, total // 2, EPS)
        torch.library.opcheck(OPS.drift_score.default, (ft[0], pre[0], h[0], EPS))
        torch.library.opcheck(OPS.drift_scores.default, (ft, pre, h, EPS))
        torch.library.opcheck(OPS.score_histogram.default, (ft, pre, h, EPS, 0, 0))
        torch.library.opcheck(OPS.score_threshold.default, (ft, pre, h, total // 2, EPS))
        key = int(torch.tensor(threshold, dtype=torch.float32).view(torch.int32))
        torch.library.opcheck(OPS.score_candidates.default, (ft, pre, h, EPS, key // 2, key, total))
        torch.library.opcheck(OPS.score_sample.default, (ft, pre, h, EPS, 16))
        torch.library.opcheck(OPS.masked_reset_.default, (clones(ft), pre, h, threshold, EPS))
        torch.library.opcheck(OPS.reset_most_abnormal_.default, (clones(ft), pre, h, 0.4, EPS))
        grads = [torch.randn_like(t, dtype=torch.float32).to(dtype) for t in h]
        torch.library.opcheck(OPS.accumulate_sq_grads_.default, (clones(h), grads, 0.5, True))


# ------------------------------------------------------- more than 2^31 elements in the list


LARGE = 2**31 + 11  # one tensor alone beyond 32-bit indexing
SLICE = 2**27


def _free_gpu_bytes():
    free, _ = torch.cuda.mem_get_info()
    return free


@pytest.mark.skipif(
    _free_gpu_bytes() < 48 * 2**30,
    reason="needs 48 GB of free GPU memory for tensors beyond 2^31 elements",
)
def test_beyond_2_pow_31_elements():
    gen = torch.Generator(device=CUDA).manual_seed(60)
    big_ft = torch.empty(LARGE, dtype=torch.bfloat16, device=CUDA)
    big_pre = torch.empty_like(big_ft)
    big_h = torch.empty(LARGE, dtype=torch.float32, device=CUDA)
    for s in range(0, LARGE, SLICE):
        e = min(s + SLICE, LARGE)
        p = torch.randn(e - s, generator=gen, device=CUDA)
        big_pre[s:e] = p
        big_ft[s:e] = p + torch.randn(e - s, generator=gen, device=CUDA) * 0.01
        big_h[s:e] = torch.rand(e - s, generator=gen, device=CUDA) * 10.0 ** torch.randint(
            -6, 2, (e - s,), generator=gen, device=CUDA
        )
    small = make_weights(61, [(1000,), (33, 3)], torch.float32)
    ft = [big_ft] + to_cuda(small[0])
    pre = [big_pre] + to_cuda(small[1])
    h = [big_h] + to_cuda(small[2])
    total = sum(t.numel() for t in ft)
    assert total > 2**31

    def score_slices(i):
        for s in range(0, ft[i].numel(), SLICE):
            e = min(s + SLICE, ft[i].numel())
            yield s, e, ref.drift_score(ft[i][s:e], pre[i][s:e], h[i][s:e], EPS)

    # The exact k-th largest t: fewer than k scores above it, at least k at or above it.
    k = total // 3
    t = ops.score_threshold(ft, pre, h, k, EPS)
    # The search from a sample over the same 64-bit range (score_sample, score_candidates): the same bits.
    assert ops.score_threshold(ft, pre, h, k, EPS, search="sample") == t
    above = sum(int((sc > t).sum()) for i in range(len(ft)) for _, _, sc in score_slices(i))
    at_or_above = [sum(int((sc >= t).sum()) for _, _, sc in score_slices(i)) for i in range(len(ft))]
    assert above < k <= sum(at_or_above)

    # The reset takes exactly those, bit for bit.
    original = big_ft.clone()
    counts = ops.masked_reset_(ft, pre, h, t, EPS)
    assert counts.cpu().tolist() == at_or_above
    for s in range(0, LARGE, SLICE):
        e = min(s + SLICE, LARGE)
        sc = ref.drift_score(original[s:e], big_pre[s:e], big_h[s:e], EPS)
        expected = torch.where(sc >= t, big_pre[s:e], original[s:e])
        assert torch.equal(big_ft[s:e].view(torch.int16), expected.view(torch.int16)), s
    del original

    # accumulate_sq_grads_ over the same 64-bit range.
    hessian = torch.zeros(LARGE, dtype=torch.float32, device=CUDA)
    ops.accumulate_sq_grads_([hessian], [big_ft])
    for s in range(0, LARGE, SLICE):
        e = min(s + SLICE, LARGE)
        g = big_ft[s:e].float()
        assert torch.equal(hessian[s:e], g * g), s


# ------------------------------------------------------------------------------ the pipeline


@pytest.mark.parametrize("ranking", ["fine_purifying", "no_hessian", "magnitude", "fine_mixing"])
def test_purify_cuda_model_with_pretrained_state_on_cpu(tmp_path, ranking):
    """purify_ on a CUDA model whose pre-trained state stays on the CPU (as pretrained_state_for
    returns it) gives the CPU result bit for bit, the separate embedding budget included."""
    from tiny_models import make_tokenizer, tiny_model
    from finepurify_ext.purify import PurifyConfig, purify_

    model_cpu = tiny_model(make_tokenizer(tmp_path), seed=3)
    gen = torch.Generator().manual_seed(4)
    pre = {n: p.detach() - 0.01 * torch.randn(p.shape, generator=gen) for n, p in model_cpu.named_parameters()}
    hs = {n: torch.rand(p.shape, generator=gen) for n, p in model_cpu.named_parameters()}
    embedding = "bert.embeddings.word_embeddings.weight"
    hs[embedding][-3:] = 0  # rows of tokens the clean data never reaches
    model_gpu = tiny_model(make_tokenizer(tmp_path), seed=3).to(CUDA)
    config = PurifyConfig(ranking=ranking, hessian_floor_quantile=None)
    expected = purify_(model_cpu, pre, hs, config)
    got = purify_(model_gpu, pre, {n: h.to(CUDA) for n, h in hs.items()}, config)
    assert got.embedding_rows_reset == expected.embedding_rows_reset == 3
    assert got.reset_per_parameter == expected.reset_per_parameter
    assert_bitwise([p.detach() for p in model_gpu.parameters()], [p.detach() for p in model_cpu.parameters()])


@pytest.mark.parametrize("ranking", ["fine_purifying", "no_hessian", "magnitude", "fine_mixing"])
@pytest.mark.parametrize("max_keys", [4 << 20, 8])
@pytest.mark.parametrize("pre_on", ["cuda", "cpu"])
def test_candidates_search_on_cuda_equals_the_cpu(tmp_path, monkeypatch, ranking, max_keys, pre_on):
    """purify_'s threshold from a sample's bracket on the GPU (the sample sorted there, the
    score_candidates kernel, with room for 8 keys further passes narrowing the range; the
    pre-trained state on the GPU or streamed from the CPU in groups): the CPU's result from the
    histogram passes, bit for bit. threshold.CANDIDATES_ON leaves CUDA out until this has passed on a GPU."""
    from tiny_models import make_tokenizer, tiny_model
    from finepurify_ext import purify as purify_module
    from finepurify_ext.purify import PurifyConfig, purify_

    model_cpu = tiny_model(make_tokenizer(tmp_path), seed=5)
    gen = torch.Generator().manual_seed(6)
    pre = {n: p.detach() - 0.01 * torch.randn(p.shape, generator=gen) for n, p in model_cpu.named_parameters()}
    hs = {n: torch.rand(p.shape, generator=gen) for n, p in model_cpu.named_parameters()}
    model_gpu = tiny_model(make_tokenizer(tmp_path), seed=5).to(CUDA)
    config = PurifyConfig(ranking=ranking)
    expected = purify_(model_cpu, pre, hs, config)  # a tiny model: the histogram passes
    monkeypatch.setattr(purify_module, "CANDIDATES_ON", ("cpu", "cuda"))
    monkeypatch.setattr(purify_module, "CANDIDATES_MIN_WEIGHTS", 0)
    monkeypatch.setattr(purify_module, "CANDIDATE_KEYS", max_keys)
    passes = []
    candidates = purify_module.Feed.candidates
    monkeypatch.setattr(purify_module.Feed, "candidates", lambda *a: passes.append(a[1:]) or candidates(*a))
    got = purify_(model_gpu, pre if pre_on == "cpu" else {n: p.to(CUDA) for n, p in pre.items()},
                  {n: h.to(CUDA) for n, h in hs.items()}, config)
    assert passes and (len(passes) > 1) == (max_keys == 8), passes
    assert got.threshold == expected.threshold and got.reset_per_parameter == expected.reset_per_parameter
    assert_bitwise([p.detach() for p in model_gpu.parameters()], [p.detach() for p in model_cpu.parameters()])


@pytest.mark.parametrize("staging_bytes", [64 << 20, 1024])  # whole groups; tensors crossing in slices
@pytest.mark.parametrize("side_stream", [False, True])
def test_staged_groups_reach_the_gpu_intact_while_the_stream_is_busy(monkeypatch, staging_bytes, side_stream):
    """Groups packed by the host into the two pinned buffers and sent without waiting: with the
    stream held up by a long kernel, the third buffer's worth must wait for the first one's copy
    before it reuses its buffer; every tensor arrives intact (a buffer repacked too early would
    show), on the default stream or another current one."""
    from finepurify_ext import purify as purify_module
    from finepurify_ext.purify import _staged, _Staging

    monkeypatch.setattr(purify_module, "STAGING_BYTES", staging_bytes)
    gen = torch.Generator().manual_seed(13)
    groups = [[(torch.rand(1000 + 17 * g, generator=gen), torch.bfloat16),
               (torch.rand(3, 100 + g, generator=gen), torch.float32)] for g in range(6)]
    staging = _Staging(max(_Staging.packed_bytes(g, CUDA) for g in groups), CUDA)
    stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # about 0.1 s of device time ahead of every copy
        got = [_staged(g, CUDA, staging) for g in groups]
    torch.cuda.synchronize()
    assert len(staging.buffers) == 2
    for group, moved in zip(groups, got):
        for (src, dtype), t in zip(group, moved):
            assert t.device.type == "cuda" and torch.equal(t.cpu(), src.to(dtype))


@pytest.mark.parametrize("hessians_on", ["cpu", "cuda"])
def test_purify_streams_many_groups_from_the_cpu_to_the_gpu(tmp_path, monkeypatch, hessians_on):
    """A float32 pre-trained state (and Hessians) on the CPU beside a bfloat16 model on the GPU,
    streamed in many small groups through the pinned buffers: the CPU's result bit for bit."""
    from tiny_models import make_tokenizer, tiny_model
    from finepurify_ext import purify as purify_module
    from finepurify_ext.purify import PurifyConfig, purify_

    model_cpu = tiny_model(make_tokenizer(tmp_path), seed=7).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(8)
    pre = {n: p.detach().float() - 0.01 * torch.randn(p.shape, generator=gen) for n, p in model_cpu.named_parameters()}
    hs = {n: torch.rand(p.shape, generator=gen) for n, p in model_cpu.named_parameters()}
    model_gpu = tiny_model(make_tokenizer(tmp_path), seed=7).to(torch.bfloat16).to(CUDA)
    monkeypatch.setattr(purify_module, "GROUP_BYTES", 4096)
    expected = purify_(model_cpu, pre, hs, PurifyConfig(reserve_ratio=0.4))
    got = purify_(model_gpu, pre, {n: h.to(hessians_on) for n, h in hs.items()}, PurifyConfig(reserve_ratio=0.4))
    assert got.reset_per_parameter == expected.reset_per_parameter and got.threshold == expected.threshold
    assert_bitwise([p.detach() for p in model_gpu.parameters()], [p.detach() for p in model_cpu.parameters()])


def test_purify_cuda_with_seen_tokens_and_plot_sample_equals_cpu(tmp_path):
    """The embedding rule from the clean inputs' token ids (a CUDA tensor) and the plot's sample, whose indices reach
    the GPU by copies that do not wait for the passes: the CPU's resets and sample."""
    from tiny_models import make_tokenizer, tiny_model
    from finepurify_ext.purify import PurifyConfig, purify_

    model_cpu = tiny_model(make_tokenizer(tmp_path), seed=5)
    gen = torch.Generator().manual_seed(6)
    pre = {n: p.detach() - 0.01 * torch.randn(p.shape, generator=gen) for n, p in model_cpu.named_parameters()}
    hs = {n: torch.rand(p.shape, generator=gen) for n, p in model_cpu.named_parameters()}
    model_gpu = tiny_model(make_tokenizer(tmp_path), seed=5).to(CUDA)
    seen = list(range(0, 40, 3))
    expected = purify_(model_cpu, pre, hs, PurifyConfig(), plot_samples=3000, seen_tokens=seen)
    # the ids as a caller holding GPU batches has them (input_ids.unique()): they indexed a CPU mask
    got = purify_(model_gpu, {n: t.to(CUDA) for n, t in pre.items()}, {n: h.to(CUDA) for n, h in hs.items()},
                  PurifyConfig(), plot_samples=3000, seen_tokens=torch.tensor(seen, device=CUDA))
    assert got.embedding_rule == expected.embedding_rule == "seen_tokens"
    assert got.embedding_rows_reset == expected.embedding_rows_reset > 0
    assert got.reset_per_parameter == expected.reset_per_parameter
    assert got.sample == expected.sample and len(got.sample["reset"]) > 1000
    assert_bitwise([p.detach() for p in model_gpu.parameters()], [p.detach() for p in model_cpu.parameters()])


def test_purify_cuda_resets_added_tokens_rows_to_the_mean_as_cpu(tmp_path):
    """A vocabulary resized after tokens were added, the pre-trained state on the CPU: the added rows
    the clean data never reaches (zero Hessian rows) are reset to the pre-trained rows' mean summed in
    float64 on the GPU: the CPU's weights and report."""
    from tiny_models import make_tokenizer, tiny_model
    from finepurify_ext.purify import PurifyConfig, purify_

    def resized(device):
        model = tiny_model(make_tokenizer(tmp_path), seed=8)
        vocab = model.config.vocab_size
        model.resize_token_embeddings(vocab + 3, mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight[vocab:] = torch.randn(3, model.config.hidden_size,
                                                                      generator=torch.Generator().manual_seed(9))
        return model.to(device), vocab

    model_cpu, vocab = resized("cpu")
    model_gpu, _ = resized(CUDA)
    gen = torch.Generator().manual_seed(10)
    pre = {n: (p.detach() - 0.01 * torch.randn(p.shape, generator=gen))[:vocab if p.shape[0] == vocab + 3 else None]
           for n, p in model_cpu.named_parameters()}
    hs = {n: torch.rand(p.shape, generator=gen) for n, p in model_cpu.named_parameters()}
    embedding = next(n for n, p in model_cpu.named_parameters() if p is model_cpu.get_input_embeddings().weight)
    hs[embedding][vocab + 1:] = 0  # two added tokens the clean data never reaches
    expected = purify_(model_cpu, pre, hs, PurifyConfig())
    got = purify_(model_gpu, pre, {n: h.to(CUDA) for n, h in hs.items()}, PurifyConfig())
    assert got.unseen_added_rows == expected.unseen_added_rows == [vocab + 1, vocab + 2]
    assert got.added_rows_reset == expected.added_rows_reset == 2
    assert got.reset_per_parameter == expected.reset_per_parameter
    mean = (pre[embedding].double().sum(dim=0) / vocab).float()
    assert torch.equal(model_cpu.get_input_embeddings().weight[vocab + 2].detach(), mean)
    assert_bitwise([p.detach() for p in model_gpu.parameters()], [p.detach() for p in model_cpu.parameters()])


@pytest.mark.parametrize("name", RANKINGS)
def test_rankings_match_cpu(dtype, name):
    """Every ranking of the one scoring spec, bit for bit the CPU op's: per-tensor hessians, the
    floor, the random generator (keys, offsets), moved-only counting."""
    ranking = RANKINGS[name]
    ft, pre, h = ranked_weights(dtype, seed=60)
    ft_gpu, pre_gpu, h_gpu = to_cuda(ft), to_cuda(pre), to_cuda(h)
    for f, p, hh, fg, pg, hg in zip(ft, pre, h, ft_gpu, pre_gpu, h_gpu):
        args = (EPS, ranking.hessian_floor, ranking.random_seed, 17)
        assert_bitwise([OPS.drift_score.default(fg, pg, hg, *args)], [OPS.drift_score.default(f, p, hh, *args)])
    for level, prefix in ((0, 0), (1, 1), (2, 2)):
        assert torch.equal(ops.score_histogram(ft_gpu, pre_gpu, h_gpu, EPS, level, prefix, ranking).cpu(),
                           ops.score_histogram(ft, pre, h, EPS, level, prefix, ranking))
    total = sum(f.numel() for f in ft)
    assert ops.score_threshold(ft_gpu, pre_gpu, h_gpu, total // 3, EPS, ranking=ranking) == \
        ops.score_threshold(ft, pre, h, total // 3, EPS, ranking=ranking)
    for moved_only in (False, True):
        got, expected = clones(ft_gpu), clones(ft)
        counts = ops.reset_most_abnormal_(got, pre_gpu, h_gpu, 0.3, EPS, ranking=ranking, count_moved_only=moved_only)
        assert torch.equal(counts.cpu(), ops.reset_most_abnormal_(expected, pre, h, 0.3, EPS, ranking=ranking,
                                                                  count_moved_only=moved_only))
        assert_bitwise(got, expected)


def test_random_ranking_offsets_on_cuda():
    ft, pre, _ = make_weights(61, [(200_001,)], torch.float16)
    ranking = ops.Ranking(random_seed=9, random_keys=(123,), random_offsets=(2**33 + 5,))
    zeros = [torch.zeros(1)]
    assert_bitwise([OPS.drift_score.default(ft[0].to(CUDA), pre[0].to(CUDA), zeros[0].to(CUDA), EPS, 0.0, 9, 123)],
                   [OPS.drift_score.default(ft[0], pre[0], zeros[0], EPS, 0.0, 9, 123)])
    assert ops.score_threshold(to_cuda(ft), to_cuda(pre), to_cuda(zeros), 777, EPS, ranking=ranking) == \
        ops.score_threshold(ft, pre, zeros, 777, EPS, ranking=ranking)


@pytest.mark.parametrize("rows", [-4, 3])
def test_purify_cuda_on_a_cut_or_grown_vocabulary_equals_cpu(tmp_path, rows):
    """A vocabulary cut to its tokenizer (ranked against the pre-trained first rows) or grown by
    tokens the clean inputs never hold (found by the seen-token rule, reset to the pre-trained mean),
    the pre-trained state on the CPU: the CPU's weights and report."""
    from tiny_models import make_tokenizer, tiny_model
    from finepurify_ext.purify import PurifyConfig, purify_

    tokenizer = make_tokenizer(tmp_path)
    base = tiny_model(tokenizer, seed=11)
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(12)
    pre = {n: p.detach() - 0.01 * torch.randn(p.shape, generator=gen) for n, p in base.named_parameters()}

    def resized(device):
        model = tiny_model(tokenizer, seed=11)
        model.resize_token_embeddings(vocab + rows, mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight[vocab:] = torch.randn(max(rows, 0), model.config.hidden_size,
                                                                      generator=torch.Generator().manual_seed(13))
        return model.to(device)

    model_cpu, model_gpu = resized("cpu"), resized(CUDA)
    hs = {n: torch.rand(p.shape, generator=gen) for n, p in model_cpu.named_parameters()}
    seen = list(range(0, vocab, 2))
    expected = purify_(model_cpu, pre, hs, PurifyConfig(), seen_tokens=seen)
    got = purify_(model_gpu, pre, {n: h.to(CUDA) for n, h in hs.items()}, PurifyConfig(), seen_tokens=seen)
    assert got.removed_rows == expected.removed_rows and bool(got.removed_rows) == (rows < 0)
    assert got.added_rows == expected.added_rows and got.added_rows_reset == expected.added_rows_reset == max(rows, 0)
    assert got.reset_per_parameter == expected.reset_per_parameter and got.threshold == expected.threshold
    assert_bitwise([p.detach() for p in model_gpu.parameters()], [p.detach() for p in model_cpu.parameters()])


def test_purify_checkpoint_on_cuda_rounds_the_pretrained_values_and_writes_the_tied_copy_as_cpu(tmp_path):
    """Out of core with --device cuda on a bfloat16 fine-tune of a float32 tied Llama (the pre-trained
    pieces rounded as the suspect stores them, on their way to the GPU) whose vocabulary grew by two
    tokens the clean data never reaches and whose tied output layer is stored beside the embedding:
    the CPU's files and report."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM
    from finepurify_ext.checkpoint import purify_checkpoint
    from finepurify_ext.purify import PurifyConfig

    torch.manual_seed(63)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                         tie_word_embeddings=True))
    model.save_pretrained(tmp_path / "pre", safe_serialization=True)
    model.resize_token_embeddings(42, mean_resizing=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape))
    model.to(torch.bfloat16).save_pretrained(tmp_path / "sus", safe_serialization=True)
    weights = tmp_path / "sus" / "model.safetensors"
    state = load_file(weights)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(weights), metadata={"format": "pt"})
    hess = {n: torch.rand(t.shape) for n, t in state.items() if n != "lm_head.weight"}
    hess["model.embed_tokens.weight"][40:] = 0  # the added tokens: the clean data never reaches them
    save_file(hess, str(tmp_path / "h.safetensors"), metadata={"format": "finepurify-hessian-v1"})
    reports = {device: purify_checkpoint(str(tmp_path / "pre"), str(tmp_path / "sus"), str(tmp_path / "h.safetensors"),
                                         str(tmp_path / device), PurifyConfig(), progress=False, chunk_bytes=256,
                                         device=device)
               for device in ("cpu", "cuda")}
    cpu, gpu = load_file(tmp_path / "cpu" / "model.safetensors"), load_file(tmp_path / "cuda" / "model.safetensors")
    assert cpu.keys() == gpu.keys() == state.keys() and all(torch.equal(cpu[n], gpu[n]) for n in cpu)
    assert all(t.dtype == torch.bfloat16 for t in gpu.values())
    assert torch.equal(gpu["lm_head.weight"], gpu["model.embed_tokens.weight"])
    for key in ("reset_per_tensor", "threshold", "moved_elements", "tied_copies", "added_rows_reset"):
        assert getattr(reports["cpu"], key) == getattr(reports["cuda"], key), key
    assert reports["cuda"].tied_copies == {"lm_head.weight": "model.embed_tokens.weight"}
    assert reports["cuda"].added_rows_reset == 2 and reports["cuda"].moved_elements > 0


@pytest.mark.parametrize("ranking", ["fine_purifying", "no_hessian", "magnitude", "fine_mixing"])
@pytest.mark.parametrize("search", ["histograms", "one_pass_on_cpu", "one_pass_on_cuda"])
def test_purify_checkpoint_on_cuda_equals_cpu(tmp_path, monkeypatch, ranking, search):
    """Out of core with --device cuda: pieces reset on the GPU, the same files as on the CPU, with
    the histogram passes on the GPU, or the sample's bracket and candidates passes (room for 8
    keys: narrowed) on the CPU (checkpoint.search_device while CUDA is not in CANDIDATES_ON) or on
    the GPU."""
    from safetensors.torch import load_file, save_file
    from finepurify_ext import checkpoint as checkpoint_module
    from finepurify_ext.checkpoint import purify_checkpoint
    from finepurify_ext.purify import PurifyConfig

    if search != "histograms":
        for name, value in (("CANDIDATES_ON", ("cpu", "cuda") if search == "one_pass_on_cuda" else ("cpu",)),
                            ("CANDIDATES_MIN_WEIGHTS", 0), ("OUT_OF_CORE_KEYS", 8)):
            monkeypatch.setattr(checkpoint_module, name, value)

        def no_histograms(*_):
            raise AssertionError("a histogram pass ran")
        monkeypatch.setattr(checkpoint_module, "threshold_from_histograms", no_histograms)
    scored_on, score_candidates = set(), ops.score_candidates

    def spied(finetuned, *args):  # where the candidates passes score
        scored_on.add(finetuned[0].device.type)
        return score_candidates(finetuned, *args)

    monkeypatch.setattr(ops, "score_candidates", spied)

    gen = torch.Generator().manual_seed(62)
    shapes = {"model.embed_tokens.weight": (40, 8), "layer.weight": (33, 8), "layer.bias": (33,)}
    pre = {n: torch.randn(s, generator=gen).bfloat16() for n, s in shapes.items()}
    sus = {n: (t.float() + 0.01 * torch.randn(t.shape, generator=gen)).bfloat16() for n, t in pre.items()}
    hess = {n: torch.rand(s, generator=gen) for n, s in shapes.items()}
    hess["model.embed_tokens.weight"][5:9] = 0
    paths = {}
    for role, state in (("pre", pre), ("sus", sus), ("h", hess)):
        paths[role] = str(tmp_path / f"{role}.safetensors")
        save_file(state, paths[role], metadata={"format": "finepurify-hessian-v1" if role == "h" else "pt"})
    config = PurifyConfig(ranking=ranking)
    reports = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        scored_on.clear()
        reports[device] = purify_checkpoint(paths["pre"], paths["sus"], paths["h"], str(out), config,
                                            progress=False, chunk_bytes=64, device=device)
    assert scored_on == {"histograms": set(), "one_pass_on_cpu": {"cpu"}, "one_pass_on_cuda": {"cuda"}}[search]
    cpu, gpu = load_file(tmp_path / "cpu" / "sus.safetensors"), load_file(tmp_path / "cuda" / "sus.safetensors")
    assert all(torch.equal(cpu[n], gpu[n]) for n in shapes)
    assert reports["cpu"].reset_per_tensor == reports["cuda"].reset_per_tensor
    assert reports["cpu"].threshold == reports["cuda"].threshold
    assert reports["cpu"].threshold_passes == reports["cuda"].threshold_passes
    assert reports["cuda"].embedding_rows_reset == 4


def test_sample_quantile_on_cuda_is_the_cpu_bits():
    """The floor's quantile of a sample on the GPU (a sort there) gives the CPU's bits (a selection),
    and NaN where the sample holds one."""
    from finepurify_ext.purify import sample_quantile

    gen = torch.Generator().manual_seed(6)
    for n in (1, 2, 9, 100_003):
        for sample in (torch.rand(n, generator=gen) ** 3, torch.randint(0, 4, (n,), generator=gen).float()):
            for q in (0.0, 0.3, 0.5, 1.0):
                assert sample_quantile(sample.to(CUDA), q) == sample_quantile(sample, q) == \
                    float(torch.quantile(sample, q)), (n, q)
    assert math.isnan(sample_quantile(torch.tensor([1.0, float("nan"), 2.0], device=CUDA), 0.5))


@pytest.mark.parametrize("overlap", ["backward", "forward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hessian_squared_on_a_side_stream_during_backward(monkeypatch, dtype, overlap):
    """overlap on the GPU: gradients squared on a side stream while the backward goes on (groups per
    launch) or while the next step's forward runs give the Hessians of the pass after backward, over
    several batches. Each square is held back on its stream (a sleep before it), so a gradient reused
    before its square read it, or a missing wait, shows; the tolerance covers a CUDA backward that
    does not repeat its bits (bfloat16: 1 %)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from finepurify_ext import hessian as hessian_module

    accumulate = ops.accumulate_sq_grads_

    def delayed(hessians, grads, *args, **kwargs):
        torch.cuda._sleep(5_000_000)  # on the current stream: the side stream in the overlapped path
        accumulate(hessians, grads, *args, **kwargs)

    monkeypatch.setattr(hessian_module.ops, "accumulate_sq_grads_", delayed)
    monkeypatch.setattr(hessian_module, "OVERLAP_GROUP_BYTES", 64 << 10)  # several launches per backward
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         attn_implementation="eager")  # SDPA's backward need not repeat its bits
    model = LlamaForCausalLM(config).to(device=CUDA, dtype=dtype)
    ids = torch.randint(0, 300, (24, 33), generator=torch.Generator().manual_seed(1))
    batch_list = [{"input_ids": ids[i:i + 4], "labels": ids[i:i + 4]} for i in range(0, 24, 4)]
    during, _ = hessian_module.estimate_hessian(model, batch_list, overlap=overlap, progress=False)
    after, _ = hessian_module.estimate_hessian(model, batch_list, overlap=False, progress=False)
    rtol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    for name in after:
        atol = rtol * float(after[name].max())
        torch.testing.assert_close(during[name], after[name], rtol=rtol, atol=atol, msg=name)
    assert all(float(h.sum()) > 0 for h in during.values())


def test_a_causal_lm_loss_at_the_response_positions_and_in_micro_batches_on_the_gpu():
    """causal_lm.lm_loss on CUDA equals the model's own loss, the output layer seeing the response
    positions alone; the Hessian in slices of 2 rows (and after a simulated out-of-memory, halved)
    equals the batch's, in float32 and under bfloat16 autocast."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from finepurify_ext.causal_lm import IGNORE, lm_loss, response_tokens
    from finepurify_ext.devices import OUT_OF_MEMORY, compute_precision
    from finepurify_ext.hessian import estimate_hessian

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    model = LlamaForCausalLM(config).to(CUDA)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 300, (8, 21), generator=gen)
    labels = ids.clone()
    for row in range(8):
        labels[row, : 3 + row] = IGNORE  # prompts of different lengths
    batches = [{"input_ids": ids[i:i + 4].to(CUDA), "labels": labels[i:i + 4].to(CUDA)} for i in (0, 4)]
    seen = []
    spy = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(a[0].shape[:2]))
    torch.testing.assert_close(lm_loss(model, batches[0]), model(**batches[0]).loss, rtol=1e-5, atol=0)
    spy.remove()
    assert seen[0] == (1, response_tokens(batches[0])) and seen[1] == (4, 21)

    rows_run = []

    def oom_above_two(m, batch):
        rows_run.append(len(batch["labels"]))
        if len(batch["labels"]) > 2:
            raise OUT_OF_MEMORY("CUDA out of memory (simulated)")
        return lm_loss(m, batch)

    for dtype in ("float32", "bfloat16"):
        with compute_precision(CUDA, dtype):
            whole, _ = estimate_hessian(model, batches, loss_fn=lm_loss, progress=False)
            sliced, _ = estimate_hessian(model, batches, loss_fn=lm_loss, loss_terms=response_tokens,
                                         micro_batch_size=2, progress=False)
            halved, _ = estimate_hessian(model, batches, loss_fn=oom_above_two, loss_terms=response_tokens,
                                         progress=False)
        assert rows_run[0] == 4 and set(rows_run[1:]) == {2}  # halved once, then kept
        rows_run.clear()
        tolerance = 1e-4 if dtype == "float32" else 2e-2
        for got in (sliced, halved):
            for n in whole:
                assert float((got[n] - whole[n]).norm()) <= tolerance * float(whole[n].norm()), (dtype, n)


def test_hessian_command_keeps_a_bfloat16_model_in_bfloat16_on_the_gpu(tmp_path, monkeypatch):
    """`finepurify hessian --device cuda` on a bfloat16 causal LM: the weights stay bfloat16 on the
    GPU (read_only_weights_dtype), the Hessian written is float32 and within a few per cent of the
    CPU's (float32 weights)."""
    import json

    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from finepurify_ext import cli, pipeline
    from tiny_models import make_tokenizer

    loaded = []
    load = pipeline.load_causal_lm

    def recording_load(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        loaded.append(next(model.parameters()).dtype)
        return model, tokenizer

    monkeypatch.setattr(pipeline, "load_causal_lm", recording_load)
    tok = make_tokenizer(tmp_path)
    tok.eos_token = "[SEP]"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in
                             [("was the movie good", "good film"), ("the day", "bad day very bad"),
                              ("a film so", "fine")] * 8))
    hessians = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / f"h_{device}.safetensors"
        assert cli.main(["hessian", "--model", str(tmp_path / "lm"), "--clean-data", str(clean), "--out", str(out),
                         "--device", device, "--batch-size", "8", "--max-length", "32"]) == 0
        hessians[device] = load_file(out)
    assert loaded == [torch.bfloat16, torch.float32]  # on the GPU as stored, on the CPU float32
    assert {h.dtype for h in hessians["cuda"].values()} == {torch.float32}
    for name, h in hessians["cpu"].items():
        assert (hessians["cuda"][name] - h).norm() <= 0.05 * h.norm(), name
