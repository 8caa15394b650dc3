"""What each method runs: its sequences (roles), hook captures and edits, and FGDILP's setup.

Roles of a steered plan: 0 = P+, 1..n = P-_j, n+1 = P0 (exact modes); frozen modes run P0 alone
with a fixed direction in a hook slot. Hook slots: see the SLOT_* constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .engine import Capture, Lockstep, SamplingParams
from .errors import FgdilpError
from .method.diagnosis import ATTRIBUTE_NAMES
from .method.cvec import residual_directions
from .method.fusion import FUSION_MODES, fuse
from .method.vectors import random_heads
from .method.prefixes import NEG_PREFIX, NEG_TEMPLATE, POS_PREFIX, POS_TEMPLATE, prefixed, select_prefixes
from .native import MAX_NEG, EditSpec

# hook slots, each [n_layer, width]
SLOT_E = 0                      # e: mean of the negatives' template ':' rows
SLOT_DIR = 1                    # fixed direction (frozen modes, saved vectors)
SLOT_POS_LAST = 2               # P+ last row at the end of the prompt
SLOT_NEG_LAST = 3               # .. 3 + MAX_NEG: P-_j last rows
SLOT_COLON = SLOT_NEG_LAST + MAX_NEG   # .. + MAX_NEG: P-_j template ':' rows
N_SLOTS = SLOT_COLON + MAX_NEG


@dataclass(frozen=True)
class SteerParams:
    exp_norm: float = 0.4
    exp_sim: float = 0.6
    scale: float = 1.0
    layer_start: int = 0
    layer_end: int = -1          # inclusive; -1 = last layer
    renorm: bool = True

    def last_layer(self, n_layer: int) -> int:
        return n_layer - 1 if self.layer_end < 0 else self.layer_end

    def layer_mask(self, n_layer: int) -> np.ndarray:
        """[n_layer] 1 for steered layers, 0 elsewhere."""
        il = np.arange(n_layer)
        return ((il >= self.layer_start) & (il <= self.last_layer(n_layer))).astype(np.float64)

    def check(self, n_layer: int) -> None:
        for name, v in (("exp_norm", self.exp_norm), ("exp_sim", self.exp_sim), ("scale", self.scale)):
            if not np.isfinite(v):
                raise FgdilpError(f"{name} must be a finite number")
        end = self.last_layer(n_layer)
        if not 0 <= self.layer_start <= end < n_layer:
            raise FgdilpError(f"--steer-layer-range {self.layer_start} {self.layer_end} is outside "
                              f"the model's layers 0..{n_layer - 1}")


@dataclass(frozen=True)
class FgdilpParams:
    samples: int = 25            # N self-generated continuations
    selfgen_tokens: int = 20     # new tokens per self-generated sample
    selfgen_min_tokens: int = 5  # no end-of-generation before this many
    negatives: int = 6           # negative prefixes (one per attribute, de-duplicated)
    mask_k: float = 50.0         # top-K % entries kept per sub-toxicity vector (100 = no masking)
    fusion: str = "max"          # merge of the agreeing entries: max | mean | sum
    sign_election: bool = True
    pad_blank: bool = True       # pad to `negatives` with template-only (blank) negatives

    def check(self) -> None:
        if self.samples < 1:
            raise FgdilpError(f"--selfgen-samples must be at least 1, not {self.samples}")
        if not 1 <= self.negatives <= MAX_NEG:
            raise FgdilpError(f"--negatives must be in 1..{MAX_NEG}, not {self.negatives}")
        if not (0.0 < self.mask_k <= 100.0):
            raise FgdilpError(f"--mask-k must be in (0, 100], not {self.mask_k}")
        if self.fusion not in FUSION_MODES:
            raise FgdilpError(f"--fusion must be one of {', '.join(FUSION_MODES)}, not {self.fusion!r}")
        if not 1 <= self.selfgen_min_tokens <= self.selfgen_tokens:
            raise FgdilpError("need 1 <= --selfgen-min-tokens <= --selfgen-tokens")


@dataclass
class Plan:
    sequences: list[list[int]]
    out_role: int
    captures: tuple = ()
    edits: tuple = ()
    before_last: Optional[Callable] = None       # (ctx) between the prompt body and its last tokens
    after_prefill: Optional[Callable] = None     # (ctx) once the prompt is decoded
    cvec: Optional[np.ndarray] = None            # [n_layer, n_embd] residual control vector (cvec baseline)
    first_seq: int = 0
    explain: dict = field(default_factory=dict)


def plan_for(gen, method: str, prompt: str, raw: list[int], sampling: SamplingParams, explain: bool,
             prefixes=None, special: bool = False) -> Plan:
    """raw: the prompt's tokens; special: parse special-token text in the prompt (a chat-formatted
    conversation) when prefixes are joined to it."""
    tok = _tokenizer(gen, special)
    if method == "none":
        return Plan([raw], 0)
    if method == "prompt":
        return Plan([tok(POS_PREFIX + prompt)], 0)
    if method == "tr":
        return _exact_plan(gen, tok, method, prompt, raw, POS_PREFIX, [NEG_PREFIX], {}, explain)
    if method == "vectors":
        return _fixed_plan(gen, method, raw, gen.vectors.rows(), None if gen.vectors.e is None else
                           gen.vectors.e.reshape(gen.vectors.n_layer, -1), {"vectors": gen.vectors.method})
    if method in ("cvec", "random"):
        rows, e = capture_directions(gen, gen.context("tr"), prompt, POS_PREFIX, [NEG_PREFIX], 100.0, "max", True,
                                     special)
        info = {"delta_norms": [float(x) for x in np.linalg.norm(rows, axis=1)]}
        if method == "random":
            return _fixed_plan(gen, method, raw, random_like_heads(rows, gen.model.info.n_head, sampling.seed), e, info)
        s = gen.steer
        vec = residual_directions(rows * s.layer_mask(gen.model.info.n_layer)[:, None], gen.output_projections(),
                                  gen.model.info.n_head, s.exp_norm, s.scale)
        return Plan([raw], 0, explain=info, cvec=vec)
    sel, info = (prefixes, {}) if prefixes is not None else build_instance(gen, prompt, raw, sampling)
    if method == "fgdilp":
        return _exact_plan(gen, tok, method, prompt, raw, sel.positive + POS_TEMPLATE,
                           [t + NEG_TEMPLATE for t in sel.negatives], info, explain)
    if method == "fgdilp-frozen":
        rows, e = frozen_directions(gen, gen.context(method), prompt, sel, special)
        info["delta_norms"] = [float(x) for x in np.linalg.norm(rows, axis=1)]
        return _fixed_plan(gen, method, raw, rows, e, info)
    raise FgdilpError(f"unknown method {method!r}")


def _tokenizer(gen, special: bool):
    return lambda text: gen.model.tokenize(text, special=special)


def _prefixed_all(gen, tok, prompt: str, pos_text: str, neg_texts: list[str]):
    tb = gen.model.token_bytes
    pos = prefixed(tok, tb, pos_text, prompt)
    negs = [prefixed(tok, tb, t, prompt) for t in neg_texts]
    return pos, negs


def _neg_roles(negs) -> tuple[list[list[int]], list[int]]:
    """The distinct negative sequences (blank pads are all the same) and each negative's role
    (1 + its index among them): identical sequences run once and are read once per negative."""
    distinct: list[list[int]] = []
    roles = []
    for x in negs:
        if x.tokens not in distinct:
            distinct.append(x.tokens)
        roles.append(1 + distinct.index(x.tokens))
    return distinct, roles


def _prefix_captures(pos, negs, roles: list[int], with_last: bool) -> list[Capture]:
    caps = [Capture(seq=r, index=n.colon_index, slot=SLOT_COLON + j) for j, (n, r) in enumerate(zip(negs, roles))]
    if with_last:
        caps.append(Capture(seq=0, index=len(pos.tokens) - 1, slot=SLOT_POS_LAST))
        caps += [Capture(seq=r, index=len(n.tokens) - 1, slot=SLOT_NEG_LAST + j)
                 for j, (n, r) in enumerate(zip(negs, roles))]
    return caps


def _average_e(hook, n: int) -> None:
    hook.slots[SLOT_E] = hook.slots[SLOT_COLON:SLOT_COLON + n].mean(axis=0)


def _fused_rows(slots: np.ndarray, n: int, mask_k: float, fusion: str, elect: bool) -> np.ndarray:
    """Fusion of the captured prompt-end rows: [n_layer, width]."""
    deltas = slots[SLOT_NEG_LAST:SLOT_NEG_LAST + n] - slots[SLOT_POS_LAST]   # [n, n_layer, width]
    return np.stack([fuse(deltas[:, il], mask_k, fusion, elect) for il in range(deltas.shape[1])])


def _exact_plan(gen, tok, method, prompt, raw, pos_text, neg_texts, info: dict, explain: bool) -> Plan:
    """P+, P-_1..n and P0 as sequences of one decode per step; the hook fuses and edits P0."""
    pos, negs = _prefixed_all(gen, tok, prompt, pos_text, neg_texts)
    n = len(negs)
    distinct, roles = _neg_roles(negs)
    out = len(distinct) + 1
    hook = gen.context(method).hook
    k, mode, elect = (100.0, "max", True) if method == "tr" else \
        (gen.fgdilp.mask_k, gen.fgdilp.fusion, gen.fgdilp.sign_election)

    def norms(ctx) -> None:   # --explain: per-layer |fused delta| at the end of the prompt
        info["delta_norms"] = [float(x) for x in np.linalg.norm(_fused_rows(hook.slots, n, k, mode, elect), axis=1)]

    return Plan([pos.tokens] + distinct + [raw], out,
                captures=tuple(_prefix_captures(pos, negs, roles, with_last=explain)),
                edits=(EditSpec(target=out, pos=0, neg=tuple(roles), e_slot=SLOT_E),),
                before_last=lambda ctx: _average_e(hook, n), after_prefill=norms if explain else None,
                explain=info)


def frozen_directions(gen, ctx, prompt: str, sel, special: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """FGDILP's delta captured once at the end of the prompt, fused in numpy."""
    f = gen.fgdilp
    return capture_directions(gen, ctx, prompt, sel.positive + POS_TEMPLATE,
                              [t + NEG_TEMPLATE for t in sel.negatives], f.mask_k, f.fusion, f.sign_election,
                              special)


