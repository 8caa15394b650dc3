"""One Settings dataclass: CLI flags, TOML config keys and FGDILP_* variables map onto its fields by name.

A TOML key is the long flag name without its dashes ("steer-scale = 0.5", "renorm = false",
"steer-layer-range = [12, 17]"); precedence: flag > environment > config file > default.
Every numeric field has one range (RANGES), checked whatever the value's source: a flag, a
variable, a config file, a profile, an API keyword.
Imports only the value types (params.py): loading settings loads no llama.cpp.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from .errors import FgdilpError, ParamError
from .params import (CONTRASTS, DIAGNOSERS, EDIT_RULES, FUSED_NORM_TO_MEAN_DELTA, FUSION_MODES, MAX_CTX_SIZE,
                     MAX_NEGATIVES, MAX_REPEAT_LAST_N, MAX_REPEAT_PENALTY, MAX_SEQUENCES, MAX_THREADS_PER_CORE,
                     EngineParams, FgdilpParams, SamplingParams, SteerParams, max_threads)
from .rpc_endpoints import parse_rpc_servers

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
    # 4 candidates of 8 tokens: on SmolLM2 as detoxifying as more and longer ones, at a shorter
    # setup (docs/results/chat-latency.md, "How many candidates chat needs")
    "selfgen_samples": 4,
    "selfgen_tokens": 8,
    "selfgen_min_tokens": 4,
    # FGDILP's instance kept while the conversation goes on, rebuilt when a turn escalates
    # (docs/method.md §9.2): a fraction of the per-reply setup's time to first token
    # (docs/results/chat-latency.md)
    "instance_reuse": "conversation",
}


@dataclass
class Settings:
    # model and engine
    model: Optional[str] = None
    ctx_size: int = 2048
    ctx_size_override: bool = False          # allow ctx_size past the model's trained context
    threads: int = 0
    n_gpu_layers: int = 0
    batch_size: int = 512
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: str = "auto"
    profile: bool = True                     # apply the model's calibrated profile (--no-profile: off)
    auto_setup: bool = True                  # no profile: make one with the fast setup first (autosetup)
    rpc: Optional[str] = None                # llama.cpp RPC servers "HOST:PORT,..." holding the layers (docs/rpc.md)
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
    # llama.cpp's penalties over the last repeat_last_n reply tokens, and a GBNF grammar (defaults: off)
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_last_n: int = 64
    grammar: Optional[str] = None
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
                              seed=self.seed, repeat_penalty=self.repeat_penalty,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              repeat_last_n=self.repeat_last_n, grammar=self.grammar).validate()

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---- sources ----------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def updated(self, values: dict[str, Any]) -> "Settings":
        """A copy with `values` (field names) applied, type-checked and checked against RANGES."""
        out = dataclasses.replace(self)
        types = {f.name: f.type for f in fields(self)}
        for name, v in values.items():
            if name not in types:
                raise FgdilpError(f"unknown setting {name!r}")
            setattr(out, name, checked(name, types[name], v))
        return out

    @classmethod
    def checked_values(cls, values: Mapping[str, Any], where: str, spell: Callable[[str], str]) -> dict[str, Any]:
        """`values` (field names) type- and range-checked, for a source that is not a flag: an error
        names `where` they came from (if not "") and the setting as spelled there (spell(field))."""
        types = {f.name: f.type for f in fields(cls)}
        out = {}
        for name, v in values.items():
            try:
                if name not in types:
                    raise FgdilpError(f"unknown setting {spell(name)!r}")
                out[name] = checked(name, types[name], v)
            except ParamError as exc:
                message = f"{spell(name)} {exc.reason}"
                raise SourcedParamError(name, exc.reason, f"{where}: {message}" if where else message) from None
            except FgdilpError as exc:
                raise FgdilpError(f"{where}: {exc}" if where else str(exc)) from None
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
        return cls.checked_values({k.replace("-", "_"): v for k, v in data.items()}, f"config file {p}", toml_key)

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
        return cls.checked_values(out, "", env_name)


class SourcedParamError(ParamError):
    """A ParamError whose message names where the value came from (a config file, a variable, a
    profile): printed as it is, not as the setting's flag."""

    def __init__(self, field: str, reason: str, message: str):
        super().__init__(field, reason)
        self.args = (message,)


def toml_key(name: str) -> str:
    """A field's key in a config file or a profile's settings: the long flag without dashes."""
    return name.replace("_", "-")


def env_name(name: str) -> str:
    return "FGDILP_" + name.upper()


