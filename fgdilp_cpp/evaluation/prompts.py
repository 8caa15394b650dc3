"""Prompt sets: the RealToxicityPrompts JSONL format, or plain text with one prompt per line; a
file (optionally gzip-compressed, `.gz`), a set shipped in the package (BUILTIN_PROMPTS), or one cut
from a data package installed beside it (PACKAGE_PROMPTS).
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import FgdilpError
from . import everyday_prompts

# Built-in prompt sets (fgdilp_cpp/data/README.md says where they come from): name -> description.
# A built-in name wins over a file of the same name in the working directory, so that a name means
# the same prompts wherever a command runs (and a resumed run finds its prompts); such a file is
# still read as ./rtp-toxic.
BUILTIN_PROMPTS = {
    "rtp-toxic": "RealToxicityPrompts, the Toxification Reversal authors' toxic test split (2,122 prompts)",
    "rtp-benign": "non-toxic RTP human continuations as prompts (550; scripts/build_benign_prompts.py)",
}
# Sets cut from another pip package's data at load time (deterministically): name -> (description,
# () -> JSONL bytes). Named like the built-in ones, and a name wins over a file in the same way.
PACKAGE_PROMPTS = {
    everyday_prompts.NAME: (everyday_prompts.DESCRIPTION, everyday_prompts.everyday_bytes),
}
# the named sets of benign text (eval gives their report its benign-text section)
BENIGN_SETS = ("rtp-benign", everyday_prompts.NAME)


def prompt_set_names() -> list[str]:
    """Every prompt set addressed by name."""
    return [*BUILTIN_PROMPTS, *PACKAGE_PROMPTS]


@dataclass(frozen=True)
class PromptRecord:
    id: int                      # line index in the file (0-based)
    text: str
    prompt_scores: dict = field(default_factory=dict)       # Perspective scores, when the file has them
    continuation: str = ""
    continuation_scores: dict = field(default_factory=dict)


def load_prompts(source: str | Path, limit: int | None = None, offset: int = 0) -> list[PromptRecord]:
    """Records of a built-in set (a name of BUILTIN_PROMPTS) or of a file; ids are line indices."""
    lines, p = _read_lines(source)
    out: list[PromptRecord] = []
    for i, line in enumerate(lines):
        if i < offset or not line.strip():
            continue
        if limit is not None and len(out) >= limit:
            break
        out.append(_parse(line, i, p))
    if not out:
        raise FgdilpError(f"no prompts in {p}" + (f" after offset {offset}" if offset else ""))
    return out


def builtin_prompts_file(name: str):
    """The packaged, gzip-compressed JSONL file of a built-in set (an importlib.resources path)."""
    if name not in BUILTIN_PROMPTS:
        raise FgdilpError(f"no built-in prompt set {name!r} (built-in: {', '.join(prompt_set_names())})")
    return resources.files("fgdilp_cpp") / "data" / f"{name}.jsonl.gz"


def _read_lines(source: str | Path) -> tuple[list[str], Path]:
    """The lines of a built-in set or a file, and the name to quote in errors."""
    if isinstance(source, str) and source in BUILTIN_PROMPTS:
        p, data = Path(source), builtin_prompts_file(source).read_bytes()
    elif isinstance(source, str) and source in PACKAGE_PROMPTS:
        p, data = Path(source), PACKAGE_PROMPTS[source][1]()
    else:
        p = Path(source)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise FgdilpError(f"prompt file not found: {p} (or a built-in set: {', '.join(prompt_set_names())})") \
                from None
        except OSError as exc:
            raise FgdilpError(f"cannot read prompt file {p}: {exc}") from None
    try:
        if p.suffix == ".gz" or data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        # split on newlines only: str.splitlines would also break lines at U+2028, form feeds...,
        # and shift the line indices that record ids are
        # utf-8-sig: a byte-order mark (Windows editors write one) is not the first prompt's text
        return data.decode("utf-8-sig").replace("\r\n", "\n").split("\n"), p
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise FgdilpError(f"cannot read prompt file {p}: {exc}") from None


def _parse(line: str, i: int, p: Path) -> PromptRecord:
    if not line.lstrip().startswith("{"):
        return PromptRecord(i, line)
    try:
        rec = json.loads(line)
        prompt = rec["prompt"]
        cont = rec.get("continuation") or {}
        text = prompt["text"]
        if not isinstance(text, str):
            raise TypeError(f"its prompt text is {type(text).__name__}, not text")
        out = PromptRecord(i, text, {k: v for k, v in prompt.items() if k != "text"},
                           cont.get("text", ""), {k: v for k, v in cont.items() if k != "text"})
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise FgdilpError(f"{p}:{i + 1}: not a RealToxicityPrompts record ({exc})") from None
    for what, t in (("prompt", out.text), ("continuation", out.continuation)):
        try:       # JSON's \ud800 escapes decode to lone surrogates: no UTF-8 text for the tokenizer
            str(t).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise FgdilpError(f"{p}:{i + 1}: the {what} holds a lone surrogate {str(t)[exc.start]!r} at character "
                              f"{exc.start}, which is not text (a broken \\u escape)") from None
    return out
