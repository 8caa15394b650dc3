"""What a Detoxifier's model can tell about texts and directions, beyond generating: its own
diagnosis of a text (docs/method.md §4.2), per-head probes, and saved directions as a llama.cpp
control vector. Functions over a Detoxifier (`det`; not imported: api imports this module), which
read its engine through det.generator:

    from fgdilp_cpp import Detoxifier
    from fgdilp_cpp.analysis import diagnose, self_diagnosis
    with Detoxifier.from_file(None) as det:
        self_diagnosis(det, ["some text"])                 # [1, 6] the model's own P(yes)
        diagnose(det, ["some text"], "scorer")             # the offline scorer's, mapped
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .generation import identity_of
from .method.probes import ProbeResult, fit_probes
from .method.vectors import HeadDirections


def self_diagnosis(det: Any, texts: Sequence[str]) -> np.ndarray:
    """[len(texts), 6] the model's own P(yes) for each text and attribute (method.diagnosis
    ATTRIBUTE_NAMES order), from the questions FGDILP asks it (docs/method.md §4.2)."""
    return det.generator.self_diagnosis(list(texts))


def diagnose(det: Any, texts: Sequence[str], diagnoser: str = "self") -> np.ndarray:
    """[len(texts), 6] attribute scores (ATTRIBUTE_NAMES order) from a diagnoser: "self" (the
    model's P(yes)), "scorer" (the offline toxicity scorer, labels mapped onto the attributes:
    method.scorer_diagnosis) or "auto" (the one FGDILP would use here, --diagnoser auto)."""
    from .method.scorer_diagnosis import choose_diagnoser

    rt = det.generator.rt
    return rt.diagnose(list(texts), choose_diagnoser(diagnoser, rt.self_diagnosis_auc, rt.scorer_auc))


def self_diagnosis_tokens(det: Any) -> tuple[str, str]:
    """The answer tokens whose logits give self_diagnosis's P(yes): (yes, no)."""
    d = det.generator.rt.self_diagnoser()
    return d.yes_text, d.no_text


def probe_heads(det: Any, texts: Sequence[str], toxic: Sequence[bool], seed: int = 0) -> ProbeResult:
    """Per-head linear probes (method.probes) on the kqv_out rows at each text's last token,
    separating toxic (True) from non-toxic texts: a ProbeResult with held-out accuracies."""
    from .universal import last_token_rows

    X = last_token_rows(det.generator.rt, list(texts), det.settings.threads, min(512, det.settings.ctx_size))
    return fit_probes(X, np.asarray(toxic, dtype=bool), seed=seed)


def control_vector(det: Any, vectors: HeadDirections, exp_norm: float = 0.4, scale: float = 1.0) -> np.ndarray:
    """[n_layer, n_embd] llama.cpp residual control vector of saved directions:
    -W_O(lambda_norm * delta) per layer (docs/method.md §7.3); det.export_control_vector writes it."""
    from .method.cvec import residual_directions

    vectors.check_model(identity_of(det.model))
    return residual_directions(vectors.steering_rows(), det.generator.rt.output_projections(), vectors.n_head,
                               exp_norm, scale)
