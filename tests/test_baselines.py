"""Evaluation baselines: llama.cpp's control vector (cvec) and the random-direction control."""

import numpy as np

from fgdilp_cpp.engine.tensors import read_tensors
from fgdilp_cpp.generation import EngineParams, Generator
from fgdilp_cpp.method.cvec import residual_directions, save_control_vector
from fgdilp_cpp.plans import SteerParams, random_like_heads
from test_oracle import FORCED, PROMPT, rel_err


def test_read_tensors_equals_written_weights(tiny_llama):
    path, weights, cfg = tiny_llama
    names = ["blk.1.attn_output.weight", "blk.0.attn_q.weight", "token_embd.weight"]
    got = read_tensors(path, names)
    for n in names:
        assert np.array_equal(got[n], weights[n]), n


def test_random_control_keeps_head_norms():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(3, 4 * 16)).astype(np.float32)
    r = random_like_heads(rows, 4, seed=1)
    np.testing.assert_allclose(np.linalg.norm(r.reshape(3, 4, 16), axis=-1),
                               np.linalg.norm(rows.reshape(3, 4, 16), axis=-1), rtol=1e-5)
    assert not np.allclose(r, rows)
    assert np.array_equal(r, random_like_heads(rows, 4, seed=1))


def test_residual_directions_formula():
    rows = np.array([[3.0, 4.0, 0.0, 0.0]], np.float32)     # 2 heads of dim 2: norms 5 and 0
    w_o = [np.eye(4, dtype=np.float32)[:3]]                   # n_embd 3
    v = residual_directions(rows, w_o, n_head=2, exp_norm=0.5, scale=2.0)
    np.testing.assert_allclose(v, [[-2 * 6 ** 0.5 * 3, -2 * 6 ** 0.5 * 4, 0.0]], rtol=1e-6)


def test_cvec_and_random_steer_and_leave_no_trace(model):
    with Generator(model, EngineParams(ctx_size=256, type_k="f32", type_v="f32"), SteerParams(scale=2.0)) as gen:
        kw = dict(n_predict=len(FORCED), forced_tokens=FORCED, record_logits=True)
        none_before = gen.generate(PROMPT, "none", **kw)
        cvec = gen.generate(PROMPT, "cvec", **kw)
        rnd = gen.generate(PROMPT, "random", **kw)
        tr = gen.generate(PROMPT, "tr", **kw)
        cvec2 = gen.generate(PROMPT, "cvec", **kw)
        assert rnd.fired_layers == model.info.n_layer and cvec.fired_layers == 0
        for step in range(len(FORCED) + 1):
            assert rel_err(cvec.logits[step][0], none_before.logits[step][0]) > 1e-3
            assert rel_err(rnd.logits[step][0], none_before.logits[step][0]) > 1e-3
            assert rel_err(rnd.logits[step][0], tr.logits[step][0]) > 1e-3
            assert np.array_equal(cvec.logits[step], cvec2.logits[step])
        # the control vector is removed after its generation: the next context user is unsteered
        ctx = gen.context("cvec")
        assert ctx.model is model
        with Generator(model, EngineParams(ctx_size=256, type_k="f32", type_v="f32")) as fresh:
            a = fresh.generate(PROMPT, "none", **kw)
        gen._ctx["none"] = ctx       # run "none" through the context that held the vector
        b = gen.generate(PROMPT, "none", **kw)
        for x, y in zip(a.logits, b.logits):
            assert np.array_equal(x, y)


def test_control_vector_file_loads_in_llama_cpp(model, tmp_path):
    import gguf

    vec = np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32)
    p = tmp_path / "cv.gguf"
    save_control_vector(p, vec, "llama")
    r = gguf.GGUFReader(str(p))
    names = sorted(t.name for t in r.tensors)
    assert names == ["direction.1", "direction.2"]
    assert np.array_equal(np.array([t for t in r.tensors if t.name == "direction.2"][0].data), vec[2])


def test_set_steer_on_existing_hooks_equals_fresh_hooks(model):
    """Exponents, renormalisation, scale and layer range changed after the hooks exist steer
    exactly as hooks made with those values."""
    engine = EngineParams(ctx_size=256, type_k="f32", type_v="f32")
    other = SteerParams(exp_norm=0.1, exp_sim=0.2, scale=1.5, layer_start=1, layer_end=2, renorm=False)
    kw = dict(n_predict=len(FORCED), forced_tokens=FORCED, record_logits=True)
    with Generator(model, engine) as gen, Generator(model, engine, other) as fresh:
        before = gen.generate(PROMPT, "tr", **kw)
        gen.set_steer(other)
        changed = gen.generate(PROMPT, "tr", **kw)
        expected = fresh.generate(PROMPT, "tr", **kw)
    for x, y, z in zip(changed.logits, expected.logits, before.logits):
        assert np.array_equal(x, y)
        assert rel_err(x, z) > 1e-3
