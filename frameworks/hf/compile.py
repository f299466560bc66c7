"""Regional compilation of the graph-mode decode step (the engine's `compile: layers`).

A decode step of an 8B model on a GPU launches ~40 small kernels per decoder layer (RMSNorm as
~8 elementwise kernels, twice; rotary embedding ~10; SiLU x up), each a few microseconds even
inside a CUDA graph: at batch 1 they cost as much as reading the weights. Regional compilation
(PyTorch's recipe for a model of identical blocks: compile the repeated code once, reuse it for
every layer) fuses them with Inductor, about 40 -> 20 kernels per layer; the step is then captured
in the engine's own CUDA graph like the uncompiled one (frameworks/hf/graph.py).

What is compiled, in decode steps only (prefill runs as before): inside every repeated block (the
classes the model names in `_no_split_modules`, e.g. LlamaDecoderLayer), each child module that is
not torch's own (a Linear or LayerNorm is one kernel already) and is not the attention — for Llama
its two RMSNorms and its MLP — and the model family's rotary embedding function
(`apply_rotary_pos_emb`). Each is one class's (one function's) code, compiled once and reused by
every layer (OPT's blocks hold torch modules only: nothing to compile). Not compiled: the attention module, where the KV policy lives (the cache update, the
attention function, H2O's score bookkeeping): it runs exactly as without compilation. (Compiling
the whole layer instead would specialise on the layer index that the cache update reads: one
compilation per layer.)

Compiled code is kept in Inductor's standard on-disk caches (FX graph and AOTAutograd caches,
Triton kernels) under `TORCHINDUCTOR_CACHE_DIR` (the launcher points it at `results/cache/`), so
a later cell of the same model and batch compiles from the cache: what it cost and where the cache
is are in the result's `extra` (`stats`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import torch

from frameworks.harness.spec import COMPILE_MODES  # noqa: F401  (the cell key `compile`: one definition)


def repeated_blocks(model) -> list[torch.nn.Module]:
    """The model's repeated decoder blocks: modules of the classes in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise RuntimeError(f"compile=layers: {type(model).__name__} names no repeated block (_no_split_modules); "
                           "use compile=none")
    return blocks


def cache_dir() -> str:
    """Where Inductor keeps its caches in this process (its own default when the variable is unset)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir
    except ImportError:  # older torch: the variable or Inductor's default under the temp dir
        return os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default")
    return inductor_cache_dir()


_ON = {"decode": False}  # one switch for the process: a family's rotary function is one module global


def _own_module(m: torch.nn.Module) -> bool:
    return not type(m).__module__.startswith("torch.")


class RegionalCompile:
    """Compiles the model's repeated regions for decode steps; `active()` switches them on."""

    def __init__(self, model):
        self.model = model
        self._seconds = 0.0  # host time of the eager (compiling) decode steps, see timed()
        self.regions: list[str] = []
        compiled_code: dict = {}  # one torch.compile per class: the same code object for every layer
        for block in repeated_blocks(model):
            for name, child in block.named_children():
                if "attn" in name or "attention" in type(child).__name__.lower() or not _own_module(child):
                    continue
                if not getattr(child.forward, "_kvstudy_switch", False):  # a model shared by engines: wrapped once
                    child.forward = self._switch(child.forward, torch.compile(child.forward, dynamic=None))
                compiled_code.setdefault(type(child).__name__, name)
            family = sys.modules[type(block).__module__]
            rope = getattr(family, "apply_rotary_pos_emb", None)
            if callable(rope):
                if not getattr(rope, "_kvstudy_switch", False):  # a module global: switched once per family
                    family.apply_rotary_pos_emb = self._switch(rope, torch.compile(rope, dynamic=None))
                compiled_code.setdefault("apply_rotary_pos_emb", "apply_rotary_pos_emb")
        # empty for a family whose blocks are torch modules only (OPT: Linear, LayerNorm, ReLU): then
        # compile=layers runs as none, and the result's extra says so (compiled_regions [])
        self.regions = sorted(compiled_code)

    @staticmethod
    def _switch(plain, compiled):
        def forward(*args, **kwargs):
            return compiled(*args, **kwargs) if _ON["decode"] else plain(*args, **kwargs)

        forward._kvstudy_switch = True
        return forward

    @contextlib.contextmanager
    def active(self):
        _ON["decode"] = True
        try:
            yield
        finally:
            _ON["decode"] = False

    @contextlib.contextmanager
    def timed(self):
        """Around an eager (uncaptured) decode step: where compilation happens."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._seconds += time.perf_counter() - t0

    def stats(self) -> dict:
        from torch._dynamo.utils import counters

        ind = counters["inductor"]
        return {"decode_compile": "layers", "compiled_regions": self.regions, "inductor_cache_dir": cache_dir(),
                "compile_eager_steps_s": self._seconds,  # compilation + those steps' own run
                "compiled_graphs": int(counters["stats"]["unique_graphs"]),
                "fxgraph_cache_hit": int(ind["fxgraph_cache_hit"]), "fxgraph_cache_miss": int(ind["fxgraph_cache_miss"]),
                "aotautograd_cache_hit": int(counters["aot_autograd"]["autograd_cache_hit"]),
                "aotautograd_cache_miss": int(counters["aot_autograd"]["autograd_cache_miss"])}
