"""SMs of their own for InfiniGen's gather: a disjoint split of the GPU by CUDA green contexts.

Why (issue 12, H200, Llama-3.1-8B, budget 0.2, prompt 2048): the Triton gather reads host rows
through unified addressing, so each of its programs sits on an SM for as long as PCIe takes;
cuBLAS's persistent GEMMs of the decode step want every SM. Sharing them, the two waited on
each other: the captured step at batch 32 took 63 ms, about compute + gather + speculation end
to end, for 36 ms of gather alone. With the gather (and the full layers' copies) on a green
context of 8 SMs and the step with its speculation on one of the other 124 it took 48-49 ms
(0.77x), batch 8 0.94x, batch 1 1.02x (results/reference/h200-2026-12-03/). The speculation
must stay with the step: on the gather's 8 SMs it made the step 1.6-1.9x slower.

`partition(n)` splits the current device's SMs into a group of >= n SMs (the driver rounds to
its granularity: 8 on Hopper) and the remainder, one green context each, through cuda.bindings'
driver API (torch's GreenContext.create takes every context from the same first SMs, so two of
them would overlap). Streams made on a context keep their kernels to its SMs; they are
torch ExternalStreams, so torch's allocator, events and CUDA graph capture work across them.
Contexts and streams live as long as the process (cached per device and n). Where the split
cannot be made (no cuda.bindings, an old driver, MIG, a device too small), `partition` raises
Unavailable with the reason and the caller runs unpartitioned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


class Unavailable(Exception):
    """No green-context split on this device / driver / torch: the reason is the message."""


@dataclass
class Partition:
    make_side: Callable[[], torch.cuda.Stream]  # a new stream on the small group (the gather's)
    make_step: Callable[..., torch.cuda.Stream]  # a new stream on the remainder (priority: optional)
    step_stream: torch.cuda.Stream  # the decode step's stream, on the remainder
    info: dict  # side_sms, step_sms, device_sms


_CACHE: dict[tuple[int, int], Partition] = {}
_HANDLES: list = []  # the green contexts and CUstreams behind the ExternalStreams: never freed


def _torch_api() -> str:
    try:
        from torch.cuda import green_contexts as gcm
    except ImportError as e:
        return f"torch {torch.__version__}: no torch.cuda.green_contexts ({e})"
    return f"torch {torch.__version__}: green contexts SUPPORTED={getattr(gcm, 'SUPPORTED', '?')}"


def partition(n_sms: int, device: torch.device | None = None) -> Partition:
    """The current CUDA device (or `device`) split into >= n_sms SMs and the rest (cached)."""
    if not torch.cuda.is_available():
        raise Unavailable("green contexts need CUDA")
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    key = (index, n_sms)
    if key in _CACHE:
        return _CACHE[key]
    api = _torch_api()
    try:
        from cuda.bindings import driver as drv
    except ImportError as e:
        raise Unavailable(f"no cuda.bindings package ({e}); {api}") from e

    def ok(ret, what):
        err, *out = ret if isinstance(ret, tuple) else (ret,)
        if err != drv.CUresult.CUDA_SUCCESS:
            raise Unavailable(f"{what}: {err!r}; {api}")
        return out[0] if len(out) == 1 else tuple(out)

    if not hasattr(drv, "cuGreenCtxCreate"):
        raise Unavailable(f"cuda.bindings without green contexts (CUDA >= 12.4 needed); {api}")
    torch.cuda.init()  # the primary context exists before the green ones
    dev = ok(drv.cuDeviceGet(index), "cuDeviceGet")
    sms = ok(drv.cuDeviceGetDevResource(dev, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM), "cuDeviceGetDevResource")
    groups, n_groups, rest = ok(drv.cuDevSmResourceSplitByCount(1, sms, 0, n_sms), "cuDevSmResourceSplitByCount")
    if n_groups != 1 or not rest.sm.smCount:
        raise Unavailable(f"split of {sms.sm.smCount} SMs by {n_sms}: {n_groups} groups, remainder {rest.sm.smCount}")

    def context(resource, what):
        desc = ok(drv.cuDevResourceGenerateDesc([resource], 1), f"cuDevResourceGenerateDesc ({what})")
        return ok(drv.cuGreenCtxCreate(desc, dev, drv.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM),
                  f"cuGreenCtxCreate ({what})")

    side_ctx, step_ctx = context(groups[0], "side"), context(rest, "step")
    _HANDLES.append((side_ctx, step_ctx))

    def stream(green, priority: int = 0) -> torch.cuda.Stream:
        s = ok(drv.cuGreenCtxStreamCreate(green, drv.CUstream_flags.CU_STREAM_NON_BLOCKING, priority),
               "cuGreenCtxStreamCreate")
        _HANDLES.append(s)
        return torch.cuda.ExternalStream(int(s), device=index)

    info = {"side_sms": groups[0].sm.smCount, "step_sms": rest.sm.smCount, "device_sms": sms.sm.smCount}
    part = Partition(lambda: stream(side_ctx), lambda priority=0: stream(step_ctx, priority), stream(step_ctx), info)
    _CACHE[key] = part
    return part
