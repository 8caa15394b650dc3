"""The methods, as one registry: each entry says what a method runs, and names the function that
builds its per-prompt plan. Everything that offers or checks a method name (CLI choices, the server,
the chat REPL's /method, eval, bench) reads this table; adding a method is one `register()` call
plus its plan function. A renamed method keeps its former name as an alias (alias(), canonical()):
read wherever a method is named, run and reported under the name now, with one notice per process.
With a vectors file loaded, a method that applies it runs, and is reported, as `vectors` (run_name()).

This module is import-light (no llama.cpp, no native library): plan builders and prefix-room
functions may be given as "module:function" strings inside the package, resolved on first use.

A plan function is `plan(rt: runtime.Runtime, req: plans.PlanRequest) -> plans.Plan` (the call's
values in req.values); a prefix-room function is `room(rt: runtime.Runtime, fgdilp: FgdilpParams)
-> int` (tokens its prefixes add in front of a prompt, an upper bound: chat trimming keeps that
much room).
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

from .errors import FgdilpError
from .params import FgdilpParams

Ref = Union[Callable, str]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str                      # one line, for help texts
    plan: Ref                         # builds the per-prompt Plan
    hook: bool = False                # its context carries the native kqv_out hook
    heads: bool = False               # needs attention heads (a kqv_out to steer), with or without a hook
    roles: Union[int, Callable[[FgdilpParams], int]] = 1   # sequences of one sample (captures included)
    exact: bool = False               # every sample runs all its roles (else: roles once, then P0 per sample)
    prefix_room: Ref = 0              # tokens its prefixes add (an int, or a room function)
    instance: bool = False            # builds FGDILP's per-prompt setup (self-generation, diagnosis)
    fusion: bool = False              # the hook fuses the negatives in C++ (mask-k, sign election, merge)
    saved_vectors: bool = False       # applies a loaded HeadDirections file (needs one)
    with_vectors: Optional[str] = None   # the method run instead while a vectors file is loaded
    universal: bool = False           # applies the model's universal directions (profiles.find_universal)
    listed: bool = True               # offered to users by name (CLI, server, REPL)
    control: bool = False             # a control of the evaluation (measured, never recommended)
    chat: bool = True                 # keeps a conversation's KV between turns (False: every turn decodes
                                      # it all again; never recommended by a chat calibration)

    def n_roles(self, fgdilp: FgdilpParams) -> int:
        return self.roles(fgdilp) if callable(self.roles) else int(self.roles)

    def plan_builder(self) -> Callable:
        return _resolve(self.plan)

    def room(self, rt, fgdilp: FgdilpParams) -> int:
        return self.prefix_room if isinstance(self.prefix_room, int) else _resolve(self.prefix_room)(rt, fgdilp)


_REGISTRY: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}         # a former name -> the method's name now
_WARNED: set[str] = set()             # the former names a notice was given for (once each)
UNSTEERED = "none"                    # the baseline entry: ratios and deltas are taken against it
UNIVERSAL = "universal"               # the model's installed directions (the default of the shipped profiles)
SAVED_VECTORS = "vectors"             # a run with a vectors file (--vectors FILE) is this method
FROZEN = "fgdilp-frozen"              # FGDILP's direction captured once: its context captures saved directions


class RenamedWarning(FutureWarning):
    """Something was asked for by a former name (a method, a setting's value): it still works."""


class MethodRenamedWarning(RenamedWarning):
    """A method was asked for by a former name: it still runs, under its name now."""


def register(method: Method, replace: bool = False) -> Method:
    """Add a method to the table (replace=True overrides an entry of the same name)."""
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"method {method.name!r} is registered already")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def alias(former: str, name: str) -> None:
    """Accept `former` wherever a method name is read, as `name` (canonical() says so once)."""
    if name not in _REGISTRY or former in _REGISTRY:
        raise ValueError(f"cannot alias {former!r} to {name!r}")
    _ALIASES[former] = name


def canonical(name: str, warn: bool = True) -> str:
    """The method's name now for `name`, a former name included (with warn: a MethodRenamedWarning
    once per former name and process, so that scripts and user profiles keep working while the
    user learns the new name); any other value is returned as it is (get() judges it)."""
    if not isinstance(name, str) or name not in _ALIASES:
        return name
    new = _ALIASES[name]
    if warn and name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(f"method {name!r} is now called {new!r}; the old name still works for now",
                      MethodRenamedWarning, stacklevel=2)
    return new


