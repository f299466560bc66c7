#!/usr/bin/env bash
# Wheels for benchmarks/gpu_two_cells.sh on a GPU machine without network or Snakemake:
# snakemake (the host pin) and its whole dependency closure for CPython 3.12 on Linux x86_64,
# into .whl/ (git-ignored; carry it to the machine). Needs uv (pip install uv==0.13.9) and PyPI.
# A dependency published only as an sdist (connection_pool) is pure Python: built into a wheel here.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
pin=$(sed -n 's/^ *"\(snakemake==[^"]*\)",*/\1/p' pyproject.toml)
rm -rf .whl && mkdir .whl
echo "$pin" > .whl/requirements.in
# the index pip is configured with (PIP_INDEX_URL or pip.conf: a mirror or proxy), so that uv and
# the pip downloads below read the same one; none configured: uv's default (PyPI, or UV_INDEX_URL)
index=${PIP_INDEX_URL:-$($py -m pip config get global.index-url 2>/dev/null || true)}
uv pip compile .whl/requirements.in --python-version 3.12 --python-platform x86_64-manylinux_2_28 \
    ${index:+--index-url "$index"} --no-header --no-annotate --quiet --output-file .whl/requirements.txt
while read -r req; do
    [[ -z "$req" || "$req" == \#* ]] && continue
    $py -m pip download --quiet --no-deps --dest .whl --only-binary=:all: --python-version 3.12 --implementation cp \
        --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        "$req" 2>/dev/null || $py -m pip wheel --quiet --no-deps --wheel-dir .whl "$req"
done < .whl/requirements.txt
echo "gpu_wheels: $(ls .whl/*.whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
