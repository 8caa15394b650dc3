"""Residual-stream control vectors from head directions: llama.cpp's stock steering feature,
used as a baseline (and written in its control-vector GGUF format, for llama-cli/llama-server).

Convention (llama.cpp's): vector il is added to the residual stream at the output of block il,
to every token; llama.cpp has no slot for block 0, so layer 0 is dropped.

An exported file holds the vectors at scale 1 (the scale is linear: llama.cpp's
--control-vector-scaled FILE S multiplies them by S) and only the blocks of its layer range:
llama.cpp's defaults (--control-vector FILE: every block, x1) wreck the text of a small model,
so a file used without the printed flags still steers only the blocks it was meant for. The
recommended range and scale are kept in the file's metadata (fgdilp.cvec.*, keys llama.cpp ignores).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

META_START, META_END, META_SCALE = "fgdilp.cvec.layer_start", "fgdilp.cvec.layer_end", "fgdilp.cvec.scale"


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


def llama_layer_range(layer_range: Optional[tuple[int, int]], n_layer: int) -> tuple[int, int]:
    """The blocks a control vector may touch, as llama.cpp counts them (1..n_layer-1, inclusive):
    a steering range START..END (our layers) clipped to them; None = all of them."""
    if layer_range is None:
        return 1, n_layer - 1
    start, end = max(1, int(layer_range[0])), min(n_layer - 1, int(layer_range[1]))
    if start > end:
        raise ValueError(f"layer range {layer_range[0]}..{layer_range[1]} holds no block with a control-vector "
                         f"slot (llama.cpp steers blocks 1..{n_layer - 1})")
    return start, end


def llama_flags(path: str, scale: float, layer_range: tuple[int, int]) -> str:
    """The llama-cli / llama-server flags that apply the file as it was calibrated."""
    import shlex

    return (f"--control-vector-scaled {shlex.quote(str(path))} {scale:g} "
            f"--control-vector-layer-range {layer_range[0]} {layer_range[1]}")


def save_control_vector(path, vectors: np.ndarray, model_hint: str,
                        layer_range: Optional[tuple[int, int]] = None, scale: float = 1.0) -> tuple[int, int]:
    """llama.cpp control-vector GGUF: direction.<il> F32 [n_embd] for the blocks il of
    `layer_range` (llama_layer_range; default all, 1..n_layer-1), the range and `scale` in the
    metadata; written atomically (files.write_atomic_with; a symlink at `path` is refused).
    Returns the range written."""
    import gguf

    from ..files import write_atomic_with

    start, end = llama_layer_range(layer_range, vectors.shape[0])

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, "controlvector")
        w.add_string("controlvector.model_hint", model_hint)
        w.add_int32("controlvector.layer_count", int(vectors.shape[0]) - 1)
        w.add_int32(META_START, start)
        w.add_int32(META_END, end)
        w.add_float32(META_SCALE, float(scale))
        for il in range(start, end + 1):
            w.add_tensor(f"direction.{il}", np.ascontiguousarray(vectors[il], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write_atomic_with(path, write)
    return start, end


@dataclass
class ControlVectorFile:
    n_embd: int
    data: np.ndarray                      # [n_embd * max_layer] float32: block 1 first, as llama.cpp lays it out
    layer_range: Optional[tuple[int, int]]   # the recommended range (metadata), None in a foreign file
    scale: Optional[float]


def read_control_vector(path, strength: float = 1.0) -> ControlVectorFile:
    """A control-vector file read the way llama.cpp's common_control_vector_load reads it: every
    direction.<il> (il >= 1) times `strength` at offset n_embd*(il-1), missing blocks zero; plus
    our metadata. Raises ValueError for a file llama.cpp would skip."""
    import gguf

    r = gguf.GGUFReader(str(path))
    layers: dict[int, np.ndarray] = {}
    for t in r.tensors:
        prefix, _, idx = t.name.partition(".")
        if prefix != "direction" or not idx.isdigit() or int(idx) < 1:
            raise ValueError(f"{path}: tensor {t.name!r} is not direction.<layer >= 1>")
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1:
            raise ValueError(f"{path}: {t.name} is not a 1-D F32 tensor")
        layers[int(idx)] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    widths = {v.size for v in layers.values()}
    if len(widths) != 1:
        raise ValueError(f"{path}: no direction tensors, or tensors of different widths")
    n_embd = widths.pop()
    data = np.zeros(n_embd * max(layers), dtype=np.float32)
    for il, v in layers.items():
        data[n_embd * (il - 1): n_embd * il] += v * np.float32(strength)

    def field(key):
        f = r.fields.get(key)
        return None if f is None else f.parts[-1][0].item()

    start, end, scale = field(META_START), field(META_END), field(META_SCALE)
    return ControlVectorFile(n_embd, data, (int(start), int(end)) if start is not None else None,
                             float(scale) if scale is not None else None)
