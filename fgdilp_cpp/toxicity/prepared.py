"""The prepared-scorer cache (issue #26): what a toxicity scorer needs, kept as plain files in the
user's cache folder, so that later loads skip the judge's Keras files.

Unpickling tox-block's 15 MB tokenizer pickle builds the Keras Tokenizer's whole state (counts and
documents of every word seen): it peaks near 120 MiB and leaves ~44 MiB in Python's allocator,
for a 19,999-word vocabulary and two [20000, 200] float32 tables. The first load builds the
scorer from the sha256-checked package files as before and writes what the scorer needs:

    <cache>/scorers/<judge>-<key[:16]>/
        <array>.npy   the folded per-direction tables, the recurrent, dense and output weights
        vocab.json    the vocabulary as the scorer uses it (ids below the table's rows)
        meta.json     format, key, text settings and the sha256 of each file above

<cache> is $FGDILP_CACHE_PATH if set, else $XDG_CACHE_HOME/fgdilp-cpp, else ~/.cache/fgdilp-cpp.
The key hashes the format version, the judge's name and its source files' pinned sha256, so a new
package version or format gets a new folder. Later loads map the arrays (np.load with
mmap_mode="r", allow_pickle=False: only the table rows a text touches become resident) and read
the vocabulary from JSON; nothing here is pickled.

A cache is written in a temp folder renamed into place, so a crash leaves no half cache (at most
a hidden temp folder, removed by a later write); a file is never rewritten in place, which also
keeps the mappings of running processes intact (their old files live on until unmapped). One that does not read back exactly (a missing
or unreadable file, a sha256, key, shape, dtype, vocabulary or setting that differs) is ignored
and rebuilt. A cache folder others may write in is refused with a ScorerCacheWarning: the scorer
then loads from its package files, and nothing is read from or written to that folder.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import FgdilpError
from ..files import fsync_dir, make_private_dir, refuse_shared_dir, sha256_file, write_atomic, write_atomic_with

FORMAT = 1                     # bump when what is written (names, layout, meaning) changes
CACHE_ENV = "FGDILP_CACHE_PATH"
META = "meta.json"
VOCAB = "vocab.json"
# the scorer's arrays after folding (scorer.fold_weights): gate columns (i, f, o, c)
ARRAYS = ("fwd_table", "fwd_recurrent", "bwd_table", "bwd_recurrent", "dense_kernel", "dense_bias",
          "out_kernel", "out_bias")
# the text settings (JSON types) a scorer is rebuilt with, beside its arrays and vocabulary
SETTING_TYPES: dict[str, type] = {"filters": str, "lower": bool, "split": str, "max_len": int,
                                  "recurrent_activation": str, "labels": list, "name": str}
STALE_SECONDS = 3600           # a temp folder this old was left by a crashed write


class ScorerCacheWarning(UserWarning):
    """The prepared-scorer cache could not be used; the scorer was loaded from its package files."""


@dataclasses.dataclass
class Prepared:
    """What a ToxicityScorer is made of: ARRAYS (float32), vocabulary, SETTING_TYPES' settings."""
    arrays: dict[str, np.ndarray]
    vocab: dict[str, int]
    settings: dict[str, Any]


def prepared_shapes(num_words: int, units: int, dense_units: int, n_labels: int) -> dict[str, tuple[int, ...]]:
    """The shape of each of ARRAYS for a BiLSTM(units) -> Dense(dense_units) -> Dense(n_labels)."""
    return {"fwd_table": (num_words, 4 * units), "fwd_recurrent": (units, 4 * units),
            "bwd_table": (num_words, 4 * units), "bwd_recurrent": (units, 4 * units),
            "dense_kernel": (2 * units, dense_units), "dense_bias": (dense_units,),
            "out_kernel": (dense_units, n_labels), "out_bias": (n_labels,)}


def cache_root(environ: Mapping[str, str] | None = None) -> Path:
    """The user's cache folder: FGDILP_CACHE_PATH, else $XDG_CACHE_HOME/fgdilp-cpp, else
    ~/.cache/fgdilp-cpp."""
    env = os.environ if environ is None else environ
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV]).expanduser()
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fgdilp-cpp"


