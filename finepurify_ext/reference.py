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


# The random ranking's counter-based generator (csrc/kernels/score_math.h), in Python integers for
# the per-tensor stream and in int64 tensor arithmetic (wrapping, shifts made logical) per element.
_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def _as_int64(v: int) -> int:
    v &= _M64
    return v - (1 << 64) if v >= 1 << 63 else v


def _mix_int(z: int) -> int:
    z &= _M64
    z = ((z ^ (z >> 30)) * _MIX[0]) & _M64
    z = ((z ^ (z >> 27)) * _MIX[1]) & _M64
    return z ^ (z >> 31)


def random_stream(seed: int, key: int, offset: int = 0) -> int:
    return (_mix_int((seed & _M64) ^ _mix_int((key & _M64) + _GOLDEN)) + offset * _GOLDEN) & _M64


def _srl(x: torch.Tensor, n: int) -> torch.Tensor:
    return (x >> n) & ((1 << (64 - n)) - 1)


def random_scores(stream: int, numel: int) -> torch.Tensor:
    """float32 random scores of elements 0 .. numel-1 of a stream: bits uniform over [1, 2^30]."""
    z = torch.arange(numel, dtype=torch.int64) * _as_int64(_GOLDEN) + _as_int64(stream)
    z = (z ^ _srl(z, 30)) * _as_int64(_MIX[0])
    z = (z ^ _srl(z, 27)) * _as_int64(_MIX[1])
    z = z ^ _srl(z, 31)
    return (_srl(z, 34) + 1).to(torch.int32).view(torch.float32)


def drift_score(finetuned, pretrained, hessian, eps, hessian_floor=0.0, random_seed=-1, random_key=0,
                random_offset=0) -> torch.Tensor:
    """The score of every element; a hessian of one element holds for the whole tensor."""
    if random_seed >= 0:
        stream = random_stream(random_seed, random_key, random_offset)
        scores = random_scores(stream, finetuned.numel()).reshape(finetuned.shape).to(finetuned.device)
        return torch.where(finetuned.float() != pretrained.float(), scores, 0.0)
    drift = finetuned.float() - pretrained.float()
    h = hessian.expand(finetuned.shape) if hessian.numel() == 1 else hessian
    h = torch.where(h > hessian_floor, h, torch.tensor(float(hessian_floor), dtype=torch.float32, device=h.device))
    return drift * drift / (h + eps)


def _per_tensor(ranking, n: int):
    """drift_score's ranking keywords for each of n tensors (ops.Ranking or None)."""
    if ranking is None:
        return [{}] * n
    keys = list(ranking.random_keys) or list(range(n))
    offsets = list(ranking.random_offsets) or [0] * n
    return [dict(hessian_floor=ranking.hessian_floor, random_seed=ranking.random_seed, random_key=keys[i],
                 random_offset=offsets[i]) for i in range(n)]


def all_scores(finetuned: Tensors, pretrained: Tensors, hessians: Tensors, eps, ranking=None) -> torch.Tensor:
    """Every score, flattened and concatenated in list order."""
    if not finetuned:
        return torch.zeros(0)
    kws = _per_tensor(ranking, len(finetuned))
    return torch.cat([drift_score(f, p, h, eps, **kw).flatten()
                      for f, p, h, kw in zip(finetuned, pretrained, hessians, kws)])


def score_threshold(finetuned: Tensors, pretrained: Tensors, hessians: Tensors, k: int, eps, ranking=None) -> float:
    """The k-th largest score (k from 1), by sorting all of them."""
    scores = all_scores(finetuned, pretrained, hessians, eps, ranking)
    return torch.sort(scores, descending=True).values[k - 1].item()


def score_candidates(finetuned: Tensors, pretrained: Tensors, hessians: Tensors, eps, low_key: int, high_key: int,
                     capacity: int, ranking=None) -> tuple[torch.Tensor, torch.Tensor]:
    """ops.score_candidates by scoring every element: the keys are the scores' float32 bits where
    the inputs are finite, the hessian in [0, max float] and the score not NaN; others are unrankable."""
    keys, unrankable, unmoved = [], 0, 0
    max_finite = torch.finfo(torch.float32).max
    for f, p, h, kw in zip(finetuned, pretrained, hessians, _per_tensor(ranking, len(finetuned))):
        f32, p32 = f.float().flatten(), p.float().flatten()
        h32 = h.float().flatten().expand(f32.shape) if h.numel() == 1 else h.float().flatten()
        key = drift_score(f, p, h, eps, **kw).flatten().view(torch.int32).long() & 0xFFFFFFFF
        ok = (f32.abs() <= max_finite) & (p32.abs() <= max_finite) & (h32 >= 0) & (h32 <= max_finite) & (key <= 0x7F800000)
        unrankable += int((~ok).sum())
        unmoved += int((f32 == p32).sum())
        keys.append(key[ok])
    keys = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.int64)
    between = keys[(keys > low_key) & (keys < high_key)]
    at_low = int((keys == low_key).sum()) if low_key != high_key else 0
    # The keys between in 2048 bins of 2^shift keys from low_key + 1, the narrowest that cover them.
    span, shift = max(high_key - low_key - 2, 0), 0
    while span >> shift >= 2048:
        shift += 1
    bins = torch.bincount((between - (low_key + 1)) >> shift, minlength=2048)
    counts = torch.cat([torch.tensor([int((keys > high_key).sum()), int((keys == high_key).sum()), between.numel(),
                                      at_low, unrankable, unmoved], dtype=torch.int64), bins])
    out = torch.full((capacity,), -1, dtype=torch.int32)
    if between.numel() <= capacity:
        out[:between.numel()] = torch.sort(between, descending=True).values.to(torch.int32)
    return counts, out


