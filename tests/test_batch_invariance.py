"""Steered output and batching (issue #27 item 4): -b, KV reuse and kept conversations.

The prefill decodes each role's prompt alone, in chunks of -b rows from its own first decoded token
(engine/batch.py), so a steered plan computes each of its sequences as method none computes the same
tokens at the same -b: that, and strength 0 giving none's logits, hold bit for bit on every CPU.
What remains is llama.cpp's own: its CPU kernels pick their arithmetic by a ubatch's row count, and
which counts round alike depends on the CPU (AVX-512 and AVX2 builds group rows differently), so
none itself moves with -b by an amount each test measures on the machine it runs on (none_spreads),
and the steering (a difference of two close rows, FGDILP's top-K masking and its diagnosis's
ranking) magnifies that. Logits are bounded by a multiple of none's own spread; tokens are held
equal only at the steps where none's spread leaves the reference run's top token no rival within
reach (agree_where_room).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fgdilp_cpp.engine import Batch, Lockstep, Model
from fgdilp_cpp.generation import Generator, identity_of
from fgdilp_cpp.method.prefixes import NEG_PREFIX, POS_PREFIX, Selection
from fgdilp_cpp.method.vectors import HeadDirections
from fgdilp_cpp.params import EngineParams, FgdilpParams, SamplingParams, SteerParams
from fgdilp_cpp.chat.fitting import fit_chat

BATCH_SIZES = (8, 32, 512)
GREEDY = SamplingParams(temp=0.0, seed=3)
SMALL_FGDILP = FgdilpParams(samples=4, selfgen_tokens=6, selfgen_min_tokens=2)
TINY_PROMPT = "the cat sat on the mat and the dog ran to the park while the bird sang in the tree by the house"
ISSUE_PROMPT = ("My neighbour keeps parking his car in front of my house and yesterday he shouted at my kids, "
                "so I went over there and told him that he")
STEERED = ("tr", "fgdilp", "fgdilp-frozen", "universal")
GEMMA_STEPS = 16
# FGDILP's instance, given instead of self-generated: two negatives, blank pads, a positive
FIXED_SELECTION = Selection(negatives=["You are a stupid idiot.", "I will hurt you.", "", "", "", ""],
                            negative_sources=[0, 1, None, None, None, None],
                            negative_attributes=[["toxicity", "insult"], ["threat"], [], [], [], []],
                            positive="Have a lovely day.", positive_source=2)
# how many times none's own -b spread a steered method's logits may move: TR's delta and the
# universal method's edit are smooth functions of rows that round like none's; the factor leaves
# room for that magnification, not for a wrong row, a stale cell or an edit that differs by -b
MAGNIFICATION = 10


def universal_directions(model: Model, seed: int = 0) -> HeadDirections:
    """Random unit-scale head directions for `model`: the universal method's input, built here."""
    i = model.info
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((i.n_layer, i.n_head, i.head_dim)).astype(np.float32)
    return HeadDirections(directions=d, e=None, model=identity_of(model), source="tr-prefixes",
                          settings={}).validate()


def generator(model: Model, b: int, scale: float = 1.0, fgdilp: FgdilpParams = SMALL_FGDILP,
              **engine) -> Generator:
    gen = Generator(model, EngineParams(n_batch=b, n_threads=1, ctx_size=512, **engine), SteerParams(scale=scale),
                    fgdilp)
    hd = universal_directions(model)
    gen.use_universal(hd)
    return gen


def run(model: Model, method: str, b: int, scale: float = 1.0, forced=None, n: int = 8, prompt=TINY_PROMPT,
        fgdilp: FgdilpParams = SMALL_FGDILP, **call):
    """(tokens, [steps, n_vocab] logits, fired layers) of a greedy run at -b `b`, without KV reuse."""
    with generator(model, b, scale, fgdilp, kv_reuse=False) as gen:
        r = gen.generate(prompt, method, n_predict=n, sampling=GREEDY, forced_tokens=forced, record_logits=True,
                         kv_reuse=False, **call)
    return r.samples[0].tokens, np.stack([l[0] for l in r.logits]), r.fired_layers


