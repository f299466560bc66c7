"""Engine and sampling arguments built for each kind of vLLM cell; checked against vLLM's own
argument classes (EngineArgs, ModelConfig, SchedulerConfig, CacheConfig, SamplingParams) where
vLLM is importable."""

import json
from types import SimpleNamespace

import pytest

from frameworks import models
from frameworks.harness.result import Unsupported
from frameworks.vllm import engine_args as ea
from tests.unit.vllm_helpers import needs_vllm, spec

CELLS = {
    "offline-flash": spec(batch_size=16, prompt_len=2048, gen_len=128),
    "offline-chunked": spec(batch_size=4, prompt_len=32768, gen_len=32, prefill="chunked", chunk_size=2048),
    "offline-long": spec(prompt_len=128000, gen_len=32),
    "rate": spec(batch_size=64, prompt_len=1024, gen_len=128, request_rate=4.0, num_requests=200, burstiness=0.5),
    "fixed-blocks": spec(batch_size=8, policy={"num_gpu_blocks": 4096, "enforce_eager": True, "max_num_seqs": 32}),
    "fixed-bytes": spec(batch_size=8, policy={"kv_cache_memory_bytes": 8 * 2**30, "gpu_memory_utilization": 0.8}),
    "gpt-oss": spec(model="gpt-oss-20b", batch_size=8, prompt_len=4096, gen_len=64),
}


def test_offline_flash_cell():
    kw = ea.engine_kwargs(CELLS["offline-flash"], "/m")
    assert kw["model"] == "/m" and kw["load_format"] == "dummy" and kw["skip_tokenizer_init"]
    assert kw["max_model_len"] == 2048 + 128
    assert kw["max_num_seqs"] == 16
    assert kw["max_num_batched_tokens"] == ea.DEFAULT_TOKEN_BUDGET
    assert kw["enable_prefix_caching"] is False and kw["disable_log_stats"] is False
    assert kw["enforce_eager"] is False and kw["gpu_memory_utilization"] == 0.9
    assert "num_gpu_blocks_override" not in kw and "kv_cache_memory_bytes" not in kw


def test_prefill_modes_set_the_token_budget():
    assert ea.engine_kwargs(CELLS["offline-chunked"], "/m")["max_num_batched_tokens"] == 2048
    # a prompt longer than vLLM's default budget still fits whole in one step
    assert ea.engine_kwargs(CELLS["offline-long"], "/m")["max_num_batched_tokens"] == 128000 + 32


def test_rate_cell_caps_running_sequences_at_the_batch_size():
    kw = ea.engine_kwargs(CELLS["rate"], "/m")
    assert kw["max_num_seqs"] == 64 and kw["max_model_len"] == 1024 + 128


def test_policy_keys_reach_vllm():
    kw = ea.engine_kwargs(CELLS["fixed-blocks"], "/m")
    assert kw["num_gpu_blocks_override"] == 4096 and kw["enforce_eager"] is True and kw["max_num_seqs"] == 32
    kw = ea.engine_kwargs(CELLS["fixed-bytes"], "/m")
    assert kw["kv_cache_memory_bytes"] == 8 * 2**30 and kw["gpu_memory_utilization"] == 0.8


def test_real_weights_are_loaded_not_dummy():
    kw = ea.engine_kwargs(spec(weights="/models/llama"), "/m")
    assert kw["model"] == "/models/llama" and kw["load_format"] == "auto"


def test_sampling_gives_exactly_gen_len_tokens():
    s = ea.sampling_kwargs(37)
    assert s["max_tokens"] == s["min_tokens"] == 37 and s["ignore_eos"] and s["temperature"] == 0.0


@pytest.mark.parametrize("bad, why", [
    (spec(model="gpt-oss-20b", device="cpu"), "AMX"),
    (spec(prompt_len=131072, gen_len=1), "context"),
    (spec(batch_size=64, prefill="chunked", chunk_size=32), "max_num_seqs"),
])
def test_unsupported_cells_say_why(bad, why):
    with pytest.raises(Unsupported, match=why):
        ea.check_supported(bad)


