"""Pure-PyTorch versions of every op in ``finepurify_ext.ops``.

The first half is written for clarity and is the test oracle. The second half (``fast_*``) is the
fastest honest pure-PyTorch pipeline we know (``torch._foreach_*``, one flat score vector,
``torch.kthvalue``, ``torch.where``): the baseline the benchmarks compare against.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

Tensors = Sequence[torch.Tensor]


# ------------------------------------------------------------------------- clear reference


def accumulate_sq_grads_(hessians: Tensors, grads: Tensors, scale=1.0, zero_grads=False) -> None:
    for hessian, grad in zip(hessians, grads):
        grad32 = grad.float()
        hessian += scale * grad32 * grad32
        if zero_grads:
            grad.zero_()


def drift_score(finetuned, pretrained, hessian, eps) -> torch.Tensor:
    drift = finetuned.float() - pretrained.float()
    return drift * drift / (hessian + eps)


def all_scores(finetuned: Tensors, pretrained: Tensors, hessians: Tensors, eps) -> torch.Tensor:
    """Every score, flattened and concatenated in list order."""
    if not finetuned:
        return torch.zeros(0)
    return torch.cat([drift_score(f, p, h, eps).flatten() for f, p, h in zip(finetuned, pretrained, hessians)])


def score_threshold(finetuned: Tensors, pretrained: Tensors, hessians: Tensors, k: int, eps) -> float:
    """The k-th largest score (k from 1), by sorting all of them."""
    scores = all_scores(finetuned, pretrained, hessians, eps)
    return torch.sort(scores, descending=True).values[k - 1].item()


def masked_reset_(finetuned: Tensors, pretrained: Tensors, hessians: Tensors, threshold, eps) -> torch.Tensor:
    counts = []
    for f, p, h in zip(finetuned, pretrained, hessians):
        reset = drift_score(f, p, h, eps).double() >= threshold
        f.copy_(torch.where(reset, p, f))
        counts.append(int(reset.sum()))
    return torch.tensor(counts, dtype=torch.int64)


def num_reset_for(total: int, reserve_ratio: float) -> int:
    """How many of ``total`` scores are reset at ``reserve_ratio``: total - round(ratio * total),
    halves rounded up (the same arithmetic as the C++ op)."""
    return total - int(math.floor(reserve_ratio * total + 0.5))


def reset_most_abnormal_(finetuned: Tensors, pretrained: Tensors, hessians: Tensors, reserve_ratio, eps) -> torch.Tensor:
    total = sum(f.numel() for f in finetuned)
    num_reset = num_reset_for(total, reserve_ratio)
    if num_reset == 0:
        return torch.zeros(len(finetuned), dtype=torch.int64)
    threshold = score_threshold(finetuned, pretrained, hessians, num_reset, eps)
    return masked_reset_(finetuned, pretrained, hessians, threshold, eps)


# ------------------------------------------------------------ fastest pure-PyTorch baseline


def fast_accumulate_sq_grads_(hessians: Tensors, grads: Tensors, scale=1.0) -> None:
    """``torch._foreach_addcmul_``; reduced-precision grads are upcast first, since the foreach
    kernels want one dtype per list."""
    grads = list(grads)
    if any(g.dtype != torch.float32 for g in grads):
        grads = [g.float() for g in grads]
    torch._foreach_addcmul_(list(hessians), grads, grads, value=scale)


def fast_scores(finetuned: Tensors, pretrained: Tensors, hessians: Tensors, eps, group_bytes=1 << 28):
    """All scores in one flat float32 vector (returned with its per-tensor views), written through
    the views with foreach ops, a group of tensors (about ``group_bytes`` of scores) at a time so
    the temporaries stay small beside the score vector itself."""
    total = sum(f.numel() for f in finetuned)
    flat = torch.empty(total, dtype=torch.float32, device=finetuned[0].device)
    views, offset = [], 0
    for f in finetuned:
        views.append(flat[offset : offset + f.numel()].view(f.shape))
        offset += f.numel()
    start = 0
    while start < len(views):
        end, size = start, 0
        while end < len(views) and (end == start or size + 4 * views[end].numel() <= group_bytes):
            size += 4 * views[end].numel()
            end += 1
        v = views[start:end]
        torch._foreach_copy_(v, list(finetuned[start:end]))  # upcasts reduced precision
        torch._foreach_sub_(v, list(pretrained[start:end]))  # promotes, no float32 copy of pre
        torch._foreach_mul_(v, v)
        torch._foreach_div_(v, torch._foreach_add(list(hessians[start:end]), eps))
        start = end
    return flat, views


def fast_score_threshold(finetuned: Tensors, pretrained: Tensors, hessians: Tensors, k: int, eps):
    flat, views = fast_scores(finetuned, pretrained, hessians, eps)
    # k-th largest = (N - k + 1)-th smallest
    threshold = torch.kthvalue(flat, flat.numel() - k + 1).values
    return threshold, views


def fast_reset_most_abnormal_(finetuned: Tensors, pretrained: Tensors, hessians: Tensors, reserve_ratio, eps):
    total = sum(f.numel() for f in finetuned)
    num_reset = num_reset_for(total, reserve_ratio)
    if num_reset == 0:
        return torch.zeros(len(finetuned), dtype=torch.int64)
    threshold, views = fast_score_threshold(finetuned, pretrained, hessians, num_reset, eps)
    counts = []
    for f, p, s in zip(finetuned, pretrained, views):
        reset = s >= threshold
        torch.where(reset, p, f, out=f)
        counts.append(reset.sum())
    return torch.stack(counts)
