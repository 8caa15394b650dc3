"""Readers of the Keras files of the offline toxicity judges: h5py and a restricted unpickler only.

- tox-block 0.1.2: a Keras 2.2.4 full-model h5 (``model_config`` attribute + ``model_weights``)
  and a pickled ``TokenSequencer`` holding a ``keras_preprocessing`` Tokenizer;
- toxic-comment-classifier 0.3.0: a Keras 3 ``.weights.h5`` (no architecture saved: weights only,
  under ``layers/<layer>/vars/<i>``, the LSTM cells under
  ``layers/bidirectional/{forward,backward}_layer/cell/vars/{0,1,2}`` = kernel, recurrent kernel,
  bias) and a pickled ``keras.src.legacy.preprocessing.text.Tokenizer``.

Every reader returns the same weight dict (``WEIGHT_NAMES``) checked against the judge's shapes, so
one numpy runner (``scorer.ToxicityScorer``) serves both. No Keras, TensorFlow or package code runs.
"""

from __future__ import annotations

import io
import json

import numpy as np

from ..errors import FgdilpError
from .safe_pickle import StandIn, UnsafePickleError, safe_loads

# tox-block 0.1.2's architecture (checked against the model_config saved in its h5)
MAX_LEN = 100
NUM_WORDS = 20000
EMBED_DIM = 50
UNITS = 50
DENSE_UNITS = 50
N_LABELS = 6
LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")

WEIGHT_NAMES = ("embeddings", "fwd_kernel", "fwd_recurrent", "fwd_bias", "bwd_kernel",
                "bwd_recurrent", "bwd_bias", "dense_kernel", "dense_bias", "out_kernel", "out_bias")


def expected_shapes(num_words: int, embed_dim: int, units: int, dense_units: int,
                    n_labels: int) -> dict[str, tuple[int, ...]]:
    """The weight shapes of Embedding -> BiLSTM(concat) -> Dense(relu) -> Dense(sigmoid)."""
    lstm: dict[str, tuple[int, ...]] = {"kernel": (embed_dim, 4 * units), "recurrent": (units, 4 * units),
                                        "bias": (4 * units,)}
    out: dict[str, tuple[int, ...]] = {"embeddings": (num_words, embed_dim)}
    for d in ("fwd", "bwd"):
        out.update({f"{d}_{k}": v for k, v in lstm.items()})
    out.update({"dense_kernel": (2 * units, dense_units), "dense_bias": (dense_units,),
                "out_kernel": (dense_units, n_labels), "out_bias": (n_labels,)})
    return out


def check_shapes(w: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], what: str) -> None:
    for k, shape in shapes.items():
        if k not in w:
            raise FgdilpError(f"{what}: the weight {k} is missing")
        if w[k].shape != shape:
            raise FgdilpError(f"{what}: {k} has shape {w[k].shape}, expected {shape}")
        if not np.all(np.isfinite(w[k])):
            raise FgdilpError(f"{what}: {k} holds non-finite values")


def _open_h5(source):
    try:
        import h5py
    except ImportError:          # the [scorer] extra was not installed
        raise FgdilpError("the toxicity scorer reads Keras weight files with h5py: "
                          "pip install 'fgdilp-cpp[scorer]' (make install installs it)") from None

    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    return h5py.File(source, "r")


def _unpickle(source, what: str):
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            return safe_loads(source)
        with open(source, "rb") as fh:
            return safe_loads(fh.read())
    except UnsafePickleError:
        raise
    except Exception as exc:   # malformed pickle: any unpickling error
        raise FgdilpError(f"cannot read the {what} tokenizer pickle: {exc}") from None