def test_cpu_cells_size_the_kv_cache_to_the_full_cache():
    # CPU: a fixed size, so vLLM never sizes it from a share of the NUMA node (and refuses to start)
    s = spec(model="tiny-llama-3.1", device="cpu", dtype="float32", batch_size=3, prompt_len=200, gen_len=56)
    kw = ea.engine_kwargs(s, "/m")
    cfg = models.config_dict("tiny-llama-3.1")
    # 3 sequences of 256 tokens = 2 blocks of 128 each, + vLLM's null block; K and V, 2 KV heads
    # of 32, fp32, per layer
    assert kw["kv_cache_memory_bytes"] == (3 * 2 + 1) * (2 * 128 * 2 * 32 * 4) * cfg["num_hidden_layers"]
    assert kw["enforce_eager"] is True
    layout = ea.kv_cache_layout(cfg, 7, ea.CPU_BLOCK_SIZE, "float32")
    assert layout["kv_cache_bytes"] == kw["kv_cache_memory_bytes"] and layout["kv_capacity_tokens"] == 3 * 256
    # a hybrid model: whole blocks for each of its groups
    oss = models.config_dict("tiny-gpt-oss")
    b = ea.full_cache_bytes(oss, 2, 256, 128, "float32")
    assert ea.kv_cache_layout(oss, b // ea.kv_cache_layout(oss, 1, 128, "float32")["kv_cache_bytes"], 128,
                              "float32")["kv_capacity_tokens"] == 2 * 256
    # a fixed count of blocks in the policy: exactly those blocks' bytes, never a share of the node
    kw = ea.engine_kwargs(spec(model="tiny-llama-3.1", device="cpu", dtype="float32", policy={"num_gpu_blocks": 9}), "/m")
    assert kw["num_gpu_blocks_override"] == 9
    assert kw["kv_cache_memory_bytes"] == ea.kv_cache_layout(cfg, 9, 128, "float32")["kv_cache_bytes"]


def test_model_dir_holds_the_registry_config(tmp_path):
    d = ea.write_model_dir("gpt-oss-20b", tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg == models.config_dict("gpt-oss-20b")
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    assert [p.name for p in d.iterdir()] == ["config.json"]


def test_kv_layout_uniform_model():
    cfg = models.config_dict("llama-3.1-8b")  # 32 layers, 8 KV heads of 128
    lay = ea.kv_cache_layout(cfg, num_blocks=1000, block_size=16, kv_dtype="bfloat16")
    assert lay["kv_cache_bytes"] == 1000 * (2 * 16 * 8 * 128 * 2) * 32
    assert lay["kv_capacity_tokens"] == 999 * 16 and lay["kv_groups"] == 1  # less vLLM's null block


def test_kv_layout_hybrid_model():
    cfg = models.config_dict("gpt-oss-20b")  # 24 layers: 12 sliding + 12 full, 8 KV heads of 64
    lay = ea.kv_cache_layout(cfg, num_blocks=1000, block_size=16, kv_dtype="bfloat16")
    assert lay["kv_groups"] == 2
    assert lay["kv_cache_bytes"] == 1000 * (2 * 16 * 8 * 64 * 2) * 12
    assert lay["kv_capacity_tokens"] == 999 // 2 * 16


# -- against vLLM's own classes ------------------------------------------------------------------
@needs_vllm
@pytest.mark.parametrize("name", list(CELLS))
def test_engine_args_are_vllm_engine_args(name, tmp_path):
    from vllm import EngineArgs
    from vllm.config import CacheConfig, SchedulerConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    cell = CELLS[name]
    kw = ea.engine_kwargs(cell, ea.write_model_dir(cell.model, tmp_path / "m"))
    args = EngineArgs(**kw)
    AsyncEngineArgs(**kw)
    # the model config vLLM derives from our config.json: length, dtype, quantization
    mc = args.create_model_config()
    assert mc.max_model_len == cell.prompt_len + cell.gen_len
    assert str(mc.dtype) == f"torch.{cell.dtype}"
    # vLLM 0.32.0 names GPT-OSS's MXFP4 method gpt_oss_mxfp4 (0.11.0: mxfp4)
    assert mc.quantization == ("gpt_oss_mxfp4" if cell.model == "gpt-oss-20b" else None)
    assert mc.skip_tokenizer_init
    # scheduler and cache configs validate our values as vLLM would (create_engine_config needs a GPU)
    sc = SchedulerConfig(is_encoder_decoder=False, max_model_len=kw["max_model_len"], max_num_seqs=kw["max_num_seqs"],
                         max_num_batched_tokens=kw["max_num_batched_tokens"],
                         enable_chunked_prefill=kw["enable_chunked_prefill"])
    assert sc.max_num_batched_tokens == ea.token_budget(cell)
    cc = CacheConfig(block_size=16, gpu_memory_utilization=kw["gpu_memory_utilization"],
                     enable_prefix_caching=kw["enable_prefix_caching"],
                     num_gpu_blocks_override=kw.get("num_gpu_blocks_override"),
                     kv_cache_memory_bytes=kw.get("kv_cache_memory_bytes"))
    assert cc.enable_prefix_caching is False


@needs_vllm
def test_sampling_params_are_vllm_sampling_params():
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    sp = SamplingParams(**ea.sampling_kwargs(64), output_kind=RequestOutputKind.DELTA)
    assert (sp.max_tokens, sp.min_tokens, sp.ignore_eos, sp.detokenize) == (64, 64, True, False)
    assert sp.output_kind == RequestOutputKind.DELTA and sp.n == 1


def _vllm_kv_cache(model: str, tmp_path, **cell):
    """What vLLM 0.32.0's engine core allocates for a cell (EngineCore._initialize_kv_caches, on
    this host's platform): its own VllmConfig from our engine arguments, each layer's KV spec from
    its Attention layer (heads, head size, dtype and window as its ModelConfig derives them; the
    CPU attention backend here), the layout resolved, the pool sized from our kv_cache_memory_bytes."""
    from vllm import EngineArgs
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.attention.backends.utils import resolve_kv_cache_layout
    from vllm.v1.core import kv_cache_utils as ku

    c = spec(model=model, device="cpu", dtype="bfloat16", prompt_len=1024, gen_len=32, **cell)
    kw = ea.engine_kwargs(c, ea.write_model_dir(model, tmp_path / "m"))
    vc = EngineArgs(**kw).create_engine_config()
    mc = vc.model_config
    heads, head_size = mc.get_num_kv_heads(vc.parallel_config), mc.get_head_size()
    kinds = ea.attention_types(models.config_dict(model))
    assert len(kinds) == mc.get_num_layers(vc.parallel_config)
    if model.startswith("gpt-oss"):  # vLLM's gpt_oss.py: sliding window on the even layers
        assert kinds == ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(len(kinds))]

    def layer_spec(kind):
        layer = SimpleNamespace(attn_type=AttentionType.DECODER, kv_cache_dtype=vc.cache_config.cache_dtype,
                                sliding_window=mc.hf_config.sliding_window if kind == "sliding_attention" else None,
                                attn_backend=CPUAttentionBackend, num_kv_heads=heads, head_size=head_size,
                                head_size_v=head_size, kv_cache_torch_dtype=mc.dtype)
        return Attention.get_kv_cache_spec(layer, vc)

    specs = {f"model.layers.{i}.self_attn.attn": layer_spec(k) for i, k in enumerate(kinds)}
    resolve_kv_cache_layout(vc, [[x.name for x in CPUAttentionBackend.supported_kv_cache_layouts()]], specs.values())
    # a CPU worker reports kv_cache_memory_bytes as its available memory (our CPU cells always set it)
    (kv,) = ku.get_kv_cache_configs(vc, [specs], [kw["kv_cache_memory_bytes"]])
    return c, kw, vc, kv


