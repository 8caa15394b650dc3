"""ctypes binding of native/ (libfgdilp): the kqv_out capture-and-edit hook.

The library is loaded after llama_cpp so that it shares llama-cpp-python's libggml-base, and it
must have been compiled against the very llama-cpp-python version that runs: checked at load.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import site
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import FgdilpError
from .params import MAX_NEGATIVES as MAX_NEG   # FGDILP_MAX_NEG of native/fgdilp.h

MAX_LAYER = 4096   # FGDILP_MAX_LAYER
MAX_SLOTS = 4096   # FGDILP_MAX_SLOTS
INT32_MAX = 2**31 - 1

OK = 0
ERR_ARG = -1
ERR_TENSOR = -2
ERR_NOT_FIRED = -3
ERR_ROW = -4
ERR_NONFINITE = -5
ERR_ALLOC = -6
ERR_REFIRED = -7

FUSION_MAX = 0
FUSION_MEAN = 1
FUSION_SUM = 2
FUSION_MODE_IDS = {"max": FUSION_MAX, "mean": FUSION_MEAN, "sum": FUSION_SUM}

EDIT_TR = 0
EDIT_ROTATE = 1
EDIT_RULE_IDS = {"subtract": EDIT_TR, "rotate": EDIT_ROTATE}   # enum fgdilp_edit_rule

_LIB_NAME = "libfgdilp.so"


class HookError(FgdilpError):
    """A decode the hook had to fail: kqv_out nodes missing, unexpected or out of step with the batch
    (ERR_TENSOR, ERR_NOT_FIRED, ERR_ROW, ERR_REFIRED), or a steered row that came out NaN or inf
    (ERR_NONFINITE). That decode's logits must not be used."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class FusionError(FgdilpError, ValueError):
    """fgdilp_fuse / fgdilp_hook_set_fusion refused its input (bad n, K or mode; NaN or inf)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class HookParams(ctypes.Structure):
    _fields_ = [
        ("n_layer", ctypes.c_int32),
        ("n_head", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("n_slots", ctypes.c_int32),
        ("exp_norm", ctypes.c_float),
        ("exp_sim", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("layer_start", ctypes.c_int32),
        ("layer_end", ctypes.c_int32),
        ("renorm", ctypes.c_bool),
    ]


class Edit(ctypes.Structure):
    _fields_ = [
        ("target_row", ctypes.c_int32),
        ("pos_row", ctypes.c_int32),
        ("neg_rows", ctypes.c_int32 * MAX_NEG),
        ("n_neg", ctypes.c_int32),
        ("dir_slot", ctypes.c_int32),
        ("e_slot", ctypes.c_int32),
    ]


class FusionParams(ctypes.Structure):
    _fields_ = [
        ("k_pct", ctypes.c_float),
        ("mode", ctypes.c_int32),
        ("elect", ctypes.c_bool),
        ("norm_heads", ctypes.c_int32),
    ]


class EditParams(ctypes.Structure):
    _fields_ = [
        ("rule", ctypes.c_int32),
        ("exp_norm", ctypes.c_float),
        ("exp_sim", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("renorm", ctypes.c_bool),
        ("gated", ctypes.c_bool),
        ("gate", ctypes.c_float),
    ]


class Capture(ctypes.Structure):
    _fields_ = [("row", ctypes.c_int32), ("slot", ctypes.c_int32)]


@dataclass(frozen=True)
class EditSpec:
    """One in-place edit of row `target` (rows are batch rows of the decode that runs it)."""

    target: int
    pos: int = -1
    neg: tuple[int, ...] = ()
    dir_slot: int = -1
    e_slot: int = -1

    def to_c(self) -> Edit:
        if len(self.neg) > MAX_NEG:
            raise FgdilpError(f"at most {MAX_NEG} negative rows per edit")
        e = Edit()
        e.target_row, e.pos_row, e.n_neg = self.target, self.pos, len(self.neg)
        for j, r in enumerate(self.neg):
            e.neg_rows[j] = r
        e.dir_slot, e.e_slot = self.dir_slot, self.e_slot
        return e


def _candidates() -> list[Path]:
    here = Path(__file__).resolve().parent
    found = []
    env = os.environ.get("FGDILP_NATIVE_LIB")
    if env:
        found.append(Path(env))
    found.append(here / _LIB_NAME)
    dirs = [sysconfig.get_paths()["platlib"], sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    found += [Path(d) / "fgdilp_cpp" / _LIB_NAME for d in dirs]
    found += sorted((here.parent / "build").glob(f"*/{_LIB_NAME}"))
    return found


def _declare(lib: ctypes.CDLL) -> None:
    c_hook = ctypes.c_void_p
    i32, f32, fptr = ctypes.c_int32, ctypes.c_float, ctypes.POINTER(ctypes.c_float)
    sig = {
        "fgdilp_hook_default_params": (HookParams, []),
        "fgdilp_hook_check_params": (i32, [ctypes.POINTER(HookParams)]),
        "fgdilp_hook_init": (c_hook, [ctypes.POINTER(HookParams)]),
        "fgdilp_hook_free": (None, [c_hook]),
        "fgdilp_hook_set_layer_scales": (i32, [c_hook, fptr, i32]),
        "fgdilp_hook_set_exponents": (i32, [c_hook, f32, f32, ctypes.c_bool]),
        "fgdilp_hook_set_fusion": (i32, [c_hook, ctypes.POINTER(FusionParams)]),
        "fgdilp_hook_set_edit_rule": (i32, [c_hook, i32]),
        "fgdilp_hook_set_gate": (i32, [c_hook, ctypes.c_bool, f32]),
        "fgdilp_hook_set_head_scales": (i32, [c_hook, fptr, i32]),
        "fgdilp_hook_heads_edited": (i32, [c_hook]),
        "fgdilp_edit_default_params": (EditParams, []),
        "fgdilp_edit_row": (i32, [fptr, fptr, fptr, fptr, i32, i32, ctypes.POINTER(EditParams)]),
        "fgdilp_hook_set_plan": (i32, [c_hook, ctypes.POINTER(Capture), i32, ctypes.POINTER(Edit), i32]),
        "fgdilp_hook_slots": (fptr, [c_hook]),
        "fgdilp_hook_check_slots": (i32, [c_hook]),
        "fgdilp_hook_begin": (i32, [c_hook, i32]),
        "fgdilp_hook_end": (i32, [c_hook]),
        "fgdilp_hook_fired_layers": (i32, [c_hook]),
        "fgdilp_hook_edits_applied": (i32, [c_hook]),
        "fgdilp_hook_last_error": (ctypes.c_char_p, [c_hook]),
        "fgdilp_build_llama_cpp_python_version": (ctypes.c_char_p, []),
        "fgdilp_abort_flag": (ctypes.c_bool, [ctypes.c_void_p]),
        "fgdilp_log_discard": (None, [i32, ctypes.c_char_p, ctypes.c_void_p]),
        "fgdilp_tr_edit_row": (i32, [fptr, fptr, fptr, i32, i32, f32, f32, f32, ctypes.c_bool]),
        "fgdilp_fusion_default_params": (FusionParams, []),
        "fgdilp_fuse": (i32, [fptr, i32, i32, ctypes.POINTER(FusionParams), fptr]),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


def load_library() -> ctypes.CDLL:
    """Load libfgdilp once, after llama_cpp, and check it matches the running llama-cpp-python."""
    global _lib
    if _lib is not None:
        return _lib
    import llama_cpp  # noqa: F401  (loads libggml-base first, so ours binds to the same copy)

    path = next((p for p in _candidates() if p.is_file()), None)
    if path is None:
        raise FgdilpError(
            "the native library libfgdilp.so is not built; run `make install` "
            "(or `pip install --no-build-isolation -e .`) in the fgdilp-cpp checkout"
        )
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise FgdilpError(f"cannot load the native library {path}: {exc}") from None
    try:
        _declare(lib)
    except AttributeError as exc:  # a library built from older (or newer) sources than this package
        raise FgdilpError(f"{path} does not match this fgdilp-cpp ({exc}); rebuild it with `make install`") from None
    built = lib.fgdilp_build_llama_cpp_python_version().decode()
    running = importlib.metadata.version("llama_cpp_python")
    if built != running:
        raise FgdilpError(
            f"{path.name} was built against llama-cpp-python {built} but {running} is installed; "
            "rebuild it with `make install`"
        )
    _lib = lib
    return lib


_lib: ctypes.CDLL | None = None
load_library()  # at import: a library built for another llama-cpp-python is refused here


def abort_callback_address() -> int:
    """Address of fgdilp_abort_flag, for llama_context_params.abort_callback."""
    return ctypes.cast(load_library().fgdilp_abort_flag, ctypes.c_void_p).value


def log_discard_address() -> int:
    """Address of fgdilp_log_discard, a llama.cpp log callback that drops the text."""
    return ctypes.cast(load_library().fgdilp_log_discard, ctypes.c_void_p).value


def as_fptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


def fusion_params(lib: ctypes.CDLL, k_pct: float, mode: str | int, elect: bool,
                   norm_heads: int = 0) -> FusionParams:
    """The C params; a mode name is mapped to its enum value, an int is passed through unchecked."""
    p = lib.fgdilp_fusion_default_params()
    if isinstance(mode, str):
        if mode not in FUSION_MODE_IDS:
            raise FusionError(f"unknown fusion mode {mode!r} (expected one of {', '.join(FUSION_MODE_IDS)})",
                              ERR_ARG)
        mode = FUSION_MODE_IDS[mode]
    p.k_pct, p.mode, p.elect, p.norm_heads = k_pct, mode, elect, norm_heads
    return p


class NativeHook:
    """Owns one fgdilp_hook; create it before the llama context and free it after (a context manager)."""

    def __init__(self, n_layer: int, n_head: int, head_dim: int, n_slots: int = 4, *,
                 exp_norm: float = 0.4, exp_sim: float = 0.6, scale: float = 1.0,
                 layer_start: int = 0, layer_end: int = -1, renorm: bool = True,
                 fusion_k_pct: float = 100.0, fusion_mode: str = "max", fusion_elect: bool = True):
        """fusion_*: how the edits' rows are fused (set_fusion). K = 100 keeps one negative's delta
        whole (plain TR); the C library's own default is K = 50."""
        self._lib = load_library()
        p = self._lib.fgdilp_hook_default_params()
        p.n_layer, p.n_head, p.head_dim, p.n_slots = n_layer, n_head, head_dim, n_slots
        p.exp_norm, p.exp_sim, p.scale, p.renorm = exp_norm, exp_sim, scale, renorm
        p.layer_start, p.layer_end = layer_start, layer_end
        rc = self._lib.fgdilp_hook_check_params(ctypes.byref(p))
        if rc == ERR_NONFINITE:  # e.g. a scale of 1e39 is finite in Python but inf in float32
            raise FgdilpError(f"steering values must be finite in float32: scale {scale}, exp-norm {exp_norm}, "
                              f"exp-sim {exp_sim}")
        if rc != OK:
            raise FgdilpError(f"cannot steer a model of this shape with layer range {layer_start}..{layer_end}: "
                              f"n_layer={n_layer} (1..{MAX_LAYER}), n_head={n_head}, head_dim={head_dim} "
                              f"(n_head*head_dim <= {INT32_MAX}), n_slots={n_slots} (0..{MAX_SLOTS})")
        self._h = self._lib.fgdilp_hook_init(ctypes.byref(p))
        if not self._h:
            raise FgdilpError(f"out of memory creating the hook (n_layer={n_layer}, n_head={n_head}, "
                              f"head_dim={head_dim}, n_slots={n_slots})")
        self.n_layer, self.n_head, self.head_dim, self.n_slots = n_layer, n_head, head_dim, n_slots
        self.width = n_head * head_dim
        self.edit_rule, self.gate = "subtract", None
        self.reset_totals()
        try:
            self.set_fusion(fusion_k_pct, fusion_mode, fusion_elect)
        except FusionError:
            self.close()
            raise
        ptr = self._lib.fgdilp_hook_slots(self._h)
        # [n_slots, n_layer, width], a view of the hook's own memory
        self.slots = np.ctypeslib.as_array(ptr, shape=(n_slots, n_layer, self.width)) if n_slots else \
            np.zeros((0, n_layer, self.width), np.float32)
        self.n_planned_edits = 0
        self.planned = False
        end = n_layer - 1 if layer_end < 0 else layer_end
        self.n_steered_layers = 0 if scale == 0 else max(0, min(end, n_layer - 1) - max(layer_start, 0) + 1)

    # the two values that go into llama_context_params
    @property
    def callback_address(self) -> int:
        return ctypes.cast(self._lib.fgdilp_hook_eval_callback, ctypes.c_void_p).value

    @property
    def handle(self) -> int:
        return self._h

    def set_plan(self, captures: Sequence[tuple[int, int]] = (), edits: Sequence[EditSpec] = ()) -> None:
        """Rows to capture (row, slot) and edits for the following decodes; empty = hook idle."""
        caps = (Capture * max(len(captures), 1))(*[Capture(r, s) for r, s in captures])
        eds = (Edit * max(len(edits), 1))(*[e.to_c() for e in edits])
        rc = self._lib.fgdilp_hook_set_plan(self._h, caps, len(captures), eds, len(edits))
        if rc == ERR_ALLOC:
            raise FgdilpError(f"out of memory for a hook plan of {len(captures)} captures and {len(edits)} edits")
        if rc != OK:  # the previous plan stays in force
            raise FgdilpError(f"invalid hook plan (status {rc}): captures={list(captures)} edits={list(edits)}")
        self.n_planned_edits = len(edits)
        self.planned = bool(captures) or bool(edits)

    def set_fusion(self, k_pct: float = 50.0, mode: str = "max", elect: bool = True,
                   norm_to_mean_delta: bool = False) -> None:
        """Fusion params (K in (0, 100], max | mean | sum, sign election; norm_to_mean_delta: each
        head of the fused delta rescaled to the norm of the mean delta, --fused-norm tr) of the
        following decodes."""
        p = fusion_params(self._lib, k_pct, mode, elect, self.n_head if norm_to_mean_delta else 0)
        rc = self._lib.fgdilp_hook_set_fusion(self._h, ctypes.byref(p))
        if rc != OK:
            raise FusionError(f"invalid fusion params (K={k_pct}, mode={mode!r}; K must be in (0, 100])", rc)
        self.fusion = (float(p.k_pct), mode, bool(elect))
        self.norm_to_mean_delta = bool(norm_to_mean_delta)

    def set_edit_rule(self, rule: str) -> None:
        """The edit of the following decodes: "subtract" (TR's edit, renormalised) or "rotate" (per-head norm kept)."""
        if rule not in EDIT_RULE_IDS:
            raise FgdilpError(f"unknown edit rule {rule!r} (expected one of {', '.join(EDIT_RULE_IDS)})")
        if self._lib.fgdilp_hook_set_edit_rule(self._h, EDIT_RULE_IDS[rule]) != OK:
            raise FgdilpError(f"the hook refused edit rule {rule!r}")
        self.edit_rule = rule

    def set_gate(self, theta: float | None) -> None:
        """Edit a head only where cos(v_h, delta_h) > theta (theta in [-1, 1)); None = every head."""
        rc = self._lib.fgdilp_hook_set_gate(self._h, theta is not None, 0.0 if theta is None else theta)
        if rc != OK:
            raise FgdilpError(f"invalid gate {theta!r}: needs a finite value in [-1, 1)")
        self.gate = theta

    def set_head_scales(self, scales: np.ndarray | None) -> None:
        """Per-head strength [n_layer, n_head] (>= 0, finite; 0 leaves a head untouched); None = all 1."""
        if scales is None:
            self._lib.fgdilp_hook_set_head_scales(self._h, None, 0)
            return
        with np.errstate(over="ignore"):
            a = np.ascontiguousarray(scales, dtype=np.float32)
        if a.shape != (self.n_layer, self.n_head):
            raise FgdilpError(f"head scales need shape ({self.n_layer}, {self.n_head}), not {a.shape}")
        rc = self._lib.fgdilp_hook_set_head_scales(self._h, as_fptr(a), a.size)
        if rc != OK:
            raise FgdilpError("invalid head scales: need finite values >= 0 (in float32)")

    def set_layer_scales(self, scales: Sequence[float]) -> None:
        with np.errstate(over="ignore"):  # a scale past float32 becomes inf, which the library refuses
            a = np.ascontiguousarray(scales, dtype=np.float32)
        rc = self._lib.fgdilp_hook_set_layer_scales(self._h, as_fptr(a), a.size)
        if rc != OK:
            raise FgdilpError(f"invalid layer scales (need {self.n_layer} values, finite in float32)")
        self.n_steered_layers = int(np.count_nonzero(a))

    def set_exponents(self, exp_norm: float, exp_sim: float, renorm: bool) -> None:
        """The TR edit's exponents and renormalisation for the following decodes."""
        rc = self._lib.fgdilp_hook_set_exponents(self._h, exp_norm, exp_sim, renorm)
        if rc != OK:
            raise FgdilpError(f"invalid exponents (exp-norm {exp_norm}, exp-sim {exp_sim}: need finite values)")

    def check_slots(self) -> None:
        if self._lib.fgdilp_hook_check_slots(self._h) != OK:
            raise FgdilpError("a steering vector holds NaN or inf")

    def begin(self, n_tokens: int) -> None:
        """Right before llama_decode of a batch of n_tokens rows; raises HookError (do not decode)
        when n_tokens < 1 or the plan names a row >= n_tokens."""
        rc = self._lib.fgdilp_hook_begin(self._h, n_tokens)
        if rc != OK:
            raise HookError(self._lib.fgdilp_hook_last_error(self._h).decode(errors="replace"), rc)

    def end(self) -> None:
        rc = self._lib.fgdilp_hook_end(self._h)
        self.heads_total += self.heads_edited
        self.head_edits_total += self.edits_applied * self.n_head
        if rc != OK:
            raise HookError(self._lib.fgdilp_hook_last_error(self._h).decode(errors="replace"), rc)

    @property
    def fired_layers(self) -> int:
        return self._lib.fgdilp_hook_fired_layers(self._h)

    @property
    def edits_applied(self) -> int:
        return self._lib.fgdilp_hook_edits_applied(self._h)

    def reset_totals(self) -> None:
        """Zero heads_total / head_edits_total: heads edited, and heads the plan's edits reached
        (rows edited x n_head), summed over the decodes (end()) since."""
        self.heads_total = self.head_edits_total = 0

    @property
    def heads_edited_share(self) -> float | None:
        """Share of the planned head edits since reset_totals() that were made (the rest: gated or
        at strength 0); None before any edit."""
        return self.heads_total / self.head_edits_total if self.head_edits_total else None

    @property
    def heads_edited(self) -> int:
        """Heads edited in the last decode, summed over rows and layers (gated heads not counted)."""
        return self._lib.fgdilp_hook_heads_edited(self._h)

    def close(self) -> None:
        if self._h:
            self._lib.fgdilp_hook_free(self._h)
            self._h = None
            self.slots = None

    def __enter__(self) -> "NativeHook":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
