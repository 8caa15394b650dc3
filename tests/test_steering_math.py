"""The numpy TR edit (the reference) and the native one agree, and both do what docs/method.md §2.2-2.3 says."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

import native_rows
from fgdilp_cpp.method.steering import lambda_norm, lambda_sim, tr_edit

finite = st.floats(-50, 50, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=200, deadline=None)
@given(n_head=st.integers(1, 6), head_dim=st.integers(1, 9), data=st.data(),
       exps=st.tuples(st.floats(0, 1.5), st.floats(0, 1.5)), scale=st.floats(-2, 2),
       use_e=st.booleans(), renorm=st.booleans())
def test_native_edit_equals_numpy(n_head, head_dim, data, exps, scale, use_e, renorm):
    w = n_head * head_dim
    v = data.draw(arrays(np.float32, w, elements=finite))
    d = data.draw(arrays(np.float32, w, elements=finite))
    e = data.draw(arrays(np.float32, w, elements=finite)) if use_e else None
    ref = tr_edit(v, d, e, n_head, exps[0], exps[1], scale, renorm)
    got = native_rows.tr_edit_row(v, d, e, n_head, exps[0], exps[1], scale, renorm)
    tol = 1e-6 * max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=tol)


def test_edit_formula_by_hand():
    # head 0: e parallel to v (cos 1), head 1: e opposite (cos clamped to 0)
    v = np.array([1, 0, 0, 2], np.float32)
    d = np.array([3, 0, 0, 1], np.float32)
    e = np.array([5, 0, 0, -1], np.float32)
    out = tr_edit(v, d, e, n_head=2, exp_norm=0.5, exp_sim=1.0, renorm=False)
    k0 = (1 + 3) ** 0.5 * (1 + 1) ** 1.0
    k1 = (1 + 1) ** 0.5 * (1 + 0) ** 1.0
    np.testing.assert_allclose(out, [1 - k0 * 3, 0, 0, 2 - k1 * 1], rtol=1e-6)


def test_renorm_keeps_row_norm_and_moves_away_from_delta():
    rng = np.random.default_rng(0)
    v, d, e = (rng.normal(size=64).astype(np.float32) for _ in range(3))
    out = tr_edit(v, d, e, n_head=4)
    assert np.linalg.norm(out) == pytest.approx(np.linalg.norm(v), rel=1e-5)
    assert np.dot(out, d) < np.dot(v, d)          # the edit removes delta
    assert not np.allclose(out, v)


def test_lambdas():
    dh = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(lambda_norm(dh, 0.5), [6 ** 0.5, 1.0])
    vh = np.array([[1.0, 0.0], [0.0, 0.0]])
    eh = np.array([[1.0, 1.0], [1.0, 0.0]])
    np.testing.assert_allclose(lambda_sim(vh, eh, 1.0), [1 + 2 ** -0.5, 1.0])   # zero v: cos 0
    np.testing.assert_allclose(lambda_sim(vh, None, 1.0), [1.0, 1.0])


def test_zero_scale_is_identity():
    rng = np.random.default_rng(1)
    v, d = rng.normal(size=16).astype(np.float32), rng.normal(size=16).astype(np.float32)
    np.testing.assert_array_equal(native_rows.tr_edit_row(v, d, None, 2, 0.4, 0.6, 0.0, False), v)