def _tokenizer_settings(st: dict, what: str, max_len) -> dict:
    """Vocabulary and text settings of a pickled Keras Tokenizer's state (ids < num_words only:
    Keras ``texts_to_sequences`` drops the others when there is no OOV token)."""
    num_words = st.get("num_words")
    settings = (st.get("char_level"), st.get("oov_token"), type(st.get("filters")),
                type(st.get("split")), type(num_words), type(max_len))
    if settings != (False, None, str, str, int, int) or len(st["split"]) != 1:
        raise FgdilpError(f"unexpected {what} tokenizer settings: {settings}")
    if st.get("analyzer") is not None:
        raise FgdilpError(f"the {what} tokenizer has a custom analyzer")
    word_index = st.get("word_index")
    if type(word_index) is not dict:
        raise FgdilpError(f"the {what} tokenizer has no word_index")
    # exactly str -> int (not bool, not a stand-in): anything else is not the file we verified
    if not set(map(type, word_index)) <= {str} or not set(map(type, word_index.values())) <= {int}:
        raise FgdilpError(f"the {what} tokenizer's word_index is not a dict of str -> int")
    vocab = {w: i for w, i in word_index.items() if 0 < i < num_words}
    return {"vocab": vocab, "filters": st["filters"], "lower": bool(st.get("lower", True)),
            "split": st["split"], "max_len": max_len, "num_words": num_words}


# -------------------------------------------------------------------- tox-block 0.1.2
def _layer_weights(mw, layer: str) -> dict[str, np.ndarray]:
    """{weight name: array} of one layer of a Keras full-model h5 (``model_weights/<layer>``)."""
    g = mw[layer]
    out = {}
    for raw in g.attrs["weight_names"]:
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        out[name] = np.asarray(g[name], dtype=np.float32)
    return out


def read_keras_h5(source) -> dict[str, np.ndarray]:
    """The tox-block model's weights from its Keras 2.2.4 h5 (a path or the file's bytes), after
    checking that the saved architecture is the one this module implements."""
    try:
        with _open_h5(source) as f:
            cfg = f.attrs["model_config"]
            cfg = json.loads(cfg.decode() if isinstance(cfg, bytes) else cfg)
            _check_architecture(cfg)
            mw = f["model_weights"]
            emb = _layer_weights(mw, "embedding")
            bi = _layer_weights(mw, "bidirectional")
            d1 = _layer_weights(mw, "dense")
            d2 = _layer_weights(mw, "dense_1")
    except FgdilpError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise FgdilpError(f"cannot read the tox-block model h5: {exc}") from None

    def one(d, suffix):
        hits = [v for k, v in d.items() if k.endswith(suffix)]
        if len(hits) != 1:
            raise FgdilpError(f"tox-block model h5: expected one weight ending in {suffix!r}")
        return hits[0]

    w = {"embeddings": one(emb, "embeddings:0"),
         "fwd_kernel": one(bi, "forward_lstm/kernel:0"),
         "fwd_recurrent": one(bi, "forward_lstm/recurrent_kernel:0"),
         "fwd_bias": one(bi, "forward_lstm/bias:0"),
         "bwd_kernel": one(bi, "backward_lstm/kernel:0"),
         "bwd_recurrent": one(bi, "backward_lstm/recurrent_kernel:0"),
         "bwd_bias": one(bi, "backward_lstm/bias:0"),
         "dense_kernel": one(d1, "kernel:0"), "dense_bias": one(d1, "bias:0"),
         "out_kernel": one(d2, "kernel:0"), "out_bias": one(d2, "bias:0")}
    check_shapes(w, expected_shapes(NUM_WORDS, EMBED_DIM, UNITS, DENSE_UNITS, N_LABELS),
                 "tox-block model h5")
    return w


def _check_architecture(cfg: dict) -> None:
    layers = {l["name"]: l for l in cfg["config"]["layers"]}
    kinds = [l["class_name"] for l in cfg["config"]["layers"]]
    want = ["InputLayer", "Embedding", "Bidirectional", "GlobalMaxPooling1D", "Dense", "Dropout", "Dense"]
    problems = []
    if kinds != want:
        problems.append(f"layers {kinds}")
    else:
        inp = layers["input_1"]["config"]["batch_input_shape"]
        emb = layers["embedding"]["config"]
        bi = layers["bidirectional"]["config"]
        lstm = bi["layer"]["config"]
        d1, d2 = layers["dense"]["config"], layers["dense_1"]["config"]
        checks = [
            (inp == [None, MAX_LEN], f"input {inp}"),
            ((emb["input_dim"], emb["output_dim"], emb["mask_zero"]) == (NUM_WORDS, EMBED_DIM, False),
             "embedding"),
            (bi.get("merge_mode") == "concat", "merge_mode"),
            (bi["layer"]["class_name"] == "LSTM", "bidirectional layer"),
            (lstm["units"] == UNITS and lstm["return_sequences"] and not lstm["go_backwards"]
             and lstm["activation"] == "tanh" and lstm["recurrent_activation"] == "hard_sigmoid"
             and lstm["use_bias"] and not lstm.get("stateful"), "lstm config"),
            ((d1["units"], d1["activation"], d1["use_bias"]) == (50, "relu", True), "dense"),
            ((d2["units"], d2["activation"], d2["use_bias"]) == (len(LABELS), "sigmoid", True),
             "dense_1"),
        ]
        problems = [what for ok, what in checks if not ok]
    if problems:
        raise FgdilpError("the tox-block model h5 is not the expected BiLSTM architecture: "
                          + ", ".join(problems))


