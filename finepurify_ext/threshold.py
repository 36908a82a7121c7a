"""The exact k-th largest score from summed counts, whatever holds the elements.

``ops.score_threshold`` runs the search inside one op over tensors in memory. The same searches
are written here over callbacks that return a pass's counts, so the elements can live in several
places and their counts be summed: the groups of ``purify_``, shards of a checkpoint on disk
(``checkpoint``), or the ranks of a process group (``distributed_score_threshold``, one
``all_reduce`` per pass). Two searches: from a sample's bracket, one ``score_candidates`` pass
(usually; ``search_ranges``), or three histogram passes over the float bits of the scores
(``threshold_from_histograms``). Every feeder gets the same threshold as the single in-memory op
over all elements.
"""
from __future__ import annotations

import math
import os
import struct
import warnings
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
    return score_of(prefix)


# ----------------------------------------------------------------------------- one pass, from a sample

INF_KEY = 0x7F800000  # the key of +Inf, the largest rankable one
SAMPLE_RUN = 16  # score_sample's run of consecutive elements (kSampleRun): whole 64-byte lines of float32
CANDIDATE_KEYS = 4 << 20  # the keys one candidates pass may keep (16 MB; finepurify/search.h kCandidateKeys)


def _candidates_on() -> tuple[str, ...]:
    """The device types whose score_candidates kernel has been run against the CPU's: the CPU. The
    CUDA kernel is written and its tests are in tests/test_cuda.py, but it has not run on a GPU
    yet: until it has, a GPU keeps the three histogram passes. FINEPURIFY_CANDIDATES_ON
    (comma-separated device types, read at import) overrides it: the GPU check times purify_ with
    the sample's search on a GPU that way, in the lease that runs those tests."""
    raw = os.environ.get("FINEPURIFY_CANDIDATES_ON")
    if raw is None:
        return ("cpu",)
    types = tuple(t.strip() for t in raw.split(",") if t.strip())
    if not types or not set(types) <= {"cpu", "cuda"}:  # a warning, not an error at import: commands still run
        warnings.warn(f"FINEPURIFY_CANDIDATES_ON={raw!r} is ignored: give device types among cpu and cuda, "
                      "comma-separated (e.g. cpu,cuda)", stacklevel=2)
        return ("cpu",)
    return types


CANDIDATES_ON = _candidates_on()
# Below this many ranked weights the histogram passes run: the sample (one op, about a millisecond
# of host time at 400 tensors) and its bracket cost about what the two passes they save do
# (bench/bench_search.py on the CPU: even at 1M weights, 1.4x faster at 2M, 2x at 8M;
# finepurify/search.h kSampleSearchMinWeights; the tests check these copies against _C.constants()).
CANDIDATES_MIN_WEIGHTS = 1 << 20


