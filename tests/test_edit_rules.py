"""The edit rules of docs/method.md §2.6-2.7 and §5.6 (issue 11): rotate, the per-head gate, per-head
strengths and the fused delta at the mean delta's norm.

- C++ (fgdilp_edit_row, fgdilp_fuse) = numpy (method/steering.py, method/fusion.py);
- on the tiny model, TR and FGDILP with rotate / gate / --fused-norm mean-delta equal a torch reference of
  the rules written out independently; heads the gate shuts keep the bits of the model's own row;
- the settings reach the hook (flag, TOML, FGDILP_*, per call) and bad values are refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import native_rows
from fgdilp_cpp import native
from fgdilp_cpp.engine import Batch, Context, ContextParams
from fgdilp_cpp.errors import FgdilpError, ParamError
from fgdilp_cpp.generation import EngineParams, Generator
from fgdilp_cpp.method.fusion import fuse
from fgdilp_cpp.method.prefixes import NEG_PREFIX, NEG_TEMPLATE, POS_PREFIX, POS_TEMPLATE, prefixed
from fgdilp_cpp.method.steering import edit_row, edited_heads
from fgdilp_cpp.params import FgdilpParams, SteerParams
from fgdilp_cpp.settings import Settings
from test_fgdilp import SEL
from test_oracle import FORCED, PROMPT, rel_err

F32 = dict(type_k="f32", type_v="f32", flash_attn="off")
finite = st.floats(-100, 100, width=32)


# ---- C++ = numpy --------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(data=st.data(), n_head=st.integers(1, 5), head_dim=st.integers(1, 9), rule=st.sampled_from(["subtract", "rotate"]),
       gate=st.one_of(st.none(), st.floats(-1, 0.9)), renorm=st.booleans(), with_e=st.booleans(),
       scale=st.one_of(st.just(0.0), st.floats(1e-30, 3)))
def test_native_edit_equals_numpy(data, n_head, head_dim, rule, gate, renorm, with_e, scale):
    # no subnormal scale: times a head scale it is 0 in one rounding order and not in another
    w = n_head * head_dim
    v, d, e = (data.draw(arrays(np.float32, w, elements=finite)) for _ in range(3))
    hs = data.draw(st.one_of(st.none(), arrays(np.float32, n_head, elements=st.sampled_from([0.0, 0.5, 1.0, 2.0]))))
    kw = dict(rule=rule, exp_norm=0.4, exp_sim=0.6, scale=scale, renorm=renorm, gate=gate, head_scales=hs)
    want = edit_row(v, d, e if with_e else None, n_head, **kw)
    got, n_edited = native_rows.edit_row(v, d, e if with_e else None, n_head, **kw)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * (1 + float(np.abs(v).max())))
    # a head the rule leaves alone keeps its bits, in both; the count is what changed
    same = [np.array_equal(got.reshape(n_head, -1)[h], v.reshape(n_head, -1)[h]) for h in range(n_head)]
    for h in range(n_head):
        shut = scale == 0 or (hs is not None and hs[h] == 0)
        if shut:
            assert same[h] and np.array_equal(want.reshape(n_head, -1)[h], v.reshape(n_head, -1)[h])
    assert n_edited >= n_head - sum(same)  # every changed head was counted
    if rule == "subtract":
        assert n_edited == int(edited_heads(v, d, n_head, scale, gate, hs).sum())
    if rule == "rotate":   # per-head norm kept
        np.testing.assert_allclose(np.linalg.norm(got.reshape(n_head, -1), axis=1),
                                   np.linalg.norm(v.reshape(n_head, -1), axis=1), rtol=1e-5, atol=1e-5)


def test_gate_shuts_heads_by_cosine():
    d = np.tile(np.array([1, 0, 0, 0], np.float32), 3)                 # 3 heads of 4
    v = np.concatenate([[1, 1, 0, 0], [-1, 0.2, 0, 0], [0, 1, 0, 0]]).astype(np.float32)  # cos .71, -.98, 0
    for rule in ("subtract", "rotate"):
        got, n = native_rows.edit_row(v, d, None, 3, rule=rule, gate=0.0)
        assert n == 1
        assert np.array_equal(got[4:], v[4:]) and not np.array_equal(got[:4], v[:4])
        np.testing.assert_array_equal(edit_row(v, d, None, 3, rule=rule, gate=0.0)[4:], v[4:])
        assert native_rows.edit_row(v, d, None, 3, rule=rule, gate=-1.0)[1] == 3  # every cos > -1
    with pytest.raises(ValueError):
        edit_row(v, d, None, 3, rule="spin")
    with pytest.raises(FgdilpError):
        native_rows.edit_row(v, d, None, 3, rule="spin")


@settings(max_examples=100, deadline=None)
@given(data=st.data(), n=st.integers(1, 6), n_head=st.integers(1, 4), head_dim=st.integers(1, 12),
       k=st.sampled_from([10.0, 50.0, 100.0]), mode=st.sampled_from(["max", "mean", "sum"]), elect=st.booleans())
def test_fused_norm_native_equals_numpy_bits(data, n, n_head, head_dim, k, mode, elect):
    deltas = data.draw(arrays(np.float32, (n, n_head * head_dim), elements=finite))
    got = native_rows.fuse(deltas, k, mode, elect, norm_heads=n_head)
    want = fuse(deltas, k, mode, elect, norm_heads=n_head)
    np.testing.assert_array_equal(got, want)
    mean = deltas.astype(np.float64).mean(axis=0).reshape(n_head, -1)
    plain = fuse(deltas, k, mode, elect).reshape(n_head, -1)
    for g, m, p in zip(got.reshape(n_head, -1).astype(np.float64), mean, plain.astype(np.float64)):
        # rescaled to the mean delta's norm, same direction. A mean norm below float32's smallest
        # normal number may round to 0 on the way or stay a subnormal (hypothesis found [[1e-45],
        # [0]] and [[1.9e-41]]): then only the size is checked, C++ = numpy above holds either way.
        tiny = np.finfo(np.float32).tiny
        if not np.any(p):
            assert not np.any(g)
        elif np.linalg.norm(m) > tiny:
            np.testing.assert_allclose(np.linalg.norm(g), np.linalg.norm(m), rtol=1e-5, atol=1e-37)
            assert float(np.dot(g, p)) > 0
        else:
            assert np.linalg.norm(g) <= tiny


def test_hook_setters_refuse_bad_values():
    with native.NativeHook(2, 3, 4, n_slots=1) as hook:
        for bad in (float("nan"), float("inf"), 1.0, -1.01):
            with pytest.raises(FgdilpError):
                hook.set_gate(bad)
        hook.set_gate(-1.0)
        hook.set_gate(None)
        with pytest.raises(FgdilpError):
            hook.set_edit_rule("spin")
        hook.set_edit_rule("rotate")
        for bad in (np.ones((3, 2)), np.ones(6), np.full((2, 3), -1.0), np.full((2, 3), np.nan), np.full((2, 3), 1e39)):
            with pytest.raises(FgdilpError):
                hook.set_head_scales(bad)
        hook.set_head_scales(np.zeros((2, 3)))
        hook.set_head_scales(None)
        hook.set_fusion(50.0, "max", True, norm_to_mean_delta=True)
        assert hook.norm_to_mean_delta


# ---- the torch oracle ---------------------------------------------------------------------------
def torch_rule_edit(v, delta, e, n_head, a, b, scale, rule="subtract", gate=None, head_scales=None, renorm=True):
    """docs/method.md §2.2-2.7 for one row, in torch, written independently of method/steering.py."""
    vh, dh = v.view(n_head, -1), delta.view(n_head, -1)
    eh = None if e is None else e.view(n_head, -1)
    out, edited = vh.clone(), []
    for h in range(n_head):
        k0 = scale * (1.0 if head_scales is None else float(head_scales[h]))
        cos_d = torch.nn.functional.cosine_similarity(vh[h], dh[h], dim=0, eps=1e-30)
        if k0 == 0 or (gate is not None and not cos_d > gate):
            continue
        lam_norm = (1 + torch.linalg.norm(dh[h])) ** a
        lam_sim = 1.0 if eh is None else \
            (1 + torch.clamp(torch.nn.functional.cosine_similarity(vh[h], eh[h], dim=0), min=0)) ** b
        k = k0 * lam_norm * lam_sim
        if rule == "rotate":
            if not (torch.linalg.norm(vh[h]) > 0 and torch.linalg.norm(dh[h]) > 0):
                continue      # no direction to turn from / away from: the head stays as it is
            u = vh[h] / torch.linalg.norm(vh[h]) - k * dh[h] / torch.linalg.norm(dh[h])
            out[h] = torch.linalg.norm(vh[h]) * u / torch.linalg.norm(u)
        else:
            out[h] = vh[h] - k * dh[h]
        edited.append(h)
    if rule == "subtract" and renorm and edited:
        out[edited] = out[edited] * (torch.linalg.norm(vh[edited]) / torch.linalg.norm(out[edited]))
    return out.reshape(-1)


def torch_tr_rule_logits(model, tm, steer: SteerParams, head_scales=None):
    """TR (one P+, one P-) two passes per step, P0's last row edited by torch_rule_edit."""
    tok, tb = model.tokenize, model.token_bytes
    pos, neg = prefixed(tok, tb, POS_PREFIX, PROMPT), prefixed(tok, tb, NEG_PREFIX, PROMPT)
    sp, sn, s0 = tm.new_state(), tm.new_state(), tm.new_state()
    e, out, n_head = None, [], model.info.n_head
    for fp, fn, f0 in [(pos.tokens, neg.tokens, tok(PROMPT))] + [([t], [t], [t]) for t in FORCED]:
        _, hp = tm.forward(sp, fp)
        _, hn = tm.forward(sn, fn)
        if e is None:
            e = [torch.as_tensor(hn[li][neg.colon_index], dtype=torch.float64) for li in range(len(hn))]
        deltas = [torch.as_tensor(hn[li][-1] - hp[li][-1], dtype=torch.float64) for li in range(len(hn))]

        def edit(li, attn, deltas=deltas):
            attn = attn.clone()
            attn[-1] = torch_rule_edit(attn[-1], deltas[li], e[li], n_head, steer.exp_norm, steer.exp_sim,
                                       steer.scale, steer.edit, steer.gate,
                                       None if head_scales is None else head_scales[li], steer.renorm)
            return attn

        logits, _ = tm.forward(s0, f0, edit=edit)
        out.append(np.asarray(logits[-1]))
    return out


