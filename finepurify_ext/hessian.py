"""Step 2 of the method: the diagonal Hessian of the clean loss at the suspect weights, estimated as
the mean of squared gradients (the diagonal empirical Fisher), accumulated with the fused
``accumulate_sq_grads_`` op after each backward pass (or, experimentally, during it)."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from . import ops
from .devices import OUT_OF_MEMORY
from .outputs import hold, host_tag, release, remove_leftovers, signals_deferred
from .purify import parameters_by_name, sharded_by_fsdp1
from .safetensors_io import ShardWriter
from .threshold import _is_dtensor, _local
from .training import grads_set_aside, in_mode


def _micro_batches(batch: dict[str, torch.Tensor]):
    """A batch split into batches of one example (per-sample squared gradients)."""
    size = len(batch["labels"])
    for i in range(size):
        yield {name: value[i : i + 1] for name, value in batch.items()}


OVERLAP_GROUP_BYTES = 64 << 20  # gradients per launch of the overlapped accumulation


class _SquareInBackward:
    """Adds squared gradients to the Hessians while the backward pass goes on. A hook only notes each
    gradient as the backward finishes it and drops it from its parameter; each ``OVERLAP_GROUP_BYTES``
    of noted gradients go in one launch (a launch per parameter costs more host time than it hides),
    on a GPU on a side stream that waits for the backward's stream. ``record_stream`` keeps a
    gradient's memory from reuse until its square has read it."""

    def __init__(self, params: dict, local: dict[str, torch.Tensor], device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pending, self.pending_bytes, self.noted = [], 0, set()
        self.handles = [p.register_post_accumulate_grad_hook(self._hook_for(name, local[name]))
                        for name, p in params.items()]

    def _hook_for(self, name, hessian):
        def note(p):
            if name in self.noted:  # e.g. reentrant checkpointing: the square of a sum is not the sum of squares
                raise ValueError(f"estimate_hessian(overlap=True): parameter {name!r} received two gradients in "
                                 "one backward pass; use overlap=False")
            self.noted.add(name)
            grad, p.grad = p.grad, None
            self.pending.append((hessian, grad))
            self.pending_bytes += grad.numel() * grad.element_size()
            if self.pending_bytes >= OVERLAP_GROUP_BYTES:
                self._launch()
        return note

    def _launch(self):
        if not self.pending:
            return
        hessians, grads = zip(*self.pending)
        self.pending, self.pending_bytes = [], 0
        if self.stream is None:
            ops.accumulate_sq_grads_(hessians, grads)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            ops.accumulate_sq_grads_(hessians, grads)
        for grad in grads:
            grad.record_stream(self.stream)

    def join(self):
        """The rest of the noted gradients squared, and the default stream made to wait for every
        square (before the Hessians are read or saved)."""
        self._launch()
        self.noted.clear()
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)

    def close(self):
        """Hooks removed first, whatever happens next. After a backward cut short the Hessians hold part
        of its squares; the caller drops them (the batch is not counted, nothing is saved)."""
        for handle in self.handles:
            handle.remove()
        self.pending, self.pending_bytes = [], 0
        self.join()


def _square_after_backward(hessians, grads, side_stream) -> None:
    """One step's squares, at once (side_stream None) or on ``side_stream`` once the backward that
    made the gradients is done, so the next step's forward runs meanwhile; ``record_stream`` keeps each
    gradient's memory from reuse until its square has read it."""
    if side_stream is None:
        ops.accumulate_sq_grads_(hessians, grads)
        return
    side_stream.wait_stream(torch.cuda.current_stream(side_stream.device))
    with torch.cuda.stream(side_stream):
        ops.accumulate_sq_grads_(hessians, grads)
    for grad in grads:
        grad.record_stream(side_stream)


