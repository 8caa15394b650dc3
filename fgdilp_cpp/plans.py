"""What each method runs: its sequences (roles), hook captures and edits, and FGDILP's setup.

Roles of a steered plan: 0 = P+, 1..n = P-_j, n+1 = P0 (exact modes); frozen modes run P0 alone
with a fixed direction in a hook slot. Hook slots: see the SLOT_* constants.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .engine import Capture, Context, Model, prefill_aside
from .errors import FgdilpError
from .method.cvec import residual_directions
from .method.diagnosis import ATTRIBUTE_NAMES
from .method.fusion import fuse
from .method.prefixes import (NEG_PREFIX, NEG_TEMPLATE, POS_PREFIX, POS_TEMPLATE, Selection, prefix_alone, prefixed,
                              select_prefixes)
from .method.vectors import HeadDirections, random_heads
from .native import MAX_NEG, EditSpec
from .params import FgdilpParams, SamplingParams, SteerParams

# hook slots, each [n_layer, width]
SLOT_E = 0                      # e: mean of the negatives' template ':' rows
SLOT_DIR = 1                    # fixed direction (frozen modes, saved vectors)
SLOT_POS_LAST = 2               # P+ last row at the end of the prompt
SLOT_NEG_LAST = 3               # .. 3 + MAX_NEG: P-_j last rows
SLOT_COLON = SLOT_NEG_LAST + MAX_NEG   # .. + MAX_NEG: P-_j template ':' rows
N_SLOTS = SLOT_COLON + MAX_NEG
CAPTURE_MEMO = 8                # captured directions kept per model (capture_directions)


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


@dataclass
class Runtime:
    """What a plan builder may use: the model, the steering values in force, a method's context by
    name ("setup": FGDILP's self-generation and diagnosis), and per-model memos. Not the Generator."""

    model: Model
    steer: SteerParams
    fgdilp: FgdilpParams
    vectors: Optional[HeadDirections]
    context: Callable[[str], Context]
    reuse_instances: bool = False       # keep the last prompt's FGDILP instance (fgdilp and -frozen share it)
    memo: dict = field(default_factory=dict)
    scorer: Optional[object] = None     # the diagnosing scorer (None: tox-block, loaded on first use)
    kv_reuse: bool = False              # this call may keep KV cells an earlier run left (chat turns)
    self_diagnosis_auc: Optional[float] = None   # measured AUCs (a model profile) for --diagnoser auto
    scorer_auc: Optional[float] = None
    universal: Optional[Callable[[], HeadDirections]] = None   # the model's universal directions (loaded on first use)

    def output_projections(self) -> list[np.ndarray]:
        """W_O of every layer, [n_embd, n_head*head_dim] float32 (read once from the GGUF file)."""
        if "w_o" not in self.memo:
            from .engine.tensors import output_projections

            self.memo["w_o"] = output_projections(self.model.info.path, self.model.info.n_layer)
        return self.memo["w_o"]

    def self_diagnoser(self):
        """Self-diagnosis with this model (yes/no tokens chosen once)."""
        if "self_diagnoser" not in self.memo:
            from .self_diagnosis import Diagnoser

            self.memo["self_diagnoser"] = Diagnoser.for_model(self.model)
        return self.memo["self_diagnoser"]

    def scorer_diagnoser(self):
        """The offline toxicity scorer as diagnoser (tox-block unless `scorer` is set), loaded once."""
        if "scorer_diagnoser" not in self.memo:
            from .method.scorer_diagnosis import ScorerDiagnoser

            if self.scorer is None:
                from .toxicity.scorer import ToxicityScorer

                self.scorer = ToxicityScorer.load()
            self.memo["scorer_diagnoser"] = ScorerDiagnoser(self.scorer)
        return self.memo["scorer_diagnoser"]

    def diagnoser_choice(self) -> str:
        """"self" or "scorer": the diagnoser that ranks the samples under --diagnoser."""
        from .method.scorer_diagnosis import choose_diagnoser

        return choose_diagnoser(self.fgdilp.diagnoser, self.self_diagnosis_auc, self.scorer_auc)

    def diagnose(self, texts: list[str], which: str) -> np.ndarray:
        """[len(texts), 6] scores (ATTRIBUTE_NAMES order) of diagnoser `which` ("self" or "scorer")."""
        if which == "scorer":
            return self.scorer_diagnoser().scores(texts)
        return self.self_diagnoser().scores(self.context("setup"), texts)


@dataclass(frozen=True)
class PlanRequest:
    method: str
    prompt: str
    tokens: list[int]                  # the raw prompt's tokens
    sampling: SamplingParams
    explain: bool = False
    special: bool = False              # parse special-token text (a chat-formatted conversation)
    prefixes: Optional[Selection] = None   # instance prefixes to use instead of building them

    def tokenize(self, rt: Runtime, text: str) -> list[int]:
        return rt.model.tokenize(text, special=self.special)


# ---- plan builders (the registry in methods.py names them) --------------------------------------
def plan_none(rt: Runtime, req: PlanRequest) -> Plan:
    return Plan([req.tokens], 0)


def plan_prompt(rt: Runtime, req: PlanRequest) -> Plan:
    return Plan([req.tokenize(rt, POS_PREFIX + req.prompt)], 0)


def plan_tr(rt: Runtime, req: PlanRequest) -> Plan:
    return _exact_plan(rt, req, POS_PREFIX, [NEG_PREFIX], {}, (100.0, "max", True, 0))


def plan_fgdilp(rt: Runtime, req: PlanRequest) -> Plan:
    sel, info = instance_for(rt, req)
    f = rt.fgdilp
    return _exact_plan(rt, req, sel.positive + POS_TEMPLATE, [t + NEG_TEMPLATE for t in sel.negatives], info,
                       (f.mask_k, f.fusion, f.sign_election, _norm_heads(rt)))


def plan_fgdilp_frozen(rt: Runtime, req: PlanRequest) -> Plan:
    sel, info = instance_for(rt, req)
    rows, e = frozen_directions(rt, rt.context(req.method), req.prompt, sel, req.special)
    info["delta_norms"] = _layer_norms(rows)
    return _fixed_plan(rt, req, rows, e, info)


def plan_vectors(rt: Runtime, req: PlanRequest) -> Plan:
    if rt.vectors is None:
        raise FgdilpError(f"method {req.method!r} needs a vectors file")
    return _saved_plan(rt, req, rt.vectors, {})


def plan_universal(rt: Runtime, req: PlanRequest) -> Plan:
    if rt.universal is None:
        raise FgdilpError(f"method {req.method!r} needs the model's universal directions")
    return _saved_plan(rt, req, rt.universal(), {"universal": True})


def _saved_plan(rt: Runtime, req: PlanRequest, v: HeadDirections, info: dict) -> Plan:
    """P0 edited with a saved HeadDirections (a loaded file, the model's universal directions)."""
    e = None if v.e is None else v.e.reshape(v.n_layer, -1)
    info = {"saved_vectors": v.source, **info}
    if v.head_weights is not None:
        info["head_weights"] = {"steered_heads": int((v.head_weights > 0).sum()), "heads": int(v.head_weights.size)}
    return _fixed_plan(rt, req, v.steering_rows(), e, info)


def plan_random(rt: Runtime, req: PlanRequest) -> Plan:
    rows, e, info = _tr_directions(rt, req)
    return _fixed_plan(rt, req, random_like_heads(rows, rt.model.info.n_head, req.sampling.seed), e, info)


def plan_cvec(rt: Runtime, req: PlanRequest) -> Plan:
    rows, _, info = _tr_directions(rt, req)
    s, n_layer = rt.steer, rt.model.info.n_layer
    vec = residual_directions(rows * s.layer_mask(n_layer)[:, None], rt.output_projections(),
                              rt.model.info.n_head, s.exp_norm, s.scale)
    return Plan([req.tokens], 0, explain=info, cvec=vec)


def tr_prefix_room(rt: Runtime) -> int:
    return len(rt.model.tokenize_plain(NEG_PREFIX)) + 2


def instance_prefix_room(rt: Runtime) -> int:
    return rt.fgdilp.selfgen_tokens + len(rt.model.tokenize_plain(NEG_TEMPLATE)) + 8


# ---- shared pieces ------------------------------------------------------------------------------
def _layer_norms(rows: np.ndarray) -> list[float]:
    return [float(x) for x in np.linalg.norm(rows, axis=1)]


def _tr_directions(rt: Runtime, req: PlanRequest):
    """TR's delta captured once at the prompt's end in TR's context (cvec and the random control)."""
    rows, e = capture_directions(rt, rt.context("tr"), req.prompt, POS_PREFIX, [NEG_PREFIX], 100.0, "max", True,
                                 req.special)
    return rows, e, {"delta_norms": _layer_norms(rows)}


def _prefixed_all(rt: Runtime, prompt: str, pos_text: str, neg_texts: list[str], special: bool):
    """P+ and P-_j: each prefix before the prompt, or alone under --contrast reply (§2.9)."""
    tok = lambda text: rt.model.tokenize(text, special=special)   # noqa: E731
    tb = rt.model.token_bytes
    if rt.steer.contrast == "reply":
        last = tok(prompt)[-1]
        return prefix_alone(tok, tb, pos_text, last), [prefix_alone(tok, tb, t, last) for t in neg_texts]
    return prefixed(tok, tb, pos_text, prompt), [prefixed(tok, tb, t, prompt) for t in neg_texts]


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


def _norm_heads(rt: Runtime) -> int:
    """Heads whose fused delta --fused-norm tr rescales (0: none), as the hook's set_fusion does."""
    return rt.model.info.n_head if rt.fgdilp.norm_to_mean_delta else 0


def _fused_rows(slots: np.ndarray, n: int, mask_k: float, fusion: str, elect: bool,
                norm_heads: int = 0) -> np.ndarray:
    """Fusion of the captured prompt-end rows: [n_layer, width]."""
    deltas = slots[SLOT_NEG_LAST:SLOT_NEG_LAST + n] - slots[SLOT_POS_LAST]   # [n, n_layer, width]
    return np.stack([fuse(deltas[:, il], mask_k, fusion, elect, norm_heads) for il in range(deltas.shape[1])])


def _exact_plan(rt: Runtime, req: PlanRequest, pos_text: str, neg_texts: list[str], info: dict,
                fusion: tuple[float, str, bool, int]) -> Plan:
    """P+, P-_1..n and P0 as sequences of one decode per step; the hook fuses and edits P0
    (docs/method.md §3, §6.1). fusion: (mask_k, merge, sign election, norm heads) of the --explain norms."""
    pos, negs = _prefixed_all(rt, req.prompt, pos_text, neg_texts, req.special)
    n = len(negs)
    distinct, roles = _neg_roles(negs)
    out = len(distinct) + 1
    hook = rt.context(req.method).hook

    def norms(ctx) -> None:   # --explain: per-layer |fused delta| at the end of the prompt
        info["delta_norms"] = _layer_norms(_fused_rows(hook.slots, n, *fusion))

    return Plan([pos.tokens] + distinct + [req.tokens], out,
                captures=tuple(_prefix_captures(pos, negs, roles, with_last=req.explain)),
                edits=(EditSpec(target=out, pos=0, neg=tuple(roles), e_slot=SLOT_E),),
                before_last=lambda ctx: _average_e(hook, n), after_prefill=norms if req.explain else None,
                explain=info)


def frozen_directions(rt: Runtime, ctx, prompt: str, sel, special: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """FGDILP's delta captured once at the end of the prompt, fused in numpy (docs/method.md §6.2)."""
    f = rt.fgdilp
    return capture_directions(rt, ctx, prompt, sel.positive + POS_TEMPLATE, [t + NEG_TEMPLATE for t in sel.negatives],
                              f.mask_k, f.fusion, f.sign_election, special, norm_heads=_norm_heads(rt))


def capture_directions(rt: Runtime, ctx, prompt: str, pos_text: str, neg_texts: list[str], mask_k: float,
                       fusion: str, elect: bool, special: bool = False, *,
                       norm_heads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Capture P+ and P-_j once at the end of the prompt (in hooked context `ctx`) and fuse in
    numpy: ([n_layer, width] direction, [n_layer, width] e). norm_heads: --fused-norm tr (n_head)."""
    pos, negs = _prefixed_all(rt, prompt, pos_text, neg_texts, special)
    n = len(negs)
    hook = ctx.hook
    distinct, roles = _neg_roles(negs)
    # the same sequences give the same rows: a kept instance under the reply contrast (its P+ / P-_j
    # do not hold the conversation) or another scale of one prompt need no second capture
    key = (tuple(pos.tokens), tuple(map(tuple, distinct)), tuple(roles), mask_k, fusion, elect, norm_heads)
    memo = rt.memo.setdefault("captures", {})
    if key in memo:
        rows, e = memo.pop(key)
    else:
        _capture_rows(ctx, [pos.tokens] + distinct, _prefix_captures(pos, negs, roles, with_last=True))
        rows = _fused_rows(hook.slots, n, mask_k, fusion, elect, norm_heads).astype(np.float32)  # [n_layer, width]
        _average_e(hook, n)
        e = hook.slots[SLOT_E].copy()                                        # [n_layer, width]
    memo[key] = (rows, e)
    while len(memo) > CAPTURE_MEMO:
        del memo[next(iter(memo))]           # the least recently used
    return rows.copy(), e.copy()


def _capture_rows(ctx, sequences: list[list[int]], captures: list[Capture]) -> None:
    """Fill the captures' hook slots: rows captured before from the same tokens are put back
    (Context.restore_slot: a row depends on nothing else) and only the sequences with a row not
    seen decode, beside what the context keeps (a chat turn's P0 keeps its conversation's KV,
    §9.1). Under the reply contrast the blank negative (template and the prompt's last token) is
    the same every turn: a new reply's capture decodes only new prefixes."""
    tokens = lambda c: sequences[c.seq][:c.index + 1]     # noqa: E731
    todo = sorted({c.seq for c in captures if not ctx.restore_slot(c.slot, tokens(c))})
    if todo:
        moved = [Capture(seq=todo.index(c.seq), index=c.index, slot=c.slot) for c in captures if c.seq in todo]
        prefill_aside(ctx, [sequences[r] for r in todo], moved)
        for c in captures:
            if c.seq in todo:
                ctx.save_row(tokens(c), ctx.hook.slots[c.slot])


def random_like_heads(rows: np.ndarray, n_head: int, seed: int) -> np.ndarray:
    """Random directions with the per-head norms of `rows` [n_layer, width] (the random control)."""
    return random_heads(rows.reshape(rows.shape[0], n_head, -1), seed).reshape(rows.shape)


def _fixed_plan(rt: Runtime, req: PlanRequest, rows: np.ndarray, e: Optional[np.ndarray], info: dict) -> Plan:
    """P0 alone, edited with a fixed direction (frozen FGDILP, saved vectors, the random control)."""
    hook = rt.context(req.method).hook
    hook.slots[SLOT_DIR] = rows
    hook.slots[SLOT_E] = 0 if e is None else e
    hook.check_slots()
    edit = EditSpec(target=0, dir_slot=SLOT_DIR, e_slot=-1 if e is None else SLOT_E)
    return Plan([req.tokens], 0, edits=(edit,), explain=info)


# ---- FGDILP's per-prompt instance ------------------------------------------------------------------
def instance_for(rt: Runtime, req: PlanRequest):
    """The request's instance prefixes: given ones, or built by self-generation and diagnosis."""
    if req.prefixes is not None:
        return req.prefixes, {}
    return build_instance(rt, req.prompt, req.tokens, req.sampling, req.method)


def selfgen_context(rt: Runtime, method: Optional[str]) -> str:
    """Where the candidates are drawn: with KV reuse (chat) in the method's own context, forked from
    the conversation's kept KV, so the new message is decoded once for both them and P0 (§9.2);
    else in the setup context."""
    return method if rt.kv_reuse and method is not None else "setup"


def build_instance(rt: Runtime, prompt: str, raw: list[int], sampling: SamplingParams,
                   method: Optional[str] = None):
    """Self-generation, self-diagnosis and prefix selection for one prompt (docs/method.md §4.1-4.3).
    method: the method the instance is for (its context draws the candidates under KV reuse)."""
    key = (prompt, sampling, rt.fgdilp.setup_key(), rt.diagnoser_choice())
    last = rt.memo.get("instance")
    if rt.reuse_instances and last is not None and last[0] == key:
        sel, info = last[1]
        return sel, copy.deepcopy(info)
    sel, info = _new_instance(rt, raw, sampling, selfgen_context(rt, method))
    if rt.reuse_instances:
        rt.memo["instance"] = (key, (sel, copy.deepcopy(info)))
    return sel, info


def _new_instance(rt: Runtime, raw: list[int], sampling: SamplingParams, where: str):
    from .self_generation import self_generate

    f, model = rt.fgdilp, rt.model
    ctx = rt.context(where)
    outs = self_generate(ctx, model, raw, f.samples, sampling, f.selfgen_tokens, f.selfgen_min_tokens,
                         reuse=rt.kv_reuse)
    texts = [model.detokenize(o) for o in outs]
    which = rt.diagnoser_choice()
    scores = rt.diagnose(texts, which)
    sel = select_prefixes(texts, scores, list(ATTRIBUTE_NAMES), f.negatives, f.pad_blank)
    info = {
        "samples": [{"text": t, "scores": dict(zip(ATTRIBUTE_NAMES, map(float, sc)))} for t, sc in zip(texts, scores)],
        "negatives": [{"text": t, "sample": src, "attributes": a}
                      for t, src, a in zip(sel.negatives, sel.negative_sources, sel.negative_attributes)],
        "positive": {"text": sel.positive, "sample": sel.positive_source},
        "diagnoser": {"source": which, "choice": f.diagnoser},
    }
    if which == "scorer":
        info["diagnoser"]["scorer"] = rt.scorer_diagnoser().name
    else:
        diag = rt.self_diagnoser()
        info["yes_no_tokens"] = [diag.yes_text, diag.no_text]
    return sel, info
