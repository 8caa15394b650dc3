"""The native library: version pinning at load, the C++ unit tests, and the bench JSON contract."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fgdilp_cpp import native
from fgdilp_cpp.errors import FgdilpError

ROOT = Path(__file__).resolve().parents[1]


def test_refuses_library_built_for_another_llama_cpp_python(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "0.0.1" if name == "llama_cpp_python" else real(name))
    with pytest.raises(FgdilpError, match="built against llama-cpp-python 0.3.36 but 0.0.1"):
        native.load_library()


def test_library_reports_its_build():
    assert native.load_library().fgdilp_build_llama_cpp_python_version().decode() == \
        importlib.metadata.version("llama_cpp_python")


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_native_unit_tests(tmp_path):
    """Builds native/ and its C++ tests against the installed llama-cpp-python and runs them."""
    build = tmp_path / "build"
    cfg = subprocess.run(["cmake", "-S", ROOT, "-B", build, f"-DPython_EXECUTABLE={sys.executable}",
                          "-DFGDILP_BUILD_TESTS=ON"], capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    b = subprocess.run(["cmake", "--build", build, "-j", str(os.cpu_count() or 2)], capture_output=True, text=True)
    assert b.returncode == 0, b.stdout + b.stderr
    run = subprocess.run([build / "test_native"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert " 0 failed" in run.stdout


def test_bench_json_contract(cli, tiny_llama):
    proc = cli("bench", "-m", tiny_llama[0], "--methods", "none,tr", "-n", "8", "-r", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["model"].endswith("tiny-llama.gguf")
    assert set(out["methods"]) == {"none", "tr"}
    assert out["methods"]["none"]["ratio_vs_none"] == 1.0
    for m in out["methods"].values():
        assert m["tokens_per_s"] > 0 and m["ratio_vs_none"] > 0
