"""What one setting is, beside its value: the `Spec` that each field of settings.Settings carries
in its one declaration (settings.setting), and the value checks every source shares.

In the spirit of llama.cpp's common/arg.h: a setting is declared once, with its flag, its
FGDILP_* variable, its choices and range, its JSON name, the commands whose defaults differ and
what it may do (change per call, be set by a profile, be swept, and for which methods). The
click options, the server's request fields, the sweep table, the profile fields, PER_CALL and
the chat's /settings are all read from it.
Imports only the value types and the method registry (both light): no click, no llama.cpp.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from .errors import ParamError
from .methods import Method, RenamedWarning

OFF_WORDS = ("off", "none", "")   # an Optional[float] setting given as text: off (FGDILP_GATE=off, gate = "off")
INT32_MAX = 2**31 - 1             # llama.cpp's int32 parameters: a larger value would wrap in ctypes


# ---- which methods a setting changes (a registry entry -> bool): the sweep runs a method only at
# the values of the settings that change it
def STEERING(m: Method) -> bool:      # noqa: N802 - read as a constant: TR edit, cvec, random, fgdilp
    return m.heads


def INSTANCE(m: Method) -> bool:      # noqa: N802 - FGDILP's fusion of its prefixes
    return m.instance


def HOOKED(m: Method) -> bool:        # noqa: N802 - the hook's edit (not cvec)
    return m.hook


def PREFIXED(m: Method) -> bool:      # noqa: N802 - P+ / P-_j sequences of their own
    room: object = m.prefix_room          # an int, or a room function (0: no prefixes)
    return m.heads and room != 0


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

    @property
    def bounded(self) -> bool:
        return self.lo is not None or self.hi is not None

    def check(self, name: str, v: float) -> None:
        if not math.isfinite(v):
            raise ParamError(name, f"must be a finite number, not {v!r}")
        low = self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo)
        high = self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi)
        if low or high:
            why = f" ({self.why})" if self.why else ""
            raise ParamError(name, f"must be {self.text()}{why}, not {v!r}")


@dataclass(frozen=True)
class Spec:
    """Everything about one setting but its value and type (the dataclass field holds those)."""

    help: str = ""
    # command line: the long flag is --<name-with-dashes> (--x/--no-x for a bool); `short` adds
    # others (-c); group = the option group that carries it ("" = no flag: config, env, API only)
    group: str = ""
    short: tuple[str, ...] = ()
    metavar: Optional[str] = None
    show_default: bool = True
    flag_min: Optional[int] = None        # the flag refuses smaller values itself (click's usage error)
    choices: tuple[str, ...] = ()         # refused otherwise, from every source
    former: Mapping[str, str] = field(default_factory=dict)   # a former name of a choice -> its name now
    method_choice: bool = False           # a method name of the registry
    range: Optional[Range] = None         # every int / float field has one (settings.RANGES)
    # what it may do
    per_call: bool = False                # may change per call (Detoxifier.generate(**kw), a request)
    shapes_contexts: bool = False         # sizes the contexts: another Detoxifier to change it
    profile: bool = False                 # a model's profile may set it
    sweep: Optional[Callable[[Method], bool]] = None   # `eval --sweep` may sweep it; the methods it changes
    # the OpenAI server: the request field ("" = none), other spellings of it, a narrower range for
    # a request; api_custom: openai_api reads it by hand (policy caps, aliases, grammars)
    api: str = ""
    api_aliases: tuple[str, ...] = ()
    api_range: Optional[Range] = None
    api_custom: bool = False
    # per-command defaults ("chat" also holds for serve, bench --chat and the API's chat=True;
    # "serve" adds to chat's), and the default as help shows it where it is decided at run time
    defaults: Mapping[str, Any] = field(default_factory=dict)
    shown: Mapping[str, str] = field(default_factory=dict)


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


class ValueRenamedWarning(RenamedWarning):
    """A setting's value was given by a former name: it still works, under its name now."""


_WARNED: set[tuple[str, str]] = set()


def renamed(name: str, v: str, former: Mapping[str, str]) -> str:
    """A former name of one of setting `name`'s choices as its name now (a ValueRenamedWarning once
    per setting, value and process); any other value as it is."""
    if v not in former:
        return v
    if (name, v) not in _WARNED:
        _WARNED.add((name, v))
        warnings.warn(f"{name.replace('_', '-')} {v!r} is now called {former[v]!r}; the old name still works "
                      "for now", ValueRenamedWarning, stacklevel=3)
    return former[v]


def coerce(name: str, typ: str, v: Any, choices: tuple[str, ...] = (), former: Mapping[str, str] = {}) -> Any:
    """`v` as a value of type `typ` (the field's annotation, as text), else ParamError; a former name
    of a choice is read as its name now (renamed)."""
    if typ in ("int", "float") and isinstance(v, bool):
        raise ParamError(name, f"must be a number, not {v!r}")
    if typ == "int" and isinstance(v, int):
        return v
    if typ == "float" and isinstance(v, (int, float)):
        return float(v)
    if typ == "bool" and isinstance(v, bool):
        return v
    if typ == "str" and isinstance(v, str):
        v = renamed(name, v, former)
        if choices and v not in choices:
            raise ParamError(name, f"must be one of {', '.join(choices)}, not {v!r}")
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


def from_text(typ: str, raw: str) -> Any:
    """A FGDILP_* variable's text as a value of type `typ` (ValueError if it is not one):
    booleans 1/0/true/false/yes/no/on/off, "off" for an Optional[float], "START END" for a range."""
    if typ == "int":
        return int(raw)
    if typ == "float":
        return float(raw)
    if typ == "bool":
        if raw.strip().lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(raw)
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if typ == "Optional[float]":
        return None if raw.strip().lower() in OFF_WORDS else float(raw)
    if typ == "Optional[tuple[int, int]]":
        a, b = raw.replace(",", " ").split()
        return (int(a), int(b))
    return raw
