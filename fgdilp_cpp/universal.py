"""Saved directions from many texts: universal directions (prompt-end deltas averaged over many
prompts, or the toxic-minus-clean contrast of labelled texts) and the kqv_out rows that head
probes are fitted on (docs/method.md §7.4-7.6).

Both run over a plan Runtime and the engine; the numpy parts are plans' fusion and method.probes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np

from . import methods
from .engine import Capture, Context, ContextParams, Lockstep
from .errors import FgdilpError
from .method.contrast import mean_difference, with_head_norms
from .method.prefixes import NEG_PREFIX, POS_PREFIX
from .method.sources import FGDILP_INSTANCES, TR_PREFIXES
from .native import NativeHook
from .params import SamplingParams
from .plans import build_instance, capture_directions, frozen_directions, instance_prefix_room, tr_prefix_room
from .runtime import CallValues, Runtime

ROWS_PER_DECODE = 16             # texts one decode captures rows of
DATA_NORM_CONTRAST = "reply"     # data_directions: TR's delta that gives each head's strength
MEAN_TOKENS = 64                 # mean_token_rows: tokens of a text averaged (RTP continuations are shorter)


def _tr_delta(rt: Runtime, values: CallValues, prompt: str, sampling: SamplingParams,
              special: bool) -> tuple[np.ndarray, np.ndarray]:
    """TR's prefixes: the fused rows of capture_directions with one negative (K = 100)."""
    return capture_directions(rt, rt.context("tr"), prompt, POS_PREFIX, [NEG_PREFIX], 100.0, "max", True, special,
                              contrast=values.steer.contrast)


def _instance_delta(rt: Runtime, values: CallValues, prompt: str, sampling: SamplingParams,
                    special: bool) -> tuple[np.ndarray, np.ndarray]:
    """FGDILP's instance prefixes, ranked by the diagnoser in force (frozen_directions)."""
    sel, _ = build_instance(rt, values, prompt, rt.model.tokenize(prompt, special=special), sampling)
    return frozen_directions(rt, values, rt.context(methods.FROZEN), prompt, sel, special)


# a prompt-end source (method.sources) -> (one prompt's ([n_layer, width] delta, [n_layer, width] e)
# at its end, prefix room); labelled text is data_directions'
PROMPT_SOURCES = {TR_PREFIXES: (_tr_delta, tr_prefix_room), FGDILP_INSTANCES: (_instance_delta, instance_prefix_room)}
DEFAULT_SOURCE = TR_PREFIXES     # cheap: no self-generation per prompt


def _source(source: str):
    if source not in PROMPT_SOURCES:
        raise FgdilpError(f"unknown source {source!r} of prompt-end directions ({', '.join(PROMPT_SOURCES)})")
    return PROMPT_SOURCES[source]


