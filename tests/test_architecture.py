"""The package's shape: no import cycles, value types in a leaf, no native library on a plain
import, and no method-name branches outside the registry."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "fgdilp_cpp"
METHOD_NAMES = {"none", "prompt", "tr", "fgdilp", "fgdilp-frozen", "cvec", "random", "universal", "fgdilp-universal",
                "vectors"}


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> package modules it imports, at any depth of its code (function-level imports too)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        pkg = name if is_pkg else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[:len(pkg.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                found = subs if len(subs) == len(node.names) else [target, *subs]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            deps |= {m for m in found if m in mods and m != name}
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert "fgdilp_cpp.generation" in graph and "fgdilp_cpp.plans" in graph["fgdilp_cpp.generation"]
    assert cycles(graph) == []


def test_value_types_and_errors_are_leaves():
    graph = import_graph()
    assert graph["fgdilp_cpp.errors"] == set()
    assert graph["fgdilp_cpp.params"] <= {"fgdilp_cpp.errors"}
    assert graph["fgdilp_cpp.rpc_endpoints"] <= {"fgdilp_cpp.errors"}      # a value check, a leaf too
    # the settings' declarations (setting_spec) read the registry for which methods a setting changes
    assert graph["fgdilp_cpp.setting_spec"] <= {"fgdilp_cpp.errors", "fgdilp_cpp.methods"}
    assert graph["fgdilp_cpp.settings"] <= {"fgdilp_cpp.errors", "fgdilp_cpp.params", "fgdilp_cpp.rpc_endpoints",
                                            "fgdilp_cpp.setting_spec"}
    assert graph["fgdilp_cpp.methods"] <= {"fgdilp_cpp.errors", "fgdilp_cpp.params"}


def test_the_scorer_is_a_run_time_part_not_an_evaluation_one():
    graph = import_graph()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for d in graph[todo.pop()] - seen:
                seen.add(d)
                todo.append(d)
        return seen

    # the scorer and its files stand alone; evaluation's judges use them, not the other way round
    assert not any(m.startswith("fgdilp_cpp.evaluation") for m in reach("fgdilp_cpp.toxicity.scorer"))
    assert "fgdilp_cpp.toxicity.scorer" in graph["fgdilp_cpp.evaluation.judges"]
    # the run-time imports no evaluation module itself: only the commands that evaluate (the CLI)
    # and the setup that measures a model (autosetup reads prompts and perplexity) do
    users = {m for m, deps in graph.items() if any(d.startswith("fgdilp_cpp.evaluation") for d in deps)}
    assert {m for m in users if not m.startswith(("fgdilp_cpp.evaluation", "fgdilp_cpp.cli", "fgdilp_cpp.autosetup"))} \
        == set()
    assert "fgdilp_cpp.toxicity.scorer" in graph["fgdilp_cpp.runtime"]      # the diagnosing scorer, at run time


def test_settings_load_without_llama_cpp_or_the_native_library():
    # a None entry in sys.modules makes any import of that module fail, as when it is absent
    code = (
        "import sys\n"
        "for m in ('llama_cpp', 'llama_cpp.llama_cpp', 'fgdilp_cpp.native'):\n"
        "    sys.modules[m] = None\n"
        "import fgdilp_cpp\n"
        "s = fgdilp_cpp.Settings().updated({'steer_scale': 0.5})\n"
        "assert s.steer().scale == 0.5 and s.fgdilp().negatives == 6\n"
        "import fgdilp_cpp.methods as m\n"
        "assert 'tr' in m.names()\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def _method_name_branches(path: Path) -> list[int]:
    """Lines comparing something with a method-name literal (==, in, startswith)."""
    def names_in(node) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in METHOD_NAMES
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(names_in(e) for e in node.elts)
        return False

    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare) and any(names_in(x) for x in [node.left, *node.comparators]):
            lines.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "startswith" and any(names_in(a) for a in node.args)):
            lines.append(node.lineno)
    return lines


def test_no_file_branches_on_a_method_name():
    found = {}
    for path in PKG.rglob("*.py"):
        if path.name == "methods.py":
            continue
        lines = _method_name_branches(path)
        if lines:
            found[str(path.relative_to(PKG))] = lines
    assert found == {}


def test_the_branch_finder_finds_branches(tmp_path):
    p = tmp_path / "x.py"
    p.write_text('if m == "tr":\n    pass\nif m in ("cvec", "x"):\n    pass\nm.startswith("fgdilp")\n'
                 'd = {"method": "fgdilp"}\n')
    assert _method_name_branches(p) == [1, 3, 5]
