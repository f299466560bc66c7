"""Run one cell's `run-cell` command through the configured runner, on its own GPU.

    python -m workflow.lib.launch --runner docker --image results/images/hf.iid --gpus 1 \
        -- --spec '<json>' --out results/cells/.../<id>.json --threads 8
    python -m workflow.lib.launch --runner local --gpus 0 --cpus 1 -- ...   (a CPU cell on a core of its own)

The arguments after `--` are the cell command, the same for every runner:
  local      python -m frameworks.harness.run_cell ARGS    (this Python environment, or --python:
                                                           vLLM cells in their own venv)
  docker     docker run ... <image id> ARGS                (the image's entry point is run-cell)
  apptainer  apptainer exec --nv <image>.sif python -m frameworks.harness.run_cell ARGS
Everything machine-specific (absolute paths, uid, GPU, image id, git commit) is decided here at
run time, so none of it is a Snakemake param: moving the checkout reruns nothing.

Secrets (HF_TOKEN) go to the container by environment only: `docker run --env HF_TOKEN` names
the variable and docker copies its value from this process; apptainer gets APPTAINERENV_HF_TOKEN.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from frameworks.harness import cputime, lifeline, pause
from frameworks.harness.lifeline import kill_group
from workflow.lib import cores as corelib
from workflow.lib import gpus as gpulib

# runner -> the image file a cell depends on (results/images/<framework>.<ext>; local: none)
IMAGE_EXT = {"local": None, "docker": "iid", "apptainer": "sif"}
RUNNERS = tuple(IMAGE_EXT)
SECRETS = ("HF_TOKEN",)  # passed by name only, never by value on a command line
CELL_MODULE = ("-m", "frameworks.harness.run_cell")
# Inductor's and Triton's on-disk caches (compiled decode layers, frameworks/hf/compile.py; InfiniGen's
# gather kernel), shared by the cells of a run and kept between runs: a cell of a model and batch size
# compiled before loads the code. Under results/ (mounted in containers, whose HOME is a temp dir)
INDUCTOR_CACHE = "cache/torchinductor"
TRITON_CACHE = "cache/triton"
# Python's bytecode for a local cell whose environment has none and may not write it
# (PYTHONDONTWRITEBYTECODE set, torch / transformers installed without it, as on the H200 machine): there
# every cell process compiles from source what of them has no bytecode, and the imports take 10-13 s
# of an 8B cell's start against 3.4 s from a bytecode cache (results/reference/h200-2026-12-04/). Such a
# cell gets that cache here (PYTHONPYCACHEPREFIX), outside the environment's tree.
PYCACHE = "cache/pycache"
WORKDIR = "/work"  # the images' WORKDIR; results/ is mounted at /work/results
GRACE_S = 300  # on top of the cell's own time limit: image start, model build, result write


def local_cache_env(env: dict[str, str], results_dir: Path, python: str | None = None) -> dict[str, str]:
    """The on-disk caches a local cell gets under results_dir, for the variables env leaves unset:
    Inductor's, Triton's, and - only where the cell's environment would otherwise compile every
    module from source (`needs_pycache`) - Python's bytecode."""
    out = {}
    for var, sub in (("TORCHINDUCTOR_CACHE_DIR", INDUCTOR_CACHE), ("TRITON_CACHE_DIR", TRITON_CACHE)):
        if var not in env:
            out[var] = str((results_dir / sub).resolve())
    if needs_pycache(env, python):
        out.update(bytecode_env(results_dir / PYCACHE))
    return out


def bytecode_env(prefix: Path) -> dict[str, str]:
    """The variables that make a Python write and read its bytecode under prefix."""
    # empty PYTHONDONTWRITEBYTECODE: Python writes bytecode (it tests for a non-empty value)
    return {"PYTHONPYCACHEPREFIX": str(prefix.resolve()), "PYTHONDONTWRITEBYTECODE": ""}


# folders whose modules' bytecode tells whether an environment has it (listed, never imported): the
# packages an 8B cell spends its import time in; an environment built without bytecode and imported
# once with writes on has it for what that import touched only (torch/__init__, not Inductor's)
BYTECODE_PROBES = {"torch": ("", "nn/modules", "_dynamo", "_inductor", "_inductor/codegen"),
                   "transformers": ("", "utils", "integrations", "generation", "models/llama")}
