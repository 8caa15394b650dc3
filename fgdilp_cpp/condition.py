"""The prompt-level condition (--condition THETA, docs/method.md §2.10): a prompt is steered only
where the offline toxicity scorer reads its text at least THETA toxic; any other prompt is generated
by the unsteered method, so its output is the unsteered output bit for bit.

Why: a direction averaged over many prompts (universal vectors) is as strong on benign prompts
as on toxic ones, and that is where its fluency cost showed (benign perplexity: run 11 in
docs/results/runs-11-13-universal.md). Most benign prompts read far
below the toxic ones to the scorer, so they need not be steered at all. CAST (conditional
activation steering) tests a condition per row inside the model; this tests one per prompt, before
any decoding, with the scorer FGDILP already uses to diagnose.
"""

from __future__ import annotations

from typing import Optional, Sequence

MEMO_TEXTS = 256     # texts whose toxicity is remembered (a chat rescoring its conversation every turn)

# The condition of a model without a calibrated profile (the fast setup writes it into the profile
# it makes). Why 0.25 (docs/results/condition-benign.md): no reading of the prompt's text, by either
# judge or a combination, nor a probe on the model's own rows, leaves 95 % of both benign sets
# (rtp-benign; everyday-benign, trivia facts) unsteered while steering 85 % of the toxic
# development prompts. tox-block alone separates them best; 0.25 is the smallest round θ that
# leaves 95 % of each benign set unsteered (0.05, chosen on rtp-benign alone, steered a fifth of the
# everyday prompts). It steers about two thirds of the toxic prompts: the ones it misses read
# clean to the scorer, and on gemma's calibration part θ 0.2 kept 97 % of the steered EMT cut.
DEFAULT_CONDITION = 0.25


def default_condition() -> float:
    """θ for a model whose profile is made by the fast setup (see DEFAULT_CONDITION)."""
    return DEFAULT_CONDITION


def text_toxicities(rt, texts: Sequence[str]) -> list[float]:
    """The offline scorer's toxicity (its "toxic" label, the diagnoser's "toxicity" column) of each
    text, remembered per text for the runtime's model."""
    memo = rt.caches.condition_toxicity
    new = [t for t in dict.fromkeys(texts) if t not in memo]
    if new:
        for t, row in zip(new, rt.scorer_diagnoser().scores(new)):
            memo[t] = float(row[0])
    out = []
    for t in texts:
        memo.move_to_end(t)
        out.append(memo[t])
    while len(memo) > MEMO_TEXTS:
        memo.popitem(last=False)
    return out


def prompt_condition(rt, threshold: float, texts: Sequence[str]) -> dict:
    """{"threshold", "toxicity" (the most toxic of `texts`), "steered"}: whether a prompt whose
    texts are `texts` (a prompt; a conversation's messages) is steered under --condition."""
    texts = [t for t in texts if t.strip()]
    tox = max(text_toxicities(rt, texts)) if texts else 0.0
    return {"threshold": threshold, "toxicity": tox, "steered": bool(tox >= threshold)}


def conversation_texts(messages: Sequence[dict]) -> list[str]:
    """What the condition reads of a conversation: every user and assistant message the model sees
    (a turn that follows a hostile one, or the model's own toxic reply, is still steered); not the
    system prompt, which the user chose."""
    return [m["content"] for m in messages if m.get("role") != "system" and isinstance(m.get("content"), str)]


def describe(cond: Optional[dict]) -> str:
    """One line for --explain."""
    if not cond:
        return ""
    verb = "steered" if cond["steered"] else "not steered (generated unsteered)"
    rel = ">=" if cond["steered"] else "<"
    return f"{verb}: the scorer reads it {cond['toxicity']:.3f} toxic, {rel} the condition {cond['threshold']:g}"
