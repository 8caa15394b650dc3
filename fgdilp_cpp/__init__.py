"""fgdilp-cpp: detoxify GGUF models on llama.cpp by steering per-head attention outputs."""

from .errors import FgdilpError

__version__ = "0.1.0"
__all__ = ["FgdilpError", "__version__"]
