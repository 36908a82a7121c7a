"""Writing results: output paths checked before any work, directories and files written atomically."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time

from .errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: temporaries are not locked, and leftovers are not recognised
    fcntl = None

LEFTOVER_MIN_AGE_S = 60  # a temporary is locked right after it is made; younger ones are never judged


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
        _try_writing(ancestor)
    except OSError as error:
        raise UserError(f"{option} {path}: cannot write in {ancestor} ({error.strerror}); "
                        "choose a path where you can write") from None


def _try_writing(folder: str) -> None:
    """Makes and removes an entry in ``folder``; raises the OSError that refuses it."""
    os.rmdir(tempfile.mkdtemp(prefix=".finepurify-write-test-", dir=folder))


def _check_not_an_input(path: str, option: str, inputs) -> None:
    """The output replaces ``path`` as a whole: it must not be, or hold, an input, the working
    directory or the home directory, nor lie inside an input directory."""
    if not path:
        raise UserError(f"{option} is empty; give the path of the output")
    target = os.path.realpath(path)
    home = os.path.expanduser("~")
    kept = [("the working directory", os.getcwd(), False)]
    kept += [("your home directory", home, False)] if home != "~" else []
    kept += [(f"the input {i}", i, True) for i in inputs if i]
    for what, where, is_input in kept:
        where_real = os.path.realpath(where)
        if where_real == target or where_real.startswith(target.rstrip(os.sep) + os.sep):
            raise UserError(f"{option} {path} is or holds {what}, which the output would replace; "
                            "choose a new path")
        # Inside an input directory, the output would change that input: a Hessian file in a
        # model's directory, say, is read with its weights.
        if is_input and os.path.isdir(where_real) and target.startswith(where_real.rstrip(os.sep) + os.sep):
            raise UserError(f"{option} {path} is inside {what}, which the output would change; "
                            "choose a path outside it")


def check_output_dir(path: str, overwrite: bool = False, option: str = "--out", inputs=(),
                     marker: str = "finepurify_report.json") -> None:
    """Raises ``UserError`` unless ``path`` can become the output directory: not empty, not one of
    ``inputs`` nor above one (nor above the working or home directory), not a file, empty or absent
    (or, with ``overwrite``, an output this command wrote: it holds ``marker``), and its parent
    writable."""
    _check_not_an_input(path, option, inputs)
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{option} {path} is an existing file; the output is a directory: give a new path")
    if os.path.isdir(path) and os.listdir(path):
        if not overwrite:
            raise FileExistsError(f"{option} {path} exists and is not empty; choose another {option} or pass "
                                  "--overwrite")
        # --overwrite deletes the directory whole: only one this command wrote, never a typo's victim
        if os.path.ismount(path) or not os.path.isfile(os.path.join(path, marker)):
            raise UserError(f"{option} {path} holds files finepurify did not write (it has no {marker}), "
                            "which the output would replace: choose a new path, or empty it yourself")
    _check_writable_parent(path, option)


def check_output_file(path: str, overwrite: bool = False, option: str = "--out", inputs=(), ours=None,
                      what: str = "output") -> None:
    """Raises ``UserError`` unless ``path`` can become the output file: not one of ``inputs``, not a
    directory (nor a path ending in a separator), absent (or, with ``overwrite``, a file ``ours(path)``
    says this command wrote: a ``what``), its directory writable."""
    _check_not_an_input(path, option, inputs)
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise UserError(f"{option} {path} is a directory; the output is a file: give a file path such as "
                        f"{os.path.join(path, 'hessian.safetensors')}")
    if os.path.lexists(path):
        if not overwrite:
            raise FileExistsError(f"{option} {path} exists; choose another {option} or pass --overwrite")
        if ours is not None and (os.path.islink(path) or not ours(path)):
            raise UserError(f"{option} {path} is not a {what} finepurify wrote, and --overwrite replaces only "
                            "those: choose a new path")
    _check_writable_parent(path, option)


# ------------------------------------------------------------------------------- temporaries
# An error, Ctrl-C or SIGTERM removes a command's temporaries; a SIGKILL (the OOM killer, a scheduler's
# last word) cannot, and a partial copy of a large model is many GB. So each temporary is held under
# an flock for as long as its process lives (the kernel drops the lock when the process dies, however
# it dies), and a later run that makes a temporary of the same kind in the same folder removes the
# ones nobody holds. Names carry the host: a shared file system may keep flocks per node, so only
# this host's temporaries are judged.


def host_tag() -> str:
    """This machine's name as a file name part (what a temporary's name carries)."""
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname()) or "host"


def hold(path: str):
    """An exclusive lock on ``path`` (a file or a directory) for as long as the returned descriptor
    stays open (``release`` closes it). Raises BlockingIOError where another process holds it; None
    where the file system takes no locks (some network ones), where then nothing is ever judged a
    leftover."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # ENOLCK, EOPNOTSUPP, ...: no locks here
        os.close(fd)
        return None
    return fd


def release(fd) -> None:
    if fd is not None:
        os.close(fd)


def _size(path: str) -> int:
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
               if not os.path.islink(os.path.join(root, f)))


