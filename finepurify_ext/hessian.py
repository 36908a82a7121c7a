"""Step 2 of the method: the diagonal Hessian of the clean loss at the suspect weights, estimated as
the mean of squared gradients (the diagonal empirical Fisher), accumulated with the fused
``accumulate_sq_grads_`` op after each backward pass."""
from __future__ import annotations

from typing import Iterable

import torch
from tqdm.auto import tqdm

from . import ops


def _micro_batches(batch: dict[str, torch.Tensor]):
    """A batch split into batches of one example (per-sample squared gradients)."""
    size = len(batch["labels"])
    for i in range(size):
        yield {name: value[i : i + 1] for name, value in batch.items()}


def estimate_hessian(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    per_sample: bool = False,
    progress: bool = True,
    total: int | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Returns ({parameter name: float32 diagonal Hessian}, number of squared gradients averaged).

    Per mini-batch by default (the squared gradient of each batch's mean loss); ``per_sample``
    squares each example's gradient instead (costlier, nearly the same ranking). Dropout is off
    (eval mode) while estimating; the model's mode and its gradients are restored afterwards.
    Parameters the loss never reaches keep a Hessian of exactly zero.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    hessians = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    was_training = model.training
    saved_grads = {name: p.grad for name, p in params.items()}
    model.eval()
    model.zero_grad(set_to_none=True)
    count = 0
    device = next(iter(params.values())).device if params else torch.device("cpu")
    try:
        for batch in tqdm(batches, desc="hessian", total=total, disable=not progress, leave=False):
            for micro in (_micro_batches(batch) if per_sample else (batch,)):
                loss = model(**{k: v.to(device) for k, v in micro.items()}).loss
                loss.backward()
                reached = [name for name, p in params.items() if p.grad is not None]
                ops.accumulate_sq_grads_(
                    [hessians[n] for n in reached], [params[n].grad for n in reached], zero_grads=True
                )
                count += 1
    finally:
        for name, p in params.items():
            p.grad = saved_grads[name]
        model.train(was_training)
    if count == 0:
        raise ValueError("estimate_hessian: the clean data gave no batches; it must hold at least one example")
    torch._foreach_mul_(list(hessians.values()), 1.0 / count)
    return hessians, count
