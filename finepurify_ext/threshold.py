"""The exact k-th largest score from summed histograms, whatever holds the elements.

``ops.score_threshold`` runs the search inside one op over tensors in memory. The same search is
written here over a callback that returns the level's histogram, so the elements can live in
several places and their histograms be summed: shards of a checkpoint on disk (``checkpoint``), or
the ranks of a process group (``distributed_score_threshold``, one ``all_reduce`` per pass).
Every feeder gets the same threshold as the single in-memory op over all elements.
"""
from __future__ import annotations

import struct
from typing import Callable, Sequence

import torch

from . import _C  # noqa: F401  (registers torch.ops.finepurify; this module imports no other of ours)

_ops = torch.ops.finepurify

# csrc/kernels/score_math.h: the float bits of a score split into 11, 10 and 10-bit digits.
LEVEL_BITS = (11, 10, 10)
LEVEL_BINS = tuple(1 << b for b in LEVEL_BITS)


def threshold_from_histograms(histogram_of: Callable[[int, int], torch.Tensor], k: int, total: int) -> float:
    """The k-th largest score (k from 1) given ``histogram_of(level, prefix)``: int64 counts of
    ``LEVEL_BINS[level] + 2`` bins over all elements (then the unrankable count, then the count of
    weights that never moved; ``ops.score_histogram``)."""
    if not 1 <= k <= total:
        raise ValueError(f"k={k} is out of range: the tensors hold {total} elements, so k must be in [1, {total}]")
    prefix, rank = 0, k
    for level, bins in enumerate(LEVEL_BINS):
        counts = histogram_of(level, prefix).tolist()
        if counts[bins] > 0:
            raise ValueError(f"{counts[bins]} scores are NaN or Inf (or a hessian is negative); "
                             "check the inputs for NaN/Inf and the hessians for negative values")
        b = bins - 1
        while b > 0 and counts[b] < rank:
            rank -= counts[b]
            b -= 1
        if counts[b] < rank:
            raise AssertionError("the histograms lost elements: they do not sum to the same total every pass")
        prefix = (prefix << LEVEL_BITS[level]) | b
    return struct.unpack("<f", struct.pack("<I", prefix))[0]


# ----------------------------------------------------------------------------- torch.distributed


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def _counts_here(t) -> bool:
    """Whether this rank's local part of ``t`` counts: a DTensor's replicated mesh dimensions count
    once, on coordinate 0; a plain tensor always counts (each rank passes different elements)."""
    if not _is_dtensor(t):
        return True
    from torch.distributed.tensor import Replicate

    coordinate = t.device_mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the tensor's mesh
        return False
    return all(c == 0 for c, p in zip(coordinate, t.placements) if isinstance(p, Replicate))


def _local(t) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def distributed_score_threshold(
    finetuned: Sequence[torch.Tensor],
    pretrained: Sequence[torch.Tensor],
    hessians: Sequence[torch.Tensor],
    k: int,
    eps: float,
    group=None,
    replicated: bool = False,
    ranking=None,
) -> float:
    """``ops.score_threshold`` over the elements of every rank of ``group`` (default: the world).

    Plain tensors: each rank passes different elements (its shard of the model), or, with
    ``replicated=True``, every rank passes the same ones (DDP) and they are counted once. DTensors (FSDP2,
    tensor parallel) are read by their placements: a sharded dimension counts each rank's shard, a
    replicated one counts once, so replicated parameters are never counted twice. ``k`` counts over
    all ranks. Every rank gets the same threshold, the one a single process gets over all elements.
    Costs one ``all_reduce`` of a 2049-bin histogram per pass (three passes) and one for the count."""
    import torch.distributed as dist

    lists = [list(finetuned), list(pretrained), list(hessians)]
    first_rank = dist.get_rank(group) == 0
    keep = [i for i, t in enumerate(lists[0])
            if (_counts_here(t) if _is_dtensor(t) else (first_rank or not replicated))]
    ft, pre, hs = ([_local(ts[i]) for i in keep] for ts in lists)
    device = ft[0].device if ft else torch.device("cpu")
    if dist.get_backend(group) == "nccl" and device.type != "cuda":  # nccl reduces CUDA tensors only
        device = torch.device("cuda", torch.cuda.current_device())
    total = torch.tensor([sum(t.numel() for t in ft)], dtype=torch.int64, device=device)
    dist.all_reduce(total, group=group)

    args = ranking.subset(keep).args() if ranking is not None else ()  # the tensors that count here

    def histogram_of(level: int, prefix: int) -> torch.Tensor:
        if ft:
            counts = _ops.score_histogram.default(ft, pre, hs, float(eps), level, prefix, *args)
        else:
            counts = torch.zeros(LEVEL_BINS[level] + 2, dtype=torch.int64)
        counts = counts.to(device)
        dist.all_reduce(counts, group=group)
        if counts[LEVEL_BINS[level]] > 0 and ft:  # name the local culprit, if it is here
            _ops.score_threshold.default(ft, pre, hs, 1, float(eps), *args)
        return counts.cpu()

    return threshold_from_histograms(histogram_of, int(k), int(total))


def distributed_masked_reset_(finetuned, pretrained, hessians, threshold: float, eps: float,
                              ranking=None) -> torch.Tensor:
    """``ops.masked_reset_`` on each rank's local parts (DTensors through ``to_local``); returns this
    rank's per-tensor counts of reset elements."""
    ft = [_local(t) for t in finetuned]
    if not ft:
        return torch.zeros(0, dtype=torch.int64)
    args = ranking.args() if ranking is not None else ()
    with torch.no_grad():
        return _ops.masked_reset_.default(ft, [_local(t) for t in pretrained], [_local(t) for t in hessians],
                                          float(threshold), float(eps), *args)
