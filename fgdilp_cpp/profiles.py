"""Model profiles: the steering settings `fgdilp-cpp calibrate` measured best for one model, and
the figures behind them. A profile is keyed by the model's weights fingerprint, so it is never
applied to another model (another fine-tune of the same shape included). Another quantisation of
the same weights (same family fingerprint: tensors.family_fingerprint) gets the profile and the
universal directions of its family when it has none of its own, recorded as transferred
(Profile.transferred_from), provided it is at least as precise (bits per weight) as the file the
profile was measured on: docs/results/quant-transfer.md measured that this is safe, and that a
less precise one (Q3_K_M of a Q4 model) moves the directions too far.

Where they live: the user's `$XDG_CONFIG_HOME/fgdilp-cpp/profiles/` (written by calibrate), then
the ones shipped in the package (fgdilp_cpp/profiles/, for the embedded models);
FGDILP_PROFILE_PATH replaces that search path.
Precedence of a setting (settings.resolve): flag > FGDILP_* environment > --config file > profile >
the command's default > built-in default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from . import methods as registry
from .errors import FgdilpError
from .files import write_atomic
from .method.sources import from_legacy
from .settings import PROFILE_FIELDS, Settings, toml_key   # what a profile may set: settings.Settings says

FORMAT = "fgdilp-profile"
FAST_SETUP = "fast-setup"          # Profile.setup["kind"] of a profile the fast setup made (autosetup)
VERSION = 1
SHIPPED_DIR = Path(__file__).resolve().parent / "profiles"
UNIVERSAL_SUFFIX = ".universal.gguf"   # a model's universal directions beside its profile (find_universal)


def search_path(environ: Mapping[str, str] = os.environ) -> list[Path]:
    """Where profiles are looked up, in order: FGDILP_PROFILE_PATH (folders joined by os.pathsep) if
    set, else the user's folder, then the package's."""
    if "FGDILP_PROFILE_PATH" in environ:
        return [Path(p) for p in environ["FGDILP_PROFILE_PATH"].split(os.pathsep) if p]
    return [user_profile_dir(environ), SHIPPED_DIR]


def universal_path_for(weights_sha256: str, folder: Optional[Path] = None) -> Path:
    """Where a model's universal directions (method universal) live in a profile folder:
    named by its weights fingerprint, as `vectors build --install` writes them."""
    return (folder or user_profile_dir()) / f"{weights_sha256[:24]}{UNIVERSAL_SUFFIX}"


# a model's family fingerprint, or what computes it (called only when no file is keyed by its weights)
Family = Union[str, None, Callable[[], Optional[str]]]


def find_universal(weights_sha256: str, folders: Optional[list[Path]] = None, family: Family = None,
                   bits_per_weight: Optional[float] = None) -> Optional[Path]:
    """The model's universal directions file: the user's profile folder first, then the package's
    (the search path of the profiles); else, given the model's family fingerprint and bits per
    weight, the file of a profile of its family (another quantisation of the same weights, no more
    precise than this one) in those folders; None if there is none. A transferred file records
    the other file's weights: HeadDirections.check_model must be told
    (generation.Generator.universal_directions)."""
    chosen = folders if folders is not None else search_path()
    for folder in chosen:
        p = universal_path_for(weights_sha256, folder)
        if p.is_file():
            return p
    fam = family() if callable(family) else family
    if not fam or bits_per_weight is None:
        return None
    for where, data in _family_profiles(chosen, fam, bits_per_weight):
        p = universal_path_for(str(data["model"]["weights_sha256"]), where.parent)
        if p.is_file():
            return p
    return None


def lendable(model: Mapping[str, Any], family: str, bits_per_weight: float) -> bool:
    """Whether a profile's model entry may be lent to a file of this family fingerprint and bits
    per weight: the same weights, and the file at least as precise as the one it was measured on."""
    theirs = model.get("bits_per_weight")
    return bool(family) and model.get("family_sha256") == family and isinstance(theirs, (int, float)) \
        and bits_per_weight >= theirs - 1e-6


def _family_profiles(folders: list[Path], family: str, bits_per_weight: float):
    """(path, JSON) of every readable profile lendable to this family and precision, in search order."""
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in sorted(folder.glob("*.json")):
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            model = data.get("model") if isinstance(data, dict) else None
            if isinstance(model, dict) and lendable(model, family, bits_per_weight) \
                    and isinstance(model.get("weights_sha256"), str):
                yield p, data


def user_profile_dir(environ: Mapping[str, str] = os.environ) -> Path:
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "fgdilp-cpp" / "profiles"


@dataclass
class Profile:
    model: dict                       # {"name", "key" (shape), "weights_sha256"}
    method: Optional[str]             # the recommended method (the winner within the budgets)
    methods: dict                     # method -> {"settings": {field: value}, "figures": {...}}
    budgets: dict = field(default_factory=dict)     # {"ppl_ratio": 1.25, "benign_ppl_ratio": 1.05}
    diagnosis: dict = field(default_factory=dict)   # {"self_auc": x, "scorer_auc": x}
    made_by: str = ""                 # the command that wrote it
    created: str = ""
    setup: dict = field(default_factory=dict)       # the fast setup's record (kind "fast-setup"); {} for calibrate
    # not stored: set when find_profile lent this profile of another quantisation of the same
    # weights ({"name", "quantisation", "weights_sha256"} of the file it was measured on)
    transferred_from: Optional[dict] = None

    def settings_for(self, method: str) -> dict[str, Any]:
        """The profile's values for `method` (Settings field names), without "method": its own
        entry, or the one it is calibrated as (methods.calibrated_as: saved vectors run at the
        entry of the method whose directions they freeze)."""
        entry = self.methods.get(method)
        if entry is None and registry.is_method(method, saved_vectors=True):
            entry = self.methods.get(registry.calibrated_as(method))
        entry = entry or {}
        return {k: v for k, v in (entry.get("settings") or {}).items() if k != "method"}

    def matches(self, identity: Mapping[str, Any]) -> bool:
        return (self.model.get("weights_sha256") == identity.get("weights_sha256")
                and self.model.get("key") == identity.get("key"))

    def lendable_to(self, identity: Mapping[str, Any], family: Optional[str]) -> bool:
        """Made for another quantisation of the same weights (same shape and family fingerprint)
        no more precise than the identity's file (bits_per_weight; see lendable)."""
        bits = identity.get("bits_per_weight")
        return bool(family) and isinstance(bits, (int, float)) and lendable(self.model, family, bits) \
            and self.model.get("key") == identity.get("key")

    def transferred(self) -> "Profile":
        """This profile lent to another quantisation of its weights (see transferred_from)."""
        return dataclasses.replace(self, transferred_from={
            "name": str(self.model.get("name") or ""), "quantisation": str(self.model.get("quantisation") or ""),
            "weights_sha256": str(self.model.get("weights_sha256"))})

    def transfer_note(self) -> str:
        """'' for the model's own profile; else where its settings and figures were measured."""
        t = self.transferred_from
        if not t:
            return ""
        what = " ".join(x for x in (t["name"], t["quantisation"]) if x) or "another file"
        return (f"transferred from {what} (weights {t['weights_sha256'][:12]}): another quantisation of "
                "these weights; its settings and figures were measured on that file")

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "model": self.model, "method": self.method,
                "methods": self.methods, "budgets": self.budgets, "diagnosis": self.diagnosis,
                "made_by": self.made_by, "created": self.created, **({"setup": self.setup} if self.setup else {})}

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(p, json.dumps(self.to_json(), indent=1, ensure_ascii=False, allow_nan=False) + "\n")
        return p

    @classmethod
    def from_json(cls, data: Any, where: str = "profile") -> "Profile":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise FgdilpError(f"{where} is not an fgdilp-cpp profile")
        if data.get("version") != VERSION:
            raise FgdilpError(f"{where} has profile version {data.get('version')!r}; this fgdilp-cpp reads "
                              f"version {VERSION}: run calibrate again")
        model, methods = data.get("model"), data.get("methods")
        if not isinstance(model, dict) or not isinstance(model.get("weights_sha256"), str) \
                or not isinstance(methods, dict):
            raise FgdilpError(f"{where} lacks its model fingerprint or its methods")
        methods = _migrated(methods)
        for name, entry in methods.items():
            settings = (entry or {}).get("settings") if isinstance(entry, dict) else None
            if not isinstance(settings, dict) or not set(settings) <= PROFILE_FIELDS:
                extra = sorted(set(settings or {}) - PROFILE_FIELDS) if isinstance(settings, dict) else "?"
                raise FgdilpError(f"{where}: method {name!r} has settings a profile may not set: {extra}")
            # every value within its one range (settings.RANGES), the file named if one is not: applied
            # later, where nobody set the field, a bad value would be blamed on a flag nobody gave
            Settings.checked_values(settings, f"{where}: method {name!r}", toml_key)
        method = registry.canonical(data.get("method"), warn=False)
        if method is not None and method not in methods:
            raise FgdilpError(f"{where}: its method {method!r} has no entry")
        return cls(model, method, methods, data.get("budgets") or {}, data.get("diagnosis") or {},
                   str(data.get("made_by") or ""), str(data.get("created") or ""),
                   data.get("setup") if isinstance(data.get("setup"), dict) else {})

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FgdilpError(f"profile not found: {p}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FgdilpError(f"cannot read profile {p}: {exc}") from None
        return cls.from_json(data, str(p))


class DamagedProfile(FgdilpError):
    """The profile file named for this model cannot be read."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = path


def is_fast(profile: Optional[Profile]) -> bool:
    """The profile was made by the fast setup (not by calibrate)."""
    return profile is not None and profile.setup.get("kind") == FAST_SETUP


def fast_setup_intact(profile: Profile, path: Optional[Path | str]) -> bool:
    """A fast-setup profile applies only with the directions it chose its point for: the file beside
    it, with the sha256 it recorded (a missing or changed file means the profile is made again)."""
    entry = profile.methods.get(registry.UNIVERSAL) or {}
    want = entry.get("universal_sha256")
    if path is None or not isinstance(want, str):
        return False
    vpath = universal_path_for(profile.model["weights_sha256"], Path(path).parent)
    try:
        return hashlib.sha256(vpath.read_bytes()).hexdigest() == want
    except OSError:
        return False


def _migrated(methods: dict) -> dict:
    """A profile's entries under the methods' names now (a user profile written before a rename
    names the former one: read silently as the new one), with universal_source as a directions
    source (files of before `source` existed recorded "universal-data" and the like)."""
    out = {}
    for name, entry in methods.items():
        if isinstance(entry, dict) and isinstance(entry.get("universal_source"), str):
            entry = {**entry, "universal_source": from_legacy(entry["universal_source"])}
        out[registry.canonical(name, warn=False)] = entry
    return out


def model_identity(model, family: bool = True) -> dict[str, Any]:
    """What a profile is keyed by: the shape and the weights fingerprint (a bounded read), and the
    file's bits per weight (a header read); with family, also what its other quantisations share
    (family_sha256, "" when the file cannot tell its fine-tunes apart) and its quantisation's
    name, recorded in the profiles calibrate writes."""
    from .engine.tensors import weights_fingerprint

    i = model.info
    out = {"name": model.meta("general.name") or Path(i.path).name,
           "key": f"{i.architecture}/L{i.n_layer}/H{i.n_head}x{i.head_dim}/E{i.n_embd}/V{i.n_vocab}",
           "weights_sha256": weights_fingerprint(i.path), "bits_per_weight": round(model.bits_per_weight(), 4)}
    if family:
        out.update(family_sha256=model.family_fingerprint() or "", quantisation=model.quantisation())
    return out


def profile_path_for(identity: Mapping[str, Any], folder: Optional[Path] = None) -> Path:
    return (folder or user_profile_dir()) / f"{identity['weights_sha256'][:24]}.json"


def find_profile(identity: Mapping[str, Any], folders: Optional[list[Path]] = None,
                 family: Family = None) -> tuple[Optional[Profile], Optional[Path]]:
    """The profile for this model: the user's first, then the shipped ones; else one of another
    quantisation of the same weights at most as precise (family: identity's family_sha256 by
    default; identity's bits_per_weight), returned
    transferred (Profile.transferred_from); (None, None) if none. The model's own profile always
    wins. A file that names another model is skipped; a damaged file for this model is an error."""
    chosen = folders if folders is not None else search_path()
    found, where = _find_exact(identity, chosen)
    if found is not None:
        return found, where
    fam = family() if callable(family) else (family or identity.get("family_sha256"))
    if not fam:
        return None, None
    bits = identity.get("bits_per_weight")
    if not isinstance(bits, (int, float)):
        return None, None
    for p, data in _family_profiles(chosen, fam, bits):
        prof = Profile.from_json(data, str(p))      # a damaged profile of this family is an error
        if prof.lendable_to(identity, fam):
            return prof.transferred(), p
    return None, None


def _find_exact(identity: Mapping[str, Any], folders: list[Path]) -> tuple[Optional[Profile], Optional[Path]]:
    for folder in folders:
        if not folder.is_dir():
            continue
        named = profile_path_for(identity, folder)
        candidates = [named] + sorted(p for p in folder.glob("*.json") if p != named)
        for p in candidates:
            if not p.is_file():
                continue
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                if p == named:
                    raise DamagedProfile(f"cannot read profile {p}: {exc} (remove it or run calibrate again)", p) from None
                continue
            if not isinstance(data, dict) or (data.get("model") or {}).get("weights_sha256") != identity["weights_sha256"]:
                continue
            prof = Profile.from_json(data, str(p))
            if prof.matches(identity):
                return prof, p
    return None, None
