"""Bad input: one clear error before any cell runs, non-zero exit."""

import pytest
import yaml

from tests.conftest import snakemake


def dry(repo, *config):
    return snakemake(repo, "-n", "--cores", "1", "--config", *config)


@pytest.mark.parametrize(
    "config, message",
    [
        (["preset=nosuch"], "unknown preset 'nosuch'"),
        (["preset=smoke", "frameworks=[deepspeed]"], "frameworks.0: 'deepspeed' is not one of"),
        (["preset=gpu2", "frameworks=[vllm]"], "'vllm' is not in preset 'gpu2'"),  # smoke has every framework
        (["preset=smoke", "models=[llama-9b]"], "unknown model 'llama-9b'"),
        (["preset=smoke", "runnr=local"], "unknown key"),
        (["preset=smoke", "frameworks=hf"], "frameworks: 'hf' is not of type 'array'"),
        (["preset=smoke", "experiments=[accuracies]"], "experiments.0: 'accuracies' is not one of"),
    ],
)
def test_bad_config(repo_copy, config, message):
    p = dry(repo_copy, *config)
    assert p.returncode != 0
    assert message in p.stderr + p.stdout, p.stderr[-2000:]
    assert not (repo_copy / "results" / "cells").exists()


def _preset(repo, **changes):
    doc = yaml.safe_load((repo / "config/presets/smoke.yaml").read_text())
    for path, value in changes.items():
        node = doc
        *parents, leaf = path.split(".")
        for k in parents:
            node = node[k]
        node[leaf] = value
    (repo / "config/presets/bad.yaml").write_text(yaml.safe_dump(doc))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"experiments.batch.sweep": {"prompt_len": [20000]}}, "exceeds the model's context of 16384 tokens"),
        ({"experiments.kv_budget.sweep": {"kv_budget": [1.5]}}, "kv_budget must be in (0, 1]"),
        ({"experiments.batch.sweep": {"batch_size": ["many"]}}, "batch_size must be an integer >= 1"),
        ({"experiments.batch.models": ["gpt-oss-20b"]}, "does not support model gpt-oss-20b (registry: ['vllm'])"),
        ({"experiments.batch.params": {"batchsize": 2}}, "unknown key"),
        ({"experiments.throughput": {"description": "x", "models": ["tiny-llama-3.1"]}}, "unknown key"),
        ({"experiments.batch.sweep": {"prefill": ["paged"]}}, "prefill must be one of"),
        ({"device": "tpu"}, "device: 'tpu' is not one of"),
        ({"cell_threads": 0}, "cell_threads: 0 is not allowed; allowed: an integer >= 1, or 'all'"),
        ({"experiments.alpha.sweep": {"policy.alpah": [1]}}, "unknown policy key(s) ['alpah'] for infinigen"),
        ({"experiments.alpha.sweep": {"policy.alpha": [-1]}}, "alpha must be >= 0"),
        ({"experiments.alpha.sweep": {"polcy.alpha": [1]}}, "unknown key 'polcy.alpha'"),
    ],
)
def test_bad_preset(repo_copy, changes, message):
    _preset(repo_copy, **changes)
    p = dry(repo_copy, "preset=bad")
    assert p.returncode != 0
    assert message in p.stderr + p.stdout, p.stderr[-2000:]


@pytest.mark.parametrize(
    "filters, cell, how",
    [
        ([], "batch/hf/tiny-llama-3.1/bs3_in256_out32_kv1_sdpa", "no preset has it: add its point to an experiment's sweep"),
        ([], "batch/hf/llama-3.1-8b/bs8_in2048_out256_kv1_sdpa", "it is a cell of preset 'paper': choose it with --config preset=paper"),
        (["frameworks=[h2o]"], "batch/hf/tiny-llama-3.1/bs4_in256_out64_kv1_sdpa",
         "it is a cell of preset 'smoke' without the filters {'frameworks': ['h2o']}: drop them"),
    ],
)
def test_unknown_cell_target_says_what_was_chosen_and_how_to_include_it(repo_copy, filters, cell, how):
    p = snakemake(repo_copy, "-n", "--cores", "1", "--config", "preset=smoke", *filters, "--", f"results/cells/{cell}.json")
    assert p.returncode != 0
    out = p.stderr + p.stdout
    assert f"results/cells/{cell}.json is not a cell of preset 'smoke'" in out and how in out, out[-2000:]
    assert "No rule to produce" not in out


def test_policy_sweep_axis_sets_one_policy_key():
    """`policy.<key>` sweep axes land in the cell's policy, on top of the framework's params."""
    from workflow.lib import celltable

    cells = celltable.build_cells({"preset": "smoke", "runner": "local", "experiments": ["alpha"]},
                                  celltable.load_preset("smoke"))
    policies = sorted((c.policy["alpha"], c.policy["partial_weight_ratio"]) for c in cells.values())
    assert policies == [(0.01, 0.2), (0.1, 0.2), (1, 0.2), (4, 0.2)]
    assert len({c.cell_id for c in cells.values()}) == 4


def test_missing_shipped_checkpoint_is_one_clear_error(repo_copy):
    # the h200 preset's fact retention loads the GPU-trained retriever shipped under results/reference/
    import shutil

    shutil.rmtree(repo_copy / "results/reference/h200-2026-12-02/models", ignore_errors=True)
    p = dry(repo_copy, "preset=h200", "experiments=[fact_retention]")
    assert p.returncode != 0
    assert "no checkpoint there (model.safetensors); it is made on a GPU by benchmarks/gpu_retriever.sh" in p.stderr + p.stdout


@pytest.mark.parametrize("experiments", ["[accuracy]", "[fact_retention]"])
def test_trainer_command_parses_with_or_without_eval_lengths(repo_copy, experiments):
    # accuracy alone evaluates no fact-retention length: the trainer's --eval-lengths is empty, and
    # the command must still parse (it once rendered as a bare `--eval-lengths >log`: exit 2)
    import shlex

    from frameworks.accuracy import train

    p = snakemake(repo_copy, "-n", "-p", "--cores", "1", "--config", "preset=smoke", "runner=local",
                  f"experiments={experiments}")
    assert p.returncode == 0, p.stderr
    line = next(x for x in p.stdout.splitlines() if "frameworks.accuracy.train" in x)
    argv = shlex.split(line.split("frameworks.accuracy.train", 1)[1].split(">", 1)[0])
    lengths = train.eval_lengths(train.parse_args(argv))
    assert (lengths == []) == (experiments == "[accuracy]")


def test_a_figure_about_one_framework_is_planned_only_with_its_cells(repo_copy):
    """engine_decode plots hf's two decode modes: a run without hf cells has none to draw
    (it failed the whole `frameworks=[infinigen]` run before)."""
    with_hf = dry(repo_copy, "preset=smoke", "runner=local", "experiments=[batch]")
    without = dry(repo_copy, "preset=smoke", "runner=local", "experiments=[batch]", "frameworks=[infinigen]")
    assert with_hf.returncode == 0 and without.returncode == 0, (with_hf.stderr + without.stderr)[-2000:]
    assert "results/figures/engine_decode.png" in with_hf.stdout
    assert "engine_decode" not in without.stdout and "results/figures/throughput_vs_batch.png" in without.stdout
