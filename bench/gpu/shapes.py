"""The three model shapes every GPU figure is measured on, and random-weight models of them.

Speed depends on a model's shapes, not its weights, so the configs of SmolLM2-135M, Llama-3.2-1B
and Llama-3.1-8B are written out here and the models built directly on the device with random
weights: nothing is downloaded. `--dry-run` uses `tiny()` versions of the same structure.
"""
from __future__ import annotations

import torch

from subfit.models import ModelSource

_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

MODELS: dict[str, dict] = {
    "SmolLM2-135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                         tie_word_embeddings=True, rms_norm_eps=1e-5),
    "Llama-3.2-1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                         rope_parameters={**_LLAMA3_ROPE, "factor": 32.0}, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                         rope_parameters={**_LLAMA3_ROPE, "factor": 8.0}, tie_word_embeddings=False, rms_norm_eps=1e-5),
}


def tiny(config: dict) -> dict:
    """The same structure (GQA, tied or not, RoPE type) at a size the CPU dry run runs in seconds."""
    return {**config, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512}


def config_of(name: str, dry_run: bool) -> dict:
    return tiny(MODELS[name]) if dry_run else MODELS[name]


def random_model(name: str, *, dtype: torch.dtype, device: str | torch.device, dry_run: bool = False):
    """(model, source): a LlamaForCausalLM of `name`'s shape with random weights, created on `device`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**config_of(name, dry_run)), dtype=dtype,
                                                 attn_implementation="sdpa")
    return model.eval(), ModelSource(f"random:{name}{'-tiny' if dry_run else ''}")
