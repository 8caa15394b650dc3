"""FGDILP on the tiny model: exact mode against a torch reference of docs/method.md §4.4-6.1 with given
prefixes, frozen mode against the same reference with delta held at its prompt-end value,
determinism, settings and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fgdilp_cpp.engine import SamplingParams
from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp.generation import EngineParams, Generator
from fgdilp_cpp.method.fusion import fuse
from fgdilp_cpp.method.prefixes import NEG_TEMPLATE, POS_TEMPLATE, Selection, prefixed
from fgdilp_cpp.plans import FgdilpParams, SteerParams
from test_oracle import FORCED, rel_err, torch_tr_edit

PROMPT = "the cat sat on a mat"
SEL = Selection(negatives=["you are a rat", "bad: so bad", ""], negative_sources=[0, 1, None],
                negative_attributes=[["toxicity"], ["insult"], []], positive="a nice day", positive_source=2)
F32 = dict(type_k="f32", type_v="f32", flash_attn="off")


def reference(model, tm, params: FgdilpParams, steer: SteerParams, frozen: bool):
    """Two passes per step: P+ and each P-_j forward, Delta_j = a(P-_j)[-1] - a(P+)[-1], fused with
    the numpy reference, e = mean of the negatives' template ':' rows; then P0 with its last row
    edited (TR rule + renorm). frozen: Delta kept at its prompt-end value, prefixed rows not advanced."""
    tok, tb = model.tokenize, model.token_bytes
    pos = prefixed(tok, tb, SEL.positive + POS_TEMPLATE, PROMPT)
    negs = [prefixed(tok, tb, t + NEG_TEMPLATE, PROMPT) for t in SEL.negatives]
    sp, sns, s0 = tm.new_state(), [tm.new_state() for _ in negs], tm.new_state()
    e, fused, out = None, None, []
    n_head = model.info.n_head
    feeds = [(pos.tokens, [n.tokens for n in negs], model.tokenize(PROMPT))] + \
        [([t], [[t]] * len(negs), [t]) for t in FORCED]
    for fp, fns, f0 in feeds:
        if fused is None or not frozen:
            _, hp = tm.forward(sp, fp)
            hns = [tm.forward(s, f)[1] for s, f in zip(sns, fns)]
            if e is None:
                e = [np.mean([h[li][n.colon_index] for h, n in zip(hns, negs)], axis=0) for li in range(len(hp))]
            fused = [fuse(np.stack([h[li][-1] - hp[li][-1] for h in hns]).astype(np.float32),
                          params.mask_k, params.fusion, params.sign_election) for li in range(len(hp))]

        def edit(li, attn, fused=fused):
            attn = attn.clone()
            d = torch.as_tensor(fused[li], dtype=torch.float64)
            attn[-1] = torch_tr_edit(attn[-1], d, torch.as_tensor(e[li], dtype=torch.float64), n_head,
                                     steer.exp_norm, steer.exp_sim, steer.scale)
            return attn

        logits, _ = tm.forward(s0, f0, edit=edit)
        out.append(np.asarray(logits[-1]))
    return out


@pytest.mark.parametrize("mask_k, fusion, elect", [(50.0, "max", True), (100.0, "mean", False), (30.0, "sum", True)])
def test_exact_mode_equals_torch_reference(model, torch_model, mask_k, fusion, elect):
    params = FgdilpParams(negatives=3, mask_k=mask_k, fusion=fusion, sign_election=elect)
    steer = SteerParams(exp_norm=0.3, exp_sim=0.5, scale=1.5)
    with Generator(model, EngineParams(ctx_size=256, **F32), steer, params) as gen:
        res = gen.generate(PROMPT, "fgdilp", len(FORCED), forced_tokens=FORCED, record_logits=True, prefixes=SEL)
        plain = gen.generate(PROMPT, "none", len(FORCED), forced_tokens=FORCED, record_logits=True)
    assert res.fired_layers == model.info.n_layer
    ref = reference(model, torch_model, params, steer, frozen=False)
    for step, (got, want, unsteered) in enumerate(zip(res.logits, ref, plain.logits)):
        assert rel_err(got[0], want) < 1e-4, step
        assert rel_err(unsteered[0], want) > 1e-2, step


def test_frozen_mode_equals_torch_reference(model, torch_model):
    params = FgdilpParams(negatives=3)
    steer = SteerParams(exp_norm=0.3, exp_sim=0.5, scale=1.5)
    with Generator(model, EngineParams(ctx_size=256, **F32), steer, params) as gen:
        res = gen.generate(PROMPT, "fgdilp-frozen", len(FORCED), forced_tokens=FORCED, record_logits=True,
                           prefixes=SEL, explain=True)
        exact = gen.generate(PROMPT, "fgdilp", len(FORCED), forced_tokens=FORCED, record_logits=True, prefixes=SEL)
    ref = reference(model, torch_model, params, steer, frozen=True)
    for step, (got, want) in enumerate(zip(res.logits, ref)):
        assert rel_err(got[0], want) < 1e-4, step
    # same at the prompt's end, different once the exact mode's delta moves on
    assert rel_err(res.logits[0][0], exact.logits[0][0]) < 1e-5
    assert rel_err(res.logits[-1][0], exact.logits[-1][0]) > 1e-4
    assert len(res.explain["delta_norms"]) == model.info.n_layer


def test_full_pipeline_on_tiny_model_is_deterministic(model):
    params = FgdilpParams(samples=4, selfgen_tokens=6, selfgen_min_tokens=2)
    sampling = SamplingParams(seed=11)
    with Generator(model, EngineParams(ctx_size=256), SteerParams(), params) as gen:
        for method in ("fgdilp", "fgdilp-frozen"):
            a = gen.generate(PROMPT, method, 8, sampling, explain=True)
            b = gen.generate(PROMPT, method, 8, sampling, explain=True)
            c = gen.generate(PROMPT, method, 8, SamplingParams(seed=12))
            assert a.text == b.text and a.explain == b.explain, method
            assert a.tokens != c.tokens, method
            ex = a.explain
            assert len(ex["samples"]) == 4 and len(ex["negatives"]) == 6
            for smp in ex["samples"]:
                assert set(smp["scores"]) == {"toxicity", "sexually_explicit", "threat", "identity_attack",
                                              "profanity", "insult"}
                assert all(0.0 <= v <= 1.0 for v in smp["scores"].values())
            assert a.fired_layers == model.info.n_layer
            assert a.setup_s > 0


def test_several_samples_share_the_prompt(model):
    """n_samples continuations in one run equal the same samples generated one at a time."""
    with Generator(model, EngineParams(ctx_size=256, max_samples=3, max_new=16)) as gen:
        many = gen.generate(PROMPT, "tr", 6, SamplingParams(seed=5), n_samples=3, stop_at_eog=False)
        for g in range(3):
            one = gen.generate(PROMPT, "tr", 6, SamplingParams(seed=5 + g), stop_at_eog=False)
            assert many.samples[g].tokens == one.tokens, g


@pytest.mark.parametrize("params, needle", [
    (FgdilpParams(samples=0), "selfgen_samples"),
    (FgdilpParams(mask_k=0.0), "mask_k"),
    (FgdilpParams(mask_k=100.5), "mask_k"),
    (FgdilpParams(negatives=9), "negatives"),
    (FgdilpParams(fusion="median"), "fusion"),
])
def test_bad_fgdilp_settings(model, params, needle):
    with Generator(model, EngineParams(ctx_size=256), SteerParams(), params) as gen:
        with pytest.raises(FgdilpError, match=needle):
            gen.generate(PROMPT, "fgdilp", 4)


def test_self_generation_lengths_and_seeds(model):
    from fgdilp_cpp.self_generation import self_generate

    with Generator(model, EngineParams(ctx_size=256), SteerParams(), FgdilpParams(samples=6)) as gen:
        ctx = gen.context("setup")
        raw = model.tokenize(PROMPT)
        outs = self_generate(ctx, model, raw, 6, SamplingParams(seed=3), n_new=7, min_new=3)
        again = self_generate(ctx, model, raw, 6, SamplingParams(seed=3), n_new=7, min_new=3)
        # each sample equals a single-sequence run with its own seed (seed + 1 + i)
        single = [gen.generate(PROMPT, "none", 7, SamplingParams(seed=3 + 1 + i)).tokens for i in range(6)]
    assert outs == again
    assert all(3 <= len(o) <= 7 for o in outs)
    assert len({tuple(o) for o in outs}) > 1
    for o, s in zip(outs, single):
        assert o[:3] == s[:3]


def test_reused_instance_gives_the_same_generation(model, monkeypatch):
    from fgdilp_cpp import plans

    built = []
    real = plans._new_instance
    monkeypatch.setattr(plans, "_new_instance", lambda *a: built.append(1) or real(*a))
    params = FgdilpParams(samples=4, selfgen_tokens=6, selfgen_min_tokens=2)
    s = SamplingParams(seed=21)
    with Generator(model, EngineParams(ctx_size=256), SteerParams(), params) as fresh:
        want = [fresh.generate(PROMPT, m, 8, s, explain=True) for m in ("fgdilp", "fgdilp-frozen")]
    assert len(built) == 2
    with Generator(model, EngineParams(ctx_size=256), SteerParams(), params, reuse_instances=True) as gen:
        got = [gen.generate(PROMPT, m, 8, s, explain=True) for m in ("fgdilp", "fgdilp-frozen")]
    assert [r.tokens for r in got] == [r.tokens for r in want]
    assert got[0].explain["samples"] == want[0].explain["samples"]
    assert len(built) == 3                       # the second method did not redo the setup


def test_cancel_from_another_thread(model):
    import threading

    with Generator(model, EngineParams(ctx_size=256)) as gen:
        pieces = []

        def on_text(p):
            pieces.append(p)
            if len(pieces) == 3:
                threading.Thread(target=gen.cancel).start()

        res = gen.generate(PROMPT, "tr", 200, SamplingParams(seed=1), on_text=on_text, stop_at_eog=False)
        assert res.stop_reason == "cancelled"
        assert 3 <= len(res.tokens) < 200
        again = gen.generate(PROMPT, "tr", 10, SamplingParams(seed=1), stop_at_eog=False)
        assert again.stop_reason == "length" and len(again.tokens) == 10   # cancel does not stick
