"""Public wrappers over the ``torch.ops.finepurify`` kernels, and their fake implementations.

Shapes and dtypes, for lists of same-shape triples:
  finetuned[i], pretrained[i]: float32, bfloat16 or float16 (a pair shares one dtype)
  hessians[i]: float32
  score = (float32(finetuned) - float32(pretrained))^2 / (hessian + eps), eps > 0.

The fakes let ``torch.compile`` trace the ops; they check what the output shapes depend on and
that all tensors share a device.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import _C  # noqa: F401  (registers torch.ops.finepurify)
from .reference import num_reset_for  # noqa: F401  (the counting rule, shared with the oracle)

_ops = torch.ops.finepurify

# Bins per level of the threshold search (csrc/kernels/score_math.h: 11, 10, 10 bits).
_LEVEL_BINS = (2048, 1024, 1024)


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
    finetuned: torch.Tensor, pretrained: torch.Tensor, hessian: torch.Tensor, eps: float
) -> torch.Tensor:
    """float32 ``(finetuned - pretrained)**2 / (hessian + eps)``, the drift taken in float32."""
    return _ops.drift_score.default(finetuned, pretrained, hessian, float(eps))


def score_threshold(
    finetuned: Sequence[torch.Tensor],
    pretrained: Sequence[torch.Tensor],
    hessians: Sequence[torch.Tensor],
    k: int,
    eps: float,
    *,
    group=None,
    replicated: bool = False,
) -> float:
    """The exact k-th largest score (k from 1) over all elements of all tensors.

    Found with three histogram passes over the float bits of the scores; no score vector is
    materialised. Raises if any input holds NaN or Inf (or a hessian is negative), naming it.
    With a process ``group`` the elements of all its ranks count, their histograms summed with one
    ``all_reduce`` per pass (see ``threshold.distributed_score_threshold``; DTensors are read by
    their placements, plain tensors are each rank's shard unless ``replicated``).
    """
    if group is not None:
        from .threshold import distributed_score_threshold

        return distributed_score_threshold(finetuned, pretrained, hessians, k, eps, group=group,
                                           replicated=replicated)
    threshold = _ops.score_threshold.default(
        list(finetuned), list(pretrained), list(hessians), int(k), float(eps)
    )
    return threshold.item()


def masked_reset_(
    finetuned: Sequence[torch.Tensor],
    pretrained: Sequence[torch.Tensor],
    hessians: Sequence[torch.Tensor],
    threshold: float | torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """In place: every element of ``finetuned`` whose score is ``>= threshold`` takes its
    pre-trained value. Returns the int64 count of reset elements per tensor."""
    finetuned, pretrained, hessians = list(finetuned), list(pretrained), list(hessians)
    if not (finetuned or pretrained or hessians):
        return torch.zeros(0, dtype=torch.int64)
    with torch.no_grad():
        return _ops.masked_reset_.default(finetuned, pretrained, hessians, float(threshold), float(eps))


def reset_most_abnormal_(
    finetuned: Sequence[torch.Tensor],
    pretrained: Sequence[torch.Tensor],
    hessians: Sequence[torch.Tensor],
    reserve_ratio: float | None,
    eps: float,
    *,
    num_reset: int | None = None,
) -> torch.Tensor:
    """Keeps the ``round(reserve_ratio * N)`` smallest scores at their fine-tuned values and
    resets the rest to the pre-trained values (ties at the threshold are all reset). Alternatively
    ``num_reset`` gives the number to reset. Returns int64 per-tensor counts of reset elements."""
    finetuned, pretrained, hessians = list(finetuned), list(pretrained), list(hessians)
    if (reserve_ratio is None) == (num_reset is None):
        raise ValueError("reset_most_abnormal_: give exactly one of reserve_ratio and num_reset")
    with torch.no_grad():
        if num_reset is None:
            return _ops.reset_most_abnormal_.default(
                finetuned, pretrained, hessians, float(reserve_ratio), float(eps)
            )
        total = sum(t.numel() for t in finetuned)
        if not 0 <= num_reset <= total:
            raise ValueError(
                f"reset_most_abnormal_: num_reset={num_reset} is out of range [0, {total}]"
            )
        if num_reset == 0:
            device = finetuned[0].device if finetuned else "cpu"
            return torch.zeros(len(finetuned), dtype=torch.int64, device=device)
        threshold = score_threshold(finetuned, pretrained, hessians, num_reset, eps)
        return masked_reset_(finetuned, pretrained, hessians, threshold, eps)


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
            if t.shape != lists[next(iter(lists))][i].shape:
                raise RuntimeError(f"finepurify.{op}: {name}[{i}] has shape {list(t.shape)}")
    return first.device if first is not None else torch.device("cpu")


@torch.library.register_fake("finepurify::accumulate_sq_grads_")
def _(hessians, grads, scale=1.0, zero_grads=False):
    _fake_check_lists("accumulate_sq_grads_", hessians=hessians, grads=grads)


@torch.library.register_fake("finepurify::drift_score")
def _(finetuned, pretrained, hessian, eps):
    _fake_check_lists("drift_score", finetuned=[finetuned], pretrained=[pretrained], hessians=[hessian])
    return finetuned.new_empty(finetuned.shape, dtype=torch.float32)


@torch.library.register_fake("finepurify::score_histogram")
def _(finetuned, pretrained, hessians, eps, level, prefix):
    device = _fake_check_lists(
        "score_histogram", finetuned=finetuned, pretrained=pretrained, hessians=hessians
    )
    return torch.empty(_LEVEL_BINS[level] + 1, dtype=torch.int64, device=device)


@torch.library.register_fake("finepurify::score_threshold")
def _(finetuned, pretrained, hessians, k, eps):
    device = _fake_check_lists(
        "score_threshold", finetuned=finetuned, pretrained=pretrained, hessians=hessians
    )
    return torch.empty((), dtype=torch.float32, device=device)


@torch.library.register_fake("finepurify::masked_reset_")
def _(finetuned, pretrained, hessians, threshold, eps):
    device = _fake_check_lists(
        "masked_reset_", finetuned=finetuned, pretrained=pretrained, hessians=hessians
    )
    return torch.empty(len(finetuned), dtype=torch.int64, device=device)


@torch.library.register_fake("finepurify::reset_most_abnormal_")
def _(finetuned, pretrained, hessians, reserve_ratio, eps):
    device = _fake_check_lists(
        "reset_most_abnormal_", finetuned=finetuned, pretrained=pretrained, hessians=hessians
    )
    return torch.empty(len(finetuned), dtype=torch.int64, device=device)