def run_tr(model, steer: SteerParams, head_scales=None, logits_all=False):
    with Generator(model, EngineParams(ctx_size=256, **F32), steer) as gen:
        if head_scales is not None:
            gen.context("tr").hook.set_head_scales(head_scales)
        res = gen.generate(PROMPT, "tr", n_predict=len(FORCED), forced_tokens=FORCED, record_logits=True,
                           logits_all=logits_all)
        return res, gen.context("tr").hook.heads_edited


GATE = 0.1   # on the tiny model this shuts some heads of the last decode and not others (asserted)


@pytest.mark.parametrize("edit, gate", [("rotate", None), ("rotate", GATE), ("subtract", GATE)])
def test_tr_rules_equal_torch_reference(model, torch_model, edit, gate):
    steer = SteerParams(exp_norm=0.3, exp_sim=0.5, scale=0.8, edit=edit, gate=gate)
    res, heads = run_tr(model, steer)
    plain, _ = run_tr(model, SteerParams(scale=0.0))
    n_heads = model.info.n_layer * model.info.n_head
    assert heads == n_heads if gate is None else 0 < heads < n_heads
    ref = torch_tr_rule_logits(model, torch_model, steer)
    for step, (got, want, unsteered) in enumerate(zip(res.logits, ref, plain.logits)):
        assert rel_err(got[0], want) < 1e-4, step
        assert rel_err(unsteered[0], want) > 1e-3, step


