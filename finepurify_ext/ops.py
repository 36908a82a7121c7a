"""Public wrappers over the ``torch.ops.finepurify`` kernels, and their fake implementations.

Shapes and dtypes, for lists of same-shape triples:
  finetuned[i], pretrained[i]: float32, bfloat16 or float16 (a pair shares one dtype)
  hessians[i]: float32, of the same shape or of one element (one curvature for the whole tensor)
  score = (float32(finetuned) - float32(pretrained))^2 / (max(hessian, floor) + eps), eps > 0,
  or, for the random ranking (Fine-mixing), a counter-based random score per moved weight.

How the ops rank is one ``Ranking`` (csrc/kernels/score_math.h, ScoreSpec): every ranking of
``purify`` is a Ranking and a choice of hessian tensors, never a score tensor.

The fakes let ``torch.compile`` trace the ops; they check what the output shapes depend on and
that all tensors share a device.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch

from . import _C  # noqa: F401  (registers torch.ops.finepurify)
from .reference import num_reset_for  # noqa: F401  (the counting rule, shared with the oracle)
from .threshold import (BETWEEN_BINS, CANDIDATE_COUNTS, LEVEL_BINS, SAMPLE_RUN,  # noqa: F401 (SAMPLE_RUN: part of this API)
                        distributed_score_threshold)

_ops = torch.ops.finepurify


@dataclass(frozen=True)
class Ranking:
    """How the score ops rank, beyond eps.

    hessian_floor: the Hessian is taken as max(H, floor).
    random_seed: >= 0 ranks by a random score per moved weight (Fine-mixing's random mask; weights
      that never moved score 0), drawn from a counter-based generator: no score tensor, and the
      same values on CPU, CUDA, out of core and across ranks.
    random_keys: one stable key per tensor (``tensor_key(name)``), so a tensor draws the same
      values whatever list it is passed in; default: list positions.
    random_offsets: per tensor, the index of its first element in the whole tensor it is a piece of.
    """
    hessian_floor: float = 0.0
    random_seed: int = -1
    random_keys: tuple[int, ...] = ()
    random_offsets: tuple[int, ...] = ()

    def args(self) -> tuple:
        return (float(self.hessian_floor), int(self.random_seed), list(self.random_keys), list(self.random_offsets))

    def subset(self, indices) -> "Ranking":
        """This ranking for the tensors at ``indices`` of its lists, passed alone (their keys and offsets)."""
        if not (self.random_keys or self.random_offsets):
            return self
        return Ranking(self.hessian_floor, self.random_seed,
                       tuple(self.random_keys[i] for i in indices) if self.random_keys else (),
                       tuple(self.random_offsets[i] for i in indices) if self.random_offsets else ())


PLAIN = Ranking()


def tensor_key(name: str) -> int:
    """A stable 63-bit key of a parameter name (random_keys)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1


def accumulate_sq_grads_(
    hessians: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    scale: float = 1.0,
    zero_grads: bool = False,
) -> None:
    """``hessians[i] += scale * grads[i]**2`` for every pair, in one multi-tensor pass.

    hessians: float32; grads: float32, bfloat16 or float16, same shapes. With ``zero_grads`` the
    gradients are zeroed in the same pass (saves ``optimizer.zero_grad``'s extra pass).
    """
    hessians, grads = list(hessians), list(grads)
    if not hessians and not grads:
        return
    with torch.no_grad():
        _ops.accumulate_sq_grads_.default(hessians, grads, float(scale), bool(zero_grads))


def drift_score(
    finetuned: torch.Tensor, pretrained: torch.Tensor, hessian: torch.Tensor, eps: float,
    *, hessian_floor: float = 0.0, random_seed: int = -1, random_key: int = 0,
) -> torch.Tensor:
    """float32 scores of one tensor: ``(finetuned - pretrained)**2 / (max(hessian, floor) + eps)``,
    the drift taken in float32, or the random ranking's scores (``Ranking``)."""
    return _ops.drift_score.default(finetuned, pretrained, hessian, float(eps), float(hessian_floor),
                                    int(random_seed), int(random_key))