def read_tokenizer(source) -> dict:
    """Vocabulary and text settings from tox-block's pickled TokenSequencer (path or bytes),
    unpickled with the restricted unpickler (no tox_block / Keras code runs)."""
    obj = _unpickle(source, "tox-block")
    if not isinstance(obj, StandIn) or not isinstance(obj.state, dict):
        raise FgdilpError("the tox-block encoder pickle is not a TokenSequencer")
    tok = obj.state.get("tokenizer")
    if not isinstance(tok, StandIn) or tok.__standin_name__ != "Tokenizer" \
            or not isinstance(tok.state, dict):
        raise FgdilpError("the tox-block encoder pickle holds no Keras Tokenizer")
    return _tokenizer_settings(tok.state, "tox-block", obj.state.get("max_sequence_length"))


# -------------------------------------------------------------------- Keras 3 weights-only files
# h5 path of each weight in a Keras 3 ``.weights.h5`` of Input -> Embedding -> Bidirectional(LSTM)
# -> GlobalMaxPooling1D -> Dense -> Dropout -> Dense (Model.save_weights; vars in creation order)
KERAS3_PATHS = {
    "embeddings": "layers/embedding/vars/0",
    "fwd_kernel": "layers/bidirectional/forward_layer/cell/vars/0",
    "fwd_recurrent": "layers/bidirectional/forward_layer/cell/vars/1",
    "fwd_bias": "layers/bidirectional/forward_layer/cell/vars/2",
    "bwd_kernel": "layers/bidirectional/backward_layer/cell/vars/0",
    "bwd_recurrent": "layers/bidirectional/backward_layer/cell/vars/1",
    "bwd_bias": "layers/bidirectional/backward_layer/cell/vars/2",
    "dense_kernel": "layers/dense/vars/0", "dense_bias": "layers/dense/vars/1",
    "out_kernel": "layers/dense_1/vars/0", "out_bias": "layers/dense_1/vars/1",
}


def read_keras3_weights(source, shapes: dict[str, tuple[int, ...]], what: str) -> dict[str, np.ndarray]:
    """The BiLSTM's weights from a Keras 3 ``.weights.h5`` (path or bytes). The file holds no
    architecture, so what is checked is the layout: every expected dataset present with the
    expected shape, and no extra weight in the model's layers (an extra would mean a layer this
    runner does not implement)."""
    try:
        with _open_h5(source) as f:
            w = {k: np.asarray(f[p], dtype=np.float32) for k, p in KERAS3_PATHS.items() if p in f}
            found = []
            f["layers"].visititems(lambda name, obj: found.append("layers/" + name)
                                   if hasattr(obj, "shape") else None)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise FgdilpError(f"cannot read the {what} weights h5: {exc}") from None
    extra = sorted(set(found) - set(KERAS3_PATHS.values()))
    if extra:
        raise FgdilpError(f"{what} weights h5: unexpected weights {extra} (not the BiLSTM this "
                          "runner implements)")
    check_shapes(w, shapes, f"{what} weights h5")
    return w


def read_keras_tokenizer(source, what: str, max_len: int) -> dict:
    """Vocabulary and text settings of a plainly pickled Keras Tokenizer (path or bytes),
    unpickled with the restricted unpickler; max_len comes from the judge (the pickle has none)."""
    obj = _unpickle(source, what)
    if not isinstance(obj, StandIn) or obj.__standin_name__ != "Tokenizer" \
            or not isinstance(obj.state, dict):
        raise FgdilpError(f"the {what} tokenizer pickle holds no Keras Tokenizer")
    return _tokenizer_settings(obj.state, what, max_len)
