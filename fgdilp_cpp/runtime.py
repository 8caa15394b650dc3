"""What a plan builder may use (Runtime), what it may keep between calls (RuntimeCaches), and the
values one call runs with (CallValues).

Every cache is a named, typed field: a reader sees what is kept, for how long and under which key,
instead of an untyped dict shared by plans.py, condition.py and instance_cache.py.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from .engine import Context, Model
from .method.vectors import HeadDirections
from .params import FgdilpParams, SteerParams

if TYPE_CHECKING:
    from .method.prefixes import Selection
    from .method.scorer_diagnosis import ScorerDiagnoser
    from .self_diagnosis import Diagnoser


@dataclass(frozen=True)
class CallValues:
    """The steering and FGDILP values and the KV-reuse choice of one call, handed down to the plan
    builders and what they call: nothing under a call changes them (Generator.set_steer and
    set_fgdilp apply new values to the hooks between calls)."""

    steer: SteerParams
    fgdilp: FgdilpParams
    kv_reuse: bool = False              # the call may keep KV cells an earlier run left (chat turns)


@dataclass
class RuntimeCaches:
    """What a Runtime keeps between calls for its model. Each field is filled on first use."""

    # W_O of every layer, [n_embd, n_head*head_dim] float32, read once from the GGUF file (cvec)
    output_projections: Optional[list[np.ndarray]] = None
    # self-diagnosis with this model: its yes/no answer tokens, chosen once
    self_diagnoser: Optional[Diagnoser] = None
    # the offline toxicity scorer as a diagnoser (loading the scorer is slow: once)
    scorer_diagnoser: Optional[ScorerDiagnoser] = None
    # text -> the scorer's toxicity of it (condition.text_toxicities), least recently used first,
    # at most condition.MEMO_TEXTS: a chat scores its whole conversation again every turn
    condition_toxicity: OrderedDict[str, float] = field(default_factory=OrderedDict)
    # the last prompt's FGDILP instance under Runtime.reuse_instances: (its key: prompt, sampling,
    # setup values, diagnoser), (selection, explain entries)); fgdilp and -frozen share it
    instance: Optional[tuple[tuple, tuple[Selection, dict[str, Any]]]] = None
    # captured sequences and fusion -> (direction rows, e) [n_layer, width] (plans.capture_directions),
    # least recently used first, at most plans.CAPTURE_MEMO: the same sequences give the same rows
    captures: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = field(default_factory=OrderedDict)


@dataclass
class Runtime:
    """What a plan builder may use besides its call's values (CallValues): the model, a method's
    context by name ("setup": FGDILP's self-generation and diagnosis; the Generator owns them), and
    per-model caches. Built once, by the Generator; not the Generator."""

    model: Model
    vectors: Optional[HeadDirections]
    context: Callable[[str], Context]
    reuse_instances: bool = False       # keep the last prompt's FGDILP instance (fgdilp and -frozen share it)
    caches: RuntimeCaches = field(default_factory=RuntimeCaches)
    scorer: Optional[object] = None     # the diagnosing scorer (None: tox-block, loaded on first use)
    self_diagnosis_auc: Optional[float] = None   # measured AUCs (a model profile) for --diagnoser auto
    scorer_auc: Optional[float] = None
    universal: Optional[Callable[[], HeadDirections]] = None   # the model's universal directions (loaded on first use)

    def output_projections(self) -> list[np.ndarray]:
        """W_O of every layer, [n_embd, n_head*head_dim] float32 (read once from the GGUF file)."""
        if self.caches.output_projections is None:
            from .engine.tensors import output_projections

            self.caches.output_projections = output_projections(self.model.info.path, self.model.info.n_layer)
        return self.caches.output_projections

    def self_diagnoser(self) -> Diagnoser:
        """Self-diagnosis with this model (yes/no tokens chosen once)."""
        if self.caches.self_diagnoser is None:
            from .self_diagnosis import Diagnoser

            self.caches.self_diagnoser = Diagnoser.for_model(self.model)
        return self.caches.self_diagnoser

    def scorer_diagnoser(self) -> ScorerDiagnoser:
        """The offline toxicity scorer as diagnoser (tox-block unless `scorer` is set), loaded once."""
        if self.caches.scorer_diagnoser is None:
            from .method.scorer_diagnosis import ScorerDiagnoser

            if self.scorer is None:
                from .toxicity.scorer import ToxicityScorer

                self.scorer = ToxicityScorer.load()
            self.caches.scorer_diagnoser = ScorerDiagnoser(self.scorer)
        return self.caches.scorer_diagnoser

    def diagnoser_choice(self, choice: str) -> str:
        """"self" or "scorer": the diagnoser that ranks the samples under --diagnoser `choice`
        ("auto" decides by the measured AUCs)."""
        from .method.scorer_diagnosis import choose_diagnoser

        return choose_diagnoser(choice, self.self_diagnosis_auc, self.scorer_auc)

    def diagnose(self, texts: list[str], which: str) -> np.ndarray:
        """[len(texts), 6] scores (ATTRIBUTE_NAMES order) of diagnoser `which` ("self" or "scorer")."""
        if which == "scorer":
            return self.scorer_diagnoser().scores(texts)
        return self.self_diagnoser().scores(self.context("setup"), texts)
