"""Fast decode of a SubFit plan: `load(plan)` -> `Runtime` with `generate`, `stream`, `prefill`,
`decode_step` and `kv_cache_bytes`; `.as_hf()` for code written against Hugging Face `generate`;
`load(plan, tp=N)` under torchrun (after `init_distributed()`) for tensor parallelism.

Data flows one way: the runtime reads plans and base models and never imports the compression
machinery (calibration, statistics, fitting, selection).
"""
from subfit.runtime.generate import CacheOverflowError, Generation, Runtime, StreamStep, load, sample
from subfit.runtime.hf import HFGenerate
from subfit.runtime.kv_cache import CompactKVCache
from subfit.runtime.model import Transformer
from subfit.runtime.tensor_parallel import init_distributed

__all__ = ["CacheOverflowError", "CompactKVCache", "Generation", "HFGenerate", "Runtime", "StreamStep",
           "Transformer", "init_distributed", "load", "sample"]
