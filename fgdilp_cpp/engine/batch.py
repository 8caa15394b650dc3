"""Multi-sequence batches: rows, positions, sequence ids, which rows want logits.

One batch is decoded as one ubatch (n_ubatch = n_batch), so row i of every activation is token i
of the batch: that is how the hook knows each row's role.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import llama_cpp.llama_cpp as ll

from ..errors import FgdilpError


class Batch:
    """A reusable llama_batch of at most `capacity` rows, one sequence id per row."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.c = ll.llama_batch_init(capacity, 0, 1)
        self.n = 0

    def clear(self) -> None:
        self.n = 0
        self.c.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Append one row; returns its row index."""
        i = self.n
        if i >= self.capacity:
            raise FgdilpError(f"batch overflow ({self.capacity} rows)")
        c = self.c
        c.token[i] = token
        c.pos[i] = pos
        c.n_seq_id[i] = 1
        c.seq_id[i][0] = seq
        c.logits[i] = logits
        self.n = i + 1
        c.n_tokens = self.n
        return i

    def close(self) -> None:
        if self.c is not None:
            ll.llama_batch_free(self.c)
            self.c = None

    def __enter__(self) -> "Batch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


@dataclass
class Capture:
    """Copy the activation of token `index` of sequence `seq` (prefill) into hook slot `slot`."""

    seq: int
    index: int
    slot: int


@dataclass
class Lockstep:
    """Sequences that advance together: each prefilled with its own tokens, then one shared token
    appended to all of them per step. In every decode that carries the sequences' last positions,
    row s of the batch is the last token of sequence s, so hook edits can name sequences as rows.

    ctx: engine Context; sequences: token lists, sequence s uses seq_id first_seq + s.
    want_logits: sequences whose last row asks for logits (the others do not pay for the vocab).
    """

    ctx: object
    sequences: Sequence[Sequence[int]]
    want_logits: Sequence[int]
    first_seq: int = 0
    lengths: list[int] = field(init=False)

    def __post_init__(self):
        n_seq = len(self.sequences)
        if n_seq == 0 or any(len(s) == 0 for s in self.sequences):
            raise FgdilpError("empty sequence")
        cap = self.ctx.params.n_batch
        if n_seq > cap:
            raise FgdilpError(f"{n_seq} sequences do not fit one batch of {cap}")
        self.lengths = [len(s) for s in self.sequences]
        self._batch = Batch(cap)
        self._want = [s in set(self.want_logits) for s in range(n_seq)]
        self._plan = None

    def prefill(self, captures: Sequence[Capture] = (), edits: Sequence = ()) -> None:
        """Decode every token of every sequence; the last tokens go last, together, with `edits`."""
        hook = self.ctx.hook
        b, cap = self._batch, self.ctx.params.n_batch
        b.clear()
        pending: list[tuple[int, int]] = []   # hook captures (row, slot) in the current chunk
        by_pos = {(c.seq, c.index): c.slot for c in captures}
        for s, toks in enumerate(self.sequences):
            for i, tok in enumerate(toks[:-1]):
                if b.n == cap:
                    self._decode_chunk(pending)
                    pending = []
                row = b.add(tok, i, self.first_seq + s, False)
                slot = by_pos.get((s, i))
                if slot is not None:
                    pending.append((row, slot))
        if b.n:
            self._decode_chunk(pending)
        last_caps = [(s, slot) for (s, i), slot in by_pos.items() if i == len(self.sequences[s]) - 1]
        for s, toks in enumerate(self.sequences):
            b.add(toks[-1], len(toks) - 1, self.first_seq + s, self._want[s])
        if hook is not None:
            hook.set_plan(last_caps, edits)
        self.ctx.decode(b)
        self._check_edits(edits)
        self._plan = None  # the prefill plan had captures: the first step sets its own

    def _decode_chunk(self, pending: list[tuple[int, int]]) -> None:
        hook = self.ctx.hook
        if hook is not None:
            hook.set_plan(pending, ())
        self.ctx.decode(self._batch)
        self._batch.clear()

    def _check_edits(self, edits: Sequence) -> None:
        hook = self.ctx.hook
        if edits and hook is not None:
            want = len(edits) * hook.n_steered_layers
            if hook.edits_applied != want:
                raise FgdilpError(f"steering edited {hook.edits_applied} rows, expected {want}")

    def step(self, token: int, edits: Sequence = ()) -> None:
        """Append `token` to every sequence and decode the new row of each; `edits` name rows
        (= sequence indexes) of this one-row-per-sequence batch."""
        b, hook = self._batch, self.ctx.hook
        b.clear()
        for s in range(len(self.sequences)):
            b.add(token, self.lengths[s], self.first_seq + s, self._want[s])
            self.lengths[s] += 1
        edits = tuple(edits)
        if hook is not None and edits != self._plan:
            hook.set_plan((), edits)
            self._plan = edits
        self.ctx.decode(b)
        self._check_edits(edits)

    def logits(self, seq: int):
        """Logits at the last decoded position of sequence `seq` (a view into llama.cpp's buffer)."""
        return self.ctx.logits(seq)

    def close(self) -> None:
        self._batch.close()