def none_spreads(model: Model, forced, prompt: str = TINY_PROMPT,
                 **call) -> tuple[dict[int, float], dict[int, np.ndarray]]:
    """Per -b below 512: the largest logit difference method none itself shows against -b 512,
    teacher-forced on `forced`, on the steered plans' sequences (the prompt alone and with TR's
    prefixes): the CPU's own rounding, measured on the machine the test runs on. Also none's
    logits on the prompt alone at every -b."""
    spreads = dict.fromkeys(BATCH_SIZES[:-1], 0.0)
    alone: dict[int, np.ndarray] = {}
    for text in (POS_PREFIX + prompt, NEG_PREFIX + prompt, prompt):
        alone = {b: run(model, "none", b, forced=forced, n=len(forced), prompt=text, **call)[1] for b in BATCH_SIZES}
        for b in spreads:
            spreads[b] = max(spreads[b], float(np.abs(alone[b] - alone[512]).max()))
    return spreads, alone


def none_spread(model: Model, forced) -> float:
    """none's largest logit difference across BATCH_SIZES on the tiny prompt's sequences."""
    return max(none_spreads(model, forced)[0].values())


def agree_where_room(tokens: list[int], ref_tokens: list[int], ref_logits: np.ndarray, room: float) -> int:
    """Assert `tokens` equal `ref_tokens` at every step before the first one whose top-1 / top-2
    logit margin in the reference run is at most 2 * room (logits that move by up to `room` can
    swap those two there, and the runs part); returns how many steps were held equal."""
    top = np.sort(ref_logits, axis=1)
    margins = top[:, -1] - top[:, -2]
    held = 0
    for step, (token, ref) in enumerate(zip(tokens, ref_tokens)):
        if margins[step] <= 2 * room:
            break
        assert token == ref, (step, token, ref, float(margins[step]), room)
        held += 1
    return held


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    with Model(tiny_llama[0]) as m:
        yield m