# ---- the one range of every numeric setting ---------------------------------------------------
@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take, whatever its source (flag, FGDILP_* variable, config
    file, profile, API keyword, sweep): lo..hi (None: unbounded; open ends excluded), always finite.
    Model-dependent limits (ctx_size within the trained context, the layer range) are checked
    when the model is loaded."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""               # where the limit comes from, said when a value is refused
    shown: str = ""             # the range in help text, where its numbers depend on the machine

    def text(self) -> str:
        """The range as a user reads it: "in 0..8", "in (0, 1]", ">= 0"."""
        if self.lo is not None and self.hi is not None:
            if isinstance(self.lo, int) and isinstance(self.hi, int) and not (self.lo_open or self.hi_open):
                return f"in {self.lo}..{self.hi}"
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return "a finite number"

    def check(self, name: str, v: float) -> None:
        if not math.isfinite(v):
            raise ParamError(name, f"must be a finite number, not {v!r}")
        low = self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo)
        high = self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi)
        if low or high:
            why = f" ({self.why})" if self.why else ""
            raise ParamError(name, f"must be {self.text()}{why}, not {v!r}")


INT32_MAX = 2**31 - 1          # llama.cpp's int32 parameters: a larger value would wrap in ctypes
# every int / float field of Settings (a test holds it to that); int fields have int bounds, float
# fields float bounds (the text says 0..16 or [0, 1])
RANGES: dict[str, Range] = {
    "ctx_size": Range(16, MAX_CTX_SIZE),
    "threads": Range(0, max_threads(), why=f"0 = every core; at most {MAX_THREADS_PER_CORE} per CPU core",
                     shown=f"0..{MAX_THREADS_PER_CORE} per CPU core"),
    "n_gpu_layers": Range(-1, INT32_MAX, why="-1 = every layer"),
    "batch_size": Range(8, MAX_CTX_SIZE),
    "kv_conversations": Range(1, 16),
    "kv_budget_mib": Range(0, INT32_MAX, why="0 = half of this machine's memory less the model's weights"),
    "n_predict": Range(1, MAX_CTX_SIZE),
    "seed": Range(0, 2**32 - 1),
    "temp": Range(0.0),
    "top_k": Range(0, INT32_MAX, why="0 = off"),
    "top_p": Range(0.0, 1.0, lo_open=True),
    "min_p": Range(0.0, 1.0, hi_open=True),
    # llama.cpp's penalties sampler (params.SamplingParams): OpenAI's range for presence / frequency
    "repeat_penalty": Range(0.0, MAX_REPEAT_PENALTY, lo_open=True),
    "presence_penalty": Range(-2.0, 2.0),
    "frequency_penalty": Range(-2.0, 2.0),
    "repeat_last_n": Range(0, MAX_REPEAT_LAST_N),
    "steer_scale": Range(),
    "exp_norm": Range(),
    "exp_sim": Range(),
    "gate": Range(-1.0, 1.0, hi_open=True, why="a cosine"),
    "condition": Range(0.0, 1.0, why="a toxicity"),
    "selfgen_samples": Range(1, MAX_SEQUENCES, why="llama.cpp's sequences per context"),
    "selfgen_tokens": Range(1, MAX_CTX_SIZE),
    "selfgen_min_tokens": Range(1, MAX_CTX_SIZE),
    "negatives": Range(1, MAX_NEGATIVES),
    "mask_k": Range(0.0, 100.0, lo_open=True, why="a percentage"),
}


def checked(name: str, typ: str, v: Any) -> Any:
    """`v` as the type of field `name`, within its range (RANGES); else ParamError."""
    out = _coerce(name, typ, v)
    if name in RANGES and out is not None:
        RANGES[name].check(name, out)
    if name == "rpc" and out is not None:          # "" = local; a malformed list is refused before any model loads
        out = ",".join(parse_rpc_servers(out)) if out.strip() else None
    return out


def fit_ctx_size(settings: "Settings", n_ctx_train: int, source: str) -> "Settings":
    """ctx_size within the model's trained context (n_ctx_train, 0 = unknown): a default above it
    (ours, not the user's) comes down to it; a value someone set is refused unless
    ctx_size_override allows running past what the model was trained on."""
    if n_ctx_train <= 0 or settings.ctx_size <= n_ctx_train:
        return settings
    if source in ("default", "chat default"):
        return settings.updated({"ctx_size": n_ctx_train})
    if settings.ctx_size_override:
        return settings
    raise ParamError("ctx_size", f"must be at most the model's trained context ({n_ctx_train} tokens), not "
                                 f"{settings.ctx_size} (--ctx-size-override runs past it)")


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