def float64_sums(tensors: Tensors) -> torch.Tensor:
    """ops.float64_sums in its order: per 64K-element chunk, eight lanes of sequential float64 sums
    (lane j adds elements j, j + 8, ...) added pairwise, then the tail; the chunk sums added in order."""
    sums = []
    for t in tensors:
        flat, total = t.reshape(-1).double(), 0.0
        for chunk in flat.split(1 << 16):
            body = chunk[:chunk.numel() // 8 * 8].view(-1, 8)
            lanes = body.cumsum(0)[-1].tolist() if body.numel() else [0.0] * 8
            part = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
            for value in chunk[body.numel():].tolist():
                part += value
            total += part
        sums.append(total)
    return torch.tensor(sums, dtype=torch.float64)


def score_sample(finetuned: Tensors, pretrained: Tensors, hessians: Tensors, eps, stride: int,
                 ranking=None) -> tuple[torch.Tensor, torch.Tensor]:
    """ops.score_sample by scoring every element and picking the sampled positions: runs of 16 at
    every multiple of ``stride`` that starts a whole stride, or a short tensor's head."""
    keys, unrankable, unmoved = [], 0, 0
    max_finite = torch.finfo(torch.float32).max
    for f, p, h, kw in zip(finetuned, pretrained, hessians, _per_tensor(ranking, len(finetuned))):
        n = f.numel()
        if n == 0:
            continue
        if n >= stride:
            picked = (torch.arange(n // stride)[:, None] * stride + torch.arange(16)[None, :]).flatten()
        else:
            picked = torch.arange(max(1, n * 16 // stride))
        f32, p32 = f.float().flatten()[picked], p.float().flatten()[picked]
        h32 = h.float().flatten().expand(n)[picked] if h.numel() == 1 else h.float().flatten()[picked]
        key = drift_score(f, p, h, eps, **kw).flatten()[picked].view(torch.int32)
        ok = ((f32.abs() <= max_finite) & (p32.abs() <= max_finite) & (h32 >= 0) & (h32 <= max_finite)
              & (key >= 0) & (key <= 0x7F800000))
        keys.append(torch.where(ok, key, torch.tensor(-2**31, dtype=torch.int32)))
        unrankable += int((~ok).sum())
        unmoved += int((f32 == p32).sum())
    keys = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.int32)
    return keys, torch.tensor([unrankable, unmoved], dtype=torch.int64)


def masked_reset_(finetuned: Tensors, pretrained: Tensors, hessians: Tensors, threshold, eps,
                  ranking=None) -> torch.Tensor:
    counts = []
    for f, p, h, kw in zip(finetuned, pretrained, hessians, _per_tensor(ranking, len(finetuned))):
        reset = drift_score(f, p, h, eps, **kw).double() >= threshold
        f.copy_(torch.where(reset, p, f))
        counts.append(int(reset.sum()))
    return torch.tensor(counts, dtype=torch.int64)


def num_reset_for(total: int, reserve_ratio: float) -> int:
    """How many of ``total`` scores are reset at ``reserve_ratio``: total - round(ratio * total),
    halves rounded up (the same arithmetic as the C++ op)."""
    return total - int(math.floor(reserve_ratio * total + 0.5))


def reset_most_abnormal_(finetuned: Tensors, pretrained: Tensors, hessians: Tensors, reserve_ratio, eps,
                         ranking=None, count_moved_only=False) -> torch.Tensor:
    if count_moved_only:
        total = sum(int((f.float() != p.float()).sum()) for f, p in zip(finetuned, pretrained))
    else:
        total = sum(f.numel() for f in finetuned)
    num_reset = num_reset_for(total, reserve_ratio)
    if num_reset == 0:
        return torch.zeros(len(finetuned), dtype=torch.int64)
    threshold = score_threshold(finetuned, pretrained, hessians, num_reset, eps, ranking)
    return masked_reset_(finetuned, pretrained, hessians, threshold, eps, ranking)


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


# The digits of the threshold search (csrc/kernels/score_math.h): bits 30..20, 19..10, 9..0.
_RADIX_LEVELS = ((11, 20), (10, 10), (10, 0))


def _score_chunks(finetuned: Tensors, pretrained: Tensors, hessians: Tensors, eps, chunk: int):
    """The scores of every tensor, ``chunk`` elements at a time (float32, never all at once)."""
    for f, p, h in zip(finetuned, pretrained, hessians):
        f, p, h = f.reshape(-1), p.reshape(-1), h.reshape(-1)
        for start in range(0, f.numel(), chunk):
            end = start + chunk
            drift = f[start:end].float() - p[start:end]
            yield drift.mul_(drift).div_(h[start:end] + eps)


def radix_score_threshold(finetuned: Tensors, pretrained: Tensors, hessians: Tensors, k: int, eps,
                          chunk: int = 1 << 26) -> float:
    """The k-th largest score by the op's own algorithm written in torch: three passes of
    ``torch.bincount`` over the digits of the scores' float bits, the scores recomputed per chunk.
    Memory stays a few chunks whatever the model size; the strongest pure-PyTorch selection we know
    (no sort, no score vector, no size limit). Inputs must be finite."""
    total = sum(f.numel() for f in finetuned)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} is out of range [1, {total}]")
    device = finetuned[0].device
    prefix, rank = 0, k
    for bits, shift in _RADIX_LEVELS:
        bins = 1 << bits
        counts = torch.zeros(bins + 1, dtype=torch.int64, device=device)
        for scores in _score_chunks(finetuned, pretrained, hessians, eps, chunk):
            key = scores.view(torch.int32)
            digit = (key >> shift) & (bins - 1)
            if shift < 20:  # only the scores whose higher digits equal the prefix count
                digit = torch.where((key >> (shift + bits)) == prefix, digit, bins)
            counts += torch.bincount(digit, minlength=bins + 1)
        counts = counts[:bins].tolist()
        b = bins - 1
        while b > 0 and counts[b] < rank:
            rank -= counts[b]
            b -= 1
        prefix = (prefix << bits) | b
    return torch.tensor(prefix, dtype=torch.int32).view(torch.float32).item()


def topk_score_threshold(finetuned: Tensors, pretrained: Tensors, hessians: Tensors, k: int, eps,
                         chunk: int = 1 << 26) -> float:
    """The k-th largest score by chunked ``torch.topk``: the m = min(k, N - k + 1) extreme scores
    on the nearer side are kept as candidates, merged with each chunk's own m extremes. Memory is
    about 2m floats plus a chunk (no flat score vector, no 2^31 limit of ``torch.kthvalue``)."""
    total = sum(f.numel() for f in finetuned)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} is out of range [1, {total}]")
    largest = k <= total - k + 1
    m = k if largest else total - k + 1
    kept = None
    for scores in _score_chunks(finetuned, pretrained, hessians, eps, chunk):
        part = scores if kept is None else torch.cat([kept, scores])
        kept = torch.topk(part, min(m, part.numel()), largest=largest, sorted=False).values
    return (kept.min() if largest else kept.max()).item()


def radix_reset_most_abnormal_(finetuned: Tensors, pretrained: Tensors, hessians: Tensors, reserve_ratio, eps,
                               chunk: int = 1 << 26) -> torch.Tensor:
    """The whole detect-and-reset with ``radix_score_threshold`` and a chunked ``torch.where``:
    the lean pure-PyTorch pipeline (a few chunks of extra memory)."""
    total = sum(f.numel() for f in finetuned)
    num_reset = num_reset_for(total, reserve_ratio)
    device = finetuned[0].device if finetuned else "cpu"
    counts = torch.zeros(len(finetuned), dtype=torch.int64, device=device)
    if num_reset == 0:
        return counts
    threshold = radix_score_threshold(finetuned, pretrained, hessians, num_reset, eps, chunk)
    for i, (f, p, h) in enumerate(zip(finetuned, pretrained, hessians)):
        f1, p1, h1 = f.view(-1), p.reshape(-1), h.reshape(-1)
        for start in range(0, f1.numel(), chunk):
            end = start + chunk
            drift = f1[start:end].float() - p1[start:end]
            reset = drift.mul_(drift).div_(h1[start:end] + eps) >= threshold
            f1[start:end] = torch.where(reset, p1[start:end], f1[start:end])
            counts[i] += reset.sum()
    return counts