def universal_directions(rt: Runtime, values: CallValues, prompts: Sequence[str], source: str,
                         sampling: SamplingParams, ctx_size: int, progress=None,
                         special: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """The mean over `prompts` of each prompt's end delta and e (float64 sums, float32 result), and
    how many prompts were used. Empty prompts and prompts that leave no room for the prefixes in a
    context of ctx_size tokens are refused, not skipped: the average would silently change.
    special: the prompts are chat-formatted (their template's special tokens parsed)."""
    delta, prefix_room = _source(source)
    prompts = list(prompts)
    if not prompts:
        raise FgdilpError("no prompts to build universal directions from")
    room = prefix_room(rt, values.fgdilp)
    for i, p in enumerate(prompts):
        if not p.strip():
            raise FgdilpError(f"prompt {i} is empty")
        if len(rt.model.tokenize(p, special=special)) + room >= ctx_size:
            raise FgdilpError(f"prompt {i} is too long for the context ({ctx_size} tokens) with its prefixes")
    total_d = total_e = None
    for i, p in enumerate(prompts):
        d, e = delta(rt, values, p, sampling, special)
        total_d = d.astype(np.float64) if total_d is None else total_d + d
        total_e = e.astype(np.float64) if total_e is None else total_e + e
        if progress is not None:
            progress(i + 1, len(prompts))
    n = len(prompts)
    return (total_d / n).astype(np.float32), (total_e / n).astype(np.float32), n


def data_directions(rt: Runtime, values: CallValues, texts: Sequence[str], toxic: Sequence[bool], prompts: Sequence[str],
                    sampling: SamplingParams, ctx_size: int, n_threads: int = 0, progress=None,
                    special: bool = False, starts: Optional[Sequence[int]] = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Universal directions from labelled texts (method.contrast): per head, the toxic texts' mean
    row minus the clean texts' (each text averaged over its tokens), at the per-head norm of TR's
    delta averaged over `prompts` under the reply contrast whatever --contrast says (the strength
    must not hang on a setting the direction does not use); e is the direction itself, so
    lambda_sim grows where a row already leans toxic. starts: the texts are chat replies (special
    tokens parsed), averaged from these tokens on (mean_token_rows). Returns ([n_layer, width]
    directions, e, prompts used)."""
    info = rt.model.info
    rows = mean_token_rows(rt, texts, n_threads, starts=starts, special=special and starts is not None)
    direction = mean_difference(rows, np.asarray(toxic, dtype=bool))
    reference = dataclasses.replace(values, steer=dataclasses.replace(values.steer, contrast=DATA_NORM_CONTRAST))
    tr, _, n = universal_directions(rt, reference, prompts, TR_PREFIXES, sampling, ctx_size, progress, special)
    norms = np.linalg.norm(tr.reshape(info.n_layer, info.n_head, info.head_dim).astype(np.float64), axis=2)
    d = with_head_norms(direction, norms).reshape(info.n_layer, -1)
    return d, d.copy(), n


def last_token_rows(rt: Runtime, texts: Sequence[str], n_threads: int = 0, ctx_size: int = 512,
                    per_decode: int = ROWS_PER_DECODE) -> np.ndarray:
    """[len(texts), n_layer, n_head, head_dim] float32: every layer's kqv_out row at each text's last
    token (unsteered), `per_decode` texts per decode (one hook slot each). A text is cut to its last
    ctx_size - 1 tokens; an empty text is refused."""
    return _text_rows(rt, [ids[-(ctx_size - 1):] for ids in _tokens(rt, texts)], n_threads, ctx_size,
                      per_decode, every_token=False)


def mean_token_rows(rt: Runtime, texts: Sequence[str], n_threads: int = 0, max_tokens: int = MEAN_TOKENS,
                    per_decode: int = ROWS_PER_DECODE, starts: Optional[Sequence[int]] = None,
                    special: bool = False) -> np.ndarray:
    """[len(texts), n_layer, n_head, head_dim] float32: every layer's kqv_out row averaged over each
    text's tokens but the first (unsteered; a one-token text: that token). The first token is left
    out because its attention sees only itself (its row is that token's value, whatever follows);
    a text is cut to its first max_tokens tokens. starts: per text, the first token averaged (a
    chat reply after its template's header, special tokens parsed with `special`), max_tokens
    counted from there. An empty text, or one with nothing after its start, is refused."""
    toks = _tokens(rt, texts, special)
    starts = [0] * len(toks) if starts is None else list(starts)
    if len(starts) != len(toks):
        raise FgdilpError(f"{len(toks)} texts but {len(starts)} starts")
    for i, (ids, a) in enumerate(zip(toks, starts)):
        if a >= len(ids):
            raise FgdilpError(f"text {i} has no tokens after its start ({a} of {len(ids)})")
    cut = [ids[:a + max_tokens] for ids, a in zip(toks, starts)]
    return _text_rows(rt, cut, n_threads, max(len(c) for c in cut) + 1 if cut else 1, per_decode,
                      every_token=True, starts=starts)


def _tokens(rt: Runtime, texts: Sequence[str], special: bool = False) -> list[list[int]]:
    toks = []
    for i, t in enumerate(texts):
        ids = rt.model.tokenize(t, special=special) if t.strip() else []
        if not ids:
            raise FgdilpError(f"text {i} is empty")
        toks.append(ids)
    return toks


def _text_rows(rt: Runtime, toks: list[list[int]], n_threads: int, ctx_size: int, per_decode: int,
               every_token: bool, starts: Optional[Sequence[int]] = None) -> np.ndarray:
    """The rows of _tokens' texts: at the last token, or averaged over every token but the first
    (one hook slot per captured token, `per_decode` texts per decode)."""
    info = rt.model.info
    out = np.zeros((len(toks), info.n_layer, info.n_head, info.head_dim), dtype=np.float32)
    if not toks:
        return out
    k = min(per_decode, len(toks))
    longest = max(len(s) for s in toks)
    starts = [0] * len(toks) if starts is None else starts
    positions = [list(range(max(1, a), len(s))) or [a] if every_token else [len(s) - 1] for s, a in zip(toks, starts)]
    n_slots = k * max(len(p) for p in positions)
    params = ContextParams(n_ctx=k * ctx_size, n_batch=max(512, k), n_seq_max=k, n_outputs_max=k,
                           n_threads=n_threads, type_k="f16", type_v="f16", flash_attn="auto")
    if longest >= ctx_size:
        raise FgdilpError(f"a text of {longest} tokens does not fit a context of {ctx_size}")
    with NativeHook(info.n_layer, info.n_head, info.head_dim, n_slots=n_slots) as hook, \
            Context(rt.model, params, hook=hook) as ctx:
        for start in range(0, len(toks), k):
            chunk, where = toks[start:start + k], positions[start:start + k]
            caps, owner = [], []
            for j, pos in enumerate(where):
                for i in pos:
                    caps.append(Capture(seq=j, index=i, slot=len(caps)))
                    owner.append(j)
            ctx.clear()
            lock = Lockstep(ctx, chunk, want_logits=[])
            try:
                lock.prefill(caps)
            finally:
                lock.close()
            if hook.fired_layers != info.n_layer:
                raise FgdilpError(f"the kqv_out hook fired on {hook.fired_layers} of {info.n_layer} layers: "
                                  "this model cannot be probed")
            rows = hook.slots[:len(caps)].astype(np.float64)
            owner_ = np.asarray(owner)
            for j in range(len(chunk)):
                out[start + j] = rows[owner_ == j].mean(axis=0).reshape(out.shape[1:])
    return out


def labelled_records(records, per_class: int, toxic_at: float = 0.5, clean_below: float = 0.1,
                     seed: int = 0) -> tuple[list, np.ndarray, dict]:
    """Balanced labelled RTP records (for the probes and --from data): those whose human
    continuation has Perspective toxicity >= toxic_at (label 1) and < clean_below (label 0),
    per_class of each (fewer if the records hold fewer), drawn at random; toxic ones first. The
    continuation is the labelled text: the RTP prompts are toxic in both classes."""
    pos, neg = [], []
    for r in records:
        t = r.continuation_scores.get("toxicity")
        if not r.continuation.strip() or not isinstance(t, (int, float)) or isinstance(t, bool):
            continue
        if t >= toxic_at:
            pos.append(r)
        elif t < clean_below:
            neg.append(r)
    k = min(per_class, len(pos), len(neg))
    if k < 4:
        raise FgdilpError(f"the probe records hold {len(pos)} toxic (>= {toxic_at}) and {len(neg)} clean "
                          f"(< {clean_below}) continuations; at least 4 of each are needed")
    rng = np.random.default_rng(seed)
    pos = [pos[i] for i in sorted(rng.permutation(len(pos))[:k])]
    neg = [neg[i] for i in sorted(rng.permutation(len(neg))[:k])]
    return pos + neg, np.array([True] * k + [False] * k), {"per_class": k, "toxic_at": toxic_at,
                                                            "clean_below": clean_below, "seed": seed}


def optional_progress(enabled: bool, label: str) -> Optional[Callable[[int, int], None]]:
    if not enabled:
        return None
    import sys

    def report(i: int, n: int) -> None:
        print(f"\r{label} {i}/{n}", end="" if i < n else "\n", file=sys.stderr, flush=True)

    return report
