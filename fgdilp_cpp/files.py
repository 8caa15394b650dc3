"""Files that cannot be clobbered: atomic writes and an exclusive lock on a folder.

write_atomic(path, data), or write_atomic_with(path, write) for writers that need a file name:
the new content goes to a unique temp file in the same folder (tempfile.mkstemp, so two writers
never share one), is flushed and fsynced, gets its mode, and is renamed over `path` (os.replace,
atomic on POSIX); the folder is fsynced so that the rename itself survives a crash. A reader sees
the old file or the new one, never a mix, and a failed write leaves no temp file behind.

Symbolic links: a target that is a symlink is REFUSED (FgdilpError), never written through and
never silently replaced. Writing through a link would let whoever planted it redirect our output
(a chat transcript into another file); replacing it would silently break a link the user made on
purpose. A link planted between the check and the rename is still never followed: rename(2)
replaces the link itself. The folders above the file may be links (the user's choice of disk).

Modes: `private=True` gives 0600 (chat history); otherwise `mode` (default 0644), both masked by
the process umask like an ordinary open().

refuse_shared_dir(folder): refuses a folder others may write in or that another user owns (the
chat history's folder: private files never go where others can plant links or read them).

sha256_file(path): a file's sha256, read in chunks (never the whole file in memory).

FolderLock(folder): an exclusive fcntl.flock on FOLDER/.fgdilp.lock, held while the block runs.
A second holder, in this process or another, is refused at once with FolderLockedError naming the
holder (pid and command line, which the holder writes into the lock file). The kernel drops a
flock when its process dies, so the lock file of a crashed run is no obstacle; the file is never
deleted (deleting it would let two processes lock two different inodes). The thread that holds
the lock may take it again (nested blocks share one flock: the CLI locks before loading models,
then run_eval locks for its run); another thread of the same process is refused like a process.

This module imports nothing of the package but errors.py.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Optional, Union

from .errors import FgdilpError

LOCK_NAME = ".fgdilp.lock"


class FolderLockedError(FgdilpError):
    """Another process (or another thread of this one) holds the folder's lock."""


def _umask() -> int:
    """The process umask without changing it (os.umask would, for a moment, in every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def sha256_file(path: Union[str, os.PathLike], chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file, streamed `chunk` bytes at a time (OSError if it cannot be read)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(folder: Union[str, os.PathLike]) -> None:
    """Make a rename or a new file in `folder` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def refuse_symlink(path: Union[str, os.PathLike]) -> Path:
    p = Path(path)
    if p.is_symlink():
        raise FgdilpError(f"{p} is a symbolic link; not writing through it (remove the link or choose "
                          "another path)")
    return p


