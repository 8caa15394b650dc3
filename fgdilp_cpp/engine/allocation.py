"""Checks made before llama.cpp allocates a context: what it cannot survive is refused with a clear
error, never an abort (a thread count it cannot start), a silent wrap (a cell count past its uint32
n_ctx) or the OOM killer (a KV cache larger than the memory)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import llama_cpp.llama_cpp as ll

from ..errors import FgdilpError
from ..params import MAX_SEQUENCES, max_threads

UINT32_MAX = 2**32 - 1
# bytes per cached element, by llama.cpp's -ctk/-ctv spelling (quantised types: a 32-element block)
CACHE_ELEMENT_BYTES = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
    "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32,
}


def kv_cache_bytes(model, n_ctx: int, type_k: str, type_v: str) -> int:
    """The KV cache llama.cpp allocates for `n_ctx` cells: every layer keeps each cell's keys and
    values (n_head_kv heads of key_length / value_length; the sliding-window layers too, as
    contexts are made with swa_full)."""
    i = model.info
    k_len = model.meta(f"{i.architecture}.attention.key_length")
    k_dim = int(k_len) if k_len else i.head_dim
    per_cell = i.n_layer * i.n_head_kv * (k_dim * CACHE_ELEMENT_BYTES.get(type_k, 4.0)
                                          + i.head_dim * CACHE_ELEMENT_BYTES.get(type_v, 4.0))
    return int(n_ctx * per_cell)


def available_memory() -> Optional[int]:
    """Bytes this process can still take: the kernel's MemAvailable, capped by a cgroup's memory
    limit (a container); None where neither can be read (not Linux)."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:     # "max" / a huge number: no limit
            found.append(int(text))
    return min(found) if found else None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_context(model, n_ctx: int, n_seq_max: int, n_threads: int, type_k: str, type_v: str) -> None:
    """Refuse a context llama.cpp would abort on, wrap, or that would not fit the memory."""
    most = max_threads()
    if not 0 <= n_threads <= most:
        raise FgdilpError(f"{n_threads} threads: a context runs 0 (every core) to {most} (4 per CPU core)")
    if not 1 <= n_ctx <= UINT32_MAX:
        raise FgdilpError(f"a context of {n_ctx:,} cells is past what llama.cpp can hold; lower the context size")
    if not 1 <= n_seq_max <= MAX_SEQUENCES:
        raise FgdilpError(f"a context of {n_seq_max} sequences; llama.cpp allows 1 to {MAX_SEQUENCES}")
    if ll.llama_supports_gpu_offload() and getattr(model, "n_gpu_layers", 0) != 0:
        return          # the offloaded layers' KV is in the GPU's memory: llama.cpp says if it does not fit
    need, free = kv_cache_bytes(model, n_ctx, type_k, type_v), available_memory()
    if free is not None and need > free:
        raise FgdilpError(f"a context of {n_ctx:,} cells needs about {_gib(need)} of KV cache for this model, "
                          f"more than the {_gib(free)} of memory available; lower the context size (-c), "
                          f"--kv-conversations or --selfgen-samples")