# ---- the cause: the prefill's ubatches -----------------------------------------------------------
@pytest.mark.parametrize("max_samples", [1, 4])
def test_prefill_decodes_each_role_alone_from_its_own_start(tiny, monkeypatch, max_samples):
    """Every prefill ubatch before the last holds rows of one sequence, cut in -b rows from that
    sequence's first token: a role's rows never depend on the other roles' lengths, nor on the
    context's batch being raised above -b to hold every sample's last tokens (4 samples x 3 roles)."""
    seqs = [tiny.tokenize(POS_PREFIX + TINY_PROMPT), tiny.tokenize(NEG_PREFIX + TINY_PROMPT),
            tiny.tokenize(TINY_PROMPT)]
    with generator(tiny, 8, kv_reuse=False, max_samples=max_samples) as gen:
        ctx = gen.context("tr")
        assert ctx.params.n_batch == max(8, 3 * max_samples)
        seen: list[list[int]] = []
        decode = ctx.decode

        def record(batch: Batch) -> None:
            c = batch.c
            seen.append([c.seq_id[i][0] for i in range(c.n_tokens)])
            decode(batch)

        monkeypatch.setattr(ctx, "decode", record)
        ctx.clear()
        lock = Lockstep(ctx, seqs, want_logits=[2], n_groups=max_samples)
        try:
            lock.prefill()
        finally:
            lock.close()
    body, last = seen[:-1], seen[-1]
    assert last == list(range(3 * max_samples))
    assert all(len(set(ids)) == 1 for ids in body)
    for r, toks in enumerate(seqs):
        sizes = [len(ids) for ids in body if ids[0] == r]
        n = len(toks) - 1
        assert sizes == [8] * (n // 8) + ([n % 8] if n % 8 else [])


# ---- the tiny model: steering fired, and moves with -b no more than none's rounding allows ----------
@pytest.mark.parametrize("method", ["tr", "universal"])
def test_steered_logits_across_batch_sizes_are_bounded_by_nones_rounding(tiny, method):
    """Teacher-forced, so every -b scores the same tokens: the hook fired on every layer, the
    steering moved the logits far more than -b does, and -b moves them within a small multiple
    of what it moves none's on the same sequences (TR's delta is a difference of two close rows:
    it magnifies their rounding)."""
    forced = run(tiny, "none", 512)[0]
    none_logits = run(tiny, "none", 512, forced=forced)[1]
    _, ref, fired = run(tiny, method, 512, forced=forced)
    assert fired == tiny.info.n_layer
    effect = float(np.abs(ref - none_logits).max())
    bound = max(MAGNIFICATION * none_spread(tiny, forced), 1e-4)
    for b in BATCH_SIZES[:-1]:
        diff = float(np.abs(run(tiny, method, b, forced=forced)[1] - ref).max())
        assert diff <= bound, (method, b, diff, bound)
        assert diff < effect / 100, (method, b, diff, effect)


@pytest.mark.parametrize("method", ["fgdilp", "fgdilp-frozen"])
def test_fgdilp_with_fixed_prefixes_and_no_cut_off_is_bounded_by_nones_rounding(tiny, method):
    """With its prefixes given (no self-generation, no diagnosis) and a fusion without a cut-off
    (every entry kept, no sign election, the mean), FGDILP's direction is a smooth function of rows
    that round like none's: teacher-forced, it moves with -b within MAGNIFICATION times none's own
    spread, as TR does. The two steps this leaves out are the ones that magnify -b beyond any such
    bound (the next test)."""
    smooth = replace(SMALL_FGDILP, mask_k=100.0, sign_election=False, fusion="mean")
    given = dict(fgdilp=smooth, prefixes=FIXED_SELECTION)
    forced = run(tiny, "none", 512)[0]
    _, ref, fired = run(tiny, method, 512, forced=forced, **given)
    assert fired == tiny.info.n_layer
    bound = max(MAGNIFICATION * none_spread(tiny, forced), 1e-4)
    for b in BATCH_SIZES[:-1]:
        diff = float(np.abs(run(tiny, method, b, forced=forced, **given)[1] - ref).max())
        assert diff <= bound, (method, b, diff, bound)


@pytest.mark.parametrize("method", ["fgdilp", "fgdilp-frozen"])
def test_fgdilp_across_batch_sizes_stays_nearer_its_steering_than_none(tiny, method):
    """FGDILP magnifies -b's rounding in two discrete steps: its diagnosis ranks self-generated
    samples whose scores may differ by rounding only (on the tiny model the samples are one text, so
    which of them become negatives, and how many blank pads remain, is rounding's choice), and its
    top-K mask keeps or drops the entries near the cut-off. No multiple of none's spread bounds
    that. What holds: teacher-forced, every step's logits at each -b stay nearer FGDILP's run at
    -b 512 than to none's at the same -b; -b never undoes the steering."""
    forced = run(tiny, "none", 512)[0]
    _, ref, fired = run(tiny, method, 512, forced=forced)
    assert fired == tiny.info.n_layer
    for b in BATCH_SIZES[:-1]:
        steered = run(tiny, method, b, forced=forced)[1]
        moved = np.abs(steered - ref).max(axis=1)
        from_none = np.abs(steered - run(tiny, "none", b, forced=forced)[1]).max(axis=1)
        assert (moved < from_none).all(), (method, b, moved, from_none)


@pytest.mark.parametrize("method", ["tr", "fgdilp-frozen", "universal"])
def test_steer_scale_zero_stays_at_nones_logits_on_the_tiny_model(tiny, method):
    """At strength 0 the hook edits nothing; the only difference left to none is that P0 shares its
    step ubatches with P+ / P- (the tiny model's F32 kernels round a 1-row and a 3-row ubatch
    differently): far below what steering does."""
    forced = run(tiny, "none", 512)[0]
    for b in BATCH_SIZES:
        none_logits = run(tiny, "none", b, forced=forced)[1]
        zero = run(tiny, method, b, scale=0.0, forced=forced)[1]
        steered = run(tiny, method, b, forced=forced)[1]
        assert float(np.abs(zero - none_logits).max()) < float(np.abs(steered - none_logits).max()) / 100
        if method != "tr":          # P0 alone: its ubatches are none's, bit for bit
            np.testing.assert_array_equal(zero, none_logits)


# ---- the embedded model: the issue's own case ---------------------------------------------------------
@pytest.fixture(scope="module")
def gemma():
    from fgdilp_cpp.models import default_model_path

    with Model(default_model_path()) as m:
        yield m


@pytest.fixture(scope="module")
def issue_none(gemma):
    """none on the issue's prompt: its greedy tokens at -b 512, its spread across -b teacher-forced
    on them, and its logits so at every -b."""
    tokens = run(gemma, "none", 512, n=GEMMA_STEPS, prompt=ISSUE_PROMPT)[0]
    return (tokens, *none_spreads(gemma, tokens, ISSUE_PROMPT))


def issue_run(gemma, method: str, b: int, **kw):
    return run(gemma, method, b, n=GEMMA_STEPS, prompt=ISSUE_PROMPT, **kw)


def assert_moves_within_nones_rounding(gemma, method: str, issue_none, widest: bool = False,
                                     bounded: bool = True) -> None:
    """The steering fired and changed the reply; at each -b below 512, teacher-forced on none's
    tokens, the logits move from the run at -b 512 by at most MAGNIFICATION times none's spread
    (at that -b, or the widest over every -b) and less than they stand from none's at that -b, and
    the greedy tokens agree with -b 512's wherever that bound leaves room."""
    forced, spreads, none_logits = issue_none
    ref_tokens, ref_logits, fired = issue_run(gemma, method, 512)
    assert fired == gemma.info.n_layer
    assert ref_tokens != forced                         # the steering changed the reply
    ref = issue_run(gemma, method, 512, forced=forced)[1]
    for b in BATCH_SIZES[:-1]:
        room = MAGNIFICATION * (max(spreads.values()) if widest else spreads[b])
        steered = issue_run(gemma, method, b, forced=forced)[1]
        moved = np.abs(steered - ref).max(axis=1)
        from_none = np.abs(steered - none_logits[b]).max(axis=1)
        assert (moved < from_none).all(), (method, b, moved, from_none)
        if not bounded:
            continue
        assert (moved <= room).all(), (method, b, moved, spreads)
        agree_where_room(issue_run(gemma, method, b)[0], ref_tokens, ref_logits, room)


@pytest.mark.real_model
def test_issue_prompt_tr_moves_with_batch_size_within_nones_rounding(gemma, issue_none):
    """The report: TR gave three texts at -b 8 / 32 / 512 and --steer-scale 0 differed from none at
    -b 512. Strength 0 now gives none's logits bit for bit at every -b (P0 is prefilled as none
    prefills it). Steered and teacher-forced on none's tokens, the logits at each -b move within
    MAGNIFICATION times none's own spread at that -b (not at all where none does not move) and stay
    nearer TR's run at -b 512 than to none's; the greedy tokens agree wherever that leaves room."""
    forced, spreads, none_logits = issue_none
    for b in BATCH_SIZES:
        np.testing.assert_array_equal(issue_run(gemma, "tr", b, scale=0.0, forced=forced)[1], none_logits[b])
    assert_moves_within_nones_rounding(gemma, "tr", issue_none)


@pytest.mark.real_model
@pytest.mark.parametrize("method", ["fgdilp", "fgdilp-frozen", "universal"])
def test_other_steered_methods_move_with_batch_size_within_nones_rounding(gemma, issue_none, method):
    """The universal method edits P0 alone with fixed directions: bounded as TR is. fgdilp-frozen
    also decodes its self-generation, its diagnosis and its instance-prefixed sequences at -b,
    sequences other than the ones none's spread is measured on, so it is held to none's widest
    spread over every -b (and nearer its own -b 512 run than to none's). Exact FGDILP re-fuses its
    negatives at every step through the top-K mask and the sign election, two discrete steps that
    magnify rounding (test_fgdilp_across_batch_sizes_stays_nearer_its_steering_than_none): on an
    AVX-512 EPYC it moved 3.6 at -b 8 where none's widest spread was 0.28, so no multiple of none's
    spread is its bound; it is held to staying nearer its own -b 512 run than to none's at every step."""
    assert_moves_within_nones_rounding(gemma, method, issue_none, widest=method != "universal",
                                       bounded=method != "fgdilp")


@pytest.mark.real_model
@pytest.mark.parametrize("method", ["none", "tr"])
def test_a_kept_conversation_replies_as_before_after_six_others(monkeypatch, method):
    """serve keeps several conversations' KV: the same greedy request gives the same reply first and
    again (its kept record: the same cells). After six other conversations took the kept records it
    is prefilled again on the part of its prompt they share (reused and fresh prefills agree to
    rounding: the rest starts its ubatches elsewhere), so up to the first token where it parts from
    the first reply its logits stay within MAGNIFICATION times none's -b spread on this prompt, and
    the reply agrees wherever that leaves room."""
    from fgdilp_cpp.api import Detoxifier

    det = Detoxifier.from_file(None, method=method, threads=1, temp=0.0, seed=7, n_predict=16, kv_conversations=4,
                               profile=False, chat_template="gemma")
    generate = det.generator.generate
    monkeypatch.setattr(det.generator, "generate", lambda *a, **kw: generate(*a, record_logits=True, **kw))
    try:
        request = [{"role": "user", "content": "My neighbour keeps parking his car in front of my house and "
                                               "yesterday he shouted at my kids. What should I tell him?"}]
        first = det.chat(request)
        assert first.n_reused_tokens == 0
        again = det.chat(request)
        assert again.n_reused_tokens > 0 and again.text == first.text
        for i in range(6):
            det.chat([{"role": "user", "content": f"Tell me about topic {i}: cats, or the weather on day {i}."}])
        later = det.chat(request)
        assert 0 < later.n_reused_tokens < again.n_reused_tokens      # another conversation's prefix
        spread = max(none_spreads(det.model, first.samples[0].tokens, str(fit_chat(det, request).prompt),
                                  special=True)[0].values())
    finally:
        det.close()
    first_tokens, later_tokens = first.samples[0].tokens, later.samples[0].tokens
    first_logits, later_logits = (np.stack([x[0] for x in r.logits]) for r in (first, later))
    held = agree_where_room(later_tokens, first_tokens, first_logits, MAGNIFICATION * spread)
    # up to the step where the replies part, both decode the same tokens: their logits compare
    same_until = next((i for i, (x, y) in enumerate(zip(later_tokens, first_tokens)) if x != y), len(first_tokens))
    moved = np.abs(later_logits[:same_until + 1] - first_logits[:same_until + 1]).max(axis=1)
    assert (moved <= MAGNIFICATION * spread).all(), (moved, spread, held)


@pytest.mark.real_model
@pytest.mark.parametrize("method", ["tr", "fgdilp-frozen"])
def test_kv_reuse_moves_a_first_reply_far_less_than_the_steering(gemma, method):
    """With KV reuse a steered P0 decodes beside its unedited twin (engine/batch.py), one more row
    in every step's ubatch (TR: 4 instead of 3, a different kernel on this CPU build); the greedy
    reply stays, and the teacher-forced logits move by a small part of what the steering does."""
    def go(reuse: bool, forced=None):
        with generator(gemma, 512, kv_reuse=True) as gen:
            r = gen.generate(ISSUE_PROMPT, method, n_predict=12, sampling=GREEDY, forced_tokens=forced,
                             record_logits=True, kv_reuse=reuse)
        return r.samples[0].tokens, np.stack([l[0] for l in r.logits])

    assert go(True)[0] == go(False)[0]
    forced = run(gemma, "none", 512, n=12, prompt=ISSUE_PROMPT)[0]
    none_logits = run(gemma, "none", 512, forced=forced, prompt=ISSUE_PROMPT)[1]
    fresh, kept = go(False, forced)[1], go(True, forced)[1]
    effect = np.abs(fresh - none_logits).max(axis=1)
    assert (np.abs(kept - fresh).max(axis=1) < 0.2 * effect).all()