BYTECODE_MISSING = 0.1  # above this fraction of the probed modules without bytecode: cache it


def missing_bytecode(probes: dict | None = None) -> float:
    """The fraction of the probed folders' modules (*.py) that have no bytecode for this Python."""
    import importlib.util

    total = missing = 0
    for package, folders in (BYTECODE_PROBES if probes is None else probes).items():
        spec = importlib.util.find_spec(package)  # a top-level package: located, not imported
        if spec is None or not spec.submodule_search_locations:
            continue
        root = list(spec.submodule_search_locations)[0]
        for folder in folders:
            d = os.path.join(root, folder)
            try:
                sources = [n for n in os.listdir(d) if n.endswith(".py")]
            except OSError:
                continue
            total += len(sources)
            missing += sum(not os.path.exists(importlib.util.cache_from_source(os.path.join(d, n))) for n in sources)
    return missing / total if total else 0.0


def needs_pycache(env: dict[str, str], python: str | None = None, probes: dict | None = None) -> bool:
    """True when a cell run by this Python would compile much of torch and transformers from source
    in every process: PYTHONDONTWRITEBYTECODE set, no PYTHONPYCACHEPREFIX of the environment's own,
    and more than BYTECODE_MISSING of the probed modules without bytecode. Another Python (--python:
    vLLM's venv, which pip compiled) is left as it is."""
    if not env.get("PYTHONDONTWRITEBYTECODE") or env.get("PYTHONPYCACHEPREFIX"):
        return False
    if python is not None and os.path.realpath(python) != os.path.realpath(sys.executable):
        return False
    return missing_bytecode(probes) > BYTECODE_MISSING


def log(msg: str) -> None:
    print(f"kvstudy-launch: {datetime.now(timezone.utc).isoformat()} {msg}", file=sys.stderr, flush=True)


def cell_option(cell_args: list[str], name: str) -> str | None:
    for i, a in enumerate(cell_args[:-1]):
        if a == name:
            return cell_args[i + 1]
    return None


def container_name(out: str, results_dir: Path) -> str:
    """Readable (the cell's path) and unique per checkout, so two checkouts never collide."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", out.removeprefix("results/cells/").removesuffix(".json"))
    tag = hashlib.sha1(str(results_dir.resolve()).encode()).hexdigest()[:8]
    return f"kvstudy_{stem[:180]}_{tag}"


def read_image_id(path: str) -> str:
    text = Path(path).read_text().strip()
    if not text:
        raise SystemExit(f"kvstudy-launch: {path} is empty; rebuild the image (snakemake --forcerun {path})")
    return text


def git_env() -> dict[str, str]:
    """The host's git view for provenance (the image has no .git)."""
    from frameworks.harness.provenance import git_state

    g = git_state()
    return {"KVSTUDY_GIT_COMMIT": g["commit"] or "", "KVSTUDY_GIT_DIRTY": "1" if g["dirty"] else "0"}


def docker_argv(image_id: str, name: str, uid: int, gid: int, results_dir: Path, gpu: str | None,
                env: dict[str, str], secret_names: list[str], cell_args: list[str],
                cpus: tuple[int, ...] = ()) -> list[str]:
    argv = ["docker", "run", "--rm", "--name", name, "--init",
            "--hostname", socket.gethostname(),  # provenance names the machine, not a container id
            "--user", f"{uid}:{gid}",  # results belong to the caller, not to the image's user
            "--network", "none",  # a cell needs no network; models are local configs
            "--shm-size", "16g",  # vLLM's workers talk through shared memory
            "--volume", f"{results_dir.resolve()}:{WORKDIR}/results",
            "--env", "HOME=/tmp"]  # an arbitrary --user has no home in the image
    if cpus:  # the daemon starts the container: the launcher's own affinity does not reach it
        argv += ["--cpuset-cpus", corelib.format_list(cpus)]
    if gpu is not None:
        argv += ["--gpus", f"device={gpu}"]
        if gpu.startswith("GPU-"):  # a UUID selects the same GPU inside; provenance records it
            argv += ["--env", f"CUDA_VISIBLE_DEVICES={gpu}"]
    for k, v in sorted(env.items()):
        argv += ["--env", f"{k}={v}"]
    for k in secret_names:
        argv += ["--env", k]  # by name: docker reads the value from our environment
    return argv + [image_id, *cell_args]


