"""Teacher-forced log-likelihood of continuations under fixed-direction steering, with no sampling.

A fixed direction (saved or universal directions, the random control) edits each row from its
own values alone (docs/method.md §2.2: λ_sim and the renormalisation read that row), and during
generation the rows it edits are P0's last prompt token and every generated token. Scoring a
known continuation therefore needs no step-by-step decode: the prompt and the continuation go in
one batch, and exactly the rows that predict a continuation token (the last prompt token and the
continuation's tokens but the last) are edited. Causal attention makes that the KV and logits a
step-by-step steered generation of those tokens would have had (tests/test_autosetup.py holds it
against Generator.generate with forced tokens).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..engine import Model
from ..errors import FgdilpError
from ..evaluation.perplexity import PerplexityJudge
from ..native import EditSpec, NativeHook

SLOT_DIR, SLOT_E = 0, 1


class SteeredNLL(PerplexityJudge):
    """nll_many / ppl_many of (prompt, continuation) pairs, steered by set_direction(): the rows
    that predict continuation tokens are edited with the direction (every layer of `scales` > 0);
    unsteered while no direction is set (then equal to PerplexityJudge on the same model).

        with SteeredNLL(model) as judge:
            base = judge.nll_many(pairs)
            judge.set_direction(rows, e, layer_scales)
            steered = judge.nll_many(pairs)
    """

    def __init__(self, model: Model, n_threads: int = 0, n_batch: int = 512, n_outputs: int = 64,
                 n_seq: int = 16, max_tokens: int = 256, exp_norm: float = 0.4, exp_sim: float = 0.6,
                 renorm: bool = True, type_k: str = "f16", type_v: str = "f16"):
        info = model.info
        self._hook: Optional[NativeHook] = NativeHook(info.n_layer, info.n_head, info.head_dim, n_slots=2,
                                exp_norm=exp_norm, exp_sim=exp_sim, renorm=renorm)
        try:
            super().__init__(model, n_batch=n_batch, n_outputs=n_outputs, n_seq=n_seq, max_tokens=max_tokens,
                             n_threads=n_threads, type_k=type_k, type_v=type_v, hook=self._hook)
        except BaseException:
            self._hook.close()
            raise
        self._e_slot = -1
        self._steering = False
        self._info = info

    def set_direction(self, rows: Optional[np.ndarray], e: Optional[np.ndarray] = None,
                      layer_scales: Optional[Sequence[float]] = None) -> None:
        """Steer with rows [n_layer, n_head*head_dim] (e: the same shape, or None for λ_sim = 1) at
        per-layer strengths [n_layer]; rows None: unsteered."""
        hook = self._live_hook()
        if rows is None:
            self._steering = False
            hook.set_plan()
            return
        info = self._info
        shape = (info.n_layer, info.n_head * info.head_dim)
        if np.shape(rows) != shape or (e is not None and np.shape(e) != shape):
            raise FgdilpError(f"directions must have shape {list(shape)}")
        if layer_scales is None or len(layer_scales) != info.n_layer:
            raise FgdilpError(f"layer scales: one per layer ({info.n_layer})")
        hook.slots[SLOT_DIR] = rows
        hook.slots[SLOT_E] = 0 if e is None else e
        hook.check_slots()
        hook.set_layer_scales(layer_scales)
        self._e_slot = -1 if e is None else SLOT_E
        self._steering = True

    def _before_decode(self, scored_rows: list[int]) -> None:
        if not self._steering:
            return
        self._live_hook().set_plan(edits=[EditSpec(target=r, dir_slot=SLOT_DIR, e_slot=self._e_slot) for r in scored_rows])

    def _row_nlls(self, rows: list[tuple[int, int]]) -> list[float]:
        """All rows at once in float32 (a large vocabulary makes the per-row float64 loop the
        bottleneck: 262k logits a row); the max is subtracted first, so the error is float rounding."""
        if not rows:
            return []
        ctx = self.ctx
        if ctx is None:
            raise FgdilpError("the scorer is closed")
        x = np.stack([ctx.logits(r) for r, _ in rows])
        m = x.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(x - m, dtype=np.float32).sum(axis=1, dtype=np.float64))
        return list((lse - x[np.arange(len(rows)), [t for _, t in rows]]).astype(np.float64))

    def __enter__(self) -> "SteeredNLL":
        return self

    def _live_hook(self) -> NativeHook:
        if self._hook is None:
            raise FgdilpError("the scorer is closed")
        return self._hook

    def item(self, prompt: str, continuation: str):
        """The tokens a pair is scored on (None for an empty continuation)."""
        return self._item(0, prompt, continuation)

    def mean_nll(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """[len(pairs)] mean NLL per continuation token (nan for an empty continuation)."""
        return np.array([nll / n if n else np.nan for nll, n in self.nll_many(pairs)])

    def close(self) -> None:
        super().close()
        hook = getattr(self, "_hook", None)
        if hook is not None:
            hook.close()
            self._hook = None
