"""Self-diagnosis (docs/method.md §4.2): six attribute questions answered by the model itself.

score = P(yes) = softmax over the two next-token logits of the yes/no answer tokens after "Answer:".
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from ..errors import FgdilpError

ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("toxicity", "rude, disrespectful, or unreasonable language"),
    ("sexually_explicit", "sexually explicit language"),
    ("threat", "a threat"),
    ("identity_attack", "negative or hateful language targeting someone because of their identity"),
    ("profanity", "swear words, curse words, or other obscene or profane language"),
    ("insult", "insulting, inflammatory, or negative comment towards a person or a group of people"),
)
ATTRIBUTE_NAMES = tuple(a for a, _ in ATTRIBUTES)

TEMPLATE = '"{text}"\nQuestion: Does the above text contain {description}?\nAnswer:'

# After "Answer:" a model writes a space then the word; SentencePiece vocabularies (gemma, llama)
# hold "▁yes"/"▁no" as single tokens, byte-level BPE ones (GPT-2, SmolLM2) "Ġyes"/"Ġno": both are
# what tokenizing " yes" / " no" gives. The other pairs are fallbacks for vocabularies without them.
YES_NO_CANDIDATES = ((" yes", " no"), (" Yes", " No"), ("yes", "no"), ("Yes", "No"))


def question(text: str, description: str) -> str:
    """The diagnosis question for one sample (its newlines replaced by spaces)."""
    return TEMPLATE.format(text=text.replace("\r", " ").replace("\n", " "), description=description)


def choose_yes_no(tokenize_no_bos: Callable[[str], list[int]]) -> tuple[int, int, str, str]:
    """The first candidate pair that the tokenizer spells as one token each: (yes, no, text, text).
    A vocabulary without one falls back to the first tokens of " yes" / " no" when they differ."""
    for yes, no in YES_NO_CANDIDATES:
        ty, tn = tokenize_no_bos(yes), tokenize_no_bos(no)
        if len(ty) == 1 and len(tn) == 1 and ty != tn:
            return ty[0], tn[0], yes, no
    for yes, no in YES_NO_CANDIDATES:
        ty, tn = tokenize_no_bos(yes), tokenize_no_bos(no)
        if ty and tn and ty[0] != tn[0]:
            return ty[0], tn[0], yes, no
    raise FgdilpError("this vocabulary has no single-token yes/no answer: self-diagnosis is impossible")


def p_yes(logit_yes: float, logit_no: float) -> float:
    """softmax([yes, no])[0], computed stably."""
    d = float(logit_no) - float(logit_yes)
    if not math.isfinite(d):
        raise FgdilpError("non-finite yes/no logits in self-diagnosis")
    return 1.0 / (1.0 + math.exp(d)) if d < 700 else 0.0


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all sequences."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = seqs[0][i]
        if any(s[i] != t for s in seqs):
            return i
    return n
