import pytest
import torch

import finepurify_ext  # noqa: F401  (registers the ops)

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
