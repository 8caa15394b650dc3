"""FGDILP's instance kept for a conversation (instance_reuse = "conversation", docs/method.md §9.2)."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from .condition import text_toxicities
from .params import SamplingParams
from .plans import build_instance
from .runtime import CallValues, Runtime

# a new turn rebuilds the instance when its text reads toxic to the offline scorer (its toxicity at
# least this) and more toxic than the text the instance was built for: a conversation that turns
# hostile gets prefixes from candidates to the hostile message, a benign turn never pays the setup
ESCALATION_TOXICITY = 0.5


def text_toxicity(rt: Runtime, text: str) -> float:
    """The offline scorer's toxicity of `text` (condition.text_toxicities: remembered per text)."""
    return text_toxicities(rt, [text])[0]


class ConversationInstance:
    """The instance (prefix selection) built for a prompt of a conversation, kept for the prompts
    that extend it until one turn escalates. Its P+/P-_j prefixes stay the same from turn to turn,
    so their sequences reuse their KV like TR's; a trimmed, cleared or other conversation, or a
    turn whose new text reads toxic and more toxic than what built the instance, builds a new one."""

    def __init__(self) -> None:
        self._key: Optional[tuple] = None
        self._tokens: list[int] = []
        self._selection = None
        self._toxicity = 0.0      # the scorer's toxicity of the text the instance was built for
        self.turns = 0

    @staticmethod
    def key(values: CallValues, sampling: SamplingParams) -> tuple:
        # not the seed: chat draws each turn with another seed, and the prefixes need not change with it
        return (replace(sampling, seed=0), values.fgdilp)

    def extended_by(self, key: tuple, raw: list[int]) -> int:
        """How many tokens of `raw` this instance's conversation covers when `raw` goes on with
        it (same candidate sampling and FGDILP values), else 0."""
        n = len(self._tokens)
        return n if self._key == key and len(raw) > n and raw[:n] == self._tokens else 0

    def get(self, rt: Runtime, values: CallValues, prompt: str, raw: list[int], sampling: SamplingParams,
            method: str):
        """(selection, explain entries) for the prompt `raw` (its tokens), for `method`."""
        key = self.key(values, sampling)
        n = len(self._tokens)
        why = "built for this turn"
        if self.extended_by(key, raw):
            # what this turn added: the last reply's end, the new message, the template around them
            tox = text_toxicity(rt, rt.model.detokenize(raw[n:]))
            if tox < ESCALATION_TOXICITY or tox <= self._toxicity:
                self.turns += 1
                self._tokens = self._kept_tokens(raw)
                return self._selection, {"instance": "kept from an earlier turn", "instance_turns": self.turns,
                                         "turn_toxicity": tox, "instance_toxicity": self._toxicity}
            why, built_on = "rebuilt: this turn reads more toxic than the one it was built for", tox
        else:
            built_on = text_toxicity(rt, prompt)
        sel, info = build_instance(rt, values, prompt, raw, sampling, method)
        self._key, self._tokens, self._selection, self.turns = key, self._kept_tokens(raw), sel, 1
        self._toxicity = built_on
        return sel, {**info, "instance": why, "instance_turns": 1, "instance_toxicity": built_on}

    @staticmethod
    def _kept_tokens(raw: list[int]) -> list[int]:
        # without the last two tokens: they may merge with the reply that follows them
        return raw[:max(1, len(raw) - 2)]


class ConversationInstances:
    """The instances of up to `capacity` conversations (serve: one per client, as its KV is kept),
    the least recently used dropped first: a prompt goes on with the conversation it extends
    (the longest one), or starts a new one."""

    def __init__(self, capacity: int = 1) -> None:
        self.capacity = max(1, capacity)
        self._items: list[ConversationInstance] = []       # least recently used first

    @property
    def last(self) -> Optional[ConversationInstance]:
        return self._items[-1] if self._items else None

    def get(self, rt: Runtime, values: CallValues, prompt: str, raw: list[int], sampling: SamplingParams,
            method: str):
        key = ConversationInstance.key(values, sampling)
        covered = [(c.extended_by(key, raw), i) for i, c in enumerate(self._items)]
        n, i = max(covered, default=(0, -1))
        if n:
            inst = self._items.pop(i)
        else:
            inst = ConversationInstance()
            while len(self._items) >= self.capacity:
                self._items.pop(0)
        self._items.append(inst)
        return inst.get(rt, values, prompt, raw, sampling, method)
