"""Shared fixtures: the real stories260K model and tiny random models of each supported family.

Assets come from $SUBFIT_ASSETS (default ../shared/assets next to the repository); tests that
need them skip with a message saying so when they are absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ASSETS = Path(os.environ.get("SUBFIT_ASSETS", Path(__file__).resolve().parents[1].parent / "shared" / "assets"))
STORIES = ASSETS / "models" / "stories260K"
TINYSTORIES = ASSETS / "data" / "tinystories" / "tinystories_validation_head.txt"

FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", {}),  # q/k RMSNorm
}


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"asset {path} not found: set SUBFIT_ASSETS to the shared assets folder")
    return path


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    return _need(STORIES)


@pytest.fixture(scope="session")
def tinystories_file() -> Path:
    return _need(TINYSTORIES)


@pytest.fixture(scope="session")
def stories(stories_dir):
    """(model, tokenizer, source) of the real stories260K, float32."""
    from subfit import models

    return models.load(stories_dir)


def make_family_model(family: str, folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random model of `family` saved like a Hugging Face checkpoint (with a tokenizer)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cls_name, extra = FAMILY_CONFIGS[family]
    config = getattr(transformers, cls_name)(
        vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=False, **extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random init leaves biases/norms trivial; make every parameter matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def family_model_dir(tmp_path_factory, stories_dir):
    """Factory: family name -> folder of a tiny random model of that family (built once)."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = make_family_model(family, tmp_path_factory.mktemp(family), stories_dir)
        return built[family]

    return get


@pytest.fixture(scope="session")
def small_plan(stories, tinystories_file):
    """A real SubFit plan of stories260K (attention and FeedForward bypasses), made in about a second
    from a little calibration text. Treat it as read-only: copy it before changing it."""
    from compress_settings import settings

    from subfit.compression import compress

    model, tokenizer, _ = stories
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the model is tiny: more threads only contend (13 s instead of 0.5 s on 2 busy cores)
    try:
        plan = compress(model, 0.375, tinystories_file, tokenizer=tokenizer,
                        **settings(calib_samples=8, calib_len=64, selection_draws=1, step=0.375, score_samples=4))
    finally:
        torch.set_num_threads(threads)
    assert "bypass" in plan.attn and "bypass" in plan.ffn, f"the tests need both kinds of bypass: {plan.layer_map()}"
    return plan


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: threads only add overhead (and thrash on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
