"""Offline toxicity scorer: the Keras BiLSTM toxicity classifiers re-implemented with numpy + h5py.

The runner serves every judge of ``evaluation/judges.py`` (tox-block 0.1.2, the default, and
toxic-comment-classifier 0.3.0, which differs only in its files, its weights and its recurrent
activation). Neither the packages nor TensorFlow are imported: the h5 files are read with h5py and
the pickled Keras tokenizers with a restricted unpickler (``keras_files``, ``safe_pickle``); all
files are sha256-pinned (``files``). The forward pass is tox-block's
``make_predictions(rescale=False)`` (and toxic-comment-classifier's ``classify``):

    tokenizer (lowercase, Keras filter characters -> spaces, split on " ", keep ids < 20000)
    -> the last 100 ids, zero pre-padded (Keras ``pad_sequences`` defaults)
    -> Embedding(20000, 50) -> Bidirectional(LSTM(50, return_sequences), concat)
    -> global max-pool over time -> Dense(50, relu) -> Dense(6, sigmoid)

with Keras gate order i, f, c, o and recurrent activation hard_sigmoid = clip(0.2x + 0.5, 0, 1)
(tox-block, Keras 2) or sigmoid (toxic-comment-classifier, Keras 3's default).
``score`` returns the raw sigmoid probabilities (use these for thresholds); ``rescale`` applies
the package's per-label min-max display rescale.

The scorer runs on folded arrays (``fold_weights``); ``load`` and ``load_cached`` keep them, with
the vocabulary, in the user's cache folder (``prepared``), so that only the first load reads the
Keras files (unpickling tox-block's tokenizer costs ~160 MiB of peak memory).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import FgdilpError
from . import files
from .keras_files import DENSE_UNITS, LABELS, MAX_LEN, NUM_WORDS, UNITS, read_keras_h5, read_tokenizer
from .prepared import Prepared, load_or_prepare, prepared_shapes

# Perspective attribute each label is compared with in `calibrate`.
PERSPECTIVE_OF = {"toxic": "toxicity", "severe_toxic": "severe_toxicity", "obscene": "profanity",
                  "threat": "threat", "insult": "insult", "identity_hate": "identity_attack"}

# tox_block/config/config.py RESCALE_PROBA (0.1.2): prediction._rescale_proba = |(p - lo) / (hi - lo)|
RESCALE_PROBA = {"toxic": (0.002116, 0.999858),
                 "severe_toxic": (0.000011, 0.648682),
                 "obscene": (0.000347, 0.997533),
                 "threat": (0.000040, 0.918887),
                 "insult": (0.000373, 0.986303),
                 "identity_hate": (0.000074, 0.901117)}

# what tox-block's prepared copy (prepared.py) must hold to be used
TOXBLOCK_SHAPES = prepared_shapes(NUM_WORDS, UNITS, DENSE_UNITS, len(LABELS))
TOXBLOCK_SETTINGS = {"name": "tox-block", "recurrent_activation": "hard_sigmoid", "labels": LABELS,
                     "max_len": MAX_LEN}

ROW_BLOCK = 64          # rows per LSTM forward pass (see ToxicityScorer.score)
KERAS_FILTERS = '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n'


def rescale(probs: np.ndarray) -> np.ndarray:
    """tox-block's per-label min-max rescale of raw probabilities ([n, 6] or [6]); display only."""
    p = np.asarray(probs, dtype=np.float64)
    lo = np.array([RESCALE_PROBA[k][0] for k in LABELS])
    hi = np.array([RESCALE_PROBA[k][1] for k in LABELS])
    return np.abs((p - lo) / (hi - lo))


def _hard_sigmoid_(x: np.ndarray) -> np.ndarray:
    np.multiply(x, np.float32(0.2), out=x)
    np.add(x, np.float32(0.5), out=x)
    return np.clip(x, 0.0, 1.0, out=x)


def _sigmoid_(x: np.ndarray) -> np.ndarray:
    # 0.5 * (1 + tanh(x / 2)): exact sigmoid without exp overflow warnings, in place
    np.multiply(x, np.float32(0.5), out=x)
    np.tanh(x, out=x)
    np.add(x, np.float32(1.0), out=x)
    return np.multiply(x, np.float32(0.5), out=x)


