"""Overlap variants of InfiniGen's captured decode step, for benchmarks/gpu_infinigen_graph.py (issue 12).

Each variant is the default graph step with one setting changed (transfer.Transfer.set_streams,
the gather's grid, the engine's step stream), measured beside the default in the same run:
  prio        the speculation + gather stream at a higher priority
  fullgrid    a gather program per block of rows (the default: a persistent grid of 64)
  serial      everything on the compute stream: no overlap at all (the baseline)
  side        speculation and gather on one side stream (the default until split won on the H200)
  split       (the default now) the gather on a stream of its own, after the speculation's event (the next layer's
              speculation no longer queues behind this layer's gather; gathers back to back on PCIe)
  split-prio  split, the speculation stream at a higher priority (it sits on the critical path)
  greenN      SM partitioning with CUDA green contexts: the side streams (speculation, gather,
              full-layer copy) on a green context of N SMs, the captured step on one of the
              remaining SMs (a disjoint split of the device's SMs, cuDevSmResourceSplitByCount)
  split-greenN  split on those partitions
  split-gathergreenN  split, only the gather (and the full-layer copies) on the N-SM green context; the
              speculation on a stream of the step's partition (greenN starves the speculation, which
              needs many SMs for a short time, while the gather needs few for a long time)
  split-progN  split, the gather's persistent grid of N programs (default 64): fewer SMs held while it waits on PCIe
  split-gathergreen8-progN / -prio  split-gathergreen8 with a gather grid of N programs / the speculation
              stream (on the step's SMs) at a higher priority
Nothing here changes a default: the lead picks one after the GPU run.
"""

from __future__ import annotations

VARIANTS: dict[str, dict] = {
    "prio": {"priority": -1},
    "fullgrid": {"programs": None},
    "serial": {"streams": "serial"},
    "side": {"streams": "side"},  # the default before split (speculation and gather on one stream)
    "split": {"streams": "split"},
    "split-prio": {"streams": "split", "priority": -1},
    **{f"green{n}": {"green_sms": n} for n in (8, 16, 32)},
    "split-green16": {"streams": "split", "green_sms": 16},
    **{f"split-gathergreen{n}": {"streams": "split", "green_sms": n, "green_spec": "step"} for n in (8, 16, 32)},
    **{f"split-prog{n}": {"streams": "split", "programs": n} for n in (16, 32)},
    **{f"split-gathergreen8-prog{n}": {"streams": "split", "green_sms": 8, "green_spec": "step", "programs": n}
       for n in (32, 128)},
    "split-gathergreen8-prio": {"streams": "split", "green_sms": 8, "green_spec": "step", "priority": -1},
}


class Unsupported(Exception):
    """This torch / driver cannot run the variant: the check is recorded `unsupported` with the reason."""


def configure(ctx, policy, engine, programs="default", priority: int = 0, streams: str | None = None,
              green_sms: int | None = None, green_spec: str = "side") -> dict:
    """Apply a variant to a freshly built policy + engine, before their first batch (streams None:
    the default layout, transfer.STREAMS_DEFAULT). Returns what was set (recorded with the check's
    figures)."""
    from frameworks.infinigen.transfer import STREAMS_DEFAULT

    changed = streams is not None
    streams = streams or STREAMS_DEFAULT
    setting = {"streams": streams, "priority": priority, "programs": programs}
    if programs != "default":  # the Triton gather's grid (kernels.PROGRAMS by default; None: a program per block)
        policy.transfer.gather_programs = programs
    make = make_spec = None
    if green_sms:
        make, compute, info, make_step = green_streams(ctx, green_sms)
        engine.step_stream = compute  # the eager warm step, the capture and the replays
        if green_spec == "step":
            make_spec = lambda: make_step(priority)  # noqa: E731
        setting["green"] = dict(info, spec=green_spec)
    if changed or priority or make is not None:
        if not policy.transfer.cuda:
            raise Unsupported("stream variants need CUDA")
        policy.transfer.set_streams(streams, priority, make, make_spec)
    return setting


def _torch_green_api(torch) -> str:
    """What torch's own green-context module offers (recorded with the reason when unsupported)."""
    try:
        from torch.cuda import green_contexts as gcm
    except ImportError as e:
        return f"torch {torch.__version__}: no torch.cuda.green_contexts ({e})"
    g = getattr(gcm, "GreenContext", None)
    names = sorted(n for n in dir(g) if not n.startswith("__")) if g is not None else []
    return (f"torch {torch.__version__}: green_contexts {sorted(n for n in dir(gcm) if not n.startswith('_'))}, "
            f"GreenContext {names}, SUPPORTED={getattr(gcm, 'SUPPORTED', '?')}")


def green_streams(ctx, n_sms: int):
    """(make_side_stream, compute_stream, info, make_step_stream) on a disjoint split of the device's SMs: a green
    context of >= n_sms SMs for the side streams and one of the remainder for the step. torch's
    GreenContext.create(num_sms) takes each context from the same first SMs (the split's remainder
    is dropped), so two of them would overlap; the driver API's split returns the remainder, used
    here through cuda.bindings (the package torch's green contexts use). Cached per N: contexts and
    streams live as long as the process."""
    torch = ctx.torch
    cache = ctx.__dict__.setdefault("green", {})
    if n_sms in cache:
        return cache[n_sms]
    if ctx.device != "cuda":
        raise Unsupported("green contexts need CUDA")
    api = _torch_green_api(torch)
    try:
        from cuda.bindings import driver as drv
    except ImportError as e:
        raise Unsupported(f"no cuda.bindings package ({e}); {api}") from e

    def ok(ret, what):
        err, *out = ret if isinstance(ret, tuple) else (ret,)
        if err != drv.CUresult.CUDA_SUCCESS:
            raise Unsupported(f"{what}: {err!r}; {api}")
        return out[0] if len(out) == 1 else tuple(out)

    index = torch.cuda.current_device()
    dev = ok(drv.cuDeviceGet(index), "cuDeviceGet")
    sms = ok(drv.cuDeviceGetDevResource(dev, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM), "cuDeviceGetDevResource")
    groups, n_groups, rest = ok(drv.cuDevSmResourceSplitByCount(1, sms, 0, n_sms), "cuDevSmResourceSplitByCount")
    if n_groups != 1 or not rest.sm.smCount:
        raise Unsupported(f"split of {sms.sm.smCount} SMs by {n_sms}: {n_groups} groups, remainder {rest.sm.smCount}")

    def context(resource, what):
        desc = ok(drv.cuDevResourceGenerateDesc([resource], 1), f"cuDevResourceGenerateDesc ({what})")
        return ok(drv.cuGreenCtxCreate(desc, dev, drv.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM),
                  f"cuGreenCtxCreate ({what})")

    side_ctx, step_ctx = context(groups[0], "side"), context(rest, "step")
    streams = []  # the CUstream handles behind the ExternalStreams stay referenced here

    def stream(green, priority=0):
        s = ok(drv.cuGreenCtxStreamCreate(green, drv.CUstream_flags.CU_STREAM_NON_BLOCKING, priority),
               "cuGreenCtxStreamCreate")
        streams.append(s)
        return torch.cuda.ExternalStream(int(s), device=index)

    info = {"side_sms": groups[0].sm.smCount, "step_sms": rest.sm.smCount, "device_sms": sms.sm.smCount,
            "torch_api": api}
    cache[n_sms] = (lambda: stream(side_ctx), stream(step_ctx), info, lambda prio=0: stream(step_ctx, prio))
    ctx.__dict__.setdefault("green_handles", []).append((side_ctx, step_ctx, streams))
    return cache[n_sms]
