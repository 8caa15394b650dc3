"""The prepared-scorer cache (toxicity/prepared.py, issue #26): the first load writes what the scorer
needs to the cache folder, later loads map it without unpickling and score bit-identically; a
damaged cache is rebuilt, a shared folder refused, and a cached load peaks far below an uncached one."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fgdilp_cpp.files import sha256_file
from fgdilp_cpp.evaluation import judges
from fgdilp_cpp.toxicity import files, keras_files, prepared
from fgdilp_cpp.toxicity import scorer as scorer_mod
from fgdilp_cpp.toxicity.prepared import ScorerCacheWarning, cache_key, folder_name, read_prepared
from fgdilp_cpp.toxicity.scorer import ToxicityScorer

needs_toxblock = pytest.mark.skipif(
    importlib.util.find_spec("tox_block") is None or importlib.util.find_spec("h5py") is None,
    reason="tox-block==0.1.2 (pip --no-deps) and h5py are installed by `make install`")
needs_tcc = pytest.mark.skipif(
    importlib.util.find_spec("toxic_classifier") is None or importlib.util.find_spec("h5py") is None,
    reason="toxic-comment-classifier==0.3.0 (pip --no-deps) and h5py are installed by `make install`")

TEXTS = ["you idiot", "Good morning my friend, I hope you're having a fantastic day!", "",
         "I will kill you, you fucking idiot!", "naïve café, ünïcödé and zzqxunknownword",
         " ".join(["the stupid dog"] * 60),           # longer than the 100 ids the scorer keeps
         "I do strongly disagree with the fascist views of this joke that calls itself a party."]


def toxblock_folder(root: Path) -> Path:
    return root / "scorers" / folder_name("tox-block", cache_key("tox-block", files.toxblock_pins()))


@pytest.fixture(scope="module")
def reference():
    """tox-block built from its package files as without a cache, and its scores of TEXTS."""
    model_bytes, encoder_bytes = files.toxblock_bytes()
    tok = keras_files.read_tokenizer(encoder_bytes)
    s = ToxicityScorer(keras_files.read_keras_h5(model_bytes), tok["vocab"], tok["filters"], tok["lower"],
                       tok["split"], tok["max_len"])
    return s, s.score(TEXTS)


@pytest.fixture(scope="module")
def pristine(reference, tmp_path_factory):
    """A cache root holding a correct prepared tox-block, to copy and damage."""
    root = tmp_path_factory.mktemp("pristine")
    target = toxblock_folder(root)
    target.parent.mkdir(mode=0o700)
    prepared.write_prepared(target, cache_key("tox-block", files.toxblock_pins()), reference[0].prepared())
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("FGDILP_CACHE_PATH", str(root))
    return root


@pytest.fixture
def unpickled(monkeypatch) -> list[int]:
    """Counts the tox-block tokenizer pickles read (a cache that serves reads none)."""
    calls: list[int] = []
    real = scorer_mod.read_tokenizer

    def counting(source):
        calls.append(1)
        return real(source)

    monkeypatch.setattr(scorer_mod, "read_tokenizer", counting)
    return calls


def fresh_load(monkeypatch) -> ToxicityScorer:
    """ToxicityScorer.load() as in a new process (its per-process copy dropped)."""
    monkeypatch.setattr(ToxicityScorer, "_cache", None)
    return ToxicityScorer.load()


def forbid_keras_files(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("read a Keras file although the cache should serve")

    for mod, name in [(scorer_mod, "read_tokenizer"), (scorer_mod, "read_keras_h5"), (keras_files, "safe_loads"),
                      (judges, "read_keras_tokenizer"), (judges, "read_keras3_weights")]:
        monkeypatch.setattr(mod, name, refuse)


def assert_same_scores(s: ToxicityScorer, reference) -> None:
    ref, ref_scores = reference
    np.testing.assert_array_equal(s.score(TEXTS), ref_scores)      # bit-identical, not approx
    assert s.vocab == ref.vocab and s.labels == ref.labels


def valid_cache(root: Path) -> bool:
    return read_prepared(toxblock_folder(root), cache_key("tox-block", files.toxblock_pins()),
                         scorer_mod.TOXBLOCK_SHAPES, scorer_mod.TOXBLOCK_SETTINGS) is not None


# ------------------------------------------------------------------ where

def test_cache_root_precedence(tmp_path):
    assert prepared.cache_root({"FGDILP_CACHE_PATH": str(tmp_path), "XDG_CACHE_HOME": "/x"}) == tmp_path
    assert prepared.cache_root({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "fgdilp-cpp"
    assert prepared.cache_root({}) == Path.home() / ".cache" / "fgdilp-cpp"
    assert prepared.cache_root({"FGDILP_CACHE_PATH": ""}) == Path.home() / ".cache" / "fgdilp-cpp"
    # the key changes with the format, the judge and either source file
    keys = {cache_key("tox-block", ("a", "b")), cache_key("tox-block", ("a", "c")),
            cache_key("toxic-comment-classifier", ("a", "b"))}
    assert len(keys) == 3


def test_the_session_cache_is_not_the_users():
    # tests/conftest.py: a session folder, so that no test writes to the user's ~/.cache
    assert Path(os.environ["FGDILP_CACHE_PATH"]) != prepared.cache_root({})


# ------------------------------------------------------------------ writes, then reads

@pytest.mark.real_model
@needs_toxblock
def test_first_load_writes_the_cache_and_the_second_maps_it(cache, monkeypatch, reference, unpickled):
    first = fresh_load(monkeypatch)
    assert unpickled == [1]
    assert_same_scores(first, reference)
    folder = toxblock_folder(cache)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{n}.npy" for n in prepared.ARRAYS] + ["vocab.json", "meta.json"])
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]          # no temp folder left
    assert all((p.stat().st_mode & 0o077) == 0 for p in folder.iterdir())
    assert (folder.stat().st_mode & 0o077) == 0 and (cache.stat().st_mode & 0o077) == 0
    assert json.loads((folder / "meta.json").read_text())["settings"]["recurrent_activation"] == "hard_sigmoid"

    forbid_keras_files(monkeypatch)
    second = fresh_load(monkeypatch)
    assert second is not first
    assert_same_scores(second, reference)
    for d in ("_fwd", "_bwd"):
        table = getattr(second, d).table
        assert isinstance(table.base, np.memmap) and not table.flags.writeable    # mapped, not copied
        np.testing.assert_array_equal(table, getattr(reference[0], d).table)


# ------------------------------------------------------------------ damaged caches

def _rehash(folder: Path) -> None:
    """Record the files' current sha256 in meta.json, so that only the check under test can fail."""
    meta = json.loads((folder / "meta.json").read_text())
    meta["sha256"] = {f: sha256_file(folder / f) for f in meta["sha256"]}
    (folder / "meta.json").write_text(json.dumps(meta))


