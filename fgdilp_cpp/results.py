"""What a generation returns: its samples, timings and what the hook did (value types, no engine)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sample:
    text: str
    tokens: list[int]
    stop_reason: str                 # "length", "eog" or "context"


@dataclass
class GenResult:
    samples: list[Sample]
    method: str
    n_prompt_tokens: int
    setup_s: float                   # FGDILP self-generation + diagnosis (+ frozen capture)
    prefill_s: float
    decode_s: float                  # the per-token decode steps (sampling included)
    n_decode_steps: int
    fired_layers: int = 0            # layers the hook fired on in the last steered decode
    n_reused_tokens: int = 0         # prompt tokens of the output sequence whose KV an earlier run left
    explain: dict = field(default_factory=dict)
    logits: list[np.ndarray] = field(default_factory=list)   # per step [rows wanted, n_vocab]

    @property
    def text(self) -> str:
        return self.samples[0].text

    @property
    def tokens(self) -> list[int]:
        return self.samples[0].tokens

    @property
    def stop_reason(self) -> str:
        return self.samples[0].stop_reason

    @property
    def tokens_per_s(self) -> float:
        """Decode steps per second (one step advances every sample by one token)."""
        return self.n_decode_steps / self.decode_s if self.decode_s > 0 else 0.0
