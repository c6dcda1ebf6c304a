# syntax=docker/dockerfile:1
# ptxlab worker image: the ptxlab package, its experiment YAMLs and a GPU claim entrypoint.
#
# The PyPI torch wheels for x86_64 bring their own CUDA 13 libraries (cuDNN, cuBLAS, NCCL), so
# the base image only supplies the matching CUDA 13 user space and the NVIDIA runtime settings;
# a cudnn-runtime base would carry a second copy of cuDNN. CUDA 13 needs an NVIDIA driver >= 580
# on the host, plus the NVIDIA Container Toolkit. To move to another torch release, change the
# torch/torchvision pair below and keep the base image on the CUDA major that release uses.
FROM nvidia/cuda:13.0.2-base-ubuntu24.04

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NO_ALBUMENTATIONS_UPDATE=1 \
    CUDA_DEVICE_ORDER=PCI_BUS_ID \
    PTXLAB_GPU_CLAIM_DIR=/run/ptxlab-gpu-claims

# torch and torchvision are released in pairs (torchvision 0.N+15 goes with torch 2.N); the pins
# become a constraints file that every later pip install honours, so no dependency moves them.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
RUN printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" \
        > /opt/torch-constraints.txt \
    && pip install --constraint /opt/torch-constraints.txt torch torchvision
ENV PIP_CONSTRAINT=/opt/torch-constraints.txt

WORKDIR /app

# Dependencies first, read from pyproject.toml, so that a change to the code alone reuses them.
COPY pyproject.toml ./
RUN python -c "import tomllib; \
print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY ptxlab ./ptxlab
RUN pip install --no-deps . && rm -rf build ./*.egg-info
COPY experiments ./experiments

COPY --chmod=755 <<'EOF' /usr/local/bin/ptxlab-claim-gpu
#!/usr/bin/env bash
# Run the command on a GPU of its own. Replicas of the compose `worker` service all see every
# GPU (a Docker GPU request by count always hands out GPU 0 first), so each claims the first GPU
# whose lock file in the shared $PTXLAB_GPU_CLAIM_DIR it can flock; the command inherits the
# lock and holds it until it exits. A CUDA_VISIBLE_DEVICES set by the caller is kept as it is,
# and without nvidia-smi (no GPU runtime) the command runs unchanged.
set -euo pipefail
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]] || ! command -v nvidia-smi >/dev/null; then
    exec "$@"
fi
mkdir -p "$PTXLAB_GPU_CLAIM_DIR"
gpu_count=$(nvidia-smi --list-gpus | wc -l)
for ((gpu = 0; gpu < gpu_count; gpu++)); do
    exec 9>"$PTXLAB_GPU_CLAIM_DIR/gpu-$gpu.lock"
    if flock --nonblock 9; then
        echo "ptxlab-claim-gpu: running on GPU $gpu of $gpu_count" >&2
        export CUDA_VISIBLE_DEVICES=$gpu
        exec "$@"
    fi
done
echo "ptxlab-claim-gpu: all $gpu_count GPUs are claimed by other workers;" \
    "run at most $gpu_count workers on this host" >&2
exit 1
EOF

RUN useradd --create-home --shell /bin/bash ptxlab \
    && mkdir -p /cache "$PTXLAB_GPU_CLAIM_DIR" \
    && chown ptxlab: /app /cache "$PTXLAB_GPU_CLAIM_DIR"
USER ptxlab
ENV HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch

ENTRYPOINT ["ptxlab-claim-gpu"]
CMD ["ptxlab", "--help"]
