"""Fixtures for the runtime tests, self-contained: the real stories260K, tiny random models of each
family, and hand-built plans (bypass/delete at chosen, non-contiguous layers).

Assets come from $SUBFIT_ASSETS (default: ../shared/assets next to the repository); tests that
need them skip with a message saying so when they are absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
ASSETS = Path(os.environ.get("SUBFIT_ASSETS", REPO.parent / "shared" / "assets"))
STORIES = ASSETS / "models" / "stories260K"

# Plans by layer: a ~25% one and a ~37.5% one (stories260K: 25.4% and 39.9% of block parameters).
PLAN_SHAPES = {
    "empty": ({}, {}),
    "p25": ({1: "bypass", 3: "delete"}, {2: "bypass"}),
    "p375": ({2: "bypass", 4: "bypass"}, {1: "bypass", 3: "delete"}),
}
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", {}),  # q/k RMSNorm
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "llama3-rope": ("LlamaConfig", {"rope_parameters": {  # RoPE tables must come from HF's scaled frequencies
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
}


@pytest.fixture(autouse=True, scope="module")
def tiny_models(one_thread):
    """The models here are tiny: every module runs on one thread (tests/conftest.py)."""


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    if not STORIES.exists():
        pytest.skip(f"asset {STORIES} not found: set SUBFIT_ASSETS to the shared assets folder")
    return STORIES


@pytest.fixture(scope="session")
def stories(stories_dir):
    """(model, tokenizer, source) of the real stories260K, float32."""
    from subfit import models

    return models.load(stories_dir)


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory, stories_dir):
    """Factory: family -> folder of a tiny random model of that family (built once, saved like a
    Hugging Face checkpoint with the stories260K tokenizer)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            cls_name, extra = FAMILIES[family]
            config = getattr(transformers, cls_name)(
                vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **extra,
            )
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config)
            with torch.no_grad():  # random init leaves biases/norms trivial; make every parameter matter
                for name, p in model.named_parameters():
                    if name.endswith("bias") or "norm" in name:
                        p.add_(0.1 * torch.randn_like(p))
            folder = tmp_path_factory.mktemp(family)
            model.save_pretrained(folder)
            AutoTokenizer.from_pretrained(stories_dir).save_pretrained(folder)
            built[family] = folder
        return built[family]

    return get


@pytest.fixture(scope="session")
def family(family_dir):
    """Factory: family -> (model, tokenizer, source), float32, loaded through subfit.models."""
    from subfit import models

    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = models.load(family_dir(name))
        return loaded[name]

    return get


def make_plan(model, source, attn: dict[int, str] | None = None, ffn: dict[int, str] | None = None, *,
              attn_rank: int = 8, ffn_rank: int = 16, seed: int = 0):
    """The empty plan of `model` with the given layers bypassed/deleted, and random bypass weights
    big enough to change the output (FFN bypasses share one basis)."""
    from subfit.models import Decoder
    from subfit.plan import Plan

    dec = Decoder(model)
    plan = Plan.empty(dec, source)
    gen = torch.Generator().manual_seed(seed)
    d = dec.hidden_size
    for layer, action in (attn or {}).items():
        plan.attn[layer] = action
        if action == "bypass":
            plan.tensors[f"attn.{layer}.down"] = torch.randn(d, attn_rank, generator=gen) / d ** 0.5
            plan.tensors[f"attn.{layer}.up"] = torch.randn(attn_rank, d, generator=gen) / attn_rank ** 0.5
            plan.tensors[f"attn.{layer}.bias"] = 0.1 * torch.randn(d, generator=gen)
    for layer, action in (ffn or {}).items():
        plan.ffn[layer] = action
        if action == "bypass":
            if "ffn.basis" not in plan.tensors:
                plan.tensors["ffn.basis"] = torch.randn(d, ffn_rank, generator=gen) / d ** 0.5
            plan.tensors[f"ffn.{layer}.up"] = torch.randn(ffn_rank, d, generator=gen) / ffn_rank ** 0.5
            plan.tensors[f"ffn.{layer}.bias"] = 0.1 * torch.randn(d, generator=gen)
    plan.validate()
    return plan


@pytest.fixture(scope="session")
def plan_of():
    """Factory: (model, source, shape name in PLAN_SHAPES) -> hand-built plan."""

    def get(model, source, shape: str):
        attn, ffn = PLAN_SHAPES[shape]
        return make_plan(model, source, attn, ffn)

    return get


@pytest.fixture(scope="session")
def build_plan():
    """`make_plan` itself, for tests that need their own layer choices."""
    return make_plan
