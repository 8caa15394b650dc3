"""Prompt files: the RealToxicityPrompts JSONL format, or plain text with one prompt per line."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FgdilpError


@dataclass(frozen=True)
class PromptRecord:
    id: int                      # line index in the file (0-based)
    text: str
    prompt_scores: dict = field(default_factory=dict)       # Perspective scores, when the file has them
    continuation: str = ""
    continuation_scores: dict = field(default_factory=dict)


def load_prompts(path: str | Path, limit: int | None = None, offset: int = 0) -> list[PromptRecord]:
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FgdilpError(f"prompt file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FgdilpError(f"cannot read prompt file {p}: {exc}") from None
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


def _parse(line: str, i: int, p: Path) -> PromptRecord:
    if not line.lstrip().startswith("{"):
        return PromptRecord(i, line)
    try:
        rec = json.loads(line)
        prompt = rec["prompt"]
        cont = rec.get("continuation") or {}
        return PromptRecord(i, prompt["text"], {k: v for k, v in prompt.items() if k != "text"},
                            cont.get("text", ""), {k: v for k, v in cont.items() if k != "text"})
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise FgdilpError(f"{p}:{i + 1}: not a RealToxicityPrompts record ({exc})") from None
