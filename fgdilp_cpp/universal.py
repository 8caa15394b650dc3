"""Saved directions from many texts: universal directions (prompt-end deltas averaged over many
prompts) and the kqv_out rows that head probes are fitted on (docs/method.md §7.4-7.5).

Both run over a plan Runtime and the engine; the numpy parts are plans' fusion and method.probes.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .engine import Capture, Context, ContextParams, Lockstep
from .errors import FgdilpError
from .method.prefixes import NEG_PREFIX, POS_PREFIX
from .native import NativeHook
from .params import SamplingParams
from .plans import (Runtime, build_instance, capture_directions, frozen_directions, instance_prefix_room,
                    tr_prefix_room)

ROWS_PER_DECODE = 16             # texts whose last rows one decode captures (hook slots)


def _tr_delta(rt: Runtime, prompt: str, sampling: SamplingParams, special: bool) -> tuple[np.ndarray, np.ndarray]:
    """TR's prefixes: the fused rows of capture_directions with one negative (K = 100)."""
    return capture_directions(rt, rt.context("tr"), prompt, POS_PREFIX, [NEG_PREFIX], 100.0, "max", True, special)


def _instance_delta(rt: Runtime, prompt: str, sampling: SamplingParams, special: bool) -> tuple[np.ndarray, np.ndarray]:
    """FGDILP's instance prefixes, ranked by the diagnoser in force (frozen_directions)."""
    sel, _ = build_instance(rt, prompt, rt.model.tokenize(prompt, special=special), sampling)
    return frozen_directions(rt, rt.context("fgdilp-frozen"), prompt, sel, special)


# source name -> (one prompt's ([n_layer, width] delta, [n_layer, width] e) at its end, prefix room)
SOURCES = {"tr": (_tr_delta, tr_prefix_room), "fgdilp": (_instance_delta, instance_prefix_room)}
DEFAULT_SOURCE = "tr"            # cheap: no self-generation per prompt


def _source(source: str):
    if source not in SOURCES:
        raise FgdilpError(f"unknown source {source!r} of universal directions ({', '.join(SOURCES)})")
    return SOURCES[source]


def universal_directions(rt: Runtime, prompts: Sequence[str], source: str, sampling: SamplingParams,
                         ctx_size: int, progress=None, special: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """The mean over `prompts` of each prompt's end delta and e (float64 sums, float32 result), and
    how many prompts were used. Empty prompts and prompts that leave no room for the prefixes in a
    context of ctx_size tokens are refused, not skipped: the average would silently change.
    special: the prompts are chat-formatted (their template's special tokens parsed)."""
    delta, prefix_room = _source(source)
    prompts = list(prompts)
    if not prompts:
        raise FgdilpError("no prompts to build universal directions from")
    room = prefix_room(rt)
    for i, p in enumerate(prompts):
        if not p.strip():
            raise FgdilpError(f"prompt {i} is empty")
        if len(rt.model.tokenize(p, special=special)) + room >= ctx_size:
            raise FgdilpError(f"prompt {i} is too long for the context ({ctx_size} tokens) with its prefixes")
    total_d = total_e = None
    for i, p in enumerate(prompts):
        d, e = delta(rt, p, sampling, special)
        total_d = d.astype(np.float64) if total_d is None else total_d + d
        total_e = e.astype(np.float64) if total_e is None else total_e + e
        if progress is not None:
            progress(i + 1, len(prompts))
    n = len(prompts)
    return (total_d / n).astype(np.float32), (total_e / n).astype(np.float32), n


def last_token_rows(rt: Runtime, texts: Sequence[str], n_threads: int = 0, ctx_size: int = 512,
                    per_decode: int = ROWS_PER_DECODE) -> np.ndarray:
    """[len(texts), n_layer, n_head, head_dim] float32: every layer's kqv_out row at each text's last
    token (unsteered), `per_decode` texts per decode (one hook slot each). A text is cut to its last
    ctx_size - 1 tokens; an empty text is refused."""
    info = rt.model.info
    out = np.zeros((len(texts), info.n_layer, info.n_head, info.head_dim), dtype=np.float32)
    toks = []
    for i, t in enumerate(texts):
        ids = rt.model.tokenize(t)
        if not t.strip() or not ids:
            raise FgdilpError(f"text {i} is empty")
        toks.append(ids[-(ctx_size - 1):])
    if not toks:
        return out
    k = min(per_decode, len(toks))
    params = ContextParams(n_ctx=k * ctx_size, n_batch=max(512, k), n_seq_max=k, n_outputs_max=k,
                           n_threads=n_threads, type_k="f16", type_v="f16", flash_attn="auto")
    with NativeHook(info.n_layer, info.n_head, info.head_dim, n_slots=k) as hook, \
            Context(rt.model, params, hook=hook) as ctx:
        for start in range(0, len(toks), k):
            chunk = toks[start:start + k]
            ctx.clear()
            lock = Lockstep(ctx, chunk, want_logits=[])
            try:
                lock.prefill([Capture(seq=j, index=len(s) - 1, slot=j) for j, s in enumerate(chunk)])
            finally:
                lock.close()
            if hook.fired_layers != info.n_layer:
                raise FgdilpError(f"the kqv_out hook fired on {hook.fired_layers} of {info.n_layer} layers: "
                                  "this model cannot be probed")
            out[start:start + len(chunk)] = hook.slots[:len(chunk)].reshape(len(chunk), *out.shape[1:])
    return out


def probe_texts(records, per_class: int, toxic_at: float = 0.5, clean_below: float = 0.1,
                seed: int = 0) -> tuple[list[str], np.ndarray, dict]:
    """Balanced probe data from RTP records: human continuations with Perspective toxicity >=
    toxic_at (label 1) and < clean_below (label 0), per_class of each (fewer if the records hold
    fewer), drawn at random. The continuation alone: the RTP prompts are toxic in both classes."""
    pos, neg = [], []
    for r in records:
        t = r.continuation_scores.get("toxicity")
        if not r.continuation.strip() or not isinstance(t, (int, float)) or isinstance(t, bool):
            continue
        if t >= toxic_at:
            pos.append(r.continuation)
        elif t < clean_below:
            neg.append(r.continuation)
    k = min(per_class, len(pos), len(neg))
    if k < 4:
        raise FgdilpError(f"the probe records hold {len(pos)} toxic (>= {toxic_at}) and {len(neg)} clean "
                          f"(< {clean_below}) continuations; at least 4 of each are needed")
    rng = np.random.default_rng(seed)
    pos = [pos[i] for i in sorted(rng.permutation(len(pos))[:k])]
    neg = [neg[i] for i in sorted(rng.permutation(len(neg))[:k])]
    return pos + neg, np.array([True] * k + [False] * k), {"per_class": k, "toxic_at": toxic_at,
                                                            "clean_below": clean_below, "seed": seed}


def optional_progress(enabled: bool, label: str) -> Optional[callable]:
    if not enabled:
        return None
    import sys

    def report(i: int, n: int) -> None:
        print(f"\r{label} {i}/{n}", end="" if i < n else "\n", file=sys.stderr, flush=True)

    return report
