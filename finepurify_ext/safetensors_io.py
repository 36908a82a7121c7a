"""Writing safetensors files as a stream: the header first (every name, dtype and shape is known in
advance), then each tensor's bytes as they come, so a file is never held in memory whole. Shared by
the out-of-core path (its shards) and the Hessian files (``hessian.save_hessian``)."""
from __future__ import annotations

import json
import os
import struct

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
CODES = {v: k for k, v in DTYPES.items()}


def numel_of(shape) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return numel


class ShardWriter:
    """Writes one safetensors file tensor by tensor, in a fixed order: the header first (all shapes
    and dtypes are known in advance), then each tensor's bytes as it comes."""

    def __init__(self, path: str, layout: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict):
        header, offset = {}, 0
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        for name, dtype, shape in layout:
            nbytes = numel_of(shape) * dtype.itemsize
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.layout = list(layout)
        self.index, self.written = 0, 0  # the tensor being written and its elements written so far
        self._advance()  # empty tensors have no bytes

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.write_part(name, tensor.reshape(-1))

    def write_part(self, name: str, flat: torch.Tensor) -> None:
        """The next elements of tensor ``name``, in layout order; it is done when all have come."""
        if flat.numel() == 0:
            return
        expected, dtype, shape = self.layout[self.index] if self.index < len(self.layout) else (None, None, ())
        if name != expected or flat.dtype != dtype:
            raise AssertionError(f"shard written out of order: {name} ({flat.dtype}) where {expected} ({dtype}) was due")
        self.f.write(memoryview(flat.contiguous().view(torch.uint8).numpy()))
        self.written += flat.numel()
        if self.written > numel_of(shape):
            raise AssertionError(f"{name}: more elements written than it holds")
        self._advance()

    def _advance(self) -> None:
        while self.index < len(self.layout) and self.written == numel_of(self.layout[self.index][2]):
            self.index, self.written = self.index + 1, 0

    def close(self, sync: bool = True) -> None:
        """Done; with ``sync``, on the disk before this returns (an output renamed into place after)."""
        if self.index < len(self.layout):
            raise AssertionError(f"{len(self.layout) - self.index} tensors were never written completely")
        self.f.flush()
        if sync:
            os.fsync(self.f.fileno())
        self.f.close()