@torch.enable_grad()  # a caller under torch.no_grad() (an evaluation loop's) still gets gradients
def _accumulate_gradient(model, batch: dict, loss_fn, loss_terms, rows: int | None) -> None:
    """The gradient of ``batch``'s loss added to the parameters' ``.grad``: in one backward pass, or
    with ``rows`` over slices of that many rows, each slice's mean loss weighted by its share of the
    batch's loss terms (a slice with none is skipped: its mean is 0/0)."""
    def loss_of(part):
        return model(**part).loss if loss_fn is None else loss_fn(model, part)

    size = len(batch["labels"])
    if rows is None or rows >= size:
        loss_of(batch).backward()
        return
    terms = loss_terms or (lambda part: len(part["labels"]))
    total = terms(batch)
    for start in range(0, size, rows):
        part = {k: v[start : start + rows] for k, v in batch.items()}
        share = terms(part)
        if share:
            (loss_of(part) * (share / total)).backward()


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def _join(side_stream) -> None:
    """The default stream made to wait for every square queued on ``side_stream`` (before the Hessians
    are read, saved or scaled)."""
    if side_stream is not None:
        torch.cuda.current_stream(side_stream.device).wait_stream(side_stream)


ACCUMULATOR_FORMAT = "finepurify-hessian-accumulator-v1"
HESSIAN_FORMAT = "finepurify-hessian-v1"


