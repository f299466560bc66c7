"""Build one framework image: `docker build --iidfile results/images/<image>.iid`.

    python -m workflow.lib.images <image> --iid results/images/<image>.iid [--build-arg K=V ...]

Which files each image copies is declared once here (COPIES) and used twice: as the rule's
inputs (so an image rebuilds exactly when its Dockerfile, lock or copied code changes) and to
check the Dockerfiles in the tests. The git revision and source URL become OCI labels at
build time; they are not inputs, so a new commit alone rebuilds nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from frameworks import registry

ENGINE_IMAGES = tuple(n for n, f in registry.FRAMEWORKS.items() if f.on_engine)  # FROM the shared engine stage
IMAGES = ("engine", *registry.FRAMEWORKS)  # one image per framework (image_of), the engine only a base
ENGINE_CODE = ("frameworks/__init__.py", "frameworks/registry.py", "frameworks/harness", "frameworks/models",
               "frameworks/hf")
COPIES = {
    "engine": ENGINE_CODE,
    "hf": (),
    "h2o": ("frameworks/h2o",),
    "infinigen": ("frameworks/infinigen",),
    "vllm": ("frameworks/__init__.py", "frameworks/registry.py", "frameworks/harness", "frameworks/models",
             "frameworks/vllm"),
}
CODE_SUFFIXES = {".py", ".json", ".yaml"}
TAG = "kvstudy/{image}"


def image_of(framework: str) -> str:
    return framework  # one image per framework; the engine is only a base


def code_files(image: str, root: Path = Path(".")) -> list[str]:
    files: set[str] = set()
    for entry in COPIES[image]:
        p = root / entry
        if p.is_file():
            files.add(entry)
        elif p.is_dir():
            files.update(str(f.relative_to(root)) for f in p.rglob("*")
                         if f.is_file() and f.suffix in CODE_SUFFIXES and "__pycache__" not in f.parts)
    return sorted(files)


def lock_file(image: str, build_args: dict[str, str]) -> str | None:
    if image == "engine":
        return f"containers/engine/{build_args.get('LOCK', 'requirements.lock')}"
    return "containers/vllm/requirements.lock" if image == "vllm" else None


def _git(*args: str) -> str:
    try:
        p = subprocess.run(["git", *args], capture_output=True, text=True, timeout=20)
        return p.stdout.strip() if p.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_argv(image: str, iid: str, build_args: dict[str, str], network: str | None) -> list[str]:
    args = dict(build_args)
    if image in ENGINE_IMAGES:  # the engine image by a content tag: BuildKit resolves tags, not ids
        engine_id = Path(iid).with_name("engine.iid").read_text().strip()
        args["ENGINE_IMAGE"] = f"{TAG.format(image='engine')}:{engine_id.removeprefix('sha256:')[:16]}"
    args.setdefault("VCS_REF", _git("rev-parse", "HEAD"))
    args.setdefault("SOURCE_URL", _git("remote", "get-url", "origin"))
    argv = ["docker", "build", "--file", f"containers/{image}/Dockerfile", "--iidfile", iid,
            "--tag", f"{TAG.format(image=image)}:latest"]
    if network:
        argv += ["--network", network]
    for k, v in sorted(args.items()):
        argv += ["--build-arg", f"{k}={v}"]
    return argv + ["."]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvstudy-images")
    ap.add_argument("image", choices=IMAGES)
    ap.add_argument("--iid", required=True)
    ap.add_argument("--build-arg", action="append", default=[], metavar="K=V")
    ap.add_argument("--network", help="docker build --network (host: a daemon without a bridge)")
    args = ap.parse_args(argv)
    build_args = dict(a.split("=", 1) for a in args.build_arg)
    cmd = build_argv(args.image, args.iid, build_args, args.network)
    print("kvstudy-images:", " ".join(cmd), flush=True)
    Path(args.iid).unlink(missing_ok=True)
    rc = subprocess.run(cmd).returncode
    if rc != 0 or not Path(args.iid).is_file():
        Path(args.iid).unlink(missing_ok=True)
        print(f"kvstudy-images: building image {args.image!r} failed (exit {rc}; docker's output is above). "
              f"Fix containers/{args.image}/Dockerfile or its lock (containers/refresh-locks.sh), check the "
              "network for PyPI and the base image, or run the cells without images: --config runner=local",
              file=sys.stderr)
        return 1
    image_id = Path(args.iid).read_text().strip()
    if args.image == "engine":  # the content tag the framework images build FROM
        subprocess.run(["docker", "tag", image_id, f"{TAG.format(image='engine')}:{image_id.removeprefix('sha256:')[:16]}"],
                       check=True)
    print(f"kvstudy-images: {args.image} = {image_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