def drift_scores(
    finetuned: Sequence[torch.Tensor],
    pretrained: Sequence[torch.Tensor],
    hessians: Sequence[torch.Tensor],
    eps: float,
    *,
    ranking: Ranking = PLAIN,
) -> list[torch.Tensor]:
    """``drift_score`` of every tensor in one pass (on a GPU one launch per 64 tensors of a dtype,
    where a call per tensor pays the host's cost per tensor). Returns one float32 tensor per input, each of
    its tensor's shape: views into one vector of all the scores, which lives while any of them does."""
    finetuned, pretrained, hessians = list(finetuned), list(pretrained), list(hessians)
    if not (finetuned or pretrained or hessians):
        return []
    flat = _ops.drift_scores.default(finetuned, pretrained, hessians, float(eps), *ranking.args())
    return [piece.view(f.shape) for piece, f in zip(flat.split([f.numel() for f in finetuned]), finetuned)]


def score_histogram(finetuned, pretrained, hessians, eps: float, level: int, prefix: int,
                    ranking: Ranking = PLAIN) -> torch.Tensor:
    """int64 counts of one pass of the threshold search: ``LEVEL_BINS[level]`` bins of the scores'
    digit ``level`` among those whose higher digits equal ``prefix``, then the number of
    unrankable scores, then the number of weights that never moved."""
    return _ops.score_histogram.default(list(finetuned), list(pretrained), list(hessians), float(eps),
                                        int(level), int(prefix), *ranking.args())


def score_candidates(finetuned, pretrained, hessians, eps: float, low_key: int, high_key: int, capacity: int,
                     ranking: Ranking = PLAIN) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass that brackets the threshold between two score keys (a score's float32 bits, as the
    histograms rank them). Returns int64 counts {keys above high_key, equal to high_key, strictly
    between, equal to low_key (below high_key), unrankable scores, weights that never moved}
    followed by the keys between counted in 2048 bins of 2^shift consecutive keys from low_key + 1
    (``threshold.between_shift``), and ``capacity`` int32 keys: those strictly between, sorted
    descending, then -1 (all -1 when more than ``capacity`` are between). Ties at the ends are
    counted, not kept (a Hessian floor ties many scores). Where the k-th largest key falls in the
    range, it is read from these: the threshold in one pass instead of three; where too many fell
    between, the bins name the narrower range the next pass keeps (``threshold.search_ranges``)."""
    return _ops.score_candidates.default(list(finetuned), list(pretrained), list(hessians), float(eps), int(low_key),
                                         int(high_key), int(capacity), *ranking.args())


def float64_sums(tensors) -> torch.Tensor:
    """The float64 sum of each float32 CPU tensor, one multi-threaded pass at memory speed, in an
    order fixed by each tensor's 64K-element chunks (the same bits whatever the thread count):
    the no-Hessian ranking's means, in memory and out of core."""
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return _ops.float64_sums.default(tensors)


