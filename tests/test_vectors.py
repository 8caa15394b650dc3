"""HeadDirections: the saved steering artifact (GGUF round trip, refusals, controls)."""

from __future__ import annotations

import os
from dataclasses import replace

import gguf
import numpy as np
import pytest

from fgdilp_cpp.method.sources import SOURCES
from fgdilp_cpp.method.vectors import FILE_ARCH, HeadDirections, ModelIdentity

L, H, D = 4, 3, 8  # n_layer, n_head, head_dim


def _identity(**kw) -> ModelIdentity:
    base = dict(architecture="llama", n_layer=L, n_head=H, head_dim=D, n_embd=32, n_vocab=100,
                name="tiny-llama", vocab_sha256="ab" * 32, weights_sha256="cd" * 32)
    return ModelIdentity(**{**base, **kw})


def _hd(with_e: bool = True, seed: int = 0) -> HeadDirections:
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((L, H, D)).astype(np.float32)          # [n_layer, n_head, head_dim]
    e = rng.standard_normal((L, H, D)).astype(np.float32) if with_e else None
    settings = {"K": 50, "exp_norm": 0.4, "exp_sim": 0.6, "prefixes": ["a b", "c"],
                "nested": {"renorm": True, "x": None}}
    return HeadDirections(directions=d, e=e, model=_identity(), source="fgdilp-instances",
                          settings=settings).validate()


def _write_raw(path, arch="fgdilp-directions", version=1, directions=None, e=None, skip=(), origin=None):
    """A directions-like GGUF written with GGUFWriter directly (bypassing validate); by default as an
    older fgdilp-cpp wrote it (fgdilp.method "tr", no fgdilp.source); origin: {key: value} instead."""
    w = gguf.GGUFWriter(str(path), arch)
    kv = {"fgdilp.model.architecture": "llama", "fgdilp.model.name": "tiny-llama",
          **(origin if origin is not None else {"fgdilp.method": "tr"}), "fgdilp.settings": "{}",
          "fgdilp.layer_convention": "c", "fgdilp.head_layout": "h"}
    for k, v in kv.items():
        if k not in skip:
            w.add_string(k, v)
    ints = {"format_version": version, "model.n_layer": L, "model.n_head": H,
            "model.head_dim": D, "model.n_embd": 32, "model.n_vocab": 100}
    for k, v in ints.items():
        if f"fgdilp.{k}" not in skip:
            w.add_uint32(f"fgdilp.{k}", v)
    if directions is None:
        directions = np.ones((L, H, D), np.float32)
    if "directions" not in skip:
        w.add_tensor("directions", directions)
    if e is not None:
        w.add_tensor("e", e)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- round trip ----

@pytest.mark.parametrize("with_e", [True, False])
def test_round_trip(tmp_path, with_e):
    hd = _hd(with_e)
    p = tmp_path / "dirs.gguf"
    hd.save(p)
    back = HeadDirections.load(p)
    assert back == hd
    assert back.directions.tobytes() == hd.directions.tobytes()
    assert back.directions.dtype == np.float32 and back.directions.shape == (L, H, D)
    if with_e:
        assert back.e.tobytes() == hd.e.tobytes()
    else:
        assert back.e is None
    assert back.model == hd.model and back.model.name == "tiny-llama"
    assert back.settings == hd.settings
    assert (back.source, back.layer_convention, back.head_layout) == \
           (hd.source, hd.layer_convention, hd.head_layout)
    # owned copies, not views of a memmap
    for arr in (back.directions, back.e):
        if arr is not None:
            assert arr.flags.owndata and arr.flags.writeable and not isinstance(arr, np.memmap)


def test_save_is_atomic_and_readable_by_gguf(tmp_path):
    hd = _hd()
    p = tmp_path / "dirs.gguf"
    p.write_bytes(b"old")
    hd.save(p)
    assert sorted(os.listdir(tmp_path)) == ["dirs.gguf"]  # no temp file left behind
    assert (p.stat().st_mode & 0o777) == 0o644
    r = gguf.GGUFReader(str(p))
    assert r.get_field("general.architecture").contents() == FILE_ARCH
    assert r.get_field("fgdilp.format_version").contents() == 1
    assert r.get_field("fgdilp.model.key").contents() == hd.model.key()
    assert {t.name for t in r.tensors} == {"directions", "e"}


def test_save_failure_leaves_no_temp_file(tmp_path):
    bad = HeadDirections(directions=np.zeros((L, H, D), np.float32), e=None, model=_identity(),
                         source="tr-prefixes", settings={"f": object()})
    with pytest.raises(ValueError, match="JSON"):
        bad.save(tmp_path / "x.gguf")
    assert os.listdir(tmp_path) == []


