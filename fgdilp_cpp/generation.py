"""Running a method over the engine: unsteered, prompted, and Toxification Reversal (exact).

TR runs P+, P- and P0 as three sequences of one decode per step; the native hook reads the P+/P-
rows and edits the P0 row at every layer before the next layer runs (method.md section 1).
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .engine import Capture, Context, ContextParams, Lockstep, Model, Sampler, SamplingParams
from .engine.context import UNQUANTISED_CACHE
from .errors import FgdilpError
from .method.prefixes import NEG_PREFIX, POS_PREFIX, prefixed
from .native import ERR_NOT_FIRED, EditSpec, HookError, NativeHook

METHODS = ("none", "prompt", "tr")
STEERED = ("tr",)

# TR: sequence (= row) roles in every decode that carries the last positions
POS, NEG, RAW = 0, 1, 2
E_SLOT = 0


@dataclass(frozen=True)
class SteerParams:
    exp_norm: float = 0.4
    exp_sim: float = 0.6
    scale: float = 1.0
    layer_start: int = 0
    layer_end: int = -1          # inclusive; -1 = last layer
    renorm: bool = True

    def check(self, n_layer: int) -> None:
        for name, v in (("exp_norm", self.exp_norm), ("exp_sim", self.exp_sim), ("scale", self.scale)):
            if not np.isfinite(v):
                raise FgdilpError(f"{name} must be a finite number")
        end = n_layer - 1 if self.layer_end < 0 else self.layer_end
        if not 0 <= self.layer_start <= end < n_layer:
            raise FgdilpError(f"--steer-layer-range {self.layer_start} {self.layer_end} is outside "
                              f"the model's layers 0..{n_layer - 1}")


@dataclass
class GenResult:
    text: str
    tokens: list[int]
    method: str
    n_prompt_tokens: int
    stop_reason: str                 # "length", "eog" or "context"
    prefill_s: float
    decode_s: float                  # time of the per-token decode steps
    n_decode_steps: int
    fired_layers: int = 0            # layers the hook fired on in the last steered decode
    logits: list[np.ndarray] = field(default_factory=list)   # per step [n_rows_with_logits, n_vocab]

    @property
    def tokens_per_s(self) -> float:
        return self.n_decode_steps / self.decode_s if self.decode_s > 0 else 0.0


@dataclass(frozen=True)
class EngineParams:
    ctx_size: int = 2048             # tokens per sequence (P0 prompt + generation)
    n_batch: int = 512
    n_threads: int = 0
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: str = "auto"


class Generator:
    """One model; a context per method, created on first use and reused for later prompts."""

    def __init__(self, model: Model, engine: EngineParams = EngineParams(), steer: SteerParams = SteerParams()):
        self.model, self.engine, self.steer = model, engine, steer
        self._ctx: dict[str, Context] = {}
        self._hooks: dict[str, NativeHook] = {}

    # ---- contexts ---------------------------------------------------------------------------
    def _check_steerable(self) -> None:
        info = self.model.info
        if info.n_head <= 0 or info.head_dim <= 0:
            raise FgdilpError(f"architecture '{info.architecture}' has no attention heads (no kqv_out "
                              "node to steer); use --method none")
        if self.engine.type_v not in UNQUANTISED_CACHE:
            raise FgdilpError(f"steering needs an unquantised V cache (f16, bf16 or f32), not "
                              f"{self.engine.type_v}: a quantised V cache rotates kqv_out")
        self.steer.check(info.n_layer)

    def context(self, method: str) -> Context:
        if method in self._ctx:
            return self._ctx[method]
        e, info = self.engine, self.model.info
        n_seq = 3 if method in STEERED else 1
        hook = None
        if method in STEERED:
            self._check_steerable()
            s = self.steer
            hook = NativeHook(info.n_layer, info.n_head, info.head_dim, n_slots=1, exp_norm=s.exp_norm,
                              exp_sim=s.exp_sim, scale=s.scale, layer_start=s.layer_start,
                              layer_end=s.layer_end, renorm=s.renorm)
            self._hooks[method] = hook
        params = ContextParams(n_ctx=e.ctx_size * n_seq, n_batch=e.n_batch, n_seq_max=n_seq,
                               n_outputs_max=n_seq, n_threads=e.n_threads, type_k=e.type_k,
                               type_v=e.type_v, flash_attn=e.flash_attn)
        self._ctx[method] = Context(self.model, params, hook=hook)
        return self._ctx[method]

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

    # ---- sequences --------------------------------------------------------------------------
    def _tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text, add_bos=True)

    def _plan(self, method: str, prompt: str):
        """Sequences, captures and edits of a method; row/sequence RAW (or 0) is the output."""
        if not prompt.strip():
            raise FgdilpError("the prompt is empty")
        raw = self._tokenize(prompt)
        if method == "none":
            return [raw], 0, (), ()
        if method == "prompt":
            return [self._tokenize(POS_PREFIX + prompt)], 0, (), ()
        if method == "tr":
            tb = self.model.token_bytes
            pos = prefixed(self._tokenize, tb, POS_PREFIX, prompt)
            neg = prefixed(self._tokenize, tb, NEG_PREFIX, prompt)
            caps = (Capture(seq=NEG, index=neg.colon_index, slot=E_SLOT),)
            edits = (EditSpec(target=RAW, pos=POS, neg=(NEG,), e_slot=E_SLOT),)
            return [pos.tokens, neg.tokens, raw], RAW, caps, edits
        raise FgdilpError(f"unknown method {method!r} (one of {', '.join(METHODS)})")

    # ---- generation -------------------------------------------------------------------------
    def generate(self, prompt: str, method: str = "none", n_predict: int = 64,
                 sampling: SamplingParams = SamplingParams(),
                 on_text: Optional[Callable[[str], None]] = None,
                 forced_tokens: Optional[list[int]] = None,
                 record_logits: bool = False, logits_all: bool = False,
                 stop_at_eog: bool = True) -> GenResult:
        """Generate a continuation of `prompt` with `method`.

        forced_tokens: append these instead of sampling (teacher forcing, for tests and scoring).
        record_logits: keep a copy of the output logits at every step (row order = sequences);
        logits_all: ask for logits on every sequence's row, not only the output's (tests only);
        stop_at_eog=False keeps going past end-of-generation tokens (benchmarks)."""
        if n_predict < 1:
            raise FgdilpError("-n must be at least 1")
        seqs, out, caps, edits = self._plan(method, prompt)
        limit = self.engine.ctx_size
        longest = max(len(s) for s in seqs)
        if len(seqs[out]) >= limit:
            raise FgdilpError(f"the prompt is {len(seqs[out])} tokens, longer than the context (-c {limit})")
        if longest >= limit:
            raise FgdilpError(f"the prompt with its steering prefix is {longest} tokens, longer than the "
                              f"context (-c {limit})")
        ctx = self.context(method)
        ctx.clear()
        try:
            return self._run(ctx, seqs, out, caps, edits, method, n_predict, sampling, on_text,
                             forced_tokens, record_logits, logits_all, stop_at_eog)
        except HookError as exc:
            hint = " (its graph lacks kqv_out-<layer> nodes)" if exc.code == ERR_NOT_FIRED else ""
            raise FgdilpError(f"cannot steer this model (architecture '{self.model.info.architecture}'): "
                              f"{exc}{hint}") from None

    def _run(self, ctx, seqs, out, caps, edits, method, n_predict, sampling, on_text, forced_tokens,
             record_logits, logits_all, stop_at_eog) -> GenResult:
        limit = self.engine.ctx_size
        want = list(range(len(seqs))) if logits_all else [out]
        sampler = Sampler(sampling) if forced_tokens is None else None
        lock = Lockstep(ctx, seqs, want_logits=want)
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        tokens: list[int] = []
        logits: list[np.ndarray] = []
        pieces: list[str] = []
        stop = "length"
        try:
            t0 = time.perf_counter()
            lock.prefill(caps, edits)
            t1 = time.perf_counter()
            n_steps = 0
            while True:
                if record_logits:
                    logits.append(np.stack([lock.logits(s).copy() for s in want]))
                if forced_tokens is not None:
                    if len(tokens) >= len(forced_tokens):
                        break
                    tok = forced_tokens[len(tokens)]
                else:
                    tok = sampler.sample(ctx, out)
                    if stop_at_eog and self.model.is_eog(tok):
                        stop = "eog"
                        break
                tokens.append(tok)
                piece = dec.decode(self.model.token_bytes(tok))
                if piece:
                    pieces.append(piece)
                    if on_text is not None:
                        on_text(piece)
                if len(tokens) >= n_predict and forced_tokens is None:
                    break
                if max(lock.lengths) >= limit:
                    stop = "context"
                    break
                lock.step(tok, edits)
                n_steps += 1
            t2 = time.perf_counter()
            tail = dec.decode(b"", final=True)
            if tail:
                pieces.append(tail)
                if on_text is not None:
                    on_text(tail)
        finally:
            lock.close()
            if sampler is not None:
                sampler.close()
        hook = ctx.hook
        return GenResult(text="".join(pieces), tokens=tokens, method=method, n_prompt_tokens=len(seqs[out]),
                         stop_reason=stop, prefill_s=t1 - t0, decode_s=t2 - t1, n_decode_steps=n_steps,
                         fired_layers=hook.fired_layers if hook is not None else 0, logits=logits)


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
