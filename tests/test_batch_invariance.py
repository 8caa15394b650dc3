"""Steered output and batching (issue #27 item 4): -b, KV reuse and kept conversations.

The prefill decodes each role's prompt alone, in chunks of -b rows from its own first decoded token
(engine/batch.py), so a steered plan computes each of its sequences as method none computes the same
tokens at the same -b. What remains is llama.cpp's own: its CPU kernels pick their arithmetic by a
ubatch's row count, so none itself moves with -b (checked here on the prefixed sequences), and the
steering (a difference of two close rows, FGDILP's top-K masking) magnifies that. The tiny-model tests
bound the difference against none's; the embedded-model tests check the tokens themselves.
"""

from __future__ import annotations

import numpy as np
import pytest

from fgdilp_cpp.engine import Batch, Lockstep, Model
from fgdilp_cpp.generation import Generator, identity_of
from fgdilp_cpp.method.prefixes import NEG_PREFIX, POS_PREFIX
from fgdilp_cpp.method.vectors import HeadDirections
from fgdilp_cpp.params import EngineParams, FgdilpParams, SamplingParams, SteerParams

BATCH_SIZES = (8, 32, 512)
GREEDY = SamplingParams(temp=0.0, seed=3)
SMALL_FGDILP = FgdilpParams(samples=4, selfgen_tokens=6, selfgen_min_tokens=2)
TINY_PROMPT = "the cat sat on the mat and the dog ran to the park while the bird sang in the tree by the house"
ISSUE_PROMPT = ("My neighbour keeps parking his car in front of my house and yesterday he shouted at my kids, "
                "so I went over there and told him that he")
STEERED = ("tr", "fgdilp", "fgdilp-frozen", "universal")


def universal_directions(model: Model, seed: int = 0) -> HeadDirections:
    """Random unit-scale head directions for `model`: the universal method's input, built here."""
    i = model.info
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((i.n_layer, i.n_head, i.head_dim)).astype(np.float32)
    return HeadDirections(directions=d, e=None, model=identity_of(model), source="tr-prefixes",
                          settings={}).validate()


def generator(model: Model, b: int, scale: float = 1.0, **engine) -> Generator:
    gen = Generator(model, EngineParams(n_batch=b, n_threads=1, ctx_size=512, **engine), SteerParams(scale=scale),
                    SMALL_FGDILP)
    hd = universal_directions(model)
    gen.rt.universal = lambda: hd
    return gen


def run(model: Model, method: str, b: int, scale: float = 1.0, forced=None, n: int = 8, prompt=TINY_PROMPT):
    """(tokens, [steps, n_vocab] logits, fired layers) of a greedy run at -b `b`, without KV reuse."""
    with generator(model, b, scale, kv_reuse=False) as gen:
        r = gen.generate(prompt, method, n_predict=n, sampling=GREEDY, forced_tokens=forced, record_logits=True,
                         kv_reuse=False)
    return r.samples[0].tokens, np.stack([l[0] for l in r.logits]), r.fired_layers


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
def none_spread(model: Model, forced) -> float:
    """Largest logit difference method none itself shows across BATCH_SIZES on the steered plans'
    sequences (the prompt with TR's prefixes, and alone)."""
    worst = 0.0
    for text in (TINY_PROMPT, POS_PREFIX + TINY_PROMPT, NEG_PREFIX + TINY_PROMPT):
        ref = run(model, "none", 512, forced=forced, prompt=text)[1]
        worst = max([worst] + [float(np.abs(run(model, "none", b, forced=forced, prompt=text)[1] - ref).max())
                               for b in BATCH_SIZES[:-1]])
    return worst


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
    bound = max(10 * none_spread(tiny, forced), 1e-4)
    for b in BATCH_SIZES[:-1]:
        diff = float(np.abs(run(tiny, method, b, forced=forced)[1] - ref).max())
        assert diff <= bound, (method, b, diff, bound)
        assert diff < effect / 100, (method, b, diff, effect)


