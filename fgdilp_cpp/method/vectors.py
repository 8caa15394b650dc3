"""The saved steering artifact: per-head directions (and the lambda_sim reference e) for one model.

A small value type in the style of repeng's ControlVector, stored as a GGUF file of its own kind
(general.architecture = "fgdilp-directions"). Pure numpy + gguf: never imports llama_cpp.

Shapes: directions and e are [n_layer, n_head, head_dim] float32; a layer row is
[n_head * head_dim] (heads concatenated), the width of the graph node kqv_out-<il>.

Model match: a file records its model's shape (ModelIdentity.key()) and two fingerprints
(fgdilp.model.vocab_sha256, fgdilp.model.weights_sha256; Model.fingerprint()), so that directions
built on another model of the same shape (another fine-tune, another quantisation) are refused.
Files written before the fingerprints existed (same format version, no such keys) still load and
can be inspected, but are refused for steering: their model cannot be verified, steering with the
wrong one degrades silently, and a rebuild takes seconds.

Source: a file records where its directions come from (fgdilp.source: method.sources). Files
written before that key existed kept a method-like name in fgdilp.method ("fgdilp-frozen",
"universal-data"): they load, that name read as its source (method.sources.from_legacy).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

import gguf
import numpy as np

from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp.method.contrast import with_head_norms
from fgdilp_cpp.method.sources import from_legacy
from fgdilp_cpp.files import write_atomic_with

FILE_ARCH = "fgdilp-directions"
FORMAT_VERSION = 1
_INT_FIELDS = ("n_layer", "n_head", "head_dim", "n_embd", "n_vocab")
_FINGERPRINTS = ("vocab_sha256", "weights_sha256")     # optional keys: absent in older files


class DirectionsError(FgdilpError, ValueError):
    """A directions file or value that cannot be used (a ValueError with a one-line message)."""


def random_heads(directions: np.ndarray, seed: int) -> np.ndarray:
    """Random directions with the per-head norms of directions [n_layer, n_head, head_dim] (a zero
    head stays zero): the random control."""
    g = np.random.default_rng(seed).standard_normal(directions.shape)     # [n_layer, n_head, head_dim]
    return with_head_norms(g, np.linalg.norm(np.asarray(directions, dtype=np.float64), axis=2))


@dataclass(frozen=True)
class ModelIdentity:
    architecture: str
    n_layer: int
    n_head: int
    head_dim: int
    n_embd: int
    n_vocab: int
    name: str = ""  # general.name or file name: informative only, not part of key()
    vocab_sha256: str = ""    # Model.fingerprint(); "" in files written before fingerprints existed
    weights_sha256: str = ""

    def key(self) -> str:
        """What must match between the vectors and the model they are applied to."""
        return (f"{self.architecture}/L{self.n_layer}/H{self.n_head}x{self.head_dim}"
                f"/E{self.n_embd}/V{self.n_vocab}")

    def describe(self) -> str:
        return f"{self.name or 'an unnamed model'} ({self.key()})"


@dataclass(frozen=True, eq=False)
class HeadDirections:
    directions: np.ndarray    # [n_layer, n_head, head_dim] float32: fused sub-toxicity vector (delta)
    e: np.ndarray | None      # [n_layer, n_head, head_dim] float32: negative prefix ':' head outputs
    model: ModelIdentity
    source: str               # where the directions come from: method.sources ("labelled-text", ...)
    settings: dict = field(default_factory=dict)  # JSON-serialisable settings used to build it
    layer_convention: str = "kqv_out-<il>: per-head attention output before W_O of block il (0-based)"
    head_layout: str = ("a layer row [n_head*head_dim] is the concatenation of heads; "
                        "head h = row[h*head_dim:(h+1)*head_dim]")
    probe_accuracy: np.ndarray | None = None   # [n_layer, n_head] float32: held-out accuracy of head probes
    head_weights: np.ndarray | None = None     # [n_layer, n_head] float32: per-head scale applied when steering

    n_layer = property(lambda self: self.model.n_layer)
    n_head = property(lambda self: self.model.n_head)
    head_dim = property(lambda self: self.model.head_dim)

    def rows(self) -> np.ndarray:
        """[n_layer, n_head*head_dim]: the layer rows (a view for contiguous directions)."""
        return self.directions.reshape(self.n_layer, self.n_head * self.head_dim)

    def steering_rows(self) -> np.ndarray:
        """[n_layer, n_head*head_dim]: the rows steered with, each head scaled by head_weights (a
        head of weight 0 gets a zero direction: its TR edit subtracts nothing)."""
        if self.head_weights is None:
            return self.rows()
        d = self.directions * self.head_weights[:, :, None]
        return d.astype(np.float32).reshape(self.n_layer, self.n_head * self.head_dim)

    def with_head_weights(self, weights: np.ndarray, accuracy: np.ndarray | None, how: dict) -> "HeadDirections":
        """A copy that steers with per-head weights (probe head selection); `how` is recorded in settings."""
        return replace(self, head_weights=np.asarray(weights, dtype=np.float32),
                       probe_accuracy=None if accuracy is None else np.asarray(accuracy, dtype=np.float32),
                       settings={**self.settings, "head_selection": how}).validate()

    def layer_norms(self) -> np.ndarray:
        """[n_layer] L2 norm of each layer row (float64)."""
        return np.linalg.norm(self.rows().astype(np.float64), axis=1)

    def head_norms(self) -> np.ndarray:
        """[n_layer, n_head] L2 norm of each head's direction (float64)."""
        return np.linalg.norm(self.directions.astype(np.float64), axis=2)

    def validate(self) -> HeadDirections:
        m = self.model
        bad = [f for f in _INT_FIELDS if not isinstance(getattr(m, f), int) or getattr(m, f) <= 0]
        if bad or not m.architecture:
            raise DirectionsError(f"invalid model identity {m!r}: {', '.join(bad) or 'architecture'}"
                                  " must be set (positive integers, non-empty architecture)")
        if not isinstance(self.source, str) or not self.source.strip():
            raise DirectionsError(f"source must name where the directions come from, not {self.source!r}")
        expected = (m.n_layer, m.n_head, m.head_dim)
        for name, arr in (("directions", self.directions), ("e", self.e)):
            if arr is None and name == "e":  # e is optional
                continue
            if not isinstance(arr, np.ndarray):
                raise DirectionsError(f"{name} must be a numpy array, not {type(arr).__name__}")
            if arr.shape != expected:
                raise DirectionsError(f"{name} has shape {list(arr.shape)}, expected "
                                      f"[n_layer, n_head, head_dim] = {list(expected)} for {m.key()}")
            if arr.dtype != np.float32:
                raise DirectionsError(f"{name} has dtype {arr.dtype}, expected float32")
            bad_layers = np.flatnonzero(~np.isfinite(arr).all(axis=(1, 2)))
            if bad_layers.size:
                il = int(bad_layers[0])
                kind = "NaN" if np.isnan(arr[il]).any() else "inf"
                raise DirectionsError(f"{name} has non-finite values ({kind}) in layer {il} "
                                      f"(layers with non-finite values: {bad_layers.tolist()})")
        for name, arr in (("probe_accuracy", self.probe_accuracy), ("head_weights", self.head_weights)):
            if arr is None:
                continue
            if not isinstance(arr, np.ndarray) or arr.shape != (m.n_layer, m.n_head) or arr.dtype != np.float32:
                raise DirectionsError(f"{name} must be a float32 [n_layer, n_head] = {[m.n_layer, m.n_head]} "
                                      f"array, not {getattr(arr, 'dtype', type(arr).__name__)} "
                                      f"{list(getattr(arr, 'shape', []))}")
            if not np.all(np.isfinite(arr)) or (name == "head_weights" and arr.min() < 0):
                raise DirectionsError(f"{name} must be finite" + (" and >= 0" if name == "head_weights" else ""))
        try:
            json.dumps(self.settings, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise DirectionsError(f"settings are not JSON-serialisable: {exc}") from exc
        return self

    def check_model(self, identity: ModelIdentity) -> None:
        """Refuse another model: another shape, or the same shape with other weights or vocabulary
        (see the module doc; files without fingerprints are refused too)."""
        mine = self.model
        if identity.key() != mine.key():
            raise DirectionsError(f"vectors were built for {mine.describe()}, "
                                  f"not for {identity.describe()}")
        if not (mine.vocab_sha256 and mine.weights_sha256):
            raise DirectionsError(f"these vectors have no model fingerprint (written by an older "
                                  f"fgdilp-cpp), so they cannot be matched to {identity.describe()} beyond "
                                  "its shape; build them again for this model with `fgdilp-cpp vectors build`")
        other = [f"{what} {a[:12]}, this model's {b[:12] or 'unknown'}"
                 for what, a, b in (("vocabulary", mine.vocab_sha256, identity.vocab_sha256),
                                    ("weights", mine.weights_sha256, identity.weights_sha256)) if a != b]
        if other:
            raise DirectionsError(f"vectors were built for {mine.describe()}, a model of the same shape as "
                                  f"{identity.name or 'this one'} but with other {'; '.join(other)} "
                                  "(fingerprints): another fine-tune or "
                                  "quantisation? Build them for this model with `fgdilp-cpp vectors build`")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HeadDirections):
            return NotImplemented
        return (_same_bits(self.directions, other.directions) and _same_bits(self.e, other.e)
                and _same_bits(self.probe_accuracy, other.probe_accuracy)
                and _same_bits(self.head_weights, other.head_weights)
                and (self.model, self.source, self.settings, self.layer_convention, self.head_layout)
                == (other.model, other.source, other.settings, other.layer_convention,
                    other.head_layout))

    __hash__ = None  # holds arrays: not hashable

    # ---- controls for evaluation ----

    def reversed(self) -> HeadDirections:
        """Directions negated (e unchanged): steering toward the toxic side, a control."""
        return replace(self, directions=-self.directions, source=f"{self.source}+reversed",
                       settings={**self.settings, "control": "reversed"})

    @staticmethod
    def random_like(template: HeadDirections, seed: int) -> HeadDirections:
        """Random per-head directions with the template's per-head norms (e unchanged)."""
        d = random_heads(template.directions, seed)
        return replace(template, directions=d, source=f"{template.source}+random",
                       settings={**template.settings, "control": "random_like", "seed": int(seed)})

    # ---- file format ----

    def save(self, path: str | os.PathLike) -> None:
        """Write a GGUF file atomically (files.write_atomic_with: a unique temp file in the same
        folder, fsync, os.replace; a symlink at `path` is refused)."""
        self.validate()

        def write(tmp: str) -> None:
            w = gguf.GGUFWriter(tmp, FILE_ARCH)
            w.add_name(f"{self.source} head directions for {self.model.name or self.model.key()}")
            w.add_uint32("fgdilp.format_version", FORMAT_VERSION)
            w.add_string("fgdilp.model.architecture", self.model.architecture)
            w.add_string("fgdilp.model.name", self.model.name)
            for f in _INT_FIELDS:
                w.add_uint32(f"fgdilp.model.{f}", getattr(self.model, f))
            w.add_string("fgdilp.model.key", self.model.key())
            for f in _FINGERPRINTS:
                if getattr(self.model, f):
                    w.add_string(f"fgdilp.model.{f}", getattr(self.model, f))
            w.add_string("fgdilp.source", self.source)
            w.add_string("fgdilp.settings", json.dumps(self.settings, sort_keys=True, allow_nan=False))
            w.add_string("fgdilp.layer_convention", self.layer_convention)
            w.add_string("fgdilp.head_layout", self.head_layout)
            w.add_bool("fgdilp.has_e", self.e is not None)
            w.add_tensor("directions", np.ascontiguousarray(self.directions))
            if self.e is not None:
                w.add_tensor("e", np.ascontiguousarray(self.e))
            for name in ("probe_accuracy", "head_weights"):     # optional: files without them still load
                if getattr(self, name) is not None:
                    w.add_tensor(name, np.ascontiguousarray(getattr(self, name)))
            for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
                step()

        write_atomic_with(path, write)      # mode 0644: a saved artifact is an ordinary file

    @classmethod
    def load(cls, path: str | os.PathLike) -> HeadDirections:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise DirectionsError(f"{path}: " + ("not a file" if os.path.exists(path) else "no such file"))
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise DirectionsError(f"{path}: not a GGUF file (no GGUF magic)")
        try:
            reader = gguf.GGUFReader(path)
        except Exception as exc:  # the reader raises several kinds on truncated/corrupt input
            raise DirectionsError(f"{path}: unreadable GGUF file (truncated or corrupt: "
                                  f"{type(exc).__name__}: {exc})") from exc
        try:
            return cls._from_reader(reader, path).validate()
        except DirectionsError as exc:
            if str(exc).startswith(path):
                raise
            raise DirectionsError(f"{path}: {exc}") from None
        finally:
            del reader

    @classmethod
    def _from_reader(cls, reader: gguf.GGUFReader, path: str) -> HeadDirections:
        def get(key: str, kind: type, required: bool = True):
            fld = reader.get_field(key)
            if fld is None:
                if required:
                    raise DirectionsError(f"{path}: missing key {key}")
                return None
            val = fld.contents()
            if kind is int and isinstance(val, bool) or not isinstance(val, kind):
                raise DirectionsError(f"{path}: key {key} is {type(val).__name__}, "
                                      f"expected {kind.__name__}")
            return val

        arch = get("general.architecture", str, required=False)
        if arch != FILE_ARCH:
            if arch is None:
                what = "a GGUF file without general.architecture"
            elif arch == "controlvector":
                hint = get("controlvector.model_hint", str, required=False)
                what = f"a llama.cpp control vector (model_hint {hint!r})"
            else:
                what = f"a GGUF model or other file of architecture {arch!r} ({len(reader.tensors)} tensors)"
            raise DirectionsError(f"{path}: is {what}, not an {FILE_ARCH} file")
        version = get("fgdilp.format_version", int)
        if version != FORMAT_VERSION:
            raise DirectionsError(f"{path}: unsupported {FILE_ARCH} format version {version} "
                                  f"(this build reads version {FORMAT_VERSION})")
        model = ModelIdentity(architecture=get("fgdilp.model.architecture", str),
                              name=get("fgdilp.model.name", str, required=False) or "",
                              **{f: get(f"fgdilp.model.{f}", str, required=False) or "" for f in _FINGERPRINTS},
                              **{f: get(f"fgdilp.model.{f}", int) for f in _INT_FIELDS})
        try:
            settings = json.loads(get("fgdilp.settings", str))
        except json.JSONDecodeError as exc:
            raise DirectionsError(f"{path}: fgdilp.settings is not valid JSON: {exc}") from exc
        if not isinstance(settings, dict):
            raise DirectionsError(f"{path}: fgdilp.settings is not a JSON object")
        source = get("fgdilp.source", str, required=False)
        if source is None:              # a file of before fgdilp.source: its method-like name
            legacy = get("fgdilp.method", str, required=False)
            if legacy is None:
                raise DirectionsError(f"{path}: missing key fgdilp.source")
            source = from_legacy(legacy)
        tensors = {t.name: t for t in reader.tensors}
        has_e = get("fgdilp.has_e", bool, required=False)

        def tensor(name: str) -> np.ndarray:
            t = tensors[name]
            if t.tensor_type != gguf.GGMLQuantizationType.F32:
                raise DirectionsError(f"{path}: tensor {name} is {t.tensor_type.name}, expected F32")
            return np.array(t.data, dtype=np.float32, copy=True)  # owned, native byte order

        if "directions" not in tensors:
            raise DirectionsError(f"{path}: missing tensor 'directions'")
        if has_e and "e" not in tensors:
            raise DirectionsError(f"{path}: missing tensor 'e' (fgdilp.has_e is true)")
        return cls(directions=tensor("directions"), e=tensor("e") if "e" in tensors else None,
                   model=model, source=source, settings=settings,
                   layer_convention=get("fgdilp.layer_convention", str),
                   head_layout=get("fgdilp.head_layout", str),
                   probe_accuracy=tensor("probe_accuracy") if "probe_accuracy" in tensors else None,
                   head_weights=tensor("head_weights") if "head_weights" in tensors else None)


def _same_bits(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return (a.shape == b.shape and a.dtype == b.dtype
            and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes())