def write_atomic(path: Union[str, os.PathLike], data: Union[str, bytes], *, private: bool = False,
                 mode: int = 0o644) -> Path:
    """Replace `path` with `data` (str: UTF-8) atomically and durably; see the module doc.
    private: mode 0600. Raises FgdilpError for a symlink target, OSError for I/O failures."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)

    def write(tmp: str) -> None:
        with open(tmp, "r+b") as f:
            f.write(raw)

    return write_atomic_with(path, write, private=private, mode=mode)


def write_atomic_with(path: Union[str, os.PathLike], write: Callable[[str], None], *, private: bool = False,
                      mode: int = 0o644) -> Path:
    """write_atomic for writers that need a file name (gguf.GGUFWriter): write(tmp) fills the
    unique temp file `tmp` (created empty, 0600, in the target's folder); it is then fsynced, given
    its mode and renamed over `path`. On any failure the temp file is removed and `path` is as
    it was."""
    p = refuse_symlink(path)
    if p.exists() and not p.is_file():
        raise FgdilpError(f"{p} exists and is not a regular file")
    folder = p.parent if str(p.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{p.name}.", suffix=".tmp")   # 0600, O_EXCL
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fchmod(f.fileno(), (0o600 if private else mode) & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder)
    return p


def make_private_dir(folder: Union[str, os.PathLike]) -> Path:
    """Create `folder` (and its parents) if missing; the folder itself is created 0700. An
    existing folder is left as the user made it."""
    p = Path(folder)
    if not p.is_dir():
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            p.mkdir(mode=0o700)
        except FileExistsError:
            if not p.is_dir():
                raise
    return p


def refuse_shared_dir(folder: Union[str, os.PathLike]) -> Path:
    """Refuse (FgdilpError) a folder that others may write in (world-writable) or that another user
    owns: whoever can write there can plant links or read what we write, so private files (the
    chat history) never go there. The user's own folders with ordinary modes pass."""
    p = Path(folder)
    st = p.stat()
    if st.st_mode & 0o002:
        raise FgdilpError(f"{p} is writable by every user (mode {stat.S_IMODE(st.st_mode):o}); not writing "
                          f"private files there (chmod 700 it or choose another folder)")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise FgdilpError(f"{p} belongs to another user; not writing private files there (choose another folder)")
    return p


# ---- folder lock -----------------------------------------------------------------------------------
_held: dict[tuple[int, int], list] = {}      # (st_dev, st_ino) of the folder -> [fd, depth, thread]
_held_guard = threading.Lock()


def _describe_holder(text: str) -> str:
    """'pid N (command line)' from the holder's lock file text; the command line is read live
    from /proc when possible (it is the holder's own), else from what it wrote."""
    lines = text.splitlines()
    try:
        pid = int(lines[0].strip())
    except (IndexError, ValueError):
        return "another process (it has not written its pid yet)"
    cmd = ""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = " ".join(a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a)
    except OSError:
        cmd = lines[1].strip() if len(lines) > 1 else ""
    cmd = " ".join("".join(c if c.isprintable() else " " for c in cmd).split())   # one line, no escapes
    if len(cmd) > 300:
        cmd = cmd[:297] + "..."
    return f"pid {pid}" + (f" ({cmd})" if cmd else "")


class FolderLock:
    """`with FolderLock(folder, what="an eval run"):` holds the folder's lock (see the module doc)."""

    def __init__(self, folder: Union[str, os.PathLike], what: str = "another run"):
        self.folder, self.what = Path(folder), what
        self._key: Optional[tuple[int, int]] = None

    def acquire(self) -> "FolderLock":
        """Take the lock (creating the folder if needed) or raise FolderLockedError at once."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            st = os.stat(self.folder)
        except OSError as exc:
            raise FgdilpError(f"cannot use the folder {self.folder}: {exc.strerror}") from None
        key = (st.st_dev, st.st_ino)
        with _held_guard:
            if key in _held:
                if _held[key][2] != threading.get_ident():
                    raise FolderLockedError(f"{self.folder} is in use by {self.what} in another thread of "
                                            "this process; wait for it to finish or use another folder")
                _held[key][1] += 1                 # nested in the thread that holds it
                self._key = key
                return self
            path = self.folder / LOCK_NAME
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise FgdilpError(f"{path} is a symbolic link; remove it") from None
                raise FgdilpError(f"cannot create the lock file {path}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                try:
                    text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
                finally:
                    os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                    raise FolderLockedError(f"{self.folder} is in use by {self.what}: "
                                            f"{_describe_holder(text)}; wait for it to finish or use "
                                            "another folder") from None
                raise FgdilpError(f"cannot lock {path}: {exc.strerror}") from None
            cmd = " ".join(sys.argv).replace("\n", " ")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n{cmd}\n".encode("utf-8", "replace"), 0)
            _held[key] = [fd, 1, threading.get_ident()]
            self._key = key
            return self

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None:
            return
        with _held_guard:
            entry = _held.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                try:
                    os.ftruncate(entry[0], 0)       # no holder named any more
                finally:
                    os.close(entry[0])              # closing drops the flock

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