def remove_leftovers(folder: str, prefix: str) -> list[str]:
    """Removes the entries of ``folder`` whose names start with ``prefix`` and this host's tag that no
    live process holds (``hold``): temporaries of runs that were killed. Entries younger than a
    minute, or that cannot be opened, are left. Says what it removed on stderr; returns their paths."""
    if fcntl is None or not os.path.isdir(folder):
        return []
    prefix += host_tag() + "-"
    removed = []
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        try:
            if not entry.startswith(prefix) or time.time() - os.lstat(path).st_mtime < LEFTOVER_MIN_AGE_S:
                continue
            fd = hold(path)
        except OSError:  # held by a live run (or unreadable): not ours to remove
            continue
        if fd is None:  # no locks on this file system: a live run's temporary looks the same
            continue
        try:
            size = _size(path)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        except OSError:
            continue
        finally:
            release(fd)
        removed.append(path)
        print(f"finepurify: removed {path} ({size / 1e9:.2f} GB), left by a run that was killed", file=sys.stderr)
    return removed


def scratch_root() -> str:
    """The system's temporary directory, for scratch copies where a command has no --out. A TMPDIR
    that cannot take them is refused: Python would fall back to /tmp or the working directory without
    a word, and what TMPDIR was set to keep off a small disk goes there (a 7B model's copy is 28 GB)."""
    wanted = os.environ.get("TMPDIR")
    if not wanted:
        return tempfile.gettempdir()
    wanted = os.path.abspath(wanted)  # the messages name where the copy goes
    if not os.path.isdir(wanted):
        raise UserError(f"TMPDIR {wanted}: not a directory; set TMPDIR to a directory with room for the "
                        "model's copy, or unset it")
    try:
        _try_writing(wanted)
    except OSError as error:
        raise UserError(f"TMPDIR {wanted}: cannot write there ({error.strerror}); set TMPDIR to a directory "
                        "where you can write, with room for the model's copy") from None
    return wanted


def held_temporary_dir(folder: str, prefix: str) -> tuple[str, object]:
    """A new directory in ``folder`` named ``prefix``..., and the lock that marks it as this run's;
    leftovers of the same prefix that no run holds are removed first."""
    remove_leftovers(folder, prefix)
    path = tempfile.mkdtemp(prefix=f"{prefix}{host_tag()}-", dir=folder)
    return path, hold(path)


@contextlib.contextmanager
def signals_deferred():
    """Ctrl-C and SIGTERM held back until the block is done, then delivered: an output moved into
    place and recorded as written is one step, so an interruption never reports a complete output as
    missing (nor the reverse). Outside the main thread, signals are not ours: a no-op; so where a
    handler was installed outside Python (it could not be put back)."""
    pending = []
    ours = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or any(signal.getsignal(s) is None for s in ours):
        yield
        return
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in ours}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:  # its handler runs now, as if it had just come; a SIGTERM over a Ctrl-C (the stronger stop)
            signal.raise_signal(signal.SIGTERM if signal.SIGTERM in pending else pending[0])


def current_umask() -> int:
    """The process's umask, read without changing it (os.umask sets it, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_umask_says(folder: str) -> None:
    """The modes a plain mkdir and open would have given: the temporary directory is private while
    it is written (mkdtemp: 0700), and some writers make their files 0600."""
    mask = current_umask()

    def as_mkdir_says(d):  # a directory made in a setgid one is setgid (its files take its group): kept
        os.chmod(d, 0o777 & ~mask | os.stat(d).st_mode & stat.S_ISGID)

    as_mkdir_says(folder)
    for parent, dirs, files in os.walk(folder):
        for d in dirs:
            as_mkdir_says(os.path.join(parent, d))
        for f in files:
            path = os.path.join(parent, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask | os.stat(path).st_mode & 0o111 & ~mask)


def save_atomically(out_dir: str, write, overwrite: bool = False, marker: str = "finepurify_report.json") -> None:
    """Runs write(tmp_dir) and renames tmp_dir to out_dir: a crash leaves no half-written out_dir
    (and a kill leaves a partial directory that the next write of out_dir removes). ``overwrite``
    replaces an out_dir holding ``marker`` (one written the same way), never another."""
    out_dir = os.path.abspath(out_dir)
    check_output_dir(out_dir, overwrite, option="output directory", marker=marker)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp, lock = held_temporary_dir(parent, "." + os.path.basename(out_dir) + ".partial-")
    old = old_lock = None
    written = False
    try:
        write(tmp)
        _as_umask_says(tmp)
        if os.path.exists(out_dir):
            # The output replaced moves aside first (an interruption while it is deleted leaves it
            # there, held like the partial one, for the next write to remove).
            old, old_lock = held_temporary_dir(parent, "." + os.path.basename(out_dir) + ".old-")
            with signals_deferred():  # the earlier output is never out of place when a signal is taken
                os.replace(out_dir, os.path.join(old, "x"))
                try:
                    os.replace(tmp, out_dir)
                    written = True
                except BaseException:
                    os.replace(os.path.join(old, "x"), out_dir)  # the earlier output back in place
                    raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            with signals_deferred():
                os.replace(tmp, out_dir)
                written = True
    except BaseException as stop:
        if written:  # Ctrl-C, SIGTERM after the move: the new output is complete all the same
            stop.output_written = out_dir
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if old is not None and not os.listdir(old):
                os.rmdir(old)
        except OSError:  # removed whole before the interruption
            pass
        raise
    finally:
        release(old_lock)
        release(lock)


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
