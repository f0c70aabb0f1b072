#!/usr/bin/env bash
# Start the project container on a DGX Spark (or any host with the NVIDIA container toolkit).
#
#   ./lauch_docker.sh [--build] [--host-net] [--] [COMMAND [ARGS...]]
#
#   --build      docker build the image from this checkout first (otherwise nothing is built)
#   --host-net   --network host (+ RDMA devices when present), for NCCL across two Sparks
#   COMMAND      what to run inside the container (default: bash)
#
# Environment:
#   IMAGE        image tag to build/run            (default: dgx-spark-rlhf:latest)
#   HF_HOME      host Hugging Face cache to mount   (default: $HOME/.cache/huggingface)
#   BASE_IMAGE   with --build: NGC base image passed as --build-arg
#   DOCKER       docker client to call              (default: docker; tests set a fake one)
#   HF_TOKEN, WANDB_API_KEY
#                forwarded to the container BY NAME only (docker's `-e NAME` reads the value from
#                this script's environment), so the values never appear in the docker command line,
#                in `ps`, in shell history or in the image.
#
# The Docker socket is never mounted: code inside the container must not control the host's daemon.
set -euo pipefail

IMAGE="${IMAGE:-dgx-spark-rlhf:latest}"
DOCKER="${DOCKER:-docker}"
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Must match WORKDIR in the Dockerfile: the editable install points there, so the mounted checkout
# is the code that runs.
CONTAINER_WORKDIR=/workspace/dgx_spark_summary_from_human_feedback
HOST_HF_CACHE="${HF_HOME:-$HOME/.cache/huggingface}"

usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

build=0
host_net=0
while (($#)); do
    case "$1" in
        --build) build=1; shift ;;
        --host-net) host_net=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) break ;;  # first non-option word starts the container command
    esac
done
if (($# == 0)); then
    set -- bash
fi

if ((build)); then
    build_args=()
    if [[ -n "${BASE_IMAGE:-}" ]]; then
        build_args+=(--build-arg "BASE_IMAGE=${BASE_IMAGE}")
    fi
    "$DOCKER" build "${build_args[@]+"${build_args[@]}"}" -t "$IMAGE" "$REPO_DIR"
fi

# Create the cache on the host first; otherwise the daemon creates it owned by root.
mkdir -p "$HOST_HF_CACHE"

run_args=(
    run --rm
    --gpus all
    # PyTorch DataLoader workers share tensors through /dev/shm; the default 64 MB is far too small.
    --ipc=host
    # Unlimited locked memory (pinned host buffers, RDMA) and a 64 MB stack, as NVIDIA recommends
    # for its PyTorch containers.
    --ulimit memlock=-1
    --ulimit stack=67108864
    -v "${REPO_DIR}:${CONTAINER_WORKDIR}"
    -v "${HOST_HF_CACHE}:/root/.cache/huggingface"
    -w "$CONTAINER_WORKDIR"
    # Secrets by name only: no `=value`, so nothing secret is on this command line.
    -e HF_TOKEN
    -e WANDB_API_KEY
)

# -it wants a terminal on stdin; without one (nohup, CI, pipes into the script) docker refuses -t,
# so fall back to -i alone.
if [[ -t 0 ]]; then
    run_args+=(-it)
else
    run_args+=(-i)
fi

if ((host_net)); then
    # Two Sparks talk NCCL over the ConnectX-7 (RoCE): the container needs the host's interfaces and
    # the RDMA verbs devices. NCCL settings, and gloo's interface (CPU collectives, e.g. the
    # --device cpu runs), are forwarded by name if the caller set them.
    run_args+=(--network host -e NCCL_SOCKET_IFNAME -e NCCL_IB_HCA -e NCCL_DEBUG -e GLOO_SOCKET_IFNAME)
    if [[ -d /dev/infiniband ]]; then
        run_args+=(--device /dev/infiniband)
    fi
fi

exec "$DOCKER" "${run_args[@]}" "$IMAGE" "$@"
