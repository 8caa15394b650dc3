"""A Generator's contexts: one per method (and FGDILP's setup), made on first use with the KV cells
the call in progress needs (kv_memory), grown for a longer one, and dropped least recently used
first when the KV budget needs room for another.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Optional

from . import methods
from .engine import Context, ContextParams
from .errors import FgdilpError
from .kv_memory import Need, evictions, method_cells, padded, setup_cells
from .native import NativeHook
from .params import MAX_SEQUENCES as MAX_SEQ      # llama.cpp's LLAMA_MAX_SEQ
from .plans import N_SLOTS

if TYPE_CHECKING:
    from .decode import CancelState
    from .engine import Model
    from .params import EngineParams, FgdilpParams, SteerParams
    from .runtime import Runtime

SETUP = "setup"  # the context of FGDILP's self-generation and self-diagnosis (not a method)


class MethodContexts:
    """Mixed into generation.Generator: its model, engine, steering and FGDILP values, hooks,
    contexts (_ctx), KV budget and last-use counters live there."""

    # what the host (generation.Generator) provides
    model: Model
    engine: EngineParams
    rt: Runtime
    kv_budget: int
    _ctx: dict[str, Context]
    _hooks: dict[str, NativeHook]
    _cancel: CancelState
    _cell_bytes: int
    _need: Optional[Need]
    _used: dict[str, int]
    _clock: int
    _last_use_s: dict[str, float]
    _in_call: set[str]

    if TYPE_CHECKING:
        @property
        def steer(self) -> SteerParams: ...

        @property
        def fgdilp(self) -> FgdilpParams: ...

        def resolve(self, name: str) -> methods.Method: ...

        def _check_steerable(self, spec: methods.Method) -> None: ...

    def context(self, name: str) -> Context:
        """The context of a method (SETUP: FGDILP's self-generation and diagnosis), made on first use
        and grown to the cells the call in progress needs (kv_memory), within the KV budget."""
        cells = self._cells(name, self._need or self._full_need())
        ctx = self._ctx.get(name)
        if ctx is None:
            ctx = self._open_context(name, cells)
        else:
            ctx.make_room(cells)
        self._clock += 1
        self._used[name] = self._clock
        self._last_use_s[name] = time.monotonic()
        self._in_call.add(name)
        return ctx

    def _n_seq(self, name: str) -> int:
        e = self.engine
        if name == SETUP:
            return max(self.fgdilp.samples, 24)
        spec = methods.get(name)
        roles = spec.n_roles(self.fgdilp)
        # exact methods run their roles per sample; the others capture once, then P0 per sample
        n_seq = roles * e.max_samples if spec.exact else max(roles, e.max_samples)
        n_seq += (e.kv_reuse and spec.hook) + (e.kv_reuse and not spec.exact and roles > 1)  # twin, capture
        if e.kv_reuse and spec.instance:    # the candidates fork the conversation here (plans.selfgen_context)
            n_seq = max(n_seq, self.fgdilp.samples)
        if n_seq > MAX_SEQ:
            raise FgdilpError(f"{name} with {e.max_samples} samples needs {n_seq} sequences; llama.cpp "
                              f"allows {MAX_SEQ}")
        return n_seq

    def _conversations_kept(self, n_seq: int) -> int:
        """Conversations whose KV a context keeps (serve): room for each one's sequences and cells."""
        e = self.engine
        return max(1, min(e.kv_conversations, MAX_SEQ // n_seq)) if e.kv_reuse else 1

    def _cells(self, name: str, need: Need) -> int:
        """KV cells of a method's context for `need` (kv_memory; at least one batch: llama.cpp caps
        a batch at the context's cells, and another batch size changes the prefill's rounding)."""
        e, f = self.engine, self.fgdilp
        if name == SETUP:
            cells = setup_cells(e, f, need)
        else:
            spec = methods.get(name)
            cells = method_cells(spec, e, f, spec.room(self.rt, f), need)
        n_seq = self._n_seq(name)
        return padded(max(cells, e.n_batch, n_seq) * self._conversations_kept(n_seq))

    def _open_context(self, name: str, cells: int) -> Context:
        e, info, hook = self.engine, self.model.info, self._hooks.get(name)
        n_seq = self._n_seq(name)
        spec = None if name == SETUP else methods.get(name)
        if spec is not None and spec.heads:
            self._check_steerable(spec)
        if spec is not None and spec.hook and hook is None:
            s = self.steer
            hook = NativeHook(info.n_layer, info.n_head, info.head_dim, n_slots=N_SLOTS, exp_norm=s.exp_norm,
                              exp_sim=s.exp_sim, scale=s.scale, layer_start=s.layer_start,
                              layer_end=s.layer_end, renorm=s.renorm)
            self._hooks[name] = hook
            hook.set_edit_rule(s.edit)
            hook.set_gate(s.gate)
            if spec.fusion:
                f = self.fgdilp
                hook.set_fusion(f.mask_k, f.fusion, f.sign_election, f.norm_to_mean_delta)
        self._admit(name, cells)
        convs = self._conversations_kept(n_seq)
        params = ContextParams(n_ctx=cells, n_batch=max(e.n_batch, n_seq), n_seq_max=n_seq * convs,
                               n_outputs_max=n_seq * convs, n_threads=e.n_threads, type_k=e.type_k,
                               type_v=e.type_v, flash_attn=e.flash_attn, kv_reuse=e.kv_reuse,
                               kv_conversations=convs, prefill_rows=e.n_batch)
        self._ctx[name] = ctx = Context(self.model, params, hook=hook)
        ctx.grow = lambda want: self._grow(name, want)
        if self._cancel.cancelled:       # cancel() came while this context did not exist yet
            ctx.request_abort()
        return ctx

    def _grow(self, name: str, want: int) -> None:
        """More cells for a context: twice what it had where the budget allows (a conversation
        grows turn by turn; each growth moves its KV), at least `want`, at most its upper bound."""
        ctx = self._ctx[name]
        want = padded(want)
        roomy = max(want, min(2 * ctx.n_ctx, self._cells(name, self._full_need())))
        cells = roomy if self._fits(name, roomy) else want
        self._admit(name, cells)
        try:
            ctx.resize(cells)
        except FgdilpError:
            self._ctx.pop(name, None)
            raise

    def _full_need(self) -> Need:
        """What any call of this engine may need: a prompt of the whole context, max_new reply tokens."""
        return Need(prompt=self.engine.ctx_size, reply=self.engine.max_new, contrast=self.steer.contrast)

    def drop_idle(self, max_idle_s: float, now: Optional[float] = None) -> list[str]:
        """Close the contexts unused for more than max_idle_s seconds (none of a call in progress;
        call it from the thread that generates): their KV is freed, their hooks and FGDILP
        instances are kept, and their method's next call makes them again. Returns their names."""
        now = time.monotonic() if now is None else now
        idle = [n for n in self._ctx if n not in self._in_call and now - self._last_use_s.get(n, now) > max_idle_s]
        for name in idle:
            self._ctx.pop(name).close()
        return idle

    def cells(self, name: str) -> int:
        """KV cells of a context as it is (0 when it does not exist); context() would grow it."""
        return self._ctx[name].n_ctx if name in self._ctx else 0

    def kv_bytes(self, name: Optional[str] = None) -> int:
        """KV bytes of one context (0 if it does not exist), or of all of them."""
        names = list(self._ctx) if name is None else [name] if name in self._ctx else []
        return sum(self._ctx[n].n_ctx for n in names) * self._cell_bytes

    def _fits(self, name: str, cells: int) -> bool:
        return self.kv_bytes() - self.kv_bytes(name) + cells * self._cell_bytes <= self.kv_budget

    def fits_beside(self, method: str, prompt: str, n_predict: int, contrast: str) -> bool:
        """Whether `method`'s contexts for this prompt fit the budget beside the contexts that exist
        (serve's warm-up makes none that would drop another)."""
        need = Need(prompt=len(self.model.tokenize(prompt)), reply=n_predict, contrast=contrast)
        spec = self.resolve(method)
        names = [spec.name] + ([SETUP] if spec.instance else [])
        want = sum(self._cells(n, need) for n in names if n not in self._ctx) * self._cell_bytes
        return self.kv_bytes() + want <= self.kv_budget

    def _admit(self, name: str, cells: int) -> None:
        """Room in the budget for `cells` of context `name`: the least recently used other contexts
        are dropped (those of the call in progress stay); KvBudgetError when that is not enough."""
        want = cells * self._cell_bytes
        for victim in evictions({n: self.kv_bytes(n) for n in self._ctx}, self._used, name, want,
                                self.kv_budget, self._in_call):
            self._ctx.pop(victim).close()
