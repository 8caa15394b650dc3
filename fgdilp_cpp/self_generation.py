"""FGDILP's self-generation over the engine (docs/method.md §4.1): the prompt prefilled once, its KV
shared with N sequences that each draw a candidate continuation. Its diagnosis: self_diagnosis.py.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .engine import Context, Lockstep, Model, Sampler, SamplingParams


def self_generate(ctx: Context, model: Model, prompt_tokens: list[int], n: int, sampling: SamplingParams,
                  n_new: int = 20, min_new: int = 5, reuse: Optional[bool] = None) -> list[list[int]]:
    """n continuations of the prompt (seeds seed+1 .. seed+n), at most n_new tokens each, and at
    least min_new before an end-of-generation token may be drawn. reuse: keep the KV an earlier
    self-generation left for the common prefix (None: the context's kv_reuse)."""
    samplers = [Sampler(SamplingParams(sampling.temp, sampling.top_k, sampling.top_p, sampling.min_p,
                                       (sampling.seed + 1 + i) % 2**32)) for i in range(n)]
    eog = np.array(model.eog_tokens, dtype=np.int64)
    outs: list[list[int]] = [[] for _ in range(n)]
    # the prompt (a conversation) keeps the KV an earlier self-generation left in this context
    reuse = ctx.params.kv_reuse if reuse is None else (reuse and ctx.params.kv_reuse)
    if not reuse:
        ctx.clear()
    lock = Lockstep(ctx, [prompt_tokens], want_logits=[0], n_groups=n, reuse=reuse)
    try:
        lock.prefill()
        for step in range(n_new):
            toks, done = [], []
            for g in lock.active:
                row = lock.row(g, 0)
                if step < min_new and eog.size:
                    ctx.logits(row)[eog] = -np.inf     # no end before min_new tokens
                t = samplers[g].sample(ctx, row)
                if model.is_eog(t):
                    done.append(g)
                else:
                    outs[g].append(t)
                    toks.append(t)
            for g in done:
                lock.deactivate(g)
            if not lock.active or step == n_new - 1:
                break
            lock.step(toks)
        for g in list(lock.active):
            lock.deactivate(g)
        lock.record()
    finally:
        lock.close()
        for s in samplers:
            s.close()
    return outs
