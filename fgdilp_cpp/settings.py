"""One Settings dataclass: CLI flags, TOML config keys and FGDILP_* variables map onto its fields by name.

A TOML key is the long flag name without its dashes ("steer-scale = 0.5", "renorm = false",
"steer-layer-range = [12, 17]"); precedence: flag > environment > config file > default.
Imports only the value types (params.py): loading settings loads no llama.cpp.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from .errors import FgdilpError, ParamError
from .params import (CONTRASTS, DIAGNOSERS, EDIT_RULES, FUSED_NORM_TO_MEAN_DELTA, FUSION_MODES, EngineParams,
                     FgdilpParams, SamplingParams, SteerParams)

# settings with a fixed set of values: refused when set (a flag, a config file, a sweep), not
# only when a generation first uses them
CHOICES = {"edit": EDIT_RULES, "contrast": CONTRASTS, "fusion": FUSION_MODES,
           "fused_norm": tuple(FUSED_NORM_TO_MEAN_DELTA), "diagnoser": DIAGNOSERS}

OFF_WORDS = ("off", "none", "")   # an Optional[float] setting given as text: off (FGDILP_GATE=off, gate = "off")


# the interactive defaults of `chat` (and `serve`): setup sized for a reply that starts quickly;
# marked * by the chat's /settings; a model's profile wins over them
CHAT_DEFAULTS = {
    "method": "fgdilp",
    "n_predict": 256,
    "ctx_size": 4096,
    # 4 candidates of 8 tokens: on SmolLM2 as detoxifying as 6 x 12 and 25 x 20 within the
    # intervals of 100 x 5 test prompts, x5.6 per-reply setup against x8.6 (docs/results.md)
    "selfgen_samples": 4,
    "selfgen_tokens": 8,
    "selfgen_min_tokens": 4,
    # FGDILP's instance kept while the conversation goes on, rebuilt when a turn escalates
    # (docs/method.md §9.2): x1.4 the unsteered time to first token against x4.8 per reply (docs/results.md)
    "instance_reuse": "conversation",
}


@dataclass
class Settings:
    # model and engine
    model: Optional[str] = None
    ctx_size: int = 2048
    threads: int = 0
    n_gpu_layers: int = 0
    batch_size: int = 512
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: str = "auto"
    profile: bool = True                     # apply the model's calibrated profile (--no-profile: off)
    # chat and serve
    chat_template: Optional[str] = None      # a llama.cpp built-in name or template text; None = the GGUF's
    system_prompt: Optional[str] = None
    history: bool = True                     # chat: autosave each session (off: --no-history, FGDILP_HISTORY=0)
    kv_reuse: bool = True                    # keep the conversation's KV between replies (--no-kv-reuse: re-prefill)
    kv_conversations: int = 1                # conversations kept in KV per method (serve: several users)
    kv_budget_mib: int = 0                   # KV of all contexts together, MiB (0: half the memory less the weights)
    instance_reuse: str = "turn"             # FGDILP's instance: rebuilt every "turn", or once per "conversation"
    # generation
    method: str = "tr"
    n_predict: int = 64
    seed: int = 42
    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    # steering (TR and FGDILP)
    steer_scale: float = 1.0
    steer_layer_range: Optional[tuple[int, int]] = None
    exp_norm: float = 0.4
    exp_sim: float = 0.6
    renorm: bool = True
    edit: str = "tr"                         # tr | rotate (docs/method.md §2.6)
    gate: Optional[float] = None             # cos(v_h, delta_h) above which a head is edited; None = off (§2.7)
    contrast: str = "full"                   # full | reply: what P+ / P-_j hold after their prefix (§2.9)
    condition: Optional[float] = None        # steer only prompts the scorer reads this toxic; None = off (§2.10)
    # FGDILP (docs/method.md §10 defaults)
    selfgen_samples: int = 25
    selfgen_tokens: int = 20
    selfgen_min_tokens: int = 5
    negatives: int = 6
    mask_k: float = 50.0
    fusion: str = "max"
    sign_election: bool = True
    pad_blank: bool = True
    fused_norm: str = "none"                 # none | tr (docs/method.md §5.6)
    diagnoser: str = "self"                  # self | scorer | auto (docs/method.md §4.2a)

    # ---- views for the engine and the method ------------------------------------------------
    def engine(self, **over) -> EngineParams:
        return EngineParams(ctx_size=self.ctx_size, n_batch=self.batch_size, n_threads=self.threads,
                            type_k=self.cache_type_k, type_v=self.cache_type_v, flash_attn=self.flash_attn,
                            kv_reuse=self.kv_reuse, kv_conversations=self.kv_conversations, **over)

    def steer(self) -> SteerParams:
        start, end = self.steer_layer_range or (0, -1)
        return SteerParams(exp_norm=self.exp_norm, exp_sim=self.exp_sim, scale=self.steer_scale,
                           layer_start=start, layer_end=end, renorm=self.renorm, edit=self.edit, gate=self.gate,
                           contrast=self.contrast, condition=self.condition)

    def fgdilp(self) -> FgdilpParams:
        p = FgdilpParams(samples=self.selfgen_samples, selfgen_tokens=self.selfgen_tokens,
                         selfgen_min_tokens=self.selfgen_min_tokens, negatives=self.negatives,
                         mask_k=self.mask_k, fusion=self.fusion, sign_election=self.sign_election,
                         pad_blank=self.pad_blank, fused_norm=self.fused_norm, diagnoser=self.diagnoser)
        p.check()
        return p

    def sampling(self) -> SamplingParams:
        return SamplingParams(temp=self.temp, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              seed=self.seed).validate()

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---- sources ----------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def updated(self, values: dict[str, Any]) -> "Settings":
        """A copy with `values` (field names) applied and type-checked."""
        out = dataclasses.replace(self)
        types = {f.name: f.type for f in fields(self)}
        for name, v in values.items():
            if name not in types:
                raise FgdilpError(f"unknown setting {name!r}")
            setattr(out, name, _coerce(name, types[name], v))
        return out

    @classmethod
    def toml_values(cls, path: str | Path) -> dict[str, Any]:
        """The field values a TOML settings file sets (keys are long flag names: steer-scale)."""
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FgdilpError(f"config file not found: {p}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise FgdilpError(f"cannot read config file {p}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise FgdilpError(f"config file {p} is not valid TOML: {exc}") from None
        known = cls.field_names()
        for k in data:
            if k.replace("-", "_") not in known:
                raise FgdilpError(f"config file {p}: unknown setting {k!r}")
        return {k.replace("-", "_"): v for k, v in data.items()}

    @classmethod
    def from_toml(cls, path: str | Path, base: Optional["Settings"] = None) -> "Settings":
        return (base or cls()).updated(cls.toml_values(path))

    @classmethod
    def from_env(cls, environ) -> dict[str, Any]:
        """FGDILP_<FLAG> variables (FGDILP_STEER_SCALE=0.5, FGDILP_RENORM=false,
        FGDILP_STEER_LAYER_RANGE="12 17"), as field values; FGDILP_MODEL names the model."""
        types = {f.name: f.type for f in fields(cls)}
        out: dict[str, Any] = {}
        for name, typ in types.items():
            raw = environ.get("FGDILP_" + name.upper())
            if raw is None:
                continue
            flag = "FGDILP_" + name.upper()
            try:
                if typ == "int":
                    out[name] = int(raw)
                elif typ == "float":
                    out[name] = float(raw)
                elif typ == "bool":
                    if raw.strip().lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError(raw)
                    out[name] = raw.strip().lower() in ("1", "true", "yes", "on")
                elif typ == "Optional[float]":
                    out[name] = None if raw.strip().lower() in OFF_WORDS else float(raw)
                elif typ == "Optional[tuple[int, int]]":
                    a, b = raw.replace(",", " ").split()
                    out[name] = (int(a), int(b))
                else:
                    out[name] = raw
            except ValueError:
                raise FgdilpError(f"{flag}={raw!r} is not a valid {name}") from None
        return out


def _coerce(name: str, typ: str, v: Any) -> Any:
    if typ in ("int", "float") and isinstance(v, bool):
        raise ParamError(name, f"must be a number, not {v!r}")
    if typ == "int" and isinstance(v, int):
        return v
    if typ == "float" and isinstance(v, (int, float)):
        return float(v)
    if typ == "bool" and isinstance(v, bool):
        return v
    if typ == "str" and isinstance(v, str):
        if name in CHOICES and v not in CHOICES[name]:
            raise ParamError(name, f"must be one of {', '.join(CHOICES[name])}, not {v!r}")
        return v
    if typ == "Optional[str]" and (v is None or isinstance(v, str)):
        return v
    if typ == "Optional[float]":
        if v is None or (isinstance(v, str) and v.strip().lower() in OFF_WORDS):
            return None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        raise ParamError(name, f"must be a number or \"off\", not {v!r}")
    if typ == "Optional[tuple[int, int]]":
        if v is None:
            return None
        if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) for x in v):
            return (int(v[0]), int(v[1]))
        raise ParamError(name, f"must be two layer numbers [START, END], not {v!r}")
    raise ParamError(name, f"has the wrong type: {v!r}")


def default_sources(settings: "Settings", chat: bool = False) -> dict[str, str]:
    """Where each value of `settings` came from when nobody said: "api" where it differs from the
    built-in default (or the chat default), else "default" / "chat default"."""
    from_chat = CHAT_DEFAULTS if chat else {}
    base = Settings().updated(from_chat)
    out = {}
    for name in Settings.field_names():
        if getattr(settings, name) != getattr(base, name):
            out[name] = "api"
        else:
            out[name] = "chat default" if name in from_chat else "default"
    return out