def _edit_meta(folder: Path, edit) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    edit(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


def _truncate(folder: Path) -> None:
    p = folder / "fwd_table.npy"
    os.truncate(p, p.stat().st_size // 2)


def _flip_a_byte(folder: Path) -> None:
    with open(folder / "bwd_table.npy", "r+b") as f:
        f.seek(100_000)
        b = f.read(1)
        f.seek(100_000)
        f.write(bytes([b[0] ^ 0x40]))


def _save(folder: Path, name: str, a: np.ndarray) -> None:
    np.save(folder / f"{name}.npy", a)
    _rehash(folder)


def _bad_vocab(folder: Path) -> None:
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab["the"] = 20000                          # past the tables' rows
    (folder / "vocab.json").write_text(json.dumps(vocab))
    _rehash(folder)


def _a_file_in_its_place(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.write_text("not a cache")


DAMAGES = {
    "truncated table": _truncate,
    "a flipped byte": _flip_a_byte,
    "missing vocabulary": lambda f: (f / "vocab.json").unlink(),
    "meta not JSON": lambda f: (f / "meta.json").write_text("{\"format\": 1, \"key"),
    "wrong shape": lambda f: _save(f, "out_bias", np.zeros(7, np.float32)),
    "wrong dtype": lambda f: _save(f, "dense_bias", np.zeros(50, np.float64)),
    "Fortran order": lambda f: _save(f, "dense_kernel", np.asfortranarray(np.load(f / "dense_kernel.npy"))),
    "wrong key": lambda f: _edit_meta(f, lambda m: m.update(key="0" * 64)),
    "wrong format": lambda f: _edit_meta(f, lambda m: m.update(format=0)),
    "wrong setting": lambda f: _edit_meta(f, lambda m: m["settings"].update(recurrent_activation="sigmoid")),
    "id past the table": _bad_vocab,
    "a file in its place": _a_file_in_its_place,
}


@pytest.mark.real_model
@needs_toxblock
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_cache_is_rebuilt(damage, cache, pristine, monkeypatch, reference, unpickled):
    shutil.copytree(pristine, cache)
    assert valid_cache(cache)
    DAMAGES[damage](toxblock_folder(cache))
    assert not valid_cache(cache)
    assert_same_scores(fresh_load(monkeypatch), reference)                 # no error, same scores
    assert unpickled == [1]                                                # rebuilt from the package
    assert valid_cache(cache)                                              # and written again
    assert len(list((cache / "scorers").iterdir())) == 1                   # the damaged copy is gone
    assert_same_scores(fresh_load(monkeypatch), reference)
    assert unpickled == [1]                                                # the rebuilt one serves


@pytest.mark.real_model
@needs_toxblock
def test_a_failed_write_leaves_no_half_cache(cache, monkeypatch, reference, unpickled):
    real = prepared._save_npy

    def disk_full_at_the_second_table(path, a):
        if (Path(path).parent / "fwd_table.npy").exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, a)

    monkeypatch.setattr(prepared, "_save_npy", disk_full_at_the_second_table)
    with pytest.warns(ScorerCacheWarning, match="No space left"):
        assert_same_scores(fresh_load(monkeypatch), reference)
    assert list((cache / "scorers").iterdir()) == []                       # neither cache nor temp folder
    # a temp folder a crashed write left an hour ago goes with the next write; a young one stays
    old, young = cache / "scorers" / ".tox-block-x.1.tmp", cache / "scorers" / ".tox-block-x.2.tmp"
    old.mkdir(), young.mkdir()
    os.utime(old, (time.time() - 2 * prepared.STALE_SECONDS,) * 2)
    monkeypatch.setattr(prepared, "_save_npy", real)
    assert_same_scores(fresh_load(monkeypatch), reference)
    assert valid_cache(cache) and not old.exists() and young.exists()


# ------------------------------------------------------------------ folders that cannot be used

@pytest.mark.real_model
@needs_toxblock
@pytest.mark.parametrize("shared", [".", "scorers"])
def test_a_shared_cache_folder_is_refused(shared, tmp_path, pristine, monkeypatch, reference, unpickled):
    """A folder others may write in is neither read (they could have planted the files) nor written:
    the scorer loads from its package files, and a warning says why."""
    root = tmp_path / "shared"
    shutil.copytree(pristine, root)                                       # a cache someone planted
    os.chmod(root / shared, 0o777)
    before = sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*"))
    monkeypatch.setenv("FGDILP_CACHE_PATH", str(root))
    with pytest.warns(ScorerCacheWarning, match="writable by every user"):
        s = fresh_load(monkeypatch)
    assert_same_scores(s, reference)
    assert unpickled == [1]                                                # not read from the folder
    assert sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*")) == before    # nor written


@pytest.mark.real_model
@needs_toxblock
def test_a_cache_folder_that_cannot_be_made_warns(tmp_path, monkeypatch, reference):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("FGDILP_CACHE_PATH", str(tmp_path / "a-file" / "cache"))
    with pytest.warns(ScorerCacheWarning, match="not used"):
        assert_same_scores(fresh_load(monkeypatch), reference)


# ------------------------------------------------------------------ the second judge

@pytest.mark.real_model
@needs_tcc
def test_tcc_goes_through_the_cache(cache, monkeypatch):
    ref = judges.build_scorer(judges.TCC, *files.tcc_bytes())
    monkeypatch.setattr(judges, "_cache", {})
    np.testing.assert_array_equal(judges.load_judge("tcc").score(TEXTS), ref.score(TEXTS))
    assert [p.name.split("-")[0] for p in (cache / "scorers").iterdir()] == ["toxic"]
    forbid_keras_files(monkeypatch)
    monkeypatch.setattr(judges, "_cache", {})
    s = judges.load_judge("tcc")
    np.testing.assert_array_equal(s.score(TEXTS), ref.score(TEXTS))
    assert s.recurrent_activation == "sigmoid" and s.name == "toxic-comment-classifier"


# ------------------------------------------------------------------ what it is for: memory

PEAK = """
from fgdilp_cpp.toxicity.scorer import ToxicityScorer
texts = ["you idiot %d" % i + " the day was fine" * i for i in range(10)]
assert ToxicityScorer.load().score(texts).shape == (10, 6)
print([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")][0])
"""


@pytest.mark.real_model
@needs_toxblock
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_a_cached_load_peaks_at_least_60_mib_lower(tmp_path):
    env = {**os.environ, "FGDILP_CACHE_PATH": str(tmp_path / "cache")}

    def peak_mib() -> float:
        r = subprocess.run([sys.executable, "-c", PEAK], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        return int(r.stdout.split()[-1]) / 1024

    uncached = peak_mib()                          # builds from the package files, writes the cache
    assert valid_cache(tmp_path / "cache")
    cached = peak_mib()
    assert cached <= uncached - 60, (uncached, cached)
