"""The native hook's refusals through the real surface: hook creation, the per-decode checks on the
tiny model's llama.cpp graph, and a steering strength that overflows (API and CLI)."""

from __future__ import annotations

import math

import llama_cpp.llama_cpp as ll
import numpy as np
import pytest

from fgdilp_cpp import Detoxifier
from fgdilp_cpp import native
from fgdilp_cpp.engine import Batch, Context, ContextParams
from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp.native import EditSpec, HookError, NativeHook
from test_cli_errors import assert_clean_error


@pytest.mark.parametrize("kwargs, needle", [
    (dict(scale=math.inf), "finite in float32"),
    (dict(scale=1e39), "finite in float32"),          # finite in Python, inf in float32
    (dict(exp_norm=math.nan), "finite in float32"),
    (dict(exp_sim=-math.inf), "finite in float32"),
    (dict(layer_start=2), "layer range 2..-1"),        # the model has layers 0..1
    (dict(layer_start=1, layer_end=0), "layer range 1..0"),
    (dict(layer_end=2), "layer range 0..2"),
    (dict(n_slots=-1), "n_slots=-1"),
    (dict(n_slots=native.MAX_SLOTS + 1), "n_slots=4097"),
])
def test_hook_init_refuses(kwargs, needle):
    with pytest.raises(FgdilpError, match=needle.replace(".", r"\.")):
        NativeHook(2, 2, 4, **kwargs)


@pytest.mark.parametrize("shape", [(0, 2, 4), (2, 0, 4), (2, 2, 0), (native.MAX_LAYER + 1, 2, 4),
                                   (2, 65536, 32768)])  # the last: n_head * head_dim = 2^31 > INT32_MAX
def test_hook_init_refuses_shapes(shape):
    with pytest.raises(FgdilpError, match="cannot steer a model of this shape"):
        NativeHook(*shape)


def test_hook_init_accepts_the_edges():
    with NativeHook(1, 1, 1, n_slots=0, scale=0.0, layer_start=0, layer_end=0) as hook:
        assert hook.handle


def test_begin_checks_the_plan_against_the_batch():
    with NativeHook(2, 2, 4, n_slots=1) as hook:
        hook.set_plan((), [EditSpec(target=4, pos=0, neg=(1,))])
        with pytest.raises(HookError, match="names row 4 but the decode has 4 tokens") as exc:
            hook.begin(4)
        assert exc.value.code == native.ERR_ROW
        with pytest.raises(HookError) as exc:
            hook.begin(0)
        assert exc.value.code == native.ERR_ARG
        hook.begin(5)
        with pytest.raises(HookError):   # nothing decoded: no layer fired
            hook.end()


def test_refused_plan_keeps_the_old_one(model):
    """A refused set_plan leaves the previous plan steering the next decode."""
    info = model.info
    with NativeHook(info.n_layer, info.n_head, info.head_dim, n_slots=1) as hook, \
            Context(model, ContextParams(n_ctx=64, n_batch=16, n_threads=2), hook=hook) as ctx:
        hook.slots[0] = 0.5
        hook.set_plan((), [EditSpec(target=2, dir_slot=0)])
        with pytest.raises(FgdilpError, match="invalid hook plan"):
            hook.set_plan((), [EditSpec(target=2, dir_slot=1)])   # no slot 1
        _decode(ctx, model, 3)
        assert hook.edits_applied == info.n_layer


def _decode(ctx: Context, model, n: int) -> np.ndarray:
    """Decode the first n tokens of a fixed text as one batch; the logits of its last row (a copy)."""
    toks = model.tokenize("the cat sat on the mat and looked around")[:n]
    assert len(toks) == n
    with Batch(n) as b:
        for i, t in enumerate(toks):
            b.add(t, i, 0, i == n - 1)
        ctx.clear()
        ctx.decode(b)
    return ctx.logits(n - 1).copy()