def test_head_scales_equal_torch_reference(model, torch_model):
    info = model.info
    hs = np.random.default_rng(3).choice([0.0, 0.5, 1.0, 2.0], size=(info.n_layer, info.n_head)).astype(np.float32)
    hs[0, 0] = 0.0
    steer = SteerParams(scale=0.7, edit="rotate")
    res, _ = run_tr(model, steer, hs)
    ref = torch_tr_rule_logits(model, torch_model, steer, hs)
    for step, (got, want) in enumerate(zip(res.logits, ref)):
        assert rel_err(got[0], want) < 1e-4, step


@pytest.mark.parametrize("edit", ["subtract", "rotate"])
def test_shut_heads_are_bit_identical_to_unsteered(model, edit):
    """A gate no head passes, or every head at strength 0: P0's logits have the bits of a run with
    steering off (the rows are written back as the model computed them)."""
    off, _ = run_tr(model, SteerParams(scale=0.0), logits_all=True)
    shut, heads = run_tr(model, SteerParams(edit=edit, gate=0.999), logits_all=True)
    zero, _ = run_tr(model, SteerParams(edit=edit), np.zeros((model.info.n_layer, model.info.n_head)),
                     logits_all=True)
    assert heads == 0
    for a, b, c in zip(off.logits, shut.logits, zero.logits):
        assert np.array_equal(a, b) and np.array_equal(a, c)


