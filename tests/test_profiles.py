"""Model profiles: keyed by the weights, applied only where nobody set a value (flag > env >
config file > profile > default), never to another model, off with --no-profile."""

from __future__ import annotations

import pytest

from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp.profiles import Profile, apply_profile, find_profile, profile_path_for

from conftest import run_cli
from tiny_model import TinyConfig, build_tiny_llama


def _identity(path):
    from fgdilp_cpp.engine import Model
    from fgdilp_cpp.profiles import model_identity

    with Model(path) as m:
        return model_identity(m)


def _profile(identity, **over) -> Profile:
    methods = {"tr": {"settings": {"steer_scale": 0.25, "steer_layer_range": [1, 2], "exp_norm": 0.3},
                      "figures": {"emt_delta": -0.1}},
               "random": {"settings": {"steer_scale": 0.5}, "figures": {}}}
    return Profile(model=dict(identity), method=over.pop("method", "tr"), methods=over.pop("methods", methods),
                   **over)


@pytest.fixture
def profiled(tiny_llama, tmp_path, monkeypatch):
    """The tiny model with a profile in a private XDG_CONFIG_HOME."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.delenv("FGDILP_PROFILE_PATH")          # the default search: the user's folder, the package's
    ident = _identity(tiny_llama[0])
    path = _profile(ident).save(profile_path_for(ident, tmp_path / "cfg" / "fgdilp-cpp" / "profiles"))
    return tiny_llama[0], ident, path


def test_apply_profile_fills_only_defaults():
    prof = Profile(model={}, method="tr", methods={"tr": {"settings": {"steer_scale": 0.25, "exp_norm": 0.3}},
                                                   "fgdilp": {"settings": {"mask_k": 30.0}}})
    values = {"method": "none", "steer_scale": 1.0, "exp_norm": 0.4, "mask_k": 50.0}
    out, src = apply_profile(values, {"exp_norm": "flag"}, prof)
    assert out == {"method": "tr", "steer_scale": 0.25, "exp_norm": 0.4, "mask_k": 50.0}
    assert src["method"] == src["steer_scale"] == "profile" and src["exp_norm"] == "flag"
    out, src = apply_profile(values, {"method": "env"}, prof)      # the method was chosen: its own entry
    assert out["method"] == "none" and out["steer_scale"] == 1.0
    out, _ = apply_profile(values, {"method": "config"}, prof, method="fgdilp")
    assert out["mask_k"] == 30.0
    assert apply_profile(values, {}, None) == (values, {})


def test_profile_round_trip_and_refusals(tmp_path):
    prof = Profile(model={"key": "k", "weights_sha256": "ab" * 32}, method="tr",
                   methods={"tr": {"settings": {"steer_scale": 0.5}}})
    p = prof.save(tmp_path / "p.json")
    assert Profile.load(p).settings_for("tr") == {"steer_scale": 0.5}
    bad = prof.to_json() | {"methods": {"tr": {"settings": {"model": "/x.gguf"}}}}
    with pytest.raises(FgdilpError, match="may not set"):
        Profile.from_json(bad)
    with pytest.raises(FgdilpError, match="version"):
        Profile.from_json(prof.to_json() | {"version": 99})
    with pytest.raises(FgdilpError, match="no entry"):
        Profile.from_json(prof.to_json() | {"method": "fgdilp"})


def test_profile_of_another_model_is_never_applied(profiled, tmp_path):
    path, ident, _ = profiled
    other = tmp_path / "other.gguf"
    build_tiny_llama(other, TinyConfig(seed=7))                  # the same shape, other weights
    other_ident = _identity(other)
    assert other_ident["key"] == ident["key"] and other_ident["weights_sha256"] != ident["weights_sha256"]
    assert find_profile(ident)[0] is not None
    assert find_profile(other_ident) == (None, None)
    from fgdilp_cpp.api import Detoxifier

    with Detoxifier.from_file(other, ctx_size=128, threads=1) as det:
        assert det.profile is None and det.settings.method == "tr" and det.settings.steer_scale == 1.0
    with pytest.raises(FgdilpError, match="another model"):
        Detoxifier(det.settings, profile=Profile.load(profiled[2]))


def test_api_applies_the_profile_below_given_values(profiled):
    from fgdilp_cpp.api import Detoxifier

    path = profiled[0]
    with Detoxifier.from_file(path, ctx_size=128, threads=1, exp_norm=0.5) as det:
        s, src = det.settings, det.sources
        assert (s.method, s.steer_scale, s.steer_layer_range, s.exp_norm) == ("tr", 0.25, (1, 2), 0.5)
        assert (src["method"], src["steer_scale"], src["exp_norm"]) == ("profile", "profile", "api")
        assert det.info(probe=False)["profile"] == str(profiled[2])
        # another method per call takes that method's profile values for what the call leaves open
        res = det.generate("the cat", method="random", n_predict=3)
        assert res.method == "random"
        s_random, _ = det._args({"method": "random"})
        assert s_random.steer_scale == 0.5
        # tr's layer range is tr's: random's entry names none, so random runs at the default
        assert s_random.steer_layer_range is None and s_random.exp_norm == 0.5
        assert det._args({"method": "random", "steer_scale": 0.1})[0].steer_scale == 0.1
    with Detoxifier.from_file(path, ctx_size=128, threads=1, profile=False) as det:
        assert det.profile is None and det.settings.steer_scale == 1.0


def test_cli_precedence_flag_env_config_profile(profiled, tmp_path, monkeypatch):
    path = profiled[0]
    base = ["info", "-m", path, "-t", "1"]

    def row(out: str, name: str) -> list[str]:
        line = next(x for x in out.splitlines() if x.strip().startswith(name + " "))
        return line.split()

    out = run_cli(*base)
    assert out.returncode == 0, out.stderr
    assert row(out.stdout, "steer-scale")[1:] == ["0.25", "profile"]
    assert row(out.stdout, "method")[1:] == ["tr", "profile"]
    assert str(profiled[2]) in out.stdout
    cfg = tmp_path / "c.toml"
    cfg.write_text("steer-scale = 0.75\nexp-norm = 0.2\n")
    out = run_cli(*base, "--config", cfg)
    assert row(out.stdout, "steer-scale")[1:] == ["0.75", "config"]
    monkeypatch.setenv("FGDILP_STEER_SCALE", "0.6")
    out = run_cli(*base, "--config", cfg)
    assert row(out.stdout, "steer-scale")[1:] == ["0.6", "env"] and row(out.stdout, "exp-norm")[1:] == ["0.2", "config"]
    out = run_cli(*base, "--config", cfg, "--steer-scale", "1.0")
    assert row(out.stdout, "steer-scale")[1:] == ["1.0", "flag"]
    monkeypatch.delenv("FGDILP_STEER_SCALE")
    out = run_cli(*base, "--no-profile")
    assert row(out.stdout, "steer-scale")[1:] == ["1.0", "default"] and "none (" in out.stdout
    monkeypatch.setenv("FGDILP_PROFILE", "0")
    assert row(run_cli(*base).stdout, "method")[1:] == ["tr", "default"]


def test_damaged_profile_of_this_model_is_a_clear_error(profiled):
    path, _, ppath = profiled
    ppath.write_text("{not json")
    out = run_cli("generate", "-m", path, "-p", "hi", "-n", "2", "-t", "1")
    assert out.returncode == 1 and "cannot read profile" in out.stderr and "Traceback" not in out.stderr


def test_chat_settings_show_where_values_came_from(profiled, capsys):
    from fgdilp_cpp.api import Detoxifier
    from fgdilp_cpp.repl import Session, command

    with Detoxifier.from_file(profiled[0], ctx_size=128, threads=1, n_predict=5, chat_template="chatml") as det:
        session = Session(det, None)
        command(session, "/method random")
        command(session, "/settings")
    out = capsys.readouterr().out
    lines = {x.split()[0]: x for x in out.splitlines() if x.strip()}
    assert any(x.startswith("profile file") and str(profiled[2]) in x for x in out.splitlines())
    assert lines["steer-scale"].endswith("(profile)") and " 0.25 " in lines["steer-scale"]
    assert lines["method"].split()[1] == "random" and lines["method"].endswith("(/method)")
    assert lines["n-predict"].endswith("(api)")


def test_search_path(monkeypatch, tmp_path):
    from fgdilp_cpp.profiles import SHIPPED_DIR, search_path, user_profile_dir

    monkeypatch.delenv("FGDILP_PROFILE_PATH")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert search_path() == [tmp_path / "fgdilp-cpp" / "profiles", SHIPPED_DIR] and user_profile_dir() == search_path()[0]
    monkeypatch.setenv("FGDILP_PROFILE_PATH", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    assert search_path() == [tmp_path / "a", tmp_path / "b"]


@pytest.mark.real_model
def test_shipped_profiles_match_the_embedded_models():
    """The package's profiles are found for the models they were made for (and only by weights)."""
    from fgdilp_cpp.evaluation.assets import smollm2_path
    from fgdilp_cpp.models import default_model_path
    from fgdilp_cpp.profiles import SHIPPED_DIR

    shipped = sorted(SHIPPED_DIR.glob("*.json"))
    assert shipped, "no profile ships in the package"
    found = {}
    for path in (default_model_path(), smollm2_path()):
        prof, where = find_profile(_identity(path), folders=[SHIPPED_DIR])
        if prof is not None:
            found[where.name] = prof
            assert prof.method in prof.methods and prof.methods[prof.method]["settings"]
    assert set(found) == {p.name for p in shipped}
