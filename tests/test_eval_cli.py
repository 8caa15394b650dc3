"""fgdilp-cpp eval through a subprocess: a crashed run resumes to the same report, no duplicates."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from fgdilp_cpp.evaluation.prompts import builtin_prompts_file

RTP = "rtp-toxic"             # the built-in development prompts (fgdilp_cpp/data/)
METHODS = "none,tr,fgdilp-frozen,cvec,random"


def eval_args(model, prompts, out):
    return [sys.executable, "-m", "fgdilp_cpp.cli", "eval", "-m", str(model), "--prompts", str(prompts),
            "--methods", METHODS, "--samples", "2", "-n", "5", "--out", str(out), "--judges", "self",
            "--selfgen-samples", "3", "--selfgen-tokens", "4", "--selfgen-min-tokens", "1", "-c", "256",
            "-t", "1", "--no-progress"]


def records(out):
    return [json.loads(l) for l in (out / "generations.jsonl").read_text().splitlines() if l.strip()]


def summary(out):
    rep = json.loads((out / "report.json").read_text())
    return {m: (r["emt"], r["tp"], r["dist"], r["labels"], r["ppl"]["self"]["mean"]) for m, r in rep["methods"].items()}


@pytest.mark.real_model                   # eval scores with the tox-block scorer files
def test_killed_eval_resumes_to_the_same_report(tiny_llama, tmp_path):
    prompts = tmp_path / "p.jsonl"
    rtp = gzip.decompress(builtin_prompts_file(RTP).read_bytes()).decode()
    prompts.write_text("".join(rtp.splitlines(keepends=True)[:8]))
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    done = subprocess.run(eval_args(tiny_llama[0], prompts, full), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    n_all = len(records(full))
    assert n_all == 8 * 5 * 2

    proc = subprocess.Popen(eval_args(tiny_llama[0], prompts, crashed), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    gens = crashed / "generations.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if gens.exists() and gens.read_text().count("\n") >= 12:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)          # a crash: nothing gets to clean up
    proc.wait()
    before = len(records(crashed))
    assert 12 <= before < n_all

    again = subprocess.run(eval_args(tiny_llama[0], prompts, crashed), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    recs = records(crashed)
    keys = Counter((r["prompt_id"], r["method"], r["sample"]) for r in recs)
    assert len(recs) == n_all and max(keys.values()) == 1
    assert summary(crashed) == summary(full)
    for name in ("report.md", "toxicity.png", "labels.png", "emt_vs_ppl.png"):
        assert (crashed / name).stat().st_size > 0
    # a rerun of a finished evaluation redoes nothing
    third = subprocess.run(eval_args(tiny_llama[0], prompts, crashed), capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and len(records(crashed)) == n_all


@pytest.mark.real_model                   # the tox-block scorer files
def test_eval_calibrate(cli):
    proc = cli("eval", "calibrate", "--prompts", RTP, "--limit", "400", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["n"] == 400 and out["labels"]["toxic"]["auc"] > 0.8


def test_eval_needs_prompts_and_out(cli):
    proc = cli("eval", "--methods", "none")
    assert proc.returncode == 1 and "--prompts" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_samples_prints_each_method(cli, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    recs = [{"prompt_id": 3, "prompt": "p|q", "method": m, "sample": s, "seed": s, "text": f"{m} text\nmore",
             "scores": {"toxic": 0.25}, "ppl": {}, "n_tokens": 3, "stop_reason": "length"}
            for m in ("none", "tr") for s in range(2)]
    (out / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    proc = cli("eval", "samples", "--out", out, "--prompt-ids", "3", "--sample", "1")
    assert proc.returncode == 0, proc.stderr
    assert "| none | 0.250 | none text more |" in proc.stdout and "| tr | 0.250 |" in proc.stdout
    assert cli("eval", "samples", "--out", tmp_path / "nope").returncode == 1
