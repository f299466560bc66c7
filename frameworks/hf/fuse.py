"""Fused projections of the graph-mode decode step (the engine's `fuse: on`, the default in graph mode).

A decode step at batch 1-64 multiplies a few rows by every weight matrix: each projection is a
thin GEMM whose speed is its weight read. Llama's attention reads q, k and v from three matrices
(4096, 1024 and 1024 rows for the 8B model) and its MLP gate and up from two (14 336 rows each):
five GEMMs per layer where two do (one of 6144 rows, one of 28 672), fewer kernels and wider
ones (the 1024-row k and v GEMMs leave most SMs idle at small M). The concatenated weights are
built once per model, and each original weight becomes a view into them (no second copy of any
weight: the model's memory and its parameters are unchanged, eager code still runs on them).

Only decode steps of graph mode use them (`active()` around DecodeStep._step); prefill and eager
decode (transformers as-is) run the modules as before. What is fused, per repeated block
(frameworks/hf/compile.py's `repeated_blocks`):
- attention: children `q_proj`, `k_proj`, `v_proj` (Linear, same input size, all or none with
  bias). The attention module calls them one after the other on the same hidden states: the
  first call runs the one GEMM and the others take their slice of its output (an identity check
  on the input: any other input runs the plain module).
- MLP: a child with `gate_proj`, `up_proj`, `down_proj` and `act_fn` (Llama, Mistral, Qwen2):
  its forward becomes down(act(gate) * up) from one GEMM; under `compile: layers` this forward is
  what Inductor compiles (installed before RegionalCompile wraps it).
Families without these children are left alone (OPT's fc1 / fc2 MLP: its q/k/v are fused).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

FUSE_MODES = ("on", "off")
_ON = {"decode": False}


def _linear(m) -> bool:
    return isinstance(m, torch.nn.Linear)


def _concat(mods: list[torch.nn.Linear]):
    """One weight (and bias) for `mods`; each module's weight (bias) becomes a view of it."""
    with torch.no_grad():
        w = torch.cat([m.weight for m in mods])
        b = torch.cat([m.bias for m in mods]) if mods[0].bias is not None else None
        o = 0
        for m in mods:
            n = m.out_features
            m.weight = torch.nn.Parameter(w[o:o + n], requires_grad=m.weight.requires_grad)
            if b is not None:
                m.bias = torch.nn.Parameter(b[o:o + n], requires_grad=m.bias.requires_grad)
            o += n
    return w, b


def _intact(mods, w) -> bool:
    """The modules' weights are still the views of `w` (nobody replaced a parameter since)."""
    o = 0
    for m in mods:
        if m.weight.data_ptr() != w.data_ptr() + o * w.stride(0) * w.element_size():
            return False
        o += m.out_features
    return True


class _QKV:
    def __init__(self, mods):
        self.mods = mods
        self.sizes = [m.out_features for m in mods]
        self.w, self.b = _concat(mods)
        self.x = self.parts = None
        self.left = 0
        for i, m in enumerate(mods):
            m.forward = self._forward(i, m)

    def _forward(self, i, m):
        own = m.__dict__.get("forward")  # an instance's own forward set before, else its class's (looked up per call)

        def forward(x):
            if not _ON["decode"]:
                return own(x) if own is not None else type(m).forward(m, x)
            if self.x is not x or self.left == 0:
                self.x, self.left = x, len(self.mods)
                self.parts = F.linear(x, self.w, self.b).split(self.sizes, -1)
            self.left -= 1
            out = self.parts[i]
            if self.left == 0:
                self.x = self.parts = None  # hold no activation past the step
            return out

        return forward


def _gated_mlp(mlp):
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    w, b = _concat([gate, up])
    n = gate.out_features
    plain = mlp.forward

    def forward(x):
        if not _ON["decode"]:
            return plain(x)
        g, u = F.linear(x, w, b).split([n, n], -1)
        return down(mlp.act_fn(g) * u)

    mlp.forward = forward
    return [gate, up], w


class FusedProjections:
    """Fuses the model's q/k/v and gate/up projections once (idempotent); `active()` uses them."""

    def __init__(self, model):
        from frameworks.hf.compile import repeated_blocks

        state = getattr(model, "_kvstudy_fused", None)
        if state is None:  # a model shared by engines: fused once
            state = {"groups": [], "fused": set()}
            for block in repeated_blocks(model):
                for name, child in block.named_children():
                    qkv = [getattr(child, p, None) for p in ("q_proj", "k_proj", "v_proj")]
                    if all(_linear(m) for m in qkv) and len({m.in_features for m in qkv}) == 1 \
                            and len({m.bias is None for m in qkv}) == 1:
                        f = _QKV(qkv)
                        state["groups"].append((f.mods, f.w))
                        state["fused"].add("qkv")
                    gu = [getattr(child, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
                    if all(_linear(m) for m in gu) and callable(getattr(child, "act_fn", None)) \
                            and gu[0].out_features == gu[1].out_features and (gu[0].bias is None) == (gu[1].bias is None):
                        state["groups"].append(_gated_mlp(child))
                        state["fused"].add("gate_up")
            model._kvstudy_fused = state
        self.state = state
        self.fused = sorted(state["fused"])  # empty: nothing of this family fits (runs as off)

    def check(self) -> None:
        for mods, w in self.state["groups"]:
            if not _intact(mods, w):
                raise RuntimeError("fuse=on: a projection's weight was replaced after the fusion; the fused "
                                   "weight would be stale (fuse the model after every change of its weights)")

    @contextlib.contextmanager
    def active(self):
        _ON["decode"] = True
        try:
            yield
        finally:
            _ON["decode"] = False
