"""The package's shape, for issue reports: Python modules and lines under fgdilp_cpp/, and the longest
chain of imports (tests/test_architecture.py's import graph: every import at any depth of a module,
function-level ones too; the graph has no cycles, so the longest path is well defined).

    python scripts/code_shape.py        (from the checkout's root)
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_architecture import import_graph  # noqa: E402


def main() -> None:
    graph = import_graph()
    files = list((ROOT / "fgdilp_cpp").rglob("*.py"))
    lines = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in files)

    @functools.lru_cache(maxsize=None)
    def longest(module: str) -> tuple[str, ...]:
        return max(((module, *longest(d)) for d in graph[module]), key=len, default=(module,))

    chain = max((longest(m) for m in graph), key=len)
    short = [m.removeprefix("fgdilp_cpp.") for m in chain]
    print(f"modules {len(files)}  lines {lines:,}  longest import chain {len(chain)}: {' -> '.join(short)}")


if __name__ == "__main__":
    main()
