"""Re-quantise a GGUF model with llama.cpp's own quantizer (through llama-cpp-python), as a user
would with `llama-quantize --allow-requantize`:

    python scripts/requantize.py MODEL.gguf OUT.gguf Q8_0 [--threads 2]

TYPE is a llama_ftype name without its prefix (Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, ...). Used to
make other quantisations of the embedded models (docs/results/quant-transfer.md).
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time

import llama_cpp


def requantize(src: str, dst: str, ftype_name: str, threads: int = 2) -> float:
    """Write `dst`, `src` re-quantised to `ftype_name`; returns the seconds it took."""
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name.upper()}", None)
    if ftype is None:
        raise SystemExit(f"unknown quantisation type {ftype_name!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.allow_requantize = True      # the sources are already quantised (Q4_K_M, Q4_1)
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("type")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    print(f"{a.out}: {requantize(a.model, a.out, a.type, a.threads):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
