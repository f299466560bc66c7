"""Model registry: every model by its real config.json, built with random weights or loaded.

`config_dict`, `max_context` and `names` are torch-free (the host validates configs with them);
`build` imports torch and transformers.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

import yaml

_PKG = resources.files("frameworks.models")


@cache
def _registry() -> dict:
    return yaml.safe_load(_PKG.joinpath("registry.yaml").read_text())["models"]


def names() -> list[str]:
    return list(_registry())


def entry(name: str) -> dict:
    try:
        return _registry()[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(names())}") from None


def config_dict(name: str) -> dict:
    """The model's config.json as a dict (a tiny variant: its base's, with the override applied)."""
    e = entry(name)
    if "base" in e:
        cfg = config_dict(e["base"])
        for k, v in e["override"].items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        return cfg
    return json.loads(_PKG.joinpath("configs", e["config"]).read_text())


def max_context(name: str) -> int:
    return int(config_dict(name)["max_position_embeddings"])


def supports(name: str, framework: str) -> bool:
    return framework in entry(name)["frameworks"]


def build(name: str, weights: str, device: str, dtype: str, attn_implementation: str, seed: int = 0):
    """The model in eval mode on `device`.

    weights="random": built from the registry config directly on the target device (no CPU
    copy, no load), parameters drawn N(0, 0.02) on that device — an 8B model takes seconds on
    a GPU. Random weights are valid for latency and memory, not for accuracy. Otherwise
    `weights` is a local path or hub id loaded with from_pretrained.
    """
    import torch
    import transformers

    torch_dtype = getattr(torch, dtype)
    if weights != "random":
        import importlib.util

        # device_map loads straight onto the device but needs accelerate; without it, load and move
        placement = {"device_map": device} if importlib.util.find_spec("accelerate") else {}
        model = transformers.AutoModelForCausalLM.from_pretrained(
            weights, dtype=torch_dtype, attn_implementation=attn_implementation, **placement
        )
        return model.to(device).eval()
    cfg_dict = config_dict(name)
    cfg_dict.pop("quantization_config", None)  # random weights are never quantized
    config = transformers.AutoConfig.for_model(**cfg_dict)
    config.dtype = torch_dtype
    # construct on the meta device (no memory, no init), then materialise on the target device
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation=attn_implementation)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    std = getattr(config, "initializer_range", None) or getattr(config, "init_std", 0.02)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in pname or "layer_norm" in pname):
                p.fill_(1.0) if pname.endswith("weight") else p.zero_()
            elif p.dim() == 1:
                p.zero_()  # biases
            else:
                p.normal_(0.0, std, generator=gen)
        _reinit_buffers(model, device)
    return model.eval()


def _reinit_buffers(model, device) -> None:
    """Non-persistent buffers (RoPE inverse frequencies) are garbage after to_empty: rebuild the
    modules that own them on the CPU, where their constructor computes them, and copy them over."""
    import torch

    for module in model.modules():
        own = dict(module.named_buffers(recurse=False))
        if not own:
            continue
        if not hasattr(module, "config"):
            raise RuntimeError(f"cannot re-initialise the buffers of {type(module).__name__}")
        with torch.device("cpu"):
            fresh = type(module)(module.config)
        for name, buf in fresh.named_buffers(recurse=False):
            setattr(module, name, buf.to(device))
        for attr in ("attention_scaling",):
            if hasattr(fresh, attr):
                setattr(module, attr, getattr(fresh, attr))
    for name, buf in model.named_buffers():
        if buf.is_floating_point() and not torch.isfinite(buf).all():
            raise RuntimeError(f"buffer {name} is not initialised after building the model")
