"""Residual-stream control vectors from head directions: llama.cpp's stock steering feature,
used as a baseline (and written in its control-vector GGUF format).

Convention (llama.cpp's): vector il is added to the residual stream at the output of block il,
to every token; llama.cpp has no slot for block 0, so layer 0 is dropped.
"""

from __future__ import annotations

import numpy as np


def residual_directions(rows: np.ndarray, w_o: list[np.ndarray], n_head: int, exp_norm: float = 0.4,
                        scale: float = 1.0) -> np.ndarray:
    """-W_O (lambda_norm * delta) per layer: the TR edit without lambda_sim and renorm, moved
    through the attention output projection. rows [n_layer, n_head*head_dim], w_o[il]
    [n_embd, n_head*head_dim] -> [n_layer, n_embd] float32. (Models with a norm after W_O,
    such as Gemma's post-attention norm, make this an approximation.)"""
    out = []
    for il, row in enumerate(np.asarray(rows, dtype=np.float64)):
        heads = row.reshape(n_head, -1)                                    # [n_head, head_dim]
        k = scale * (1.0 + np.linalg.norm(heads, axis=1)) ** exp_norm      # [n_head]
        out.append(-(w_o[il].astype(np.float64) @ (k[:, None] * heads).reshape(-1)))
    return np.stack(out).astype(np.float32)


def save_control_vector(path, vectors: np.ndarray, model_hint: str) -> None:
    """llama.cpp control-vector GGUF: direction.<il> (il >= 1) F32 [n_embd]; written atomically
    (files.write_atomic_with; a symlink at `path` is refused)."""
    import gguf

    from ..files import write_atomic_with

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, "controlvector")
        w.add_string("controlvector.model_hint", model_hint)
        w.add_int32("controlvector.layer_count", int(vectors.shape[0]) - 1)
        for il in range(1, vectors.shape[0]):
            w.add_tensor(f"direction.{il}", np.ascontiguousarray(vectors[il], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write_atomic_with(path, write)