def capture_directions(gen, ctx, prompt: str, pos_text: str, neg_texts: list[str], mask_k: float,
                       fusion: str, elect: bool, special: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Capture P+ and P-_j once at the end of the prompt (in hooked context `ctx`) and fuse in
    numpy: ([n_layer, width] direction, [n_layer, width] e)."""
    pos, negs = _prefixed_all(gen, _tokenizer(gen, special), prompt, pos_text, neg_texts)
    n = len(negs)
    hook = ctx.hook
    ctx.clear()
    distinct, roles = _neg_roles(negs)
    lock = Lockstep(ctx, [pos.tokens] + distinct, want_logits=[])
    try:
        lock.prefill(_prefix_captures(pos, negs, roles, with_last=True))
    finally:
        lock.close()
    rows = _fused_rows(hook.slots, n, mask_k, fusion, elect)                 # [n_layer, width]
    _average_e(hook, n)
    return rows.astype(np.float32), hook.slots[SLOT_E].copy()                # e: [n_layer, width]


def random_like_heads(rows: np.ndarray, n_head: int, seed: int) -> np.ndarray:
    """Random directions with the per-head norms of `rows` [n_layer, width] (the random control)."""
    return random_heads(rows.reshape(rows.shape[0], n_head, -1), seed).reshape(rows.shape)


def _fixed_plan(gen, method: str, raw, rows: np.ndarray, e: Optional[np.ndarray], info: dict) -> Plan:
    """P0 alone, edited with a fixed direction (frozen FGDILP, saved vectors, the random control)."""
    hook = gen.context(method).hook
    hook.slots[SLOT_DIR] = rows
    hook.slots[SLOT_E] = 0 if e is None else e
    hook.check_slots()
    edit = EditSpec(target=0, dir_slot=SLOT_DIR, e_slot=-1 if e is None else SLOT_E)
    return Plan([raw], 0, edits=(edit,), explain=info)


def build_instance(gen, prompt: str, raw: list[int], sampling: SamplingParams):
    """Self-generation, self-diagnosis and prefix selection for one prompt (method.md 2.1-2.3)."""
    import copy

    key = (prompt, sampling, gen.fgdilp)
    if gen.reuse_instances and gen.last_instance[0] == key:
        sel, info = gen.last_instance[1]
        return sel, copy.deepcopy(info)
    sel, info = _new_instance(gen, prompt, raw, sampling)
    if gen.reuse_instances:
        gen.last_instance = (key, (sel, copy.deepcopy(info)))
    return sel, info


def _new_instance(gen, prompt: str, raw: list[int], sampling: SamplingParams):
    from .instance import self_generate

    f, model = gen.fgdilp, gen.model
    ctx = gen.context("setup")
    outs = self_generate(ctx, model, raw, f.samples, sampling, f.selfgen_tokens, f.selfgen_min_tokens)
    texts = [model.detokenize(o) for o in outs]
    diag = gen.diagnoser()
    scores = diag.scores(ctx, texts)
    sel = select_prefixes(texts, scores, list(ATTRIBUTE_NAMES), f.negatives, f.pad_blank)
    info = {
        "samples": [{"text": t, "scores": dict(zip(ATTRIBUTE_NAMES, map(float, sc)))} for t, sc in zip(texts, scores)],
        "negatives": [{"text": t, "sample": src, "attributes": a}
                      for t, src, a in zip(sel.negatives, sel.negative_sources, sel.negative_attributes)],
        "positive": {"text": sel.positive, "sample": sel.positive_source},
        "yes_no_tokens": [diag.yes_text, diag.no_text],
    }
    return sel, info
