"""The random control of a profile folder (issue 23's validation): a copy of the folder whose
universal directions are replaced by random directions with the same per-head norms (seed 7, as
the fast setup's own control), the profiles' universal_sha256 updated to the new file. Evaluating
the same method at the same point from both folders gives `eval specificity` its two runs.

    python scripts/random_control_profile.py runs/prof-gemma runs/prof-gemma-random [--seed 7]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

from fgdilp_cpp.method.vectors import HeadDirections


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; give a new folder")
    shutil.copytree(args.source, args.out)
    shas = {}
    for path in sorted(args.out.glob("*.universal.gguf")):
        old = hashlib.sha256(path.read_bytes()).hexdigest()
        HeadDirections.random_like(HeadDirections.load(path), args.seed).save(path)
        shas[old] = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f"{path.name}: random directions of the same per-head norms (seed {args.seed})")
    for path in sorted(args.out.glob("*.json")):
        text = path.read_text()
        for old, new in shas.items():
            text = text.replace(old, new)
        json.loads(text)                          # still a profile
        path.write_text(text)
    if not shas:
        raise SystemExit(f"no *.universal.gguf in {args.source}")


if __name__ == "__main__":
    main()
