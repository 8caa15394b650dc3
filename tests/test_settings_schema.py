"""One declaration per setting (settings.Settings, setting_spec.Spec): every table of settings is
read from it, a new setting needs nothing else to reach every source and view, and each command's
--help shows the defaults that command runs with."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from click.testing import CliRunner

from fgdilp_cpp.cli import main
from fgdilp_cpp.settings import (CHAT_DEFAULTS, PER_CALL, PROFILE_FIELDS, SPECS, SWEEPABLE, Settings,
                                 command_defaults)

PKG = Path(__file__).resolve().parent.parent / "fgdilp_cpp"
# the one line a new setting takes (inserted among the declarations of a copy of the package)
TOY = ('    toy_knob: float = setting(0.5, group="steer", range=Range(0.0, 1.0), per_call=True, sweep=STEERING, '
       'api="toy_knob", help="A toy knob of the schema test.")\n')

TOY_CHECKS = textwrap.dedent('''
    import os, sys, types
    from pathlib import Path
    import click
    from click.testing import CliRunner
    # an editable install's import hook would find the checkout's package before PYTHONPATH's copy
    sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("_editable")]
    import fgdilp_cpp
    assert Path(fgdilp_cpp.__file__).resolve().parent == Path(sys.argv[1]).resolve(), fgdilp_cpp.__file__
    from fgdilp_cpp.api import Detoxifier
    from fgdilp_cpp.cli import main
    from fgdilp_cpp.cli.options import _settings, setting_options, sources
    from fgdilp_cpp.evaluation.sweep import parse_sweep, project
    from fgdilp_cpp.serve.openai_api import ApiError, Policy, parse_request
    from fgdilp_cpp.call_settings import call_settings
    from fgdilp_cpp.chat.repl import Session, command
    from fgdilp_cpp.settings import PER_CALL, Settings

    # a flag, with its help and range, on every command that takes the steering options
    out = CliRunner().invoke(main, ["generate", "--help"]).output
    assert "--toy-knob FLOAT" in out and "A toy knob of the schema test." in out and "[0, 1]" in out, out
    # flag > FGDILP_* > config file > default, each source said
    seen = {}

    @click.command()
    @setting_options("model", "steer")
    def probe(**kw):
        seen["s"], seen["src"] = _settings(kw), sources()

    cfg = Path(sys.argv[3]) / "toy.toml"
    cfg.write_text("toy-knob = 0.75\\n")
    runs = {(): (0.5, "default"), ("--config", str(cfg)): (0.75, "config"),
            ("--config", str(cfg), "ENV"): (0.25, "env"), ("--config", str(cfg), "ENV", "--toy-knob", "0.125"): (0.125, "flag")}
    for args, (value, where) in runs.items():
        env = {"FGDILP_TOY_KNOB": "0.25"} if "ENV" in args else {}
        res = CliRunner().invoke(probe, [a for a in args if a != "ENV"], env=env, catch_exceptions=False)
        assert res.exit_code == 0, res.output
        assert (seen["s"].toy_knob, seen["src"]["toy_knob"]) == (value, where), (args, seen)
    assert Settings.from_env({"FGDILP_TOY_KNOB": "0.25"}) == {"toy_knob": 0.25}
    assert Settings.toml_values(cfg) == {"toy_knob": 0.75}
    bad = CliRunner().invoke(main, ["generate", "-p", "x", "--toy-knob", "2"])
    assert bad.exit_code == 1 and "--toy-knob must be in [0, 1], not 2.0" in bad.output, bad.output
    # a sweep key, run by the methods it changes only
    assert parse_sweep("toy-knob=0.25,0.5") == ("toy_knob", [0.25, 0.5])
    assert project({"toy_knob": 0.25}, "tr") == {"toy_knob": 0.25} and project({"toy_knob": 0.25}, "none") == {}
    # a request field of the server
    stub = types.SimpleNamespace(model=types.SimpleNamespace(vocab=None))
    policy = Policy(max_tokens=8, methods=("tr",), max_steer_scale=2.0)
    assert parse_request({"prompt": "x", "toy_knob": 0.25}, False, stub, policy).overrides == {"toy_knob": 0.25}
    try:
        parse_request({"prompt": "x", "toy_knob": 2}, False, stub, policy)
        raise AssertionError("toy_knob=2 was accepted")
    except ApiError as exc:
        assert exc.param == "toy_knob" and "toy_knob must be in [0, 1]" in exc.message, exc.message
    # an API keyword (per call too), and a row of the chat's /settings
    assert "toy_knob" in PER_CALL
    with Detoxifier.from_file(sys.argv[2], ctx_size=128, threads=1, chat_template="chatml", toy_knob=0.375,
                         auto_setup=False) as det:
        assert det.settings.toy_knob == 0.375 and call_settings(det, {"toy_knob": 0.5})[0].toy_knob == 0.5
        command(Session(det, None), "/settings")
    print("toy checks passed")
''')


def test_adding_a_setting_is_one_declaration(tmp_path, tiny_llama):
    from fgdilp_cpp.native import load_library

    copy = tmp_path / "src" / "fgdilp_cpp"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    settings_py = copy / "settings.py"
    text = settings_py.read_text(encoding="utf-8")
    marker = "    # ---- views for the engine and the method"
    assert text.count(marker) == 1
    settings_py.write_text(text.replace(marker, TOY + marker), encoding="utf-8")
    script = tmp_path / "toy_checks.py"
    script.write_text(TOY_CHECKS, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(copy.parent), "FGDILP_NATIVE_LIB": load_library()._name,
           "XDG_DATA_HOME": str(tmp_path / "data")}
    proc = subprocess.run([sys.executable, str(script), str(copy), str(tiny_llama[0]), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "toy checks passed" in proc.stdout
    assert re.search(r"^toy-knob\s+0\.375\s+\(api\)$", proc.stdout, re.M), proc.stdout
    assert "toy_knob" not in Settings.field_names()          # this process kept the real declarations


def _option_line(help_text: str, flag: str) -> str:
    """The help of one option, its wrapped lines joined."""
    lines = help_text.splitlines()
    start = next(i for i, x in enumerate(lines) if re.match(rf"\s+(-\w+, )?{re.escape(flag)}\b", x))
    out = [lines[start]]
    for x in lines[start + 1:]:
        if re.match(r"\s+-", x) or not x.startswith(" " * 10):
            break
        out.append(x.strip())
    return " ".join(out)


def test_chat_and_serve_help_show_their_own_defaults():
    chat = CliRunner().invoke(main, ["chat", "--help"], terminal_width=200).output
    serve = CliRunner().invoke(main, ["serve", "--help"], terminal_width=200).output
    generate = CliRunner().invoke(main, ["generate", "--help"], terminal_width=200).output
    assert command_defaults("serve")["kv_conversations"] != Settings.kv_conversations
    for name, value in {**CHAT_DEFAULTS, "kv_conversations": Settings.kv_conversations}.items():
        flag = "--" + name.replace("_", "-")
        assert f"[default: {value}" in _option_line(chat, flag), (flag, _option_line(chat, flag))
        assert f"[default: {getattr(Settings, name)}" in _option_line(generate, flag) or name == "method"
    for name, value in command_defaults("serve").items():
        assert f"[default: {value}" in _option_line(serve, "--" + name.replace("_", "-"))
    assert "SmolLM2-135M-Instruct" in _option_line(chat, "--model")
    assert "gemma-3-270m" in _option_line(generate, "--model")
    assert "last 4 conversations" not in serve        # the docstring names the option, not a number


def test_the_tables_are_read_from_the_declarations():
    shaping = {n for n, s in SPECS.items() if s.shapes_contexts}
    assert shaping and not shaping & PER_CALL               # a context-shaping setting cannot change per call
    assert set(SWEEPABLE) <= PER_CALL
    assert {"method", "steer_scale"} <= PROFILE_FIELDS and "model" not in PROFILE_FIELDS
    names = [s.api for s in SPECS.values() if s.api] + [a for s in SPECS.values() for a in s.api_aliases]
    assert len(names) == len(set(names))                    # one request field, one setting
    for name, spec in SPECS.items():
        assert spec.api_range is None or spec.api, name
        assert not spec.choices or getattr(Settings, name) in spec.choices, name
        assert not spec.defaults or set(spec.defaults) <= {"chat", "serve", "compare"}, name
