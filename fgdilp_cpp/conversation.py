"""FGDILP's instance kept for a conversation (instance_reuse = "conversation", docs/method.md §9.2)."""

from __future__ import annotations

from typing import Optional

from .params import SamplingParams
from .plans import Runtime, build_instance


class ConversationInstance:
    """The instance (prefix selection) built for the first prompt of a conversation, kept for the
    prompts that extend it. Its P+/P-_j prefixes stay the same from turn to turn, so their
    sequences reuse their KV like TR's; a trimmed, cleared or other conversation builds a new one."""

    def __init__(self) -> None:
        self._key: Optional[tuple] = None
        self._tokens: list[int] = []
        self._selection = None
        self.turns = 0

    def get(self, rt: Runtime, prompt: str, raw: list[int], sampling: SamplingParams):
        """(selection, explain entries) for the prompt `raw` (its tokens)."""
        key = (sampling, rt.fgdilp)
        n = len(self._tokens)
        if self._key == key and len(raw) > n and raw[:n] == self._tokens:
            self.turns += 1
            return self._selection, {"instance": "kept from an earlier turn", "instance_turns": self.turns}
        sel, info = build_instance(rt, prompt, raw, sampling)
        # without the last two tokens: they may merge with the reply that follows them
        self._key, self._tokens, self._selection, self.turns = key, raw[:max(1, len(raw) - 2)], sel, 1
        return sel, {**info, "instance": "built for this turn", "instance_turns": 1}