def test_gated_heads_keep_the_models_row(model):
    """Rows of a real decode (captured by the hook): the edit the hook runs leaves each head the
    gate shuts with the bits the model computed, and edits the others."""
    info = model.info
    toks = [model.tokenize(t) for t in (POS_PREFIX + PROMPT, NEG_PREFIX + PROMPT, PROMPT)]
    with native.NativeHook(info.n_layer, info.n_head, info.head_dim, n_slots=3) as hook, \
            Context(model, ContextParams(n_ctx=1024, n_batch=512, n_seq_max=3, **F32), hook=hook) as ctx, \
            Batch(512) as batch:
        for s, t in enumerate(toks):
            for i, x in enumerate(t):
                batch.add(x, i, s, False)
        rows = np.cumsum([len(t) for t in toks]) - 1
        hook.set_plan([(int(r), s) for s, r in enumerate(rows)])
        ctx.decode(batch)
        pos, neg, raw = (hook.slots[s].copy() for s in range(3))        # [n_layer, width] each
    shut = opened = 0
    for li in range(info.n_layer):
        d = neg[li] - pos[li]
        got, _ = native_rows.edit_row(raw[li], d, None, info.n_head, rule="rotate", gate=GATE)
        cos = [np.dot(v, dh) / (np.linalg.norm(v) * np.linalg.norm(dh))
               for v, dh in zip(raw[li].reshape(info.n_head, -1).astype(np.float64),
                                d.reshape(info.n_head, -1).astype(np.float64))]
        for h, c in enumerate(cos):
            block = slice(h * info.head_dim, (h + 1) * info.head_dim)
            if c > GATE:
                opened += 1
                assert not np.array_equal(got[block], raw[li][block])
            else:
                shut += 1
                assert np.array_equal(got[block], raw[li][block])
    assert shut and opened


