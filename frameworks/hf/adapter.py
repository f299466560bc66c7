"""Framework `hf`: the transformers engine with the full KV cache on the compute device."""

from frameworks.hf.policy import KVPolicy
from frameworks.hf.runner import run_engine_cell


def run(spec):
    return run_engine_cell(spec, KVPolicy)