def sample_size(numel: int, stride: int) -> int:
    """How many elements ``score_sample`` takes of a tensor of ``numel``: a run of ``SAMPLE_RUN``
    at every multiple of ``stride`` that starts a whole stride, or a tensor's proportional head
    (at least one element) where it is shorter than one stride."""
    if numel <= 0:
        return 0
    return (numel // stride) * SAMPLE_RUN if numel >= stride else max(1, numel * SAMPLE_RUN // stride)


def score_sample(finetuned, pretrained, hessians, eps: float, stride: int,
                 ranking: Ranking = PLAIN) -> tuple[torch.Tensor, torch.Tensor]:
    """The score keys of an even sample of every tensor in one pass (``sample_size`` elements of
    each, tensor after tensor): int32 keys (a score's float32 bits; unrankable ones negative) and
    int64 counts {unrankable, unmoved} among them. What brackets the threshold for
    ``score_candidates``, at the host cost of one op however many tensors."""
    finetuned, pretrained, hessians = list(finetuned), list(pretrained), list(hessians)
    if not (finetuned or pretrained or hessians):  # no tensor to dispatch on
        return torch.zeros(0, dtype=torch.int32), torch.zeros(2, dtype=torch.int64)
    return _ops.score_sample.default(finetuned, pretrained, hessians, float(eps), int(stride), *ranking.args())


def score_threshold(
    finetuned: Sequence[torch.Tensor],
    pretrained: Sequence[torch.Tensor],
    hessians: Sequence[torch.Tensor],
    k: int,
    eps: float,
    *,
    ranking: Ranking = PLAIN,
    group=None,
    replicated: bool = False,
    search: str = "auto",
) -> float:
    """The exact k-th largest score (k from 1) over all elements of all tensors.

    ``search="auto"``: on the CPU from 1M weights from a sample's bracket and ``score_candidates``
    passes (usually one), else with three histogram passes over the float bits of the scores;
    ``"sample"`` or ``"histograms"`` asks for one (the same bits either way). No score vector is
    materialised. Raises if any input holds NaN or Inf (or a hessian is negative), naming it.
    With a process ``group`` the elements of all its ranks count, by the same search, each pass's
    counts summed with one ``all_reduce`` (see ``threshold.distributed_score_threshold``; DTensors
    are read by their placements, plain tensors are each rank's shard unless ``replicated``).
    """
    if group is not None:
        return distributed_score_threshold(finetuned, pretrained, hessians, k, eps, group=group,
                                           replicated=replicated, ranking=ranking, search=search)
    threshold = _ops.score_threshold.default(
        list(finetuned), list(pretrained), list(hessians), int(k), float(eps), *ranking.args(), search=search
    )
    return threshold.item()


def masked_reset_(
    finetuned: Sequence[torch.Tensor],
    pretrained: Sequence[torch.Tensor],
    hessians: Sequence[torch.Tensor],
    threshold: float | torch.Tensor,
    eps: float,
    *,
    ranking: Ranking = PLAIN,
) -> torch.Tensor:
    """In place: every element of ``finetuned`` whose score is ``>= threshold`` takes its
    pre-trained value. Returns the int64 count of reset elements per tensor. Tensors that share
    memory (one listed twice, overlapping views) are refused: they would be written concurrently."""
    finetuned, pretrained, hessians = list(finetuned), list(pretrained), list(hessians)
    if not (finetuned or pretrained or hessians):
        return torch.zeros(0, dtype=torch.int64)
    with torch.no_grad():
        return _ops.masked_reset_.default(finetuned, pretrained, hessians, float(threshold), float(eps),
                                          *ranking.args())


def reset_most_abnormal_(
    finetuned: Sequence[torch.Tensor],
    pretrained: Sequence[torch.Tensor],
    hessians: Sequence[torch.Tensor],
    reserve_ratio: float | None,
    eps: float,
    *,
    num_reset: int | None = None,
    ranking: Ranking = PLAIN,
    count_moved_only: bool = False,
    search: str = "auto",
) -> torch.Tensor:
    """Keeps the ``round(reserve_ratio * N)`` smallest scores at their fine-tuned values and
    resets the rest to the pre-trained values (ties at the threshold are all reset); N counts every
    element or, with ``count_moved_only``, those that moved. Alternatively ``num_reset`` gives the
    number to reset. ``search`` as ``score_threshold``'s. Returns int64 per-tensor counts of reset
    elements."""
    finetuned, pretrained, hessians = list(finetuned), list(pretrained), list(hessians)
    if (reserve_ratio is None) == (num_reset is None):
        raise ValueError("reset_most_abnormal_: give exactly one of reserve_ratio and num_reset")
    with torch.no_grad():
        if num_reset is None:
            return _ops.reset_most_abnormal_.default(
                finetuned, pretrained, hessians, float(reserve_ratio), float(eps), *ranking.args(),
                bool(count_moved_only), search=search
            )
        total = sum(t.numel() for t in finetuned)
        if not 0 <= num_reset <= total:
            raise ValueError(
                f"reset_most_abnormal_: num_reset={num_reset} is out of range [0, {total}]"
            )
        if num_reset == 0:
            device = finetuned[0].device if finetuned else "cpu"
            return torch.zeros(len(finetuned), dtype=torch.int64, device=device)
        threshold = score_threshold(finetuned, pretrained, hessians, num_reset, eps, ranking=ranking, search=search)
        return masked_reset_(finetuned, pretrained, hessians, threshold, eps, ranking=ranking)


# ----------------------------------------------------------------------------- fake kernels


def _fake_check_lists(op, **lists):
    lengths = {name: len(ts) for name, ts in lists.items()}
    if len(set(lengths.values())) > 1:
        raise RuntimeError(f"finepurify.{op}: list lengths differ: {lengths}")
    first = next((ts[0] for ts in lists.values() if ts), None)
    for name, ts in lists.items():
        for i, t in enumerate(ts):
            if t.device != first.device:
                raise RuntimeError(
                    f"finepurify.{op}: {name}[{i}] is on {t.device} but the first tensor is on "
                    f"{first.device}; move all tensors to one device"
                )
            if t.shape != lists[next(iter(lists))][i].shape and not (name == "hessians" and t.numel() == 1):
                raise RuntimeError(f"finepurify.{op}: {name}[{i}] has shape {list(t.shape)}")
    return first.device if first is not None else torch.device("cpu")


@torch.library.register_fake("finepurify::accumulate_sq_grads_")
def _(hessians, grads, scale=1.0, zero_grads=False):
    _fake_check_lists("accumulate_sq_grads_", hessians=hessians, grads=grads)


@torch.library.register_fake("finepurify::drift_score")
def _(finetuned, pretrained, hessian, eps, hessian_floor=0.0, random_seed=-1, random_key=0):
    _fake_check_lists("drift_score", finetuned=[finetuned], pretrained=[pretrained], hessians=[hessian])
    return finetuned.new_empty(finetuned.shape, dtype=torch.float32)


@torch.library.register_fake("finepurify::drift_scores")
def _(finetuned, pretrained, hessians, eps, hessian_floor=0.0, random_seed=-1, random_keys=(), random_offsets=()):
    device = _fake_check_lists("drift_scores", finetuned=finetuned, pretrained=pretrained, hessians=hessians)
    return torch.empty(sum(f.numel() for f in finetuned), dtype=torch.float32, device=device)


@torch.library.register_fake("finepurify::score_histogram")
def _(finetuned, pretrained, hessians, eps, level, prefix, hessian_floor=0.0, random_seed=-1, random_keys=(),
      random_offsets=()):
    device = _fake_check_lists(
        "score_histogram", finetuned=finetuned, pretrained=pretrained, hessians=hessians
    )
    return torch.empty(LEVEL_BINS[level] + 2, dtype=torch.int64, device=device)


@torch.library.register_fake("finepurify::score_candidates")
def _(finetuned, pretrained, hessians, eps, low_key, high_key, capacity, hessian_floor=0.0, random_seed=-1,
      random_keys=(), random_offsets=()):
    device = _fake_check_lists(
        "score_candidates", finetuned=finetuned, pretrained=pretrained, hessians=hessians
    )
    return (torch.empty(CANDIDATE_COUNTS + BETWEEN_BINS, dtype=torch.int64, device=device),
            torch.empty(capacity, dtype=torch.int32, device=device))


@torch.library.register_fake("finepurify::float64_sums")
def _(tensors):
    return torch.empty(len(tensors), dtype=torch.float64)


@torch.library.register_fake("finepurify::score_sample")
def _(finetuned, pretrained, hessians, eps, stride, hessian_floor=0.0, random_seed=-1, random_keys=(),
      random_offsets=()):
    device = _fake_check_lists("score_sample", finetuned=finetuned, pretrained=pretrained, hessians=hessians)
    size = sum(sample_size(f.numel(), stride) for f in finetuned)
    return torch.empty(size, dtype=torch.int32, device=device), torch.empty(2, dtype=torch.int64, device=device)


@torch.library.register_fake("finepurify::score_threshold")
def _(finetuned, pretrained, hessians, k, eps, hessian_floor=0.0, random_seed=-1, random_keys=(), random_offsets=(),
      search="auto"):
    device = _fake_check_lists(
        "score_threshold", finetuned=finetuned, pretrained=pretrained, hessians=hessians
    )
    return torch.empty((), dtype=torch.float32, device=device)


@torch.library.register_fake("finepurify::masked_reset_")
def _(finetuned, pretrained, hessians, threshold, eps, hessian_floor=0.0, random_seed=-1, random_keys=(),
      random_offsets=()):
    device = _fake_check_lists(
        "masked_reset_", finetuned=finetuned, pretrained=pretrained, hessians=hessians
    )
    return torch.empty(len(finetuned), dtype=torch.int64, device=device)


@torch.library.register_fake("finepurify::reset_most_abnormal_")
def _(finetuned, pretrained, hessians, reserve_ratio, eps, hessian_floor=0.0, random_seed=-1, random_keys=(),
      random_offsets=(), count_moved_only=False, search="auto"):
    device = _fake_check_lists(
        "reset_most_abnormal_", finetuned=finetuned, pretrained=pretrained, hessians=hessians
    )
    return torch.empty(len(finetuned), dtype=torch.int64, device=device)
