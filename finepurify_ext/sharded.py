"""A model's parameters as this rank's shards, for ``purify_`` under torch.distributed.

FSDP2 (``fully_shard``) makes each parameter a DTensor sharded on dim 0: a rank holds a run of whole
rows, one contiguous stretch of the flat tensor. ``Shards`` knows where each stretch starts, cuts the
same stretch from a full pre-trained tensor or Hessian (a view, nothing copied), tells which ranks
count a tensor (a replicated mesh dimension counts once, on coordinate 0; a plain tensor on rank 0),
and sums and gathers over the group what the scoring spec needs: with them every rank computes the
scoring spec, threshold and reset one process computes over the whole model.
"""
from __future__ import annotations

import math

import torch

from .threshold import _counts_here, _is_dtensor, gathered_padded


class Shards:
    """Where each named parameter's local shard sits in the whole tensor, and the collectives of
    ``group`` (every rank of it calls ``purify_``). ``rows`` limits a parameter to its first rows (the
    rows a resized vocabulary's tensor shares with its pre-trained one, ``purify.resized_rows``): its
    shard is the part of them the rank holds, maybe none."""

    def __init__(self, params: dict, names, group, rows: dict[str, int] | None = None):
        import torch.distributed as dist

        self.group = group
        self.rank = dist.get_rank(group)
        self.device = torch.device("cpu")  # where collectives run: nccl reduces CUDA tensors only
        if dist.get_backend(group) == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.first_row, self.counts, self.numel, self.local_shape, self.whole_shape = {}, {}, {}, {}, {}
        self.placements = {}  # a DTensor parameter's, which a tensor limited to its first rows must share
        rows = self.rows = rows or {}
        for name in names:
            p = params[name]
            self.whole_shape[name] = tuple(p.shape)
            self.numel[name] = p.numel() if name not in rows else rows[name] * p.shape[1:].numel()
            if not _is_dtensor(p):  # every rank holds it whole
                shape = p.shape if name not in rows else torch.Size([rows[name], *p.shape[1:]])
                self.first_row[name], self.counts[name], self.local_shape[name] = 0, self.rank == 0, shape
                continue
            from torch.distributed.tensor import Replicate, Shard

            if not all(isinstance(pl, Replicate) or (type(pl) is Shard and pl.dim == 0) for pl in p.placements):
                raise ValueError(f"purify_: parameter {name!r} is placed as {tuple(p.placements)}; purify_ takes "
                                 "parameters sharded on dim 0 (FSDP2's fully_shard) or replicated")
            sharded_over = [d for d, pl in enumerate(p.placements) if isinstance(pl, Shard)]
            if len(sharded_over) > 1:
                raise ValueError(f"purify_: parameter {name!r} is sharded on dim 0 over several mesh dimensions "
                                 f"{tuple(p.placements)}; shard it over one (fully_shard on a 1-D mesh, or HSDP)")
            self.placements[name] = tuple(p.placements)
            with torch.no_grad():
                shape = p.to_local().shape
            first = 0
            if sharded_over and p.dim():  # torch.chunk's rows, as DTensor and FSDP2 split them
                mesh_dim = sharded_over[0]
                step = -(-p.shape[0] // p.device_mesh.size(mesh_dim))
                first = min(p.device_mesh.get_coordinate()[mesh_dim] * step, p.shape[0])
            if name in rows:  # the rows of the first rows[name] this rank holds
                shape = torch.Size([max(0, min(shape[0], rows[name] - first)), *shape[1:]])
            self.first_row[name] = first
            self.counts[name], self.local_shape[name] = _counts_here(p), shape

    @classmethod
    def of(cls, params: dict, names, group=None, rows: dict[str, int] | None = None) -> "Shards | None":
        """The shards of ``names`` where some parameter is a DTensor or a ``group`` is given, else
        None (one process, or DDP: every rank holds the whole model and purifies it alike)."""
        if group is None and not any(_is_dtensor(params[n]) for n in names):
            return None
        import torch.distributed as dist

        return cls(params, names, group if group is not None else dist.group.WORLD, rows)

    def offset(self, name: str) -> int:
        """The index in the flat whole tensor of this rank's first element of ``name``."""
        shape = self.local_shape[name]
        return self.first_row[name] * (shape[1:].numel() if len(shape) else 1)

    def local(self, name: str, t: torch.Tensor, what: str, other_rows: bool = False) -> torch.Tensor:
        """This rank's part of ``t`` for parameter ``name``: a DTensor's local tensor (which must be
        placed like the parameter), or the same rows of a full tensor (a view). ``other_rows``: ``t``
        may have other rows than a resized parameter (a pre-trained tensor), and a copy of its rows is
        taken where it is a DTensor."""
        if other_rows and _is_dtensor(t) and name in self.rows and tuple(t.shape) != self.whole_shape[name]:
            # A pre-trained tensor of the other vocabulary (so split into other rows): gathered whole, on
            # every rank at once (one tensor, the vocabulary's), and this rank's rows copied out of it.
            first, count = self.first_row[name], self.local_shape[name][0]
            with torch.no_grad():
                local = t.full_tensor()[first:first + count].clone()
        elif _is_dtensor(t):
            with torch.no_grad():  # the tensor itself, not a differentiable view: resets write into it
                local = t.to_local()
            if name in self.rows:  # the rank's rows of the first ones, where t is split as the parameter is
                if tuple(t.shape) != self.whole_shape[name] or tuple(t.placements) != self.placements.get(name):
                    raise ValueError(f"purify_: the {what} of {name!r} is a DTensor of shape {list(t.shape)} placed "
                                     f"as {tuple(t.placements)}, the parameter {list(self.whole_shape[name])} placed "
                                     f"as {self.placements.get(name)}; pass it whole or sharded as the parameter is")
                local = local[:self.local_shape[name][0]]
        elif t.dim() and tuple(t.shape) != tuple(self.local_shape[name]):
            local = t.detach()[self.first_row[name]:self.first_row[name] + self.local_shape[name][0]]
        else:
            local = t
        if local.shape != self.local_shape[name]:
            raise ValueError(f"purify_: the {what} of {name!r} is sharded unlike the parameter (local shape "
                             f"{list(local.shape)}, the parameter's {list(self.local_shape[name])}); pass it "
                             "whole or sharded as the parameter is")
        return local

    def rows_from(self, name: str, t: torch.Tensor, first: int) -> tuple[torch.Tensor, int]:
        """(this rank's rows of DTensor ``t``, sharded as parameter ``name``, from whole row ``first``
        on, the whole index of the first of them): none on a rank whose rows are another's replica."""
        with torch.no_grad():
            local = t.to_local()
        start = self.first_row[name]
        skip = min(max(0, first - start), local.shape[0])  # this rank's rows before row ``first``
        return (local[skip:] if self.counts[name] else local[:0]), start + skip

    def summed(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (int64 or float64, one per item) summed over the ranks, on the CPU."""
        import torch.distributed as dist

        values = values.to(self.device)
        dist.all_reduce(values, group=self.group)
        return values.cpu()

    def gathered(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's 1-D ``values`` (lengths may differ), in rank order, on the CPU."""
        lengths = [int(n) for n in gathered_padded(torch.tensor([values.numel()]), 1, self.device, self.group)]
        return [part[:n] for part, n in zip(gathered_padded(values, max(lengths), self.device, self.group), lengths)]

    def quantile(self, sample: torch.Tensor, q: float) -> float:
        """``purify.sample_quantile`` of every rank's float32 ``sample`` together (the same bits),
        without gathering them: the two order statistics it interpolates are found digit by digit
        (12, 12 and 8 bits) of the values' order-preserving int32 keys, each round one summed
        histogram of the digit over the values that share the digits found so far (each rank bins
        only its own values; gathering a 1M sample and selecting on every rank took 17 ms of 2 ranks)."""
        x = sample.reshape(-1).float().cpu()
        keys = x.view(torch.int32)
        if bool((keys < 0).any()):  # negative values: all but the sign bit flipped, so int32 order is float order
            keys = torch.where(keys < 0, keys ^ 0x7FFFFFFF, keys)
        # The first round's histogram (key >> 20 is in [-2048, 2048)) goes with the sizes and the NaN
        # flag: one all_reduce fewer.
        first = self.summed(torch.cat([torch.tensor([x.numel(), int(torch.isnan(x).any())]),
                                       torch.bincount((keys >> 20) + 2048, minlength=1 << 12)]))
        n, nan = int(first[0]), int(first[1])
        if n == 0:
            raise ValueError("sample_quantile: the sample is empty")
        if nan:
            return math.nan
        rank = torch.tensor(q, dtype=torch.float32) * (n - 1)  # as sample_quantile ranks
        wanted = [min(int(rank), n - 1), min(math.ceil(float(rank)), n - 1)]  # ascending positions
        prefixes = [0, 0]  # of each wanted key: its digits so far (signed: the key >> the bits still unknown)
        for shift, width in ((20, 12), (8, 12), (0, 8)):
            distinct = sorted(set(prefixes))
            if shift == 20:
                counts = first[2:].view(1, -1)
            else:
                hists = [torch.bincount((keys[(keys >> (shift + width)) == p] >> shift) & ((1 << width) - 1),
                                        minlength=1 << width) for p in distinct]
                counts = self.summed(torch.cat(hists)).view(len(distinct), -1)
            for i, p in enumerate(prefixes):
                ends = torch.cumsum(counts[distinct.index(p)], 0)
                digit = int(torch.searchsorted(ends, wanted[i], right=True))
                wanted[i] -= int(ends[digit - 1]) if digit else 0
                prefixes[i] = digit - 2048 if shift == 20 else (p << width) | digit
            if shift == 20:  # the later rounds look only at the values under the two top digits found
                top = keys >> 20
                keys = keys[(top == prefixes[0]) | (top == prefixes[1])]
        low, high = (torch.tensor([k ^ 0x7FFFFFFF if k < 0 else k], dtype=torch.int32).view(torch.float32)
                     for k in prefixes)
        return float(torch.lerp(low, high, rank - min(int(rank), n - 1)))
