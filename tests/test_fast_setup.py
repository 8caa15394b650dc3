"""The fast setup (autosetup.setup) and what a model without a profile runs (safe_defaults): the
criterion on fixtures with a known answer, first use writes a profile that the next start reuses,
--no-auto-setup, damaged / foreign / tampered auto profiles are made again and never applied."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from conftest import as_a_user_meets_it

from fgdilp_cpp import Detoxifier, methods
from fgdilp_cpp.autosetup.criterion import Budget, choose, predict, within
from fgdilp_cpp.autosetup.points import PointScores, candidate_ranges
from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp.profiles import FAST_SETUP, Profile, is_fast
from fgdilp_cpp.safe_defaults import is_safe_defaults, last_sixth
from fgdilp_cpp.call_settings import settings_for

FAST = dict(threads=1, ctx_size=256)
pytestmark = pytest.mark.unprofiled


def _quad(r, s, toxic, clean, benign, rtoxic, rclean, rbenign):
    """PointScores whose every shift is c*s^2 (c given per shift)."""
    return PointScores(r, s, toxic * s * s, clean * s * s, benign * s * s, rtoxic * s * s, rclean * s * s,
                       rbenign * s * s)


def test_predict_recovers_a_quadratic_exactly():
    lo = PointScores((3, 5), 0.5, 0.1 * 0.5 + 0.2 * 0.25, 0.05, 0.01, 0.02, 0.0, 0.03)
    hi = PointScores((3, 5), 1.0, 0.1 + 0.2, 0.1, 0.02, 0.04, 0.0, 0.06)
    p = predict(lo, hi, 2.0)
    assert p.toxic == pytest.approx(0.1 * 2 + 0.2 * 4)
    assert p.clean == pytest.approx(0.2) and p.random_benign == pytest.approx(0.12)
    with pytest.raises(ValueError):
        predict(hi, lo, 1.0)


def test_the_criterion_takes_the_strongest_point_within_budget_and_the_most_specific_range():
    budget = Budget(fluency=1.30, benign=1.10, min_specificity=0.5, max_scale=2.0, step=0.05)
    # range A: benign cost 0.05 s^2 binds first: ln 1.1 / 0.05 = 1.906 -> s <= 1.38 -> 1.35 on the grid
    a = [_quad((4, 5), s, 0.6, 0.1, 0.05, 0.1, 0.05, 0.05) for s in (0.5, 1.0)]
    # range B: costlier (clean 0.4 s^2: ln 1.3 / 0.4 -> s <= 0.81 -> 0.80) but more margin per s^2;
    # at 0.8 its specific margin is (1.5 - 0.4 - 0.1 + 0.05) * 0.64 = 0.672 against A's
    # (0.6 - 0.1 - 0.1 + 0.05) * 1.35^2 = 0.820: A wins
    b = [_quad((2, 5), s, 1.5, 0.4, 0.1, 0.1, 0.05, 0.05) for s in (0.5, 1.0)]
    c = choose(a + b, budget)
    assert c.layer_range == (4, 5) and c.scale == pytest.approx(1.35)
    assert "benign" in c.why
    assert c.predicted.benign_ratio <= 1.10 < math.exp(0.05 * 1.40 ** 2)
    # a random push that does as much as the direction: range A falls below min_specificity, B wins
    a_rnd = [_quad((4, 5), s, 0.6, 0.1, 0.05, 0.55, 0.1, 0.05) for s in (0.5, 1.0)]
    c = choose(a_rnd + b, budget)
    assert c.layer_range == (2, 5) and c.scale == pytest.approx(0.80)
    assert "fluency" in c.why
    # nothing within budget at the first step: an error, not a silent choice
    with pytest.raises(ValueError):
        choose([_quad((4, 5), s, 1.0, 200.0, 0.0, 0.0, 0.0, 0.0) for s in (0.5, 1.0)], budget)
    assert within(a[0], budget) and not within(_quad((4, 5), 3.0, 1, 1, 1, 0, 0, 0), budget)


@pytest.fixture
def profile_dir(tmp_path, monkeypatch):
    d = tmp_path / "profiles"
    monkeypatch.setenv("FGDILP_PROFILE_PATH", str(d))
    return d


def _separating(score):
    """PointScorer.score of a direction that separates: the tiny random model knows no toxicity, so
    its measured toxic shift is raised by 0.5 s^2 nats (the random control's is left alone); every
    other figure, the passes and the tokens are the real ones."""
    def wrapped(self, layer_range, scale):
        p = score(self, layer_range, scale)
        return dataclasses.replace(p, toxic=p.toxic + 0.5 * scale * scale)
    return wrapped


@pytest.fixture(scope="module")
def setup_once(tiny_llama, tmp_path_factory):
    """One fast setup of the tiny model, installed in a folder of its own: (folder, its files' bytes)."""
    from fgdilp_cpp.autosetup.grid import PointScorer

    folder = tmp_path_factory.mktemp("fast-profile")
    with pytest.MonkeyPatch.context() as mp:
        as_a_user_meets_it(mp)
        mp.setenv("FGDILP_PROFILE_PATH", str(folder))
        mp.setattr(PointScorer, "score", _separating(PointScorer.score))
        with Detoxifier.from_file(tiny_llama[0], **FAST) as det:
            assert det.setup_result is not None
            summary = det.setup_result.summary()
            assert is_fast(det.profile) and det.settings.method == methods.UNIVERSAL
            settings = det.settings
    return folder, {p.name: p.read_bytes() for p in folder.iterdir()}, summary, settings


def _copy(setup_once, to):
    to.mkdir(parents=True, exist_ok=True)
    for name, data in setup_once[1].items():
        (to / name).write_bytes(data)
    return [to / n for n in sorted(setup_once[1])]


def test_first_use_writes_a_fast_profile_and_steers_by_it(setup_once, tiny_llama):
    folder, files, summary, settings = setup_once
    names = sorted(files)
    assert len(names) == 2 and names[0].endswith(".json") and names[1].endswith(".universal.gguf")
    prof = Profile.from_json(json.loads(files[names[0]]))
    rec = prof.setup
    assert rec["kind"] == FAST_SETUP and rec["seconds"] > 0 and rec["tokens"] > 0
    assert len(rec["points"]) == 4 and rec["chosen"]["fluency_ratio"] <= rec["budget"]["fluency"] * 1.0001
    entry = prof.settings_for(methods.UNIVERSAL)
    n = int(prof.model["key"].split("/L")[1].split("/")[0])     # the tiny model's layers
    assert tuple(entry["steer_layer_range"]) in candidate_ranges(n)[:2]
    assert 0 < entry["steer_scale"] <= 2.0 and entry["condition"] > 0
    assert settings.steer_scale == entry["steer_scale"] and settings.steer_layer_range == tuple(entry["steer_layer_range"])
    assert "fast setup:" in summary and "tokens in" in summary
    # every other steered method gets the measured-safe entry, never the papers' all layers
    for m in ("tr", "fgdilp", "fgdilp-frozen"):
        assert prof.settings_for(m)["steer_layer_range"] == list(last_sixth(n))


def test_second_start_reuses_the_profile_without_a_setup(setup_once, profile_dir, tiny_llama):
    paths = _copy(setup_once, profile_dir)
    before = [p.stat().st_mtime_ns for p in paths]
    with Detoxifier.from_file(tiny_llama[0], **FAST) as det:
        assert det.setup_result is None and is_fast(det.profile) and det.profile_note is None
        assert det.settings.method == methods.UNIVERSAL
        steered = det.generate("The quick brown fox", n_predict=6, seed=1, condition=None)
        plain = det.generate("The quick brown fox", n_predict=6, seed=1, method="none")
        assert steered.method == methods.UNIVERSAL
        assert steered.text != plain.text or steered.tokens != plain.tokens
    assert [p.stat().st_mtime_ns for p in paths] == before


def test_no_auto_setup_runs_the_measured_safe_defaults(profile_dir, tiny_llama):
    with Detoxifier.from_file(tiny_llama[0], auto_setup=False, **FAST) as det:
        assert det.setup_result is None and is_safe_defaults(det.profile)
        assert det.settings.method == "fgdilp" and det.settings.steer_scale == 0.25
        assert det.settings.steer_layer_range == last_sixth(det.model.info.n_layer)
        assert "no measured profile" in det.profile_note and "calibrate --fast" in det.profile_note
        assert det.info(probe=False)["profile_kind"] == "safe-defaults"
        # a method the user picks also runs at its safe entry, not at every layer
        tr = settings_for(det, "tr")
        assert tr.steer_layer_range == last_sixth(det.model.info.n_layer) and tr.steer_scale <= 0.25
    assert not profile_dir.exists() or not any(profile_dir.iterdir())


def test_a_damaged_auto_profile_is_set_aside_and_made_again(setup_once, profile_dir, tiny_llama):
    prof_path, _ = _copy(setup_once, profile_dir)
    prof_path.write_text("{not json", encoding="utf-8")
    with pytest.raises(FgdilpError, match="cannot read profile"):
        Detoxifier.from_file(tiny_llama[0], auto_setup=False, **FAST)
    with Detoxifier.from_file(tiny_llama[0], **FAST) as det:
        assert det.setup_result is not None and is_fast(det.profile)
        assert any("damaged" in n for n in det.notices)
    assert (profile_dir / (prof_path.name + ".damaged")).read_text() == "{not json"
    Profile.load(prof_path)      # a readable profile again


def test_a_foreign_or_tampered_auto_profile_is_never_applied(setup_once, profile_dir, tiny_llama):
    prof_path, vec_path = _copy(setup_once, profile_dir)
    data = json.loads(prof_path.read_text())
    data["model"]["weights_sha256"] = "0" * 64            # another model's profile under this model's name
    prof_path.write_text(json.dumps(data))
    with Detoxifier.from_file(tiny_llama[0], auto_setup=False, **FAST) as det:
        assert is_safe_defaults(det.profile)              # skipped, not applied
    _copy(setup_once, profile_dir)
    vec_path.write_bytes(vec_path.read_bytes()[:-64] + bytes(64))     # directions changed after the setup
    with Detoxifier.from_file(tiny_llama[0], auto_setup=False, **FAST) as det:
        assert is_safe_defaults(det.profile)              # the profile does not vouch for these directions
    with Detoxifier.from_file(tiny_llama[0], **FAST) as det:
        assert det.setup_result is not None and is_fast(det.profile)   # made again
    assert vec_path.read_bytes() == setup_once[1][vec_path.name]      # the same directions: deterministic


def test_directions_that_do_not_separate_leave_the_safe_defaults(profile_dir, tiny_llama):
    """Unpatched, the tiny random model's directions do not make its toxic continuations less likely
    than its clean ones: the setup says so and its profile recommends the measured-safe method."""
    with Detoxifier.from_file(tiny_llama[0], **FAST) as det:
        res = det.setup_result
        assert res is not None and is_fast(det.profile)
        if res.profile.setup["chosen"] is None:
            assert det.settings.method == "fgdilp" and det.settings.steer_layer_range == last_sixth(det.model.info.n_layer)
            assert "measured-safe defaults" in res.summary()
        else:    # the random model happened to separate: then the point keeps to the budget
            assert res.profile.setup["chosen"]["margin"] > 0
