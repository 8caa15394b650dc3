"""Multi-sequence batches: rows, positions, sequence ids, which rows want logits.

One batch is decoded as one ubatch (n_ubatch = n_batch), so row i of every activation is token i
of the batch: that is how the hook knows each row's role.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import llama_cpp.llama_cpp as ll
import numpy as np

from ..errors import ContextFullError, FgdilpError
from .owned import Owned


class Batch(Owned):
    """A reusable llama_batch of at most `capacity` rows, one sequence id per row."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.c = ll.llama_batch_init(capacity, 0, 1)
        self._open = True
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

    def _free(self) -> None:
        ll.llama_batch_free(self.c)
        self.c = None


@dataclass
class Capture:
    """Copy the activation of token `index` of sequence `seq` (prefill) into hook slot `slot`."""

    seq: int
    index: int
    slot: int


class Lockstep:
    """Groups of sequences that advance together.

    `sequences` (R roles, e.g. P+, P-, P0) are prefilled once; their KV is then shared by
    `n_groups` copies (llama_memory_seq_cp, no second prefill). Each step appends one token per
    active group to all R sequences of that group. In every decode that carries last positions,
    the batch holds R rows per active group in group order: row = k*R + role for the k-th active
    group, so hook edits written in role terms are placed on rows here.

    want_logits: roles whose rows ask for logits (others do not pay for the vocabulary).
    Sequence ids: first_seq + g*R + role.

    reuse: keep the longest common token prefix of each role with what group 0's sequences held
    after the last recorded run of this context (Context.kv) and decode only the rest; group 0
    keeps its cells when it stops, and record() says what they hold. Without reuse the caller
    clears the context first.

    twin (with reuse and one group): a role the hook edits (P0). Its edited rows are no use to the
    next run (a full prefill of the next prompt decodes them unedited), so an extra last role, its
    unedited twin with the same tokens, decodes beside it and is what the next run keeps: the
    twin's prompt cells are copied from it (llama_memory_seq_cp, not decoded twice), and a new turn
    decodes only the new tokens, not the steered reply again (docs/method.md §9.1). The twin's
    row is not edited and asks for no logits; row() and the edits' roles are unchanged.
    """

    def __init__(self, ctx, sequences: Sequence[Sequence[int]], want_logits: Sequence[int],
                 n_groups: int = 1, first_seq: int = 0, reuse: bool = False, twin: Optional[int] = None):
        self.ctx, self.sequences = ctx, [list(s) for s in sequences]
        self.n_roles, self.n_groups, self.first_seq = len(sequences), n_groups, first_seq
        self.twin = self.shadow = None
        if (reuse and twin is not None and n_groups == 1 and 0 <= twin < self.n_roles
                and self.n_roles + 1 <= ctx.params.n_batch and first_seq + self.n_roles + 1 <= ctx.params.n_seq_max):
            self.twin, self.shadow = twin, self.n_roles        # the unedited twin is the last role
            self.sequences.append(list(self.sequences[twin]))
            self.n_roles += 1
        if self.n_roles == 0 or any(len(s) == 0 for s in self.sequences):
            raise FgdilpError("empty sequence")
        if n_groups < 1:
            raise FgdilpError("at least one group")
        cap = ctx.params.n_batch
        if self.n_roles * n_groups > cap:
            raise FgdilpError(f"{self.n_roles * n_groups} sequences do not fit one batch of {cap} (-b)")
        if first_seq + self.n_roles * n_groups > ctx.params.n_seq_max:
            raise FgdilpError(f"{self.n_roles * n_groups} sequences exceed the context's {ctx.params.n_seq_max}")
        self.lengths = [len(s) for s in self.sequences]          # per role (same for every group)
        self.active = list(range(n_groups))                      # groups still generating
        self._batch = Batch(cap)
        self._want = [r in set(want_logits) for r in range(self.n_roles)]
        self._plan = None
        self.reuse = reuse
        self.appended: list[list[int]] = [[] for _ in range(n_groups)]   # tokens each group stepped
        self.reused = [0] * self.n_roles          # per role: prompt tokens whose KV was kept
        self._ids: Optional[list[list[int]]] = None   # [group][role] sequence ids chosen by reuse
        self._retained: dict[int, list[int]] = {}      # other conversations' records kept (kv_conversations > 1)

    def seq_id(self, group: int, role: int) -> int:
        if self._ids is not None:
            return self._ids[group][role]
        return self.first_seq + group * self.n_roles + role

    def row(self, group: int, role: int) -> int:
        """Row of (group, role) in the last decode that carried last positions."""
        return self.active.index(group) * self.n_roles + role

    def _place(self, edits: Sequence) -> tuple:
        """Role-relative edits, one copy per active group, moved onto that group's rows."""
        R, out = self.n_roles, []
        for k in range(len(self.active)):
            off = k * R
            for e in edits:
                out.append(replace(e, target=e.target + off, pos=e.pos + off if e.pos >= 0 else -1,
                                   neg=tuple(n + off for n in e.neg)))
        return tuple(out)

    def prefill(self, captures: Sequence[Capture] = (), edits: Sequence = (),
                before_last: Optional[Callable[[], None]] = None) -> None:
        """Decode every token of every role once, share it with all groups, then decode the last
        tokens of all groups together with `edits`. Captures name tokens of group 0.
        before_last: called between the two (e.g. to average captured slots into an e slot)."""
        hook = self.ctx.hook
        b, cap = self._batch, self.ctx.params.n_batch
        chunk = min(cap, self.ctx.params.prefill_rows or cap)   # n_batch may be raised to fit the last tokens
        b.clear()
        pending: list[tuple[int, int, int, int]] = []   # hook captures (row, slot, role, index) in this chunk
        by_pos: dict[tuple[int, int], list[int]] = {}      # one token may fill several slots
        for c in captures:
            seq = c.seq
            if seq == self.twin and c.index < len(self.sequences[seq]) - 1:
                seq = self.shadow              # the twin holds the same unedited prompt rows
            by_pos.setdefault((seq, c.index), []).append(c.slot)
        starts = self._kept_prefixes(by_pos)
        # each role's body alone, in chunks of -b rows from its first decoded token: llama.cpp's CPU
        # kernels pick their arithmetic by the ubatch's row count, so rows that shared a ubatch with
        # other roles (or were cut by a -b raised for them) came out slightly unlike the same tokens
        # decoded by method none
        for r, toks in enumerate(self.sequences):
            for i in range(starts[r], len(toks) - 1):
                if b.n == chunk:
                    self._decode_chunk(pending)
                    pending = []
                row = b.add(toks[i], i, self.seq_id(0, r), False)
                pending += [(row, slot, r, i) for slot in by_pos.get((r, i), ())]
            if b.n:
                self._decode_chunk(pending)
                pending = []
        if self.twin is not None and len(self.sequences[self.twin]) > 1:
            self.ctx.seq_cp(self.seq_id(0, self.shadow), self.seq_id(0, self.twin), 0,
                            len(self.sequences[self.twin]) - 1)
        for g in range(1, self.n_groups):
            for r, toks in enumerate(self.sequences):
                if len(toks) > 1:
                    self.ctx.seq_cp(self.seq_id(0, r), self.seq_id(g, r), 0, len(toks) - 1)
        if before_last is not None:
            before_last()
        last_caps = [(r, slot) for (r, i), slots in by_pos.items() for slot in slots
                     if i == len(self.sequences[r]) - 1]
        for g in range(self.n_groups):
            for r, toks in enumerate(self.sequences):
                b.add(toks[-1], len(toks) - 1, self.seq_id(g, r), self._want[r])
        placed = self._place(edits)
        if hook is not None:
            hook.set_plan(last_caps, placed)
        self._decode(b)
        self._check_edits(placed)
        self._plan = None  # the prefill plan may have captures: the first step sets its own

    def _kept_prefixes(self, by_pos: dict[tuple[int, int], list[int]]) -> list[int]:
        """Per role, the first prompt index to decode: 0, or with reuse the common prefix with the
        recorded tokens of its group-0 sequence (never the last token: it carries the edits and
        the logits). A capture inside a kept prefix gets back the row it saved then; where none
        is saved, the prefix is cut there and the capture runs again. Every other sequence is
        emptied (kept, with kv_conversations > 1, until its id is needed), and so is the whole
        context when its records are unknown."""
        ctx = self.ctx
        known = ctx.take_kv()
        if not self.reuse:
            return [0] * self.n_roles
        if known is None:
            ctx.clear()
            known = {}
        ctx.kv = None
        self._ids, copies = self._assign(known)
        mine = set(self._ids[0])
        used = {i for ids in self._ids for i in ids}
        retain = ctx.params.kv_conversations > 1
        self._retained = {}
        for seq, toks in known.items():
            if seq in mine:
                continue
            if retain and seq not in used:
                self._retained[seq] = toks                     # another conversation's, left as it is
            else:
                ctx.seq_rm(seq)
        starts = []
        for r, toks in enumerate(self.sequences):
            seq = self.seq_id(0, r)
            if r in copies:                                    # a prefix of another conversation's record
                src, keep = copies[r]
                ctx.seq_rm(seq)
                ctx.seq_cp(src, seq, 0, keep)
            else:
                keep = _common_prefix(known.get(seq, ()), toks, len(toks) - 1)
            for i in sorted(i for (rr, i) in by_pos if rr == r and i < keep):
                if not all(ctx.restore_slot(slot, toks[:i + 1]) for slot in by_pos[(r, i)]):
                    keep = i
                    break
            if r == self.twin:                 # its prompt cells come from the twin (prefill)
                keep = len(toks) - 1
                ctx.seq_rm(seq)
            else:
                ctx.seq_rm(seq, keep, -1)
            starts.append(keep)
        self.reused = list(starts)
        if self.twin is not None:
            self.reused[self.twin] = starts[self.shadow]
        return starts

    def _assign(self, known: dict[int, list[int]]) -> tuple[list[list[int]], dict[int, tuple[int, int]]]:
        """Sequence ids per (group, role), and the roles that start from a copy of another record
        ({role: (record's sequence, tokens copied)}). Each role of group 0 takes the recorded
        sequence that shares the longest prefix with it (the hook finds roles by batch row, not by
        id, so a role may move: FGDILP's P0 follows a varying number of negatives); the rest take
        free ids. With kv_conversations > 1 a record whose prompt the role does not extend belongs
        to another conversation: the role copies the shared prefix (cells are shared, not
        duplicated) and the record stays; free ids are those without a record first, then the
        least recently used records'."""
        R, lo, hi = self.n_roles, self.first_seq, self.ctx.params.n_seq_max
        ctx = self.ctx
        pairs = sorted(((_common_prefix(old, toks, len(toks) - 1), r, seq) for r, toks in enumerate(self.sequences)
                        for seq, old in known.items() if lo <= seq < hi and r != self.twin), reverse=True)
        group0: dict[int, int] = {}
        shared: dict[int, int] = {}        # role -> tokens it shares with its record
        for n, r, seq in pairs:
            if n > 0 and r not in group0 and seq not in group0.values():
                group0[r], shared[r] = seq, n
        copies: dict[int, tuple[int, int]] = {}
        if ctx.params.kv_conversations > 1:
            for r, seq in list(group0.items()):
                n = shared[r]
                if n < ctx.kv_prompt_len.get(seq, len(known[seq])):
                    copies[r] = (seq, n)
                    del group0[r]
        sources = {src for src, _ in copies.values()}
        taken = set(group0.values())
        stamp = ctx.kv_stamp
        free_ids = ([i for i in range(lo, hi) if i not in known and i not in taken] +
                    sorted((i for i in range(lo, hi) if i in known and i not in taken and i not in sources),
                           key=lambda i: stamp.get(i, 0)) +
                    sorted((i for i in sources if lo <= i < hi and i not in taken), key=lambda i: stamp.get(i, 0)))
        free = iter(free_ids)
        ids = [[group0[r] if r in group0 else next(free) for r in range(R)]]
        ids += [[next(free) for _ in range(R)] for _ in range(1, self.n_groups)]
        for r in list(copies):            # a copy whose source was taken as a free id cannot be made
            if copies[r][0] in {i for g in ids for i in g}:
                del copies[r]
        return ids, copies

    def _decode_chunk(self, pending: list[tuple[int, int, int, int]]) -> None:
        hook = self.ctx.hook
        if hook is not None:
            hook.set_plan([(row, slot) for row, slot, _, _ in pending], ())
        self._decode(self._batch)
        self._batch.clear()
        if hook is not None and self.reuse:
            for _, slot, r, i in pending:
                self.ctx.save_row(self.sequences[r][:i + 1], hook.slots[slot])

    def _decode(self, batch) -> None:
        """Decode; when the cells are full and other conversations' records are kept, drop the
        least recently used of them and try again (llama.cpp decoded nothing of the batch)."""
        ctx = self.ctx
        while True:
            try:
                ctx.decode(batch)
                return
            except ContextFullError:
                kept = self._retained
                if not kept:
                    raise
                seq = min(kept, key=lambda i: ctx.kv_stamp.get(i, 0))
                del kept[seq]
                ctx.seq_rm(seq)

    def _check_edits(self, edits: Sequence) -> None:
        hook = self.ctx.hook
        if edits and hook is not None:
            want = len(edits) * hook.n_steered_layers
            if hook.edits_applied != want:
                raise FgdilpError(f"steering edited {hook.edits_applied} rows, expected {want}")

    def deactivate(self, group: int) -> None:
        """Stop advancing `group` (its rows leave the following batches); with reuse group 0
        keeps its cells for the next run."""
        self.active.remove(group)
        if self.reuse and group == 0:
            return
        for r in range(self.n_roles):
            self.ctx.seq_rm(self.seq_id(group, r))

    def record(self, edited_roles: Sequence[int] = ()) -> None:
        """After a run that ended with every group stopped: note in the context what group 0's
        cells hold, for the next run's reuse. edited_roles: roles whose rows the hook edited (their
        last prompt token and later tokens differ from an unsteered prefill; only the part before
        is kept)."""
        if not self.reuse or self.active:
            return
        ctx = self.ctx
        kv = dict(self._retained)
        lens = {seq: ctx.kv_prompt_len.get(seq, len(t)) for seq, t in kv.items()}
        ctx.kv_clock += 1
        for r, toks in enumerate(self.sequences):
            seq = self.seq_id(0, r)
            if r == self.twin:                 # its unedited prompt is the twin's; the rest is edited
                ctx.seq_rm(seq)
                continue
            kv[seq] = toks[:-1] if r in edited_roles else toks + self.appended[0]
            lens[seq] = min(len(toks), len(kv[seq]))
            ctx.kv_stamp[seq] = ctx.kv_clock
        ctx.kv_prompt_len = lens
        ctx.kv_stamp = {seq: t for seq, t in ctx.kv_stamp.items() if seq in kv}
        ctx.kv = kv

    def step(self, tokens: Sequence[int], edits: Sequence = ()) -> None:
        """Append tokens[k] to every role of the k-th active group and decode the new rows."""
        b, hook, R = self._batch, self.ctx.hook, self.n_roles
        b.clear()
        for k, g in enumerate(self.active):
            self.appended[g].append(tokens[k])
            for r in range(R):
                b.add(tokens[k], self.lengths[r], self.seq_id(g, r), self._want[r])
        for r in range(R):
            self.lengths[r] += 1
        placed = self._place(edits)
        if hook is not None and placed != self._plan:
            hook.set_plan((), placed)
            self._plan = placed
        self._decode(b)
        self._check_edits(placed)

    def logits(self, group: int, role: int):
        """Logits at the last decoded position of (group, role): a view into llama.cpp's buffer."""
        return self.ctx.logits(self.row(group, role))

    def close(self) -> None:
        self._batch.close()


