"""The built library runs with the one libstdc++ torch uses, whatever the toolchain's default.

A toolchain that links libstdc++ statically into shared objects gave a library that crashed (or cut
short) the first error message formatting an integer; the build now links the shared libstdc++ and
refuses a library that still carries its own copy."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

import finepurify_ext
from finepurify_ext.buildcheck import elf_libraries_and_locale, libstdcxx_problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINUX = sys.platform.startswith("linux")

# A g++ that adds -static-libstdc++ whenever it links a shared object, as some CUDA images' GCC does.
# With UNFIXABLE set it also turns -Bdynamic into -Bstatic, so that nothing can undo it.
STATIC_GXX = """#!/bin/sh
for a in "$@"; do
  if [ "$a" = -shared ]; then
    if [ -n "$UNFIXABLE" ]; then set -- $(printf '%s\\n' "$@" | sed 's/-Bdynamic/-Bstatic/g'); fi
    exec g++ "$@" -static-libstdc++
  fi
done
exec g++ "$@"
"""

# An op error whose message formats integers: cut at "finetuned[" with two libstdc++ copies.
NAN_MESSAGE = """
import torch
from finepurify_ext import ops
ft, pre, h = [torch.randn(10), torch.randn(7)], [torch.randn(10), torch.randn(7)], [torch.rand(10), torch.rand(7)]
ft[1][3] = float("nan")
try:
    ops.score_threshold(ft, pre, h, 2, 1e-8)
except RuntimeError as error:
    print(str(error).splitlines()[0])
"""


@pytest.mark.skipif(not LINUX, reason="ELF shared objects and libstdc++ are Linux matters")
def test_installed_library_uses_the_shared_libstdcxx():
    (library,) = glob.glob(os.path.join(os.path.dirname(finepurify_ext.__file__), "_C*.so"))
    needed, defines_locale = elf_libraries_and_locale(library)
    assert any(n.startswith("libstdc++.so") for n in needed) and not defines_locale
    assert libstdcxx_problem(library) is None


def test_buildcheck_ignores_what_is_not_an_elf_library(tmp_path):
    for content in (b"", b"\x7fELF", b"\x7fELF\x02\x01" + b"\0" * 10, b"MZ not ELF"):
        path = tmp_path / "lib.so"
        path.write_bytes(content)
        assert libstdcxx_problem(str(path)) is None


def _build(tree, **env):
    return subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace", "--force"], cwd=tree, capture_output=True, text=True,
        env={**os.environ, "FINEPURIFY_CUDA": "0", "MAX_JOBS": "2", **env})


@pytest.mark.skipif(not LINUX or shutil.which("g++") is None, reason="needs Linux and g++ to fake the toolchain")
def test_static_libstdcxx_toolchain_cannot_produce_a_broken_library(tmp_path):
    """About a minute: the CPU extension compiled from a copy of the sources with the faked toolchain."""
    tree = tmp_path / "src"
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "csrc", "finepurify_ext"):
        source = os.path.join(ROOT, name)
        (shutil.copytree(source, tree / name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
         if os.path.isdir(source) else shutil.copy(source, tree / name))
    gxx = tmp_path / "static-g++"
    gxx.write_text(STATIC_GXX)
    gxx.chmod(0o755)

    built = _build(tree, CXX=str(gxx))
    assert built.returncode == 0, built.stderr[-3000:]
    (library,) = glob.glob(str(tree / "finepurify_ext" / "_C*.so"))
    assert libstdcxx_problem(library) is None
    message = subprocess.run([sys.executable, "-c", NAN_MESSAGE], cwd=tmp_path, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(tree)})
    assert message.stdout.strip() == ("finepurify.score_threshold: finetuned[1] contains NaN or Inf; scores of "
                                      "non-finite weights cannot be ranked (fix or drop this tensor)"), message

    # Where the shared libstdc++ cannot be had, the build fails naming the fix and leaves no library.
    os.remove(library)
    refused = _build(tree, CXX=str(gxx), UNFIXABLE="1")
    assert refused.returncode != 0
    assert "holds a static copy of libstdc++" in refused.stderr and "CXX=g++ CC=gcc" in refused.stderr
    assert not glob.glob(str(tree / "finepurify_ext" / "_C*.so")) and not glob.glob(str(tree / "build/lib*/*/_C*.so"))
    # ... and a library built so elsewhere is refused at import, before any op can run.
    link = subprocess.run(["g++", "-shared", "-static-libstdc++", "-o", str(tree / "finepurify_ext" / "_C.so"),
                           "-x", "c++", "-", "-fPIC"], input="#include <sstream>\nstd::string f(int i) "
                          "{ std::ostringstream s; s << i; return s.str(); }\n", capture_output=True, text=True)
    assert link.returncode == 0, link.stderr
    imported = subprocess.run([sys.executable, "-c", "import finepurify_ext"], cwd=tmp_path, capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(tree)})
    assert imported.returncode != 0 and "cannot be used: it holds a static copy of libstdc++" in imported.stderr
