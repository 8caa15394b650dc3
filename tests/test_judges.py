"""The second toxicity judge (toxic-comment-classifier 0.3.0): its Keras 3 weights layout and pickled
tokenizer read without Keras, and the shared numpy runner with a sigmoid recurrent activation
checked against torch.nn.LSTM on tiny random weights; the real package files where installed."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pickle

import numpy as np
import pytest

from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp.toxicity import files
from fgdilp_cpp.evaluation.judges import TCC, TOXBLOCK, build_scorer, judge_spec, parse_judges
from fgdilp_cpp.toxicity.keras_files import KERAS3_PATHS, expected_shapes
from fgdilp_cpp.toxicity.safe_pickle import UnsafePickleError

h5py = pytest.importorskip("h5py")

needs_tcc = pytest.mark.skipif(importlib.util.find_spec("toxic_classifier") is None,
                               reason="toxic-comment-classifier==0.3.0 (pip --no-deps) is installed "
                                      "by `make install`")

# a tiny judge of the same architecture: 40 words, 5 ids, embedding 4, LSTM 3, dense 5, 6 labels
TINY = dataclasses.replace(TCC, max_len=5, num_words=40, embed_dim=4, units=3, dense_units=5)
WORDS = ["the", "you", "idiot", "nice", "day", "kill", "stupid", "i", "will", "hate"] + \
        [f"w{i}" for i in range(40)]


def tiny_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = expected_shapes(TINY.num_words, TINY.embed_dim, TINY.units, TINY.dense_units, 6)
    return {k: rng.normal(0.0, 0.8, s).astype(np.float32) for k, s in shapes.items()}


def write_keras3_weights(path, w: dict[str, np.ndarray], extra: dict[str, np.ndarray] | None = None):
    """The layout Keras 3's Model.save_weights writes (what toxic-comment-classifier ships)."""
    with h5py.File(path, "w") as f:
        for key, h5path in KERAS3_PATHS.items():
            if key in w:
                f.create_dataset(h5path, data=w[key])
        for h5path, v in (extra or {}).items():
            f.create_dataset(h5path, data=v)
        f.create_group("layers/global_max_pooling1d/vars")
        f.create_group("layers/dropout/vars")
        f.create_dataset("optimizer/vars/0", data=np.int64(3))     # not read


def keras3_tokenizer_pickle(words: dict[str, int], **overrides) -> bytes:
    """A pickle with the layout of keras.src.legacy.preprocessing.text.Tokenizer (protocol 2:
    GLOBAL, EMPTY_TUPLE, NEWOBJ, the state dict, BUILD), written without Keras."""
    state = {"word_counts": {w: 1 for w in words}, "filters": '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n',
             "split": " ", "lower": True, "num_words": TINY.num_words, "document_count": 3,
             "char_level": False, "oov_token": None, "index_docs": {}, "word_index": words,
             "index_word": {i: w for w, i in words.items()}, "analyzer": None}
    state.update(overrides)
    body = pickle.dumps(state, protocol=2)[2:-1]                   # no PROTO header, no STOP
    return (b"\x80\x02ckeras.src.legacy.preprocessing.text\nTokenizer\n)\x81" + body + b"b.")


class _OsSystem:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.fixture()
def tiny_files(tmp_path):
    w = tiny_weights()
    write_keras3_weights(tmp_path / "model.weights.h5", w)
    # ids 1..50: the last ten (>= num_words = 40) must be dropped like Keras does
    (tmp_path / "tokenizer.pickle").write_bytes(keras3_tokenizer_pickle({t: i + 1 for i, t in enumerate(WORDS)}))
    return tmp_path / "model.weights.h5", tmp_path / "tokenizer.pickle", w