def test_save_refuses_a_symlink(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep")
    (tmp_path / "v.gguf").symlink_to(target)
    from fgdilp_cpp.errors import FgdilpError

    with pytest.raises(FgdilpError, match="symbolic link"):
        _hd().save(tmp_path / "v.gguf")
    assert target.read_text() == "keep" and sorted(os.listdir(tmp_path)) == ["elsewhere.txt", "v.gguf"]


# ---- load refusals ----

def test_load_missing_file(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        HeadDirections.load(tmp_path / "nope.gguf")


def test_load_directory(tmp_path):
    with pytest.raises(ValueError, match="not a file"):
        HeadDirections.load(tmp_path)


def test_load_text_file(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("hello, not a gguf\n")
    with pytest.raises(ValueError, match="not a GGUF file"):
        HeadDirections.load(p)


def test_load_empty_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    with pytest.raises(ValueError, match="not a GGUF file"):
        HeadDirections.load(p)


@pytest.mark.parametrize("frac", [0.0, 0.05, 0.3, 0.9, 1.0])
def test_load_truncated(tmp_path, frac):
    p = tmp_path / "dirs.gguf"
    _hd().save(p)
    data = p.read_bytes()
    t = tmp_path / "trunc.gguf"
    t.write_bytes(data[: max(8, min(len(data) - 4, int(len(data) * frac)))])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        HeadDirections.load(t)


def test_load_model_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.zeros((10, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'llama'.*not an fgdilp-directions file"):
        HeadDirections.load(p)


def test_load_control_vector(tmp_path):
    p = tmp_path / "cvec.gguf"
    w = gguf.GGUFWriter(str(p), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", 2)
    w.add_tensor("direction.1", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="llama.cpp control vector"):
        HeadDirections.load(p)


def test_load_unsupported_version(tmp_path):
    with pytest.raises(ValueError, match="unsupported .*format version 2"):
        HeadDirections.load(_write_raw(tmp_path / "v2.gguf", version=2))


def test_raw_writer_baseline_loads(tmp_path):
    hd = HeadDirections.load(_write_raw(tmp_path / "ok.gguf"))
    assert hd.source == "tr-prefixes" and hd.e is None and hd.settings == {}


def test_a_file_records_its_source_not_a_method(tmp_path):
    """New files write fgdilp.source (and no fgdilp.method); each source survives the round trip."""
    for source in SOURCES:
        hd = replace(_hd(), source=source)
        hd.save(tmp_path / "s.gguf")
        reader = gguf.GGUFReader(str(tmp_path / "s.gguf"))
        assert reader.get_field("fgdilp.source").contents() == source
        assert reader.get_field("fgdilp.method") is None
        del reader
        assert HeadDirections.load(tmp_path / "s.gguf").source == source
    with pytest.raises(ValueError, match="source must name where the directions come from"):
        replace(_hd(), source=" ").validate()


@pytest.mark.parametrize("old, source", [("fgdilp-frozen", "fgdilp-instances"), ("universal-tr", "tr-prefixes"),
                                         ("universal-fgdilp", "fgdilp-instances"), ("universal-data", "labelled-text"),
                                         ("universal-data+random", "labelled-text+random"),
                                         ("something-else", "something-else")])
def test_an_older_file_s_method_is_read_as_its_source(tmp_path, old, source):
    path = _write_raw(tmp_path / "old.gguf", origin={"fgdilp.method": old})
    assert HeadDirections.load(path).source == source
    both = _write_raw(tmp_path / "both.gguf", origin={"fgdilp.method": old, "fgdilp.source": "tr-prefixes"})
    assert HeadDirections.load(both).source == "tr-prefixes"          # fgdilp.source wins where both exist


@pytest.mark.parametrize("key", ["fgdilp.model.n_head", "fgdilp.settings"])
def test_load_missing_key(tmp_path, key):
    with pytest.raises(ValueError, match=f"missing key {key}"):
        HeadDirections.load(_write_raw(tmp_path / "k.gguf", skip=(key,)))


def test_load_without_source_or_method(tmp_path):
    with pytest.raises(ValueError, match="missing key fgdilp.source"):
        HeadDirections.load(_write_raw(tmp_path / "k.gguf", origin={}))


def test_load_missing_tensor(tmp_path):
    with pytest.raises(ValueError, match="missing tensor 'directions'"):
        HeadDirections.load(_write_raw(tmp_path / "t.gguf", skip=("directions",)))


def test_load_wrong_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"directions has shape \[4, 3, 7\]"):
        HeadDirections.load(_write_raw(tmp_path / "s1.gguf", directions=np.ones((L, H, D - 1),
                                                                                np.float32)))
    with pytest.raises(ValueError, match=r"e has shape \[4, 24\]"):
        HeadDirections.load(_write_raw(tmp_path / "s2.gguf", e=np.ones((L, H * D), np.float32)))


def test_load_nan_in_directions(tmp_path):
    d = np.ones((L, H, D), np.float32)
    d[2, 1, 3] = np.nan
    with pytest.raises(ValueError, match="directions .*NaN.* layer 2"):
        HeadDirections.load(_write_raw(tmp_path / "nan.gguf", directions=d))


def test_load_inf_in_e(tmp_path):
    e = np.ones((L, H, D), np.float32)
    e[3, 0, 0] = np.inf
    with pytest.raises(ValueError, match="e has non-finite values .*inf.* layer 3"):
        HeadDirections.load(_write_raw(tmp_path / "inf.gguf", e=e))


def test_validate_refuses_float64():
    hd = _hd()
    bad = HeadDirections(directions=hd.directions.astype(np.float64), e=None, model=hd.model,
                         source="tr-prefixes", settings={})
    with pytest.raises(ValueError, match="float32"):
        bad.validate()


# ---- model check ----

def test_check_model():
    hd = _hd()
    hd.check_model(_identity(name="another file name"))  # name is informative only
    other = _identity(n_head=4, head_dim=6, name="other-model")
    with pytest.raises(ValueError) as exc:
        hd.check_model(other)
    msg = str(exc.value)
    assert "tiny-llama" in msg and hd.model.key() in msg
    assert "other-model" in msg and other.key() in msg
    assert msg.startswith("vectors were built for tiny-llama (llama/L4/H3x8/E32/V100), "
                          "not for other-model (llama/L4/H4x6/E32/V100)")


# ---- norms and controls ----

def test_norms_match_numpy():
    hd = _hd()
    rows = hd.directions.reshape(L, H * D)
    assert np.shares_memory(hd.rows(), hd.directions)
    np.testing.assert_allclose(hd.layer_norms(), np.linalg.norm(rows, axis=1), rtol=1e-6)
    np.testing.assert_allclose(hd.head_norms(), np.linalg.norm(hd.directions, axis=2), rtol=1e-6)
    assert hd.layer_norms().shape == (L,) and hd.head_norms().shape == (L, H)
    assert (hd.n_layer, hd.n_head, hd.head_dim) == (L, H, D)


def test_random_like():
    hd = _hd()
    r1 = HeadDirections.random_like(hd, seed=1)
    r1.validate()
    np.testing.assert_allclose(r1.head_norms(), hd.head_norms(), rtol=1e-5)
    cos = np.sum(r1.directions * hd.directions, axis=2) / (hd.head_norms() ** 2)
    assert np.all(np.abs(cos) < 0.999)
    assert not np.allclose(r1.directions, hd.directions)
    assert r1.model == hd.model and r1.e is hd.e
    assert r1 == HeadDirections.random_like(hd, seed=1)
    assert r1 != HeadDirections.random_like(hd, seed=2)
    assert r1.settings["seed"] == 1 and r1.settings["K"] == 50


def test_random_like_zero_head_stays_zero():
    hd = _hd()
    d = hd.directions.copy()
    d[1, 2] = 0.0
    z = HeadDirections(directions=d, e=None, model=hd.model, source="tr-prefixes", settings={})
    r = HeadDirections.random_like(z, seed=0)
    assert np.all(r.directions[1, 2] == 0.0) and np.isfinite(r.directions).all()


def test_reversed(tmp_path):
    hd = _hd()
    rv = hd.reversed()
    np.testing.assert_array_equal(rv.directions, -hd.directions)
    np.testing.assert_allclose(rv.head_norms(), hd.head_norms())
    assert rv.e is hd.e and rv.source.endswith("reversed")
    rv.save(tmp_path / "rev.gguf")
    assert HeadDirections.load(tmp_path / "rev.gguf") == rv


# ---- model fingerprints: a same-shape other model is refused ----

def test_fingerprints_round_trip_and_are_checked(tmp_path):
    hd = _hd()
    hd.save(tmp_path / "v.gguf")
    back = HeadDirections.load(tmp_path / "v.gguf")
    assert back.model == hd.model and back.model.weights_sha256 == "cd" * 32
    back.check_model(_identity(name="renamed"))
    with pytest.raises(ValueError, match=r"same shape as tuned but with other weights cdcdcdcdcdcd, "
                                         r"this model's 000000000000 \(fingerprints\)"):
        back.check_model(_identity(name="tuned", weights_sha256="0" * 64))
    with pytest.raises(ValueError, match="other vocabulary abababababab"):
        back.check_model(_identity(vocab_sha256="1" * 64))


def test_a_file_without_fingerprints_loads_but_is_refused_for_steering(tmp_path):
    old = HeadDirections.load(_write_raw(tmp_path / "old.gguf"))       # as an older fgdilp-cpp wrote it
    assert (old.model.vocab_sha256, old.model.weights_sha256) == ("", "")
    with pytest.raises(ValueError, match=r"no model fingerprint \(written by an older fgdilp-cpp\).*"
                                         r"build them again for this model with `fgdilp-cpp vectors build`"):
        old.check_model(_identity())


@pytest.fixture(scope="module")
def same_shape_models(tmp_path_factory):
    """Three tiny llamas of one shape: the original, another seed (a fine-tune), and the original
    weights under a vocabulary with one token spelled differently."""
    import tiny_model
    from tiny_model import TinyConfig, build_tiny_llama

    folder = tmp_path_factory.mktemp("same-shape")
    paths = {"a": folder / "a.gguf", "tuned": folder / "tuned.gguf", "vocab": folder / "vocab.gguf"}
    build_tiny_llama(paths["a"], TinyConfig())
    build_tiny_llama(paths["tuned"], TinyConfig(seed=1))
    real = tiny_model.tokenizer_vocab

    def respelled():
        tokens, scores, types = real()
        return tokens[:-1] + ["\u2581zq"], scores, types

    tiny_model.tokenizer_vocab = respelled
    try:
        build_tiny_llama(paths["vocab"], TinyConfig())
    finally:
        tiny_model.tokenizer_vocab = real
    return paths


def test_vectors_of_a_same_shape_model_are_refused_through_the_api(same_shape_models, tmp_path):
    from fgdilp_cpp.api import Detoxifier
    from fgdilp_cpp.engine import Model
    from fgdilp_cpp.errors import FgdilpError
    from fgdilp_cpp.generation import identity_of

    paths = same_shape_models
    with Model(paths["a"]) as m:
        ident = identity_of(m)
        assert m.fingerprint() is m.fingerprint()                      # computed once per model
    with Model(paths["tuned"]) as m:
        tuned = identity_of(m)
    with Model(paths["vocab"]) as m:
        vocab = identity_of(m)
    assert ident.key() == tuned.key() == vocab.key()
    assert ident.vocab_sha256 == tuned.vocab_sha256 and ident.weights_sha256 != tuned.weights_sha256
    assert ident.vocab_sha256 != vocab.vocab_sha256 and ident.weights_sha256 == vocab.weights_sha256
    n_layer, n_head, head_dim = ident.n_layer, ident.n_head, ident.head_dim
    rng = np.random.default_rng(0)
    d = (0.1 * rng.standard_normal((n_layer, n_head, head_dim))).astype(np.float32)
    HeadDirections(directions=d, e=None, model=ident, source="fgdilp-instances").save(tmp_path / "a.gguf")
    vec = str(tmp_path / "a.gguf")

    with Detoxifier.from_file(paths["a"], vectors=vec, n_predict=3, threads=1, ctx_size=128) as det:
        assert det.generate("the cat").text is not None                # the same model: accepted
    for other, what in (("tuned", "other weights"), ("vocab", "other vocabulary")):
        with pytest.raises(FgdilpError, match=f"same shape as tiny-llama-test but with {what}"):
            Detoxifier.from_file(paths[other], vectors=vec, n_predict=3, threads=1, ctx_size=128)


def test_cli_refuses_vectors_of_a_fine_tune_and_inspect_shows_the_fingerprint(same_shape_models, tmp_path, cli):
    vec = tmp_path / "tuned.gguf"
    fast = ["--selfgen-samples", "3", "--selfgen-tokens", "4", "--selfgen-min-tokens", "1", "-c", "256", "-t", "1"]
    built = cli("vectors", "build", "-m", same_shape_models["tuned"], "-p", "the cat", "-o", vec, *fast)
    assert built.returncode == 0, built.stderr
    proc = cli("generate", "-m", same_shape_models["a"], "-p", "a dog", "--vectors", vec, "-n", "3", "-t", "1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "but with other weights" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    hd = HeadDirections.load(vec)
    shown = cli("vectors", "inspect", vec)
    assert shown.returncode == 0 and f"fingerprint  weights {hd.model.weights_sha256[:16]}, vocabulary" in shown.stdout
    old = cli("vectors", "inspect", _write_raw(tmp_path / "old.gguf"))
    assert old.returncode == 0 and "fingerprint  none (an older file: refused for steering" in old.stdout
    assert "source       fgdilp-instances" in shown.stdout and "source       tr-prefixes" in old.stdout