def get(name: str) -> Method:
    """The entry of `name` (a former name included: canonical()); FgdilpError naming the choices for
    an unknown one."""
    try:
        return _REGISTRY[canonical(name)]
    except (KeyError, TypeError):
        raise FgdilpError(f"unknown method {name!r} (one of {', '.join(names())})") from None


def names() -> tuple[str, ...]:
    """The methods a user may ask for by name, in table order."""
    return tuple(m.name for m in _REGISTRY.values() if m.listed)


def runnable_names(has_universal: bool) -> tuple[str, ...]:
    """The listed methods a model can run: those needing universal directions only where it has them."""
    return tuple(n for n in names() if has_universal or not _REGISTRY[n].universal)


def saved_vectors() -> Method:
    """The method that applies a loaded vectors file."""
    return next(m for m in _REGISTRY.values() if m.saved_vectors)


def run_name(name: str, has_vectors: bool) -> str:
    """The method a run of `name` is, and is reported as: with a vectors file loaded, a method that
    has a saved-vectors form (with_vectors) runs that form; a former name gives the name now."""
    spec = get(name)
    return spec.with_vectors if has_vectors and spec.with_vectors else spec.name


def calibrated_as(name: str) -> str:
    """The profile entry whose values a run of `name` takes: its own; for the saved-vectors method,
    the listed method it stands in for (a vectors file holds that method's frozen directions)."""
    spec = get(name)
    if spec.saved_vectors:
        return next((m.name for m in _REGISTRY.values() if m.listed and m.with_vectors == spec.name), spec.name)
    return spec.name


def is_method(name: object, saved_vectors: bool = False) -> bool:
    """Whether a user may ask for `name` (a former name included); saved_vectors: a vectors file is
    loaded, so the saved-vectors method may be named too."""
    spec = _REGISTRY.get(canonical(name, warn=False)) if isinstance(name, str) else None
    return spec is not None and (spec.listed or (saved_vectors and spec.saved_vectors))


def _resolve(ref: Ref) -> Callable:
    if callable(ref):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), attr)


# ---- the built-in methods (docs/method.md) ----------------------------------------------------
register(Method("none", "unsteered", plan="plans:plan_none"))
register(Method("prompt", "the TR authors' prompting baseline: the polite prefix before the prompt",
                plan="plans:plan_prompt", prefix_room="plans:tr_prefix_room"))
register(Method("tr", "Toxification Reversal, exact: P+, P- and P0 decode together; the hook edits P0",
                plan="plans:plan_tr", hook=True, heads=True, roles=3, exact=True,
                prefix_room="plans:tr_prefix_room"))
register(Method("fgdilp", "FGDILP, exact: instance prefixes from self-generation and diagnosis, fused in the hook",
                plan="plans:plan_fgdilp", hook=True, heads=True, roles=lambda f: f.negatives + 2, exact=True,
                prefix_room="plans:instance_prefix_room", instance=True, fusion=True))
register(Method(FROZEN, "FGDILP, frozen: the fused direction captured once at the prompt's end",
                plan="plans:plan_fgdilp_frozen", hook=True, heads=True, roles=lambda f: f.negatives + 1,
                prefix_room="plans:instance_prefix_room", instance=True, with_vectors=SAVED_VECTORS))
# its control vector changes with every prompt and shifts every KV cell: in chat each turn decodes
# the whole conversation again (its time to first token: docs/results/chat-latency.md)
register(Method("cvec", "baseline: llama.cpp's residual control vector W_O*delta of TR's prefixes",
                plan="plans:plan_cvec", heads=True, prefix_room="plans:tr_prefix_room", chat=False))
register(Method("random", "control: the TR edit with random directions of the same per-head norms",
                plan="plans:plan_random", hook=True, heads=True, prefix_room="plans:tr_prefix_room",
                control=True))
# the model's installed universal directions (vectors build --prompts SET --install: FGDILP's instances,
# TR's prefixes or labelled text, averaged), found by its fingerprint beside its profile
# (profiles.find_universal)
register(Method(UNIVERSAL, "the model's installed directions, averaged over many prompts "
                "(FGDILP instances, TR prefixes) or labelled texts; no per-prompt setup", plan="plans:plan_universal",
                hook=True, heads=True, universal=True))
alias("fgdilp-universal", UNIVERSAL)     # its name from when FGDILP's directions were the only kind
register(Method(SAVED_VECTORS, "saved head directions (HeadDirections), applied as a fixed direction",
                plan="plans:plan_vectors", hook=True, heads=True, saved_vectors=True, with_vectors=SAVED_VECTORS,
                listed=False))
