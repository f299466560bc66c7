"""One static decode step, captured once and replayed (graph mode of the engine).

The step reads its inputs from buffers it owns (the tokens fed, their positions, the length
mask) and writes its outputs into them (the logits, the greedy tokens, the next step's inputs),
so it can be recorded once and replayed at every later position. On CUDA it is captured with
`torch.cuda.CUDAGraph` (capture="cuda_graph", the default) or left to
`torch.compile(mode="reduce-overhead")` (capture="compile"); the GPU benchmark times both.
Without CUDA the same function runs eagerly each step: the static-shape path the CPU tests
compare with eager mode. With `regions` (frameworks/hf/compile.py, the cell key `compile: layers`)
the step's decoder layers run Inductor-compiled code, compiled in the first eager step(s) and
then captured with the rest of the step in the same CUDA graph.

A capture records the step without running it; the static step runs eagerly `warm_steps` times
first (lazy buffers, kernels and cuBLAS workspaces initialise outside the graph), then it is
captured and replayed, also for every later batch of the same cache. Nothing here reads a device value on the host.
"""

from __future__ import annotations

import contextlib

import torch

CAPTURES = ("cuda_graph", "compile")


class DecodeStep:
    warm_steps = 1  # eager steps before the capture

    def __init__(self, model, cache, batch: int, max_len: int, device: torch.device, mask: bool,
                 capture: str = "cuda_graph", pool=None, stats: dict | None = None, regions=None, fused=None,
                 stream=None):
        if capture not in CAPTURES:
            raise ValueError(f"capture must be one of {CAPTURES}, got {capture!r}")
        self.model, self.cache, self.device = model, cache, device
        self.ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.pos = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.next = torch.zeros((batch,), dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None
        self.arange = torch.arange(max_len, device=device).view(1, 1, 1, max_len)
        self.mask = torch.zeros((batch, 1, 1, max_len), dtype=torch.bool, device=device) if mask else None
        self.cuda = device.type == "cuda"
        # stream: where the step runs, eager, captured and replayed (None: a side stream of its own for
        # the eager steps, torch's private capture stream, replays on the caller's) - e.g. a green
        # context's stream, so that the step's kernels keep to that context's SMs
        self.stream = stream
        self.side = stream if stream is not None else torch.cuda.Stream(device) if self.cuda else None
        self.capture, self.pool = capture, pool
        self.graph: torch.cuda.CUDAGraph | None = None
        self.compiled = None
        self.eager_runs = 0
        self.ready_runs = 0  # eager runs of the static step (the capture comes after warm_steps of them)
        self.regions = regions  # RegionalCompile or None
        self.fused = fused  # FusedProjections or None
        self.stats = stats if stats is not None else {"graphs": 0, "capture_s": 0.0}  # the engine's, over all steps

    def feed(self, tokens: torch.Tensor, position: int) -> None:
        """Before the first decode step of a batch: the prompt's last greedy tokens at `position`."""
        self.ids.copy_(tokens.view(-1, 1))
        self.pos.fill_(position)

    def _step(self) -> None:
        if self.mask is not None:
            torch.le(self.arange, self.pos.view(-1, 1, 1, 1), out=self.mask)  # keys 0..pos are valid
        if self.fused is not None:
            self.fused.check()  # host-side, at eager runs and the capture only (replays run no Python)
        with self.regions.active() if self.regions is not None else contextlib.nullcontext(), \
                self.fused.active() if self.fused is not None else contextlib.nullcontext():
            out = self.model(input_ids=self.ids, position_ids=self.pos, attention_mask=self.mask,
                             past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
        if self.logits is None:
            self.logits = torch.empty_like(logits)  # allocated in the first (eager) run, outside any graph
        self.logits.copy_(logits)
        torch.argmax(logits, dim=-1, out=self.next)
        self.ids.copy_(self.next.view(-1, 1))
        self.pos.add_(1)

    def run(self, ready: bool) -> torch.Tensor:
        """One decode step; returns the buffer of its greedy tokens. `ready`: the policy's state has
        reached fixed shapes, so the step may be captured."""
        if not (self.cuda and ready and self.ready_runs >= self.warm_steps):
            self._eager()
            self.ready_runs += ready
            return self.next
        if self.capture == "compile":
            if self.compiled is None:
                self._mark_static()
                self.compiled = torch.compile(self._step, mode="reduce-overhead", fullgraph=False)
                self.stats["graphs"] += 1  # its capture happens inside the compiled calls: not timed here
            self.compiled()
            return self.next
        if self.graph is None:
            self._capture()
        if self.stream is None:
            self.graph.replay()
        else:  # forked from the caller's stream and joined back, as an eager step
            caller = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(caller)
            with torch.cuda.stream(self.stream):
                self.graph.replay()
            caller.wait_stream(self.stream)
        return self.next

    def _eager(self) -> None:
        with self.regions.timed() if self.regions is not None else contextlib.nullcontext():
            self._eager_step()
        self.eager_runs += 1

    def _eager_step(self) -> None:
        if not self.cuda:
            self._step()
        else:
            s = self.side
            s.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(s):
                self._step()
            torch.cuda.current_stream(self.device).wait_stream(s)

    def _capture(self) -> None:
        import time

        t0 = time.perf_counter()
        g = torch.cuda.CUDAGraph()
        # thread_local: the memory monitor's thread may query the device while this thread captures
        on = {"stream": self.stream} if self.stream is not None else {}
        with torch.cuda.graph(g, pool=self.pool, capture_error_mode="thread_local", **on):
            self._step()
        self.graph = g
        self.stats["graphs"] += 1
        self.stats["capture_s"] += time.perf_counter() - t0

    def _mark_static(self) -> None:
        for t in (self.ids, self.pos, self.next, self.logits, self.mask, self.arange):
            if t is not None:
                torch._dynamo.mark_static_address(t)
