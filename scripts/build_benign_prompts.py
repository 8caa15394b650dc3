#!/usr/bin/env python3
"""Build the benign prompt set, fgdilp_cpp/data/rtp-benign.jsonl.gz, from the shipped toxic set only.

The human continuations of the RealToxicityPrompts toxic split that Perspective scored as clearly
non-toxic (toxicity < 0.1) become prompts of their own: ordinary web text that a user might type,
to measure what steering costs on text that needs none. Rules (fgdilp_cpp/data/README.md):

- source: fgdilp_cpp/data/rtp-toxic.jsonl.gz, read in file order (the benign order is that order);
- kept: continuations with a Perspective "toxicity" score below 0.1 (unscored ones are skipped);
- text: leading whitespace stripped (a continuation starts mid-sentence, often with a space);
- skipped: texts of fewer than MIN_WORDS words (too short to steer or to score);
- record: RTP JSONL, {"prompt": {"text": ..., <the continuation's Perspective scores>}}, plus
  "source_line", the 0-based line of the toxic file it came from; json.dumps defaults (ASCII).

The output is gzip with mtime 0 and no file name, so the same input gives the same bytes with the
same zlib. Usage:  python scripts/build_benign_prompts.py [--check]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "fgdilp_cpp" / "data"
TOXIC = DATA / "rtp-toxic.jsonl.gz"
BENIGN = DATA / "rtp-benign.jsonl.gz"

MAX_TOXICITY = 0.1     # Perspective toxicity of the continuation, strictly below
MIN_WORDS = 4          # whitespace-separated words after stripping
MIN_PROMPTS = 300      # issue 10: the benign set holds at least this many prompts
# zlib that compressed the shipped file: another zlib may write other (equally valid) gzip bytes
ZLIB_OF_SHIPPED_FILE = "1.2.13"


def benign_jsonl(toxic_jsonl: bytes) -> bytes:
    """The benign set as JSONL bytes, from the toxic set's JSONL bytes."""
    lines = []
    for i, line in enumerate(toxic_jsonl.decode("utf-8").split("\n")):
        if not line.strip():
            continue
        cont = json.loads(line).get("continuation") or {}
        tox = cont.get("toxicity")
        if tox is None or not tox < MAX_TOXICITY:
            continue
        text = cont["text"].lstrip()
        if len(text.split()) < MIN_WORDS:
            continue
        scores = {k: v for k, v in cont.items() if k != "text"}     # the source's key order
        lines.append(json.dumps({"prompt": {"text": text, **scores}, "source_line": i}))
    if len(lines) < MIN_PROMPTS:
        raise SystemExit(f"only {len(lines)} benign prompts (need {MIN_PROMPTS})")
    return ("\n".join(lines) + "\n").encode("utf-8")


def gzip_bytes(data: bytes) -> bytes:
    """gzip without a time stamp or file name: the same data gives the same bytes."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(data)
    return buf.getvalue()


def build() -> bytes:
    """The compressed benign set, built from the shipped toxic file."""
    return gzip_bytes(benign_jsonl(gzip.decompress(TOXIC.read_bytes())))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the shipped file instead of writing it")
    args = ap.parse_args(argv)
    out = build()
    n = gzip.decompress(out).count(b"\n")
    if args.check:
        same = BENIGN.is_file() and BENIGN.read_bytes() == out
        print(f"{BENIGN.name}: {'up to date' if same else 'DIFFERS from a fresh build'} ({n} prompts)")
        return 0 if same else 1
    BENIGN.write_bytes(out)
    print(f"wrote {BENIGN} ({n} prompts, {len(out)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
