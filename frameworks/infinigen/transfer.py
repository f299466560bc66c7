"""Moving KV rows between the host store and the device without stalling the compute stream or the host.

CUDA, per speculated layer j (launched from layer j-1's forward pre-hook, main thread, nothing
waits on the host):
  1. an event on the compute stream marks layer j-1's input ready; the side stream waits on it
     (stream.wait_event: no device-wide synchronisation), then computes the speculated scores
     and the selection — a fixed number `cap` (the KV budget) of token indices per sequence and
     kv head, of which the first k (a device scalar) count, see select.py;
  2. still on the side stream (after layer j's last append, an event), the gather copies the
     selected rows from the host store's device alias (store.device_view: unified virtual
     addressing, the kernel reads host memory over PCIe) straight into the layer's device
     buffer, then an event. `triton` (default on CUDA, kernels.py): only the first k rows are
     read, the padding is written as zeros; `index_select`: all `cap` rows, the padding being
     copies of the top row (the CPU path, and an ablation on CUDA);
  3. layer j's cache update makes the compute stream wait on that event; layer j-1's attention
     and MLP run meanwhile.
Full layers (the whole prefix, contiguous) are one cudaMemcpyAsync on a second side stream, so a
next-step prefetch never delays a speculation. Both side streams wait on the same "input ready"
event before writing a device buffer: that is after the buffer's previous reader (stream order).
Decode appends (the new token's K/V, device -> host) run on a third stream: the compute stream
never waits for a device -> host copy, whose latency grows while the gathers keep PCIe busy;
every reader of a layer's host rows (gather, full copy) waits on that layer's append event
instead. Prefill appends stay on the compute stream (see append).
Graph decode (cache.py): the same streams inside one captured step, forked from the compute
stream by events and joined back at its end (join); appends are written on the compute stream
through the store's device alias at a device-side position (append_at), full layers fetched by
the Triton gather of a device-side row count (launch_full_static), no timing events.
Streams (set_streams, the GPU benchmark's variants): `split` (the default: the gather on a stream
of its own after the speculation's event, so the next speculation no longer queues behind a
gather; on the H200 0.74x the `side` step at batch 8, 0.95x at 32), `side` (speculation and gather
on one side stream, as above), `serial` (all on the compute stream: no overlap, the baseline); the
side streams may come from a CUDA green context (SMs of their own; slower on the H200).
CPU device: the same code without streams, index_select on the host store itself, so every step
but the zero-copy alias is exercised by the CPU tests (the Triton kernel runs there under
Triton's interpreter).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from frameworks.infinigen import kernels, select


@dataclass
class Fetched:
    keys: torch.Tensor  # [B, Hkv, n, d] on the compute device
    values: torch.Tensor
    ready: object  # CUDA event after the copy/gather, or None
    tokens: int  # n: rows per (sequence, kv head) handed to attention (static: cap for a speculated layer)
    nbytes: int | None  # bytes moved host -> device (None: k rows a lane, known on the device only)
    bias: torch.Tensor | None = None  # [n] float32 added to the logits: 0 for the selected rows, -inf for padding
    idx: torch.Tensor | None = None  # [B, Hkv, n] token of each row (padded for index_select), speculated layers only
    k: torch.Tensor | None = None  # 0-d device: how many of the n rows are selected

    def wait(self) -> Fetched:
        """Make the current (compute) stream wait for the transfer: no host synchronisation."""
        if self.ready is not None:
            torch.cuda.current_stream().wait_event(self.ready)
        return self


def gather(src_rows: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[i] = src_rows[rows[i]]: one index_select. CUDA: src_rows is the host store's device
    alias and `rows` a device tensor, so the kernel pulls just those rows over PCIe; CPU: a
    host gather. `out` is contiguous with rows.numel() rows."""
    return torch.index_select(src_rows, 0, rows, out=out)


