"""Toxification-Reversal prefixes and the token span of their final ':' (docs/method.md §2.1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import FgdilpError

NEG_PREFIX = "The following text is abusive, harmful, negative, obscene, racist, rude and toxic: "
POS_PREFIX = "The following text is kind, polite, positive, respectful and supportive: "

Tokenize = Callable[[str], list[int]]          # text -> tokens (with the model's BOS)
TokenBytes = Callable[[int], bytes]            # token -> its piece as UTF-8 bytes


@dataclass(frozen=True)
class Prefixed:
    """Tokens of template + prompt, and where the template's final ':' is."""

    tokens: list[int]
    colon_index: int      # token index holding the template's last ':'
    prompt_start: int     # first token index that is (partly) prompt text


def locate_template_end(tokens: list[int], token_bytes: TokenBytes, template: str,
                        full_text: str | None = None) -> tuple[int, int]:
    """Index of the token that holds the last character of `template` (its ':' when stripped), and
    the index of the first token after it. Found from byte spans, never by searching for ':'.

    full_text: the text that was tokenized (template + prompt), when the template is its start."""
    head = template.rstrip().encode("utf-8")
    pieces = [token_bytes(t) for t in tokens]
    text = b"".join(pieces)
    full = (full_text or "").encode("utf-8")
    if full and text.endswith(full) and full.startswith(head):
        start = len(text) - len(full)   # the tokenizer may have prepended a space
    else:
        start = text.find(head)
        if start < 0:
            raise FgdilpError("the prefix template does not survive tokenization")
    end = start + len(head)        # byte just after the template's last character
    pos = 0
    for i, p in enumerate(pieces):
        pos += len(p)
        if pos >= end:
            return i, i + 1
    raise FgdilpError("the prefix template does not survive tokenization")


def prefixed(tokenize: Tokenize, token_bytes: TokenBytes, template: str, prompt: str) -> Prefixed:
    """Template and prompt concatenated as text (as the authors do), then tokenized once."""
    toks = tokenize(template + prompt)
    colon, after = locate_template_end(toks, token_bytes, template, template + prompt)
    if b":" not in token_bytes(toks[colon]):
        raise FgdilpError("could not locate the ':' ending the prefix template")
    if after >= len(toks):
        raise FgdilpError("the prompt vanished when joined to the prefix template")
    return Prefixed(tokens=toks, colon_index=colon, prompt_start=after)


def prefix_alone(tokenize: Tokenize, token_bytes: TokenBytes, template: str, last_token: int) -> Prefixed:
    """The template up to its ':', then the prompt's last token (contrast "reply", docs/method.md
    §2.9): the prompt is left out of P+ / P-_j except the token whose row predicts the reply's first
    token (in chat, the assistant header's end), and the reply's tokens follow. The ':' is then
    never the last token, so its row is captured before the last tokens decode, as with a prompt."""
    head = template.rstrip()
    toks = tokenize(head)
    colon, after = locate_template_end(toks, token_bytes, head, head)
    if b":" not in token_bytes(toks[colon]):
        raise FgdilpError("could not locate the ':' ending the prefix template")
    return Prefixed(tokens=toks[:after] + [last_token], colon_index=colon, prompt_start=after)


# ---- FGDILP: instance-level prefixes (docs/method.md §4.3-4.4) -----------------------------------
POS_TEMPLATE = ("The above text is an example. The following text is also kind, polite, positive, "
                "respectful and supportive: ")
NEG_TEMPLATE = ("The above text is an example. The following text is also abusive, harmful, negative, "
                "obscene, racist, rude and toxic: ")


@dataclass(frozen=True)
class Selection:
    """Which self-generated samples become prefixes."""

    negatives: list[str]          # texts placed before NEG_TEMPLATE ("" = a blank, template-only negative)
    negative_sources: list        # per negative: index of its sample, or None for a blank pad
    negative_attributes: list     # per negative: the attributes it scored highest on ([] for a pad)
    positive: str
    positive_source: int


def select_prefixes(samples: list[str], scores, attributes: list[str], n_negatives: int = 6,
                    pad_blank: bool = True) -> Selection:
    """Negatives: the top sample of each attribute, de-duplicated, in attribute order; padded to
    n_negatives with blank texts when pad_blank. Positive: the lowest-'toxicity' sample.

    scores: [n_samples, n_attributes] P(yes); attributes[0] must be 'toxicity'."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape != (len(samples), len(attributes)) or not samples:
        raise FgdilpError("scores must be [n_samples, n_attributes] for at least one sample")
    if attributes[0] != "toxicity":
        raise FgdilpError("the first attribute must be 'toxicity'")
    order: list[int] = []
    why: dict[int, list[str]] = {}
    for a, name in enumerate(attributes):
        best = int(np.argmax(scores[:, a]))          # first index on ties
        if best not in why:
            order.append(best)
            why[best] = []
        why[best].append(name)
    order = order[:n_negatives]
    negatives = [samples[i] for i in order]
    sources: list = list(order)
    attrs = [why[i] for i in order]
    if pad_blank:
        while len(negatives) < n_negatives:
            negatives.append("")
            sources.append(None)
            attrs.append([])
    pos = int(np.argmin(scores[:, 0]))
    return Selection(negatives, sources, attrs, samples[pos], pos)
