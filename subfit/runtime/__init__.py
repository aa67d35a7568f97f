"""Fast decode of a SubFit plan: `load(plan)` -> `Runtime` with `generate`, `stream`, `prefill`,
`decode_step` and `kv_cache_bytes`; `.as_hf()` for code written against Hugging Face `generate`.

Data flows one way: the runtime reads plans and base models and never imports the compression
machinery (calibration, statistics, fitting, selection).
"""
from subfit.runtime.generate import CacheOverflowError, Generation, Runtime, StreamStep, load, sample
from subfit.runtime.hf import HFGenerate
from subfit.runtime.kv_cache import CompactKVCache
from subfit.runtime.model import Transformer

__all__ = ["CacheOverflowError", "CompactKVCache", "Generation", "HFGenerate", "Runtime", "StreamStep",
           "Transformer", "load", "sample"]
