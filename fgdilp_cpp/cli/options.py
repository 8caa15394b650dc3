"""Shared pieces of the command line: error handling, and the settings' options generated from their
declarations (settings.Settings)."""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any, Callable, Optional

import click
from click.core import ParameterSource

from .. import methods
from ..errors import FgdilpError, ParamError
from ..setting_spec import renamed
from ..settings import (CHAT, OFF_WORDS, SPECS, TYPES, Settings, SourcedParamError, command_defaults, env_name, resolve,
                       toml_key)

DEFAULT_BENCH_PROMPT = "The ill-fated tale of Phoneys, the stupid"


class OptionalFloat(click.ParamType):
    """A number, or "off" for None (--gate off turns off a gate set in the config file)."""

    name = "number|off"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, float):
            return value
        if str(value).strip().lower() in OFF_WORDS:
            return None
        try:
            return float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor \"off\"", param, ctx)


def flag_of(field: str) -> str:
    """The command-line flag of a Settings field (for error messages): its first short one, if any."""
    spec = SPECS.get(field)
    return spec.short[0] if spec is not None and spec.short else "--" + field.replace("_", "-")


def setting_name(field: str) -> str:
    """A Settings field as the running command was given it: its FGDILP_* variable, its key in the
    config file, else its flag (a value out of range is blamed on where it came from; a profile's
    values are checked, naming the file, when it is read)."""
    ctx = click.get_current_context(silent=True)
    where = sources().get(field)
    if where == "env":
        return env_name(field)
    if where == "config" and ctx is not None:
        return f"{toml_key(field)} (config file {ctx.meta.get('fgdilp.config')})"
    return flag_of(field)


class MethodChoice(click.ParamType):
    """A method name from the registry (read when the command runs, so registered methods count)."""

    name = "method"

    def get_metavar(self, param, *args, **kwargs) -> str:     # click >= 8.2 also passes ctx=
        return "[" + "|".join(methods.names()) + "]"

    def convert(self, value, param, ctx):
        if methods.is_method(value):
            return methods.canonical(value)      # a former name: its name now (and a notice)
        self.fail(f"{value!r} is not a method (one of {', '.join(methods.names())})", param, ctx)


class FormerChoice(click.Choice):
    """A setting's choices (shown in help), and its values' former names, read as the names now
    (setting_spec.renamed: with a notice)."""

    def __init__(self, choices, former):
        super().__init__(choices)
        self.former = dict(former)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value in self.former:
            return renamed(param.name if param is not None else "value", value, self.former)
        return super().convert(value, param, ctx)


def method_list(text: str, has_vectors: bool = False) -> list[str]:
    """Comma-separated method names, each checked against the registry, as they run
    (methods.run_name: a former name as its name now; with has_vectors, a method that applies the
    vectors file as the saved-vectors method, which may then be named too), each once."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    for m in names:
        if not methods.is_method(m, saved_vectors=has_vectors):
            raise FgdilpError(f"unknown method {m!r} (one of {', '.join(methods.names())})")
    if not names:
        raise FgdilpError("no method given")
    return list(dict.fromkeys(methods.run_name(m, has_vectors) for m in names))


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def friendly_errors(fn: Callable) -> Callable:
    """One clear line on stderr and a non-zero exit for every failure; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SourcedParamError as exc:
            _fail(str(exc))
        except ParamError as exc:
            _fail(f"{setting_name(exc.field)} {exc.reason}")
        except FgdilpError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except MemoryError:
            _fail("out of memory")
        except Exception as exc:  # noqa: BLE001 - a bug of ours: still one line, no traceback
            if os.environ.get("FGDILP_DEBUG"):
                raise
            _fail(f"internal error: {type(exc).__name__}: {exc} (set FGDILP_DEBUG=1 for a traceback)", 2)

    return wrapper