# ---- FGDILP: fused strength and the rules, exact and frozen -------------------------------------
def torch_fgdilp_logits(model, tm, params: FgdilpParams, steer: SteerParams, frozen: bool):
    """test_fgdilp.reference with --fused-norm and the edit rules (numpy fusion, torch edit)."""
    tok, tb = model.tokenize, model.token_bytes
    pos = prefixed(tok, tb, SEL.positive + POS_TEMPLATE, PROMPT)
    negs = [prefixed(tok, tb, t + NEG_TEMPLATE, PROMPT) for t in SEL.negatives]
    sp, sns, s0 = tm.new_state(), [tm.new_state() for _ in negs], tm.new_state()
    e, fused, out, n_head = None, None, [], model.info.n_head
    nh = n_head if params.fused_norm == "mean-delta" else 0
    feeds = [(pos.tokens, [n.tokens for n in negs], tok(PROMPT))] + [([t], [[t]] * len(negs), [t]) for t in FORCED]
    for fp, fns, f0 in feeds:
        if fused is None or not frozen:
            _, hp = tm.forward(sp, fp)
            hns = [tm.forward(s, f)[1] for s, f in zip(sns, fns)]
            if e is None:
                e = [np.mean([h[li][n.colon_index] for h, n in zip(hns, negs)], axis=0) for li in range(len(hp))]
            fused = [fuse(np.stack([h[li][-1] - hp[li][-1] for h in hns]).astype(np.float32),
                          params.mask_k, params.fusion, params.sign_election, nh) for li in range(len(hp))]

        def edit(li, attn, fused=fused):
            attn = attn.clone()
            attn[-1] = torch_rule_edit(attn[-1], torch.as_tensor(fused[li], dtype=torch.float64),
                                       torch.as_tensor(e[li], dtype=torch.float64), n_head, steer.exp_norm,
                                       steer.exp_sim, steer.scale, steer.edit, steer.gate)
            return attn

        logits, _ = tm.forward(s0, f0, edit=edit)
        out.append(np.asarray(logits[-1]))
    return out


@pytest.mark.parametrize("method, edit", [("fgdilp", "subtract"), ("fgdilp", "rotate"), ("fgdilp-frozen", "subtract")])
def test_fgdilp_fused_norm_equals_torch_reference(model, torch_model, method, edit):
    params = FgdilpParams(negatives=3, fused_norm="mean-delta")
    steer = SteerParams(exp_norm=0.3, exp_sim=0.5, scale=1.2, edit=edit)
    with Generator(model, EngineParams(ctx_size=256, **F32), steer, params) as gen:
        res = gen.generate(PROMPT, method, len(FORCED), forced_tokens=FORCED, record_logits=True, prefixes=SEL)
    with Generator(model, EngineParams(ctx_size=256, **F32), steer, FgdilpParams(negatives=3)) as gen:
        unscaled = gen.generate(PROMPT, method, len(FORCED), forced_tokens=FORCED, record_logits=True, prefixes=SEL)
    ref = torch_fgdilp_logits(model, torch_model, params, steer, frozen=method.endswith("frozen"))
    for step, (got, want, other) in enumerate(zip(res.logits, ref, unscaled.logits)):
        assert rel_err(got[0], want) < 1e-4, step
        assert rel_err(other[0], want) > 1e-3, step   # the rescale changed the steering


