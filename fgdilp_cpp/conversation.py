"""FGDILP's instance kept for a conversation (instance_reuse = "conversation", docs/method.md §9.2)."""

from __future__ import annotations

from typing import Optional

from .params import SamplingParams
from .plans import Runtime, build_instance

# a new turn rebuilds the instance when its text reads toxic to the offline scorer (its toxicity at
# least this) and more toxic than the text the instance was built for: a conversation that turns
# hostile gets prefixes from candidates to the hostile message, a benign turn never pays the setup
ESCALATION_TOXICITY = 0.5


def text_toxicity(rt: Runtime, text: str) -> float:
    """The offline scorer's toxicity of `text` (the "toxicity" column of its attribute scores)."""
    return float(rt.scorer_diagnoser().scores([text])[0, 0])


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

    def get(self, rt: Runtime, prompt: str, raw: list[int], sampling: SamplingParams, method: str):
        """(selection, explain entries) for the prompt `raw` (its tokens), for `method`."""
        key = (sampling, rt.fgdilp)
        n = len(self._tokens)
        why = "built for this turn"
        if self._key == key and len(raw) > n and raw[:n] == self._tokens:
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
        sel, info = build_instance(rt, prompt, raw, sampling, method)
        self._key, self._tokens, self._selection, self.turns = key, self._kept_tokens(raw), sel, 1
        self._toxicity = built_on
        return sel, {**info, "instance": why, "instance_turns": 1, "instance_toxicity": built_on}

    @staticmethod
    def _kept_tokens(raw: list[int]) -> list[int]:
        # without the last two tokens: they may merge with the reply that follows them
        return raw[:max(1, len(raw) - 2)]
