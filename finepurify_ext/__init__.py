"""Fine-purifying: detect and remove backdoors and injected bias from fine-tuned language models.

The per-element work runs in fused kernels registered as torch ops (``torch.ops.finepurify``);
``finepurify_ext.ops`` holds their public wrappers and ``finepurify_ext.reference`` their
pure-PyTorch counterparts.
"""
from importlib.util import find_spec

import torch  # noqa: F401  (the extension links against torch's libraries)

from .buildcheck import FIX, libstdcxx_problem

# A library carrying its own libstdc++ loads, then crashes on the first error message: refuse it now.
_library = find_spec(__name__ + "._C")
if _library is not None and _library.origin and (_problem := libstdcxx_problem(_library.origin)):
    raise ImportError(f"finepurify_ext._C ({_library.origin}) cannot be used: {_problem}, and torch uses the "
                      f"shared libstdc++, so a second copy crashes on the first error message. Rebuild it with {FIX}")

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)
except ImportError as error:  # fail loudly: nothing here works without the kernels
    raise ImportError(
        "finepurify_ext._C, the compiled kernels, could not be loaded "
        f"({error}). Build it against the installed torch with "
        "`pip install --no-build-isolation -e .` from the source tree (or `make install`)."
    ) from error

from . import ops, reference  # noqa: E402

cpu_capability = _C.cpu_capability  # "avx2" or "baseline": which CPU kernels run
built_with_cuda = _C.built_with_cuda  # whether this build holds the CUDA kernels

__all__ = ["ops", "reference", "cpu_capability", "built_with_cuda"]
__version__ = "0.1.0"