def prefill_aside(ctx, sequences: Sequence[Sequence[int]], captures: Sequence[Capture]) -> None:
    """Prefill `sequences` once for the hook's `captures` (no logits) in sequence ids that no KV
    record of `ctx` uses, then remove them: what the context keeps for reuse (a conversation's P0)
    survives. Where no such ids or no free cells remain, the context is cleared first."""
    n = len(sequences)
    ctx.make_room(sum(len(s) for s in sequences))     # a context sized to its last call may hold fewer cells
    known = ctx.take_kv()
    free = None if known is None else _free_run(known, n, ctx.params.n_seq_max)
    if free is None:
        ctx.clear()
        known, free = {}, 0
    lock = Lockstep(ctx, sequences, want_logits=[], first_seq=free)
    try:
        lock.prefill(captures)
    except ContextFullError:
        if not known:
            raise
        known = None                     # the kept records take the cells: give them up (below)
    finally:
        lock.close()
        for s in range(free, free + n):
            ctx.seq_rm(s)
        ctx.kv = known
    if known is None:                    # records unknown: this call clears the context first
        prefill_aside(ctx, sequences, captures)


def _free_run(known: dict[int, list[int]], n: int, n_seq_max: int) -> Optional[int]:
    """The first id of n consecutive sequence ids without a KV record, or None."""
    run = 0
    for i in range(n_seq_max):
        run = 0 if i in known else run + 1
        if run == n:
            return i - n + 1
    return None


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of a and b, at most limit."""
    n = min(len(a), len(b), limit)
    if n <= 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n
