# Sourced by the GPU scripts that drive Snakemake (gpu_two_cells.sh, gpu_kill.sh): this checkout first
# on the path and, on a GPU machine without Snakemake, the carried wheels of gpu_wheels.sh (.whl/).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import snakemake" 2>/dev/null; then
    site=$(mktemp -d /tmp/kvstudy-site.XXXXXX)
    python3 -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl
    export PYTHONPATH="$site:$PYTHONPATH"
fi
