#
# Container for SFT -> reward model -> PPO on an NVIDIA DGX Spark (GB10, sm_121, CUDA 13, arm64).
#
#   docker build -t dgx-spark-rlhf:latest .
#   ./lauch_docker.sh            # or: ./lauch_docker.sh --build
#
# Nothing secret is baked in: HF_TOKEN / WANDB_API_KEY are passed by name at `docker run` time
# (see lauch_docker.sh), never as build arguments or image environment.

# NGC PyTorch 25.11 (CUDA 13, torch 2.10.0a0 built with sm_121 for GB10) is the oldest release this
# project targets: earlier tags ship torch 2.9.0a0, a pre-release that does not satisfy pyproject's
# torch>=2.9. The image is multi-arch (arm64 for the Spark, amd64 for x86 hosts), so the same
# Dockerfile builds on both. Move up with --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:<YY.MM>-py3.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${BASE_IMAGE}

# Triton ships its own ptxas, which is too old to know sm_121a and fails every kernel compile
# (torch.compile, Triton kernels); the CUDA 13 toolkit's ptxas in the image handles it.
ENV TRITON_PTXAS_PATH=/usr/local/cuda/bin/ptxas
# Model/dataset cache; lauch_docker.sh mounts the host's cache here so downloads persist.
ENV HF_HOME=/root/.cache/huggingface
# Logs appear immediately (tee, docker logs) instead of in buffered bursts.
ENV PYTHONUNBUFFERED=1
# The fast tokenizers' thread pool warns and can deadlock once DataLoader workers fork.
ENV TOKENIZERS_PARALLELISM=false
# Smaller layers, quieter builds.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# Attention: the code defaults to PyTorch SDPA. flash-attn has no sm_121 build (and compiling it
# from source on the Spark takes hours for no gain here), so it is deliberately NOT installed;
# neither is xformers. Triton comes prebuilt with the NGC torch; nothing is built from source.

WORKDIR /workspace/dgx_spark_summary_from_human_feedback

# Pin torch (and its matching Triton) to exactly what the NGC image ships. NGC's torch is a custom
# build (e.g. 2.10.0a0+b558c986e8.nv25.11); an unpinned `pip install` may otherwise "upgrade" it
# to a PyPI wheel that lacks the GB10 kernels. The versions are read with importlib.metadata rather
# than `pip freeze`, which can print NGC's torch as `torch @ file://...`.
# This file replaces NGC's own /etc/pip/constraint.txt (it pins every preinstalled package, which
# would block the newer transformers/datasets/tqdm this project needs); only the CUDA-built core is
# frozen. PIP_CONSTRAINT stays set so a later `pip install` inside the container is guarded too.
RUN mkdir -p /etc/pip \
 && for pkg in torch triton pytorch-triton; do \
      python -c 'import importlib.metadata as m, sys; print(f"{sys.argv[1]}=={m.version(sys.argv[1])}")' "$pkg" 2>/dev/null || true; \
    done > /etc/pip/project-constraints.txt \
 && grep -q '^torch==' /etc/pip/project-constraints.txt \
 && cat /etc/pip/project-constraints.txt
ENV PIP_CONSTRAINT=/etc/pip/project-constraints.txt

# Dependencies first, for layer caching: this layer is rebuilt only when pyproject.toml or the
# package changes, not on every edit to tests/docs. README.m[d] is a glob so the build also works
# before a README exists (pyproject names it as the long description).
COPY pyproject.toml README.m[d] ./
COPY dgx_spark_summary_from_human_feedback ./dgx_spark_summary_from_human_feedback

# --no-build-isolation: build with the image's setuptools instead of a throwaway env (which would
# resolve its own packages and is where torch swaps tend to sneak in). Editable (-e) so that when
# lauch_docker.sh mounts the host checkout over this directory, the mounted code is what runs.
# bitsandbytes >= 0.48 (from pyproject) has CUDA 13 aarch64 wheels, so it installs as a wheel.
# The final check fails the build if torch was replaced anyway.
RUN TORCH_BEFORE="$(python -c 'import torch; print(torch.__version__)')" \
 && pip install --no-build-isolation -e ".[test]" \
 && TORCH_AFTER="$(python -c 'import torch; print(torch.__version__)')" \
 && echo "torch before: ${TORCH_BEFORE}  after: ${TORCH_AFTER}" \
 && test "${TORCH_BEFORE}" = "${TORCH_AFTER}" \
 && python -c "import bitsandbytes, transformers; print('bitsandbytes', bitsandbytes.__version__, 'transformers', transformers.__version__)"

# The rest of the repository (tests, scripts, docs). .dockerignore keeps out .venv, .git,
# outputs, data and caches.
COPY . .

CMD ["bash"]
