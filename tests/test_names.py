"""Honest names: the method that applies the model's installed directions is `universal` (its
former name `fgdilp-universal` an alias that works wherever a method is named and says so once),
and a run with a vectors file is the method `vectors`, whatever name asked for it. The edit rule
that subtracts (TR's edit) is `--edit subtract`, the fused strength at the mean delta's norm
`--fused-norm mean-delta` ("tr" named a method, an edit rule, a fused-norm value and a source);
their former value "tr" is read from every source with one notice."""

from __future__ import annotations

import json
import warnings

import pytest

from fgdilp_cpp import methods, setting_spec
from fgdilp_cpp.api import Detoxifier
from fgdilp_cpp.cli.options import method_list
from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp.method.sources import SOURCES
from fgdilp_cpp.serve.openai_api import ApiError, Policy, check_methods, parse_request
from fgdilp_cpp.profiles import FORMAT, SHIPPED_DIR, VERSION, Profile, model_identity
from fgdilp_cpp.chat.repl import Session, command
from fgdilp_cpp.settings import Settings
from fgdilp_cpp.call_settings import settings_for

FORMER = "fgdilp-universal"
NOTICE = "'fgdilp-universal' is now called 'universal'"


@pytest.fixture
def fresh_notice(monkeypatch):
    """The notice is given once per process: each test starts as a fresh process would."""
    monkeypatch.setattr(methods, "_WARNED", set())