# the stream layout of every InfiniGen cell on CUDA: `split` won beside `side` (the earlier default)
# and `serial` on the H200 (results/reference/h200-2026-12-02/infinigen-overlap-a4dbfbb/)
STREAMS_DEFAULT = "split"


class Transfer:
    """One per policy: the side streams and the measurements."""

    GATHERS = ("triton", "index_select")

    def __init__(self, device: torch.device, fetch: bool = True, timed: bool = True, gather: str | None = None):
        self.device = device
        self.cuda = device.type == "cuda"
        self.fetch = fetch  # False: select but move nothing (the overlap benchmark's baseline)
        self.timed = timed and self.cuda  # CUDA timing events around each transfer (device time)
        if gather is None:
            gather = "triton" if self.cuda and kernels.available() else "index_select"
        if gather not in self.GATHERS:
            raise ValueError(f"unknown gather {gather!r}: one of {', '.join(self.GATHERS)}")
        if gather == "triton" and not kernels.available():
            raise RuntimeError("gather='triton' needs the triton package (CUDA builds of torch bring it)")
        self.gather = gather
        self.gather_programs = kernels.PROGRAMS  # the Triton gather's grid (None: a program per block of rows)
        self.gather_shape: dict = {}  # the Triton gather's block_rows / num_warps / stages (benchmarks), else defaults
        # graph decode's full-layer prefetch (launch_full_static): "memcpy" (one copy-engine copy),
        # "chunked" (the same copy in pieces, one after each later layer's gather) | "gather" (Triton)
        self.full_copy = "memcpy"
        self.streams = STREAMS_DEFAULT
        self.spec_stream = self.gather_stream = self.copy_stream = self.append_stream = None
        if self.cuda:
            self.set_streams(STREAMS_DEFAULT)
        self.appended: dict[int, object] = {}  # layer -> CUDA event after its last append
        self._zero = torch.zeros((), dtype=torch.float32, device=device)
        self._ninf = torch.full((), float("-inf"), dtype=torch.float32, device=device)
        self.reset_stats()

    def reset_stats(self) -> None:
        # host counters, added to by Python at eager steps only. Nothing a captured step needs for its
        # accounting may live here: a replayed step runs no Python, so whatever reset_stats clears and
        # only a launch sets again stays cleared for a measured batch replayed after the reset (the
        # bytes of the Triton gather once read 0 that way: the batch and row size were such stats)
        self.stats = {"full_tokens": 0, "bytes": 0, "gather_bytes": 0, "gather_s": 0.0, "sparse_fetches": 0,
                      "steps": 0}
        if hasattr(self, "_k_sum"):  # zeroed in place: a captured decode step adds to these very tensors
            self._k_sum.zero_()
            self._kb_sum.zero_()
            self.counts.zero_()
        else:
            self._k_sum = torch.zeros((), dtype=torch.long, device=self.device)  # selected rows per (seq, head), summed
            # selected rows x sequences, summed: the selected tokens (one token of a sequence, all kv
            # heads), so bytes = this x a token's bytes whatever batch each fetch had
            self._kb_sum = torch.zeros((), dtype=torch.long, device=self.device)
            # graph decode's counters, kept on the device (replayed steps run no Python): decode steps,
            # full-layer tokens used (x sequences), speculated fetches
            self.counts = torch.zeros(3, dtype=torch.long, device=self.device)
        self._forked: list = []  # side streams that joined the compute stream's work since the last join()
        self._timed: list[tuple[object, object, object, bool]] = []  # start, end, bytes, speculated layer

    # -- stream helpers -----------------------------------------------------------------
    STREAMS = ("side", "split", "serial")

    def set_streams(self, mode: str = STREAMS_DEFAULT, priority: int = 0, make_stream=None,
                    make_spec_stream=None) -> None:
        """Where the transfers run (CUDA; the GPU benchmark's variants, measured beside the default):
        `side`: speculation and its gather on one side stream, full layers on another;
        `split` (the default): the gather on a stream of its own, waiting on the speculation's event only, so the
        next layer's speculation (hidden by the compute) no longer queues behind this layer's
        gather, and the gathers follow each other on PCIe with no speculation between them;
        `serial`: everything on the compute stream, no overlap at all (the baseline).
        priority: of the speculation stream (< 0: higher). make_stream(): a new side stream
        (e.g. a green context's Stream(), so the side work runs on SMs of its own); make_spec_stream():
        the speculation's stream, if not make_stream's (e.g. on the step's SMs, the gather's on its own)."""
        if mode not in self.STREAMS:
            raise ValueError(f"unknown streams {mode!r}: one of {', '.join(self.STREAMS)}")
        if not self.cuda:
            return
        self.streams = mode
        new = make_stream or (lambda prio=0: torch.cuda.Stream(self.device, priority=prio))
        if mode == "serial":
            self.spec_stream = self.gather_stream = self.copy_stream = None
        else:
            make_spec = make_spec_stream or make_stream
            self.spec_stream = make_spec() if make_spec is not None else new(priority)
            self.gather_stream = self.spec_stream if mode == "side" else new()
            self.copy_stream = new()
        self.append_stream = new()  # eager decode's appends (device -> host): never on the compute stream

    def follow_compute(self, *tensors: torch.Tensor):
        """An event after what the compute stream enqueued so far; the side stream waits on it,
        and tensors it reads that were made on the compute stream stay allocated until it is
        done with them (record_stream). None on CPU and with streams `serial` (stream order)."""
        if not self.cuda or self.spec_stream is None:
            return None
        ready = torch.cuda.Event()
        ready.record()
        self.spec_stream.wait_event(ready)
        self._fork(self.spec_stream)
        for t in tensors:
            t.record_stream(self.spec_stream)
        return ready

    def _fork(self, stream) -> None:
        if stream not in self._forked:
            self._forked.append(stream)

    def join(self) -> None:
        """The compute stream waits for every side stream that followed it since the last join: the
        end of a graph-mode decode step (a captured graph must end where it began, on the capture
        stream: its side-stream branches join it again; waiting on a stream that never forked from
        the capture would wait on work outside the graph, which capture forbids)."""
        if self.cuda:
            current = torch.cuda.current_stream()
            for stream in self._forked:
                current.wait_stream(stream)
        self._forked = []

    def append(self, store, layer: int, start: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """New tokens' K/V [B, Hkv, n, d] (device) -> host store tokens start..start+n. CUDA: packed
        on the compute stream, copied on the append stream; readers wait on `appended[layer]`."""
        kv = store.pack(key, value)
        if not self.cuda or kv.shape[0] > 1:
            # prefill stays on the compute stream: a packed chunk of many MB handed to another
            # stream (record_stream) cannot be reused until that stream's copy is done, and the
            # caching allocator then splits the large free blocks that eager prefill needs next
            # (seen on the H100: eager OOM at 12288 instead of 16384 tokens, 18 GiB reserved but
            # unallocated). Readers on other streams wait on a later compute-stream event anyway.
            store.write(layer, start, kv)
            self.appended.pop(layer, None)
            return
        ready = torch.cuda.Event()
        ready.record()
        self.append_stream.wait_event(ready)
        kv.record_stream(self.append_stream)
        with torch.cuda.stream(self.append_stream):
            store.write(layer, start, kv)
            done = torch.cuda.Event()
            done.record()
        self.appended[layer] = done

    def after_appends(self, layer: int, stream=None) -> None:
        """Make `stream` (default: the current one) wait until the layer's host rows are written."""
        done = self.appended.get(layer) if self.cuda else None
        if done is not None:
            (stream or torch.cuda.current_stream()).wait_event(done)

    def _events(self):
        if not self.timed:
            return None, None
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    # -- full layers ----------------------------------------------------------------------
    def launch_full(self, store, layer: int, length: int, dev: torch.Tensor | None) -> Fetched:
        """The whole prefix 0..length of a layer. dev: [max_len, B, Hkv, 2, d] device buffer
        (CUDA) — on CPU the host store is used in place. One cudaMemcpyAsync (contiguous on both
        sides, from page-locked memory) on the copy stream."""
        src = store.prefix(layer, length)  # [length, B, Hkv, 2, d], contiguous
        ready, nbytes = None, 0
        if self.cuda:
            dst = dev[:length]
            after = self.follow_compute()
            start, end = self._events()
            end = end if end is not None else torch.cuda.Event()
            with _on(self.copy_stream):
                if after is not None:
                    self.copy_stream.wait_event(after)
                self.after_appends(layer)
                if self.fetch:
                    nbytes = src.numel() * src.element_size()
                    if start is not None:
                        start.record()
                    dst.copy_(src, non_blocking=True)
                end.record()
            if self.fetch and start is not None:
                self._timed.append((start, end, nbytes, False))
            ready, src = end, dst
        keys, values = (src[..., w, :].permute(1, 2, 0, 3) for w in (0, 1))
        return Fetched(keys, values, ready, length, nbytes)

    # -- graph decode: positions and lengths on the device ------------------------------
    def append_at(self, store, layer: int, position: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Graph decode: the step's token K/V [B, Hkv, 1, d] -> host store row `position` (a 1-element
        device tensor), on the compute stream: on CUDA a kernel writes the page-locked store through
        its device alias. Every reader of the row runs in a later step (the step ends joined)."""
        target = store.kv if store.dev is None else store.dev
        target[layer].index_copy_(0, position, store.pack(key, value))

    FULL_COPIES = ("memcpy", "chunked", "gather")

    def launch_full_static(self, store, layer: int, tokens: torch.Tensor, dev: torch.Tensor | None,
                           rows: torch.Tensor | None, positions: torch.Tensor, bias: torch.Tensor,
                           part: tuple[int, int] | None = None, after=None):
        """Graph decode: tokens 0..`tokens` (0-d device tensor) of a full layer. The attention reads
        the whole max_len buffer; `bias` [max_len] (0 / -inf) hides the rows at positions >= tokens.
        CUDA, on the copy stream into `dev` [max_len, B, Hkv, 2, d]: full_copy "memcpy" (the default)
        copies the layer's whole max_len rows with one cudaMemcpyAsync (a copy engine: no SM held, and
        PCIe left over by the SM gather of the speculated layers is used; the rows past `tokens`,
        masked, are the only extra bytes: the counters keep eager's prefix bytes); "gather": the
        Triton gather reads exactly the first tokens x lanes rows (rows = arange(max_len x lanes)
        [1, n], the kernel's index), on the side SMs. part (lo, hi): only rows lo..hi of the memcpy
        (full_copy "chunked": the bias with the part at lo 0), and the copy stream first waits on the
        event `after` too (the gather it follows on PCIe). CPU: the store itself is the buffer (bias
        only). Returns the CUDA event after it (or None)."""
        if self.full_copy not in self.FULL_COPIES:
            raise ValueError(f"unknown full_copy {self.full_copy!r}: one of {', '.join(self.FULL_COPIES)}")
        if not self.cuda:
            if part is None or part[0] == 0:
                torch.where(positions < tokens, self._zero, self._ninf, out=bias)
            return None
        if part is not None and self.full_copy != "chunked":
            raise ValueError(f"a part of a full layer's copy is full_copy 'chunked' only (this is {self.full_copy!r})")
        lanes = store.batch * store.shape[3]
        count = tokens * lanes  # rows, made on the compute stream before the copy stream follows it
        side = self.copy_stream
        if side is not None:
            computed = torch.cuda.Event()
            computed.record()
            side.wait_event(computed)
            if after is not None:
                side.wait_event(after)
            self._fork(side)
            for t in (tokens, count):
                t.record_stream(side)
        with _on(side):
            if part is None or part[0] == 0:
                torch.where(positions < tokens, self._zero, self._ninf, out=bias)
            if part is not None:  # the chunk's rows (all of them ever written, like the whole-layer copy)
                if self.fetch:
                    dev[part[0]:part[1]].copy_(store.kv[layer, part[0]:part[1]], non_blocking=True)
            elif self.fetch and self.full_copy in ("memcpy", "chunked"):  # from page-locked memory: capturable
                dev.copy_(store.kv[layer, : dev.shape[0]], non_blocking=True)
            elif self.fetch:
                kernels.gather_selected(store.gather_source(layer), rows, count, dev.view(-1, dev.shape[-1] * 2),
                                        self.gather_programs, **self.gather_shape)
            ready = _done(side)
        return ready

    def count_step(self, per_step: torch.Tensor, per_token: torch.Tensor, tokens: torch.Tensor) -> None:
        """Graph decode: counts += per_step + per_token x tokens (all [3] long, tokens 0-d), on the device."""
        self.counts.add_(per_step)
        self.counts.add_(per_token * tokens)

    # -- speculated layers --------------------------------------------------------------
    def launch_sparse(self, store, layer: int, slot, speculate, hidden: torch.Tensor, extra=(),
                      keep_pos: torch.Tensor | None = None, lane: torch.Tensor | None = None,
                      static: bool = False) -> Fetched:
        """speculate(bias, (k_sum, kb_sum)) -> (idx [B, Hkv, cap], k 0-d, done) runs on the side stream
        after `hidden` (and the `extra` tensors) are ready (done: it wrote bias[:cap] and added k to
        the sums itself, fused.py); the gather follows on the same stream. Returns at once.
        static (graph decode): no timing events (a captured step cannot time itself) and no wait
        for appends (graph decode appends on the compute stream, see append_at)."""
        b, hkv, d = store.batch, store.shape[3], store.shape[-1]
        after = self.follow_compute(hidden, *extra)
        with _on(self.spec_stream):
            # every launched speculation is used in the same step: its k is added to the sums now
            idx, k, done = speculate(slot.bias, (self._k_sum, self._kb_sum))  # done: bias and sums written
            cap = idx.shape[-1]
            if keep_pos is None:
                keep_pos = torch.arange(cap, device=idx.device)
            keep = None
            if self.gather == "index_select":  # it reads every row: padding -> copies of the top row
                idx, keep = select.pad(idx, k, keep_pos)
            bias = slot.bias[:cap]
            if not done:  # the Triton gather reads the first k rows only (the bias masks the rest)
                torch.where(keep_pos[:cap] < k if keep is None else keep, self._zero, self._ninf, out=bias)
                self._k_sum.add_(k)
                self._kb_sum.add_(k, alpha=b)
            n = b * hkv * cap
            dst = slot.dev[:n]  # [n, 2d] contiguous: key | value of each (sequence, head, position)
            ready, nbytes = None, 0
            gs = self.gather_stream
            if self.fetch and gs is not self.spec_stream:  # split: the gather follows the speculation only
                picked = torch.cuda.Event()
                picked.record()  # after the selection and the bias (the compute's wait on `ready` covers both)
                gs.wait_event(picked)
                self._fork(gs)
                for t in (idx, k):
                    t.record_stream(gs)
            with _on(gs) if self.fetch else contextlib.nullcontext():
                if self.fetch:
                    if not static:
                        self.after_appends(layer)
                    start, end = self._events() if not static else (None, None)
                    t0 = time.perf_counter()
                    if start is not None:
                        start.record()
                    if self.gather == "triton":  # the first k rows of each lane; padding -> zeros
                        kernels.gather_selected(store.gather_source(layer), idx, k, dst, self.gather_programs,
                                                **self.gather_shape)
                        nbytes = None  # k rows a lane: known on the device only (_kb_sum)
                        timed_bytes = (k, b * hkv * 2 * d * dst.element_size())
                    else:  # all cap rows, padding included
                        gather(store.gather_source(layer), select.flat_rows(idx, b, hkv, lane), dst)
                        nbytes = timed_bytes = dst.numel() * dst.element_size()
                        # counted here on the host, in both decode modes: a step with this gather is never
                        # captured (policy._graph_fallback), so Python runs at every one of its fetches
                        self.stats["gather_bytes"] += nbytes
                    if self.cuda:
                        ready = end if end is not None else _done(gs)
                        if end is not None:
                            end.record()
                        if start is not None:
                            self._timed.append((start, end, timed_bytes, True))
                    else:
                        self.stats["gather_s"] += time.perf_counter() - t0
                elif self.cuda:
                    ready = _done(self.spec_stream)
        kv = dst.view(b, hkv, cap, 2, d)
        return Fetched(kv[..., 0, :], kv[..., 1, :], ready, cap, nbytes, bias, idx, k)

    # -- measurements -----------------------------------------------------------------------
    def account(self, fetched: Fetched, batch: int, full: bool) -> None:
        """Count a fetch when it is used (a full-layer prefetch for a step that never comes is
        not). Host integers only; the selected count k stays on the device (_k_sum, _kb_sum), and
        a speculated layer's bytes are counted at its launch (used in the same step)."""
        if full:
            self.stats["full_tokens"] += fetched.tokens * batch
            self.stats["bytes"] += fetched.nbytes
        else:
            self.stats["sparse_fetches"] += 1

    def moved_bytes(self, token_bytes: int) -> tuple[int, int]:
        """(full layers' bytes, speculated layers' gathered bytes) host -> device, for metrics
        after the run: the Triton gather's share is the device's count of selected tokens x
        token_bytes (one token of a sequence, all kv heads, K and V)."""
        gathered = self.stats["gather_bytes"]
        if self.fetch and self.gather == "triton":
            gathered = self.selected_tokens()[1] * token_bytes
        return self.stats["bytes"], gathered

    def selected_tokens(self) -> tuple[int, int]:
        """Selected rows summed over speculated fetches: per (sequence, kv head), and per kv head
        summed over sequences (x each fetch's batch). Reads the device: for metrics, after the run."""
        if self.spec_stream is not None:  # the counters are added on the speculation stream
            torch.cuda.current_stream().wait_stream(self.spec_stream)
        k, kb = torch.stack([self._k_sum, self._kb_sum]).tolist()
        return k, kb

    def _rate(self, which) -> tuple[float | None, float]:
        timed = [t for t in self._timed if which is None or t[3] == which]
        if not timed:
            return None, 0.0
        timed[-1][1].synchronize()
        ms = sum(s.elapsed_time(e) for s, e, _, _ in timed)
        moved = sum(n for _, _, n, _ in timed if isinstance(n, int))
        counted = [n for _, _, n, _ in timed if not isinstance(n, int)]  # (k on the device, bytes per k)
        if counted:
            ks = torch.stack([k for k, _ in counted]).tolist()
            moved += sum(k * f for k, (_, f) in zip(ks, counted))
        return (moved / (ms * 1e-3) / 1e9 if ms > 0 else None), ms

    def measured_bandwidth_gbps(self, sparse: bool | None = None) -> float | None:
        """Bytes / device time of the host->device transfers (CUDA events): all of them, or only
        the speculated layers' gathers (sparse=True) or the full layers' copies (False)."""
        return self._rate(sparse)[0]

    def gather_ms(self) -> float:
        """Total time of the speculated layers' gathers: device time (CUDA events) or host time (CPU)."""
        return self._rate(True)[1] if self.cuda else self.stats["gather_s"] * 1e3

    def close(self) -> None:
        pass


def _on(stream):
    """Run on `stream`; None (CPU, streams `serial`): on the current stream."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _done(stream):
    """An event after the work enqueued so far on the current stream, when that is the side stream
    `stream` (the compute stream waits on it); None when the work is on the compute stream itself."""
    if stream is None:
        return None
    ready = torch.cuda.Event()
    ready.record()
    return ready