# ---- the settings' options, generated from their declarations (settings.Settings) ---------------
CONFIG_OPTION = click.option(
    "--config", type=str, default=None, metavar="FILE.toml",
    help="Settings file; its keys are these long flag names. Precedence: flag > FGDILP_<FLAG> environment "
         "variable > file > profile > default.")
VERBOSE_OPTION = click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's log (also FGDILP_VERBOSE=1).")
GROUPS = ("model", "sampling", "steer", "reply", "chat", "history")


def setting_help(name: str, command: str = "") -> str:
    """A setting's help text: its own words, the default `command` runs with where it is decided at
    run time (the model, the layers), and its range (settings.RANGES, checked for every source)."""
    spec = SPECS[name]
    text = spec.help
    shown = spec.shown.get(command) or (spec.shown.get(CHAT) if command == "serve" else None) or spec.shown.get("")
    if shown:
        text = f"{text.rstrip('.')} (default: {shown})."
    r = spec.range
    if r is not None and r.bounded and TYPES[name] in ("int", "float"):
        text = f"{text} [{r.shown or r.text().removeprefix('in ')}]".strip()
    return text


def setting_option(name: str, command: str = "", flag_min: Optional[int] = None) -> Callable:
    """The click option of Settings field `name`, showing `command`'s default (command_defaults)."""
    spec, typ = SPECS[name], TYPES[name]
    long = "--" + name.replace("_", "-")
    default = command_defaults(command).get(name, getattr(Settings, name))
    kw: dict[str, Any] = {"default": default, "help": setting_help(name, command) or None}
    if typ == "bool":
        decls = [f"{long}/--no-{name.replace('_', '-')}"]
    else:
        decls = [*spec.short, long]
        low = flag_min if flag_min is not None else spec.flag_min
        if spec.method_choice:
            kw["type"] = MethodChoice()
        elif spec.choices:
            kw["type"] = FormerChoice(spec.choices, spec.former) if spec.former else click.Choice(spec.choices)
        elif typ == "int":
            kw["type"] = click.IntRange(low) if low is not None else int
        elif typ == "float":
            kw["type"] = float
        elif typ == "Optional[float]":
            kw["type"] = OptionalFloat()
        elif typ == "Optional[tuple[int, int]]":
            kw.update(nargs=2, type=int)
        else:
            kw["type"] = str
    if spec.metavar:
        kw["metavar"] = spec.metavar
    if spec.show_default and default is not None:
        kw["show_default"] = True
    return click.option(*decls, name, **kw)


def setting_options(*parts: str, command: str = "", flag_min: Optional[dict[str, int]] = None) -> Callable:
    """The options of the settings in `parts` (a group of GROUPS, or one field's name), each with
    `command`'s default in its help; flag_min: a flag that refuses smaller values for this command.
    The "model" group also carries --config and -v."""
    opts = []
    for part in parts:
        names = [n for n, s in SPECS.items() if s.group == part] if part in GROUPS else [part]
        opts += [setting_option(n, command, (flag_min or {}).get(n)) for n in names]
        if part == "model":
            opts += [CONFIG_OPTION, VERBOSE_OPTION]

    def deco(fn: Callable) -> Callable:
        for opt in reversed(opts):
            fn = opt(fn)
        return fn
    return deco


# the groups as most commands take them (chat and serve show their own defaults: setting_options)
model_options = setting_options("model")
sampling_options = setting_options("sampling")
steer_options = setting_options("steer")