# ---- settings -----------------------------------------------------------------------------------
def test_settings_sources(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text('edit = "rotate"\ngate = 0.25\nfused-norm = "mean-delta"\n')
    s = Settings.from_toml(cfg)
    assert (s.steer().edit, s.steer().gate, s.fgdilp().fused_norm) == ("rotate", 0.25, "mean-delta")
    env = Settings.from_env({"FGDILP_GATE": "off", "FGDILP_EDIT": "subtract", "FGDILP_FUSED_NORM": "none"})
    assert env == {"gate": None, "edit": "subtract", "fused_norm": "none"}
    assert Settings.from_env({"FGDILP_GATE": "-0.5"}) == {"gate": -0.5}
    assert s.updated({"gate": "off"}).gate is None
    for field, bad in (("edit", "spin"), ("gate", 1.0), ("gate", 1 - 1e-9), ("gate", -2.0), ("gate", float("nan"))):
        with pytest.raises(ParamError) as err:
            s.updated({field: bad}).steer().check(3)
        assert err.value.field == field
    with pytest.raises(ParamError) as err:
        s.updated({"fused_norm": "max"}).fgdilp()
    assert err.value.field == "fused_norm"
    with pytest.raises(ParamError) as err:
        s.updated({"gate": "often"})
    assert err.value.field == "gate"


def test_per_call_edit_and_gate(model, tiny_llama):
    from fgdilp_cpp.api import Detoxifier

    with Detoxifier.from_file(str(tiny_llama[0]), ctx_size=256, threads=2) as det:
        a = det.generate(PROMPT, n_predict=4, method="tr", edit="rotate", gate=0.1)
        assert det.generator.context("tr").hook.edit_rule == "rotate" and det.generator.context("tr").hook.gate == 0.1
        b = det.generate(PROMPT, n_predict=4, method="tr")
        assert det.generator.context("tr").hook.edit_rule == "subtract" and det.generator.context("tr").hook.gate is None
        assert a.tokens and b.tokens
        with pytest.raises(FgdilpError, match="gate"):
            det.generate(PROMPT, n_predict=4, gate=3.0)
        with pytest.raises(FgdilpError, match="fused_norm"):
            det.generate(PROMPT, n_predict=4, fused_norm="sideways")
        with pytest.raises(FgdilpError, match="per-call"):
            det.generate(PROMPT, n_predict=4, negatives=3)      # sizes the FGDILP contexts: not per call


@pytest.mark.parametrize("args, needle", [(["--gate", "1.5"], "--gate"), (["--gate", "often"], "--gate"),
                                          (["--edit", "spin"], "--edit")])
def test_cli_refuses_bad_rules(cli, tiny_llama, args, needle):
    proc = cli("generate", "-m", tiny_llama[0], "-p", "hello", "--method", "tr", *args)
    assert proc.returncode > 0 and "Traceback" not in proc.stderr and needle in proc.stderr, proc.stderr


def test_explain_reports_the_share_of_heads_edited(model):
    """--explain: the rule, the gate and the share of the planned head edits the gate let through."""
    def share(gate):
        with Generator(model, EngineParams(ctx_size=256, **F32), SteerParams(edit="rotate", gate=gate)) as gen:
            res = gen.generate(PROMPT, "tr", n_predict=len(FORCED), forced_tokens=FORCED, explain=True)
            assert gen.generate(PROMPT, "tr", n_predict=2, forced_tokens=FORCED).explain.get("edit") is None
        assert res.explain["edit"]["rule"] == "rotate" and res.explain["edit"]["gate"] == gate
        return res.explain["edit"]["heads_edited_share"]

    assert share(None) == 1.0
    assert 0.0 < share(GATE) < 1.0
    assert share(0.999) == 0.0


def test_fused_norm_per_call_reaches_the_fusing_hook(tiny_llama):
    """--fused-norm per call (sweeps): the exact FGDILP hook fuses with it, as a Detoxifier made with it."""
    from fgdilp_cpp.api import Detoxifier

    kw = dict(ctx_size=256, threads=1, selfgen_samples=3, selfgen_tokens=4, selfgen_min_tokens=1, n_predict=4,
              method="fgdilp")
    with Detoxifier.from_file(str(tiny_llama[0]), **kw) as det:
        plain = det.generate(PROMPT)
        per_call = det.generate(PROMPT, fused_norm="mean-delta")
        back = det.generate(PROMPT)
    with Detoxifier.from_file(str(tiny_llama[0]), fused_norm="mean-delta", **kw) as det:
        made = det.generate(PROMPT)
    assert per_call.tokens == made.tokens and back.tokens == plain.tokens
