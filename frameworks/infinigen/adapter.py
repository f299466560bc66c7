"""Framework `infinigen`: InfiniGen KV policy on the transformers engine."""

from frameworks.hf.runner import run_engine_cell
from frameworks.infinigen.policy import InfiniGenPolicy


def run(spec):
    return run_engine_cell(spec, InfiniGenPolicy)