def test_the_former_name_is_the_same_entry_and_says_so_once(fresh_notice):
    with pytest.warns(methods.MethodRenamedWarning, match=NOTICE):
        assert methods.get(FORMER) is methods.get(methods.UNIVERSAL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # a second use: no second notice
        assert methods.canonical(FORMER) == methods.UNIVERSAL and methods.get(FORMER).name == "universal"
    assert methods.UNIVERSAL in methods.names() and FORMER not in methods.names()   # offered by its name now
    assert methods.is_method(FORMER) and not methods.is_method("fgdilp-universe")
    assert method_list(f"none,{FORMER},universal") == ["none", "universal"]         # --methods: once, renamed
    assert check_methods([FORMER, "tr"]) == ("universal", "tr")                      # serve --allow-methods


def test_an_old_profile_is_read_as_universal_silently():
    """A user profile written before the rename names the former method and source: read as now."""
    data = {"format": FORMAT, "version": VERSION, "model": {"key": "k", "weights_sha256": "ab" * 32},
            "method": FORMER, "methods": {"tr": {"settings": {"steer_scale": 0.5}},
                                          FORMER: {"settings": {"steer_scale": 0.8},
                                                   "universal_source": "universal-data"}}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prof = Profile.from_json(data)
    assert prof.method == "universal" and set(prof.methods) == {"tr", "universal"}
    assert prof.methods["universal"]["universal_source"] == "labelled-text"
    assert prof.settings_for("universal") == {"steer_scale": 0.8}


def test_the_shipped_profiles_are_migrated():
    for path in SHIPPED_DIR.glob("*.json"):
        data = json.loads(path.read_text())
        assert FORMER not in data["methods"] and data["method"] in methods.names(), path
        for entry in data["methods"].values():
            assert entry.get("universal_source", SOURCES[0]) in SOURCES, path


def test_the_cli_env_and_flag_take_the_former_name_with_one_line_of_notice(cli, tiny_llama):
    for how in ({"args": ("--method", FORMER)}, {"env": {"FGDILP_METHOD": FORMER}}):
        out = cli("info", "-m", tiny_llama[0], "-t", "1", "--json", *how.get("args", ()), env=how.get("env"))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["settings"]["method"]["value"] == "universal"
        notice = [x for x in out.stderr.splitlines() if x.strip()]
        assert len(notice) == 1 and notice[0].startswith("warning: method ") and NOTICE in notice[0], out.stderr


def test_the_api_repl_and_server_take_the_former_name(tiny_llama, fresh_notice, capsys):
    with pytest.warns(methods.MethodRenamedWarning):
        det = Detoxifier.from_file(tiny_llama[0], method=FORMER, ctx_size=128, threads=1)
    with det:
        assert det.settings.method == "universal" and settings_for(det, FORMER).method == "universal"
        session = Session(det, None)
        assert command(session, "/method tr") and session.method == "tr"
        assert command(session, f"/method {FORMER}") and session.method == "universal"
        assert "(method: universal)" in capsys.readouterr().out
        policy = Policy(max_tokens=64, methods=("none", "universal"), max_steer_scale=2.0)
        assert parse_request({"prompt": "hi", "method": FORMER}, False, det, policy).overrides["method"] == "universal"
        with pytest.raises(ApiError):          # the saved-vectors method is no name to ask for without a file
            parse_request({"prompt": "hi", "method": "vectors"}, False, det, policy)


@pytest.fixture(scope="module")
def saved(tiny_llama, tmp_path_factory):
    """A vectors file of the tiny model (TR's prefixes over one prompt: quick)."""
    path = tmp_path_factory.mktemp("vec") / "v.gguf"
    with Detoxifier.from_file(tiny_llama[0], ctx_size=256, threads=1) as d:
        d.build_vectors(["the cat sat"], "tr-prefixes").save(path)
    return str(path)


def test_a_run_with_a_vectors_file_is_named_vectors(tiny_llama, saved):
    """Asked for as fgdilp-frozen (the method a file stands in for) or by default, a run with a
    vectors file is `vectors`: in the settings, the result, the REPL, the server and --methods.
    It runs at the profile entry of the method it stands in for, as before the rename: the same
    tokens as those values given by hand."""
    with Detoxifier(Settings(model=str(tiny_llama[0]), ctx_size=256, threads=1, n_predict=6), saved,
                    profile=False) as det:
        ident = model_identity(det.model)
        by_hand = det.generate("a dog", steer_scale=3.0, seed=4)
    prof = Profile(model=ident, method="tr", methods={"tr": {"settings": {"steer_scale": 0.5}},
                                                      "fgdilp-frozen": {"settings": {"steer_scale": 3.0}}})
    with Detoxifier(Settings(model=str(tiny_llama[0]), ctx_size=256, threads=1, n_predict=6, method="fgdilp-frozen"),
                    saved, profile=prof, sources={"method": "flag"}) as det:
        assert det.settings.method == "vectors" and det.settings.steer_scale == 3.0
        res = det.generate("a dog", seed=4)
        assert res.method == "vectors" and res.tokens == by_hand.tokens
        assert det.generate("a dog", method="fgdilp-frozen", seed=4).tokens == res.tokens
        session = Session(det, None)
        assert command(session, "/method fgdilp-frozen") and session.method == "vectors"
        assert check_methods(["fgdilp-frozen", "none"], has_vectors=True) == ("vectors", "none")
        policy = Policy(max_tokens=64, methods=("vectors", "none"), max_steer_scale=2.0)
        req = parse_request({"prompt": "hi", "method": "fgdilp-frozen"}, False, det, policy)
        assert req.overrides["method"] == "vectors"
    assert method_list("none,fgdilp-frozen", has_vectors=True) == ["none", "vectors"]       # eval --vectors
    assert method_list("none,vectors", has_vectors=True) == ["none", "vectors"]
    with pytest.raises(FgdilpError, match="unknown method 'vectors'"):
        method_list("none,vectors")


@pytest.fixture
def fresh_value_notice(monkeypatch):
    monkeypatch.setattr(setting_spec, "_WARNED", set())


def test_former_values_of_edit_and_fused_norm_are_read_with_one_notice(fresh_value_notice, tmp_path):
    with pytest.warns(setting_spec.ValueRenamedWarning, match="edit 'tr' is now called 'subtract'"):
        assert Settings().updated({"edit": "tr"}).edit == "subtract"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # a second use: no second notice
        assert Settings.from_env({"FGDILP_EDIT": "tr"}) == {"edit": "subtract"}
    cfg = tmp_path / "s.toml"
    cfg.write_text('fused-norm = "tr"\n')
    with pytest.warns(setting_spec.ValueRenamedWarning, match="fused-norm 'tr' is now called 'mean-delta'"):
        assert Settings.from_toml(cfg).fgdilp().fused_norm == "mean-delta"
    assert Settings().steer().edit == "subtract" and "tr" not in Settings.__dataclass_fields__["edit"].metadata[
        "spec"].choices                                   # offered by the names now only
    with pytest.raises(FgdilpError, match="must be one of subtract, rotate"):
        Settings().updated({"edit": "spin"})


def test_the_cli_takes_the_former_edit_value_with_one_line_of_notice(cli, tiny_llama):
    out = cli("info", "-m", tiny_llama[0], "-t", "1", "--json", "--edit", "tr", "--fused-norm", "tr")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)["settings"]
    assert got["edit"]["value"] == "subtract" and got["fused_norm"]["value"] == "mean-delta"
    notices = [x for x in out.stderr.splitlines() if x.strip()]
    assert notices == ["warning: edit 'tr' is now called 'subtract'; the old name still works for now",
                       "warning: fused-norm 'tr' is now called 'mean-delta'; the old name still works for now"], \
        out.stderr
