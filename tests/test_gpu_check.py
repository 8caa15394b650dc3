"""tools/gpu-check.sh --cpu --quick: the GPU check's three parts, here on CPU (issue 14).

The CUDA build itself only runs on a GPU machine; everything after it is the same script."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu-check.sh"


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_cpu_quick_check_writes_the_results(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_THREADS": "2"}
    for var in ("OUT", "FGDILP_TEST_NGL", "FGDILP_N_GPU_LAYERS", "FGDILP_NATIVE_LIB"):
        env.pop(var, None)
    proc = subprocess.run(["bash", SCRIPT, "--cpu", "--quick", "--out", tmp_path], capture_output=True, text=True,
                          env=env, timeout=600, stdin=subprocess.DEVNULL)
    report = tmp_path / "gpu-check.json"
    assert report.is_file(), proc.stdout + proc.stderr
    res = json.loads(report.read_text())
    logs = "".join((tmp_path / p["log"]).read_text() for p in res["phases"].values()
                   if p["log"] != "-" and (tmp_path / p["log"]).is_file())
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs

    assert res["mode"] == "cpu" and res["quick"] is True and res["passed"] is True
    phases = res["phases"]
    assert [phases[p]["status"] for p in ("wheels", "build-llama", "build-native")] == ["skipped"] * 3
    for name in ("oracle", "bad-input", "bench"):
        assert phases[name]["status"] == "passed", phases[name]
    # pytest's summary: every oracle test ran (none skipped away) and passed
    detail = phases["oracle"]["detail"]
    assert detail.split()[1] == "passed" and int(detail.split()[0]) >= 5 and "skipped" not in detail, detail

    bench = res["bench"]
    assert bench["model"]["shape"]["n_layer"] == 4 and bench["threads"] == 2
    assert set(bench["methods"]) == {"none", "tr", "fgdilp", "fgdilp-frozen"}
    assert bench["methods"]["none"]["ratio_vs_none"] == 1.0
    for row in bench["methods"].values():
        assert math.isfinite(row["ratio_vs_none"]) and row["ratio_vs_none"] > 0
        assert row["tokens_per_s"] > 0 and len(row["runs_tokens_per_s"]) == bench["repeats"]
    assert bench["methods"]["fgdilp"]["setup_s"] > 0          # FGDILP really wrote and scored samples
    assert set(bench["hook"]) == {"no_hook", "hook_idle", "hook_ask", "hook_edit"}
    for row in bench["hook"].values():
        assert math.isfinite(row["ratio_vs_no_hook"]) and row["ratio_vs_no_hook"] > 0
    # the edit row really edited: one row per layer in the last decode
    assert bench["hook"]["hook_edit"]["edits_applied_last_decode"] == bench["model"]["shape"]["n_layer"]
    assert math.isfinite(bench["hook_overhead_pct"])


def test_unknown_argument_and_missing_results_folder_are_refused():
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(["bash", SCRIPT, "--cpu", "--frob"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "unknown argument --frob" in proc.stderr
    proc = subprocess.run(["bash", SCRIPT, "--cpu"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "no results folder" in proc.stderr
