"""Shared pieces of the command line: error handling, option groups and the settings precedence."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

import click
from click.core import ParameterSource

from . import methods
from .errors import FgdilpError, ParamError
from .params import CONTRASTS, EDIT_RULES
from .settings import OFF_WORDS, RANGES, SourcedParamError, env_name, toml_key

DEFAULT_BENCH_PROMPT = "The ill-fated tale of Phoneys, the stupid"
# Settings fields whose flag is not --<field-with-dashes>
FLAGS = {"n_predict": "-n", "ctx_size": "-c", "threads": "-t", "n_gpu_layers": "-ngl", "batch_size": "-b",
         "cache_type_k": "-ctk", "cache_type_v": "-ctv", "flash_attn": "-fa", "system_prompt": "-sys"}


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
    """The command-line flag of a Settings field (for error messages)."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


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


def ranged(field: str, help: str = "") -> str:
    """`help` with the range of a Settings field (settings.RANGES, checked for every source)."""
    r = RANGES[field]
    return f"{help} [{r.shown or r.text().removeprefix('in ')}]".strip()


class MethodChoice(click.ParamType):
    """A method name from the registry (read when the command runs, so registered methods count)."""

    name = "method"

    def get_metavar(self, param, *args, **kwargs) -> str:     # click >= 8.2 also passes ctx=
        return "[" + "|".join(methods.names()) + "]"

    def convert(self, value, param, ctx):
        if methods.is_method(value):
            return value
        self.fail(f"{value!r} is not a method (one of {', '.join(methods.names())})", param, ctx)


