"""Running a method over the engine: unsteered, prompted, TR, FGDILP (exact / frozen) and saved vectors.

Steered methods run their prefixed sequences beside the raw one: in exact modes all of them are
sequences of one decode per step and the native hook reads the prefixed rows and edits the raw
row at every layer before the next layer runs (docs/method.md §2-3). Several samples of one
prompt share its prefill (KV sequence copy) and advance together.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Optional

import numpy as np

from . import methods
from .condition import prompt_condition
from .instance_cache import ConversationInstances
from .decode import CancelState, run_plan
from .engine import Capture, Context, ContextParams, Lockstep, Model
from .engine.context import UNQUANTISED_CACHE
from .errors import Cancelled, ContextLengthError, FgdilpError, ParamError
from .kv_memory import MIB, Need, bytes_per_cell, machine_budget_mib, plan_cells
from .method_contexts import SETUP, MethodContexts
from .method.sources import FGDILP_INSTANCES
from .method.vectors import HeadDirections, ModelIdentity
from .native import ERR_NOT_FIRED, HookError, NativeHook
from .params import INSTANCE_REUSE, EngineParams, FgdilpParams, SamplingParams, SteerParams
from .plans import Plan, PlanRequest, build_instance, frozen_directions
from .runtime import CallValues, Runtime
from .profiles import find_universal, universal_path_for
from .results import GenResult, Sample

__all__ = ["EngineParams", "FgdilpParams", "GenResult", "Generator", "Sample", "SamplingParams", "SteerParams"]

CONTEXT_SHAPING = ("samples", "selfgen_tokens", "negatives")   # FgdilpParams that size contexts (context())


class Generator(MethodContexts):
    """One model; a context per method, created on first use and reused for later prompts."""

    def __init__(self, model: Model, engine: EngineParams = EngineParams(), steer: SteerParams = SteerParams(),
                 fgdilp: FgdilpParams = FgdilpParams(), vectors: Optional[HeadDirections] = None,
                 reuse_instances: bool = False, kv_budget_mib: int = 0,
                 self_diagnosis_auc: Optional[float] = None, scorer_auc: Optional[float] = None):
        """reuse_instances: keep the last prompt's FGDILP setup (samples, diagnosis, prefixes) so
        that fgdilp and fgdilp-frozen on the same prompt and seed share it (evaluation).
        kv_budget_mib: the KV bytes all contexts together may hold (0: from the machine's memory).
        self_diagnosis_auc, scorer_auc: the diagnosers' measured AUCs (a model profile's), which
        --diagnoser auto decides by."""
        self.model, self.engine = model, engine
        self._universal: Optional[HeadDirections] = None
        # the values in force (set_steer, set_fgdilp); each call hands them down as its CallValues
        self._steer, self._fgdilp = steer, fgdilp
        self.rt = Runtime(model, vectors, self.context, reuse_instances,
                          self_diagnosis_auc=self_diagnosis_auc, scorer_auc=scorer_auc,
                          universal=self.universal_directions)
        self._cancel = CancelState()
        self._ctx: dict[str, Context] = {}
        self._hooks: dict[str, NativeHook] = {}
        # FGDILP's instances of instance_reuse="conversation": per method (its contexts keep that
        # conversation's KV), one per conversation whose KV is kept
        self._conversations: dict[str, ConversationInstances] = {}
        # KV memory (kv_memory): what the call in progress needs, when each context was last used,
        # and the contexts this call uses (never dropped for another of its own)
        self._cell_bytes = bytes_per_cell(model, engine.type_k, engine.type_v)
        weights = os.path.getsize(model.info.path) if os.path.exists(model.info.path) else 0
        self.kv_budget = (kv_budget_mib or machine_budget_mib(weights)) * MIB
        self._need: Optional[Need] = None        # None: no call in progress (any call's upper bound)
        self._used: dict[str, int] = {}
        self._clock = 0
        self._last_use_s: dict[str, float] = {}     # time.monotonic() of each context's last use (drop_idle)
        self._in_call: set[str] = set()
        if vectors is not None:
            vectors.check_model(identity_of(model))

    def universal_directions(self) -> HeadDirections:
        """The model's universal directions (method universal): the file find_universal
        names for its fingerprint, loaded and checked against the model once."""
        if self._universal is None:
            path = find_universal(self.model.fingerprint()["weights_sha256"], family=self.model.family_fingerprint,
                                  bits_per_weight=self.model.bits_per_weight())
            if path is None:
                raise FgdilpError(f"no universal directions for this model (method {methods.UNIVERSAL}): build them "
                                  "with `fgdilp-cpp vectors build --prompts rtp-toxic --limit 96 --from fgdilp "
                                  "--diagnoser scorer --install`, or apply a file with --vectors")
            v = HeadDirections.load(path)
            identity = identity_of(self.model)
            if path.name not in (universal_path_for(identity.weights_sha256).name,
                                 universal_path_for(v.model.weights_sha256).name):
                raise FgdilpError(f"{path} holds directions of weights {v.model.weights_sha256[:12]}, not the ones its "
                                  "name says: rebuild it with `fgdilp-cpp vectors build`")
            if path.name != universal_path_for(identity.weights_sha256).name:
                # lent by another quantisation of these weights (find_universal matched the family
                # fingerprint of its profile): shape and vocabulary must still be the same
                identity = dataclasses.replace(identity, weights_sha256=v.model.weights_sha256)
            v.check_model(identity)
            self._universal = v
        return self._universal

    def use_universal(self, directions: HeadDirections) -> None:
        """Method universal applies `directions` instead of the model's installed file (benchmarks
        and tests stand in random directions for a model that has none)."""
        directions.check_model(identity_of(self.model))
        self._universal = directions

    @property
    def steer(self) -> SteerParams:
        return self._steer

    @property
    def fgdilp(self) -> FgdilpParams:
        return self._fgdilp

    def call_values(self, kv_reuse: bool = False) -> CallValues:
        """The values in force as one call's (kv_reuse: where the engine keeps KV between calls)."""
        return CallValues(self._steer, self._fgdilp, self.engine.kv_reuse and kv_reuse)

    @property
    def vectors(self) -> Optional[HeadDirections]:
        return self.rt.vectors

    @property
    def reuse_instances(self) -> bool:
        return self.rt.reuse_instances

    @reuse_instances.setter
    def reuse_instances(self, on: bool) -> None:
        self.rt.reuse_instances = on

    # ---- methods and contexts -----------------------------------------------------------------
    def resolve(self, name: str) -> methods.Method:
        """The registry entry that runs for `name` here: with a vectors file loaded, a method that
        has a saved-vectors form runs it."""
        spec = methods.get(name)
        if self.vectors is not None and spec.with_vectors:
            spec = methods.get(spec.with_vectors)
        if spec.saved_vectors and self.vectors is None:
            raise FgdilpError(f"method {spec.name!r} needs a vectors file")
        return spec

    def _check_steerable(self, spec: methods.Method) -> None:
        info = self.model.info
        if info.n_head <= 0 or info.head_dim <= 0:
            raise FgdilpError(f"architecture '{info.architecture}' has no attention heads (no kqv_out "
                              "node to steer); use method none")
        if self.engine.type_v not in UNQUANTISED_CACHE:
            raise FgdilpError(f"steering needs an unquantised V cache (f16, bf16 or f32), not "
                              f"{self.engine.type_v}: a quantised V cache rotates kqv_out")
        self.steer.check(info.n_layer)
        if spec.instance:
            self.fgdilp.check()

    def conversation(self, method: str) -> ConversationInstances:
        """The instances `method` keeps per conversation (instance_reuse = "conversation")."""
        if method not in self._conversations:
            e = self.engine
            self._conversations[method] = ConversationInstances(e.kv_conversations if e.kv_reuse else 1)
        return self._conversations[method]

    def set_steer(self, steer: SteerParams) -> None:
        """Steering values for the following generations: applied to the hooks made so far
        (exponents, renormalisation, per-layer scales, edit rule, gate); later hooks are made with them."""
        if steer == self.steer:
            return
        steer.check(self.model.info.n_layer)
        scales = steer.scale * steer.layer_mask(self.model.info.n_layer)
        for hook in self._hooks.values():
            hook.set_exponents(steer.exp_norm, steer.exp_sim, steer.renorm)
            hook.set_layer_scales(scales)
            hook.set_edit_rule(steer.edit)
            hook.set_gate(steer.gate)
        self._steer = steer

    def set_fgdilp(self, fgdilp: FgdilpParams) -> None:
        """FGDILP values for the following generations: the fusion of the negatives (mask-k, merge,
        sign election) goes to the hooks that fuse; the per-prompt setup follows the new values
        (its memo is keyed by them). The values that size contexts (CONTEXT_SHAPING) cannot change."""
        if fgdilp == self.fgdilp:
            return
        fgdilp.check()
        fixed = [f for f in CONTEXT_SHAPING if getattr(fgdilp, f) != getattr(self.fgdilp, f)]
        if fixed:
            raise FgdilpError(f"{', '.join(fixed)} size the model's contexts: they cannot change per call")
        for name, hook in self._hooks.items():
            if methods.get(name).fusion:
                hook.set_fusion(fgdilp.mask_k, fgdilp.fusion, fgdilp.sign_election, fgdilp.norm_to_mean_delta)
        self._fgdilp = fgdilp

    def prefix_room(self, method: str) -> int:
        """Tokens that a method's steering prefixes add in front of a prompt (an upper bound)."""
        return self.resolve(method).room(self.rt, self.fgdilp)

    @property
    def cancelled(self) -> bool:
        """cancel() was called (or a decode was aborted) since the last reset_cancel()."""
        return self._cancel.cancelled

    def reset_cancel(self) -> None:
        """Forget an earlier cancel(): the next generation runs (call before starting one)."""
        self._cancel.reset()
        for c in self._ctx.values():
            c.reset_abort()

    def cancel(self) -> None:
        """Stop the generation running in another thread: the current decode is aborted (llama.cpp's
        abort callback, checked between graph nodes) and no further token is drawn. The result
        keeps the text so far, with stop_reason "cancelled"."""
        self._cancel.note_cancelled()
        for c in list(self._ctx.values()):
            c.request_abort()

    def close(self) -> None:
        for c in self._ctx.values():
            c.close()
        for h in self._hooks.values():
            h.close()
        self._ctx.clear()
        self._hooks.clear()

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def build_vectors(self, prompt: str, sampling: SamplingParams, settings: dict,
                      special: bool = False) -> HeadDirections:
        """Frozen FGDILP head directions for `prompt` (special: chat-formatted), as a saved-artifact
        value: the fused direction fgdilp-frozen captures at the prompt's end, from its instance."""
        if not prompt.strip():
            raise FgdilpError("the prompt is empty")
        ctx = self.context(methods.FROZEN)
        values = self.call_values()
        sel, _ = build_instance(self.rt, values, prompt, self.model.tokenize(prompt, special=special), sampling)
        rows, e = frozen_directions(self.rt, values, ctx, prompt, sel, special)
        i = self.model.info
        shape = (i.n_layer, i.n_head, i.head_dim)
        return HeadDirections(directions=rows.reshape(shape), e=e.reshape(shape), model=identity_of(self.model),
                              source=FGDILP_INSTANCES, settings={**settings, "prompt": prompt}).validate()

    def self_diagnosis(self, texts: list[str]) -> np.ndarray:
        """[len(texts), 6] the model's own P(yes) per attribute (docs/method.md §4.2)."""
        return self.rt.self_diagnoser().scores(self.context(SETUP), texts)

    # ---- generation -------------------------------------------------------------------------
    def generate(self, prompt: str, method: str = "none", n_predict: int = 64,
                 sampling: SamplingParams = SamplingParams(), n_samples: int = 1,
                 on_text: Optional[Callable[[str], None]] = None,
                 forced_tokens: Optional[list[int]] = None,
                 record_logits: bool = False, logits_all: bool = False,
                 stop_at_eog: bool = True, explain: bool = False, prefixes=None, special: bool = False,
                 reset_cancel: bool = True, instance_reuse: str = "turn",
                 kv_reuse: Optional[bool] = None, condition_texts: Optional[list[str]] = None) -> GenResult:
        """Generate n_samples continuations of `prompt` with `method` (sample i uses seed + i).

        on_text: streamed pieces of sample 0. forced_tokens: append these instead of sampling
        (teacher forcing, one sample). record_logits: keep a copy of the output logits at every
        step; logits_all: logits on every role's row (tests). stop_at_eog=False keeps going past
        end-of-generation tokens (benchmarks). explain: fill GenResult.explain.
        prefixes: a method.prefixes.Selection to use instead of self-generation and diagnosis.
        special: parse special-token text in the prompt (chat templates). reset_cancel=False keeps a
        cancel() that came before this call (the caller reset it with reset_cancel()).
        instance_reuse: "turn" builds FGDILP's instance for every prompt; "conversation" keeps the
        one built for an earlier prompt that this prompt extends (instance_cache.py).
        kv_reuse: keep the KV cells an earlier run left for the common prefix (chat turns; None =
        the engine's kv_reuse). Reused and fresh prefills agree to float rounding, not bit for bit,
        so runs that must not depend on what ran before (evaluation, generate) pass False.
        condition_texts: what the prompt-level condition (SteerParams.condition) reads instead of
        the prompt (a chat: its messages, not the template around them)."""
        if n_predict < 1:
            raise ParamError("n_predict", "must be at least 1")
        if instance_reuse not in INSTANCE_REUSE:
            raise ParamError("instance_reuse", f"must be one of {', '.join(INSTANCE_REUSE)}, not {instance_reuse!r}")
        if not 1 <= n_samples <= self.engine.max_samples:
            raise FgdilpError(f"n_samples must be in 1..{self.engine.max_samples}")
        spec = self.resolve(method)
        method = spec.name
        values = self.call_values(kv_reuse is None or kv_reuse)
        if not prompt.strip():
            raise FgdilpError("the prompt is empty")
        if reset_cancel:
            self.reset_cancel()
        condition = None
        ctx_name = spec.name     # an unsteered turn of a conditioned method runs in the method's own context
        if spec.heads and values.steer.condition is not None:
            self._check_steerable(spec)                   # refused as steering, even where the condition would not steer
            condition = prompt_condition(self.rt, values.steer.condition,
                                         [prompt] if condition_texts is None else condition_texts)
            if not condition["steered"]:                  # this prompt runs unsteered, as method none
                spec = self.resolve(methods.UNSTEERED)   # (in ctx_name's context: one conversation's KV, one context)
        raw = self.model.tokenize(prompt, special=special)
        self._in_call = set()
        self._need = Need(prompt=len(raw), reply=n_predict, samples=n_samples, contrast=values.steer.contrast,
                          kv_reuse=values.kv_reuse)
        try:
            return self._generate(spec, values, method, prompt, raw, n_predict, sampling, n_samples, on_text, forced_tokens,
                                  record_logits, logits_all, stop_at_eog, explain, prefixes, special,
                                  instance_reuse, condition, ctx_name)
        finally:
            now = time.monotonic()
            for name in self._in_call:
                self._last_use_s[name] = now
            self._need, self._in_call = None, set()

    def _generate(self, spec, values: CallValues, method, prompt, raw, n_predict, sampling, n_samples, on_text, forced_tokens,
                  record_logits, logits_all, stop_at_eog, explain, prefixes, special, instance_reuse,
                  condition, ctx_name: str) -> GenResult:
        ctx = self.context(ctx_name)        # refuses unsteerable models before any setup work
        if len(raw) >= self.engine.ctx_size:  # before any setup work (with prefixes: _check_prefixed)
            raise ContextLengthError(f"the prompt is {len(raw)} tokens, longer than the context "
                                     f"({self.engine.ctx_size} tokens)")
        try:
            t0 = time.perf_counter()
            instance_info = None
            setup_sampling = sampling.unconstrained()     # a grammar or penalties act on the reply only
            try:
                if spec.instance and prefixes is None and instance_reuse == "conversation":
                    prefixes, instance_info = self.conversation(method).get(self.rt, values, prompt, raw,
                                                                            setup_sampling, method)
                plan = spec.plan_builder()(self.rt, PlanRequest(method, prompt, raw, setup_sampling, values, explain,
                                                                special, prefixes))
                if instance_info is not None:
                    plan.explain.update(instance_info)
            except Cancelled:            # stopped during FGDILP's setup: nothing generated yet
                return GenResult([Sample("", [], "cancelled") for _ in range(n_samples)], method, len(raw),
                                 time.perf_counter() - t0, 0.0, 0.0, 0)
            setup = time.perf_counter() - t0
            self._check_prefixed(plan)
            twin = values.kv_reuse and plan.cvec is None and n_samples == 1 and \
                plan.out_role in {e.target for e in plan.edits}
            ctx.make_room(plan_cells([len(s) for s in plan.sequences], n_predict, self.engine.ctx_size, n_samples,
                                     twin))      # the estimate made before the plan fell short: grow
            res = run_plan(self.model, self.engine.ctx_size, self._cancel, values.kv_reuse, ctx, plan, method,
                           n_predict, sampling, n_samples, on_text, forced_tokens, record_logits, logits_all,
                           stop_at_eog, setup)
            if condition is not None:       # always: eval and the server tell which prompts were steered
                res.explain["condition"] = condition
            if explain and plan.edits and ctx.hook is not None:   # the edit rule, and how much the gate let through
                s = values.steer
                res.explain["edit"] = {"rule": s.edit, "gate": s.gate, "contrast": s.contrast,
                                       "heads_edited_share": ctx.hook.heads_edited_share}
            return res
        except HookError as exc:
            hint = " (its graph lacks kqv_out-<layer> nodes)" if exc.code == ERR_NOT_FIRED else ""
            raise FgdilpError(f"cannot steer this model (architecture '{self.model.info.architecture}'): "
                              f"{exc}{hint}") from None

    def _check_prefixed(self, plan: Plan) -> None:
        """The raw prompt fits (checked before the plan); its prefixed sequences must fit too."""
        limit = self.engine.ctx_size
        longest = max(len(s) for s in plan.sequences)
        if longest >= limit:
            raise ContextLengthError(f"the prompt with its steering prefix is {longest} tokens, longer than "
                                     f"the context ({limit} tokens)")

