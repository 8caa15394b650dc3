"""The toxicity judges' files, shipped inside pip packages and read without importing them.

- ``tox-block==0.1.2``: the BiLSTM toxicity model (Keras h5) and its tokenizer (a pickle).
  Its ``__init__`` is harmless but its modules pull TensorFlow, and the pickle must never reach
  ``pickle.load``: we only read the files (see ``scorer.py`` and ``safe_pickle.py``).
- ``toxic-comment-classifier==0.3.0``: a second BiLSTM toxicity judge, a Keras 3 weights file and
  its pickled Keras tokenizer (its modules import TensorFlow; its pickle is read like tox-block's).

Each file is sha256-pinned (``package_files``).
"""

from __future__ import annotations

from pathlib import Path

from ..package_files import package_file, read_verified, verify_file

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


def toxblock_files() -> tuple[Path, Path]:
    """(model .h5, encoder .pkl) of tox-block 0.1.2, sha256-verified."""
    model = package_file(TOXBLOCK_PACKAGE, TOXBLOCK_DIST, TOXBLOCK_MODEL)
    encoder = package_file(TOXBLOCK_PACKAGE, TOXBLOCK_DIST, TOXBLOCK_ENCODER)
    verify_file(model, TOXBLOCK_MODEL_SHA256, TOXBLOCK_DIST)
    verify_file(encoder, TOXBLOCK_ENCODER_SHA256, TOXBLOCK_DIST)
    return model, encoder


def toxblock_pins() -> tuple[str, str]:
    """The pinned sha256 of tox-block's (model, encoder): what its prepared scorer is keyed by."""
    return TOXBLOCK_MODEL_SHA256, TOXBLOCK_ENCODER_SHA256


def toxblock_bytes() -> tuple[bytes, bytes]:
    """(model .h5 bytes, encoder .pkl bytes), each hashed as read (one read, no re-open race)."""
    model = package_file(TOXBLOCK_PACKAGE, TOXBLOCK_DIST, TOXBLOCK_MODEL)
    encoder = package_file(TOXBLOCK_PACKAGE, TOXBLOCK_DIST, TOXBLOCK_ENCODER)
    return (read_verified(model, TOXBLOCK_MODEL_SHA256, TOXBLOCK_DIST),
            read_verified(encoder, TOXBLOCK_ENCODER_SHA256, TOXBLOCK_DIST))


def tcc_bytes() -> tuple[bytes, bytes]:
    """(weights .h5 bytes, tokenizer .pickle bytes) of toxic-comment-classifier 0.3.0, each
    hashed as read."""
    model = package_file(TCC_PACKAGE, TCC_DIST, TCC_MODEL)
    tokenizer = package_file(TCC_PACKAGE, TCC_DIST, TCC_TOKENIZER)
    return (read_verified(model, TCC_MODEL_SHA256, TCC_DIST),
            read_verified(tokenizer, TCC_TOKENIZER_SHA256, TCC_DIST))


def tcc_pins() -> tuple[str, str]:
    """The pinned sha256 of toxic-comment-classifier's (weights, tokenizer)."""
    return TCC_MODEL_SHA256, TCC_TOKENIZER_SHA256


def tcc_files() -> tuple[Path, Path]:
    """(weights .h5, tokenizer .pickle) of toxic-comment-classifier 0.3.0, sha256-verified."""
    model = package_file(TCC_PACKAGE, TCC_DIST, TCC_MODEL)
    tokenizer = package_file(TCC_PACKAGE, TCC_DIST, TCC_TOKENIZER)
    verify_file(model, TCC_MODEL_SHA256, TCC_DIST)
    verify_file(tokenizer, TCC_TOKENIZER_SHA256, TCC_DIST)
    return model, tokenizer


__all__ = ["toxblock_files", "toxblock_bytes", "toxblock_pins", "tcc_files", "tcc_bytes", "tcc_pins",
           "TOXBLOCK_MODEL_SHA256", "TOXBLOCK_ENCODER_SHA256", "TCC_MODEL_SHA256", "TCC_TOKENIZER_SHA256"]
