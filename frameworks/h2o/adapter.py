"""Framework `h2o`: H2O heavy-hitter eviction on the transformers engine."""

from frameworks.h2o.policy import H2OPolicy
from frameworks.hf.runner import run_engine_cell


def run(spec):
    return run_engine_cell(spec, H2OPolicy)