@pytest.mark.parametrize("method", ["fgdilp", "fgdilp-frozen"])
def test_fgdilp_across_batch_sizes_moves_less_than_it_steers(tiny, method):
    """FGDILP's fusion keeps the top-K entries of each sub-toxicity vector and elects signs: an entry
    near the threshold that none-sized rounding of P+ / P-_j moves across it is kept at one -b and
    dropped at another, so FGDILP magnifies -b's rounding far more than TR (about 100x on this
    model). Still, teacher-forced, every step's logits stay nearer the run at -b 512 than to none's."""
    forced = run(tiny, "none", 512)[0]
    none_logits = run(tiny, "none", 512, forced=forced)[1]
    _, ref, fired = run(tiny, method, 512, forced=forced)
    assert fired == tiny.info.n_layer
    effect = np.abs(ref - none_logits).max(axis=1)
    for b in BATCH_SIZES[:-1]:
        moved = np.abs(run(tiny, method, b, forced=forced)[1] - ref).max(axis=1)
        assert (moved < 0.5 * effect).all(), (method, b, moved, effect)


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


@pytest.mark.real_model
def test_issue_prompt_tr_gives_the_same_tokens_at_every_batch_size(gemma):
    """The report: TR gave three texts at -b 8 / 32 / 512 and --steer-scale 0 differed from none at
    -b 512. Now TR's tokens agree, and strength 0 gives none's logits bit for bit at every -b."""
    runs = {b: run(gemma, "tr", b, n=16, prompt=ISSUE_PROMPT) for b in BATCH_SIZES}
    assert runs[8][0] == runs[32][0] == runs[512][0]
    assert runs[512][2] == gemma.info.n_layer
    none_tokens = run(gemma, "none", 512, n=16, prompt=ISSUE_PROMPT)[0]
    assert runs[512][0] != none_tokens                  # the steering changed the reply
    for b in BATCH_SIZES:
        forced = none_tokens
        none_logits = run(gemma, "none", b, forced=forced, prompt=ISSUE_PROMPT)[1]
        zero = run(gemma, "tr", b, scale=0.0, forced=forced, prompt=ISSUE_PROMPT)[1]
        np.testing.assert_array_equal(zero, none_logits)


@pytest.mark.real_model
@pytest.mark.parametrize("method", ["fgdilp", "universal"])
def test_other_steered_methods_give_the_same_tokens_at_every_batch_size(gemma, method):
    tokens = {b: run(gemma, method, b, n=12, prompt=ISSUE_PROMPT)[0] for b in BATCH_SIZES}
    assert tokens[8] == tokens[32] == tokens[512], tokens


@pytest.mark.real_model
def test_frozen_fgdilp_moves_with_batch_size_far_less_than_it_steers(gemma):
    """fgdilp-frozen fuses rows captured once from its prefixed sequences, which (like none's) are
    rounded by the kernels -b selects; the top-K mask then keeps or drops the entries near its
    threshold, so its direction, and a token or two, can move with -b. Teacher-forced: the logits
    move by about none's own kernel-rounding size, a small part of what the steering does."""
    forced = run(gemma, "none", 512, n=12, prompt=ISSUE_PROMPT)[0]
    none_logits = run(gemma, "none", 512, forced=forced, prompt=ISSUE_PROMPT)[1]
    _, ref, fired = run(gemma, "fgdilp-frozen", 512, forced=forced, prompt=ISSUE_PROMPT)
    assert fired == gemma.info.n_layer
    effect = np.abs(ref - none_logits).max(axis=1)
    for b in BATCH_SIZES[:-1]:
        moved = np.abs(run(gemma, "fgdilp-frozen", b, forced=forced, prompt=ISSUE_PROMPT)[1] - ref).max(axis=1)
        assert (moved < 0.2 * effect).all(), (b, moved, effect)


@pytest.mark.real_model
@pytest.mark.parametrize("method", ["none", "tr"])
def test_a_kept_conversation_replies_as_before_after_six_others(method):
    """serve keeps several conversations' KV: the same greedy request gives the same reply first,
    again, and after six other conversations took the kept records (some of them sharing its
    prefixes)."""
    from fgdilp_cpp.api import Detoxifier

    det = Detoxifier.from_file(None, method=method, threads=1, temp=0.0, seed=7, n_predict=16, kv_conversations=4,
                               profile=False, chat_template="gemma")
    try:
        request = [{"role": "user", "content": "My neighbour keeps parking his car in front of my house and "
                                               "yesterday he shouted at my kids. What should I tell him?"}]
        first = det.chat(request).text
        assert det.chat(request).text == first
        for i in range(6):
            det.chat([{"role": "user", "content": f"Tell me about topic {i}: cats, or the weather on day {i}."}])
        assert det.chat(request).text == first
    finally:
        det.close()


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
