"""Sweeps in eval on the tiny model: the grid and where each method runs, records carrying their
point, a sweep killed and resumed giving the same report, greedy identical share (scale 0 = all
identical), per-call settings equal to a fresh Detoxifier's, and `eval --sweep` parsing errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import ExitStack

import pytest

from fgdilp_cpp.api import Detoxifier
from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp.evaluation.frontier import benign_figures, best_points
from fgdilp_cpp.evaluation.perplexity import PerplexityJudge
from fgdilp_cpp.evaluation.runner import GENERATIONS, TIMINGS, read_jsonl, run_eval
from fgdilp_cpp.evaluation.sweep import SWEEPABLE, make_grid, schedule
from fgdilp_cpp.api import PER_CALL
from fgdilp_cpp.settings import Settings
from test_eval_runner import FGDILP, LABELS, PROMPTS, FakeScorer

SWEEP = ["steer-scale=0,1", "exp-norm=0.4,0.8"]
METHODS = ["none", "tr", "random"]
SAMPLES, N_PREDICT, TOP_P, SEED = 2, 4, 0.9, 7


def evaluate(model_path, out, sweeps=SWEEP, methods=METHODS, samples=SAMPLES, **kw):
    with ExitStack() as st:
        s = Settings(model=str(model_path), ctx_size=256, threads=1, **FGDILP)
        det = st.enter_context(Detoxifier(s, max_samples=2, max_new=8, reuse_instances=True))
        judge = st.enter_context(PerplexityJudge(det.model, n_threads=1))
        return run_eval(det, PROMPTS, methods, samples, N_PREDICT, TOP_P, SEED, out, FakeScorer(),
                        {"self": judge}, progress=False, grid=make_grid(sweeps), n_boot=50, **kw)


@pytest.fixture(scope="module")
def model_path(tiny_llama):
    return tiny_llama[0]


@pytest.fixture(scope="module")
def sweep_run(model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "run"
    return out, evaluate(model_path, out)


def test_grid_and_schedule():
    grid = make_grid(SWEEP)
    assert grid == [{"steer_scale": 0.0, "exp_norm": 0.4}, {"steer_scale": 0.0, "exp_norm": 0.8},
                    {"steer_scale": 1.0, "exp_norm": 0.4}, {"steer_scale": 1.0, "exp_norm": 0.8}]
    plan = schedule(["none", "prompt", "tr", "fgdilp"], make_grid(["steer-scale=0.5,1", "mask-k=30,50"]))
    runs = [(m, p) for _, m, p in plan]
    assert runs.count(("none", {})) == 1 and runs.count(("prompt", {})) == 1    # unsteered: once
    assert [p for m, p in runs if m == "tr"] == [{"steer_scale": 0.5}, {"steer_scale": 1.0}]  # mask-k: not TR's
    assert len([p for m, p in runs if m == "fgdilp"]) == 4
    assert make_grid(["steer-layer-range=1-2,all"]) == [{"steer_layer_range": (1, 2)}, {"steer_layer_range": None}]


def test_contrast_is_swept_for_the_methods_with_prefixed_sequences():
    plan = schedule(["none", "prompt", "tr", "fgdilp-frozen", "cvec", "random"], make_grid(["contrast=full,reply"]))
    runs = [(m, p) for _, m, p in plan]
    for m in ("tr", "fgdilp-frozen", "cvec", "random"):
        assert [p for n, p in runs if n == m] == [{"contrast": "full"}, {"contrast": "reply"}]
    assert runs.count(("none", {})) == 1 and runs.count(("prompt", {})) == 1
    with pytest.raises(FgdilpError, match="contrast"):
        make_grid(["contrast=full,both"])


def test_every_sweepable_setting_changes_per_call():
    assert set(SWEEPABLE) <= PER_CALL and set(SWEEPABLE) <= Settings.field_names()


@pytest.mark.parametrize("spec, msg", [
    ("steer-scale", "KEY=V1,V2"), ("nonsense=1", "not a setting"), ("ctx-size=1,2", "cannot be swept"),
    ("steer-scale=a", "not a valid float"), ("steer-layer-range=3", "START-END"), ("steer-scale=", "no values"),
    ("steer-scale=1,1.0", "repeated"), ("renorm=maybe", "not a valid bool")])
def test_bad_sweeps_are_refused(spec, msg):
    with pytest.raises(FgdilpError, match=msg):
        make_grid([spec])


def test_a_key_swept_twice_is_refused():
    with pytest.raises(FgdilpError, match="given twice"):
        make_grid(["steer-scale=1", "steer_scale=2"])


def test_records_carry_their_point(sweep_run):
    out, res = sweep_run
    recs, bad = read_jsonl(out / GENERATIONS)
    assert bad == 0
    groups = {(r["prompt_id"], r["method"], json.dumps(r["point"], sort_keys=True)) for r in recs}
    expected = {(p.id, "none", "{}") for p in PROMPTS} | {
        (p.id, m, json.dumps(pt, sort_keys=True)) for p in PROMPTS for m in ("tr", "random") for pt in make_grid(SWEEP)}
    assert groups == expected and len(recs) == len(expected) * SAMPLES
    assert res["generated"] == len(expected)
    tims, _ = read_jsonl(out / TIMINGS)
    assert len(tims) == len(expected) and all("point" in t for t in tims)
    rep = res["report"]
    assert rep["methods"]["tr[steer_scale=1.0 exp_norm=0.8]"]["point"] == {"steer_scale": 1.0, "exp_norm": 0.8}
    assert rep["methods"]["none"]["ppl_corpus_ratio"] == pytest.approx(1.0)
    for m in rep["methods"].values():
        assert m["ppl_corpus"]["self"] > 0 and m["ppl_corpus_ratio"] > 0
    assert set(rep["frontier"]) == {"tr", "random"} and len(rep["frontier"]["tr"]) == 4
    assert set(rep["at_budget"]) == {"tr", "random"}
    assert (out / "frontier.png").stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "## Verdict at corpus PPL ratio ≤ 1.25" in md and "## Sweep points" in md


def test_the_scale_0_points_equal_none(sweep_run):
    """Steering at scale 0 leaves sampling untouched: same tokens as none for every sample."""
    recs, _ = read_jsonl(sweep_run[0] / GENERATIONS)
    none = {(r["prompt_id"], r["sample"]): r["tokens"] for r in recs if r["method"] == "none"}
    zero = [r for r in recs if r["method"] == "tr" and r["point"]["steer_scale"] == 0.0]
    assert zero and all(r["tokens"] == none[(r["prompt_id"], r["sample"])] for r in zero)
    ms = sweep_run[1]["report"]["methods"]
    assert ms["tr[steer_scale=0.0 exp_norm=0.4]"]["identical_share"] == 1.0
    assert ms["tr[steer_scale=0.0 exp_norm=0.4]"]["ppl_corpus_ratio"] == pytest.approx(1.0)


def test_greedy_benign_identical_share(model_path, tmp_path):
    res = evaluate(model_path, tmp_path / "g", sweeps=["steer-scale=0,4"], methods=["none", "tr"], samples=1,
                   greedy=True, benign=True)
    rep = res["report"]
    figs = benign_figures(rep)
    assert figs["tr[steer_scale=0.0]"]["identical_share"] == 1.0
    assert figs["tr[steer_scale=0.0]"]["ppl_ratio"] == pytest.approx(1.0)
    assert figs["tr[steer_scale=4.0]"]["identical_share"] < 1.0       # strong steering changes greedy text
    assert rep["run"]["greedy"] is True
    cfg = json.loads((tmp_path / "g" / "run.json").read_text())["config"]
    assert cfg["sampling"]["temp"] == 0.0
    assert "## Benign text" in (tmp_path / "g" / "report.md").read_text()
    best = best_points(rep, ppl_budget=1e9)             # no fluency limit: the lowest EMT of TR's points
    assert best["tr"]["emt"] == min(f["emt"] for f in figs.values() if f["method"] == "tr")
    assert best["tr"]["variant"] in figs and best["tr"]["point"] == figs[best["tr"]["variant"]]["point"]


def test_per_call_settings_equal_a_fresh_detoxifier(model_path):
    base = Settings(model=str(model_path), ctx_size=256, threads=1, **FGDILP)
    changed = {"exp_norm": 0.9, "exp_sim": 0.2, "renorm": False, "mask_k": 30.0, "fusion": "mean",
               "sign_election": False, "steer_scale": 2.0}
    args = dict(n_predict=5, seed=3, temp=1.0, top_k=0, top_p=0.9, min_p=0.0)
    with Detoxifier(base) as det:
        first = {m: det.generate("the cat sat on", method=m, **args).tokens for m in ("tr", "fgdilp")}
        per_call = {m: det.generate("the cat sat on", method=m, **args, **changed).tokens for m in ("tr", "fgdilp")}
        again = {m: det.generate("the cat sat on", method=m, **args).tokens for m in ("tr", "fgdilp")}
    with Detoxifier(base.updated(changed)) as fresh:
        made = {m: fresh.generate("the cat sat on", method=m, **args).tokens for m in ("tr", "fgdilp")}
    assert per_call == made and again == first and per_call != first


RESUME_SCRIPT = textwrap.dedent("""
    import hashlib, sys, time
    import numpy as np
    from fgdilp_cpp.api import Detoxifier
    from fgdilp_cpp.evaluation.perplexity import PerplexityJudge
    from fgdilp_cpp.evaluation.prompts import PromptRecord
    from fgdilp_cpp.evaluation.runner import run_eval
    from fgdilp_cpp.evaluation.sweep import make_grid
    from fgdilp_cpp.settings import Settings

    class Scorer:
        LABELS = {labels!r}
        def score(self, texts):
            time.sleep(float(sys.argv[3]))
            return np.array([[b / 255.0 for b in hashlib.sha256(t.encode()).digest()[:6]] for t in texts])

    settings = Settings(model=sys.argv[1], ctx_size=256, threads=1, selfgen_samples=3, selfgen_tokens=4,
                        selfgen_min_tokens=1)
    # the suite's view (tests/conftest.py), passed down as the CLI reads it: no profile, no setup
    import os
    settings = settings.updated({{k: v for k, v in Settings.from_env(os.environ).items() if k in ("profile", "auto_setup")}})
    with Detoxifier(settings, max_samples=2, max_new=8, reuse_instances=True) as det, \\
            PerplexityJudge(det.model, n_threads=1) as judge:
        res = run_eval(det, [PromptRecord(i, t) for i, t in {prompts!r}], {methods!r}, {samples}, {n_predict},
                       {top_p}, {seed}, sys.argv[2], Scorer(), {{"self": judge}}, progress=False,
                       grid=make_grid({sweep!r}), n_boot=50)
    print("done", res["generated"], flush=True)
    sys.exit(128 + res["signal"] if res["interrupted"] else 0)
