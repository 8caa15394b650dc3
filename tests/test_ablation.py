"""Ablations (eval --ablate, calibrate --ablate): the points (one setting changed at a time, only
where it changes the method), the paired table against the base on fixtures with known answers,
and a run on the tiny model whose changed points really steer differently."""

from __future__ import annotations

import json
from contextlib import ExitStack

import numpy as np
import pytest

from fgdilp_cpp.api import Detoxifier
from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp.evaluation.ablation import ablation_markdown, ablation_points, add_ablation, parse_ablations
from fgdilp_cpp.evaluation.perplexity import PerplexityJudge
from fgdilp_cpp.evaluation.report import _ci, _f, _table
from fgdilp_cpp.evaluation.runner import GENERATIONS, read_jsonl, run_eval
from fgdilp_cpp.settings import Settings
from test_eval_runner import FGDILP, PROMPTS, FakeScorer


def test_points_change_one_setting_that_changes_the_method():
    changes = parse_ablations(["edit=rotate", "diagnoser=self", "steer-scale=0.5,1"])
    base = {"steer_scale": 0.5, "steer_layer_range": (15, 17), "diagnoser": "scorer"}
    frozen = ablation_points("fgdilp-frozen", base, changes)
    assert frozen == [base, {**base, "edit": "rotate"}, {**base, "diagnoser": "self"}, {**base, "steer_scale": 1.0}]
    # tr has no diagnoser: that change is dropped, and so is the base's own scale
    tr = ablation_points("tr", base, changes)
    assert tr == [{"steer_scale": 0.5, "steer_layer_range": (15, 17)},
                  {"steer_scale": 0.5, "steer_layer_range": (15, 17), "edit": "rotate"},
                  {"steer_scale": 1.0, "steer_layer_range": (15, 17)}]
    assert ablation_points("none", base, changes) == [{}]
    assert parse_ablations(["gate=0.2,off"]) == [("gate", [0.2, None])]     # an optional number: off = None
    with pytest.raises(FgdilpError, match="given twice"):
        parse_ablations(["edit=rotate", "edit=subtract"])
    with pytest.raises(FgdilpError, match="not a setting"):
        parse_ablations(["nonsense=1"])


def _report(emt_base, emt_var, tp_base, tp_var):
    ms = {"none": {"method": "none", "point": {}, "emt": 0.5, "tp": 0.5},
          "tr": {"method": "tr", "point": {}, "emt": float(np.mean(emt_base)), "tp": float(np.mean(tp_base)),
                "ppl_corpus_ratio": 1.1},
          "tr[edit=rotate]": {"method": "tr", "point": {"edit": "rotate"}, "emt": float(np.mean(emt_var)),
                             "tp": float(np.mean(tp_var)), "ppl_corpus_ratio": 1.0}}
    pp = {"tr": {"emt": np.asarray(emt_base, float), "tp": np.asarray(tp_base, float)},
          "tr[edit=rotate]": {"emt": np.asarray(emt_var, float), "tp": np.asarray(tp_var, float)}}
    return {"methods": ms, "baseline": "none"}, pp


def test_table_pairs_each_change_with_the_base():
    base = [0.2, 0.4, 0.6, 0.8]
    rep, pp = _report(base, [b - 0.1 for b in base], [0, 1, 0, 1], [0, 1, 0, 1])
    add_ablation(rep, pp, {"tr": {}}, n_boot=200)
    a = rep["ablation"]["tr"]
    assert a["base"] == "tr" and len(a["rows"]) == 1
    row = a["rows"][0]
    assert row["change"] == {"edit": [None, "rotate"]}
    # a constant paired shift: the difference and both ends of its interval are that shift
    assert row["emt_vs_base"] == pytest.approx([-0.1, -0.1, -0.1])
    assert row["tp_vs_base"] == pytest.approx([0.0, 0.0, 0.0])
    md = "\n".join(ablation_markdown(rep, _f, _ci, _table))
    assert "edit: default → rotate" in md and "-0.100 [-0.100, -0.100]" in md
    # a change that does nothing on average but varies per prompt: an interval around 0
    rep, pp = _report(base, [0.3, 0.3, 0.7, 0.7], [0, 1, 0, 1], [1, 0, 1, 0])
    add_ablation(rep, pp, {"tr": {}}, n_boot=500)
    d, lo, hi = rep["ablation"]["tr"]["rows"][0]["emt_vs_base"]
    assert d == pytest.approx(0.0) and lo < 0 < hi
    # no records at the base point: no table for that method
    add_ablation(rep, pp, {"tr": {"edit": "subtract"}})
    assert rep["ablation"] == {}


