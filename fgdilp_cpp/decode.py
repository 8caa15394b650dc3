"""The decode loop of one plan: prefill its sequences (sharing the prompt between samples), then
step every active sample, sampling (or forcing) a token for its output role, until each stops."""

from __future__ import annotations

import codecs
import time
from dataclasses import replace
import numpy as np

from .engine import Context, Lockstep, Model, Sampler
from .errors import Cancelled
from .params import SamplingParams
from .plans import Plan
from .results import GenResult, Sample


class CancelState:
    """Whether the generation in progress was cancelled: by cancel() from any thread, or by the
    decode loop when llama.cpp aborted a decode. A plain flag: a bool is read and written atomically."""

    def __init__(self) -> None:
        self._cancelled = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def note_cancelled(self) -> None:
        """No further token is drawn (until reset())."""
        self._cancelled = True

    def reset(self) -> None:
        self._cancelled = False


def run_plan(model: Model, ctx_size: int, cancel: CancelState, kv_reuse: bool, ctx: Context, plan: Plan, method: str,
             n_predict: int, sampling: SamplingParams, n_samples: int, on_text, forced_tokens, record_logits: bool,
             logits_all: bool, stop_at_eog: bool, setup_s: float) -> GenResult:
    """Prefill a plan's sequences, then draw n_samples continuations of its output role, one token
    per step for every active sample (Generator.generate's arguments). ctx_size: the engine's
    context limit per sequence; cancel: stops the loop when set, and is set when a decode aborts;
    kv_reuse: the call may keep the KV cells an earlier run left (chat turns)."""
    limit = ctx_size
    out = plan.out_role
    want = list(range(len(plan.sequences))) if logits_all else [out]
    samplers = [] if forced_tokens is not None else [
        Sampler(replace(sampling, seed=(sampling.seed + g) % 2**32), model.vocab, model.info.n_vocab)
        for g in range(n_samples)]
    # KV reuse (docs/method.md §9): the cells of the last run's sequences keep the common prefix;
    # a control vector changes every token's KV, so its runs start from an empty context
    reuse = kv_reuse and plan.cvec is None
    if not reuse:
        ctx.clear()
    if ctx.hook is not None:
        ctx.hook.reset_totals()
        plan.install(ctx.hook)
    edited = {e.target for e in plan.edits}
    lock = Lockstep(ctx, plan.sequences, want_logits=want, n_groups=n_samples, first_seq=plan.first_seq,
                    reuse=reuse, twin=out if out in edited else None)
    decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(n_samples)]
    samples = [Sample("", [], "length") for _ in range(n_samples)]
    pieces: list[list[str]] = [[] for _ in range(n_samples)]
    logits: list[np.ndarray] = []
    n_steps = 0

    def emit(g: int, piece: str) -> None:
        if piece:
            pieces[g].append(piece)
            if g == 0 and on_text is not None:
                on_text(piece)

    try:
        t0 = time.perf_counter()
        if plan.cvec is not None:
            ctx.set_cvec(plan.cvec)
        try:
            lock.prefill(plan.captures, plan.edits,
                         before_last=(lambda: plan.before_last(ctx.hook)) if plan.has_before_last else None)
        except Cancelled:
            cancel.note_cancelled()
        t1 = time.perf_counter()
        if ctx.hook is not None and not cancel.cancelled:
            plan.after_prefill(ctx.hook)
        while not cancel.cancelled:
            if record_logits:
                logits.append(np.stack([lock.logits(lock.active[0], r).copy() for r in want]))
            toks, done = [], []
            for g in lock.active:
                s = samples[g]
                if forced_tokens is not None:
                    if len(s.tokens) >= len(forced_tokens):
                        done.append(g)
                        continue
                    tok = forced_tokens[len(s.tokens)]
                else:
                    tok = samplers[g].sample(ctx, lock.row(g, out))
                    if stop_at_eog and model.is_eog(tok):
                        s.stop_reason = "eog"
                        done.append(g)
                        continue
                s.tokens.append(tok)
                emit(g, decoders[g].decode(model.token_bytes(tok)))
                if forced_tokens is None and len(s.tokens) >= n_predict:
                    done.append(g)
                elif max(lock.lengths) >= limit:
                    s.stop_reason = "context"
                    done.append(g)
                else:
                    toks.append(tok)
            for g in done:
                lock.deactivate(g)
            if not lock.active or cancel.cancelled:
                break
            try:
                lock.step(toks, plan.edits)
            except Cancelled:
                break
            n_steps += 1
        if cancel.cancelled:
            for g in lock.active:
                samples[g].stop_reason = "cancelled"
        else:
            lock.record(edited_roles=edited)
        t2 = time.perf_counter()
    finally:
        lock.close()
        for sm in samplers:
            sm.close()
        if plan.cvec is not None:
            ctx.set_cvec(None)
    for g, s in enumerate(samples):
        # bytes still held are the start of a character the last token left incomplete (a reply
        # cut by -n or a stop): dropped, not emitted as U+FFFD (invalid bytes were replaced already)
        s.text = "".join(pieces[g])
    hook = ctx.hook
    return GenResult(samples=samples, method=method, n_prompt_tokens=len(plan.sequences[out]),
                     setup_s=setup_s, prefill_s=t1 - t0, decode_s=t2 - t1, n_decode_steps=n_steps,
                     n_reused_tokens=lock.reused[out],
                     fired_layers=hook.fired_layers if hook is not None else 0,
                     explain=plan.explain, logits=logits)
