"""What stays equal across quantisations of one model and what a fine-tune changes: for each file,
its quantisation, bits per weight, weights and family fingerprints (fgdilp_cpp/engine/tensors.py),
and how many of the reference's 1-D tensors (norm weights, never quantised) it holds bit for bit:

    python scripts/quant_identity.py REFERENCE.gguf OTHER.gguf ... [--tuned-copy SRC.gguf OUT.gguf]

--tuned-copy writes OUT, a copy of SRC with one norm weight moved by 1e-3 (a fake fine-tune), and
lists it too (docs/results/quant-transfer.md).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

from gguf import GGUFReader

from fgdilp_cpp.engine.tensors import bits_per_weight, family_fingerprint, weights_fingerprint

TUNED_TENSOR = "blk.1.ffn_norm.weight"


def one_d_tensors(path: str) -> dict[str, str]:
    """{name: sha256 of its bytes} of the file's 1-D tensors."""
    return {t.name: hashlib.sha256(bytes(t.data)).hexdigest() for t in GGUFReader(path).tensors if len(t.shape) == 1}


def write_tuned_copy(src: str, out: str, name: str = TUNED_TENSOR) -> None:
    shutil.copyfile(src, out)
    reader = GGUFReader(out, "r+")
    tensor = next((t for t in reader.tensors if t.name == name), None)
    if tensor is None:
        raise SystemExit(f"{src} has no tensor {name}")
    tensor.data[0] += 1e-3
    reader.data.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reference")
    ap.add_argument("others", nargs="*")
    ap.add_argument("--tuned-copy", nargs=2, metavar=("SRC", "OUT"))
    a = ap.parse_args(argv)
    files = [a.reference, *a.others]
    if a.tuned_copy:
        write_tuned_copy(*a.tuned_copy)
        files.append(a.tuned_copy[1])
    ref = one_d_tensors(a.reference)
    print(f"{'file':<40} {'bpw':>5}  {'weights':<12}  {'family':<12}  1-D tensors equal to the reference's")
    for f in files:
        mine = one_d_tensors(f)
        same = sum(mine.get(k) == v for k, v in ref.items())
        family = family_fingerprint(f)
        print(f"{Path(f).name:<40} {bits_per_weight(f):5.2f}  {weights_fingerprint(f)[:12]}  "
              f"{family[:12] if family else 'none':<12}  {same} of {len(ref)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
