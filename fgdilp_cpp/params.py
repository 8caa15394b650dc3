"""Value types: engine, sampling, steering and FGDILP parameters (a leaf: no llama.cpp, no native
library, no CLI text). Their checks raise ParamError naming the Settings field, never a flag.

Shapes: a "row" is one token's kqv_out, [n_head * head_dim]; per-layer arrays are [n_layer, ...].
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import ParamError

MAX_NEGATIVES = 8                     # = FGDILP_MAX_NEG of native/fgdilp.h
MAX_SEQUENCES = 256                   # llama.cpp's LLAMA_MAX_SEQ: sequences per context
# tokens per sequence: far above any model's trained context, and small enough that the cells of
# a context (several sequences of it, each conversation kept) never wrap llama.cpp's uint32 n_ctx
MAX_CTX_SIZE = 1 << 24
# llama.cpp spins a thread per -t: past a few per core it only slows down, and thousands abort the
# process (std::bad_alloc, libgomp's "Thread creation failed"); GGML_MAX_N_THREADS is 512
MAX_THREADS_PER_CORE = 4
GGML_MAX_N_THREADS = 512
FUSION_MODES = ("max", "mean", "sum")  # merge of the sign-elected entries (docs/method.md §5.4)
EDIT_RULES = ("subtract", "rotate")    # how a steered head is changed (docs/method.md §2.2, §2.6)
EDIT_RULE_FORMER = {"tr": "subtract"}   # former names, still read (with a notice)
# what the contrast sequences (P+, P-_j) hold after their prefix (docs/method.md §2.9): the prompt
# and the reply (the papers), or the reply alone (cheap in chat: a new message is decoded in P0 only)
CONTRASTS = ("full", "reply")
# FGDILP: rescale of the fused delta (docs/method.md §5.6): the name -> whether each head of the
# fused delta is brought to the norm of the mean delta
FUSED_NORM_TO_MEAN_DELTA = {"none": False, "mean-delta": True}
FUSED_NORM_FORMER = {"tr": "mean-delta"}   # former names, still read (with a notice)
FUSED_NORMS = tuple(FUSED_NORM_TO_MEAN_DELTA)
INSTANCE_REUSE = ("turn", "conversation")  # when FGDILP's instance is rebuilt in a chat: every reply, or once
DIAGNOSERS = ("self", "scorer", "auto")  # who ranks the self-generated samples (docs/method.md §4.2a)
MAX_REPEAT_PENALTY = 10.0             # past it every seen token is all but banned
MAX_REPEAT_LAST_N = 1 << 20           # the penalties sampler keeps a ring of this many tokens


def max_threads() -> int:
    """The most threads a context may run: MAX_THREADS_PER_CORE per core of this machine."""
    return max(1, min(GGML_MAX_N_THREADS, MAX_THREADS_PER_CORE * (os.cpu_count() or 1)))


def _finite(field: str, v: float) -> None:
    if not math.isfinite(v):
        raise ParamError(field, f"must be a finite number, not {v!r}")


@dataclass(frozen=True)
class EngineParams:
    ctx_size: int = 2048             # tokens per sequence (prompt + generation)
    n_batch: int = 512
    n_threads: int = 0
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: str = "auto"
    max_samples: int = 1             # samples of one prompt generated together
    max_new: int = 256               # KV room per extra sample
    kv_reuse: bool = True            # keep each sequence's common token prefix with the last run (chat turns)
    kv_conversations: int = 1        # with kv_reuse: conversations whose KV a context keeps (least recently used out)


@dataclass(frozen=True)
class SamplingParams:
    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int = 42
    # llama.cpp's penalties sampler over the last repeat_last_n tokens of the reply (the defaults: off)
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_last_n: int = 64
    grammar: Optional[str] = None      # GBNF text (rule "root") the reply must follow; None = any text

    @property
    def penalizes(self) -> bool:
        """Whether the penalties sampler changes anything (it joins the chain only then)."""
        return self.repeat_last_n > 0 and (self.repeat_penalty != 1.0 or self.presence_penalty != 0.0
                                           or self.frequency_penalty != 0.0)

    def unconstrained(self) -> "SamplingParams":
        """These values without the grammar and penalties: what FGDILP's self-generated candidates
        (and the memo of its setup) use; the constraints act on the reply only."""
        return SamplingParams(self.temp, self.top_k, self.top_p, self.min_p, self.seed)

    def validate(self) -> "SamplingParams":
        for name in ("temp", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"):
            _finite(name, getattr(self, name))
        if self.temp < 0:
            raise ParamError("temp", "must be >= 0")
        if self.top_k < 0:
            raise ParamError("top_k", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ParamError("top_p", "must be in (0, 1]")
        if not 0.0 <= self.min_p < 1.0:
            raise ParamError("min_p", "must be in [0, 1)")
        if not 0 <= self.seed < 2**32:
            raise ParamError("seed", "must be in [0, 2^32)")
        if not 0.0 < self.repeat_penalty <= MAX_REPEAT_PENALTY:
            raise ParamError("repeat_penalty", f"must be in (0, {MAX_REPEAT_PENALTY:g}], not {self.repeat_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:      # OpenAI's range
                raise ParamError(name, f"must be in [-2, 2], not {getattr(self, name)}")
        if not 0 <= self.repeat_last_n <= MAX_REPEAT_LAST_N:
            raise ParamError("repeat_last_n", f"must be in [0, {MAX_REPEAT_LAST_N}], not {self.repeat_last_n}")
        return self


@dataclass(frozen=True)
class SteerParams:
    exp_norm: float = 0.4
    exp_sim: float = 0.6
    scale: float = 1.0
    layer_start: int = 0
    layer_end: int = -1          # inclusive; -1 = last layer
    renorm: bool = True
    edit: str = "subtract"       # edit rule: subtract | rotate
    gate: Optional[float] = None  # edit a head only where cos(v_h, delta_h) > gate; None = every head
    contrast: str = "full"       # P+ / P-_j: prefix + prompt + reply ("full"), or prefix + reply ("reply")
    condition: Optional[float] = None   # steer only prompts the offline scorer reads at least this toxic; None = all

    def last_layer(self, n_layer: int) -> int:
        return n_layer - 1 if self.layer_end < 0 else self.layer_end

    def layer_mask(self, n_layer: int) -> np.ndarray:
        """[n_layer] 1 for steered layers, 0 elsewhere."""
        il = np.arange(n_layer)
        return ((il >= self.layer_start) & (il <= self.last_layer(n_layer))).astype(np.float64)

    def check(self, n_layer: int) -> None:
        for name, v in (("exp_norm", self.exp_norm), ("exp_sim", self.exp_sim), ("steer_scale", self.scale)):
            _finite(name, v)
        if self.edit not in EDIT_RULES:
            raise ParamError("edit", f"must be one of {', '.join(EDIT_RULES)}, not {self.edit!r}")
        if self.contrast not in CONTRASTS:
            raise ParamError("contrast", f"must be one of {', '.join(CONTRASTS)}, not {self.contrast!r}")
        if self.gate is not None:
            _finite("gate", self.gate)
            with np.errstate(over="ignore"):
                gate32 = float(np.float32(self.gate))   # the value the hook holds
            if not -1.0 <= gate32 < 1.0:   # a cosine never exceeds 1: gate >= 1 would steer nothing
                raise ParamError("gate", f"must be in [-1, 1) (a cosine), not {self.gate}")
        if self.condition is not None:
            _finite("condition", self.condition)
            if not 0.0 <= self.condition <= 1.0:    # the scorer's toxicity is a probability
                raise ParamError("condition", f"must be in [0, 1] (a toxicity), not {self.condition}")
        end = self.last_layer(n_layer)
        if not 0 <= self.layer_start <= end < n_layer:
            raise ParamError("steer_layer_range", f"{self.layer_start} {self.layer_end} is outside the "
                                                  f"model's layers 0..{n_layer - 1}")


@dataclass(frozen=True)
class FgdilpParams:
    samples: int = 25            # N self-generated continuations
    selfgen_tokens: int = 20     # new tokens per self-generated sample
    selfgen_min_tokens: int = 5  # no end-of-generation before this many
    negatives: int = 6           # negative prefixes (one per attribute, de-duplicated)
    mask_k: float = 50.0         # top-K % entries kept per sub-toxicity vector (100 = no masking)
    fusion: str = "max"          # merge of the agreeing entries: max | mean | sum
    sign_election: bool = True
    pad_blank: bool = True       # pad to `negatives` with template-only (blank) negatives
    fused_norm: str = "none"     # mean-delta: each head of the fused delta at the norm of the mean delta
    diagnoser: str = "self"      # self | scorer | auto: who ranks the self-generated samples

    @property
    def norm_to_mean_delta(self) -> bool:
        return FUSED_NORM_TO_MEAN_DELTA[self.fused_norm]

    def setup_key(self) -> tuple:
        """The values the per-prompt instance (self-generation, diagnosis, prefixes) depends on;
        the fusion values (mask_k, fusion, sign_election, fused_norm) only act after it."""
        return (self.samples, self.selfgen_tokens, self.selfgen_min_tokens, self.negatives, self.pad_blank,
                self.diagnoser)

    def check(self) -> None:
        if not 1 <= self.samples <= MAX_SEQUENCES:    # each sample is a sequence of one context
            raise ParamError("selfgen_samples", f"must be in 1..{MAX_SEQUENCES} (llama.cpp's sequences per "
                                                f"context), not {self.samples}")
        if not 1 <= self.negatives <= MAX_NEGATIVES:
            raise ParamError("negatives", f"must be in 1..{MAX_NEGATIVES}, not {self.negatives}")
        if not (0.0 < self.mask_k <= 100.0):
            raise ParamError("mask_k", f"must be in (0, 100], not {self.mask_k}")
        if self.fused_norm not in FUSED_NORMS:
            raise ParamError("fused_norm", f"must be one of {', '.join(FUSED_NORMS)}, not {self.fused_norm!r}")
        if self.fusion not in FUSION_MODES:
            raise ParamError("fusion", f"must be one of {', '.join(FUSION_MODES)}, not {self.fusion!r}")
        if self.diagnoser not in DIAGNOSERS:
            raise ParamError("diagnoser", f"must be one of {', '.join(DIAGNOSERS)}, not {self.diagnoser!r}")
        if self.selfgen_tokens < 1:
            raise ParamError("selfgen_tokens", f"must be at least 1, not {self.selfgen_tokens}")
        if not 1 <= self.selfgen_min_tokens <= self.selfgen_tokens:
            raise ParamError("selfgen_min_tokens", f"must be in 1..selfgen_tokens ({self.selfgen_tokens}), "
                                                   f"not {self.selfgen_min_tokens}")
