"""Where the work runs: the ``--device`` and ``--dtype`` options of every command.

The model, its Hessians and every batch live on the chosen device; the pre-trained state is read
where it was loaded (the CPU) and moved a group of tensors at a time by ``purify_``. ``--dtype
bfloat16`` computes the forward and backward passes (Hessian estimation, clean fine-tuning,
evaluation) in bfloat16 under autocast while the weights, the optimizer and the Hessian stay in
float32: mixed precision, so purification and fine-tuning see the same weights as in float32.
"""
from __future__ import annotations

import contextlib

import torch

from .errors import UserError

DTYPES = ("float32", "bfloat16")
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError  # torch < 2.5: cuda's


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str | None = None) -> torch.device:
    """``name`` (``cpu``, ``cuda``, ``cuda:1``; None: CUDA when available) as a usable device, or a
    UserError saying why not and what to give instead."""
    name = name or default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; give cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is visible (torch.cuda.is_available() is False, "
                            f"torch {torch.__version__}); give --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type != "cpu":
        raise UserError(f"--device {name}: only cpu and cuda devices are supported")
    return device


def read_only_weights_dtype(device: torch.device, stored: torch.dtype) -> torch.dtype:
    """The dtype a command that never updates the weights (``hessian``, ``evaluate``) loads a model
    stored in ``stored`` in: on a GPU as stored, where a 7B bfloat16 model's weights, gradients and
    float32 Hessian fit one 80 GB card (56 GB; float32 weights would need 84), except float16, whose
    gradients underflow without loss scaling: bfloat16 (the same memory); float32 on the CPU,
    whose bfloat16 matrix products are slow. ``purify`` fine-tunes, so it always loads float32."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if stored == torch.float16 else stored


def compute_precision(device: torch.device, dtype: str = "float32"):
    """The context the passes run in: autocast to bfloat16 for ``dtype="bfloat16"``, else nothing."""
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: give one of {', '.join(DTYPES)}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def describe(device: torch.device, dtype: str) -> dict:
    """Where a run ran, for its report."""
    return {"device": str(device), "dtype": dtype,
            "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"}