def _settings(kw: dict, command: str = ""):
    """Settings from the built-in and `command`'s defaults, the config file, the FGDILP_*
    variables and the flags given explicitly, by settings.resolve(). Where each value came from
    is kept in the click context (sources()): a model's profile then fills only the fields that
    nobody set."""
    from ..engine.context import set_verbose

    # -v, or FGDILP_VERBOSE set to anything but an off word: the flag must not turn the variable off
    env_verbose = os.environ.get("FGDILP_VERBOSE", "").strip().lower() not in ("", "0", "false", "no", "off")
    set_verbose(bool(kw.pop("verbose", False)) or env_verbose)
    ctx = click.get_current_context()
    config = Settings.toml_values(kw["config"]) if kw.get("config") else {}
    env = Settings.from_env(os.environ)
    given = {k: v for k, v in kw.items() if k in SPECS and ctx.get_parameter_source(k) != ParameterSource.DEFAULT}
    if given.get("steer_layer_range") is not None:
        given["steer_layer_range"] = tuple(given["steer_layer_range"])
    ctx.meta["fgdilp.config"] = kw.get("config")
    settings, where = resolve({"flag": given, "env": env, "config": config}, command)
    ctx.meta["fgdilp.sources"] = where
    return settings


def _detoxifier(s, vectors_path=None, setup: bool = False, **kw):
    """The command's Detoxifier, with where each setting came from (sources()). setup: the command
    uses the model for its own sake (generate, compare, chat, serve): a model without a profile gets
    one from the fast setup first (unless --no-auto-setup), with a progress bar, and the user is
    told once what runs; other commands (info, eval, bench, ...) never start a setup."""
    from ..api import Detoxifier

    if not setup:
        return Detoxifier(s, vectors_path, sources=sources(), auto_setup=False, **kw)
    det = Detoxifier(s, vectors_path, sources=sources(), setup_progress=SetupBar(), **kw)
    announce(det)
    return det


class SetupBar:
    """The fast setup's progress on stderr: one bar per stage, redrawn in place on a terminal, one
    line per finished stage otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.monotonic()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if done == 1 and stage == "directions":
            print("no profile for this model: the fast setup makes one (once; --no-auto-setup skips it)",
                  file=self.stream)
        if not self.tty and done < total:
            return
        width = 24
        fill = int(width * done / max(total, 1))
        line = (f"fast setup {stage:<10} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} "
                f"{time.monotonic() - self.t0:5.0f} s")
        print(("\r" + line) if self.tty else line, end="\n" if done >= total else "", file=self.stream, flush=True)


def announce(det) -> None:
    """Tell the user once, on stderr, what the model runs at when nobody measured it for them."""
    for note in det.notices:
        click.echo(f"note: {note}", err=True)
    if det.setup_result is not None:
        click.echo(det.setup_result.summary(), err=True)
    if det.profile_note:
        click.echo(f"note: {det.profile_note}", err=True)


def every_method(s) -> list[str]:
    """The default of --methods (eval, calibrate): every listed method the model of settings `s`
    can run (universal only where the model has universal directions)."""
    from ..engine.tensors import bits_per_weight, family_fingerprint, weights_fingerprint
    from ..models import resolve_model
    from ..profiles import find_universal

    try:
        path = resolve_model(s.model)
        has = find_universal(weights_fingerprint(path), family=lambda: family_fingerprint(path),
                             bits_per_weight=bits_per_weight(path)) is not None
    except Exception:         # noqa: BLE001 - not a readable model: opening it says why, with a clear error
        has = False
    return list(methods.runnable_names(has))


def sources() -> dict[str, str]:
    """Where the settings of the running command came from (see _settings)."""
    ctx = click.get_current_context(silent=True)
    return dict(ctx.meta.get("fgdilp.sources", {})) if ctx is not None else {}


def with_vectors(s, vectors_path):
    """--vectors runs saved directions (frozen): the method becomes the saved-vectors one (a run
    named `vectors`), and a --method given on the command line that cannot apply them is refused."""
    if not vectors_path:
        return s
    given = click.get_current_context().get_parameter_source("method") != ParameterSource.DEFAULT
    if given and methods.get(s.method).with_vectors is None:
        raise FgdilpError(f"--vectors applies saved directions (frozen); it cannot run --method {s.method}")
    ctx = click.get_current_context()
    ctx.meta.setdefault("fgdilp.sources", {})["method"] = "flag"      # --vectors chose it, or the flag
    return s.updated({"method": methods.SAVED_VECTORS})
