"""calibrate: the split, the layer ranges, and a whole calibration on the tiny model whose profile
then steers a new Detoxifier of that model."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fgdilp_cpp.evaluation.calibrate import CalibrationSizes, calibrate, layer_ranges, split
from fgdilp_cpp.errors import FgdilpError
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


def test_merging_profiles_keeps_the_better_confirmed_entry_per_method():
    from fgdilp_cpp.evaluation.calibrate import merge_profiles
    from fgdilp_cpp.profiles import Profile

    def entry(emt, ppl, n=100, **settings):
        return {"settings": {"steer_scale": 0.5, **settings},
                "figures": {"test": {"emt": emt, "ppl_ratio": ppl, "n_prompts": n, "n_samples": 500}}}

    model = {"name": "m", "key": "k", "weights_sha256": "a" * 64}
    old = Profile(model, "fgdilp-frozen", {"tr": entry(0.22, 0.98), "fgdilp-frozen": entry(0.17, 1.09),
                                           "cvec": entry(0.26, 0.97)}, {"ppl_ratio": 1.25}, made_by="first")
    new = Profile(model, "tr", {"tr": entry(0.12, 1.2, edit="rotate"), "fgdilp-frozen": entry(0.10, 1.40, edit="rotate"),
                                "random": entry(0.05, 1.1)}, {"ppl_ratio": 1.25}, made_by="second")
    m = merge_profiles(old, new)
    assert m.methods["tr"]["settings"]["edit"] == "rotate"              # better and within the budget
    assert "edit" not in m.methods["fgdilp-frozen"]["settings"]         # the new one is over the budget
    assert set(m.methods) == {"tr", "fgdilp-frozen", "cvec", "random"}
    assert m.method == "tr"                                             # random is a control: never recommended
    assert m.made_by == "first ; second" and m.budgets["merged"] is True
    # confirmed on other sizes: the later calibration's entry wins
    other = Profile(model, None, {"cvec": entry(0.30, 1.0, n=48)}, {"ppl_ratio": 1.25})
    assert merge_profiles(old, other).methods["cvec"]["figures"]["test"]["n_prompts"] == 48
    # a universal method calibrated with another file: its scale meant another push, the new one wins
    uni = lambda emt, sha: {**entry(emt, 1.0), "universal_sha256": sha}  # noqa: E731
    first = Profile(model, None, {"universal": uni(0.05, "1" * 64)}, {"ppl_ratio": 1.25})
    assert merge_profiles(first, Profile(model, None, {"universal": uni(0.09, "2" * 64)}, {"ppl_ratio": 1.25})
                          ).methods["universal"]["universal_sha256"] == "2" * 64
    assert merge_profiles(first, Profile(model, None, {"universal": uni(0.09, "1" * 64)}, {"ppl_ratio": 1.25})
                          ).methods["universal"]["figures"]["test"]["emt"] == 0.05
    with pytest.raises(FgdilpError, match="different models"):
        merge_profiles(old, Profile({**model, "weights_sha256": "b" * 64}, None, {}, {}))
    with pytest.raises(FgdilpError, match="fluency budgets"):
        merge_profiles(old, Profile(model, None, {}, {"ppl_ratio": 1.5}))


def test_a_chat_calibration_never_recommends_a_method_that_re_decodes_every_turn():
    """cvec's control vector changes every prompt, so chat decodes the whole conversation again
    each turn: a chat profile recommends the best of the others; a plain one may recommend it."""
    from fgdilp_cpp.evaluation.calibrate import merge_profiles, recommend
    from fgdilp_cpp.profiles import Profile

    def entry(emt, ppl=1.0):
        return {"settings": {}, "figures": {"test": {"emt": emt, "ppl_ratio": ppl, "n_prompts": 100, "n_samples": 500}}}

    entries = {"cvec": entry(0.20), "tr": entry(0.25), "fgdilp": entry(0.22, ppl=1.3), "random": entry(0.1)}
    assert recommend(entries, 1.25) == "cvec"
    assert recommend(entries, 1.25, chat=True) == "tr"
    model = {"name": "m", "key": "k", "weights_sha256": "a" * 64}
    chat = Profile(model, "tr", {"tr": entries["tr"]}, {"ppl_ratio": 1.25, "chat": True})
    plain = Profile(model, "cvec", {"cvec": entries["cvec"]}, {"ppl_ratio": 1.25})
    assert merge_profiles(chat, plain).method == "tr" and merge_profiles(plain, chat).method == "tr"


def test_with_two_judges_the_recommendation_ranks_by_their_mean():
    """The judge that also diagnosed FGDILP's samples cannot decide alone: SmolLM2's 100 x 5
    confirmation (docs/results.md run 4b) ranks fgdilp first under tox-block, tr under the mean."""
    from fgdilp_cpp.evaluation.calibrate import ranking_emt, recommend

    def entry(tb, tcc):
        return {"settings": {}, "figures": {"test": {"emt": tb, "ppl_ratio": 1.0, "emt_judges": {
            "tox-block": tb, "toxic-comment-classifier": tcc}}}}

    entries = {"tr": entry(0.267, 0.273), "fgdilp": entry(0.256, 0.301)}
    assert ranking_emt(entries["tr"]["figures"]["test"]) == pytest.approx(0.270)
    assert recommend(entries, 1.25) == "tr"
    assert ranking_emt({"emt": 0.3}) == 0.3          # one judge: its EMT


def test_the_printed_table_keeps_long_method_names_and_settings_apart(capsys):
    from types import SimpleNamespace

    from fgdilp_cpp.cli.calibrate import _print_table

    best = {"universal": {"point": {"steer_scale": 0.8, "steer_layer_range": (15, 17), "condition": 0.05},
                                 "emt_delta": -0.144, "ppl_ratio": 0.977, "benign_ppl_ratio": 1.042},
            "tr": {"point": None, "reason": "no point within PPL ratio 1.25"}}
    result = SimpleNamespace(best=best, confirmed={"universal": {"emt_delta": -0.184, "tp_delta": -0.15,
                                                                        "ppl_ratio": 1.024}},
                             profile=SimpleNamespace(diagnosis=None, method="universal"))
    _print_table(result, "p.json")
    lines = capsys.readouterr().out.splitlines()
    row = next(x for x in lines if x.startswith("universal"))
    assert row.split()[:4] == ["universal", "steer_scale=0.8", "steer_layer_range=15-17", "condition=0.05"]
    assert row.split()[4:] == ["-0.144", "0.977", "1.042", "-0.184", "-0.150", "1.024"]
    header = lines[0]
    assert header.index("setting") == row.index("steer_scale") and header.index("cal EMT") > row.index("condition=0.05")
    assert any(x.startswith("tr ") and "no point within" in x for x in lines)
