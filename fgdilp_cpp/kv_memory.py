"""KV memory: how many cells a context needs for one call, what a cell costs, and the budget that
bounds a Generator's contexts (--kv-budget-mib). Import-light: no llama.cpp.

A context holds the cells its sequences use (docs/method.md §9.3): P0 the call's prompt and reply
(at most -c), as unsteered; the prefixed sequences P+ / P-_j their prefix and then, under the reply
contrast, only the call's reply (under the full contrast the prompt too, as P0). A later call
that needs more cells (a longer conversation or reply) grows the context, its kept KV moved along;
nothing is ever truncated.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .errors import FgdilpError

# bytes per stored value of each KV cache type (quantised types: llama.cpp's blocks of 32 values)
CACHE_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
                    "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32}
CELL_PAD = 256             # llama.cpp rounds a context's cells up to a multiple of this
MIB = 1 << 20


class KvBudgetError(FgdilpError):
    """One request's contexts do not fit the KV budget, even with every other context dropped."""


@dataclass(frozen=True)
class Need:
    """What one generation asks of its contexts."""

    prompt: int               # tokens of the raw prompt (the conversation so far)
    reply: int                # n_predict
    samples: int = 1          # samples drawn together
    contrast: str = "full"    # what P+ / P-_j hold after their prefix
    kv_reuse: bool = False    # a chat turn: its twin and forks stay beside the kept conversation


def padded(cells: int) -> int:
    return -(-cells // CELL_PAD) * CELL_PAD


def bytes_per_cell(model, type_k: str, type_v: str) -> int:
    """KV bytes of one cell over all layers (every layer holds full KV: contexts set swa_full)."""
    for name, t in (("K", type_k), ("V", type_v)):
        if t not in CACHE_TYPE_BYTES:
            raise FgdilpError(f"unknown {name} cache type {t!r} (one of {', '.join(CACHE_TYPE_BYTES)})")
    i = model.info
    if i.n_head <= 0:
        return 0
    k_len = model.meta(f"{i.architecture}.attention.key_length")
    k_dim = int(k_len) if k_len else i.n_embd // i.n_head
    per_layer = i.n_head_kv * (k_dim * CACHE_TYPE_BYTES[type_k] + i.head_dim * CACHE_TYPE_BYTES[type_v])
    return math.ceil(i.n_layer * per_layer)


def machine_budget_mib(weights_bytes: int) -> int:
    """The default budget: half of this machine's physical memory, less the model's weights (at
    least 256 MiB)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return max(256, (total // 2 - weights_bytes) // MIB)


def method_cells(spec, e, f, room: int, need: Need) -> int:
    """Cells a method's context needs for `need` (an upper bound, before its plan exists).
    spec: methods.Method; e: EngineParams; f: FgdilpParams; room: its prefixes' tokens (Method.room)."""
    c = e.ctx_size
    reply = max(1, min(need.reply, c))
    prompt = max(1, min(need.prompt, c))
    roles = spec.n_roles(f)
    # exact methods decode P+ / P-_j beside P0 (their reply too); frozen ones capture them once
    prefixed = roles - 1 if spec.exact else (roles if roles > 1 else 0)
    steps = reply + 1 if spec.exact else 1
    # P0 holds this call's prompt and reply, at most the whole context (a later, longer turn grows
    # the context: method_contexts); under the full contrast each prefixed sequence holds its
    # prefix and the same prompt, under the reply contrast its prefix and the reply only
    p0 = min(c, prompt + reply + 1)
    per_prefixed = room + steps if need.contrast == "reply" else min(c, room + prompt + steps)
    cells = p0 + prefixed * per_prefixed
    cells += (need.samples - 1) * (roles if spec.exact else 1) * (reply + 1)   # the other samples' replies
    if need.kv_reuse and spec.hook and need.samples == 1:    # P0's unedited twin (engine/batch.py)
        cells += reply + 1
    if need.kv_reuse and spec.instance:    # the candidates fork the conversation (plans.selfgen_context)
        cells += f.samples * (f.selfgen_tokens + 1)
    return cells


def setup_cells(e, f, need: Need) -> int:
    """Cells of FGDILP's setup context: self-generation from the prompt (its samples' tokens each),
    or self-diagnosis, which follows it in a cleared context and asks for what each chunk of
    questions needs (instance.Diagnoser.scores: make_room)."""
    return min(need.prompt, e.ctx_size) + f.samples * (f.selfgen_tokens + 2)


def plan_cells(lengths: list[int], n_predict: int, ctx_size: int, samples: int, twin: bool) -> int:
    """Cells a plan's run uses (decode.run_plan over engine.Lockstep): each sequence's prompt once
    (shared by the samples), then per sample its last token and the reply's steps; the twin shares
    P0's prompt cells and decodes its own last token and steps."""
    steps = max(0, min(n_predict, ctx_size - max(lengths)))
    cells = sum(n - 1 for n in lengths) + len(lengths) * samples * (1 + steps)
    return cells + (1 + steps if twin else 0)


def evictions(sizes: dict[str, int], used: dict[str, int], name: str, want: int, budget: int,
              pinned: set[str]) -> list[str]:
    """The contexts to drop, least recently used first, so that `want` bytes for context `name`
    fit `budget` beside the rest (sizes: bytes per existing context; used: last-use counters;
    pinned: contexts the call in progress uses, never dropped). KvBudgetError when they cannot."""
    if want > budget:
        raise KvBudgetError(f"this request needs {want / MIB:.0f} MiB of KV cache for {name}, more than the "
                            f"KV budget of {budget / MIB:.0f} MiB (--kv-budget-mib); ask for fewer tokens "
                            "(a shorter conversation or reply, a smaller -c) or raise the budget")
    others = {n: b for n, b in sizes.items() if n != name}
    total = sum(others.values()) + want
    out = []
    for n in sorted((n for n in others if n not in pinned), key=lambda n: used.get(n, 0)):
        if total <= budget:
            break
        out.append(n)
        total -= others[n]
    if total > budget:
        held = sorted(n for n in others if n in pinned)
        raise KvBudgetError(f"this request needs {want / MIB:.0f} MiB of KV cache for {name} beside "
                            f"{(total - want) / MIB:.0f} MiB its other contexts ({', '.join(held)}) hold, more "
                            f"than the KV budget of {budget / MIB:.0f} MiB (--kv-budget-mib)")
    return out
