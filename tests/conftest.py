import contextlib
import signal

import pytest
import torch

import finepurify_ext  # noqa: F401  (registers the ops)
from finepurify_ext import ops
from finepurify_ext import reference as ref

# A suite started in the background by a shell (`make test &`) inherits SIGINT ignored, and Python
# then installs no KeyboardInterrupt handler: the tests of Ctrl-C raise SIGINT and need one.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# 0, 1, odd, around the CPU chunk (65536) and the AVX vector width.
SIZES = [0, 1, 7, 31, 1023, 65535, 65536, 65537, 100_003]


def make_weights(seed, shapes, dtype, device="cpu"):
    """Fresh random (finetuned, pretrained, hessians): no zeros, drifts of varied magnitude, a
    hessian spanning several decades so scores spread over many octaves."""
    gen = torch.Generator().manual_seed(seed)
    dtypes = dtype if isinstance(dtype, (list, tuple)) else [dtype] * len(shapes)
    finetuned, pretrained, hessians = [], [], []
    for shape, dt in zip(shapes, dtypes):
        pre = torch.randn(shape, generator=gen)
        drift = torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen) * 0.1
        hessian = torch.rand(shape, generator=gen) * 10.0 ** torch.randint(-6, 2, shape, generator=gen)
        pretrained.append(pre.to(dt).to(device))
        finetuned.append((pre + drift).to(dt).to(device))
        hessians.append(hessian.to(device))
    return finetuned, pretrained, hessians


def many_shapes(seed, count):
    gen = torch.Generator().manual_seed(seed)
    shapes = []
    for i in range(count):
        if i % 3 == 0:
            shapes.append((int(torch.randint(1, 40, (1,), generator=gen)), int(torch.randint(1, 40, (1,), generator=gen))))
        else:
            shapes.append((int(torch.randint(0, 300, (1,), generator=gen)),))
    return shapes


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param


def clones(tensors):
    return [t.clone() for t in tensors]


def assert_bitwise(actual, expected):
    """Same dtype, shape and bits (NaN-safe, -0.0 != +0.0), on any device."""
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        a, e = a.cpu(), e.cpu()
        assert a.dtype == e.dtype and a.shape == e.shape, f"tensor {i}: {a.dtype}{list(a.shape)} vs {e.dtype}{list(e.shape)}"
        a_bits, e_bits = a.reshape(-1).view(torch.uint8), e.reshape(-1).view(torch.uint8)
        if not torch.equal(a_bits, e_bits):
            first = int((a_bits != e_bits).nonzero()[0]) // a.element_size()
            raise AssertionError(f"tensor {i} differs first at flat index {first}: {a.reshape(-1)[first]} vs {e.reshape(-1)[first]}")


def sorted_scores_desc(ft, pre, h, eps=1e-8):
    return torch.sort(ref.all_scores(ft, pre, h, eps), descending=True).values


RANKINGS = {
    "plain": ops.Ranking(),
    "floor": ops.Ranking(hessian_floor=0.05),
    "random": ops.Ranking(random_seed=11),
    "random_keyed": ops.Ranking(random_seed=3, random_keys=(9, 2**62, 0, 77, 5, 123456789, 1, 2)),
}


def ranked_weights(dtype, seed=50):
    """Fresh random weights over odd and chunk-straddling sizes, an empty tensor, per-tensor (one
    element) hessians beside full ones, and a third of the weights that never moved."""
    shapes = [(1000,), (65537,), (9, 9), (0,), (31,), (1,), (7, 13), (100_003,)]
    ft, pre, h = make_weights(seed, shapes, dtype)
    gen = torch.Generator().manual_seed(seed)
    for i, (f, p) in enumerate(zip(ft, pre)):
        still = torch.rand(f.shape, generator=gen) < 0.33
        f[still] = p[still]
        if i in (2, 4):
            h[i] = torch.rand(1, generator=gen)
    return ft, pre, h


def misleading_sample(case: str, n: int = 1_500_000):
    """One float32 tensor of n weights (pre 0, H 1: the score is about ft^2) whose sampled runs (16
    elements every stride, the stride the ops' search takes at this size) mislead it: "low" the
    sampled scores are all below the rest (the bracket misses below the k-th largest); "tied" the
    rest crowd into the middle of the sampled scores' range (far more keys fall in the bracket
    than the sample foresaw); "unmoved" the sampled weights never moved (moved-only counting
    estimates nothing moved)."""
    stride = max(16, 16 * (n // max(1 << 14, min(1 << 20, n // 64))))
    position = torch.arange(n)
    sampled = (position % stride < 16) & (position < (n // stride) * stride)
    gen = torch.Generator().manual_seed(71)
    score = 1.0 + torch.rand(n, generator=gen)  # in [1, 2)
    if case == "low":
        score[sampled] *= 1e-3
    elif case == "tied":
        score[~sampled] = 1.5 + 1e-4 * torch.rand(int((~sampled).sum()), generator=gen)
    ft = score.sqrt()
    if case == "unmoved":
        ft[sampled] = 0.0
    return [ft], [torch.zeros(n)], [torch.ones(n)]


def pytest_addoption(parser):
    parser.addoption("--emulated-cuda", action="store_true",
                     help="run the whole session on an emulated GPU (tests/emulated_cuda.py): the CUDA tests' "
                     "device placement checked without a GPU, e.g. -k purify_cuda before a GPU run (the kernels "
                     "run are the CPU's, so their comparisons with the CPU show nothing)")


_EMULATION = contextlib.ExitStack()


def pytest_configure(config):
    if config.getoption("--emulated-cuda"):
        from emulated_cuda import emulated_cuda

        _EMULATION.enter_context(emulated_cuda())


def pytest_unconfigure(config):
    _EMULATION.close()
