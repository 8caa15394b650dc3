"""Everything that talks to llama-cpp-python's low-level API; knows nothing about toxicity."""

from .batch import Batch, Capture, Lockstep, prefill_aside
from .context import CACHE_TYPES, UNQUANTISED_CACHE, Context, ContextParams, Model, ModelInfo
from .sampling import Sampler, SamplingParams

__all__ = ["Batch", "Capture", "Lockstep", "prefill_aside", "CACHE_TYPES", "UNQUANTISED_CACHE", "Context", "ContextParams",
           "Model", "ModelInfo", "Sampler", "SamplingParams"]