def apptainer_argv(sif: str, results_dir: Path, gpu: str | None, cell_args: list[str]) -> list[str]:
    argv = ["apptainer", "exec", "--cleanenv", "--containall",
            "--bind", f"{results_dir.resolve()}:{WORKDIR}/results", "--pwd", WORKDIR]
    if gpu is not None:
        argv.append("--nv")
    return argv + [sif, "python", *CELL_MODULE, *cell_args]


def apptainer_env(base: dict[str, str], env: dict[str, str], gpu: str | None, secret_names: list[str]) -> dict[str, str]:
    """--cleanenv drops the host environment; APPTAINERENV_X sets X inside."""
    out = dict(base)
    wanted = dict(env)
    if gpu is not None:
        wanted["CUDA_VISIBLE_DEVICES"] = gpu
    for k in secret_names:
        wanted[k] = base[k]
    out.update({f"APPTAINERENV_{k}": v for k, v in wanted.items()})
    return out


def run(argv: list[str], env: dict[str, str], timeout_s: float, on_stop, pass_fds=(), cleanup=None) -> int:
    """Run argv; on a signal or past timeout_s, call on_stop (remove the container) and give up.

    If this process is killed outright (SIGKILL), the lifeline kills argv's group and runs
    `cleanup` (removes the container, which does not die with its docker client)."""
    # the watchdog before the child: no moment in which a child runs unwatched (until `watch`, the
    # kernel kills the child with this process, and the watchdog still runs `cleanup`)
    line = lifeline.guard(cleanup=cleanup)
    proc = subprocess.Popen(argv, env=env, pass_fds=pass_fds, start_new_session=True, preexec_fn=lifeline.die_with_parent)
    line.watch(proc.pid)

    def stop(signum, _frame):
        log(f"interrupted (signal {signum}): stopping the cell")
        on_stop(proc)
        line.release()
        sys.exit(128 + signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, stop)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log(f"the cell ran past {timeout_s:g} s (its own limit + {GRACE_S} s of grace): stopped; no result written")
        on_stop(proc)
        rc = 124
    line.release()
    return rc


