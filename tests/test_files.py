"""Files that cannot be clobbered: the atomic writer and the folder lock (fgdilp_cpp/files.py), and
`fgdilp-cpp eval` through a subprocess refusing a second run on its folder and a corrupt run.json."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp.files import LOCK_NAME, FolderLock, FolderLockedError, refuse_shared_dir, write_atomic


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


# ---- write_atomic -----------------------------------------------------------------------------------
def test_write_atomic_modes_and_content(tmp_path):
    old = os.umask(0o022)
    try:
        assert write_atomic(tmp_path / "a.json", "héllo\n") == tmp_path / "a.json"
        assert (tmp_path / "a.json").read_text(encoding="utf-8") == "héllo\n" and _mode(tmp_path / "a.json") == 0o644
        write_atomic(tmp_path / "a.json", b"\x00bytes", private=True)      # replaces, and narrows the mode
        assert (tmp_path / "a.json").read_bytes() == b"\x00bytes" and _mode(tmp_path / "a.json") == 0o600
        os.umask(0o077)                                                    # a stricter umask is honoured
        write_atomic(tmp_path / "b.md", "x")
        assert _mode(tmp_path / "b.md") == 0o600
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.md"]    # no temp file left


def test_write_atomic_refuses_a_symlink_and_leaves_its_target_alone(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = tmp_path / "chat.json"
    link.symlink_to(victim)
    with pytest.raises(FgdilpError, match="symbolic link"):
        write_atomic(link, "overwritten?")
    assert victim.read_text() == "precious" and link.is_symlink()
    dangling = tmp_path / "report.json"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FgdilpError, match="symbolic link"):
        write_atomic(dangling, "x")
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "dir").mkdir()
    with pytest.raises(FgdilpError, match="not a regular file"):
        write_atomic(tmp_path / "dir", "x")


def test_write_atomic_failure_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    target.write_text("old")

    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        write_atomic(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_concurrent_writers_never_mix(tmp_path):
    """Each writer has its own temp file (a fixed FILE.tmp name would let two interleave)."""
    target = tmp_path / "f.txt"
    payloads = [bytes([65 + i]) * 200_000 for i in range(8)]
    errors = []

    def writer(data):
        try:
            for _ in range(5):
                write_atomic(target, data)
        except Exception as exc:          # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and target.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


# ---- FolderLock -------------------------------------------------------------------------------------
HOLD = """
import sys, time
from fgdilp_cpp.files import FolderLock
FolderLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_names_the_holder_and_dies_with_it(tmp_path):
    folder = tmp_path / "out"
    proc = _holder(folder)
    try:
        t0 = time.monotonic()
        with pytest.raises(FolderLockedError) as err:
            FolderLock(folder, what="another eval run").acquire()
        assert time.monotonic() - t0 < 1.0                       # refused at once, no waiting
        msg = str(err.value)
        assert f"pid {proc.pid} " in msg and "another eval run" in msg and "time.sleep" in msg
        assert "\n" not in msg
    finally:
        proc.kill()
        proc.wait()
    assert (folder / LOCK_NAME).read_text().startswith(f"{proc.pid}\n")     # a stale lock file ...
    with FolderLock(folder) as lock:                                       # ... is no obstacle
        assert (folder / LOCK_NAME).read_text().startswith(f"{os.getpid()}\n")
        with FolderLock(folder):                                           # nested in one process
            pass
        assert lock._key is not None
        probe = subprocess.run([sys.executable, "-c", HOLD, str(folder)], capture_output=True, text=True,
                               timeout=60)
        assert probe.returncode == 1 and f"pid {os.getpid()}" in probe.stderr   # still held after the nest
    assert (folder / LOCK_NAME).read_text() == ""                         # released: no holder named
    proc = _holder(folder)                                                 # and another process may take it
    proc.kill()
    proc.wait()


def test_lock_file_symlink_is_refused(tmp_path):
    (tmp_path / "elsewhere").write_text("keep")
    (tmp_path / LOCK_NAME).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FgdilpError, match="symbolic link"):
        FolderLock(tmp_path).acquire()
    assert (tmp_path / "elsewhere").read_text() == "keep"


# ---- fgdilp-cpp eval through the CLI -----------------------------------------------------------------
def _eval(model, prompts, out, *extra):
    return [sys.executable, "-m", "fgdilp_cpp.cli", "eval", "-m", str(model), "--prompts", str(prompts),
            "--methods", "none", "--samples", "2", "-n", "3", "--out", str(out), "--judges", "none",
            "-c", "256", "-t", "1", "--no-progress", *extra]


def test_eval_cli_refuses_a_second_run_and_a_corrupt_run_json(tiny_llama, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"the cat number {i} sat on\n" for i in range(400)))
    out = tmp_path / "out"
    first = subprocess.Popen(_eval(tiny_llama[0], prompts, out), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        lock_file = out / LOCK_NAME
        while not (lock_file.is_file() and lock_file.read_text()):     # the holder has written its pid
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGSTOP)           # certainly alive and holding the lock while we look
        t0 = time.monotonic()
        second = subprocess.run(_eval(tiny_llama[0], prompts, out), capture_output=True, text=True, timeout=120)
        took = time.monotonic() - t0
        assert second.returncode == 1 and "Traceback" not in second.stderr
        line = second.stderr.strip()
        assert line.startswith("error: ") and "\n" not in line
        assert f"is in use by another eval run: pid {first.pid} (" in line and "fgdilp_cpp.cli eval" in line
        assert took < 30, took                     # refused before any model or scorer is loaded
    finally:
        first.kill()                                 # SIGKILL works on a stopped process: a crash
        first.wait()

    # the dead run's lock file stays behind and is no obstacle; the run resumes
    assert (out / LOCK_NAME).exists()
    short = tmp_path / "short.txt"
    short.write_text("".join(prompts.read_text().splitlines(keepends=True)[:2]))
    again = subprocess.run(_eval(tiny_llama[0], short, out), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "report.json").read_text())["run"]["complete"] is True

    # a corrupt run.json: refused with one line and exit 1, the file left as it was
    (out / "run.json").write_text('{"config": {"samples": 2, "n_pre')
    gens = (out / "generations.jsonl").read_bytes()
    bad = subprocess.run(_eval(tiny_llama[0], short, out), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "run.json is corrupt" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert (out / "run.json").read_text() == '{"config": {"samples": 2, "n_pre'
    assert (out / "generations.jsonl").read_bytes() == gens


def test_lock_is_refused_to_another_thread_of_the_holder(tmp_path):
    errors = []

    def other_thread():
        try:
            with FolderLock(tmp_path):
                pass
        except FolderLockedError as exc:
            errors.append(str(exc))

    with FolderLock(tmp_path):
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert len(errors) == 1 and "another thread of this process" in errors[0]
    t = threading.Thread(target=other_thread)             # released: now it may
    t.start()
    t.join()
    assert len(errors) == 1


def test_shared_folders_are_refused_for_private_files(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    assert refuse_shared_dir(mine) == mine
    mine.chmod(0o755)                                     # readable by others: an ordinary folder, allowed
    assert refuse_shared_dir(mine) == mine
    for mode in (0o777, 0o1777):                          # writable by everyone, sticky or not
        mine.chmod(mode)
        with pytest.raises(FgdilpError, match="writable by every user"):
            refuse_shared_dir(mine)
    if os.getuid() == 0:                                  # root can hand a folder to someone else
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 54321, 54321)
        with pytest.raises(FgdilpError, match="belongs to another user"):
            refuse_shared_dir(theirs)
