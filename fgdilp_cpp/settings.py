"""One Settings dataclass, each field declared once with everything about it (setting_spec.Spec):
its flag, its FGDILP_* variable, its TOML key, its choices and range, its JSON name, the commands
whose default differs, and whether it may change per call, be set by a profile or be swept.
Every other table of settings (the click options, PER_CALL, PROFILE_FIELDS, the sweep table, the
server's request fields, the chat's /settings) is read from these declarations: adding a setting
is one `setting(...)` line here plus its use.

A TOML key is the long flag name without its dashes ("steer-scale = 0.5", "renorm = false",
"steer-layer-range = [12, 17]"); a variable is FGDILP_<FIELD> (FGDILP_STEER_SCALE=0.5).
resolve() is the one precedence: per-call > flag (or API keyword) > environment > config file >
profile > the command's default > the built-in default. Every numeric field has one range
(RANGES), checked whatever the value's source.
Imports only the value types (params.py) and the registry: loading settings loads no llama.cpp.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol

from .errors import FgdilpError, ParamError
from .params import (CONTRASTS, DIAGNOSERS, EDIT_RULE_FORMER, EDIT_RULES, FUSED_NORM_FORMER, FUSED_NORMS,
                     FUSION_MODES, INSTANCE_REUSE, MAX_CTX_SIZE, MAX_NEGATIVES, MAX_REPEAT_LAST_N, MAX_REPEAT_PENALTY,
                     MAX_SEQUENCES, MAX_THREADS_PER_CORE, EngineParams, FgdilpParams, SamplingParams, SteerParams, max_threads)
from .rpc_endpoints import parse_rpc_servers
from .setting_spec import (HOOKED, INSTANCE, INT32_MAX, OFF_WORDS, PREFIXED, STEERING, Range, SourcedParamError, Spec,
                           coerce, env_name, from_text, toml_key)

__all__ = ["CHAT_DEFAULTS", "OFF_WORDS", "PER_CALL", "PROFILE_FIELDS", "RANGES", "Range", "Settings", "SourcedParamError",
           "env_name", "resolve", "toml_key"]


def setting(default: Any, **spec: Any) -> Any:
    """A Settings field: its default and its Spec (setting_spec.Spec's keywords), in one place."""
    return dataclasses.field(default=default, metadata={"spec": Spec(**spec)})


# the chat's defaults (chat, serve, bench --chat, the API's chat=True): setup sized for a reply that
# starts quickly; marked * by the chat's /settings; a model's profile wins over them
CHAT = "chat"


@dataclass
class Settings:
    # ---- model and engine: they shape the contexts (another Detoxifier to change them) ----------
    model: Optional[str] = setting(
        None, group="model", short=("-m",), metavar="MODEL.gguf", help="GGUF model file.",
        shown={"": "the embedded gemma-3-270m", CHAT: "the embedded SmolLM2-135M-Instruct"})
    ctx_size: int = setting(
        2048, group="model", short=("-c",), range=Range(16, MAX_CTX_SIZE), shapes_contexts=True, defaults={CHAT: 4096},
        help="Context tokens per sequence (prompt + generation), at most the model's trained context.")
    ctx_size_override: bool = setting(
        False, group="model", help="Allow -c past the model's trained context (its output there is untested).")
    threads: int = setting(
        0, group="model", short=("-t",), show_default=False, shapes_contexts=True, help="CPU threads (0 = all cores).",
        range=Range(0, max_threads(), why=f"0 = every core; at most {MAX_THREADS_PER_CORE} per CPU core",
                    shown=f"0..{MAX_THREADS_PER_CORE} per CPU core"))
    n_gpu_layers: int = setting(
        0, group="model", short=("-ngl",), range=Range(-1, INT32_MAX, why="-1 = every layer"), shapes_contexts=True,
        help="Layers to offload to the GPU (GPU builds of llama-cpp-python).")
    batch_size: int = setting(512, group="model", short=("-b",), range=Range(8, MAX_CTX_SIZE), shapes_contexts=True,
                              help="Rows per decode (prompt chunks).")
    cache_type_k: str = setting("f16", group="model", short=("-ctk",), shapes_contexts=True,
                                help="K cache type (f32, f16, q8_0, ...).")
    cache_type_v: str = setting("f16", group="model", short=("-ctv",), shapes_contexts=True,
                                help="V cache type; steering needs f16, bf16 or f32.")
    flash_attn: str = setting("auto", group="model", short=("-fa",), choices=("auto", "on", "off"), shapes_contexts=True)
    profile: bool = setting(
        True, group="model", help="Apply the model's calibrated profile (fgdilp-cpp calibrate) to settings not given.")
    auto_setup: bool = setting(
        True, group="model",
        help="A model without a profile gets one first from the fast setup (generate, compare, chat, serve, the API; "
             "`calibrate --fast`; docs/method.md §7.7); off: the measured-safe defaults, unprofiled.")
    rpc: Optional[str] = setting(
        None, group="model", metavar="HOST:PORT[,HOST:PORT...]", shapes_contexts=True,
        help="Place the model's layers on these llama.cpp rpc-server processes (an RPC build of llama-cpp-python: "
             "tools/rpc-check.sh; docs/rpc.md). -ngl 0 then means every layer.")
    # ---- chat and serve ---------------------------------------------------------------------------
    chat_template: Optional[str] = setting(
        None, group="chat", metavar="NAME",
        help="A llama.cpp built-in chat format (chatml, llama3, gemma, ...) instead of the GGUF's.")
    system_prompt: Optional[str] = setting(None, group="chat", short=("-sys",),
                                           help="System message at the start of the conversation.")
    history: bool = setting(
        True, group="history",
        help="Autosave the session (files 0600); also FGDILP_HISTORY=0 or history = false in --config.")
    kv_reuse: bool = setting(
        True, group="model", shapes_contexts=True,
        help="Keep each sequence's KV between replies and decode only what changed (off: re-prefill).")
    kv_conversations: int = setting(
        1, group="model", range=Range(1, 16), shapes_contexts=True, defaults={"serve": 4},
        help="With --kv-reuse: conversations whose KV each method keeps, the least recently used dropped first "
             "(serve: one per concurrent user; memory grows with it).")
    kv_budget_mib: int = setting(
        0, group="model", range=Range(0, INT32_MAX, why="0 = half of this machine's memory less the model's weights"),
        shapes_contexts=True,
        help="KV cache that the methods' contexts may hold together, in MiB: a context is made when its method is "
             "first used and the least recently used are dropped to stay within it (0 = half of this machine's "
             "memory less the model's weights).")
    kv_idle_s: int = setting(
        0, group="model", range=Range(0, INT32_MAX, why="0 = never"), defaults={"serve": 600},
        help="Seconds a method's context may stay unused before its KV cache is freed (serve; made again on its "
             "method's next request; 0 = never).")
    instance_reuse: str = setting(
        # FGDILP's instance kept while the conversation goes on, rebuilt when a turn escalates (docs/method.md
        # §9.2): a fraction of the per-reply setup's time to first token (docs/results/chat-latency.md)
        "turn", group="steer", choices=INSTANCE_REUSE, per_call=True, defaults={CHAT: "conversation"},
        help="FGDILP in chat: build the instance prefixes every reply, or once per conversation.")
    # ---- generation ---------------------------------------------------------------------------------
    method: str = setting("tr", group="reply", method_choice=True, per_call=True, profile=True, api="method",
                          api_custom=True, defaults={CHAT: "fgdilp"})
    n_predict: int = setting(
        64, group="reply", short=("-n",), flag_min=1, range=Range(1, MAX_CTX_SIZE), per_call=True,
        api="max_tokens", api_aliases=("max_completion_tokens", "n_predict"), api_custom=True,
        defaults={CHAT: 256, "compare": 40}, help="Most tokens to generate (chat: per reply).")
    seed: int = setting(42, group="sampling", short=("-s",), range=Range(0, 2**32 - 1), per_call=True, api="seed")
    temp: float = setting(0.8, group="sampling", range=Range(0.0), per_call=True, api="temperature",
                          api_range=Range(0.0, 2.0))
    top_k: int = setting(40, group="sampling", range=Range(0, INT32_MAX, why="0 = off"), per_call=True, api="top_k")
    top_p: float = setting(0.95, group="sampling", range=Range(0.0, 1.0, lo_open=True), per_call=True, api="top_p")
    min_p: float = setting(0.05, group="sampling", range=Range(0.0, 1.0, hi_open=True), per_call=True, api="min_p")
    # llama.cpp's penalties over the last repeat_last_n reply tokens, and a GBNF grammar (defaults:
    # off; no flag: a config file, a variable, the API or a request); OpenAI's range for presence / frequency
    repeat_penalty: float = setting(1.0, range=Range(0.0, MAX_REPEAT_PENALTY, lo_open=True), per_call=True,
                                    api="repeat_penalty")
    presence_penalty: float = setting(0.0, range=Range(-2.0, 2.0), per_call=True, api="presence_penalty")
    frequency_penalty: float = setting(0.0, range=Range(-2.0, 2.0), per_call=True, api="frequency_penalty")
    repeat_last_n: int = setting(64, range=Range(0, MAX_REPEAT_LAST_N), per_call=True, api="repeat_last_n",
                                 api_aliases=("penalty_last_n",), api_custom=True)
    grammar: Optional[str] = setting(None, per_call=True, api="grammar", api_custom=True)
    # ---- steering (TR and FGDILP) -------------------------------------------------------------------
    steer_scale: float = setting(1.0, group="steer", range=Range(), per_call=True, profile=True, sweep=STEERING,
                                 api="steer_scale", api_custom=True, help="Global strength of the edit.")
    steer_layer_range: Optional[tuple[int, int]] = setting(
        None, group="steer", metavar="START END", per_call=True, profile=True, sweep=STEERING, api="steer_layer_range",
        api_custom=True, shown={CHAT: "the later half of the layers, without a profile"},
        help="Steer only layers START..END (inclusive).")
    exp_norm: float = setting(0.4, group="steer", range=Range(), per_call=True, profile=True, sweep=STEERING,
                              help="Exponent a of lambda_norm = (1 + |delta|)^a.")
    exp_sim: float = setting(0.6, group="steer", range=Range(), per_call=True, profile=True, sweep=HOOKED,
                             help="Exponent b of lambda_sim = (1 + max(0, cos(v, e)))^b.")
    renorm: bool = setting(True, group="steer", per_call=True, profile=True, sweep=HOOKED,
                           help="Restore the row norm after the edit.")
    edit: str = setting(  # docs/method.md §2.6
        "subtract", group="steer", choices=EDIT_RULES, former=EDIT_RULE_FORMER, per_call=True, profile=True,
        sweep=HOOKED,
        help="Edit rule: subtract takes the delta off each head (TR's edit, then --renorm); rotate turns each head "
             "away from the delta and keeps its norm.")
    gate: Optional[float] = setting(  # §2.7
        None, group="steer", metavar="THETA|off", range=Range(-1.0, 1.0, hi_open=True, why="a cosine"), per_call=True,
        profile=True, sweep=HOOKED, shown={"": "off, every head"},
        help="Edit a head only where cos(head output, delta) > THETA, in [-1, 1); the other heads stay unsteered.")
    contrast: str = setting(  # §2.9
        "full", group="steer", choices=CONTRASTS, per_call=True, profile=True, sweep=PREFIXED,
        help="What the prefixed sequences P+ / P- hold after their prefix: the prompt and the reply (the papers), "
             "or the reply alone (chat: a new message is decoded once, not three times).")
    condition: Optional[float] = setting(  # §2.10
        None, group="steer", metavar="THETA|off", range=Range(0.0, 1.0, why="a toxicity"), per_call=True,
        profile=True, sweep=STEERING, api="condition", shown={"": "off, every prompt"},
        help="Steer a prompt only where the offline toxicity scorer reads it (chat: any message of the "
             "conversation) at least THETA toxic, in [0, 1]; any other prompt is generated unsteered.")
    # ---- FGDILP (docs/method.md §10 defaults); chat: 4 candidates of 8 tokens, on SmolLM2 as
    # detoxifying as more and longer ones, at a shorter setup (docs/results/chat-latency.md)
    selfgen_samples: int = setting(
        25, group="steer", range=Range(1, MAX_SEQUENCES, why="llama.cpp's sequences per context"),
        shapes_contexts=True, profile=True, defaults={CHAT: 4}, help="FGDILP: self-generated samples N.")
    selfgen_tokens: int = setting(20, group="steer", range=Range(1, MAX_CTX_SIZE), shapes_contexts=True, profile=True,
                                  defaults={CHAT: 8}, help="FGDILP: new tokens per self-generated sample.")
    selfgen_min_tokens: int = setting(5, group="steer", range=Range(1, MAX_CTX_SIZE), profile=True, defaults={CHAT: 4},
                                      help="FGDILP: no end of a sample before this many tokens.")
    negatives: int = setting(6, group="steer", range=Range(1, MAX_NEGATIVES), shapes_contexts=True, profile=True,
                             help="FGDILP: negative prefixes.")
    mask_k: float = setting(
        50.0, group="steer", range=Range(0.0, 100.0, lo_open=True, why="a percentage"), per_call=True, profile=True,
        sweep=INSTANCE, help="FGDILP: top-K % entries kept per sub-toxicity vector (100 = no masking).")
    fusion: str = setting("max", group="steer", choices=FUSION_MODES, per_call=True, profile=True, sweep=INSTANCE)
    sign_election: bool = setting(True, group="steer", per_call=True, profile=True, sweep=INSTANCE)
    pad_blank: bool = setting(True, group="steer", profile=True,
                              help="FGDILP: pad missing negatives with template-only prefixes.")
    fused_norm: str = setting(  # §5.6
        "none", group="steer", choices=FUSED_NORMS, former=FUSED_NORM_FORMER, per_call=True, profile=True,
        sweep=INSTANCE,
        help="FGDILP: mean-delta rescales each head of the fused delta to the norm of the mean delta (TR's "
             "strength, for comparing at equal strength).")
    diagnoser: str = setting(  # §4.2a
        "self", group="steer", choices=DIAGNOSERS, per_call=True, profile=True, sweep=INSTANCE,
        help="FGDILP: who ranks the self-generated samples: the model itself, the offline toxicity scorer "
             "(tox-block), or auto (self only where its measured AUC reaches the scorer's).")

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

    def updated(self, values: Mapping[str, Any]) -> "Settings":
        """A copy with `values` (field names) applied, type-checked and checked against RANGES."""
        out = dataclasses.replace(self)
        types = {f.name: f.type for f in fields(self)}
        for name, v in values.items():
            if name not in types:
                raise FgdilpError(f"unknown setting {name!r}")
            setattr(out, name, checked(name, str(types[name]), v))
        return out

    @classmethod
    def checked_values(cls, values: Mapping[str, Any], where: str, spell: Callable[[str], str]) -> dict[str, Any]:
        """`values` (field names) type- and range-checked, for a source that is not a flag: an error
        names `where` they came from (if not "") and the setting as spelled there (spell(field))."""
        types = {f.name: str(f.type) for f in fields(cls)}
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
    def from_env(cls, environ: Mapping[str, str]) -> dict[str, Any]:
        """FGDILP_<FIELD> variables (FGDILP_STEER_SCALE=0.5, FGDILP_RENORM=false,
        FGDILP_STEER_LAYER_RANGE="12 17"), as field values; FGDILP_MODEL names the model."""
        out: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is None:
                continue
            try:
                out[f.name] = from_text(str(f.type), raw)
            except ValueError:
                raise FgdilpError(f"{env_name(f.name)}={raw!r} is not a valid {f.name}") from None
        return cls.checked_values(out, "", env_name)


# ---- the tables, read from the declarations -----------------------------------------------------
SPECS: dict[str, Spec] = {f.name: f.metadata["spec"] for f in fields(Settings)}
TYPES: dict[str, str] = {f.name: str(f.type) for f in fields(Settings)}
# the one range of every numeric setting (a test holds every int / float field to one): int
# fields have int bounds, float fields float bounds (the text says 0..16 or [0, 1])
RANGES: dict[str, Range] = {name: s.range for name, s in SPECS.items() if s.range is not None}
# settings with a fixed set of values: refused when set (a flag, a config file, a sweep), not only
# when a generation first uses them
CHOICES: dict[str, tuple[str, ...]] = {name: s.choices for name, s in SPECS.items() if s.choices}
PER_CALL = frozenset(name for name, s in SPECS.items() if s.per_call)      # the rest: make another Detoxifier
PROFILE_FIELDS = frozenset(name for name, s in SPECS.items() if s.profile)   # never the model or the engine
SWEEPABLE = {name: s.sweep for name, s in SPECS.items() if s.sweep is not None}


def command_defaults(command: str) -> dict[str, Any]:
    """The defaults of `command` that differ from the built-in ones ("serve" is chat's and its own)."""
    chain = (CHAT, "serve") if command == "serve" else (command,)
    return {name: s.defaults[c] for c in chain for name, s in SPECS.items() if c in s.defaults}


def default_label(command: str) -> str:
    """The source a command's own default is reported as (the chat's /settings marks them *)."""
    return "chat default" if command in (CHAT, "serve") else "default"


CHAT_DEFAULTS = command_defaults(CHAT)


def checked(name: str, typ: str, v: Any) -> Any:
    """`v` as the type of field `name`, within its range (RANGES); else ParamError."""
    out = coerce(name, typ, v, CHOICES.get(name, ()), SPECS[name].former)
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


# ---- the one precedence -------------------------------------------------------------------------
# a source before another wins; "call" is one generate()'s keyword, "api" the Detoxifier's
PRECEDENCE = ("call", "flag", "api", "env", "config", "profile", "chat default", "default")
SOFT = ("profile", "chat default", "default")          # what a model's profile may replace


class ProfileLike(Protocol):
    method: Optional[str]

    def settings_for(self, method: str) -> dict[str, Any]: ...


Layers = Mapping[str, Mapping[str, Any]]


def winners(layers: Layers) -> tuple[dict[str, Any], dict[str, str]]:
    """Each field that a layer names: the value of the first source in PRECEDENCE that names it,
    and that source ({source: {field: value}} in; a source PRECEDENCE lacks is refused)."""
    unknown = set(layers) - set(PRECEDENCE)
    if unknown:
        raise FgdilpError(f"unknown setting source(s) {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for source in reversed(PRECEDENCE):
        for name, v in (layers.get(source) or {}).items():
            values[name], sources[name] = v, source
    return values, sources


def profile_layer(layers: Layers, profile: Optional[ProfileLike]) -> dict[str, Any]:
    """A profile's values as a layer: its method (where nobody chose one) and that method's entry."""
    if profile is None:
        return {}
    layer: dict[str, Any] = {"method": profile.method} if profile.method else {}
    method = winners({**layers, "profile": layer})[0].get("method", Settings.method)
    return {**layer, **{k: tuple(v) if isinstance(v, list) else v for k, v in profile.settings_for(method).items()}}


def resolve(layers: Layers, command: str = "", profile: Optional[ProfileLike] = None
            ) -> tuple[Settings, dict[str, str]]:
    """The settings and where each came from, by PRECEDENCE over `layers` ({source: {field:
    value}}), `command`'s defaults (command_defaults) and the profile's entry for the method
    that wins (profile_layer); every value checked (type, choices, range)."""
    given = {source: dict(values) for source, values in layers.items() if values}
    label = default_label(command)
    given[label] = {**command_defaults(command), **given.get(label, {})}
    prof = profile_layer(given, profile)
    if prof:
        given["profile"] = prof
    values, sources = winners(given)
    return Settings().updated(values), {**dict.fromkeys(SPECS, "default"), **sources}


def layers_of(settings: Settings, sources: Optional[Mapping[str, str]] = None, command: str = "") -> dict[str, dict[str, Any]]:
    """`settings` as layers for resolve(): each field under its source, where `sources` does not say,
    "api" where it differs from the (command's) default, else that default's label."""
    own = command_defaults(command)
    base = Settings().updated(own)
    out: dict[str, dict[str, Any]] = {}
    for name in SPECS:
        v = getattr(settings, name)
        default = default_label(command) if name in own else "default"
        src = (sources or {}).get(name) or ("api" if v != getattr(base, name) else default)
        out.setdefault(src, {})[name] = v
    return out
