"""List the cells that did not measure (failed, oom, timeout, unsupported, corrupt, missing, pending) with the
command that reruns each.

    python -m workflow.lib.status [--config preset=smoke frameworks='[hf]'] [--all]

Reads the same config as the Snakefile (config/config.yaml, overridden by --config KEY=VALUE,
values in YAML) and the result files; runs nothing.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import yaml

from frameworks.harness import result as cell_result
from workflow.lib import celltable

REPO = celltable.REPO


def cell_states(config: dict) -> list[tuple[str, str, str]]:
    """(path, state, message) for every cell; state: a result status, 'failed' or 'pending'."""
    out = []
    for path in sorted(celltable.cells_from_config(config)):
        p = REPO / path
        log = REPO / "logs" / Path(path).relative_to("results").with_suffix(".log")
        if p.exists():
            try:
                res = cell_result.load(p)
                out.append((path, res["status"], res["message"]))
            except cell_result.ResultError as e:
                out.append((path, "corrupt", str(e).replace(f"{REPO}/", "")))
        elif log.exists():
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
            tail = lines[-1:]
            where = f"see {log.relative_to(REPO)}" + (f": {tail[0][:200]}" if tail else "")
            # its last run wrote a result (run-cell's last word; the launcher may add its own after it)
            if any(ln.startswith(f"run-cell: {Path(path).stem}: ") for ln in lines[-3:]):
                out.append((path, "missing", f"the result was deleted after its run ({where})"))
            else:
                out.append((path, "failed", where))
        else:
            out.append((path, "pending", "not run yet"))
    return out


def snakemake_command() -> str:
    """This environment's snakemake, as a command that works when pasted in the repo's folder."""
    exe = Path(sys.executable)
    smk = exe.parent / "snakemake"
    if not smk.exists():
        return f"{shlex.quote(str(exe))} -m snakemake"
    try:  # .venv/bin/snakemake rather than an absolute path (not resolved: .venv may be a link)
        return shlex.quote(str(smk.absolute().relative_to(Path.cwd().absolute())))
    except ValueError:
        return shlex.quote(str(smk))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE", help="as snakemake --config")
    ap.add_argument("--all", action="store_true", help="list ok cells too")
    args = ap.parse_args(argv)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for kv in args.config:
        key, _, value = kv.partition("=")
        config[key] = yaml.safe_load(value)
    try:
        states = cell_states(config)
    except celltable.ConfigError as e:
        print(f"kvstudy: {e}", file=sys.stderr)
        return 2
    # targets before --config: it takes every word after it as a config value
    overrides = " ".join(shlex.quote(kv) for kv in args.config)
    cfg = f" --config {overrides}" if overrides else ""
    smk = snakemake_command()
    counts: dict[str, int] = {}
    for path, state, message in states:
        counts[state] = counts.get(state, 0) + 1
        if state != "ok" or args.all:
            print(f"{state:12s} {path}\n             {message}")
            if state in ("failed", "pending", "missing"):  # no output: asking for the file runs it
                print(f"             run:   {smk} --cores all {path}{cfg}")
            elif state != "ok":  # a result exists: force it, and the tables and figures built on it
                print(f"             rerun: {smk} --cores all --forcerun {path}{cfg}")
    print("cells: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