@contextlib.contextmanager
def every_parameter_estimated(model: torch.nn.Module):
    """Every floating parameter of ``model`` with requires_grad for the block (``estimate_hessian``
    leaves frozen ones out), as it was after: a parameter frozen in the caller's training stack may
    still have drifted from its pre-trained value, and ``purify_`` ranks it. One process only: a
    DDP replica's reducer knows only the parameters that required gradients when it was built."""
    frozen = [] if _distributed() else [p for p in model.parameters()
                                         if not p.requires_grad and p.is_floating_point()]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def estimate_hessian(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    per_sample: bool = False,
    progress: bool = True,
    total: int | None = None,
    resume_file: str | None = None,
    save_every: int = 50,
    overlap: bool | str = False,
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None,
    loss_terms: Callable[[dict], int] | None = None,
    micro_batch_size: int | None = None,
    resume_key: dict[str, str] | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Returns ({parameter name: float32 diagonal Hessian}, number of squared gradients averaged).

    Per mini-batch by default (the squared gradient of each batch's mean loss); ``per_sample``
    squares each example's gradient instead (costlier, nearly the same ranking). Dropout is off
    (eval mode) while estimating; the model's mode and its gradients are restored afterwards.
    Parameters the loss never reaches keep a Hessian of exactly zero. ``loss_fn(model, batch)`` is the
    loss of a batch (default: ``model(**batch).loss``; a causal LM's: ``causal_lm.lm_loss``), the
    mean of ``loss_terms(batch)`` terms (default: its rows; a causal LM's: its response tokens).

    ``micro_batch_size``: each batch's gradient is accumulated over slices of that many rows, each
    slice's loss weighted by its share of the batch's terms: the gradient of the same batch mean
    (up to float rounding), with the activations of a slice only. The estimate is still the one of
    the batch size; a smaller batch would change it. Left None on a GPU, a batch that runs out of
    memory is retried in halves (a message says so once) and later batches keep the smaller size.
    Not with per-sample squares (slices of one already) or ``overlap="backward"`` (which squares
    each backward's gradient).

    With ``resume_file`` the running sums and counts are saved there (safetensors, atomically) every
    ``save_every`` batches, at the end, and when a KeyboardInterrupt (Ctrl-C, or the command line's
    SIGTERM) stops it between batches; a later call with the same file and the same batches skips
    the batches already done and gives exactly the uninterrupted result. ``resume_key``: what must be
    the same for that (the command line's: the model's fingerprint, the clean data's digest, the batch
    size), saved with the sums; a file saved with another is refused, not resumed into.

    Under DDP each rank squares the all-reduced gradient (the Fisher of the global batch; every rank
    holds the same result); under FSDP2 each rank accumulates the squared gradient of its own shard
    (the Hessians are DTensors sharded like the parameters).

    ``overlap`` (experimental, off until a GPU run shows it pays), same bits either way:
    ``"backward"`` (or True) adds the squares while the backward pass goes on: on a GPU on a side
    stream, a group of finished gradients per launch (``_SquareInBackward``); not under DDP, which
    reduces the gradients only at the end. ``"forward"`` adds each step's squares on a side stream
    while the next step's forward runs (one launch per step, no hooks; the memory of one step's
    gradients more; on the CPU the same as False).
    """
    mode = overlap if isinstance(overlap, str) else ("backward" if overlap else None)  # True: as before
    if mode not in (None, "backward", "forward"):
        raise ValueError(f"estimate_hessian: overlap must be False, 'backward' (or True) or 'forward', got {overlap!r}")
    in_backward = mode == "backward"
    if torch.is_inference_mode_enabled():
        raise ValueError("estimate_hessian: called under torch.inference_mode(), where no gradient can be taken; "
                         "call it outside that block")
    if sharded_by_fsdp1(model):
        raise ValueError("estimate_hessian: an FSDP1 model (FullyShardedDataParallel) gives each rank flat shards of "
                         "the gradients, which cannot be told by parameter; estimate it under FSDP2's fully_shard or "
                         "DDP, or in one process")
    # Named as the module's parameters, as purify_ names them: a DDP replica's or a compiled model's
    # wrapper adds a prefix ("module.", "_orig_mod."), a layer's wrapper a segment, that no
    # pre-trained state has.
    named = {id(p): n for n, p in parameters_by_name(model).items()}
    params = {named.get(id(p), name): p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("estimate_hessian: no parameter of the model requires grad (a PEFT model's base weights "
                         "are frozen, and stay so after merge_and_unload): set requires_grad on those to estimate, "
                         "or run it under hessian.every_parameter_estimated(model)")
    hessians = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    local = {name: _local(h) for name, h in hessians.items()}
    done, count = 0, 0
    resume_key = {k: str(v) for k, v in (resume_key or {}).items()}  # as the file's metadata holds it
    if resume_file is not None and os.path.exists(resume_file):
        done, count = _load_accumulator(resume_file, local, per_sample, resume_key)
        if progress and (not _distributed() or torch.distributed.get_rank() == 0):
            print(f"resuming from {resume_file}: {done} batches done", file=sys.stderr)
    device = next(iter(params.values())).device
    # Gradients reduced over ranks (DDP) or sharded (FSDP2).
    over_ranks = (isinstance(model, torch.nn.parallel.DistributedDataParallel)
                  or any(_is_dtensor(p) for p in params.values()))
    if in_backward and over_ranks:
        raise ValueError("estimate_hessian: overlap='backward' squares gradients before DDP reduces them or with "
                         "sharded parameters; leave it off there or use overlap='forward'")
    # Each rank would choose its own number of backward passes, and so of gradient reductions.
    ranks = over_ranks or _distributed()
    if micro_batch_size is not None and (micro_batch_size < 1 or in_backward or ranks):
        raise ValueError(f"estimate_hessian: micro_batch_size must be at least 1, with overlap other than 'backward' "
                         f"and in one process, got {micro_batch_size} with overlap={overlap!r}")
    rows = micro_batch_size  # None: whole batches, until one runs out of GPU memory
    # Halving weighs slices by loss_terms: by rows unless told otherwise, right only for a loss that
    # is a mean over rows (one label per row).
    halve_on_oom = micro_batch_size is None and not per_sample and not in_backward and not ranks
    # The arguments checked: what is changed from here on is given back, whatever happens.
    kept = contextlib.ExitStack()  # each module's mode and the caller's gradients, given back in the end
    kept.enter_context(in_mode(model, False))
    kept.enter_context(grads_set_aside(list(model.parameters())))
    squarer = beside_forward = None
    saved = done
    whole = True  # the sums hold exactly the squares of the ``done`` batches (none of the next one's)
    try:
        squarer = _SquareInBackward(params, local, device) if in_backward else None
        beside_forward = torch.cuda.Stream(device) if mode == "forward" and device.type == "cuda" else None
        bar = tqdm(batches, desc="hessian", total=total, disable=not progress, leave=False)
        for index, batch in enumerate(bar):
            if index < done:  # done before the interruption
                continue
            for micro in (_micro_batches(batch) if per_sample else (batch,)):
                micro = {k: v.to(device) for k, v in micro.items()}
                whole = squarer is None and whole  # squares in the backward change the sums from here on
                while True:
                    try:
                        _accumulate_gradient(model, micro, loss_fn, loss_terms, None if per_sample else rows)
                        break
                    except OUT_OF_MEMORY:
                        size = rows or len(micro["labels"])
                        if not halve_on_oom or size <= 1 or (loss_terms is None and micro["labels"].dim() != 1):
                            raise
                    # Retried outside the handler, whose traceback holds the failed pass's activations.
                    for p in params.values():
                        p.grad = None
                    torch.cuda.empty_cache()
                    rows = -(-size // 2)
                    tqdm.write(f"hessian: a batch of {size} did not fit in {device}'s memory; its gradient is "
                               f"now accumulated over slices of {rows} (the same estimate)", file=sys.stderr)
                whole = False
                if squarer is not None:
                    squarer.join()
                else:
                    reached = [name for name, p in params.items() if p.grad is not None]
                    _square_after_backward([local[n] for n in reached], [_local(params[n].grad) for n in reached],
                                           beside_forward)
                    # Dropped rather than zeroed: the next backward then writes fresh gradients instead of
                    # adding into old ones (no extra pass over them, as a training step's zero_grad).
                    for n in reached:
                        params[n].grad = None
                count += 1
            done, whole = index + 1, True
            if resume_file is not None and done % save_every == 0:
                _join(beside_forward)
                _save_accumulator(resume_file, local, done, count, per_sample, resume_key)
                saved = done
    except KeyboardInterrupt:
        # Ctrl-C or a scheduler's SIGTERM (the command line's Terminated): the batches done since the
        # last save are kept too, where the sums hold whole batches (an interruption between squares
        # of one batch keeps the last save). One process only: a save of sharded sums is collective,
        # and the other ranks were not interrupted with this one.
        if resume_file is not None and whole and done > saved and not _distributed():
            _join(beside_forward)
            _save_accumulator(resume_file, local, done, count, per_sample, resume_key)
        raise
    finally:
        try:
            _join(beside_forward)
            if squarer is not None:
                squarer.close()
        finally:
            kept.close()
    if resume_file is not None:
        _save_accumulator(resume_file, local, done, count, per_sample, resume_key)
    if count == 0:
        raise ValueError("estimate_hessian: the clean data gave no batches; it must hold at least one example")
    torch._foreach_mul_(list(local.values()), 1.0 / count)
    return hessians, count


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str],
                      sync: bool = True) -> None:
    """``tensors`` as one safetensors file, written under a temporary name and renamed (with ``sync``,
    on the disk first). Streamed a tensor at a time: from a GPU, or gathered from shards (DTensors:
    every rank takes part, in the same order), only one tensor is ever on the host or gathered,
    never the whole Hessian."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)  # as save_atomically makes a directory's
    remove_leftovers(folder, os.path.basename(path) + ".partial-")
    tmp = f"{path}.partial-{host_tag()}-{os.getpid()}"
    writer = lock = None
    written = False
    try:
        writer = ShardWriter(tmp, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], metadata)
        lock = hold(tmp)
        for name, t in tensors.items():
            writer.write(name, (t.full_tensor() if _is_dtensor(t) else t).detach().cpu())
        writer.close(sync=sync)
        with signals_deferred():
            os.replace(tmp, path)
            written = True
    except BaseException as stop:
        if written:  # interrupted just after: the file is complete
            stop.output_written = os.path.abspath(path)
            raise
        if writer is not None:
            writer.f.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        release(lock)


RESUME_KEY = "resume."  # the metadata keys of estimate_hessian's resume_key


def _save_accumulator(path, sums, done, count, per_sample, resume_key) -> None:
    # Not synced to the disk: it is saved every few batches (a sync took 0.4 s per GB here), and a
    # copy lost to a machine crash is refused on resume with the advice to start afresh.
    _atomic_save_file(sums, path, {"format": ACCUMULATOR_FORMAT, "batches_done": str(done),
                                   "squared_gradients": str(count), "per_sample": str(bool(per_sample)),
                                   **{RESUME_KEY + k: v for k, v in resume_key.items()}}, sync=False)


def _load_accumulator(path, sums, per_sample, resume_key) -> tuple[int, int]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != ACCUMULATOR_FORMAT:
                raise ValueError(f"{path} is not a Hessian accumulator saved by estimate_hessian; "
                                 "give a new file or delete this one")
            if meta.get("per_sample") != str(bool(per_sample)):
                raise ValueError(f"{path} was saved with per_sample={meta.get('per_sample')}; resume with the "
                                 "same setting or give a new file")
            saved_key = {k[len(RESUME_KEY):]: v for k, v in meta.items() if k.startswith(RESUME_KEY)}
            if resume_key and not saved_key:
                raise ValueError(f"{path} was saved by an earlier version that did not record which run it "
                                 "belongs to; delete it to start afresh")
            for k in sorted(set(saved_key) | set(resume_key)):
                if saved_key.get(k) != resume_key.get(k):
                    raise ValueError(f"{path} holds the running sums of a run with another {k.replace('_', ' ')} "
                                     f"({_short(saved_key.get(k))}, now {_short(resume_key.get(k))}); resume with "
                                     "the same, or delete it to start afresh")
            names = set(f.keys())
            if names != set(sums):
                raise ValueError(f"{path} holds other parameters than this model ({len(names ^ set(sums))} names "
                                 "differ); it belongs to another model: give a new file")
            for name, t in sums.items():
                saved = f.get_tensor(name)
                if saved.shape != t.shape:
                    raise ValueError(f"{path}: {name!r} has shape {list(saved.shape)}, the model's is "
                                     f"{list(t.shape)}; it belongs to another model: give a new file")
                t.copy_(saved)
            return int(meta["batches_done"]), int(meta["squared_gradients"])
    except (OSError, KeyError, SafetensorError) as error:
        raise ValueError(f"cannot resume from {path}: {error}; delete it to start afresh") from None


def _short(value) -> str:
    return "none recorded" if value is None else value[:16]


def save_hessian(path: str, hessians: dict[str, torch.Tensor], count: int, seen_tokens=None,
                 provenance: dict[str, str] | None = None) -> None:
    """The estimated Hessian as safetensors (the input of out-of-core purification), atomically.
    ``seen_tokens``: the token ids of the clean inputs, kept in the metadata for an input embedding
    tied to the output (whose unseen rows the Hessian cannot tell; ``purify.purify_``).
    ``provenance``: what it was estimated on, kept in the metadata: ``model`` (as named),
    ``model_fingerprint`` (``checkpoint.fingerprint``: out-of-core purification refuses the Hessian
    for another suspect) and ``clean_data_sha256``."""
    metadata = {"format": HESSIAN_FORMAT, "squared_gradients": str(count), **(provenance or {})}
    if seen_tokens is not None:
        metadata["seen_tokens"] = encode_ids(seen_tokens)
    _atomic_save_file(hessians, path, metadata)


def encode_ids(ids) -> str:
    """Token ids as sorted ranges, "0-5,9,12-40": compact for the metadata of a safetensors file."""
    ids, parts = sorted(set(int(i) for i in ids)), []
    start = prev = None
    for i in ids + [None]:
        if start is not None and (i is None or i != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ",".join(parts)


def decode_ids(text: str) -> list[int]:
    """The ids of ``encode_ids``' text."""
    ids = []
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        ids.extend(range(int(first), int(last or first) + 1))
    return ids