def method_list(text: str) -> list[str]:
    """Comma-separated method names, each checked against the registry."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    for m in names:
        if not methods.is_method(m):
            raise FgdilpError(f"unknown method {m!r} (one of {', '.join(methods.names())})")
    if not names:
        raise FgdilpError("no method given")
    return names


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


def _options(*opts) -> Callable:
    def deco(fn: Callable) -> Callable:
        for opt in reversed(opts):
            fn = opt(fn)
        return fn
    return deco


# Defaults come from Settings; a flag left out takes the config file's value, else the default.
model_options = _options(
    click.option("-m", "--model", "model", type=str, default=None, metavar="MODEL.gguf",
                 help="GGUF model file (default: the embedded gemma-3-270m)."),
    click.option("--config", type=str, default=None, metavar="FILE.toml",
                 help="Settings file; its keys are these long flag names. Precedence: flag > "
                      "FGDILP_<FLAG> environment variable > file > default."),
    # the numbers' ranges are settings.RANGES, checked for a flag as for every other source
    click.option("-c", "--ctx-size", type=int, default=2048, show_default=True,
                 help=ranged("ctx_size", "Context tokens per sequence (prompt + generation), at most the "
                                         "model's trained context.")),
    click.option("--ctx-size-override/--no-ctx-size-override", default=False, show_default=True,
                 help="Allow -c past the model's trained context (its output there is untested)."),
    click.option("-t", "--threads", type=int, default=0, help=ranged("threads", "CPU threads (0 = all cores).")),
    click.option("-ngl", "--n-gpu-layers", type=int, default=0, show_default=True,
                 help=ranged("n_gpu_layers", "Layers to offload to the GPU (GPU builds of llama-cpp-python).")),
    click.option("--rpc", type=str, default=None, metavar="HOST:PORT[,HOST:PORT...]",
                 help="Place the model's layers on these llama.cpp rpc-server processes (an RPC build of "
                      "llama-cpp-python: tools/rpc-check.sh; docs/rpc.md). -ngl 0 then means every layer."),
    click.option("-b", "--batch-size", type=int, default=512, show_default=True,
                 help=ranged("batch_size", "Rows per decode (prompt chunks).")),
    click.option("-ctk", "--cache-type-k", default="f16", show_default=True, help="K cache type (f32, f16, q8_0, ...)."),
    click.option("-ctv", "--cache-type-v", default="f16", show_default=True,
                 help="V cache type; steering needs f16, bf16 or f32."),
    click.option("-fa", "--flash-attn", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True),
    click.option("--kv-reuse/--no-kv-reuse", default=True, show_default=True,
                 help="Keep each sequence's KV between replies and decode only what changed (off: re-prefill)."),
    click.option("--kv-conversations", type=int, default=1, show_default=True,
                 help=ranged("kv_conversations", "With --kv-reuse: conversations whose KV each method keeps, the "
                             "least recently used dropped first (serve: one per concurrent user; memory grows "
                             "with it).")),
    click.option("--kv-budget-mib", type=int, default=0, show_default=True,
                 help=ranged("kv_budget_mib", "KV cache that the methods' contexts may hold together, in MiB: a "
                             "context is made when its method is first used and the least recently used are "
                             "dropped to stay within it (0 = half of this machine's memory less the model's "
                             "weights).")),
    click.option("--profile/--no-profile", "profile", default=True, show_default=True,
                 help="Apply the model's calibrated profile (fgdilp-cpp calibrate) to settings not given."),
    click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's log (also FGDILP_VERBOSE=1)."),
)

sampling_options = _options(
    click.option("-s", "--seed", type=int, default=42, show_default=True, help=ranged("seed")),
    click.option("--temp", type=float, default=0.8, show_default=True, help=ranged("temp")),
    click.option("--top-k", type=int, default=40, show_default=True, help=ranged("top_k")),
    click.option("--top-p", type=float, default=0.95, show_default=True, help=ranged("top_p")),
    click.option("--min-p", type=float, default=0.05, show_default=True, help=ranged("min_p")),
)

steer_options = _options(
    click.option("--steer-scale", type=float, default=1.0, show_default=True, help="Global strength of the edit."),
    click.option("--steer-layer-range", nargs=2, type=int, default=None, metavar="START END",
                 help="Steer only layers START..END (inclusive)."),
    click.option("--exp-norm", type=float, default=0.4, show_default=True,
                 help="Exponent a of lambda_norm = (1 + |delta|)^a."),
    click.option("--exp-sim", type=float, default=0.6, show_default=True,
                 help="Exponent b of lambda_sim = (1 + max(0, cos(v, e)))^b."),
    click.option("--renorm/--no-renorm", default=True, show_default=True,
                 help="Restore the row norm after the edit."),
    click.option("--edit", type=click.Choice(EDIT_RULES), default="tr", show_default=True,
                 help="Edit rule: tr subtracts the delta (then --renorm); rotate turns each head away "
                      "from the delta and keeps its norm."),
    click.option("--gate", type=OptionalFloat(), default=None, metavar="THETA|off",
                 help="Edit a head only where cos(head output, delta) > THETA, in [-1, 1); the other "
                      "heads stay unsteered (default: off, every head)."),
    click.option("--contrast", type=click.Choice(CONTRASTS), default="full", show_default=True,
                 help="What the prefixed sequences P+ / P- hold after their prefix: the prompt and the "
                      "reply (the papers), or the reply alone (chat: a new message is decoded once, not "
                      "three times)."),
    click.option("--condition", type=OptionalFloat(), default=None, metavar="THETA|off",
                 help="Steer a prompt only where the offline toxicity scorer reads it (chat: any message "
                      "of the conversation) at least THETA toxic, in [0, 1]; any other prompt is "
                      "generated unsteered (default: off, every prompt)."),
    click.option("--selfgen-samples", type=int, default=25, show_default=True,
                 help=ranged("selfgen_samples", "FGDILP: self-generated samples N.")),
    click.option("--selfgen-tokens", type=int, default=20, show_default=True,
                 help=ranged("selfgen_tokens", "FGDILP: new tokens per self-generated sample.")),
    click.option("--selfgen-min-tokens", type=int, default=5, show_default=True,
                 help=ranged("selfgen_min_tokens", "FGDILP: no end of a sample before this many tokens.")),
    click.option("--negatives", type=int, default=6, show_default=True,
                 help=ranged("negatives", "FGDILP: negative prefixes.")),
    click.option("--mask-k", type=float, default=50.0, show_default=True,
                 help=ranged("mask_k", "FGDILP: top-K % entries kept per sub-toxicity vector (100 = no masking).")),
    click.option("--fusion", type=click.Choice(["max", "mean", "sum"]), default="max", show_default=True),
    click.option("--sign-election/--no-sign-election", default=True, show_default=True),
    click.option("--pad-blank/--no-pad-blank", default=True, show_default=True,
                 help="FGDILP: pad missing negatives with template-only prefixes."),
    click.option("--fused-norm", type=click.Choice(["none", "tr"]), default="none", show_default=True,
                 help="FGDILP: tr rescales each head of the fused delta to the norm of the mean delta "
                      "(TR's strength, for comparing at equal strength)."),
    click.option("--diagnoser", type=click.Choice(["self", "scorer", "auto"]), default="self", show_default=True,
                 help="FGDILP: who ranks the self-generated samples: the model itself, the offline "
                      "toxicity scorer (tox-block), or auto (self only where its measured AUC reaches the scorer's)."),
    click.option("--instance-reuse", type=click.Choice(["turn", "conversation"]), default="turn", show_default=True,
                 help="FGDILP in chat: build the instance prefixes every reply, or once per conversation."),
)


def _settings(kw: dict, default_source: str = "default", **defaults):
    """Settings from defaults, then the config file, then FGDILP_* variables, then the flags given
    explicitly. Where each value came from is kept in the click context (sources()): a model's
    profile then fills only the fields that nobody set."""
    from .engine.context import set_verbose
    from .settings import Settings

    # -v, or FGDILP_VERBOSE set to anything but an off word: the flag must not turn the variable off
    env_verbose = os.environ.get("FGDILP_VERBOSE", "").strip().lower() not in ("", "0", "false", "no", "off")
    set_verbose(bool(kw.pop("verbose", False)) or env_verbose)
    ctx = click.get_current_context()
    config = Settings.toml_values(kw["config"]) if kw.get("config") else {}
    env = Settings.from_env(os.environ)
    names = Settings.field_names()
    given = {k: v for k, v in kw.items() if k in names and ctx.get_parameter_source(k) != ParameterSource.DEFAULT}
    if given.get("steer_layer_range") is not None:
        given["steer_layer_range"] = tuple(given["steer_layer_range"])
    sources = {k: default_source for k in defaults}
    for layer, where in ((config, "config"), (env, "env"), (given, "flag")):
        sources.update(dict.fromkeys(layer, where))
    ctx.meta["fgdilp.sources"] = sources
    ctx.meta["fgdilp.config"] = kw.get("config")
    return Settings().updated(defaults).updated(config).updated(env).updated(given)


def _detoxifier(s, vectors_path=None, **kw):
    """The command's Detoxifier, with where each setting came from (sources())."""
    from .api import Detoxifier

    return Detoxifier(s, vectors_path, sources=sources(), **kw)


def every_method(s) -> list[str]:
    """The default of --methods (eval, calibrate): every listed method the model of settings `s`
    can run (fgdilp-universal only where the model has universal directions)."""
    from .engine.tensors import bits_per_weight, family_fingerprint, weights_fingerprint
    from .models import resolve_model
    from .profiles import find_universal

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
    """--vectors runs saved directions (frozen): the method becomes fgdilp-frozen, and another
    --method given on the command line is refused."""
    if not vectors_path:
        return s
    given = click.get_current_context().get_parameter_source("method") != ParameterSource.DEFAULT
    if given and methods.get(s.method).with_vectors is None:
        raise FgdilpError(f"--vectors applies saved directions (frozen); it cannot run --method {s.method}")
    if given:
        return s
    ctx = click.get_current_context()
    ctx.meta.setdefault("fgdilp.sources", {})["method"] = "flag"      # --vectors chose it
    return s.updated({"method": methods.running_saved_vectors()[0]})
