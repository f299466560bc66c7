"""Model registry: published configs, fast random builds, clear errors."""

import pytest
import torch
import transformers

from frameworks import models


@pytest.mark.parametrize("name", [n for n in models.names() if "params" in models.entry(n)])
def test_published_parameter_counts(name):
    cfg = models.config_dict(name)
    cfg.pop("quantization_config", None)
    with torch.device("meta"):
        m = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    assert sum(p.numel() for p in m.parameters()) == models.entry(name)["params"]


def test_tiny_variant_keeps_architecture():
    big, tiny = models.config_dict("llama-3.1-8b"), models.config_dict("tiny-llama-3.1")
    assert tiny["model_type"] == big["model_type"] and tiny["rope_scaling"] == big["rope_scaling"]
    assert tiny["num_attention_heads"] // tiny["num_key_value_heads"] == big["num_attention_heads"] // big["num_key_value_heads"]


@pytest.mark.parametrize("name", ["tiny-llama-3.1", "tiny-llama-3.2-1b", "tiny-opt"])
def test_random_build_matches_reference_init_buffers(name):
    m = models.build(name, "random", "cpu", "float32", "sdpa", seed=1)
    ref = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**models.config_dict(name)))
    for (n, b), (_, rb) in zip(m.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, rb), n  # RoPE frequencies recomputed after meta construction
    out = m(torch.randint(0, 100, (2, 7))).logits
    assert torch.isfinite(out).all()
    again = models.build(name, "random", "cpu", "float32", "sdpa", seed=1)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), again.parameters()))  # seeded


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'llama-9'"):
        models.entry("llama-9")


def test_max_context():
    assert models.max_context("llama-3.1-8b") == 131072
    assert models.max_context("opt-6.7b") == 2048
