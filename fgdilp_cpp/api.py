"""The embeddable Python API: one Detoxifier per model file.

    with Detoxifier.from_file("model.gguf", method="fgdilp") as det:
        print(det.generate("The prompt").text)
        for piece in det.stream_chat([{"role": "user", "content": "Hi"}]):
            print(piece, end="")

Thread-safety: a Detoxifier owns one set of llama.cpp contexts and is not safe to use from two
threads at once; use one object per thread (they share nothing but the files), or queue calls
(as `serve` does). The one exception is cancel(), which may be called from any thread while
generate(), chat() or a stream runs.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from . import methods
from .analysis import control_vector
from .call_settings import run_settings
from .chat import CHAT_DEFAULTS, Fitted, MessagesLike
from .chat.fitting import ChatFormat, as_user_message, fit_conversation
from .chat.tokens import ChatPrompt
from .condition import conversation_texts
from .errors import FgdilpError
from .engine import Model
from .generation import GenResult, open_generator, probe_kqv_out
from .method.sources import FGDILP_INSTANCES
from .method.vectors import HeadDirections
from .models import resolve_model
from .profiles import DamagedProfile, Profile, fast_setup_intact, find_profile, find_universal, is_fast, model_identity
from .safe_defaults import HOW_TO_PROFILE, is_safe_defaults, safe_profile, with_safe_entries
from .settings import CHAT, PER_CALL, Settings, fit_ctx_size, layers_of, resolve
from .stream import Stream

# settings that may change per call (the rest shape the contexts: make another Detoxifier);
# declared with each field of settings.Settings
__all__ = ["PER_CALL", "Detoxifier"]


class Detoxifier:
    """A GGUF model with steering: generate / stream a continuation, chat / stream_chat a reply.

    Besides those verbs (and info, build_vectors, export_control_vector, cancel, close) it holds
    data: model, settings and sources, profile, vectors, name, max_samples, chat_format, notices,
    and `generator`, the Generator that runs the calls: the one seam for tools that need the
    engine (analysis.py, the benchmarks, the tests)."""

    def __init__(self, settings: Settings, vectors_path: Optional[str] = None, chat: bool = False, *,
                 max_samples: int = 1, max_new: int = 256, reuse_instances: bool = False,
                 sources: Optional[dict[str, str]] = None, profile: Union[Profile, bool, None] = None,
                 setup_progress=None, auto_setup: bool = True):
        """max_samples: continuations of one prompt generated together (generate(n_samples=...));
        max_new: KV room per extra sample; reuse_instances: keep the last prompt's FGDILP setup, so
        that fgdilp and fgdilp-frozen on the same prompt and seed share it (evaluation).
        sources: where each setting came from ("flag", "env", "config", "api", "default",
        "chat default"); a field not named counts as the caller's when it differs from the default.
        profile: the model profile to apply to the settings left at their defaults: None looks the
        model's up (unless settings.profile is False), False applies none, or a Profile. A model
        with no profile gets one from the fast setup first when settings.auto_setup (setup_progress:
        called (stage, done, total) meanwhile; setup_result then holds what it chose), else the
        measured-safe defaults (safe_defaults.py; `profile_note` says so). auto_setup=False: never
        start the setup here, whatever the settings say (info, eval and bench use the model as found)."""
        if settings.model is None and chat:
            from .models import default_chat_model_path

            settings = settings.updated({"model": str(default_chat_model_path())})
        # the method as it runs, and is reported: a former name as its name now; with a vectors file,
        # a method that applies it as the saved-vectors method (whose profile entry is the one it stands in for)
        if methods.is_method(settings.method, saved_vectors=vectors_path is not None):
            settings = settings.updated({"method": methods.run_name(settings.method, vectors_path is not None)})
        # what call_settings resolves a call's overrides with: the command whose defaults apply, and
        # the settings as given, by source (resolve() adds the profile; a per-call method resolves again)
        self.setting_command = CHAT if chat else ""
        self.setting_layers = layers_of(settings, sources, self.setting_command)
        model = Model(resolve_model(settings.model), n_gpu_layers=settings.n_gpu_layers, rpc=settings.rpc)
        self.model = model
        self.name: str = model.meta("general.name") or model.info.architecture
        self.vectors_path = vectors_path      # the saved-vectors file applied (eval ties a run to its sha256)
        self.setup_result = None
        self.notices: list[str] = []     # what a front end shows the user once (stderr, /settings)
        opened = (settings, chat, vectors_path, max_samples, max_new)
        try:
            self._open(*opened, profile)
            if auto_setup and vectors_path is None and self._wants_setup(settings, profile):
                from .autosetup.setup import fast_setup

                self.setup_result = fast_setup(self, setup_progress, made_by="fgdilp-cpp (first use of the model)")
                self.setup_result.install()
                self.generator.close()
                self._open(*opened, None)
        except BaseException:
            gen = getattr(self, "generator", None)
            if gen is not None:
                gen.close()
            model.close()
            raise
        self.generator.reuse_instances = reuse_instances

    def _open(self, settings: Settings, chat: bool, vectors_path: Optional[str], max_samples: int, max_new: int,
              profile: Union[Profile, bool, None]) -> None:
        """Find the profile (or its stand-in), resolve the settings with it and open the Generator."""
        model = self.model
        self.profile, self.profile_path = self._find_profile(model, settings, profile)
        if self.profile is None and profile is None and settings.profile:
            self.profile = self._stand_in(model)
        # one line for a model whose settings nobody measured (None when a profile applies, or none
        # by the user's choice: --no-profile runs the built-in defaults)
        self.profile_note: Optional[str] = (
            f"no measured profile for this model: running the measured-safe defaults (the last sixth of the "
            f"layers at a modest strength); {HOW_TO_PROFILE}" if is_safe_defaults(self.profile) else None)
        settings, sources = resolve(self.setting_layers, self.setting_command, self.profile)
        settings = fit_ctx_size(settings, model.info.n_ctx_train, sources.get("ctx_size", "default"))
        self.chat_defaults = dict(CHAT_DEFAULTS) if chat else {}    # the interactive defaults in force
        if chat and settings.steer_layer_range is None:
            # no profile applied (--no-profile): steer the later half of the layers (docs/results/runs-01-03-early.md, run 3)
            n = model.info.n_layer
            self.chat_defaults["steer_layer_range"] = (n // 2, n - 1)
            for layer in self.setting_layers.values():
                layer.pop("steer_layer_range", None)
            self.setting_layers.setdefault("chat default", {})["steer_layer_range"] = (n // 2, n - 1)
            settings = settings.updated({"steer_layer_range": (n // 2, n - 1)})
            sources["steer_layer_range"] = "chat default"
        # --diagnoser auto decides by the profile's measured AUCs
        self.generator = open_generator(model, settings, vectors_path,
                                        None if self.profile is None else self.profile.diagnosis,
                                        max_samples=max_samples, max_new=max_new)
        self.vectors: Optional[HeadDirections] = self.generator.vectors     # the saved directions applied
        self.max_samples: int = self.generator.engine.max_samples
        # the chat template (read on first use: a model without one still continues text)
        self.chat_format = ChatFormat(model, settings.chat_template)
        self.settings, self.sources = settings, sources

    def _wants_setup(self, settings: Settings, profile: Union[Profile, bool, None]) -> bool:
        """The model has no profile of its own, lookups are on and the settings allow the fast setup."""
        return ((self.profile is None or is_safe_defaults(self.profile)) and profile is None
                and settings.profile and settings.auto_setup)

    @staticmethod
    def _stand_in(model) -> Optional[Profile]:
        """What a model without a profile runs: the measured-safe defaults (safe_defaults.py)."""
        return safe_profile(model_identity(model), model.info.n_layer)

    def _find_profile(self, model, settings: Settings, profile) -> tuple[Optional[Profile], Optional[str]]:
        if isinstance(profile, Profile):
            identity = model_identity(model, family=False)
            if profile.matches(identity):
                return profile, None
            if profile.lendable_to(identity, model.family_fingerprint()):
                return profile.transferred(), None
            raise FgdilpError("this profile was made for another model (its weights differ)")
        if profile is False or (profile is None and not settings.profile):
            return None, None
        try:
            # the family fingerprint (a read of the tokenizer and norm weights) only where no profile
            # is keyed by these exact weights
            found, path = find_profile(model_identity(model, family=False), family=model.family_fingerprint)
        except DamagedProfile as exc:
            if not settings.auto_setup:
                raise
            # the fast setup makes it again; the damaged file is kept aside, never applied
            exc.path.replace(exc.path.with_name(exc.path.name + ".damaged"))
            self.notices.append(f"{exc}; kept as {exc.path.name}.damaged, and a new profile made")
            return None, None
        if found is not None and is_fast(found):
            found = with_safe_entries(found, model.info.n_layer) if fast_setup_intact(found, path) else None
            path = None if found is None else path
        return found, None if path is None else str(path)

    @classmethod
    def from_file(cls, path: Optional[str] = None, vectors: Optional[str] = None, chat: bool = False,
                  **settings) -> "Detoxifier":
        """path None = the embedded default model (SmolLM2-135M-Instruct when chat=True); settings
        are Settings fields (method="fgdilp", steer_scale=0.5, ...), and win over the model's
        profile. chat=True starts from the interactive defaults (CHAT_DEFAULTS: fewer
        self-generated samples, longer replies; without a profile, steering the later half of
        the layers unless steer_layer_range is given)."""
        given = {**({"model": str(path)} if path is not None else {}), **settings}
        base, sources = resolve({"api": given}, CHAT if chat else "")
        return cls(base, vectors, chat=chat, sources={k: "api" for k in settings})

    # ---- plain continuation ------------------------------------------------------------------
    def generate(self, prompt: str, explain: bool = False, n_samples: int = 1, stop_at_eog: bool = True,
                 special: bool = False, condition_texts: Optional[list[str]] = None, **overrides) -> GenResult:
        """The continuation of `prompt` (text in .text, explain data in .explain). n_samples:
        continuations drawn together (seeds seed .. seed + n - 1, at most max_samples), in
        .samples; stop_at_eog=False keeps going past end-of-generation tokens (benchmarks);
        special: parse special-token text (a prompt formatted with chat.fitting.fit_chat(): its
        messages' special-token text stays text);
        condition_texts: what --condition reads instead of the prompt (such a prompt's messages)."""
        s, method = run_settings(self, overrides)
        return self._call(prompt, s, method, special, explain, n_samples=n_samples, stop_at_eog=stop_at_eog,
                          condition_texts=condition_texts)

    def stream(self, prompt: str, explain: bool = False, **overrides) -> Stream:
        """Text pieces of the continuation as they are produced (.result once it is exhausted)."""
        s, method = run_settings(self, overrides)
        run = functools.partial(self._call, prompt, s, method, False, explain, reset_cancel=False)
        return Stream(lambda on_text: run(on_text=on_text), self.generator, s, method)

    # ---- chat (chat/fitting.py fits a conversation to the context) ------------------------------
    def chat(self, messages: MessagesLike, explain: bool = False, trim: bool = True, **overrides) -> GenResult:
        """The assistant's reply to `messages` ([{"role", "content"}], the last one the user's).
        trim=False refuses a conversation that does not fit instead of dropping its oldest turns;
        result.explain["dropped_messages"] says how many were dropped."""
        s, method = run_settings(self, overrides)
        fitted = fit_conversation(self, messages, s, method, trim)
        res = self._call(fitted.prompt, s, method, True, explain, chat=True,
                         condition_texts=conversation_texts(fitted.messages))
        res.explain["dropped_messages"] = fitted.dropped
        return res

    def stream_chat(self, messages: MessagesLike, explain: bool = False, trim: bool = True,
                    fitted: Optional[Fitted] = None, **overrides) -> Stream:
        """The reply as text pieces; .fitted.dropped tells how many old messages were dropped.
        fitted: what chat.fitting.fit_chat(det, messages, trim, **overrides) returned (serve fits a
        conversation before it queues it), instead of fitting it again."""
        s, method = run_settings(self, overrides)
        fitted = fitted if fitted is not None else fit_conversation(self, messages, s, method, trim)
        run = functools.partial(self._call, fitted.prompt, s, method, True, explain, reset_cancel=False, chat=True,
                                condition_texts=conversation_texts(fitted.messages))
        return Stream(lambda on_text: run(on_text=on_text), self.generator, s, method, fitted)

    # ---- the model, saved directions (analysis.py: its own diagnosis, probes, control vectors) ----
    def info(self, probe: bool = True) -> dict:
        """The model's shape and, with probe, on how many layers the kqv_out hook fired in a
        one-token decode (a model where it fires on fewer than every layer cannot be steered)."""
        i = self.model.info
        out = {"file": str(i.path), "name": self.name, "architecture": i.architecture,
               "description": i.description, "n_params": i.n_params, "n_layer": i.n_layer, "n_head": i.n_head,
               "n_head_kv": i.n_head_kv, "head_dim": i.head_dim, "n_embd": i.n_embd, "kqv_width": i.kqv_width,
               "n_vocab": i.n_vocab, "n_ctx_train": i.n_ctx_train}
        if probe:
            out["kqv_out_layers"] = probe_kqv_out(self.model, self.settings.threads)
        out["profile"] = self.profile_path if self.profile is not None else None
        out["profile_kind"] = (None if self.profile is None else self.profile.setup.get("kind") or "calibrated")
        out["profile_note"] = self.profile_note
        out["profile_transferred_from"] = None if self.profile is None else self.profile.transferred_from
        weights = self.model.fingerprint()["weights_sha256"]
        found = find_universal(weights, family=self.model.family_fingerprint, bits_per_weight=self.model.bits_per_weight())
        out["universal"] = None if found is None else str(found)      # method universal's directions
        directions = None if found is None else HeadDirections.load(found)
        out["universal_source"] = None if directions is None else directions.source
        # directions lent by another quantisation of these weights: the file they were built on
        out["universal_transferred_from"] = None if directions is None or directions.model.weights_sha256 == weights \
            else {"name": directions.model.name, "weights_sha256": directions.model.weights_sha256}
        return out

    def build_vectors(self, prompts: Union[str, Sequence[str]], source: str = FGDILP_INSTANCES, *,
                      chat: bool = False, texts: Optional[Sequence[str]] = None,
                      toxic: Optional[Sequence[bool]] = None, reply_to: Optional[Sequence[str]] = None,
                      labels: Optional[dict] = None, progress=None) -> HeadDirections:
        """Head directions from one source (method.sources; in the spirit of repeng's
        ControlVector.train(method=...)), a HeadDirections to save() and apply later with
        vectors=FILE, or to install as the model's universal directions:

        - "fgdilp-instances": FGDILP's instance prefixes (self-generation, diagnosis, fusion at the
          prompt's end). One prompt (a str): its frozen directions, what fgdilp-frozen steers it
          with; a list: the prompt-end directions averaged over them (universal).
        - "tr-prefixes": TR's prefixes' delta at each prompt's end, averaged over `prompts`.
        - "labelled-text": per head, the mean kqv_out row of the `toxic` texts minus that of the
          others (each averaged over its tokens; docs/method.md §7.6), at the per-head norm of TR's
          delta averaged over `prompts` (so scales compare with the other universal files).

        chat: the prompts are user messages in the model's chat template (directions for chat);
        labelled texts are read as given, or with reply_to (chat only) each as the assistant's
        reply to its user message, averaged over the reply's tokens. labels: how the texts were
        chosen (recorded). progress(i, n): called after each prompt of a list."""
        from .directions import Builder

        return Builder(self.generator, self.settings, self._recorded_settings(),
                       functools.partial(as_user_message, self)).build(
            prompts, source, chat=chat, texts=texts, toxic=toxic, reply_to=reply_to, labels=labels, progress=progress)

    def _recorded_settings(self) -> dict:
        """The settings a built directions file records: the model by file name, not by this
        machine's path (the file's fingerprints identify the model; a shared file leaks no path)."""
        d = self.settings.as_dict()
        if d.get("model"):
            d["model"] = Path(d["model"]).name
        return d

    def export_control_vector(self, vectors: HeadDirections, path: str, exp_norm: float = 0.4,
                              scale: float = 1.0) -> np.ndarray:
        """Write analysis.control_vector(det, ...) as a llama.cpp control-vector GGUF (llama-cli
        --control-vector)."""
        from .method.cvec import save_control_vector

        vec = control_vector(self, vectors, exp_norm, scale)
        save_control_vector(path, vec, self.model.info.architecture)
        return vec

    # ---- control ------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop the running generation (from any thread); its text so far is kept and its
        stop_reason is "cancelled". A cancel() with nothing running does nothing."""
        self.generator.cancel()

    def close(self) -> None:
        self.generator.close()
        self.model.close()

    def __enter__(self) -> "Detoxifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals ----------------------------------------------------------------------------
    def _call(self, prompt: str, s: Settings, method: str, special: bool, explain: bool, on_text=None,
              reset_cancel: bool = True, n_samples: int = 1, stop_at_eog: bool = True,
              chat: bool = False, condition_texts: Optional[list[str]] = None) -> GenResult:
        """chat: a conversation turn, which may keep the KV of the turns before it (kv_reuse);
        anything else prefills afresh, so its result never depends on what ran before.
        special=True on a ChatPrompt (fit_chat's) parses special tokens outside its messages only."""
        if special is True and isinstance(prompt, ChatPrompt):
            special = prompt.special
        self.generator.set_steer(s.steer())
        self.generator.set_fgdilp(s.fgdilp())
        return self.generator.generate(prompt, method, s.n_predict, s.sampling(), n_samples=n_samples,
                                       on_text=on_text, explain=explain, special=special, reset_cancel=reset_cancel,
                                       stop_at_eog=stop_at_eog, instance_reuse=s.instance_reuse, kv_reuse=chat,
                                       condition_texts=condition_texts)


def setting_sources(det: Detoxifier) -> dict[str, tuple[object, str]]:
    """{field: (value, where it came from)} of a Detoxifier's settings: flag, env, config, api,
    profile, default, chat default (`info` prints them)."""
    return {f.name: (getattr(det.settings, f.name), det.sources.get(f.name, "default"))
            for f in dataclasses.fields(Settings)}
