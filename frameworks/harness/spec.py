"""The cell spec: one point of one experiment, and its stable, readable id."""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import asdict, dataclass, field, fields

from frameworks import registry

DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
OPTIONAL = ("task", "num_examples")
ACCURACY_EXPERIMENTS = ("accuracy", "fact_retention")
RETENTION_TASKS = ("facts-tokens", "facts-chat")
COMPILE_MODES = ("none", "layers")  # frameworks/hf/compile.py (torch-free copy: the host validates)


class SpecError(ValueError):
    """A cell that cannot run as specified (bad key, bad value, impossible combination)."""


@dataclass(frozen=True)
class CellSpec:
    experiment: str
    framework: str
    model: str
    batch_size: int = 1  # offline: the batch; request-rate cells: the largest batch
    prompt_len: int = 512  # exact prompt tokens per request
    gen_len: int = 32  # exact generated tokens per request
    # in (0, 1], 1.0 = the full cache; its meaning is the policy's (one per framework):
    #   h2o        the fraction of the PROMPT whose KV stays on the GPU (heavy + recent tokens;
    #              the paper's "20%" is heavy 0.1 + recent 0.1), fixed through decode
    #   infinigen  the fraction of the SEQUENCE fetched from CPU memory per step and speculated
    #              layer: a cap of kv_budget x (prompt_len + gen_len) tokens (upstream's max_num_kv),
    #              or x the current length (policy budget_rule=current); the whole KV lives on the host
    #   hf, vllm   always 1.0
    kv_budget: float = 1.0
    prefill: str = "sdpa"  # eager | sdpa | flash | chunked
    chunk_size: int = 2048  # tokens per prefill chunk (prefill=chunked)
    decode: str | None = None  # graph | eager (None: the framework's default, its decode_modes[0])
    # the engine's graph-mode step: none | layers (Inductor-compiled decoder layers, frameworks/hf/compile.py);
    # None: the default, layers for an engine framework's graph decode on CUDA, none otherwise
    compile: str | None = None
    request_rate: float | None = None  # req/s (inf: all at once); None: one offline batch
    num_requests: int | None = None  # request-rate cells only
    burstiness: float = 1.0  # gamma shape of inter-arrival times (1.0 = Poisson)
    policy: dict = field(default_factory=dict)  # framework-specific knobs
    repetitions: int = 1
    warmup: int = 1
    seed: int = 0
    device: str = "cuda"
    dtype: str = "bfloat16"
    weights: str = "random"  # random | local path | hub id
    timeout_s: float = 3600.0
    # GPU memory the cell may use, GB (1e9 bytes); None: the whole card. A run condition of the
    # preset (config key gpu_memory_gb), not a sweep axis: on a larger card it brings back the
    # out-of-memory boundaries of the paper's smaller one (frameworks/harness/memory.py)
    gpu_memory_gb: float | None = None

    # accuracy cells (frameworks/accuracy): the task (an lm-eval task name, kvstudy_recall,
    # facts-tokens, facts-chat) and how many documents / trials (None: all of the task)
    task: str | None = None
    num_examples: int | None = None

    def __post_init__(self):
        if self.decode is None:  # resolved here, so a spec's dict and JSON always name the mode
            fw = registry.FRAMEWORKS.get(self.framework)
            object.__setattr__(self, "decode", fw.decode_modes[0] if fw else "graph")
        if self.compile is None:
            object.__setattr__(self, "compile", self.default_compile)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> CellSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SpecError(f"unknown cell parameter(s) {unknown}; known: {sorted(known)}")
        if d.get("request_rate") == "inf":  # strict JSON has no infinity
            d = {**d, "request_rate": math.inf}
        spec = cls(**d)
        spec.validate()
        return spec

    @classmethod
    def from_json(cls, text: str) -> CellSpec:
        return cls.from_dict(json.loads(text))

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in OPTIONAL:  # absent when unset: the other cells' specs (and so their jobs) do not change
            if d[k] is None:
                del d[k]
        if d["request_rate"] is not None and math.isinf(d["request_rate"]):
            d["request_rate"] = "inf"
        if d["gpu_memory_gb"] is None:  # uncapped: the spec (and so the cell's params) as before caps existed
            del d["gpu_memory_gb"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    # -- derived ------------------------------------------------------------------------
    @property
    def default_compile(self) -> str:
        """layers where it pays (the engine's captured step on a GPU); none on the CPU, where
        compiling a tiny model costs more than it saves, and for what has no such step."""
        fw = registry.FRAMEWORKS.get(self.framework)
        on_engine = fw is not None and fw.on_engine
        return "layers" if on_engine and self.decode == "graph" and self.device == "cuda" else "none"

    @property
    def is_rate_cell(self) -> bool:
        return self.request_rate is not None

    @property
    def n_requests(self) -> int:
        return self.num_requests if self.is_rate_cell else self.batch_size

    @property
    def cell_id(self) -> str:
        """Readable and stable: every axis that can vary, in a fixed order."""
        parts = [
            f"bs{self.batch_size}",
            f"in{self.prompt_len}",
            f"out{self.gen_len}",
            f"kv{_fmt(self.kv_budget)}",
            self.prefill + (str(self.chunk_size) if self.prefill == "chunked" else ""),
        ]
        fw = registry.FRAMEWORKS.get(self.framework)
        if fw is None or self.decode != fw.decode_modes[0]:  # the default mode keeps the ids as they were
            parts.append(f"dec{self.decode}")
        if self.compile != self.default_compile:
            parts.append(f"comp{self.compile}")
        if self.is_rate_cell:
            parts.append(f"rate{_fmt(self.request_rate)}-n{self.num_requests}")
            if self.burstiness != 1.0:
                parts.append(f"burst{_fmt(self.burstiness)}")
        parts += [f"{k}{_fmt(v)}" for k, v in sorted(self.policy.items())]
        if self.task is not None:
            parts.append(f"task-{self.task}" + (f"-n{self.num_examples}" if self.num_examples else ""))
        if self.seed:
            parts.append(f"seed{self.seed}")
        return "_".join(parts)

    @property
    def rel_path(self) -> str:
        return f"results/cells/{self.experiment}/{self.framework}/{self.model}/{self.cell_id}.json"

    # -- validation ---------------------------------------------------------------------
    def validate(self, max_context: int | None = None) -> None:
        """Raise SpecError naming the problem. max_context: the model's, when known."""
        fw = _check(lambda: registry.get(self.framework))
        where = f"cell {self.experiment}/{self.framework}/{self.model}/{self.cell_id}"

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise SpecError(f"{where}: {msg}")

        for name in ("batch_size", "prompt_len", "gen_len", "chunk_size", "repetitions"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be an integer >= 1, got {v!r}")
        need(isinstance(self.warmup, int) and self.warmup >= 0, f"warmup must be an integer >= 0, got {self.warmup!r}")
        need(isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        need(
            isinstance(self.kv_budget, (int, float)) and 0 < self.kv_budget <= 1,
            f"kv_budget must be in (0, 1], got {self.kv_budget!r}",
        )
        need(self.prefill in registry.PREFILL_MODES, f"prefill must be one of {registry.PREFILL_MODES}, got {self.prefill!r}")
        need(self.prefill in fw.prefill_modes, f"framework {fw.name} supports prefill {fw.prefill_modes}, not {self.prefill!r}")
        need(self.decode in fw.decode_modes, f"framework {fw.name} supports decode {fw.decode_modes}, not {self.decode!r}")
        need(self.compile in COMPILE_MODES, f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        need(self.compile == "none" or (fw.on_engine and self.decode == "graph"),
             f"compile={self.compile} compiles the transformers engine's graph-mode decode step: it needs decode graph "
             f"on an engine framework, not {fw.name} with decode {self.decode}")
        need(not fw.full_cache_only or self.kv_budget == 1.0, f"framework {fw.name} keeps the full KV cache: kv_budget must be 1.0")
        unknown = sorted(set(self.policy) - fw.policy_keys)
        need(not unknown, f"unknown policy key(s) {unknown} for {fw.name}; allowed: {sorted(fw.policy_keys)}")
        if fw.policy_check:
            module, func = fw.policy_check.split(":")
            try:
                getattr(importlib.import_module(module), func)(self)
            except ValueError as e:
                need(False, str(e))
        need(self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}")
        need(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        need(not (fw.on_engine and self.prefill == "flash" and self.device == "cuda" and self.dtype == "float32"),
             f"prefill=flash on CUDA needs dtype bfloat16 or float16 ({fw.name} runs torch's flash-attention kernel, "
             "which has no float32 version); use prefill=sdpa for float32")
        need(self.timeout_s > 0, f"timeout_s must be > 0, got {self.timeout_s!r}")
        if self.gpu_memory_gb is not None:
            need(isinstance(self.gpu_memory_gb, (int, float)) and not isinstance(self.gpu_memory_gb, bool)
                 and self.gpu_memory_gb > 0, f"gpu_memory_gb must be a number > 0 (GB) or null, got {self.gpu_memory_gb!r}")
            need(self.device == "cuda", "gpu_memory_gb caps GPU memory: it applies to device cuda only")
        if self.is_rate_cell:
            need(self.request_rate > 0, f"request_rate must be > 0 (or inf), got {self.request_rate!r}")
            need(isinstance(self.num_requests, int) and self.num_requests >= 1, "request-rate cells need num_requests >= 1")
            need(self.burstiness > 0, f"burstiness must be > 0, got {self.burstiness!r}")
        else:
            need(self.num_requests in (None, self.batch_size), "num_requests applies to request-rate cells only")
        if self.experiment in ACCURACY_EXPERIMENTS:
            need(isinstance(self.task, str) and bool(self.task), f"experiment {self.experiment} needs a task")
            if self.experiment == "fact_retention":
                need(self.task in RETENTION_TASKS, f"fact_retention task must be one of {RETENTION_TASKS}, got {self.task!r}")
        else:
            need(self.task is None and self.num_examples is None,
                 f"task and num_examples apply to the experiments {ACCURACY_EXPERIMENTS} only")
        need(self.num_examples is None or (isinstance(self.num_examples, int) and self.num_examples >= 1),
             f"num_examples must be an integer >= 1, got {self.num_examples!r}")
        need(self.task is None or (isinstance(self.task, str) and all(ch.isalnum() or ch in "_-." for ch in self.task)),
             f"task must be a name of letters, digits, '_', '-', '.', got {self.task!r}")
        if max_context is not None:
            # the last generated token is never fed back, so it needs no position
            need(
                self.prompt_len + self.gen_len - 1 <= max_context,
                f"prompt_len {self.prompt_len} + gen_len {self.gen_len} exceeds the model's context of {max_context} tokens",
            )


def _check(fn):
    try:
        return fn()
    except ValueError as e:
        raise SpecError(str(e)) from None


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return str(int(v)) if v.is_integer() and abs(v) >= 1 else f"{v:g}"
    return str(v)
