"""Saved head directions from one source (method.sources): the work behind
Detoxifier.build_vectors, one builder with the source as a parameter (repeng's
ControlVector.train(method=...) is the model) over the engine-level builders of universal.py and
the Generator's single-prompt capture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np

from .errors import FgdilpError
from .generation import Generator, identity_of
from .method.sources import FGDILP_INSTANCES, LABELLED_TEXT, SOURCES, source_named
from .method.vectors import HeadDirections
from .settings import Settings


@dataclass(frozen=True)
class Builder:
    gen: Generator
    settings: Settings
    recorded: dict                          # the settings a built file records (no machine paths)
    as_user_message: Callable[[str], str]   # a text as a user message in the model's chat template

    def build(self, prompts: Union[str, Sequence[str]], source: str, *, chat: bool = False,
              texts: Optional[Sequence[str]] = None, toxic: Optional[Sequence[bool]] = None,
              reply_to: Optional[Sequence[str]] = None, labels: Optional[dict] = None,
              progress=None) -> HeadDirections:
        """Detoxifier.build_vectors (its doc says what each source builds)."""
        source = source_named(source)
        if source not in SOURCES:
            raise FgdilpError(f"unknown source {source!r} of directions (one of {', '.join(SOURCES)})")
        if source != LABELLED_TEXT and (texts is not None or toxic is not None or reply_to is not None):
            raise FgdilpError(f"texts, toxic and reply_to are the labelled texts of source {LABELLED_TEXT!r}")
        if isinstance(prompts, str) and source == FGDILP_INSTANCES:     # one prompt's frozen directions
            text = self.as_user_message(prompts) if chat else prompts
            recorded = {**self.recorded, **({"chat": True} if chat else {})}
            return self.gen.build_vectors(text, self.settings.sampling(), recorded, special=chat)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if source == LABELLED_TEXT:
            return self._labelled_text(prompts, texts, toxic, progress, chat, labels, reply_to)
        from .universal import universal_directions

        rows, e, n = universal_directions(self.gen.rt, self.gen.call_values(), self._shown(prompts, chat), source,
                                          self.settings.sampling(), self.settings.ctx_size, progress, special=chat)
        return self._directions(rows, e, source, {"n_prompts": n, "chat": chat})

    def _shown(self, prompts: list[str], chat: bool) -> list[str]:
        return [self.as_user_message(p) for p in prompts] if chat else prompts

    def _labelled_text(self, prompts: list[str], texts, toxic, progress, chat: bool, labels: Optional[dict],
                       reply_to) -> HeadDirections:
        from .universal import data_directions

        if texts is None or toxic is None:
            raise FgdilpError(f"source {LABELLED_TEXT!r} needs texts and their toxic labels")
        texts, toxic = list(texts), list(toxic)
        if len(texts) != len(toxic):
            raise FgdilpError(f"{len(texts)} texts but {len(toxic)} labels")
        starts = None
        if reply_to is not None:
            if not chat or len(reply_to) != len(texts):
                raise FgdilpError("reply_to needs chat=True and one user message per text")
            heads = [self.as_user_message(m) for m in reply_to]
            starts = [len(self.gen.model.tokenize(h, special=True)) for h in heads]
            texts = [h + t for h, t in zip(heads, texts)]
        shown = self._shown(prompts, chat)
        if not shown:
            raise FgdilpError("no prompts to measure the directions' strength on")
        s = self.settings
        rows, e, n = data_directions(self.gen.rt, self.gen.call_values(), texts, toxic, shown, s.sampling(), s.ctx_size, s.threads,
                                     progress, special=chat, starts=starts)
        universal = {"n_prompts": n, "chat": chat, "n_texts": len(texts),
                     **({"texts_as": "replies"} if reply_to is not None else {}),
                     "n_toxic": int(np.sum(np.asarray(toxic, dtype=bool))), **({"texts": labels} if labels else {})}
        return self._directions(rows, e, LABELLED_TEXT, universal)

    def _directions(self, rows: np.ndarray, e: np.ndarray, source: str, universal: dict) -> HeadDirections:
        """[n_layer, width] rows and e as a HeadDirections of this model, `universal` (how they were
        averaged) recorded beside the settings."""
        i = self.gen.model.info
        shape = (i.n_layer, i.n_head, i.head_dim)
        return HeadDirections(directions=rows.reshape(shape), e=e.reshape(shape), model=identity_of(self.gen.model),
                              source=source, settings={**self.recorded, "universal": universal}).validate()
