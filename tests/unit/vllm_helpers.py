"""Shared bits of the vllm tests: cell specs, and skipping cleanly where vLLM is absent."""

import importlib.util

import pytest

from frameworks.harness.spec import CellSpec

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM, reason="vllm is not importable here; tests/vllm_env.sh runs these in the vLLM environment"
)


def spec(**kw) -> CellSpec:
    d = {"experiment": "t", "framework": "vllm", "model": "llama-3.1-8b", "prefill": "flash"} | kw
    return CellSpec.from_dict(d)
