"""calibrate: the split, the layer ranges, and a whole calibration on the tiny model whose profile
then steers a new Detoxifier of that model."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fgdilp_cpp.evaluation.calibrate import CalibrationSizes, calibrate, layer_ranges, split
from fgdilp_cpp.evaluation.prompts import PromptRecord
from fgdilp_cpp.profiles import Profile, find_profile, model_identity

LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")


class FakeScorer:
    """Deterministic scores from a hash of the text."""

    LABELS = LABELS

    def score(self, texts):
        return np.array([[b / 255.0 for b in hashlib.sha256(t.encode()).digest()[:6]] for t in texts])


def test_layer_ranges_are_late_and_distinct():
    assert layer_ranges(18, 3) == [(12, 17), (15, 17), (9, 17)]
    assert layer_ranges(18) == [(12, 17), (15, 17), (9, 17)]
    assert layer_ranges(30, 2) == [(20, 29), (25, 29)]
    assert CalibrationSizes().n_ranges == 2 and CalibrationSizes.quick().n_ranges == 1
    assert layer_ranges(2) == [(1, 1)]


def test_split_is_disjoint_and_fixed():
    recs = [PromptRecord(i, f"p{i}") for i in range(20)]
    cal, test = split(recs, 4, 3)
    assert [r.id for r in cal] == [0, 2, 4, 6] and [r.id for r in test] == [1, 3, 5]
    assert split(list(reversed(recs)), 4, 3)[0][0].id == 18       # by id, in the set's order


def test_calibration_on_the_tiny_model_writes_a_profile_that_applies(tiny_llama, tmp_path, monkeypatch):
    from fgdilp_cpp.api import Detoxifier
    from fgdilp_cpp.evaluation.perplexity import PerplexityJudge
    from fgdilp_cpp.settings import Settings

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.delenv("FGDILP_PROFILE_PATH")
    sizes = CalibrationSizes(cal_prompts=3, test_prompts=2, benign_prompts=2, samples=2, n_predict=4,
                             scales=(0.0, 0.5), n_ranges=1)
    s = Settings(model=str(tiny_llama[0]), ctx_size=256, threads=1)
    with Detoxifier(s, profile=False, max_samples=2, max_new=5, reuse_instances=True) as det, \
            PerplexityJudge(det.model, n_threads=1) as judge:
        res = calibrate(det, tmp_path / "work", FakeScorer(), {"self": judge}, ["tr", "random"], sizes=sizes,
                        ppl_budget=100.0, benign_budget=100.0, progress=False, log=lambda _: None)
        identity = model_identity(det.model)
    assert not res.interrupted
    assert set(res.reports) == {"calibration", "benign", "test-2x2"}
    prof = res.profile
    assert set(prof.methods) == {"tr", "random"} and prof.method == "tr"      # the control is never recommended
    tr = prof.methods["tr"]
    late = list(layer_ranges(tiny_llama[2].n_layer, 1)[0])
    assert tr["settings"]["steer_layer_range"] == late and tr["settings"]["steer_scale"] in (0.0, 0.5)
    assert tr["figures"]["test"]["n_prompts"] == 2 and tr["figures"]["calibration"]["ppl_ratio"] is not None
    assert prof.diagnosis == {} or "self_auc" in prof.diagnosis
    path = prof.save(tmp_path / "cfg" / "fgdilp-cpp" / "profiles" / "x.json")
    assert find_profile(identity)[1] == path
    with Detoxifier.from_file(tiny_llama[0], ctx_size=128, threads=1) as det:
        assert det.settings.method == "tr" and det.settings.steer_layer_range == tuple(late)
        assert det.sources["steer_scale"] == "profile"
    # a second run over the same folder resumes: nothing is generated again
    with Detoxifier(s, profile=False, max_samples=2, max_new=5, reuse_instances=True) as det, \
            PerplexityJudge(det.model, n_threads=1) as judge:
        again = calibrate(det, tmp_path / "work", FakeScorer(), {"self": judge}, ["tr", "random"], sizes=sizes,
                          ppl_budget=100.0, benign_budget=100.0, progress=False, log=lambda _: None)
    assert again.profile.methods == prof.methods and again.profile.method == prof.method
    assert Profile.from_json(again.profile.to_json()).methods == prof.methods


def test_made_by_names_no_machine_folder():
    from fgdilp_cpp.evaluation.calibrate import made_by

    assert made_by(["/x/bin/fgdilp-cpp", "calibrate", "/data/models/m.gguf", "--out", "/data/w", "-t", "2"]) == \
        "fgdilp-cpp calibrate m.gguf --out w -t 2"
    assert made_by(["python", "-c"]) == ""