# the LSTM gate activations this runner implements (Keras names)
RECURRENT_ACTIVATIONS = {"hard_sigmoid": _hard_sigmoid_, "sigmoid": _sigmoid_}


class _Direction:
    """One LSTM direction: its folded input table [vocab, 4u] and recurrent kernel [u, 4u], gate
    columns in the order (i, f, o, c) (see ``fold_weights``)."""

    def __init__(self, table: np.ndarray, recurrent: np.ndarray, gate=_hard_sigmoid_):
        self.gate = gate
        self.units = recurrent.shape[0]
        self.table = table
        self.recurrent = recurrent

    def step(self, zx: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u = self.units
        z = h @ self.recurrent
        z += zx
        gates = self.gate(z[:, :3 * u])
        cand = np.tanh(z[:, 3 * u:])
        c = gates[:, u:2 * u] * c
        cand *= gates[:, :u]
        c += cand
        h = np.tanh(c)
        h *= gates[:, 2 * u:3 * u]
        return h, c


def _fold_direction(embeddings: np.ndarray, kernel: np.ndarray, recurrent: np.ndarray,
                    bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(table, recurrent) of one LSTM direction. Gate columns reordered from Keras (i, f, c, o) to
    (i, f, o, c) so the three recurrent-activation gates are contiguous; the embedding, input
    kernel and bias are folded into one [vocab, 4u] lookup table (row-wise identical to
    embedding @ kernel + bias)."""
    u = recurrent.shape[0]
    perm = np.concatenate([np.arange(0, 2 * u), np.arange(3 * u, 4 * u), np.arange(2 * u, 3 * u)])
    table = np.ascontiguousarray(
        (embeddings.astype(np.float32) @ kernel[:, perm].astype(np.float32)) + bias[perm],
        dtype=np.float32)
    return table, np.ascontiguousarray(recurrent[:, perm], dtype=np.float32)


def fold_weights(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A reader's weight dict (``keras_files.WEIGHT_NAMES``) -> the arrays the scorer runs on
    (``prepared.ARRAYS``: what the prepared-scorer cache stores)."""
    emb = np.asarray(weights["embeddings"], dtype=np.float32)
    out: dict[str, np.ndarray] = {}
    for d in ("fwd", "bwd"):
        out[f"{d}_table"], out[f"{d}_recurrent"] = _fold_direction(
            emb, weights[f"{d}_kernel"], weights[f"{d}_recurrent"], weights[f"{d}_bias"])
    for k in ("dense_kernel", "dense_bias", "out_kernel", "out_bias"):
        out[k] = np.asarray(weights[k], dtype=np.float32)
    return out


class ToxicityScorer:
    """A BiLSTM toxicity classifier. ``ToxicityScorer.load()`` is tox-block 0.1.2 from its pinned
    package files (``judges.load_judge`` loads any judge); ``score(texts)`` returns raw
    probabilities [n, len(labels)] in the order of ``LABELS``; ``name`` is the judge's name."""

    LABELS = LABELS          # what the evaluation runner reads (scorer.LABELS)
    labels = LABELS
    name = "tox-block"

    def __init__(self, weights: dict[str, np.ndarray], vocab: dict[str, int],
                 filters: str = KERAS_FILTERS, lower: bool = True, split: str = " ",
                 max_len: int = MAX_LEN, recurrent_activation: str = "hard_sigmoid",
                 labels: Sequence[str] = LABELS, name: str = "tox-block"):
        self._setup(fold_weights(weights), vocab,
                    {"filters": filters, "lower": lower, "split": split, "max_len": max_len,
                     "recurrent_activation": recurrent_activation, "labels": labels, "name": name})

    def _setup(self, arrays: dict[str, np.ndarray], vocab: dict[str, int], settings: dict) -> None:
        """The scorer of folded ``arrays`` (``prepared.ARRAYS``), a vocabulary and the text settings
        (``prepared.SETTING_TYPES``)."""
        recurrent_activation, name = settings["recurrent_activation"], settings["name"]
        if recurrent_activation not in RECURRENT_ACTIVATIONS:
            raise FgdilpError(f"unknown recurrent activation {recurrent_activation!r} (this runner "
                              f"implements {', '.join(RECURRENT_ACTIVATIONS)})")
        labels = tuple(settings["labels"])
        if np.shape(arrays["out_bias"]) != (len(labels),):
            raise FgdilpError(f"{name}: {len(labels)} labels but the output layer has "
                              f"{np.shape(arrays['out_bias'])} units")
        gate = RECURRENT_ACTIVATIONS[recurrent_activation]
        self.LABELS = self.labels = labels
        self.name = name
        self.recurrent_activation = recurrent_activation
        self.vocab = vocab
        self.filters = settings["filters"]
        self.lower = settings["lower"]
        self.split = settings["split"]
        self.max_len = settings["max_len"]
        self._translate = str.maketrans({ch: self.split for ch in self.filters})
        self._fwd = _Direction(arrays["fwd_table"], arrays["fwd_recurrent"], gate)
        self._bwd = _Direction(arrays["bwd_table"], arrays["bwd_recurrent"], gate)
        self._dense_w = arrays["dense_kernel"]
        self._dense_b = arrays["dense_bias"]
        self._out_w = arrays["out_kernel"]
        self._out_b = arrays["out_bias"]
        self._pad_prefix = self._pad_prefix_states()

    @classmethod
    def from_prepared(cls, prep: Prepared) -> "ToxicityScorer":
        """The scorer of a prepared copy (``prepared()``, or one read from the cache)."""
        scorer = cls.__new__(cls)
        scorer._setup(prep.arrays, prep.vocab, prep.settings)
        return scorer

    def prepared(self) -> Prepared:
        """What this scorer is made of, as the prepared-scorer cache stores it."""
        arrays = {"fwd_table": self._fwd.table, "fwd_recurrent": self._fwd.recurrent,
                  "bwd_table": self._bwd.table, "bwd_recurrent": self._bwd.recurrent,
                  "dense_kernel": self._dense_w, "dense_bias": self._dense_b,
                  "out_kernel": self._out_w, "out_bias": self._out_b}
        settings = {"filters": self.filters, "lower": self.lower, "split": self.split,
                    "max_len": self.max_len, "recurrent_activation": self.recurrent_activation,
                    "labels": list(self.labels), "name": self.name}
        return Prepared(arrays, self.vocab, settings)

    # ---------------------------------------------------------------- loading
    _cache: "ToxicityScorer | None" = None
    _cache_lock = threading.Lock()

    @classmethod
    def load(cls) -> "ToxicityScorer":
        """The tox-block 0.1.2 scorer (cached per process): its prepared copy in the user's cache
        folder, or built from the installed, sha256-checked package files and written there."""
        with cls._cache_lock:
            if ToxicityScorer._cache is None:
                ToxicityScorer._cache = cls.load_cached(
                    "tox-block", files.toxblock_files, files.toxblock_pins(), TOXBLOCK_SHAPES,
                    TOXBLOCK_SETTINGS, cls._build_toxblock)
            return ToxicityScorer._cache

    @classmethod
    def _build_toxblock(cls) -> "ToxicityScorer":
        model_bytes, encoder_bytes = files.toxblock_bytes()
        weights = read_keras_h5(model_bytes)
        tok = read_tokenizer(encoder_bytes)
        return cls(weights, tok["vocab"], tok["filters"], tok["lower"], tok["split"], tok["max_len"])

    @classmethod
    def load_cached(cls, name: str, verify: Callable[[], object], pins: Sequence[str],
                    shapes: dict[str, tuple[int, ...]], expected: dict[str, Any],
                    build: Callable[[], "ToxicityScorer"]) -> "ToxicityScorer":
        """A judge's scorer through the prepared-scorer cache (``prepared.load_or_prepare``).
        ``verify()`` checks the installed package files against ``pins`` first (a streamed
        sha256): the cache is keyed by the pins, and a missing or damaged package is refused as
        it is without a cache. ``build()`` makes the scorer from those files when no cache serves."""
        verify()
        return cls.from_prepared(load_or_prepare(name, pins, shapes, {**expected, "name": name},
                                                 lambda: build().prepared()))

    # ---------------------------------------------------------------- text -> ids
    def tokenize(self, text: str) -> list[str]:
        """Keras ``text_to_word_sequence`` with the tokenizer's filters / lower / split."""
        if self.lower:
            text = text.lower()
        return [w for w in text.translate(self._translate).split(self.split) if w]

    def text_ids(self, text: str) -> list[int]:
        """Keras ``texts_to_sequences``: known words with id < num_words, no OOV token."""
        vocab = self.vocab
        return [i for i in (vocab.get(w) for w in self.tokenize(text)) if i is not None]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[n, max_len] int32: the last max_len ids of each text, zero pre-padded."""
        texts = _check_texts(texts)
        out = np.zeros((len(texts), self.max_len), dtype=np.int32)
        for r, t in enumerate(texts):
            ids = self.text_ids(t)[-self.max_len:]
            if ids:
                out[r, self.max_len - len(ids):] = ids
        return out

    # ---------------------------------------------------------------- forward pass
    def _pad_prefix_states(self):
        """Forward-LSTM state after k = 0..max_len padding steps from zero, and the running max of
        its outputs: every row of a batch starts with the same padding run, computed once here."""
        d = self._fwd
        h = np.zeros((1, d.units), np.float32)
        c = np.zeros((1, d.units), np.float32)
        m = np.full((1, d.units), -np.inf, np.float32)
        hs, cs, ms = [h], [c], [m]
        zx = d.table[0:1]
        for _ in range(self.max_len):
            h, c = d.step(zx, h, c)
            m = np.maximum(m, h)
            hs.append(h), cs.append(c), ms.append(m)
        return hs, cs, ms

    def _forward(self, ids: np.ndarray) -> np.ndarray:
        """ids [b, T] -> logits [b, 6] (float32)."""
        b, T = ids.shape
        nz = ids != 0
        # the leading all-padding columns of this batch are the cached padding prefix
        first_word = int(np.argmax(nz.any(axis=0))) if nz.any() else T
        hs, cs, ms = self._pad_prefix
        f = self._fwd
        h = np.repeat(hs[first_word], b, axis=0)
        c = np.repeat(cs[first_word], b, axis=0)
        m_f = np.repeat(ms[first_word], b, axis=0)
        if first_word < T:
            zx = f.table[ids[:, first_word:]]                      # [b, T - first, 4u]
            for t in range(zx.shape[1]):
                h, c = f.step(zx[:, t], h, c)
                np.maximum(m_f, h, out=m_f)
        bk = self._bwd
        zx = bk.table[ids]
        h = np.zeros((b, bk.units), np.float32)
        c = np.zeros((b, bk.units), np.float32)
        m_b = np.full((b, bk.units), -np.inf, np.float32)
        for t in range(T - 1, -1, -1):
            h, c = bk.step(zx[:, t], h, c)
            np.maximum(m_b, h, out=m_b)
        pooled = np.concatenate([m_f, m_b], axis=1)                # Bidirectional merge_mode=concat
        hidden = np.maximum(pooled @ self._dense_w + self._dense_b, 0.0)
        return hidden @ self._out_w + self._out_b

    def score(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Raw sigmoid probabilities [n, 6] (float64; order of ``LABELS``). ``batch_size`` bounds
        the rows of one forward pass (further capped at ``ROW_BLOCK``); results do not depend on
        it beyond float rounding."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        ids = self.encode(texts)
        n = ids.shape[0]
        logits = np.empty((n, len(self.labels)), dtype=np.float32)
        # group texts of similar length so the shared padding prefix covers most of each block;
        # blocks of at most ROW_BLOCK rows keep the per-step matmuls below the size where
        # OpenBLAS starts threads (on 2 cores that made 128-256 rows 5-200x slower per row)
        order = np.argsort((ids != 0).sum(axis=1), kind="stable")
        block = min(batch_size, ROW_BLOCK)
        for s in range(0, n, block):
            idx = order[s:s + block]
            logits[idx] = self._forward(ids[idx])
        return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))

    def score_dicts(self, texts: Sequence[str], batch_size: int = 256) -> list[dict[str, float]]:
        return [dict(zip(self.labels, map(float, row))) for row in self.score(texts, batch_size)]


def _check_texts(texts) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise TypeError("score() takes a sequence of strings, not a single string")
    texts = list(texts)
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"texts must be str, got {type(t).__name__}")
    return texts


__all__ = ["LABELS", "PERSPECTIVE_OF", "RESCALE_PROBA", "ToxicityScorer", "fold_weights", "rescale",
           "read_keras_h5", "read_tokenizer"]