def test_nonfinite_steered_row_fails_the_decode(model):
    """An inf planted in a direction makes the steered rows NaN: the decode raises, and the same
    hook and context steer again once the direction is finite."""
    info = model.info
    with NativeHook(info.n_layer, info.n_head, info.head_dim, n_slots=1) as hook, \
            Context(model, ContextParams(n_ctx=64, n_batch=16, n_threads=2), hook=hook) as ctx:
        hook.slots[0] = 0.25
        hook.slots[0, 1, 3] = np.inf                            # layer 1 only
        hook.set_plan((), [EditSpec(target=4, dir_slot=0)])
        with pytest.raises(HookError, match="kqv_out-1: the steered row 4 is not finite") as exc:
            _decode(ctx, model, 5)
        assert exc.value.code == native.ERR_NONFINITE
        assert hook.fired_layers == 2 and hook.edits_applied == 1   # stopped at layer 1, nothing written there
        hook.slots[0, 1, 3] = 0.25
        logits = _decode(ctx, model, 5)
        assert hook.edits_applied == info.n_layer
        assert np.isfinite(logits).all()
        hook.set_plan()
        assert not np.array_equal(logits, _decode(ctx, model, 5))  # the steering did something


def test_row_count_must_equal_the_decode(model):
    """The callback compares each real kqv_out node's row count with begin's n_tokens."""
    info = model.info
    with NativeHook(info.n_layer, info.n_head, info.head_dim, n_slots=1) as hook, \
            Context(model, ContextParams(n_ctx=64, n_batch=16, n_threads=2), hook=hook) as ctx, \
            Batch(4) as b:
        for i, t in enumerate(model.tokenize("the cat sat on")[:4]):
            b.add(t, i, 0, i == 3)
        hook.set_plan([(1, 0)])
        hook.begin(5)                                # says 5 tokens, decodes 4
        assert ll.llama_decode(ctx.ptr, b.c) == 0
        with pytest.raises(HookError, match="kqv_out-0 has 4 rows but the decode has 5 tokens") as exc:
            hook.end()
        assert exc.value.code == native.ERR_ROW
        assert hook.fired_layers == 0
        ctx.clear()
        ctx.decode(b)                                # through Context: begin gets the batch's size
        assert hook.fired_layers == info.n_layer


def test_api_overflowing_scale_raises_then_recovers(tiny_llama):
    with Detoxifier.from_file(tiny_llama[0], method="tr", ctx_size=256, n_predict=6, threads=2) as d:
        with pytest.raises(FgdilpError, match="not finite"):
            d.generate("The weather today", steer_scale=1e38)
        with pytest.raises(FgdilpError, match="finite"):
            d.generate("The weather today", steer_scale=1e39)
        out = d.generate("The weather today")
        assert out.samples[0].tokens


@pytest.mark.parametrize("args, needle", [
    (("--steer-scale", "1e38"), "is not finite"),       # the steered rows overflow float
    (("--exp-norm", "1000"), "is not finite"),
    (("--steer-scale", "1e39"), "finite in float32"),   # refused when the hook is made
])
def test_cli_overflowing_steering(cli, tiny_llama, args, needle):
    proc = cli("generate", "-m", tiny_llama[0], "-p", "The weather today", "--method", "tr", "-n", "4",
               "-t", "2", *args)
    assert_clean_error(proc, needle)


def test_library_from_older_sources_is_refused(monkeypatch, tmp_path):
    """The library of a checkout before fgdilp_hook_check_params: a clear error, not a traceback."""
    import ctypes

    real_cdll = ctypes.CDLL

    class Old:  # the library as it loads, less one of the functions this package declares
        def __init__(self, path):
            self._real = real_cdll(path)

        def __getattr__(self, name):
            if name == "fgdilp_hook_check_params":
                raise AttributeError(f"undefined symbol: {name}")
            return getattr(self._real, name)

    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native.ctypes, "CDLL", Old)
    with pytest.raises(FgdilpError, match="does not match this fgdilp-cpp .*undefined symbol: "
                                          "fgdilp_hook_check_params.*make install"):
        native.load_library()
