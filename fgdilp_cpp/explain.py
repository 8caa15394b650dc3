"""How a generation was steered, as text lines (the CLI's --explain and the chat's /explain)."""

from __future__ import annotations

from .condition import describe
from .method.diagnosis import ATTRIBUTE_NAMES


def explain_lines(ex: dict) -> list[str]:
    """GenResult.explain as readable lines: the self-diagnosis of each self-generated sample, the
    chosen negative and positive prefixes (blank pads marked), and |delta| per layer."""
    lines: list[str] = []
    if ex and "condition" in ex:       # --condition: steered or not, and why
        lines.append("prompt condition: " + describe(ex["condition"]))
    if not ex or not ({"samples", "delta_norms", "saved_vectors"} & ex.keys()):
        return lines or ["(nothing to explain for this method)"]
    if "samples" in ex:
        lines.append("\n" + _samples_header(ex.get("diagnoser") or {}) + ": " + ", ".join(ATTRIBUTE_NAMES))
        for i, smp in enumerate(ex["samples"]):
            sc = " ".join(f"{v:.2f}" for v in smp["scores"].values())
            lines.append(f"  {i:>2} [{sc}] {smp['text']!r}")
        for j, neg in enumerate(ex["negatives"]):
            src = "blank" if neg["sample"] is None else f"sample {neg['sample']} ({', '.join(neg['attributes'])})"
            lines.append(f"negative {j + 1}: {src}: {neg['text']!r}")
        lines.append(f"positive: sample {ex['positive']['sample']}: {ex['positive']['text']!r}")
    if "saved_vectors" in ex:
        lines.append(f"saved directions (from {ex['saved_vectors']})")
        if "head_weights" in ex:
            hw = ex["head_weights"]
            lines.append(f"head selection by probes: {hw['steered_heads']} of {hw['heads']} heads steered")
    if "delta_norms" in ex:
        lines.append("|delta| per layer: " + " ".join(f"{x:.2f}" for x in ex["delta_norms"]))
    return lines


def _samples_header(d: dict) -> str:
    """Who ranked the samples: the model's own P(yes), or the offline scorer's mapped scores."""
    choice = f"--diagnoser {d['choice']}" if d.get("choice") else ""
    if d.get("source") == "scorer":
        name = d.get("scorer") or "offline scorer"
        return f"scorer scores ({name}, labels mapped onto the attributes; {choice or 'scorer'}) per sample"
    return "self-diagnosis P(yes) per sample" + (f" ({choice})" if choice else "")
