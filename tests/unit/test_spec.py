"""Cell ids and spec validation."""

import math

import pytest

from frameworks.harness.spec import CellSpec, SpecError


def spec(**kw):
    base = dict(experiment="batch", framework="hf", model="tiny-llama-3.1", device="cpu", dtype="float32")
    return CellSpec.from_dict({**base, **kw})


def test_cell_id_readable_and_stable():
    s = spec(batch_size=8, prompt_len=2048, gen_len=256)
    assert s.cell_id == "bs8_in2048_out256_kv1_sdpa"
    assert s.rel_path == "results/cells/batch/hf/tiny-llama-3.1/bs8_in2048_out256_kv1_sdpa.json"
    assert spec(batch_size=8, prompt_len=2048, gen_len=256).cell_id == s.cell_id


def test_cell_id_names_every_varying_axis():
    s = CellSpec.from_dict(dict(experiment="kv_budget", framework="infinigen", model="tiny-llama-3.1", kv_budget=0.2,
                                prefill="chunked", chunk_size=512, policy={"alpha": 4}, seed=3, device="cpu"))
    assert s.cell_id == "bs1_in512_out32_kv0.2_chunked512_alpha4_seed3"
    r = spec(request_rate=math.inf, num_requests=16, batch_size=4)
    assert r.cell_id == "bs4_in512_out32_kv1_sdpa_rateinf-n16"
    assert spec(request_rate=0.5, num_requests=16).cell_id.endswith("rate0.5-n16")


def test_json_round_trip_with_infinite_rate():
    s = spec(request_rate=math.inf, num_requests=4)
    assert '"inf"' in s.to_json()  # strict JSON: no Infinity literal
    assert CellSpec.from_json(s.to_json()) == s


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(kv_budget=0.0), "kv_budget must be in"),
        (dict(kv_budget=1.5), "kv_budget must be in"),
        (dict(framework="h2o", prefill="sdpa"), "supports prefill"),
        (dict(kv_budget=0.5), "keeps the full KV cache"),
        (dict(batch_size=0), "batch_size must be an integer >= 1"),
        (dict(prompt_len="long"), "prompt_len must be an integer"),
        (dict(framework="nope"), "unknown framework 'nope'"),
        (dict(policy={"alpha": 1}), "unknown policy key"),
        (dict(request_rate=2.0), "num_requests >= 1"),
        (dict(device="tpu"), "device must be one of"),
    ],
)
def test_invalid_specs_name_the_problem(kw, msg):
    with pytest.raises(SpecError, match=msg):
        spec(**kw)


def test_unknown_key():
    with pytest.raises(SpecError, match="unknown cell parameter"):
        spec(batchsize=3)


def test_context_limit_counts_fed_tokens_only():
    s = spec(prompt_len=100, gen_len=1)
    s.validate(max_context=100)  # the single generated token is never fed back
    with pytest.raises(SpecError, match="exceeds the model's context of 100"):
        spec(prompt_len=100, gen_len=2).validate(max_context=100)
