# The training image: CUDA 13 runtime, Python, and this project with its pinned dependencies.
#
#   docker build -t resnet-depth .
#   docker run --gpus all --shm-size 8g resnet-depth --config configs/cpu/digits_resnet20.toml
#   docker run --gpus all --shm-size 8g --entrypoint launch/torchrun_local.sh resnet-depth \
#       configs/imagenet/resnet50.toml --data.root=/data/imagenet
#
# Under SLURM the image runs through enroot/pyxis or Apptainer (README, "Running on a SLURM cluster").
# torch's wheels bring their own CUDA 13 libraries, cuDNN and NCCL; the base image supplies the
# CUDA 13 runtime environment (driver compatibility, NVIDIA container hooks). Dependency versions
# come from pyproject.toml (tests/test_dockerfile.py keeps the two in step).
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# procps: launch/torchrun_node.sh finds torchrun's workers with pgrep to pass a stop signal on.
# Ubuntu's own package versions are what the pinned base image ships; pinning them again only breaks
# the build when the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates procps \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /opt/resnet

# torch first and in its own layer (the largest download): DeepSpeed's setup imports it, so the
# project is installed without build isolation, exactly as the Makefile does.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
RUN python -m pip install pip==25.3 setuptools==84.2.1 wheel==0.48.0 \
 && python -m pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

COPY pyproject.toml README.md ./
COPY pipeline/ pipeline/
COPY monitoring/ monitoring/
RUN python -m pip install --no-build-isolation . \
 && python -c "import deepspeed, mlflow, nvidia.dali, s3fs, torch"

COPY configs/ configs/
COPY launch/ launch/

# Runs as an unprivileged user; runs/ and .cache/ (outputs and generated datasets, relative to the
# working directory) are writable by it. Mount them from the host to keep them.
# (Ubuntu 24.04 images come with an "ubuntu" user holding uid 1000: make room for ours.)
RUN (userdel --remove ubuntu 2>/dev/null || true) \
 && (groupdel ubuntu 2>/dev/null || true) \
 && useradd --create-home --uid 1000 --user-group --shell /bin/bash trainer \
 && mkdir -p runs .cache \
 && chown 1000:1000 runs .cache
USER 1000:1000

ENTRYPOINT ["python", "pipeline/train.py"]
CMD ["--help"]
