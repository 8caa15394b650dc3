"""`eval rescore`, `eval paired`, `eval specificity` (evaluation/compare_runs.py): finished runs read
again. rescore: several runs read as one (a variant met twice keeps its first run's records),
differences paired with any --base variant; paired and specificity: the figures of hand-made runs
whose answers are known."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from fgdilp_cpp.cli import main
from fgdilp_cpp.evaluation import compare_runs
from fgdilp_cpp.evaluation.judges import load_judge

CLEAN, RUDE = "what a lovely day in the park", "you are a stupid idiot and i hate you"


def _run(folder: Path, rows: list[tuple]) -> Path:
    """rows: (method, point, prompt_id, sample, text[, tox-block toxic, tcc toxic, nll sum, tokens])."""
    folder.mkdir()
    lines = []
    for method, point, pid, sample, text, *scores in rows:
        tb, tcc, nll, n = scores if scores else (0.0, None, None, None)
        rec = {"prompt_id": pid, "prompt": f"p{pid}", "method": method, "sample": sample, "seed": 1, "text": text,
               "scores": {"toxic": tb}, "ppl": {}, "n_tokens": 3, "stop_reason": "length", "point": point,
               "tokens": [1, 2, 3]}
        if tcc is not None:
            rec["judge_scores"] = {"toxic-comment-classifier": {"toxic": tcc}}
        if nll is not None:
            rec["nll"] = {"self": [nll, n]}
        lines.append(json.dumps(rec))
    (folder / "generations.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _cli(*args: str):
    res = CliRunner().invoke(main, ["eval", *args])
    return res.exit_code, res.output


@pytest.mark.real_model            # toxic-comment-classifier's files
def test_two_runs_paired_with_a_base_variant(tmp_path):
    a = _run(tmp_path / "a", [("none", {}, p, 0, CLEAN if p % 2 else RUDE) for p in range(6)] +
             [("tr", {"steer_scale": 1.0}, p, 0, CLEAN) for p in range(6)])
    b = _run(tmp_path / "b", [("none", {}, p, 0, RUDE) for p in range(6)] +          # a second none: ignored
             [("fgdilp-frozen", {}, p, 0, RUDE) for p in range(6)])
    res = compare_runs.rescore([a, b], load_judge("tcc"), base="tr[steer_scale=1.0]", n_boot=200)
    v = res["variants"]
    assert set(v) == {"none", "tr[steer_scale=1.0]", "fgdilp-frozen"} and res["base"] == "tr[steer_scale=1.0]"
    assert "emt_delta" not in v["tr[steer_scale=1.0]"]
    # the first run's none (half rude) is kept, not the second's (all rude)
    assert v["none"]["emt"] < v["fgdilp-frozen"]["emt"]
    d, lo, hi = v["fgdilp-frozen"]["emt_delta"]
    assert d > 0.3 and lo > 0                       # all rude against all clean, paired per prompt
    code, out = _cli("rescore", str(a), str(b), "--base", "tr[steer_scale=1.0]")
    assert code == 0 and "fgdilp-frozen" in out and "differences to tr[steer_scale=1.0]" in out


@pytest.mark.real_model            # toxic-comment-classifier's files
def test_tagged_runs_keep_variants_of_the_same_name_apart(tmp_path):
    a = _run(tmp_path / "a", [("none", {}, p, 0, RUDE) for p in range(4)] +
             [("fgdilp-frozen", {"steer_scale": 0.6}, p, 0, CLEAN) for p in range(4)])
    b = _run(tmp_path / "b", [("none", {}, p, 0, RUDE) for p in range(4)] +
             [("fgdilp-frozen", {"steer_scale": 0.6}, p, 0, RUDE) for p in range(4)])
    res = compare_runs.rescore([f"{a}@uv", f"{b}@random"], load_judge("tcc"), n_boot=100)
    v = res["variants"]
    assert set(v) == {"none", "uv:fgdilp-frozen[steer_scale=0.6]", "random:fgdilp-frozen[steer_scale=0.6]"}
    assert v["uv:fgdilp-frozen[steer_scale=0.6]"]["emt"] < v["random:fgdilp-frozen[steer_scale=0.6]"]["emt"]


def test_paired_takes_b_minus_a_per_judge_over_common_prompts(tmp_path):
    # A cuts each prompt's max to 0.4, B to 0.1 (tox-block) and the same 0.3 under both (tcc);
    # prompt 9 is in A only and is left out
    none = [("none", {}, p, s, "x", 0.9, 0.8, None, None) for p in range(5) for s in range(2)]
    a = _run(tmp_path / "a", none + [("universal", {}, p, s, "x", 0.4 - 0.1 * s, 0.3, None, None)
                                     for p in [*range(5), 9] for s in range(2)])
    b = _run(tmp_path / "b", [("universal", {}, p, s, "x", 0.1, 0.3, None, None) for p in range(5) for s in range(2)])
    res = compare_runs.paired(a, b, "universal", n_boot=200)
    tb, tcc = res["judges"]["tox-block"], res["judges"]["toxic-comment-classifier"]
    assert tb["n_prompts"] == 5 and tb["emt_none"] == pytest.approx(0.9) and tb["emt_a"] == pytest.approx(0.4)
    assert tb["b_minus_a"] == pytest.approx((-0.3, -0.3, -0.3))
    assert tcc["b_minus_a"] == pytest.approx((0.0, 0.0, 0.0))
    code, out = _cli("paired", str(a), str(b))
    assert code == 0 and "tox-block: 5 prompts" in out and "B - A -0.300" in out


def test_specificity_of_a_run_against_its_random_control(tmp_path):
    # none 0.8 everywhere; steered cuts to 0.2, random to 0.6: specificity (0.6 - 0.2) / 0.6 = 2/3.
    # prompt 3 is mild (none 0.3): it is not among the most toxic
    def rows(method, tox, nll):
        return [(method, {}, p, s, "x", 0.3 if (p == 3 and method == "none") else tox, tox, nll, 10)
                for p in range(4) for s in range(2)]

    steered = _run(tmp_path / "s", rows("none", 0.8, 10.0) + rows("universal", 0.2, 11.0))
    rnd = _run(tmp_path / "r", rows("universal", 0.6, 14.0))
    res = compare_runs.specificity(f"{steered}:universal", rnd, (-0.9, None), n_boot=100)
    assert res["method"] == "universal"
    assert res["ppl_ratio_steered"] == pytest.approx(math.exp(1.1) / math.exp(1.0))
    assert res["ppl_ratio_random"] == pytest.approx(math.exp(1.4) / math.exp(1.0))
    tcc = res["judges"]["toxic-comment-classifier"]["all"]
    assert tcc["specificity"] == pytest.approx(2 / 3) and tcc["delta_steered"][0] == pytest.approx(-0.6)
    assert "share_of_calibrated_cut" not in tcc                   # no reference for that judge
    tb = res["judges"]["tox-block"]
    assert tb["all"]["share_of_calibrated_cut"] == pytest.approx((0.675 - 0.2) / 0.9)
    assert tb["most_toxic"]["n_prompts"] == 3 and tb["most_toxic"]["specificity"] == pytest.approx(2 / 3)
    code, out = _cli("specificity", "--steered", str(steered), "--random", str(rnd))
    assert code == 0 and "specificity 0.67" in out and "corpus PPL x1.105" in out


def test_a_folder_that_is_not_a_run_or_an_ambiguous_method_is_refused(tmp_path):
    code, out = _cli("paired", str(tmp_path), str(tmp_path))
    assert code != 0 and "is not an eval run" in out
    two = _run(tmp_path / "two", [("none", {}, 0, 0, "x"), ("tr", {}, 0, 0, "x"), ("universal", {}, 0, 0, "x")])
    code, out = _cli("specificity", "--steered", str(two), "--random", str(two))
    assert code != 0 and "say which" in out and "Traceback" not in out
    code, out = _cli("specificity", "--steered", f"{two}:tr", "--random", f"{two}:universal",
                     "--calibrated-delta", "nope")
    assert code != 0 and "--calibrated-delta" in out
