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


@pytest.mark.real_model                   # eval scores with the tox-block scorer files
def test_eval_with_saved_vectors_and_split(tiny_llama, tmp_path, cli):
    """eval --vectors: the run named fgdilp-frozen applies the file and is reported as vectors (no
    per-prompt setup; steered text), the file's hash is in run.json and another file cannot resume
    the run; --split test takes odd ids."""
    model = str(tiny_llama[0])
    fast = ["--selfgen-samples", "3", "--selfgen-tokens", "4", "--selfgen-min-tokens", "1", "-c", "256", "-t", "1"]
    vec, other = tmp_path / "v.gguf", tmp_path / "w.gguf"
    for path, prompt in ((vec, "the cat sat"), (other, "a dog ran")):
        r = cli("vectors", "build", "-m", model, "-p", prompt, "-o", str(path), "--steer-scale", "4", *fast)
        assert r.returncode == 0, r.stderr
    out = tmp_path / "run"
    args = ["eval", "-m", model, "--prompts", RTP, "--split", "test", "--limit", "3", "--methods", "none,fgdilp-frozen",
            "--samples", "1", "-n", "4", "--judges", "none", "--tox-judges", "toxblock", "--steer-scale", "4",
            "--out", str(out), "--no-progress", *fast]
    r = cli(*args, "--vectors", str(vec))
    assert r.returncode == 0, r.stderr
    recs = records(out)
    assert sorted({x["prompt_id"] for x in recs}) == [1, 3, 5]
    text = {(x["method"], x["prompt_id"]): x["text"] for x in recs}
    assert {x["method"] for x in recs} == {"none", "vectors"}          # named for what ran: the saved vectors
    assert any(text[("vectors", p)] != text[("none", p)] for p in (1, 3, 5))
    cfg = json.loads((out / "run.json").read_text())["config"]
    assert len(cfg["vectors_sha256"]) == 64
    tim = [json.loads(l) for l in (out / "timings.jsonl").read_text().splitlines()]
    assert all(t["setup_s"] < 0.5 for t in tim if t["method"] == "vectors")   # no self-generation
    r = cli(*args, "--vectors", str(other))
    assert r.returncode == 1 and "vectors_sha256" in r.stderr