def open_generator(model: Model, settings, vectors_path: Optional[str] = None,
                   diagnosis: Optional[dict] = None, **engine_over) -> Generator:
    """A Generator of `model` with the engine, steering and FGDILP values of `settings` (a
    Settings) and optional saved vectors. diagnosis: a model profile's measured diagnosis
    ("self_auc", "scorer_auc"), which --diagnoser auto decides by."""
    vectors = HeadDirections.load(vectors_path) if vectors_path else None
    diagnosis = diagnosis or {}
    return Generator(model, settings.engine(**engine_over), settings.steer(), settings.fgdilp(), vectors=vectors,
                     kv_budget_mib=settings.kv_budget_mib, self_diagnosis_auc=diagnosis.get("self_auc"),
                     scorer_auc=diagnosis.get("scorer_auc"))


def identity_of(model: Model) -> ModelIdentity:
    """The model identity that saved vectors are checked against."""
    i = model.info
    return ModelIdentity(architecture=i.architecture, n_layer=i.n_layer, n_head=i.n_head, head_dim=i.head_dim,
                         n_embd=i.n_embd, n_vocab=i.n_vocab, name=model.meta("general.name") or "",
                         **model.fingerprint())


def probe_kqv_out(model: Model, n_threads: int = 0) -> int:
    """Decode one token with a capture planned on every layer; returns the layers whose kqv_out
    fired (0 when the architecture has no attention heads or no such node)."""
    info = model.info
    if info.n_head <= 0 or info.head_dim <= 0:
        return 0
    with NativeHook(info.n_layer, info.n_head, info.head_dim, n_slots=1) as hook, \
            Context(model, ContextParams(n_ctx=64, n_batch=8, n_threads=n_threads), hook=hook) as ctx:
        lock = Lockstep(ctx, [[model.bos if model.bos >= 0 else 0]], want_logits=[0])
        try:
            lock.prefill([Capture(seq=0, index=0, slot=0)])
        except HookError:
            pass
        finally:
            lock.close()
        return hook.fired_layers