def pin_cores(n: int, env: dict[str, str], out: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A CPU cell's own `n` cores (cores.py): this process pinned to them, so is everything it
    starts (run-cell, its worker, vLLM's engine core, apptainer); the cell finds them in
    KVSTUDY_CPU_CORES."""
    cores, fds = corelib.pin(n, env, log)
    if cores:
        log(f"{out}: on cores {env[corelib.ENV]}")
    return cores, fds


def docker_remover(name: str):
    def stop(proc: subprocess.Popen) -> None:
        subprocess.run(["docker", "rm", "--force", name], capture_output=True, timeout=120)
        kill_group(proc)

    return stop


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("kvstudy-launch: usage: launch [options] -- <run-cell arguments>")
    cut = argv.index("--")
    ap = argparse.ArgumentParser(prog="kvstudy-launch")
    ap.add_argument("--runner", choices=RUNNERS, default="local")
    ap.add_argument("--image", help="docker: results/images/<fw>.iid; apptainer: results/images/<fw>.sif")
    ap.add_argument("--gpus", type=int, default=0, help="GPUs the cell needs (0 or 1)")
    ap.add_argument("--cpus", type=int, default=0,
                    help="CPU cells: the cores the cell gets to itself, pinned (0: not pinned)")
    ap.add_argument("--cpu-timing", choices=cputime.MODES, default="lock",
                    help="CPU cells, local runner: pause = stop the host's other cells while this one times")
    ap.add_argument("--python", help="local: the Python of the cell's environment (vLLM's venv); default: this one")
    args = ap.parse_args(argv[:cut])
    cell_args = argv[cut + 1:]
    out = cell_option(cell_args, "--out") or "cell"
    spec = json.loads(cell_option(cell_args, "--spec") or "{}")
    timeout_s = float(spec.get("timeout_s", 3600)) + GRACE_S
    env = dict(os.environ)

    python = args.python or sys.executable
    if args.python and not os.access(args.python, os.X_OK):
        raise SystemExit(f"kvstudy-launch: --python {args.python} is not an executable Python")
    results_dir = Path("results")
    if not args.gpus:  # CPU cells time one at a time on this host: one lock file, seen by every runner
        lock = results_dir / cputime.FILE_NAME
        env[cputime.ENV] = str(lock.resolve()) if args.runner == "local" else f"{WORKDIR}/{lock}"
        # pause needs the cell's processes on this host's pid namespace: local cells only
        # (a container's processes are no host-visible tree; those cells time under the lock alone)
        env[cputime.MODE_ENV] = args.cpu_timing if args.runner == "local" else "lock"
        if args.runner == "local":
            env[pause.ROOT_ENV] = str(os.getpid())  # after execve run-cell keeps this pid: the root
            pause.register(cputime.registry(env[cputime.ENV]))
    if args.runner == "local":  # this environment's own settings win
        extra = local_cache_env(env, results_dir, python)
        if "PYTHONPYCACHEPREFIX" in extra:
            log(f"{out}: {missing_bytecode():.0%} of torch's and transformers' probed modules have no bytecode "
                f"and PYTHONDONTWRITEBYTECODE is set: bytecode cached under {extra['PYTHONPYCACHEPREFIX']}")
        env.update(extra)
    cpus: tuple[int, ...] = ()
    cpu_fds: tuple[int, ...] = ()
    if not args.gpus and args.cpus:
        cpus, cpu_fds = pin_cores(args.cpus, env, out)
    if args.runner == "local" and not args.gpus:  # CPU cell: nothing else to claim, nothing to wrap
        os.execve(python, [python, *CELL_MODULE, *cell_args], env)  # the core locks' fds stay open

    claim = None
    gpu = None
    if args.gpus:
        visible = gpulib.discover()
        if env.get("SLURM_JOB_ID") and visible:
            gpu = visible[0]  # SLURM already gave this job its own GPU (gres); no host-wide lock
        else:
            try:
                claim = gpulib.claim(visible, on_wait=lambda: log(f"all GPUs {visible} busy: waiting for one"))
            except gpulib.NoGPU as e:
                raise SystemExit(f"kvstudy-launch: {e}") from None
            gpu = claim.gpu
        log(f"{out}: on GPU {gpu}")
    fds = ((claim.fd,) if claim else ()) + cpu_fds

    log(f"{out}: start ({args.runner})")
    if args.runner == "local":
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        rc = run([python, *CELL_MODULE, *cell_args], env, timeout_s, kill_group, fds)
    else:
        meta = {**git_env(), "KVSTUDY_IMAGE_ID": read_image_id(
            args.image if args.runner == "docker" else str(Path(args.image).with_suffix(".iid"))),
                "TORCHINDUCTOR_CACHE_DIR": f"{WORKDIR}/results/{INDUCTOR_CACHE}",
                "TRITON_CACHE_DIR": f"{WORKDIR}/results/{TRITON_CACHE}"}
        for key in (cputime.ENV, corelib.ENV):
            if key in env:
                meta[key] = env[key]
        secrets = [k for k in SECRETS if env.get(k)]
        if args.runner == "docker":
            name = container_name(out, results_dir)
            subprocess.run(["docker", "rm", "--force", name], capture_output=True)  # left by a killed run
            cmd = docker_argv(meta["KVSTUDY_IMAGE_ID"], name, os.getuid(), os.getgid(), results_dir, gpu, meta,
                              secrets, cell_args, cpus)
            rc = run(cmd, env, timeout_s, docker_remover(name), fds, cleanup=["docker", "rm", "--force", name])
        else:
            cmd = apptainer_argv(args.image, results_dir, gpu, cell_args)
            rc = run(cmd, apptainer_env(env, meta, gpu, secrets), timeout_s, kill_group, fds)
    log(f"{out}: end, exit {rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
