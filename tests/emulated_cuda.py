"""An emulated GPU for CPU-only machines, to test the device placement of the Python layer.

Every tensor stays on the CPU; the device it would be on is recorded beside its storage.
``Tensor.device``, ``.is_cuda``, ``.to``/``.cuda``/``.cpu``, pinned memory and torch.cuda's streams and
events answer as on a GPU, and every op is checked for mixed devices as CUDA checks them (a CPU
tensor beside a CUDA one, a CUDA index into a CPU tensor, ``numpy()`` of a CUDA tensor). It shows
a tensor left on the wrong device, which only a GPU run would otherwise show, and GPU machines are
lent seldom. It does not show numerics, kernels or the streams' ordering (tests/test_cuda.py, on a
GPU). Ops run in other threads are not checked: the modes are
thread-local. CUDA autocast runs as the CPU's.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")
_ON_CUDA = weakref.WeakKeyDictionary()  # storage -> True: its tensors are (logically) on the GPU
_PINNED = weakref.WeakKeyDictionary()
_plain = torch._C.DisableTorchFunction


class DeviceMismatch(RuntimeError):
    pass


def _storage(t):
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # a tensor without storage (meta, sparse)
        return None


def device_of(t) -> torch.device:
    with _plain():
        if t.device.type != "cpu":
            return t.device
        s = _storage(t)
    return CUDA if s is not None and s in _ON_CUDA else CPU


def _place(t, device) -> None:
    with _plain():
        s = _storage(t) if t.device.type == "cpu" else None
    if s is not None:
        if torch.device(device).type == "cuda":
            _ON_CUDA[s] = True
        else:
            _ON_CUDA.pop(s, None)


def _tensors(tree):
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _to_arguments(args, kwargs):
    """(device, dtype, other keywords) of a ``Tensor.to`` call in any of its forms."""
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    rest = {k: kwargs[k] for k in ("memory_format",) if k in kwargs}
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, torch.Tensor):
            device, dtype = device_of(a), a.dtype
        elif isinstance(a, (str, torch.device, int)) and not isinstance(a, bool):
            device = a
        elif isinstance(a, torch.memory_format):
            rest["memory_format"] = a
    return (torch.device(device) if device is not None else None), dtype, rest


def _move(t, target, dtype=None, rest=None):
    rest = rest or {}
    with _plain():
        if t.device.type == "meta":
            return t.to(device=target or t.device, dtype=dtype or t.dtype, **rest)
        if target is None or target.type == device_of(t).type:
            return t.to(dtype=dtype or t.dtype, **rest)
        out = t.to(dtype=dtype or t.dtype, copy=True, **rest)
    _place(out, target)
    return out


class _Functions(TorchFunctionMode):
    """The Python-level view: devices answered, moves made, factories given ``device="cuda"`` placed."""

    def __init__(self, found):
        super().__init__()
        self.found = found
        # the properties' getters, by the property they belong to
        self.getters = {id(torch.Tensor.device): lambda t: device_of(t),
                        id(torch.Tensor.is_cuda): lambda t: device_of(t).type == "cuda",
                        id(torch.Tensor.is_cpu): lambda t: device_of(t).type == "cpu"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if getattr(func, "__name__", "") == "__get__" and id(getattr(func, "__self__", None)) in self.getters:
            return self.getters[id(func.__self__)](args[0])
        if func is torch.Tensor.get_device:
            return 0 if device_of(args[0]).type == "cuda" else -1
        if func is torch.Tensor.numpy and device_of(args[0]).type == "cuda":
            self.found.append("numpy() of a CUDA tensor: TypeError: can't convert cuda:0 device type tensor to numpy")
            raise DeviceMismatch(self.found[-1])
        if func is torch.Tensor.is_pinned:
            s = _storage(args[0])
            return s is not None and s in _PINNED
        if func is torch.Tensor.pin_memory:
            if device_of(args[0]).type == "cuda":
                self.found.append("pin_memory() of a CUDA tensor")
                raise DeviceMismatch(self.found[-1])
            with _plain():
                out = args[0].clone()
            _PINNED[_storage(out)] = True
            return out
        if func is torch.Tensor.record_stream:
            return None
        if func is torch.Tensor.__deepcopy__:  # a storage-level copy: no op to place it by
            out = func(*args, **kwargs)
            _place(out, device_of(args[0]))
            return out
        if func is torch.Tensor.cuda:
            return _move(args[0], CUDA)
        if func is torch.Tensor.cpu:
            return _move(args[0], CPU)
        if func is torch.Tensor.to:
            kwargs.pop("copy", None), kwargs.pop("non_blocking", None)
            target, dtype, rest = _to_arguments(list(args[1:]), kwargs)
            return _move(args[0], target, dtype, rest)
        target = None
        if kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cuda":
            kwargs["device"], target = CPU, CUDA
        pinned = bool(kwargs.pop("pin_memory", False))
        inputs = _tensors((args, kwargs))
        _CONTEXT.append(device_of(inputs[0]) if inputs else None)
        try:
            out = func(*args, **kwargs)
        finally:
            _CONTEXT.pop()
        for o in _tensors(out) if (target is not None or pinned) else ():
            if target is not None:
                _place(o, target)
            if pinned:
                _PINNED[_storage(o)] = True
        return out


_CONTEXT = []  # the device of the Python-level call being run (its first tensor's)
_ACROSS = {"copy_", "_to_copy", "_copy_from", "_copy_from_and_resize", "detach", "alias", "lift_fresh",
           "lift_fresh_copy", "_local_scalar_dense", "set_", "is_pinned", "_pin_memory", "record_stream",
           "_has_compatible_shallow_copy_type", "resize_", "view", "_unsafe_view", "as_strided"}
_KEEP_STORAGE = {"copy_", "set_", "detach", "alias", "view", "_unsafe_view", "as_strided", "resize_"}
_INDEXING = {"index", "index_put_", "index_put", "_index_put_impl_"}
# Ops that refuse even a CPU scalar tensor beside CUDA ones (elementwise ops take it as a number).
_EVERY_TENSOR = {"cat", "stack", "mm", "bmm", "addmm", "matmul", "take", "equal", "index_select", "gather",
                 "scatter", "scatter_", "embedding", "masked_select", "searchsorted", "put_", "put"}


class _Dispatch(TorchDispatchMode):
    """The op-level view: mixed devices refused as CUDA refuses them; outputs placed."""

    def __init__(self, found):
        super().__init__()
        self.found = found

    def _refuse(self, message):
        self.found.append(message)
        raise DeviceMismatch(message)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        with _plain():
            return self._run(func, args, kwargs)

    def _run(self, func, args, kwargs):
        name = func.overloadpacket.__name__
        explicit = None
        if kwargs.get("device") is not None:
            if torch.device(kwargs["device"]).type == "cuda":
                kwargs["device"], explicit = CPU, CUDA
            else:  # the CPU named from C++ (autograd's copies, *_like): the inputs' logical device
                inputs = _tensors((args, kwargs))
                explicit = (device_of(inputs[0]) if inputs else _CONTEXT[-1] if _CONTEXT and _CONTEXT[-1]
                            else torch.device(kwargs["device"]))
        kwargs.pop("pin_memory", None)
        tensors = _tensors((args, kwargs))
        devices = [device_of(t) for t in tensors]
        primary = None
        if name not in _ACROSS and tensors and explicit is None:
            if name in _INDEXING:
                primary = devices[0]
                for i in _tensors(args[1] if len(args) > 1 else []):
                    if primary.type == "cpu" and device_of(i).type == "cuda":
                        self._refuse(f"{func}: indices should be either on cpu or on the same device as the "
                                     "indexed tensor (cpu)")
                if name != "index" and len(args) > 2 and isinstance(args[2], torch.Tensor):
                    v = args[2]
                    if device_of(v) != primary and not (v.dim() == 0 and device_of(v).type == "cpu"):
                        self._refuse(f"{func}: values on {device_of(v)}, the indexed tensor on {primary}")
            else:
                every = name in _EVERY_TENSOR or func.namespace not in ("aten", "prims")
                counted = {d for t, d in zip(tensors, devices) if every or not (t.dim() == 0 and d.type == "cpu")}
                if len(counted) > 1:
                    shapes = [(tuple(t.shape), str(d)) for t, d in zip(tensors, devices)][:6]
                    self._refuse(f"{func}: Expected all tensors to be on the same device, but found at least two "
                                 f"devices, {sorted(map(str, counted))} (arguments {shapes})")
                nonscalar = [d for t, d in zip(tensors, devices) if not (t.dim() == 0 and d.type == "cpu")]
                primary = nonscalar[0] if nonscalar else devices[0]
        out = func(*args, **kwargs)
        if name in _KEEP_STORAGE:
            return out
        target = explicit or (devices[0] if name == "_to_copy" and devices else primary) or (
            devices[0] if devices else CPU)
        inputs = {id(_storage(t)) for t in tensors}
        for o in _tensors(out):
            s = _storage(o)
            if s is None or id(s) not in inputs:  # an op in place, or a view, keeps its storage's place
                _place(o, target)
        return out


class _Stream:
    device = CUDA

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event or _Event()

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Event:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


@contextlib.contextmanager
def emulated_cuda():
    """Within: one emulated GPU. Yields the list of the device mismatches found (each also raised
    where it happens, as CUDA raises it: a command may turn it into an error message)."""
    import pytest

    with pytest.MonkeyPatch.context() as monkeypatch:
        yield from _emulating(monkeypatch)


def _emulating(monkeypatch):
    import finepurify_ext

    tc = torch.cuda
    for name, value in {"is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
                        "get_device_name": lambda *a, **k: "emulated GPU",
                        "get_device_capability": lambda *a, **k: (9, 0), "is_bf16_supported": lambda *a, **k: True,
                        "synchronize": lambda *a, **k: None, "empty_cache": lambda: None,
                        "is_initialized": lambda: True, "Stream": _Stream, "Event": _Event,
                        "current_stream": lambda device=None: _Stream(), "default_stream": lambda device=None: _Stream(),
                        "stream": lambda s: contextlib.nullcontext(), "_sleep": lambda cycles: None,
                        "manual_seed": lambda *a, **k: None,
                        # the generators' state, which training.own_generators saves and gives back
                        "get_rng_state": lambda *a, **k: torch.zeros(16, dtype=torch.uint8),
                        "set_rng_state": lambda *a, **k: None,
                        "manual_seed_all": lambda *a, **k: None, "set_device": lambda *a, **k: None,
                        "memory_allocated": lambda *a, **k: 0, "max_memory_allocated": lambda *a, **k: 0,
                        "reset_peak_memory_stats": lambda *a, **k: None,
                        "mem_get_info": lambda *a, **k: (1 << 34, 1 << 34)}.items():
        monkeypatch.setattr(tc, name, value)
    cpu_autocast = torch.autocast

    class Autocast(cpu_autocast):
        def __init__(self, device_type, *args, **kwargs):
            super().__init__("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", Autocast)
    monkeypatch.setattr(torch.amp, "autocast", Autocast)
    enabled, autocast_dtype = torch.is_autocast_enabled, torch.get_autocast_dtype
    monkeypatch.setattr(torch, "is_autocast_enabled",
                        lambda device_type=None: enabled() if device_type is None
                        else enabled("cpu" if device_type == "cuda" else device_type))
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda d: autocast_dtype("cpu" if d == "cuda" else d))
    monkeypatch.setattr(finepurify_ext, "built_with_cuda", lambda: True)
    found: list[str] = []
    with _Functions(found), _Dispatch(found):
        yield found
