"""FGDILP's self-diagnosis over the engine (docs/method.md §4.2): the model asked six questions about
each text, P(yes) read after 'Answer:'; the part of a text's six questions that they share is
decoded once and copied to six sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .engine import Batch, Context, Model
from .method.diagnosis import ATTRIBUTES, choose_yes_no, common_prefix_len, p_yes, question


def decode_rows(ctx: Context, rows: Sequence[tuple[int, int, int, bool]],
                on_output: Callable[[int, np.ndarray], None]) -> None:
    """Decode (token, pos, seq, want_logits) rows in batches of n_batch; on_output(i, logits) for
    every row i that wants logits, called before the next batch overwrites them."""
    cap = ctx.params.n_batch
    with Batch(cap) as b:
        for start in range(0, len(rows), cap):
            b.clear()
            wanted = []
            for i, (tok, pos, seq, want) in enumerate(rows[start:start + cap]):
                row = b.add(tok, pos, seq, want)
                if want:
                    wanted.append((start + i, row))
            ctx.decode(b)
            for i, row in wanted:
                on_output(i, ctx.logits(row))


@dataclass(frozen=True)
class Diagnoser:
    """Scores texts for the six attributes with the model itself (P(yes) after 'Answer:')."""

    model: Model
    yes: int
    no: int
    yes_text: str
    no_text: str

    @classmethod
    def for_model(cls, model: Model) -> "Diagnoser":
        return cls(model, *choose_yes_no(model.tokenize_plain))

    def scores(self, ctx: Context, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), 6] P(yes) per attribute, several texts per decode."""
        n_attr = len(ATTRIBUTES)
        group = max(1, ctx.params.n_seq_max // n_attr)
        out = np.zeros((len(texts), n_attr))
        for start in range(0, len(texts), group):
            chunk = texts[start:start + group]
            ctx.clear()
            qs = [[self.model.tokenize(question(t, d)) for _, d in ATTRIBUTES] for t in chunk]
            shared = [min(common_prefix_len(q), min(len(x) for x in q) - 1) for q in qs]
            ctx.make_room(sum(n + sum(len(x) - n for x in q) for n, q in zip(shared, qs)))   # cells of this chunk
            # 1. the shared part of each text's six questions, once, in its first sequence
            rows = [(tok, i, k * n_attr, False) for k, q in enumerate(qs) for i, tok in enumerate(q[0][:shared[k]])]
            decode_rows(ctx, rows, lambda i, lg: None)
            for k in range(len(chunk)):
                for a in range(1, n_attr):
                    ctx.seq_cp(k * n_attr, k * n_attr + a, 0, shared[k])
            # 2. every question's own tail, logits on its last token
            rows, where = [], []
            for k, q in enumerate(qs):
                for a, toks in enumerate(q):
                    tail = toks[shared[k]:]
                    for j, tok in enumerate(tail):
                        last = j == len(tail) - 1
                        rows.append((tok, shared[k] + j, k * n_attr + a, last))
                        if last:
                            where.append((start + k, a))
            it = iter(where)

            def put(i, lg):
                k, a = next(it)
                out[k, a] = p_yes(lg[self.yes], lg[self.no])

            decode_rows(ctx, rows, put)
        return out
