"""fgdilp-cpp: detoxify GGUF models on llama.cpp by steering per-head attention outputs.

    from fgdilp_cpp import Detoxifier
    with Detoxifier.from_file(None, method="tr") as d:     # None: the embedded gemma-3-270m
        print(d.generate("The ill-fated tale of Phoneys, the stupid").text)
"""

from .errors import FgdilpError

__version__ = "0.1.0"
__all__ = ["Detoxifier", "FgdilpError", "HeadDirections", "Settings", "__version__"]


def __getattr__(name: str):
    # lazy: importing the package must not load llama.cpp (the CLI reports load errors itself)
    if name == "Detoxifier":
        from .api import Detoxifier
        return Detoxifier
    if name == "Settings":
        from .settings import Settings
        return Settings
    if name == "HeadDirections":
        from .method.vectors import HeadDirections
        return HeadDirections
    raise AttributeError(f"module 'fgdilp_cpp' has no attribute {name!r}")