@needs_vllm
@pytest.mark.parametrize("model", ["llama-3.1-8b", "gpt-oss-20b", "opt-6.7b"])
def test_kv_layout_matches_vllms_own_allocation(model, tmp_path):
    """Our bytes, groups and capacity for a fixed block count equal what vLLM allocates for it."""
    from vllm.v1.core.block_pool import BlockPool

    _, kw, vc, kv = _vllm_kv_cache(model, tmp_path, policy={"num_gpu_blocks": 1234})
    block = vc.cache_config.block_size
    ours = ea.kv_cache_layout(models.config_dict(model), 1234, block, "bfloat16")
    assert kv.num_blocks == 1234
    # one backing allocation (vllm/v1/worker/utils.py allocate_kv_cache), every layer in it
    assert {t.size for t in kv.kv_cache_tensors} == {ours["kv_cache_bytes"]} == {kw["kv_cache_memory_bytes"]}
    assert sorted(n for t in kv.kv_cache_tensors for n in t.layers) == sorted(n for g in kv.kv_cache_groups
                                                                               for n in g.layer_names)
    assert ours["kv_groups"] == len(kv.kv_cache_groups) == (2 if model.startswith("gpt-oss") else 1)
    # the blocks the scheduler can hand out: the pool less its null block, shared by the groups
    free = BlockPool(kv.num_blocks, enable_caching=False, hash_block_size=block).get_num_free_blocks()
    assert ours["kv_capacity_tokens"] == free // len(kv.kv_cache_groups) * block


@needs_vllm
@pytest.mark.parametrize("model", ["llama-3.1-8b", "gpt-oss-20b", "opt-6.7b"])
def test_cpu_kv_cache_admits_exactly_the_batch_at_full_length(model, tmp_path):
    """The full-cache size of a CPU cell (engine_kwargs) is exactly what vLLM's own KV cache
    manager needs to hold max_num_seqs requests of max_model_len tokens at once: one more does
    not fit and no block is left over (the capacity the transformers engines allocate)."""
    from vllm import SamplingParams
    from vllm.v1.core import kv_cache_utils as ku
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.request import Request

    c, kw, vc, kv = _vllm_kv_cache(model, tmp_path, batch_size=3)
    block, n = vc.cache_config.block_size, kw["max_model_len"]
    mgr = KVCacheManager(ku.generate_scheduler_kv_cache_config([kv]), max_model_len=n, scheduler_block_size=block,
                         hash_block_size=block, max_in_flight_tokens=vc.max_in_flight_tokens, enable_caching=False)
    sp = SamplingParams(**ea.sampling_kwargs(c.gen_len))
    seqs = kw["max_num_seqs"]
    fits = [mgr.allocate_slots(Request(f"r{i}", list(range(n)), sp, None), n) is not None for i in range(seqs + 1)]
    assert fits == [True] * seqs + [False]
    assert mgr.block_pool.get_num_free_blocks() == 0
