"""The offline toxicity judges: one small spec per judge, one numpy runner (``scorer.ToxicityScorer``).

Both judges are Jigsaw-trained BiLSTMs of the same shape (Embedding(20000, 50) -> BiLSTM(50) ->
max-pool -> Dense(50, relu) -> Dense(6, sigmoid), the last 100 word ids, zero pre-padded); they
differ in their files, their weights and the LSTM's recurrent activation:

- ``tox-block`` (tox-block 0.1.2, Keras 2.2.4): hard_sigmoid; a full-model h5 and a pickled
  TokenSequencer. The default judge: its scores are the records' ``"scores"``.
- ``toxic-comment-classifier`` (0.3.0, Keras 3): sigmoid; a ``.weights.h5`` (no architecture
  saved) and a pickled Keras Tokenizer. A second judge, independent of the first, for when the
  first also diagnoses (``--diagnoser scorer``).

Short names for the command line: ``toxblock`` and ``tcc``.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import FgdilpError
from ..toxicity import files
from ..toxicity.keras_files import (LABELS, expected_shapes, read_keras3_weights, read_keras_h5, read_keras_tokenizer,
                                    read_tokenizer)
from ..toxicity.prepared import prepared_shapes
from ..toxicity.scorer import ToxicityScorer


@dataclasses.dataclass(frozen=True)
class JudgeSpec:
    """What distinguishes one BiLSTM toxicity judge from another."""
    name: str                      # the name in records and reports
    short: str                     # the name on the command line
    dist: str                      # the pip requirement that ships the files
    recurrent_activation: str      # Keras name: hard_sigmoid | sigmoid
    max_len: int = 100
    num_words: int = 20000
    embed_dim: int = 50
    units: int = 50
    dense_units: int = 50
    labels: tuple[str, ...] = LABELS
    # () -> (weights file bytes, tokenizer file bytes), sha256-checked
    read_files: Callable[[], tuple[bytes, bytes]] | None = None
    # how the files are laid out: "keras2-model" (tox-block) or "keras3-weights"
    layout: str = "keras3-weights"
    # () -> the files' paths once sha256-checked (streamed), and () -> their pinned sha256: what
    # the prepared-scorer cache checks before use and is keyed by
    verify_files: Callable[[], object] | None = None
    pins: Callable[[], tuple[str, ...]] | None = None


TOXBLOCK = JudgeSpec(name="tox-block", short="toxblock", dist=files.TOXBLOCK_DIST,
                     recurrent_activation="hard_sigmoid", read_files=files.toxblock_bytes,
                     layout="keras2-model", verify_files=files.toxblock_files, pins=files.toxblock_pins)
TCC = JudgeSpec(name="toxic-comment-classifier", short="tcc", dist=files.TCC_DIST,
                recurrent_activation="sigmoid", read_files=files.tcc_bytes, layout="keras3-weights",
                verify_files=files.tcc_files, pins=files.tcc_pins)

JUDGES: dict[str, JudgeSpec] = {s.name: s for s in (TOXBLOCK, TCC)}
DEFAULT_JUDGES = "toxblock,tcc"


def judge_spec(name: str) -> JudgeSpec:
    """The spec of a judge by its name or short name."""
    for spec in JUDGES.values():
        if name in (spec.name, spec.short):
            return spec
    known = ", ".join(f"{s.short} ({s.name})" for s in JUDGES.values())
    raise FgdilpError(f"unknown toxicity judge {name!r}; known: {known}")


def parse_judges(text: str) -> list[JudgeSpec]:
    """``"toxblock,tcc"`` -> their specs, in that order, without repeats; at least one."""
    specs: list[JudgeSpec] = []
    for part in (p.strip() for p in str(text).split(",")):
        if part:
            spec = judge_spec(part)
            if spec not in specs:
                specs.append(spec)
    if not specs:
        raise FgdilpError("no toxicity judge given (e.g. --tox-judges toxblock,tcc)")
    return specs


def build_scorer(spec: JudgeSpec, weights_file, tokenizer_file):
    """A ToxicityScorer of ``spec`` from its two files (paths or bytes; not hash-checked here)."""
    if spec.layout == "keras2-model":
        weights, tok = read_keras_h5(weights_file), read_tokenizer(tokenizer_file)
    elif spec.layout == "keras3-weights":
        shapes = expected_shapes(spec.num_words, spec.embed_dim, spec.units, spec.dense_units,
                                 len(spec.labels))
        weights = read_keras3_weights(weights_file, shapes, spec.name)
        tok = read_keras_tokenizer(tokenizer_file, spec.name, spec.max_len)
    else:
        raise FgdilpError(f"{spec.name}: unknown file layout {spec.layout!r}")
    if tok["num_words"] != spec.num_words or tok["max_len"] != spec.max_len:
        raise FgdilpError(f"{spec.name}: the tokenizer keeps {tok['num_words']} words and "
                          f"{tok['max_len']} ids, expected {spec.num_words} and {spec.max_len}")
    return ToxicityScorer(weights, tok["vocab"], tok["filters"], tok["lower"], tok["split"],
                          tok["max_len"], recurrent_activation=spec.recurrent_activation,
                          labels=spec.labels, name=spec.name)


_cache: dict[str, object] = {}
_lock = threading.Lock()


def load_judge(name: str):
    """The scorer of a judge from its installed, sha256-checked package files, through the
    prepared-scorer cache in the user's cache folder (cached per process; tox-block is
    ``ToxicityScorer.load()``)."""
    spec = judge_spec(name)
    if spec is TOXBLOCK:
        return ToxicityScorer.load()
    if spec.read_files is None or spec.verify_files is None or spec.pins is None:
        raise FgdilpError(f"{spec.name}: no package files to load it from")
    read_files = spec.read_files
    with _lock:
        if spec.name not in _cache:
            _cache[spec.name] = ToxicityScorer.load_cached(
                spec.name, spec.verify_files, spec.pins(),
                prepared_shapes(spec.num_words, spec.units, spec.dense_units, len(spec.labels)),
                {"recurrent_activation": spec.recurrent_activation, "labels": spec.labels,
                 "max_len": spec.max_len},
                lambda: build_scorer(spec, *read_files()))
        return _cache[spec.name]


def load_judges(text: str = DEFAULT_JUDGES) -> dict[str, object]:
    """``"toxblock,tcc"`` -> {judge name: scorer}, in that order."""
    return {spec.name: load_judge(spec.name) for spec in parse_judges(text)}


def judge_map(scorer) -> dict[str, Any]:
    """{name: scorer} for the evaluation: a mapping as given (the first judge is the primary one),
    or one scorer under its ``name``."""
    if isinstance(scorer, Mapping):
        out = {str(k): v for k, v in scorer.items()}
        if not out:
            raise FgdilpError("no toxicity judge to score the samples with")
        return out
    return {str(getattr(scorer, "name", None) or "scorer"): scorer}


def score_checked(name: str, scorer, texts: list[str], labels: Sequence[str]) -> np.ndarray:
    """scorer.score(texts) as float64 [len(texts), len(labels)], or a clear error."""
    scores = np.asarray(scorer.score(texts), dtype=np.float64)
    if scores.shape != (len(texts), len(labels)):
        raise FgdilpError(f"the scorer {name} returned shape {scores.shape}, expected "
                          f"{(len(texts), len(labels))}")
    return scores


__all__ = ["judge_map", "score_checked", "JudgeSpec", "TOXBLOCK", "TCC", "JUDGES", "DEFAULT_JUDGES", "judge_spec", "parse_judges",
           "build_scorer", "load_judge", "load_judges"]
