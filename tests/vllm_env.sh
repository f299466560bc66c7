#!/usr/bin/env bash
# Creates the separate vLLM environment (once) and runs the vllm tests in it.
#   tests/vllm_env.sh            # venv at $VLLM_VENV (default: .venv-vllm in the repo)
#   VLLM_VENV=/work/vllm-venv tests/vllm_env.sh -x
# Creating it downloads ~3 GB and takes ~5 min (10 GB on disk); the tests take ~1 min on 2 cores.
# vLLM imports on a machine without a GPU; nothing here starts its engine.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${VLLM_VENV:-$repo/.venv-vllm}"
req="$repo/containers/vllm/requirements.in"
if [[ ! -x "$venv/bin/python" ]]; then
    echo "vllm_env: creating $venv from $req" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet -r "$req"
fi
want="$(sed -n 's/^vllm==//p' "$req")"
have="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm"))')"
if [[ "$have" != "$want" ]]; then
    echo "vllm_env: $venv has vllm $have, $req pins $want: remove the venv to rebuild it" >&2
    exit 1
fi
cd "$repo"
PYTHONPATH="$repo" exec "$venv/bin/python" -m pytest tests/unit/test_vllm_*.py -q -p no:cacheprovider "$@"
