"""The everyday-benign prompt set: cut deterministically from randfacts' safe facts by its rules,
addressed by name like the built-in sets, and holding no RealToxicityPrompts text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp.evaluation import everyday_prompts as ep
from fgdilp_cpp.evaluation.prompts import BENIGN_SETS, PACKAGE_PROMPTS, load_prompts, prompt_set_names

ROOT = Path(__file__).resolve().parents[1]


def _source_lines() -> list[int]:
    return [json.loads(line)["source_line"] for line in ep.everyday_bytes().decode().splitlines()]


def test_the_set_is_named_documented_and_benign():
    assert ep.NAME in PACKAGE_PROMPTS and ep.NAME in prompt_set_names() and ep.NAME in BENIGN_SETS
    readme = (ROOT / "fgdilp_cpp" / "data" / "README.md").read_text()
    assert ep.NAME in readme and ep.DIST in readme and ep.FACTS_SHA256 in readme


def test_it_loads_deterministically_by_its_rules():
    recs = load_prompts(ep.NAME)
    assert [r.id for r in recs] == list(range(ep.COUNT))
    assert [r.text for r in load_prompts(ep.NAME)] == [r.text for r in recs]
    facts = ep.facts_bytes().decode("utf-8").split("\n")
    sources = _source_lines()
    assert sources == sorted(set(sources))                            # file order, no fact twice
    for r, i in zip(recs, sources):
        fact = facts[i].split()
        assert len(fact) >= ep.MIN_WORDS
        assert r.text == " ".join(fact[:len(r.text.split())])          # the fact's first words
        assert ep.PROMPT_MIN_WORDS <= len(r.text.split()) <= min(ep.PROMPT_MAX_WORDS, len(fact))
        assert not r.continuation and not r.prompt_scores
    # even spacing: the cut covers the whole file, not its first facts
    assert sources[0] < len(facts) // ep.COUNT and sources[-1] > len(facts) * (ep.COUNT - 2) // ep.COUNT


def test_it_holds_no_rtp_text():
    rtp = [t for name in ("rtp-toxic", "rtp-benign") for r in load_prompts(name) for t in (r.text, r.continuation)]
    joined = "\n".join(rtp)
    everyday = [r.text for r in load_prompts(ep.NAME)]
    assert not [t for t in everyday if t in joined]
    # the check can fail: an RTP prompt's words are found
    assert rtp[0][:30] in joined


def test_the_cut_rules_on_known_text(monkeypatch):
    lines = [f"fact number {i} has eight words in it" for i in range(10)]
    # line 0 too short, line 2 a repeat of line 1 once stripped: 10 facts kept, on lines 1, 3..11
    text = "\n".join(["too short to keep", lines[0], "  " + lines[0] + "  ", *lines[1:]])
    monkeypatch.setattr(ep, "COUNT", 4)
    out = [json.loads(x) for x in ep.everyday_jsonl(text).decode().splitlines()]
    # the k-th of 4 is kept fact floor(k * 10 / 4): facts 0, 2, 5, 7
    assert [o["source_line"] for o in out] == [1, 4, 7, 9]
    assert [o["prompt"]["text"] for o in out] == [f"fact number {i} has" for i in (0, 2, 5, 7)]
    monkeypatch.setattr(ep, "COUNT", 11)
    with pytest.raises(FgdilpError, match="10 usable facts, fewer than 11"):
        ep.everyday_jsonl(text)


def test_prompt_of_takes_the_first_half_within_bounds():
    assert ep.prompt_of("a b c d e f g h i j") == "a b c d e"
    assert ep.prompt_of("a b c d e f") == "a b c d"                       # at least PROMPT_MIN_WORDS
    long = " ".join(str(i) for i in range(40))
    assert ep.prompt_of(long) == " ".join(str(i) for i in range(ep.PROMPT_MAX_WORDS))
    assert ep.prompt_of("a  b\tc d e f g h i") == "a b c d e"             # whitespace joined by one space


def test_a_changed_facts_file_is_refused(tmp_path, monkeypatch):
    (tmp_path / ep.PACKAGE).mkdir()
    (tmp_path / ep.PACKAGE / ep.FACTS_FILE).write_text("a fact that is not the shipped one at all\n")
    monkeypatch.setattr(ep.package_files, "package_dir", lambda package, dist: tmp_path / package)
    with pytest.raises(FgdilpError, match="sha256"):
        load_prompts(ep.NAME)