def sample_budget(total: int) -> int:
    """About how many of ``total`` elements the sample that brackets the threshold takes: one in 64
    up to a million, then one in 256 up to 4M (16 MB of keys). A bracket's share shrinks as the
    square root of the sample: one pass then holds the threshold of about 0.8B to 1.4B weights at
    the default reserve, against 0.4B to 0.7B with a million (finepurify/search.h sample_budget)."""
    return max(1 << 14, min(total // 64, 1 << 20), min(total // 256, 4 << 20))


def sample_stride(total: int, max_samples: int) -> int:
    """``score_sample``'s stride for about ``max_samples`` of ``total`` elements."""
    return max(SAMPLE_RUN, SAMPLE_RUN * (total // max(max_samples, 1)))


def key_of(score: float) -> int:
    return struct.unpack("<I", struct.pack("<f", score))[0]


def score_of(key: int) -> float:
    return struct.unpack("<f", struct.pack("<I", key))[0]


def bracket_from_sample(sample_keys: torch.Tensor, rank_fraction: float, spread: float,
                        sigmas: float = 6.0) -> tuple[int, int, float]:
    """The key range [low, high] that holds the element of ``rank_fraction`` (from the top, of all
    elements) unless the sample misleads by more than ``sigmas`` standard deviations, and the
    fraction of the sample strictly inside it. ``sample_keys``: the rankable keys of an even sample
    (any order; on the CPU reordered in place); ``spread``: the standard deviation, in sample
    positions, of where that element falls in the sample (the binomial spread, plus that of any
    estimate the rank came from). The pass that counts the keys above and in the range
    (``ops.score_candidates``) tells whether it holds; if not, nothing is lost but that pass."""
    n = sample_keys.numel()
    centre = rank_fraction * n
    margin = sigmas * spread + 2.0
    top, bottom = math.floor(centre - margin), math.ceil(centre + margin)  # positions from the top
    wanted = [n - 1 - p for p in (top, bottom) if 0 <= p < n]  # the positions of high and of low
    if sample_keys.is_cuda:
        picked = torch.sort(sample_keys).values[wanted].tolist() if wanted else []
        between = sample_keys
    else:  # two order statistics in one pass, in place (a sort of a 1M sample took 60 ms here)
        values = sample_keys.numpy()
        if wanted:
            values.partition(wanted)
        picked = values[wanted].tolist()
        # Only the elements between the two positions can lie strictly between their keys.
        between = sample_keys[n - bottom if bottom < n else 0: n - 1 - top if top >= 0 else n]
    at = dict(zip(wanted, picked))
    high = INF_KEY if top < 0 else int(at[n - 1 - top]) if top < n else 0
    low = 0 if bottom >= n else int(at[n - 1 - bottom])  # bottom > top: never negative
    # The share strictly inside: the pass keeps those keys; ties at the ends it only counts.
    inside = int(((between > low) & (between < high)).sum())
    return low, high, inside / max(n, 1)


def rank_spread(n: int, rank_fraction: float) -> float:
    """The standard deviation, in positions of an even sample of ``n``, of where the element of
    ``rank_fraction`` (from the top) falls: the binomial spread."""
    return math.sqrt(n * rank_fraction * (1.0 - rank_fraction))


def keys_room(inside: float, samples: int, total: int, max_keys: int) -> int:
    """The keys a candidates pass over ``total`` elements may keep, for a bracket that holds the
    fraction ``inside`` of an even sample of ``samples``: three times those expected (ties at the
    ends add none: they are counted, not kept), and at least the most it likely holds (the
    sample's share plus six of its standard deviations, the bracket's own margin); 0 where even
    that is more than ``max_keys`` (a model of billions: that pass only counts the keys between in
    its bins, and the next keeps the bin that holds the threshold, ``search_ranges``).
    finepurify/search.h keys_room does the same arithmetic (the tests compare them)."""
    n = float(max(samples, 1))
    expected = inside * total
    likely = (inside + 6.0 * math.sqrt(max(inside, 1.0 / n) / n)) * total
    if likely > max_keys:
        return 0
    return min(max_keys, max(1 << 16, math.ceil(3 * expected), math.ceil(likely)))


def kth_largest_key(keys, r: int) -> int:
    """The ``r``-th largest (from 1) of the keys candidates passes kept: one op's, sorted descending
    (read in place), or a list of several ops' (groups, pieces, ranks), each sorted descending,
    selected from their concatenation (torch.sort of 90K keys took 4.7 ms here, kthvalue 0.95)."""
    if isinstance(keys, torch.Tensor):
        return int(keys[r - 1])
    if len(keys) == 1:
        return int(keys[0][r - 1])
    joined = torch.cat(list(keys))
    return int(torch.kthvalue(joined, joined.numel() - r + 1).values)


def threshold_from_candidates(counts: torch.Tensor, keys, low_key: int, high_key: int, k: int) -> float | None:
    """The k-th largest score from one ``ops.score_candidates`` pass over [low_key, high_key]
    (counts summed; the keys strictly inside as ``kth_largest_key`` takes them, None where too
    many), or None where the range missed it or the keys overflowed. From the top: the keys above,
    those equal to high_key, those inside, those equal to low_key."""
    above, at_high, inside, at_low = (int(c) for c in counts[:4])
    if k <= above:
        return None
    if k <= above + at_high:
        return score_of(high_key)
    if k <= above + at_high + inside:
        if keys is None:
            return None
        kept = keys.numel() if isinstance(keys, torch.Tensor) else sum(part.numel() for part in keys)
        return None if kept < inside else score_of(kth_largest_key(keys, k - above - at_high))
    if k <= above + at_high + inside + at_low:
        return score_of(low_key)
    return None


# score_candidates' counts (kCandidateCounts) before its bins of the keys between (kMaxBins).
CANDIDATE_COUNTS = 6
BETWEEN_BINS = 2048


def between_shift(low_key: int, high_key: int) -> int:
    """The width (2^shift consecutive keys from low_key + 1) of score_candidates' bins of the keys
    strictly between low_key and high_key: the narrowest that cover them in ``BETWEEN_BINS``."""
    return max(0, max(high_key - low_key - 2, 0).bit_length() - 11)


def narrower_range(counts, low_key: int, high_key: int, k: int, total: int) -> float | tuple[int, int, int]:
    """Where a ``score_candidates`` pass over [low_key, high_key] that did not give the k-th largest
    score says it is: the score itself where a bin of single keys names it, else the next range
    (low, high) and at most how many keys fall strictly between them. From the top: above the
    range (high_key, +Inf]; in one bin of the keys between (its exact count); or below, [0, low_key)."""
    above, at_high, between, at_low, unrankable = (int(c) for c in counts[:5])
    if k <= above:
        return high_key, INF_KEY, above
    rank = k - above - at_high
    if rank <= 0:
        raise AssertionError("narrower_range: the k-th largest score is high_key itself")
    if rank <= between:
        shift = between_shift(low_key, high_key)
        bins = counts[CANDIDATE_COUNTS:CANDIDATE_COUNTS + BETWEEN_BINS].tolist()
        b = BETWEEN_BINS - 1
        while b > 0 and bins[b] < rank:
            rank -= bins[b]
            b -= 1
        if bins[b] < rank:  # the bins hold fewer keys than the pass counted between: an op's bug
            raise AssertionError(f"narrower_range: the bins of the keys between hold {sum(bins)} keys, the "
                                 f"pass counted {between}")
        first = low_key + 1 + (b << shift)
        if shift == 0:  # a bin of one key: the k-th largest score is that key's
            return score_of(first)
        return first - 1, min(first + (1 << shift), high_key), bins[b]
    below = total - unrankable - above - at_high - between - at_low
    if low_key == 0 or not 0 < rank - between - at_low <= below:
        raise AssertionError("the candidates passes lost elements: their counts do not sum to the total")
    return 0, low_key, below


def search_ranges(first, candidates_of: Callable[[int, int, int], tuple], k: int, total: int,
                  max_keys: int, max_passes: int = 8) -> float:
    """The exact k-th largest score (k from 1) of ``total`` elements from a first ``score_candidates``
    pass ``first`` = (counts, keys or None, low_key, high_key) and, where that pass did not hold it,
    more passes ``candidates_of(low_key, high_key, capacity) -> (counts, keys or None)`` over the
    range its counts name (``narrower_range``), each keeping at most ``max_keys`` keys. A range
    that held the k-th largest but too many keys shrinks 2048-fold a pass: from a sample's bracket,
    two passes at any size; from a bracket that missed, at most three more."""
    counts, keys, low_key, high_key = first
    for _ in range(max_passes):
        found = threshold_from_candidates(counts, keys, low_key, high_key, k)
        if found is not None:
            return found
        step = narrower_range(counts, low_key, high_key, k, total)
        if isinstance(step, float):
            return step
        low_key, high_key, bound = step
        counts, keys = candidates_of(low_key, high_key, min(bound, max_keys))
    raise AssertionError(f"search_ranges: no threshold after {max_passes} passes")


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


class OpLists:
    """One rank's tensors as lists the ops take at once: the local passes ``RankFeed`` sums."""

    def __init__(self, ft, pre, hs, eps: float, ranking_args: tuple):
        self.ft, self.pre, self.hs, self.eps, self.args = ft, pre, hs, float(eps), ranking_args

    def histogram(self, level: int, prefix: int) -> torch.Tensor:
        if not self.ft:
            return torch.zeros(LEVEL_BINS[level] + 2, dtype=torch.int64)
        return _ops.score_histogram.default(self.ft, self.pre, self.hs, self.eps, level, prefix, *self.args).cpu()

    def score_sample(self, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.ft:
            return torch.zeros(0, dtype=torch.int32), torch.zeros(2, dtype=torch.int64)
        return _ops.score_sample.default(self.ft, self.pre, self.hs, self.eps, int(stride), *self.args)

    def candidates(self, low_key: int, high_key: int, capacity: int):
        if not self.ft:
            return torch.zeros(CANDIDATE_COUNTS + BETWEEN_BINS, dtype=torch.int64), torch.zeros(0, dtype=torch.int32)
        counts, keys = _ops.score_candidates.default(self.ft, self.pre, self.hs, self.eps, int(low_key),
                                                     int(high_key), int(capacity), *self.args)
        counts = counts.cpu()
        return counts, keys[:int(counts[2])] if int(counts[2]) <= capacity else None

    def refuse_unrankable(self, count: int):
        """Some rank's scores are NaN or Inf: the op over this rank's elements names the culprit if
        it is here; every rank raises."""
        if sum(t.numel() for t in self.ft):  # this rank holds elements (not only empty shards)
            _ops.score_threshold.default(self.ft, self.pre, self.hs, 1, self.eps, *self.args, search="histograms")
        raise ValueError(f"{count} scores are NaN or Inf (or a hessian is negative); "
                         "check the inputs for NaN/Inf and the hessians for negative values")


class RankFeed:
    """The elements of every rank of ``group`` as a search's passes read them, each rank's from its
    ``local`` feed (``OpLists``, or purify's ``Feed`` of groups): a histogram's counts summed with
    an ``all_reduce``; a candidates pass's counts gathered (every rank sums them and knows how many
    keys each keeps) and then its keys; the sample gathered, each rank's padded to a bound every
    rank knows. ``joined`` makes one with the first collective: every rank's element and tensor
    counts, and whether some rank's device lacks the candidates kernel. Every rank raises where
    some rank's scores cannot be ranked (``local.refuse_unrankable``)."""

    def __init__(self, local, device, group, rank: int, sizes: list[tuple[int, int]]):
        self.local, self.device, self.group, self.rank, self.sizes = local, device, group, rank, sizes
        self.total = sum(numel for numel, _ in sizes)

    @classmethod
    def joined(cls, local, numel: int, tensors: int, elsewhere: bool, device, group) -> tuple["RankFeed", bool]:
        """(the feed, whether some rank's tensors sit on a device outside ``CANDIDATES_ON``, as this
        rank's do where ``elsewhere``); ``device``: where this rank's tensors live."""
        import torch.distributed as dist

        if dist.get_backend(group) == "nccl" and device.type != "cuda":  # nccl reduces CUDA tensors only
            device = torch.device("cuda", torch.cuda.current_device())
        mine = torch.tensor([numel, tensors, int(elsewhere)], dtype=torch.int64)
        ranks = [r.tolist() for r in gathered_padded(mine, 3, device, group)]
        feed = cls(local, device, group, dist.get_rank(group), [(r[0], r[1]) for r in ranks])
        return feed, any(r[2] for r in ranks)

    def histogram(self, level: int, prefix: int) -> torch.Tensor:
        import torch.distributed as dist

        counts = self.local.histogram(level, prefix).to(self.device)
        dist.all_reduce(counts, group=self.group)
        counts = counts.cpu()
        if counts[LEVEL_BINS[level]] > 0:
            self.local.refuse_unrankable(int(counts[LEVEL_BINS[level]]))
        return counts

    histogram_on_device = histogram  # purify_'s first pass: read at once (the ranks summed it)

    def score_sample(self, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's ``score_sample`` keys, in rank order, and their counts {unrankable, unmoved}
        summed (the same on every rank)."""
        keys, counts = self.local.score_sample(stride)
        # At most a run per stride of each rank's elements and a head of each tensor shorter than one.
        bounds = [numel * SAMPLE_RUN // stride + tensors for numel, tensors in self.sizes]
        kept = torch.tensor([min(keys.numel(), bounds[self.rank]), *counts.tolist()], device=self.device)
        parts = self._gathered_parts(keys, bounds)
        ranks = self._gathered(kept, 3)
        counts = torch.stack(ranks)[:, 1:].sum(0)
        return torch.cat([part[:int(r[0])] for part, r in zip(parts, ranks)]), counts

    def sample(self, stride: int) -> torch.Tensor:
        """The rankable keys of every rank's ``score_sample``."""
        keys, _ = self.score_sample(stride)
        return keys[keys >= 0]  # unrankable ones: the pass finds and names them

    def candidates(self, low_key: int, high_key: int, capacity: int):
        """One ``score_candidates`` pass over every rank: the counts summed, and every rank's keys
        strictly inside (None where more than ``capacity`` are, over all ranks): each rank's sorted
        descending where they came from one op, else in no order (``kth_largest_key`` takes both)."""
        # No rank keeps more keys than it holds elements (the op fills its room with -1).
        counts, keys = self.local.candidates(low_key, high_key, min(int(capacity), self.sizes[self.rank][0]))
        per_rank = self._gathered(counts, counts.numel())
        counts = torch.stack(per_rank).sum(0)
        if counts[4] > 0:
            self.local.refuse_unrankable(int(counts[4]))
        if int(counts[2]) > capacity:  # every rank sees the sum: none gathers
            return counts, None
        if len(self.sizes) == 1:  # one rank: its own parts (sorted) as they are
            return counts, keys
        kept = [int(c[2]) for c in per_rank]  # every rank's keys inside, all kept (their sum fits)
        if max(kept) == 0:
            return counts, []
        mine = keys if isinstance(keys, torch.Tensor) else torch.cat(list(keys)) if keys else torch.zeros(0, dtype=torch.int32)
        return counts, self._gathered_parts(mine[:kept[self.rank]], kept)

    def _gathered_parts(self, values: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
        """Every rank's int32 ``values``, rank r's cut or padded with -1 to ``lengths[r]`` (known to
        every rank), in rank order, on the CPU: one gather padded to the longest where that at most
        doubles what is sent; else (a few ranks hold most: the padding would be world x theirs on
        every rank) a broadcast from each rank that has any."""
        import torch.distributed as dist

        if len(lengths) * max(lengths) <= 2 * sum(lengths):
            return [part[:n] for part, n in zip(self._gathered(values, max(lengths)), lengths)]
        parts = []
        for r, n in enumerate(lengths):
            part = torch.full((n,), -1, dtype=torch.int32, device=self.device)
            if r == self.rank:
                part[:min(n, values.numel())] = values[:n].to(self.device)
            if n:
                # by global rank: group_src= is torch >= 2.6's, and pyproject allows 2.4
                src = r if self.group is None else dist.get_global_rank(self.group, r)
                dist.broadcast(part, src=src, group=self.group)
            parts.append(part.cpu())
        return parts

    def _gathered(self, values: torch.Tensor, length: int) -> list[torch.Tensor]:
        """Every rank's ``values`` (cut or padded with -1 to ``length``), in rank order, on the CPU."""
        return gathered_padded(values, length, self.device, self.group, fill=-1)


def gathered_padded(values: torch.Tensor, length: int, device, group, fill=0) -> list[torch.Tensor]:
    """Every rank of ``group``'s 1-D ``values``, each cut or padded with ``fill`` to ``length`` (one
    ``all_gather`` on ``device``, whose backend takes it), in rank order, on the CPU."""
    import torch.distributed as dist

    padded = torch.full((length,), fill, dtype=values.dtype, device=device)
    n = min(values.numel(), length)
    padded[:n] = values[:n].to(device)
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, padded, group=group)
    return [part.cpu() for part in parts]


SEARCHES = ("auto", "sample", "histograms")


def piece_room(capacity: int, piece: int, total: int) -> int:
    """The keys a candidates pass over ``total`` weights with room for ``capacity`` first gives a
    piece (a checkpoint's, a Feed's group) of ``piece`` weights: four times its share. The op fills
    all of its room (and on a GPU sorts it): room for every weight of each 8M-weight piece (32 MB of
    page faults) made the pass take twice as long."""
    return max(1 << 16, 4 * capacity * piece // max(total, 1))


def distributed_score_threshold(
    finetuned: Sequence[torch.Tensor],
    pretrained: Sequence[torch.Tensor],
    hessians: Sequence[torch.Tensor],
    k: int,
    eps: float,
    group=None,
    replicated: bool = False,
    ranking=None,
    search: str = "auto",
) -> float:
    """``ops.score_threshold`` over the elements of every rank of ``group`` (default: the world).

    Plain tensors: each rank passes different elements (its shard of the model), or, with
    ``replicated=True``, every rank passes the same ones (DDP) and they are counted once. DTensors (FSDP2,
    tensor parallel) are read by their placements: a sharded dimension counts each rank's shard, a
    replicated one counts once, so replicated parameters are never counted twice. ``k`` counts over
    all ranks. Every rank gets the same threshold, the one a single process gets over all elements.

    ``search`` as ``ops.score_threshold``'s, the same search as in one process: "auto" takes the
    sample's from ``CANDIDATES_MIN_WEIGHTS`` elements over all ranks where every rank's tensors sit
    on a device of ``CANDIDATES_ON``. From a sample: every rank's sample gathered (up to 16 MB in
    all), then one pass (usually) that gathers every rank's 2054 counts and then the keys inside
    the bracket (at most ``CANDIDATE_KEYS`` in all): three collectives. Histograms: one
    ``all_reduce`` of a histogram of at most 2050 bins per pass, three passes. Either way one
    gather of the ranks' sizes first."""
    import torch.distributed as dist

    if search not in SEARCHES:
        raise ValueError(f"search={search!r} is not one of {', '.join(SEARCHES)}")
    lists = [list(finetuned), list(pretrained), list(hessians)]
    rank = dist.get_rank(group)
    keep = [i for i, t in enumerate(lists[0])
            if (_counts_here(t) if _is_dtensor(t) else (rank == 0 or not replicated))]
    ft, pre, hs = ([_local(ts[i]) for i in keep] for ts in lists)
    device = ft[0].device if ft else torch.device("cpu")
    args = ranking.subset(keep).args() if ranking is not None else ()  # the tensors that count here
    feed, elsewhere = RankFeed.joined(OpLists(ft, pre, hs, eps, args), sum(t.numel() for t in ft), len(ft),
                                      any(t.device.type not in CANDIDATES_ON for t in ft), device, group)
    total, k = feed.total, int(k)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} is out of range: the tensors hold {total} elements, so k must be in [1, {total}]")

    if search == "sample" or (search == "auto" and total >= CANDIDATES_MIN_WEIGHTS and not elsewhere):
        sample = feed.sample(sample_stride(total, sample_budget(total)))
        if sample.numel():
            rank_fraction = k / total
            low, high, inside = bracket_from_sample(sample, rank_fraction, rank_spread(sample.numel(), rank_fraction))
            counts, keys = feed.candidates(low, high, keys_room(inside, sample.numel(), total, CANDIDATE_KEYS))
            return search_ranges((counts, keys, low, high), feed.candidates, k, total, CANDIDATE_KEYS)
    return threshold_from_histograms(feed.histogram, k, total)


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
