"""FGDILP fusion: the numpy reference (method/fusion.py) by hand and by its properties, and the native
fgdilp_fuse against it on random and adversarial inputs."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

import native_rows
from fgdilp_cpp import native
from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp.method.fusion import FUSION_MODES, elect_signs, fuse, keep_count, mask_top_k

MODES_ELECT = [(m, e) for m in FUSION_MODES for e in (True, False)]
K_VALUES = [0.5, 10.0, 33.3, 50.0, 90.0, 100.0]

finite = st.floats(-50, 50, allow_nan=False, allow_infinity=False, width=32)
small_ints = st.integers(-3, 3).map(float)  # exact ties in |value| and many zeros


def assert_native_matches(deltas, k, mode, elect):
    ref = fuse(deltas, k, mode, elect)
    got = native_rows.fuse(deltas, k, mode, elect)
    assert got.dtype == np.float32 and got.shape == ref.shape
    tol = 1e-6 * max(float(np.abs(np.asarray(deltas, np.float32)).max(initial=0.0)), 1e-30)
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol, err_msg=f"K={k} mode={mode} elect={elect}")
    return ref


def deltas_strategy(elements, max_width=48):
    return st.integers(1, 8).flatmap(
        lambda n: st.integers(1, max_width).flatmap(lambda w: arrays(np.float32, (n, w), elements=elements)))


# --- the reference, by hand ---------------------------------------------------------------------

def test_keep_count():
    assert keep_count(10, 50) == 5
    assert keep_count(7, 50) == 4          # ceil(3.5)
    assert keep_count(10, 10) == 1         # exactly 1, not ceil(1.0000000001)
    assert keep_count(10, 100) == 10
    assert keep_count(3, 0.001) == 1       # never keeps nothing
    assert keep_count(4096, 33.3) == math.ceil(float(np.float32(33.3)) * 4096 / 100)


def test_mask_ties_go_to_the_lower_index():
    np.testing.assert_array_equal(mask_top_k(np.array([1, -1, 1, -1], np.float32), 50), [1, -1, 0, 0])
    np.testing.assert_array_equal(mask_top_k(np.array([0.5, 2, -2, 2], np.float32), 50), [0, 2, -2, 0])
    np.testing.assert_array_equal(mask_top_k(np.array([3, 1, 2], np.float32), 34), [3, 0, 2])
    np.testing.assert_array_equal(mask_top_k(np.array([0, 0, 5, 0], np.float32), 50), [0, 0, 5, 0])


def test_fuse_by_hand():
    d = np.array([[3, -1, 2, 0.5],
                  [-4, -2, 2, 1]], np.float32)
    # K = 50 keeps 2 of 4: m1 = [3, 0, 2, 0], m2 = [-4, -2, 0, 0] (|2| tie: index 1 before index 2)
    # w = [9/13 - 16/20, -4/20, 4/13, 0] -> s = [-, -, +, 0]; majority sign(-1 - 1 + 1) = -1
    m = np.stack([mask_top_k(r, 50) for r in d])
    np.testing.assert_array_equal(m, [[3, 0, 2, 0], [-4, -2, 0, 0]])
    np.testing.assert_array_equal(elect_signs(m), [-1, -1, 1, -1])
    np.testing.assert_array_equal(fuse(d, 50, "max"), [-4, -2, 2, 0])
    np.testing.assert_array_equal(fuse(d, 50, "mean"), [-4, -2, 2, 0])
    np.testing.assert_array_equal(fuse(d, 50, "sum"), [-4, -2, 2, 0])
    np.testing.assert_array_equal(fuse(d, 50, "max", elect=False), [-4, -2, 2, 0])
    np.testing.assert_array_equal(fuse(d, 50, "mean", elect=False), [-0.5, -2, 2, 0])
    np.testing.assert_array_equal(fuse(d, 50, "sum", elect=False), [-1, -2, 2, 0])
    # K = 100: c3 agrees on +, so mean / sum combine both
    np.testing.assert_allclose(fuse(d, 100, "mean"), [-4, -1.5, 2, 0.75])
    np.testing.assert_allclose(fuse(d, 100, "sum"), [-4, -3, 4, 1.5])
    for mode, elect in MODES_ELECT:
        np.testing.assert_array_equal(native_rows.fuse(d, 50, mode, elect), fuse(d, 50, mode, elect))
        np.testing.assert_array_equal(native_rows.fuse(d, 100, mode, elect), fuse(d, 100, mode, elect))


def test_elect_majority_fallbacks():
    # an exact tie on c1 (equal norms, opposite signs) takes the layer's majority sign, +1 when tied
    m = np.array([[1, 1, 0], [0, -1, 0]], np.float32)   # norms 2 and 1: w = [1/2, 1/2 - 1, 0]
    np.testing.assert_array_equal(elect_signs(m), [1, -1, 1])
    m = np.array([[-1, 2, 0], [-1, -2, 0]], np.float32)  # w = [-, 0, 0]: majority -1
    np.testing.assert_array_equal(elect_signs(m), [-1, -1, -1])
    np.testing.assert_array_equal(elect_signs(np.zeros((3, 4), np.float32)), [1, 1, 1, 1])


# --- native == numpy ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode,elect", MODES_ELECT)
@settings(max_examples=60, deadline=None)
@given(deltas=deltas_strategy(finite), k=st.sampled_from(K_VALUES) | st.floats(0.015625, 100, width=32))
def test_native_equals_numpy_random(mode, elect, deltas, k):
    assert_native_matches(deltas, k, mode, elect)


@pytest.mark.parametrize("mode,elect", MODES_ELECT)
@settings(max_examples=60, deadline=None)
@given(deltas=deltas_strategy(small_ints), k=st.sampled_from(K_VALUES))
def test_native_equals_numpy_exact_ties(mode, elect, deltas, k):
    assert_native_matches(deltas, k, mode, elect)


@pytest.mark.parametrize("n", range(1, 9))
def test_native_is_bit_identical_on_normal_rows(n):
    """Both sides take float64 sums in the same order: not just close, the same bits."""
    rng = np.random.default_rng(n)
    d = (rng.standard_normal((n, 4096)) * rng.uniform(0.01, 10, (n, 1))).astype(np.float32)
    for mode, elect in MODES_ELECT:
        for k in K_VALUES:
            ref, got = fuse(d, k, mode, elect), native_rows.fuse(d, k, mode, elect)
            assert np.array_equal(ref.view(np.uint32), got.view(np.uint32)), (mode, elect, k)


def adversarial_cases():
    rng = np.random.default_rng(7)
    base = rng.standard_normal(64).astype(np.float32)
    ints = rng.integers(-2, 3, (6, 64)).astype(np.float32)
    yield "integer-valued", ints
    yield "all magnitudes equal", np.where(rng.random((5, 64)) < 0.5, -1.0, 1.0).astype(np.float32)
    yield "equal magnitudes, one row", np.full((1, 64), -0.25, np.float32)
    yield "zeros", np.zeros((3, 64), np.float32)
    yield "mostly zeros", np.where(rng.random((4, 64)) < 0.8, 0, ints[:4]).astype(np.float32)
    yield "all same sign", np.abs(rng.standard_normal((6, 64))).astype(np.float32)
    yield "all negative", -np.abs(rng.standard_normal((6, 64))).astype(np.float32)
    yield "all opposite", np.stack([base, -base])
    yield "opposite pairs", np.stack([base, -base, 2 * base, -2 * base])
    yield "one delta zero", np.stack([base, np.zeros_like(base), -0.5 * base])
    yield "duplicates", np.stack([base] * 8)
    yield "width 1", np.array([[1.0], [-2.0], [2.0]], np.float32)
    b64 = base.astype(np.float64)
    yield "huge and tiny", np.stack([b64 * (3e38 / np.abs(b64).max()), b64 * 1e-40]).astype(np.float32)
    yield "negative zeros", np.array([[-0.0, 1, -0.0, -1], [0.0, -0.0, 2, -0.0]], np.float32)


@pytest.mark.parametrize("name,deltas", list(adversarial_cases()), ids=lambda x: x if isinstance(x, str) else "")
@pytest.mark.parametrize("mode,elect", MODES_ELECT)
def test_native_equals_numpy_adversarial(name, deltas, mode, elect):
    for k in K_VALUES:
        ref = assert_native_matches(deltas, k, mode, elect)
        assert np.all(np.isfinite(ref))


def test_all_opposite_cancels():
    base = np.random.default_rng(3).standard_normal(32).astype(np.float32)
    d = np.stack([base, -base])
    # w_c = 0 everywhere: every coordinate takes the majority sign (+1) and keeps |base|
    np.testing.assert_array_equal(elect_signs(d), np.ones(32))
    np.testing.assert_array_equal(fuse(d, 100, "max"), np.abs(base))
    np.testing.assert_array_equal(fuse(d, 100, "sum", elect=False), np.zeros(32))
    np.testing.assert_array_equal(native_rows.fuse(d, 100, "sum", elect=False), np.zeros(32))


def test_one_negative_is_the_masked_delta():
    d = np.random.default_rng(4).standard_normal((1, 100)).astype(np.float32)
    for mode, elect in MODES_ELECT:
        for k in K_VALUES:
            masked = mask_top_k(d[0], k)
            np.testing.assert_array_equal(fuse(d, k, mode, elect), masked)
            np.testing.assert_array_equal(native_rows.fuse(d, k, mode, elect), masked)


def test_zero_delta_contributes_nothing():
    rng = np.random.default_rng(5)
    d = rng.standard_normal((3, 40)).astype(np.float32)
    with_zero = np.concatenate([d, np.zeros((1, 40), np.float32)])
    for mode, elect in MODES_ELECT:  # mean counts only the nonzero entries
        np.testing.assert_array_equal(fuse(with_zero, 50, mode, elect), fuse(d, 50, mode, elect))
        np.testing.assert_array_equal(native_rows.fuse(with_zero, 50, mode, elect), fuse(d, 50, mode, elect))


# --- rejected input -----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_rejected(bad):
    d = np.ones((3, 8), np.float32)
    d[1, 5] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        fuse(d)
    with pytest.raises(ValueError, match="NaN or inf"):
        mask_top_k(d[1], 100)
    with pytest.raises(native.FusionError, match="NaN or inf") as exc:
        native_rows.fuse(d)
    assert exc.value.code == native.ERR_NONFINITE


@pytest.mark.parametrize("k", [0, -1, 100.5, 1e-50, np.nan, np.inf])
def test_bad_k_rejected(k):
    d = np.ones((2, 8), np.float32)
    with pytest.raises(ValueError):
        fuse(d, k)
    with pytest.raises(native.FusionError) as exc:
        native_rows.fuse(d, k)
    assert exc.value.code == native.ERR_ARG


@pytest.mark.parametrize("n", [0, 9])
def test_bad_n_rejected(n):
    d = np.ones((n, 8), np.float32)
    with pytest.raises(ValueError):
        fuse(d)
    with pytest.raises(ValueError):  # FusionError is a ValueError (and an FgdilpError)
        native_rows.fuse(d)


def test_bad_shape_and_mode_rejected():
    d = np.ones((2, 8), np.float32)
    for mode in ("median", "MAX", ""):
        with pytest.raises(ValueError, match="unknown fusion mode"):
            fuse(d, mode=mode)
        with pytest.raises(native.FusionError, match="unknown fusion mode"):
            native_rows.fuse(d, mode=mode)
    for raw in (3, -1):  # an unknown enum value reaches the C check
        with pytest.raises(native.FusionError) as exc:
            native_rows.fuse(d, mode=raw)
        assert exc.value.code == native.ERR_ARG
    for shape in [(8,), (2, 0), (1, 2, 4)]:
        with pytest.raises(ValueError):
            fuse(np.ones(shape, np.float32))
        with pytest.raises(FgdilpError):
            native_rows.fuse(np.ones(shape, np.float32))


def test_rejection_leaves_out_untouched():
    lib = native.load_library()
    d = np.ones((2, 4), np.float32)
    d[0, 0] = np.nan
    out = np.full(4, 7.0, np.float32)
    p = lib.fgdilp_fusion_default_params()
    assert lib.fgdilp_fuse(native.as_fptr(d), 2, 4, p, native.as_fptr(out)) == native.ERR_NONFINITE
    np.testing.assert_array_equal(out, 7.0)
    p.k_pct = 0.0
    assert lib.fgdilp_fuse(native.as_fptr(np.ones((2, 4), np.float32)), 2, 4, p, native.as_fptr(out)) == \
        native.ERR_ARG
    np.testing.assert_array_equal(out, 7.0)


def test_c_defaults():
    p = native.load_library().fgdilp_fusion_default_params()
    assert (p.k_pct, p.mode, p.elect) == (50.0, native.FUSION_MAX, True)


# --- properties ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", FUSION_MODES)
@settings(max_examples=80, deadline=None)
@given(deltas=deltas_strategy(finite | small_ints), k=st.sampled_from(K_VALUES))
def test_elected_sign_is_respected(mode, deltas, k):
    masked = np.stack([mask_top_k(r, k) for r in deltas])
    s = elect_signs(masked)
    assert set(np.unique(s)) <= {-1, 1}
    out = fuse(deltas, k, mode, elect=True)
    nz = out != 0
    np.testing.assert_array_equal(np.sign(out[nz]), s[nz])


@pytest.mark.parametrize("mode", ["max", "mean"])
@pytest.mark.parametrize("elect", [True, False])
@settings(max_examples=80, deadline=None)
@given(deltas=deltas_strategy(finite | small_ints), k=st.sampled_from(K_VALUES))
def test_max_and_mean_stay_within_the_inputs(mode, elect, deltas, k):
    out = fuse(deltas, k, mode, elect)
    assert np.all(np.abs(out) <= np.abs(deltas).max(axis=0))


@settings(max_examples=200, deadline=None)
@given(delta=arrays(np.float32, st.integers(1, 300),
                    elements=finite.filter(bool) | st.sampled_from([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0])),
       k=st.sampled_from(K_VALUES) | st.floats(0.015625, 100, width=32))
def test_mask_keeps_exactly_n_keep(delta, k):
    assert np.all(delta != 0)
    masked = mask_top_k(delta, k)
    n_keep = keep_count(delta.size, k)
    assert np.count_nonzero(masked) == n_keep
    kept = masked != 0
    np.testing.assert_array_equal(masked[kept], delta[kept])
    if n_keep < delta.size:  # nothing dropped is larger than anything kept
        assert np.abs(delta[~kept]).max() <= np.abs(delta[kept]).min()
    native_masked = native_rows.fuse(delta[None], k)  # n = 1: the fusion is the masked vector
    np.testing.assert_array_equal(native_masked, masked)


@settings(max_examples=100, deadline=None)
@given(delta=arrays(np.float32, st.integers(1, 200), elements=finite), mode=st.sampled_from(FUSION_MODES),
       elect=st.booleans())
def test_k100_one_delta_is_identity(delta, mode, elect):
    np.testing.assert_array_equal(fuse(delta[None], 100.0, mode, elect), delta)
    np.testing.assert_array_equal(native_rows.fuse(delta[None], 100.0, mode, elect), delta)


# --- the hook's fusion settings -----------------------------------------------------------------

def test_hook_fusion_settings_and_plans():
    with native.NativeHook(2, 2, 4, n_slots=1) as hook:
        assert hook.fusion == (100.0, "max", True)  # one-negative TR stays plain TR by default
        hook.set_fusion(30.0, "mean", False)
        assert hook.fusion == (30.0, "mean", False)
        for k, mode in [(0, "max"), (101, "max"), (50, "median")]:
            with pytest.raises(native.FusionError):
                hook.set_fusion(k, mode)
        hook.set_plan((), [native.EditSpec(target=9, pos=0, neg=tuple(range(1, 9)))])  # 8 negatives
        hook.set_plan((), [native.EditSpec(target=4, pos=0, neg=(1, 2, 3))])
        with pytest.raises(FgdilpError):
            hook.set_plan((), [native.EditSpec(target=4, pos=0, neg=())])  # rows need a negative
        with pytest.raises(FgdilpError):
            hook.set_plan((), [native.EditSpec(target=4, pos=0, neg=tuple(range(1, 10)))])
    with pytest.raises(native.FusionError):
        native.NativeHook(2, 2, 4, fusion_k_pct=0.0)
