"""Overlap variants of InfiniGen's captured decode step, for benchmarks/gpu_infinigen_graph.py (issue 12).

The default step (no variant): streams `split`, the gather on 8 SMs of its own (policy key
gather_sms, frameworks/infinigen/green.py), the step and the speculation on the rest. A variant
rebuilds the layout from scratch with its settings, unpartitioned unless it names green_sms
(transfer.Transfer.set_streams, the gather's grid, the policy's step stream), and is measured
beside the default in the same run:
  prio        the speculation + gather stream at a higher priority
  fullgrid    a gather program per block of rows (the default: a persistent grid of 64)
  serial      everything on the compute stream: no overlap at all (the baseline)
  side        speculation and gather on one side stream (the default until split won on the H200)
  split       the gather on a stream of its own, after the speculation's event (the next layer's
              speculation no longer queues behind this layer's gather; gathers back to back on PCIe),
              every kernel on every SM: the default from a4dbfbb until the gather got SMs of its own
  split-prio  split, the speculation stream at a higher priority (it sits on the critical path)
  greenN      SM partitioning with CUDA green contexts: the side streams (speculation, gather,
              full-layer copy) on a green context of N SMs, the captured step on one of the
              remaining SMs (a disjoint split of the device's SMs, cuDevSmResourceSplitByCount)
  split-greenN  split on those partitions
  split-gathergreenN  split, only the gather (and the full-layer copies) on the N-SM green context; the
              speculation on a stream of the step's partition (greenN starves the speculation, which
              needs many SMs for a short time, while the gather needs few for a long time);
              split-gathergreen8 is the default's layout, built by the benchmark
  split-progN  split, the gather's persistent grid of N programs (default 64): fewer SMs held while it waits on PCIe
  split-gathergreen8-progN / -prio  split-gathergreen8 with a gather grid of N programs / the speculation
              stream (on the step's SMs) at a higher priority
  spec-torch  the default layout, the speculation as torch ops (select.py, ~20 kernels a layer) instead
              of the fused Triton kernels (fused.py, the CUDA default since 2026-12-03 afternoon)
  spec-select the fused speculation's selection by its own kernel (fused._select) instead of torch's topk
  full-chunked the full layers' next-step memcpy in pieces, one at each later layer's start after that
              layer's gather (filling PCIe's gaps between the gathers), instead of one copy at layer 1
  full-gather the full layers' prefetch in graph decode by the Triton gather of exactly the prefix's rows
              (on the gather's SMs, as until 2026-12-03) instead of one copy-engine memcpy of the whole layer
  gather-*    the default layout, the Triton gather's shape changed (rows per block rN, warps wN, software-
              pipelined loop sN; best: the fastest of the gather/bs32 check on the gather's SMs)
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
    "spec-torch": {"speculation": "torch"},
    "spec-select": {"select": True},  # the fused speculation's selection by its own kernel, not torch's topk
    "full-chunked": {"full_copy": "chunked"},  # the full layers' next-step copy in pieces, one after each later gather
    "full-gather": {"full_copy": "gather"},  # the full layers' prefetch by the Triton gather (on the side SMs)
    # the gather kernel's shape on the default layout (kernels.gather_selected: rows per block, warps, loop stages)
    "gather-r32": {"gather_shape": {"block_rows": 32}},
    "gather-r32-w8": {"gather_shape": {"block_rows": 32, "num_warps": 8}},
    "gather-s2": {"gather_shape": {"stages": 2}},
    "gather-best": {"gather_shape": "best"},  # the fastest shape of the gather/bs32 check on the gather's SMs
}


class Unsupported(Exception):
    """This torch / driver cannot run the variant: the check is recorded `unsupported` with the reason."""


def configure(ctx, policy, engine, programs="default", priority: int = 0, streams: str | None = None,
              green_sms: int | None = None, green_spec: str = "side", speculation: str | None = None,
              gather_shape: dict | None = None, select: bool | None = None, full_copy: str | None = None) -> dict:
    """Apply a variant to a freshly built policy + engine, before their first batch. No setting: the
    default layout as the policy made it (streams `split`, the gather on `gather_sms` SMs of its
    own, policy.sm_partition), as with only the speculation, the gather's shape or its grid set.
    A stream setting (streams, priority, green_sms): that layout rebuilt from scratch, unpartitioned
    unless the variant names green_sms (so `split` alone is the layout before the partition became
    the default). Returns what was set (recorded with the check's figures)."""
    from frameworks.infinigen.transfer import STREAMS_DEFAULT

    if speculation is not None:  # read at each launch: no rebuild needed
        if speculation not in ("fused", "torch"):
            raise ValueError(f"unknown speculation {speculation!r}")
        policy.fused_speculation = speculation == "fused"
    if select is not None:
        policy.fused_select = select
    if full_copy is not None:
        policy.transfer.full_copy = full_copy
    spec = policy.speculation_used()
    if gather_shape:  # read at each launch
        policy.transfer.gather_shape = dict(gather_shape)
    if not priority and streams is None and not green_sms:  # the default layout (the gather's shape aside)
        if programs != "default":
            policy.transfer.gather_programs = programs
        return {"streams": STREAMS_DEFAULT, "priority": 0, "programs": programs,
                "default": speculation is None and not gather_shape and programs == "default" and select is None
                and full_copy is None, "full_copy": policy.transfer.full_copy,
                "speculation": spec,
                "gather_shape": dict(gather_shape or {}), "sm_partition": getattr(policy, "sm_partition", None)}
    if not policy.transfer.cuda:
        raise Unsupported("stream variants need CUDA")
    streams = streams or STREAMS_DEFAULT
    setting = {"streams": streams, "priority": priority, "programs": programs, "speculation": spec}
    if programs != "default":  # the Triton gather's grid (kernels.PROGRAMS by default; None: a program per block)
        policy.transfer.gather_programs = programs
    make = make_spec = None
    policy.step_stream = None  # unpartitioned unless green_sms
    if green_sms:
        part = green_partition(green_sms)
        make = part.make_side
        policy.step_stream = part.step_stream  # the eager warm step, the capture and the replays
        if green_spec == "step":
            make_spec = lambda: part.make_step(priority)  # noqa: E731
        setting["green"] = dict(part.info, spec=green_spec)
    policy.transfer.set_streams(streams, priority, make, make_spec)
    return setting


def green_partition(n_sms: int):
    """frameworks.infinigen.green.partition, its failure recorded as this variant's `unsupported`."""
    from frameworks.infinigen import green

    try:
        return green.partition(n_sms)  # the current device
    except green.Unavailable as e:
        raise Unsupported(str(e)) from e