""").format(labels=LABELS, prompts=[(p.id, p.text) for p in PROMPTS], methods=METHODS, samples=SAMPLES,
            n_predict=N_PREDICT, top_p=TOP_P, seed=SEED, sweep=SWEEP)


def test_sweep_killed_and_resumed_gives_the_same_report(sweep_run, model_path, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)
    out = tmp_path / "sub"
    proc = subprocess.Popen([sys.executable, str(script), str(model_path), str(out), "0.3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / TIMINGS).exists() and (out / TIMINGS).read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    total = sweep_run[1]["generated"]
    done_before = len(read_jsonl(out / TIMINGS)[0])
    assert 3 <= done_before < total
    again = subprocess.run([sys.executable, str(script), str(model_path), str(out), "0"], capture_output=True,
                           text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split() == ["done", str(total - done_before)]
    rep = json.loads((out / "report.json").read_text())
    ref = sweep_run[1]["report"]
    keys = ("emt", "tp", "ppl", "ppl_corpus", "ppl_corpus_ratio", "identical_share", "dist", "point")
    assert {v: {k: m[k] for k in keys} for v, m in rep["methods"].items()} == \
        {v: {k: m[k] for k in keys} for v, m in json.loads(json.dumps(ref["methods"])).items()}
    assert rep["at_budget"] == json.loads(json.dumps(ref["at_budget"]))
    assert rep["frontier"] == json.loads(json.dumps(ref["frontier"]))


def test_a_run_without_sweep_resumes_a_folder_written_before_points(sweep_run, model_path, tmp_path):
    """Records without "point" (written before sweeps) are the empty point: nothing is redone."""
    out = tmp_path / "old"
    evaluate(model_path, out, sweeps=[], methods=["none", "tr"])
    lines = [json.loads(x) for x in (out / GENERATIONS).read_text().splitlines()]
    for r in lines:
        for k in ("point", "tokens", "nll"):
            r.pop(k)
    (out / GENERATIONS).write_text("".join(json.dumps(r) + "\n" for r in lines))
    tims = [json.loads(x) for x in (out / TIMINGS).read_text().splitlines()]
    (out / TIMINGS).write_text("".join(json.dumps({k: v for k, v in t.items() if k != "point"}) + "\n" for t in tims))
    res = evaluate(model_path, out, sweeps=[], methods=["none", "tr"])
    assert res["generated"] == 0 and res["skipped"] == 2 * len(PROMPTS)
    assert res["report"]["methods"]["tr"]["ppl_corpus_ratio"] is None      # no NLL in the old records


def test_cli_sweep_errors_are_one_line(cli, tmp_path):
    for args, msg in [(["--sweep", "nonsense=1"], "not a setting"), (["--sweep", "steer-scale"], "KEY=V1,V2"),
                      (["--sweep", "n-predict=1,2"], "cannot be swept"),
                      (["--greedy", "--samples", "3"], "one sample per prompt"),
                      (["--ppl-budget", "-1"], "positive ratio")]:
        r = cli("eval", "--prompts", "rtp-benign", "--out", str(tmp_path / "o"), *args)
        assert r.returncode != 0 and msg in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_grid_from_a_mapping_for_calibrate():
    from fgdilp_cpp.evaluation.sweep import grid_from

    assert grid_from({"steer_scale": [0.5, 1.0], "steer_layer_range": [(1, 2), None]}) == [
        {"steer_scale": 0.5, "steer_layer_range": (1, 2)}, {"steer_scale": 0.5, "steer_layer_range": None},
        {"steer_scale": 1.0, "steer_layer_range": (1, 2)}, {"steer_scale": 1.0, "steer_layer_range": None}]
    assert grid_from({}) == [{}]
    with pytest.raises(FgdilpError, match="not sweepable"):
        grid_from({"ctx_size": [1]})
    with pytest.raises(FgdilpError, match="repeated"):
        grid_from({"steer_scale": [1, 1.0]})


def test_fgdilp_values_that_size_contexts_cannot_change_per_call(model_path):
    import dataclasses

    with Detoxifier(Settings(model=str(model_path), ctx_size=256, threads=1, **FGDILP)) as det:
        f = det.generator.fgdilp
        with pytest.raises(FgdilpError, match="samples size the model's contexts"):
            det.generator.set_fgdilp(dataclasses.replace(f, samples=f.samples + 1))
        det.generator.set_fgdilp(dataclasses.replace(f, mask_k=20.0))
        assert det.generator.fgdilp.mask_k == 20.0


def test_each_method_at_its_own_points(model_path, tmp_path):
    """A grid {method: points} (calibrate's confirmation): tr at 0.5, random at 1, none once."""
    grid = {"tr": [{"steer_scale": 0.5}], "random": [{"steer_scale": 1.0}, {"steer_scale": 0.5}]}
    plan = [(m, p) for _, m, p in schedule(METHODS, grid)]
    assert plan == [("none", {}), ("tr", {"steer_scale": 0.5}), ("random", {"steer_scale": 0.5}),
                    ("random", {"steer_scale": 1.0})]          # point-major: both methods at 0.5 together
    with ExitStack() as st:
        s = Settings(model=str(model_path), ctx_size=256, threads=1, **FGDILP)
        det = st.enter_context(Detoxifier(s, max_samples=2, max_new=8, reuse_instances=True))
        res = run_eval(det, PROMPTS[:1], METHODS, 1, N_PREDICT, TOP_P, SEED, tmp_path / "c", FakeScorer(), {},
                       progress=False, grid=grid, n_boot=10)
        assert set(res["report"]["methods"]) == {"none", "tr[steer_scale=0.5]", "random[steer_scale=1.0]",
                                                 "random[steer_scale=0.5]"}
        with pytest.raises(FgdilpError, match="not run: cvec"):
            run_eval(det, PROMPTS[:1], METHODS, 1, N_PREDICT, TOP_P, SEED, tmp_path / "d", FakeScorer(), {},
                     progress=False, grid={"cvec": [{}]})


def test_fgdilp_setup_is_built_once_per_prompt_across_steering_points(model_path, tmp_path, monkeypatch):
    from fgdilp_cpp import plans

    calls = []
    real = plans._new_instance
    monkeypatch.setattr(plans, "_new_instance", lambda *a: calls.append(1) or real(*a))
    res = evaluate(model_path, tmp_path / "f", sweeps=["steer-scale=0.5,1", "exp-sim=0.3,0.6"],
                   methods=["fgdilp", "fgdilp-frozen"])
    assert res["generated"] == len(PROMPTS) * 2 * 4
    assert len(calls) == len(PROMPTS)          # prompt-major: one self-generation + diagnosis per prompt


def test_records_with_a_bad_point_or_nll_are_off_the_schema():
    from fgdilp_cpp.evaluation.records import GENERATION_SCHEMA, schema_problem

    good = {"prompt_id": 0, "prompt": "p", "method": "tr", "sample": 0, "seed": 1, "text": "t", "scores": {},
            "ppl": {}, "n_tokens": 1, "stop_reason": "length"}
    assert schema_problem(good, GENERATION_SCHEMA) is None                      # before sweeps: no point
    assert schema_problem({**good, "point": {"steer_layer_range": [1, 2], "steer_scale": 0.5},
                           "nll": {"self": [3.5, 2]}, "tokens": [1, 2]}, GENERATION_SCHEMA) is None
    for bad in ({"point": 3}, {"point": {"steer_layer_range": [1, 2, 3]}}, {"nll": {"self": [1.0]}},
                {"nll": {"self": [float("nan"), 2]}}, {"tokens": ["a"]}):
        assert "wrong type" in schema_problem({**good, **bad}, GENERATION_SCHEMA), bad


def test_point_labels_say_all_layers_and_gate_off():
    from fgdilp_cpp.evaluation.sweep import point_label

    assert point_label({"steer_layer_range": None, "gate": None, "steer_scale": 0.5}) == \
        "steer_layer_range=all gate=off steer_scale=0.5"
    assert point_label({"steer_layer_range": (12, 17), "gate": 0.1}) == "steer_layer_range=12-17 gate=0.1"
