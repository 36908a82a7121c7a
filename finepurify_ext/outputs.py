"""Writing results: output paths checked before any work, directories and files written atomically."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from .errors import UserError


def _existing_ancestor(path: str) -> str:
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return parent or os.sep


def _check_writable_parent(path: str, option: str) -> None:
    """The nearest existing directory above ``path`` can take new entries (tried, not guessed:
    permissions, read-only file systems and root all answer the same way)."""
    ancestor = _existing_ancestor(path)
    if not os.path.isdir(ancestor):
        raise UserError(f"{option} {path}: {ancestor} is a file, so nothing can be written below it; "
                        "choose another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".finepurify-write-test-", dir=ancestor))
    except OSError as error:
        raise UserError(f"{option} {path}: cannot write in {ancestor} ({error.strerror}); "
                        "choose a path where you can write") from None


def _check_not_an_input(path: str, option: str, inputs) -> None:
    """The output replaces ``path`` as a whole: it must not be, or hold, an input or the working
    directory."""
    if not path:
        raise UserError(f"{option} is empty; give the path of the output")
    target = os.path.realpath(path)
    for index, kept in enumerate([os.getcwd(), *(i for i in inputs if i)]):
        kept_real = os.path.realpath(kept)
        if kept_real == target or kept_real.startswith(target.rstrip(os.sep) + os.sep):
            what = f"the input {kept}" if index else "the working directory"
            raise UserError(f"{option} {path} is or holds {what}, which the output would replace; "
                            "choose a new path")


def check_output_dir(path: str, overwrite: bool = False, option: str = "--out", inputs=()) -> None:
    """Raises ``UserError`` unless ``path`` can become the output directory: not empty, not one of
    ``inputs`` nor above one (nor above the working directory), not a file, empty or absent (or
    ``overwrite``), and its parent writable."""
    _check_not_an_input(path, option, inputs)
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{option} {path} is an existing file; the output is a directory: give a new path")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"{option} {path} exists and is not empty; choose another {option} or pass --overwrite")
    _check_writable_parent(path, option)


def check_output_file(path: str, overwrite: bool = False, option: str = "--out", inputs=()) -> None:
    """Raises ``UserError`` unless ``path`` can become the output file: not one of ``inputs``, not a
    directory (nor a path ending in a separator), absent (or ``overwrite``), its directory writable."""
    _check_not_an_input(path, option, inputs)
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise UserError(f"{option} {path} is a directory; the output is a file: give a file path such as "
                        f"{os.path.join(path, 'hessian.safetensors')}")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{option} {path} exists; choose another {option} or pass --overwrite")
    _check_writable_parent(path, option)


def save_atomically(out_dir: str, write, overwrite: bool = False) -> None:
    """Runs write(tmp_dir) and renames tmp_dir to out_dir: a crash leaves no half-written out_dir."""
    out_dir = os.path.abspath(out_dir)
    check_output_dir(out_dir, overwrite, option="output directory")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out_dir) + ".partial-", dir=parent)
    try:
        write(tmp)
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix="." + os.path.basename(out_dir) + ".old-", dir=parent)
            os.replace(out_dir, os.path.join(old, "x"))
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