def test_ablation_run_on_the_tiny_model(tiny_llama, tmp_path):
    """eval's ablation: tr at the base and with edit=rotate and gate changed; the changed points
    steer differently (their texts differ from the base's somewhere), none runs once, and the
    report's table has one row per change."""
    changes = parse_ablations(["edit=rotate", "gate=0.5", "diagnoser=self"])
    methods = ["none", "tr"]
    grid = {m: ablation_points(m, {}, changes) for m in methods}
    assert grid["tr"] == [{}, {"edit": "rotate"}, {"gate": 0.5}]     # diagnoser does not change tr
    with ExitStack() as st:
        s = Settings(model=str(tiny_llama[0]), ctx_size=256, threads=1, steer_scale=4.0, **FGDILP)
        det = st.enter_context(Detoxifier(s, max_samples=2, max_new=8, reuse_instances=True))
        judge = st.enter_context(PerplexityJudge(det.model, n_threads=1))
        res = run_eval(det, PROMPTS[:3], methods, 2, 4, 0.9, 7, tmp_path / "ab", FakeScorer(), {"self": judge},
                       progress=False, grid=grid, n_boot=20, ablation={"tr": {}})
    rep = res["report"]
    assert set(rep["methods"]) == {"none", "tr", "tr[edit=rotate]", "tr[gate=0.5]"}
    rows = rep["ablation"]["tr"]["rows"]
    assert [r["change"] for r in rows] == [{"edit": [None, "rotate"]}, {"gate": [None, 0.5]}]
    texts: dict[str, list[str]] = {}
    for r in read_jsonl(tmp_path / "ab" / GENERATIONS)[0]:
        texts.setdefault(json.dumps(r["point"], sort_keys=True) + r["method"], []).append(r["text"])
    assert texts['{}tr'] != texts['{"edit": "rotate"}tr']
    assert texts['{}tr'] != texts['{}none']
    md = (tmp_path / "ab" / "report.md").read_text()
    assert "## Ablation: one setting at a time" in md and "edit: default → rotate" in md


def test_cli_ablate_with_sweep_is_refused(cli, tmp_path):
    r = cli("eval", "--prompts", "rtp-benign", "--out", str(tmp_path / "o"), "--ablate", "edit=rotate",
            "--sweep", "steer-scale=0.5,1")
    assert r.returncode != 0 and "does not combine" in r.stderr and "Traceback" not in r.stderr
    r = cli("eval", "--prompts", "rtp-benign", "--out", str(tmp_path / "o"), "--ablate", "nonsense=1")
    assert r.returncode != 0 and "not a setting" in r.stderr


def test_cli_ablate_methods_without_ablate_is_refused(cli, tmp_path):
    r = cli("calibrate", "--ablate-methods", "tr", "--out", str(tmp_path / "c"))
    assert r.returncode != 0 and "--ablate-methods needs --ablate" in r.stderr and "Traceback" not in r.stderr


def test_a_setting_turned_off_is_a_change():
    """condition=off (None given) against the run's settings (the key not given) is an ablation row,
    labelled default -> off."""
    from fgdilp_cpp.evaluation.ablation import _changed, ablation_markdown

    assert _changed({}, {"condition": None}) == {"condition": [None, None]}
    assert _changed({"gate": None}, {"gate": None}) == {}
    report = {"baseline": "none", "methods": {"tr": {"ci": {}}, "tr[condition=off]": {"point": {"condition": None}, "ci": {}}},
              "ablation": {"tr": {"base": "tr", "point": {}, "emt": 0.1, "tp": 0.0, "ppl_corpus_ratio": 1.0,
                                  "rows": [{"variant": "tr[condition=off]", "change": {"condition": [None, None]},
                                            "emt": 0.1, "tp": 0.0, "ppl_corpus_ratio": 1.0,
                                            "emt_vs_base": [0, 0, 0], "tp_vs_base": [0, 0, 0]}]}}}
    text = "\n".join(ablation_markdown(report, lambda x, d=3: str(x), lambda c: str(c), lambda h, rows: str(rows)))
    assert "condition: default → off" in text