def cache_key(name: str, pins: Sequence[str]) -> str:
    """sha256 naming one judge's prepared scorer: format version, judge, source files' sha256."""
    blob = json.dumps({"format": FORMAT, "judge": name, "sources": list(pins)}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def folder_name(name: str, key: str) -> str:
    """The folder of one judge's prepared scorer inside scorers_dir()."""
    return f"{name}-{key[:16]}"


def scorers_dir() -> Path:
    """The folder prepared scorers live in, created private (0700) where missing. FgdilpError where
    the cache folder or this one is another user's or writable by everyone: whoever can write there
    could swap the files we map for their own."""
    root = make_private_dir(cache_root())
    refuse_shared_dir(root)
    return refuse_shared_dir(make_private_dir(root / "scorers"))


def load_or_prepare(name: str, pins: Sequence[str], shapes: Mapping[str, tuple[int, ...]],
                    expected: Mapping[str, Any], build: Callable[[], Prepared]) -> Prepared:
    """The judge's prepared scorer from the cache, or `build()`'s (written to the cache, then read
    back mapped). `expected`: settings the cached copy must have (name, activation, labels...).
    Never raises for the cache's sake: where it cannot be used, a ScorerCacheWarning says why."""
    try:
        folder = scorers_dir()
    except (OSError, FgdilpError) as exc:
        _warn(f"the scorer cache is not used ({exc}); loading {name} from its package files (set "
              f"{CACHE_ENV} to a folder of your own)")
        return build()
    key = cache_key(name, pins)
    target = folder / folder_name(name, key)
    found = read_prepared(target, key, shapes, expected)
    if found is not None:
        return found
    built = build()
    problem: Exception | None = None
    try:
        write_prepared(target, key, built)
    except (OSError, ValueError, FgdilpError) as exc:
        problem = exc
    # read back: the first load, too, scores from the mapped files (its own arrays are freed)
    again = read_prepared(target, key, shapes, expected)
    if again is not None:
        return again
    _warn(f"cannot write the prepared {name} scorer to {target} "
          f"({problem or 'it did not read back'}); using the one just built from its package files")
    return built


def _warn(message: str) -> None:
    warnings.warn(message, ScorerCacheWarning, stacklevel=3)


def read_prepared(folder: Path, key: str, shapes: Mapping[str, tuple[int, ...]],
                  expected: Mapping[str, Any]) -> Prepared | None:
    """The prepared scorer in `folder` with its arrays mapped read-only, or None unless it is
    exactly the one `key` names (every file present with its recorded sha256, shapes and dtypes
    as `shapes`, settings as `expected`)."""
    try:
        meta = json.loads((folder / META).read_bytes())
        if type(meta) is not dict or meta.get("format") != FORMAT or meta.get("key") != key:
            return None
        digests = meta.get("sha256")
        if type(digests) is not dict or set(digests) != {f"{n}.npy" for n in shapes} | {VOCAB}:
            return None
        # hashed by reading, not through the mapping: a damaged file is caught before use and
        # the tables' pages stay out of this process until a text needs them
        if any(sha256_file(folder / f) != digest for f, digest in digests.items()):
            return None
        arrays = {}
        for n, shape in shapes.items():
            a = np.load(folder / f"{n}.npy", mmap_mode="r", allow_pickle=False)
            if a.dtype != np.float32 or a.shape != tuple(shape) or not a.flags.c_contiguous:
                return None
            arrays[n] = np.asarray(a)            # a plain ndarray view of the read-only mapping
        vocab = json.loads((folder / VOCAB).read_bytes())
        settings = meta["settings"]
        if not _vocab_ok(vocab, min(s[0] for n, s in shapes.items() if n.endswith("_table"))) \
                or not _settings_ok(settings, expected):
            return None
        return Prepared(arrays, vocab, settings)
    except Exception:   # any failure to read means "no usable cache": rebuilt, never the user's error
        return None


def _vocab_ok(vocab: Any, rows: int) -> bool:
    """str -> int ids that index the tables (0 is padding, so 0 < id < rows)."""
    return type(vocab) is dict and all(type(w) is str and type(i) is int and 0 < i < rows
                                       for w, i in vocab.items())


def _settings_ok(settings: Any, expected: Mapping[str, Any]) -> bool:
    if type(settings) is not dict or set(settings) != set(SETTING_TYPES):
        return False
    if any(type(settings[k]) is not t for k, t in SETTING_TYPES.items()):
        return False
    if len(settings["split"]) != 1 or settings["max_len"] < 1 \
            or not all(type(label) is str for label in settings["labels"]):
        return False
    return all(settings[k] == (list(v) if isinstance(v, tuple) else v) for k, v in expected.items())


def write_prepared(target: Path, key: str, prep: Prepared) -> None:
    """Write `prep` as the folder `target` (replacing whatever is there) through a temp folder
    beside it that is renamed into place once complete and fsynced."""
    parent = target.parent
    _remove_stale(parent)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        names = []
        for n in ARRAYS:
            a = np.ascontiguousarray(prep.arrays[n], dtype=np.float32)
            write_atomic_with(tmp / f"{n}.npy", functools.partial(_save_npy, a=a), private=True)
            names.append(f"{n}.npy")
        write_atomic(tmp / VOCAB, json.dumps(prep.vocab, ensure_ascii=True), private=True)
        names.append(VOCAB)
        settings = {k: prep.settings[k] for k in SETTING_TYPES}
        meta = {"format": FORMAT, "key": key, "settings": settings,
                "sha256": {f: sha256_file(tmp / f) for f in names}}
        write_atomic(tmp / META, json.dumps(meta, indent=1, ensure_ascii=True), private=True)
        fsync_dir(tmp)
        _install(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)          # gone already once renamed


def _save_npy(path: str, a: np.ndarray) -> None:
    with open(path, "wb") as fh:                        # a file object: np.save would add ".npy"
        np.save(fh, a, allow_pickle=False)


def _install(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`; a cache in the way (one that did not read back, or one another
    process has just written) is first moved aside by a rename, then deleted."""
    try:
        os.rename(tmp, target)
    except OSError:
        aside = target.parent / f".{target.name}.{secrets.token_hex(8)}.old"
        os.rename(target, aside)
        _remove(aside)
        os.rename(tmp, target)
    fsync_dir(target.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_stale(folder: Path) -> None:
    """Temp and set-aside folders of writes that crashed (older than STALE_SECONDS: a younger one
    may be another process's write in progress)."""
    now = time.time()
    for p in [*folder.glob(".*.tmp"), *folder.glob(".*.old")]:
        try:
            if now - p.lstat().st_mtime > STALE_SECONDS:
                _remove(p)
        except OSError:
            pass


__all__ = ["ARRAYS", "CACHE_ENV", "FORMAT", "Prepared", "ScorerCacheWarning", "cache_key", "cache_root", "folder_name",
           "load_or_prepare", "prepared_shapes", "read_prepared", "scorers_dir", "write_prepared"]
