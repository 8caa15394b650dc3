"""The method registry: a method registered here (one entry, one plan function, no other file
changed) runs through Detoxifier.generate, the CLI, the server's validation and the chat REPL."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from fgdilp_cpp import methods
from fgdilp_cpp.errors import FgdilpError

TOY = "toy-shift"


def toy_plan(rt, req):
    """P0 alone, every head pushed along one fixed direction (the edit of the frozen modes)."""
    from fgdilp_cpp.native import EditSpec
    from fgdilp_cpp.plans import SLOT_DIR, Plan

    i = rt.model.info
    rows = np.linspace(-1.0, 1.0, i.n_head * i.head_dim, dtype=np.float32)[None, :]
    return Plan([req.tokens], 0, edits=(EditSpec(target=0, dir_slot=SLOT_DIR, e_slot=-1),), explain={"toy": 1},
                fixed_rows=rows)


@pytest.fixture
def toy():
    spec = methods.register(methods.Method(TOY, "a test method", plan=toy_plan, hook=True, heads=True))
    try:
        yield spec
    finally:
        methods.unregister(TOY)
    assert TOY not in methods.names()


def test_registry_lookups(toy):
    assert TOY in methods.names() and methods.is_method(TOY) and methods.get(TOY) is toy
    assert "vectors" not in methods.names() and not methods.is_method("vectors")
    assert methods.names()[:3] == ("none", "prompt", "tr")
    with pytest.raises(FgdilpError, match="unknown method 'nope'.*toy-shift"):
        methods.get("nope")
    with pytest.raises(ValueError, match="registered already"):
        methods.register(methods.Method(TOY, "again", plan=toy_plan))


def test_every_builtin_entry_resolves():
    for name in methods.names() + ("vectors",):
        m = methods.get(name)
        assert callable(m.plan_builder()), name
        assert m.n_roles(__import__("fgdilp_cpp.params").params.FgdilpParams()) >= 1


def test_toy_method_through_the_api(toy, tiny_llama):
    from fgdilp_cpp.api import Detoxifier

    with Detoxifier.from_file(tiny_llama[0], method="none", ctx_size=128, threads=1, n_predict=12) as det:
        plain = det.generate("the cat sat on")
        res = det.generate("the cat sat on", method=TOY)
        off = det.generate("the cat sat on", method=TOY, steer_scale=0.0)
    n_layer = tiny_llama[2].n_layer
    assert res.method == TOY and res.fired_layers == n_layer and res.explain == {"toy": 1}
    assert res.tokens != plain.tokens                 # the hook fired and changed the text
    assert off.tokens == plain.tokens                 # the same plan at scale 0 is unsteered


def test_toy_method_through_the_cli(toy, tiny_llama):
    from fgdilp_cpp.cli import main

    runner = CliRunner()
    args = ["-m", str(tiny_llama[0]), "-c", "128", "-t", "1", "-n", "8", "-p", "the cat sat on"]
    out = runner.invoke(main, ["generate", *args, "--method", TOY, "--json"])
    assert out.exit_code == 0, out.output
    rec = json.loads(out.output.strip().splitlines()[-1])
    assert rec["method"] == TOY and rec["hook_fired_layers"] == tiny_llama[2].n_layer
    cmp = runner.invoke(main, ["compare", *args, "--methods", f"none,{TOY}"])
    assert cmp.exit_code == 0 and f"[{TOY}]" in cmp.output
    bad = runner.invoke(main, ["generate", *args, "--method", "toy-nope"])
    assert bad.exit_code != 0 and TOY in bad.output     # the choices listed come from the registry


def test_toy_method_in_server_validation_and_repl(toy, tiny_llama, capsys):
    from fgdilp_cpp.api import Detoxifier
    from fgdilp_cpp.serve.openai_api import ApiError, Policy, check_methods, parse_request
    from fgdilp_cpp.chat.repl import Session, command

    assert check_methods(["none", TOY]) == ("none", TOY)          # serve --allow-methods reads the registry
    with pytest.raises(FgdilpError, match="unknown method 'toy-nope'.*toy-shift"):
        check_methods(["toy-nope"])
    with Detoxifier.from_file(tiny_llama[0], ctx_size=128, threads=1) as det:
        policy = Policy(max_tokens=64, methods=("none", TOY), max_steer_scale=2.0)
        req = parse_request({"prompt": "hi", "method": TOY}, False, det, policy)
        assert req.overrides["method"] == TOY
        with pytest.raises(ApiError) as err:
            parse_request({"prompt": "hi", "method": "tr"}, False, det, policy)
        assert err.value.status == 400 and err.value.param == "method" and TOY in err.value.message
        session = Session(det, None)
        assert command(session, f"/method {TOY}") and session.method == TOY
        command(session, "/help")
        assert TOY in capsys.readouterr().out