def torch_reference(w: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """torch.nn.LSTM (gates i, f, g, o with sigmoid, as Keras 3's LSTM) in float64,
    bidirectional, then max over time and the two dense layers."""
    torch = pytest.importorskip("torch")
    u = w["fwd_recurrent"].shape[0]
    lstm = torch.nn.LSTM(w["embeddings"].shape[1], u, batch_first=True, bidirectional=True).double()
    with torch.no_grad():
        for suffix, d in (("", "fwd"), ("_reverse", "bwd")):
            getattr(lstm, "weight_ih_l0" + suffix).copy_(torch.from_numpy(w[f"{d}_kernel"].T.astype(np.float64)))
            getattr(lstm, "weight_hh_l0" + suffix).copy_(torch.from_numpy(w[f"{d}_recurrent"].T.astype(np.float64)))
            getattr(lstm, "bias_ih_l0" + suffix).copy_(torch.from_numpy(w[f"{d}_bias"].astype(np.float64)))
            getattr(lstm, "bias_hh_l0" + suffix).zero_()
        x = torch.from_numpy(w["embeddings"].astype(np.float64))[torch.from_numpy(ids.astype(np.int64))]
        seq, _ = lstm(x)                                            # [b, T, 2u], fwd | bwd
        pooled = seq.max(dim=1).values.numpy()
    hidden = np.maximum(pooled @ w["dense_kernel"].astype(np.float64) + w["dense_bias"], 0.0)
    return 1.0 / (1.0 + np.exp(-(hidden @ w["out_kernel"].astype(np.float64) + w["out_bias"])))


def test_sigmoid_runner_matches_torch_lstm(tiny_files):
    model, tok, w = tiny_files
    s = build_scorer(TINY, model, tok)
    assert s.name == "toxic-comment-classifier" and s.recurrent_activation == "sigmoid"
    texts = ["you idiot", "", "Have a nice day!", "I will kill you, stupid idiot, I hate you",
             "w1 w2 w3 w4 w5 w6 w7 w8", "unknown words only", "the"]
    ids = s.encode(texts)
    assert ids.shape == (7, 5)
    got = s.score(texts)
    want = torch_reference(w, ids)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
    # the activation matters: the same weights with hard_sigmoid give other scores
    hard = build_scorer(dataclasses.replace(TINY, recurrent_activation="hard_sigmoid"), model, tok)
    assert np.abs(hard.score(texts) - got).max() > 1e-3
    # batching and order do not change a row
    np.testing.assert_allclose(s.score(texts[::-1])[::-1], got, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.vstack([s.score([t]) for t in texts]), got, atol=1e-6, rtol=0)


def test_keras3_tokenizer_layout(tiny_files):
    model, tok, _ = tiny_files
    s = build_scorer(TINY, model, tok)
    assert len(s.vocab) == 39 and max(s.vocab.values()) == 39       # ids >= num_words dropped
    assert s.text_ids("You, IDIOT! w35 w20") == [2, 3, 31]           # w35 has id 46: dropped
    enc = s.encode(["the you idiot nice day kill"])[0]
    assert enc.tolist() == [2, 3, 4, 5, 6]                          # the last max_len ids
    assert s.encode(["nice"])[0].tolist() == [0, 0, 0, 0, 4]        # zero pre-padded


def test_keras3_tokenizer_refusals(tmp_path, tiny_files):
    model, _, _ = tiny_files
    bad = tmp_path / "bad.pickle"
    for overrides, match in (({"oov_token": "<unk>"}, "settings"), ({"char_level": True}, "settings"),
                             ({"num_words": 41}, "40"), ({"word_index": None}, "word_index"),
                             ({"analyzer": "x"}, "analyzer")):
        bad.write_bytes(keras3_tokenizer_pickle({"a": 1}, **overrides))
        with pytest.raises(FgdilpError, match=match):
            build_scorer(TINY, model, bad)
    bad.write_bytes(pickle.dumps({"word_index": {"a": 1}}))         # a dict, not a Tokenizer
    with pytest.raises(FgdilpError, match="no Keras Tokenizer"):
        build_scorer(TINY, model, bad)
    bad.write_bytes(pickle.dumps(_OsSystem()))
    with pytest.raises(UnsafePickleError):
        build_scorer(TINY, model, bad)
    bad.write_bytes(b"\x80\x02ckeras\nTok")                          # truncated
    with pytest.raises(FgdilpError, match="cannot read"):
        build_scorer(TINY, model, bad)


def test_keras3_weights_refusals(tmp_path, tiny_files):
    _, tok, w = tiny_files
    path = tmp_path / "w.h5"
    cases = [({k: v for k, v in w.items() if k != "bwd_bias"}, None, "bwd_bias is missing"),
             ({**w, "dense_kernel": w["dense_kernel"][:, :4]}, None, "dense_kernel has shape"),
             ({**w, "out_bias": np.full(6, np.nan, np.float32)}, None, "non-finite"),
             (w, {"layers/dense_2/vars/0": np.zeros((6, 2), np.float32)}, "unexpected weights")]
    for weights, extra, match in cases:
        path.unlink(missing_ok=True)
        write_keras3_weights(path, weights, extra)
        with pytest.raises(FgdilpError, match=match):
            build_scorer(TINY, path, tok)
    path.write_bytes(b"not an h5 file")
    with pytest.raises(FgdilpError, match="cannot read"):
        build_scorer(TINY, path, tok)


def test_judge_names():
    assert judge_spec("tcc") is TCC and judge_spec("toxic-comment-classifier") is TCC
    assert judge_spec("toxblock") is TOXBLOCK and judge_spec("tox-block") is TOXBLOCK
    assert parse_judges("toxblock, tcc,toxblock") == [TOXBLOCK, TCC]
    assert parse_judges("tcc") == [TCC]
    with pytest.raises(FgdilpError, match="unknown toxicity judge 'perspective'"):
        parse_judges("tcc,perspective")
    with pytest.raises(FgdilpError, match="no toxicity judge"):
        parse_judges(" , ")


# ------------------------------------------------------------------ the real package files

# toxic-comment-classifier 0.3.0 README: classify("You are so dumb and stupid!") and the
# predict_batch means (printed to 4 decimals)
README_CLASSIFY = {"toxic": 0.9889402985572815, "severe_toxic": 0.07256772369146347,
                   "obscene": 0.620429277420044, "threat": 0.01934845559298992,
                   "insult": 0.8664075136184692, "identity_hate": 0.04072948172688484}
README_BATCH = {"I hate you so much!": 0.1395, "This is wonderful news.": 0.0013,
                "You're disgusting!": 0.3110, "Absolutely love your energy!": 0.0088,
                "You're the worst person ever!": 0.0937, "Have a nice day :)": 0.0115}


@pytest.mark.real_model
@needs_tcc
def test_real_tcc_reproduces_its_readme():
    from fgdilp_cpp.evaluation.judges import load_judge

    s = load_judge("tcc")
    assert s is load_judge("toxic-comment-classifier")               # cached
    got = s.score_dicts(["You are so dumb and stupid!"])[0]
    for k, v in README_CLASSIFY.items():
        assert got[k] == pytest.approx(v, abs=2e-6), k
    means = s.score(list(README_BATCH)).mean(axis=1)
    np.testing.assert_allclose(means, list(README_BATCH.values()), atol=5e-5)


@pytest.mark.real_model
@needs_tcc
def test_real_tcc_files_pinned(monkeypatch):
    from fgdilp_cpp.evaluation.judges import build_scorer as build
    from fgdilp_cpp.toxicity.safe_pickle import StandIn, safe_load

    model, tok = files.tcc_files()
    obj = safe_load(tok)
    assert isinstance(obj, StandIn) and obj.__standin_name__ == "Tokenizer"
    assert obj.num_words == 20000 and obj.word_index["the"] == 1
    assert build(TCC, model, tok).vocab["the"] == 1
    monkeypatch.setattr(files, "TCC_MODEL_SHA256", "0" * 64)
    with pytest.raises(FgdilpError, match="sha256"):
        files.tcc_bytes()


def test_missing_tcc_package_is_refused(monkeypatch):
    monkeypatch.setattr(files, "TCC_PACKAGE", "no_such_package_fgdilp")
    with pytest.raises(FgdilpError, match="toxic-comment-classifier==0.3.0 is not installed"):
        files.tcc_bytes()
