"""Model profiles: keyed by the weights, applied only where nobody set a value (flag > env >
config file > profile > default), never to another model, off with --no-profile."""

from __future__ import annotations

import pytest

from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp.profiles import Profile, find_profile, profile_path_for
from fgdilp_cpp.settings import CHAT_DEFAULTS, Settings, resolve
from fgdilp_cpp.call_settings import run_settings, settings_for

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
    monkeypatch.delenv("FGDILP_PROFILE")               # profiles on in the CLI too
    ident = _identity(tiny_llama[0])
    path = _profile(ident).save(profile_path_for(ident, tmp_path / "cfg" / "fgdilp-cpp" / "profiles"))
    return tiny_llama[0], ident, path


def test_resolve_lets_a_profile_fill_only_defaults():
    prof = Profile(model={}, method="tr", methods={"tr": {"settings": {"steer_scale": 0.25, "exp_norm": 0.3}},
                                                   "fgdilp": {"settings": {"mask_k": 30.0, "selfgen_samples": 16}}})
    s, src = resolve({"flag": {"exp_norm": 0.45}}, profile=prof)
    assert (s.method, s.steer_scale, s.exp_norm, s.mask_k) == ("tr", 0.25, 0.45, 50.0)
    assert src["method"] == src["steer_scale"] == "profile" and src["exp_norm"] == "flag"
    s, src = resolve({"env": {"method": "none"}}, profile=prof)      # the method was chosen: its own entry
    assert s.method == "none" and s.steer_scale == 1.0 and src["steer_scale"] == "default"
    s, _ = resolve({"config": {"method": "fgdilp"}}, profile=prof)
    assert s.mask_k == 30.0 and s.selfgen_samples == 16
    # a profile wins over the command's defaults, a flag over both; without a profile the chat's own
    s, src = resolve({"flag": {"method": "fgdilp"}}, "chat", prof)
    assert s.selfgen_samples == 16 and src["selfgen_samples"] == "profile"
    assert s.selfgen_tokens == CHAT_DEFAULTS["selfgen_tokens"] and src["selfgen_tokens"] == "chat default"
    s, src = resolve({"flag": {"selfgen_samples": 3}}, "chat", prof)
    assert s.method == "tr" and s.selfgen_samples == 3 and src["method"] == "profile"
    assert resolve({}, profile=None)[0] == Settings()
    assert resolve({}, "chat")[0] == Settings().updated(CHAT_DEFAULTS)


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
        s_random, _ = run_settings(det, {"method": "random"})
        assert s_random.steer_scale == 0.5
        # tr's layer range is tr's: random's entry names none, so random runs at the default
        assert s_random.steer_layer_range is None and s_random.exp_norm == 0.5
        assert run_settings(det, {"method": "random", "steer_scale": 0.1})[0].steer_scale == 0.1
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


def _settings_rows(text: str) -> dict[str, str]:
    return {x.split()[0]: x for x in text.splitlines() if x.strip()}


def test_chat_settings_show_where_values_came_from(profiled, capsys):
    from fgdilp_cpp.api import Detoxifier
    from fgdilp_cpp.chat.repl import Session, command

    with Detoxifier.from_file(profiled[0], ctx_size=128, threads=1, n_predict=5, chat_template="chatml") as det:
        session = Session(det, None)
        command(session, "/method random")
        command(session, "/settings")
    out = capsys.readouterr().out
    lines = _settings_rows(out)
    assert any(x.startswith("profile file") and str(profiled[2]) in x for x in out.splitlines())
    assert lines["method"].split()[1] == "random" and lines["method"].endswith("(/method)")
    assert lines["n-predict"].endswith("(api)")


def test_chat_settings_after_method_show_that_methods_values(profiled, capsys):
    """/settings lists what the next reply runs: after /method X, X's profile entry (not the entry
    of the method the chat started with), the chat's defaults where X's entry says nothing."""
    from fgdilp_cpp.api import Detoxifier
    from fgdilp_cpp.chat.repl import Session, command

    with Detoxifier.from_file(profiled[0], chat=True, ctx_size=128, threads=1, chat_template="chatml") as det:
        session = Session(det, None)
        command(session, "/settings")
        before = _settings_rows(capsys.readouterr().out)
        command(session, "/method random")
        command(session, "/settings")
        after = _settings_rows(capsys.readouterr().out)
        runs = settings_for(det, "random")
    # the profile's method (tr) and its entry, over the chat's defaults
    assert before["method"].split()[1:] == ["tr", "(profile)"]
    assert before["steer-scale"].split()[1:] == ["0.25", "(profile)"]
    assert before["steer-layer-range"].split()[1:] == ["(1,", "2)", "(profile)"]
    assert before["exp-norm"].split()[1:] == ["0.3", "(profile)"]
    # random's entry; what tr's entry set and random's does not goes back to the (chat) defaults
    assert after["method"].split()[1:] == ["random", "(/method)"]
    assert after["steer-scale"].split()[1:] == ["0.5", "(profile)"] and runs.steer_scale == 0.5
    assert after["exp-norm"].split()[1:] == ["0.4", "(default)"] and runs.exp_norm == 0.4
    assert after["steer-layer-range"].split()[1:] == ["None", "(default)"] and runs.steer_layer_range is None
    for key in ("steer_scale", "exp_norm", "edit", "gate", "contrast", "mask_k", "instance_reuse"):   # as it runs
        assert after[key.replace("_", "-")].split()[1 if key != "instance_reuse" else 2] == str(getattr(runs, key))
    # what shapes the contexts stays: the chat's candidates
    assert after["selfgen-samples"] == before["selfgen-samples"] and "*" in after["selfgen-samples"]


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
    from fgdilp_cpp.models import default_chat_model_path
    from fgdilp_cpp.models import default_model_path
    from fgdilp_cpp.profiles import SHIPPED_DIR

    shipped = sorted(SHIPPED_DIR.glob("*.json"))
    assert shipped, "no profile ships in the package"
    found = {}
    for path in (default_model_path(), default_chat_model_path()):
        prof, where = find_profile(_identity(path), folders=[SHIPPED_DIR])
        if prof is not None:
            found[where.name] = prof
            assert prof.method in prof.methods and prof.methods[prof.method]["settings"]
    assert set(found) == {p.name for p in shipped}
