"""Temporaries a killed run leaves behind: each is held under a lock while its run lives, and the
next write of the same kind in the same folder removes the ones nobody holds, never a live run's."""
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import torch

from finepurify_ext import outputs
from finepurify_ext.hessian import save_hessian
from finepurify_ext.outputs import hold, release, save_atomically


def killed_run(folder, prefix):
    """A temporary made by a process that a SIGKILL then ended (its lock went with it)."""
    script = textwrap.dedent(f"""
        import os, signal
        from finepurify_ext.outputs import held_temporary_dir
        path, _ = held_temporary_dir({str(folder)!r}, {prefix!r})
        with open(os.path.join(path, "weights"), "wb") as f:
            f.write(b"x" * 4096)
        print(path, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == -9, run.stderr
    return run.stdout.strip()


def backdate(*paths):
    old = time.time() - 2 * outputs.LEFTOVER_MIN_AGE_S
    for path in paths:
        os.utime(path, (old, old))


def test_the_next_write_removes_a_killed_runs_partial_output_and_nothing_else(tmp_path, capsys):
    out = tmp_path / "purified"
    killed = killed_run(tmp_path, ".purified.partial-")
    live, lock = outputs.held_temporary_dir(str(tmp_path), ".purified.partial-")  # a run still writing
    tag = outputs.host_tag()
    young = tempfile.mkdtemp(prefix=f".purified.partial-{tag}-", dir=tmp_path)  # made, not yet locked
    other = tempfile.mkdtemp(prefix=f".other.partial-{tag}-", dir=tmp_path)  # another output's
    # Another node's, on a file system whose flocks may be per node: never judged from here.
    elsewhere = tempfile.mkdtemp(prefix=".purified.partial-othernode-", dir=tmp_path)
    backdate(killed, live, other, elsewhere)
    try:
        assert os.path.isdir(killed) and os.listdir(killed) == ["weights"]
        save_atomically(str(out), lambda tmp: open(os.path.join(tmp, "done"), "w").close())
        assert os.listdir(out) == ["done"]
        assert not os.path.exists(killed)
        assert os.path.isdir(live) and os.path.isdir(young) and os.path.isdir(other) and os.path.isdir(elsewhere)
        assert f"finepurify: removed {killed} (0.00 GB), left by a run that was killed" in capsys.readouterr().err
        backdate(young)  # older now, and still nobody's: the next write takes it
        save_atomically(str(out), lambda tmp: None, overwrite=True, marker="done")
        assert not os.path.exists(young) and os.path.isdir(live)
    finally:
        release(lock)
    # Nothing left of this test's own writes.
    assert sorted(os.listdir(tmp_path)) == sorted(["purified"] + [os.path.basename(p) for p in (live, other, elsewhere)])


def test_the_next_hessian_save_removes_a_killed_runs_partial_file(tmp_path, capsys):
    path = str(tmp_path / "h.safetensors")
    killed, live = (f"{path}.partial-{outputs.host_tag()}-{pid}" for pid in (4000000, 4000001))
    for partial in (killed, live):
        with open(partial, "wb") as f:
            f.write(b"x" * 100)
    backdate(killed, live)
    lock = hold(live)
    try:
        save_hessian(path, {"w": torch.rand(3, 5)}, 1)
        assert not os.path.exists(killed) and os.path.exists(live) and os.path.exists(path)
        assert f"removed {killed}" in capsys.readouterr().err
    finally:
        release(lock)


def test_a_lock_is_held_while_the_output_is_written(tmp_path):
    """The partial directory is locked while write() runs: a second run's cleaning cannot take it."""
    seen = []

    def write(tmp):
        backdate(tmp)
        seen.append(outputs.remove_leftovers(str(tmp_path), ".o.partial-"))
        seen.append(os.path.isdir(tmp))

    save_atomically(str(tmp_path / "o"), write)
    assert seen == [[], True]


def test_a_file_system_without_locks_writes_and_removes_nothing(tmp_path, monkeypatch):
    """Where flock fails (some network file systems), outputs are still written, and no temporary is
    removed: a live run's cannot be told from a killed one's."""
    import errno

    killed = killed_run(tmp_path, ".o.partial-")
    backdate(killed)

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(outputs.fcntl, "flock", no_locks)
    save_atomically(str(tmp_path / "o"), lambda tmp: open(os.path.join(tmp, "done"), "w").close())
    assert os.listdir(tmp_path / "o") == ["done"] and os.path.isdir(killed)


def test_replacing_an_output_puts_the_old_one_back_if_the_new_cannot_move_in(tmp_path, monkeypatch):
    """--overwrite: the earlier output moves aside (held, like the partial one) and is deleted once
    the new one is in place; if the new one cannot move in, the earlier one is put back."""
    out = str(tmp_path / "o")
    save_atomically(out, lambda tmp: open(os.path.join(tmp, "first"), "w").close())
    replace = os.replace

    def fails_into_place(src, dst):
        if dst == out and ".partial-" in src:
            raise OSError(28, "No space left on device")
        return replace(src, dst)
    monkeypatch.setattr(outputs.os, "replace", fails_into_place)
    try:
        save_atomically(out, lambda tmp: open(os.path.join(tmp, "second"), "w").close(), overwrite=True, marker="first")
    except OSError as error:
        assert error.errno == 28
    else:
        raise AssertionError("the failed rename was not raised")
    monkeypatch.undo()
    assert os.listdir(out) == ["first"] and os.listdir(tmp_path) == ["o"]
    save_atomically(out, lambda tmp: open(os.path.join(tmp, "second"), "w").close(), overwrite=True, marker="first")
    assert os.listdir(out) == ["second"] and os.listdir(tmp_path) == ["o"]


def _second_write_interrupted_yet_written(out):
    """Replaces ``out`` (holding "first") with "second"; the interrupt must come, naming the new output."""
    try:
        save_atomically(out, lambda tmp: open(os.path.join(tmp, "second"), "w").close(), overwrite=True, marker="first")
    except KeyboardInterrupt as stop:
        assert stop.output_written == os.path.abspath(out)
    else:
        raise AssertionError("the interrupt was not raised")


def test_an_interrupt_while_the_replaced_output_is_deleted_says_the_new_one_is_complete(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM after the new output moved in, while the one it replaced is being deleted: the
    interrupt goes on (the command stops) but names the complete output; the next write sweeps the rest."""
    out = str(tmp_path / "o")
    save_atomically(out, lambda tmp: open(os.path.join(tmp, "first"), "w").close())
    rmtree = outputs.shutil.rmtree

    def interrupted(path, *args, **kwargs):
        if ".old-" in path:
            raise KeyboardInterrupt
        return rmtree(path, *args, **kwargs)
    monkeypatch.setattr(outputs.shutil, "rmtree", interrupted)
    _second_write_interrupted_yet_written(out)
    monkeypatch.undo()
    assert os.listdir(out) == ["second"]
    (old,) = [e for e in os.listdir(tmp_path) if ".old-" in e]
    backdate(tmp_path / old)
    save_atomically(out, lambda tmp: open(os.path.join(tmp, "third"), "w").close(), overwrite=True, marker="second")
    assert os.listdir(out) == ["third"] and os.listdir(tmp_path) == ["o"]


def _interrupted_after(real_replace, moving):
    """os.replace that moves the file, then takes a Ctrl-C at once (as if it came at that instant):
    before the output could be recorded as written, without the signals held over the rename."""
    import signal

    def replace(src, dst):
        real_replace(src, dst)
        if moving(str(src), str(dst)):
            signal.raise_signal(signal.SIGINT)
    return replace


def test_an_interrupt_right_after_the_output_moved_in_says_it_is_complete(tmp_path, monkeypatch):
    """Ctrl-C the instant the new output is in place, first write and replacement alike: the output
    is complete and the interrupt says so (it had said nothing was written, or put the old one back
    over the complete new one)."""
    out = str(tmp_path / "o")
    real = os.replace
    monkeypatch.setattr(outputs.os, "replace", _interrupted_after(real, lambda src, dst: ".partial-" in src))
    for content, overwrite in (("first", False), ("second", True)):
        try:
            save_atomically(out, lambda tmp: open(os.path.join(tmp, content), "w").close(), overwrite=overwrite,
                            marker="first")
        except KeyboardInterrupt as stop:
            assert stop.output_written == os.path.abspath(out)
        else:
            raise AssertionError("the interrupt was not raised")
        assert os.listdir(out) == [content]
    from finepurify_ext import hessian

    path = str(tmp_path / "h.safetensors")
    monkeypatch.setattr(hessian.os, "replace", _interrupted_after(real, lambda src, dst: dst == path))
    try:
        save_hessian(path, {"w": torch.rand(3)}, 1)
    except KeyboardInterrupt as stop:
        assert stop.output_written == path
    else:
        raise AssertionError("the interrupt was not raised")
    assert os.path.isfile(path)


def test_outputs_take_the_modes_the_umask_gives(tmp_path):
    """The output directory was mkdtemp's 0700 and a model file 0600 (transformers writes it so),
    whatever the umask: a shared group could not read a purified model."""
    def write(tmp):
        os.close(os.open(os.path.join(tmp, "model.safetensors"), os.O_CREAT | os.O_WRONLY, 0o600))
        os.mkdir(os.path.join(tmp, "plots"), 0o700)
        open(os.path.join(tmp, "plots", "a.png"), "w").close()

    before = os.umask(0o022)
    try:
        for mask in (0o022, 0o077, 0o002):
            os.umask(mask)
            assert outputs.current_umask() == mask
            out = tmp_path / f"o{mask:o}"
            save_atomically(str(out), write)
            modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
            assert modes == {".": 0o777 & ~mask, "plots": 0o777 & ~mask, "model.safetensors": 0o666 & ~mask,
                             "plots/a.png": 0o666 & ~mask}, (oct(mask), modes)
    finally:
        os.umask(before)


def test_an_output_in_a_setgid_folder_stays_setgid(tmp_path):
    """A shared folder made setgid (chmod g+s: what is made in it takes its group): the modes the
    umask gives cleared the bit on the output and its folders, as a plain mkdir keeps it."""
    import stat

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o2775)
    if not shared.stat().st_mode & stat.S_ISGID:
        pytest.skip("this file system does not keep the setgid bit of a directory")

    def write(tmp):
        os.mkdir(os.path.join(tmp, "plots"))
        open(os.path.join(tmp, "plots", "a.png"), "w").close()

    save_atomically(str(shared / "out"), write)
    for folder in (shared / "out", shared / "out" / "plots"):
        assert folder.stat().st_mode & stat.S_ISGID, oct(folder.stat().st_mode)
    assert not (shared / "out" / "plots" / "a.png").stat().st_mode & stat.S_ISGID


def test_an_interrupt_as_the_earlier_output_moves_aside_never_loses_it(tmp_path, monkeypatch):
    """Ctrl-C the instant the earlier output moved aside: it was left in .old-*, the new one deleted,
    and the next write removed the old one too. Now the signal waits for the new one to be in place."""
    out = str(tmp_path / "o")
    save_atomically(out, lambda tmp: open(os.path.join(tmp, "first"), "w").close())
    monkeypatch.setattr(outputs.os, "replace", _interrupted_after(os.replace, lambda src, dst: src == out))
    _second_write_interrupted_yet_written(out)
    assert os.listdir(out) == ["second"]


def test_signals_held_back_are_delivered_the_strongest_first():
    """A Ctrl-C and a SIGTERM both held back while an output moves into place: the SIGTERM (a
    scheduler's stop, exit 143) was dropped for the Ctrl-C that came first."""
    import signal

    class Stopped(Exception):
        pass

    def stop(signum, frame):
        raise Stopped(signum)
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(Stopped) as stopped:
            with outputs.signals_deferred():
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGTERM)
                moved = True
        assert moved and stopped.value.args == (signal.SIGTERM,)
        with pytest.raises(Stopped) as stopped:
            with outputs.signals_deferred():
                signal.raise_signal(signal.SIGINT)
        assert stopped.value.args == (signal.SIGINT,)
        assert signal.getsignal(signal.SIGINT) is stop and signal.getsignal(signal.SIGTERM) is stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
