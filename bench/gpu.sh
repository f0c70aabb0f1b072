#!/usr/bin/env bash
# One offline GPU benchmark run of our training code (bench/gpu_bench.py) on a lent H100/H200.
#
#   bash bench/gpu.sh --download-wheels   # HERE (needs PyPI): wheels the device image lacks -> .whl/
#   bash bench/gpu.sh [gpu_bench args]    # THERE, in the repo root: checks, installs .whl/, runs
#
# The device machine has no network. Its image has python3 with CUDA torch, numpy, tokenizers,
# safetensors, tqdm and an older transformers, but not datasets (nor dill, multiprocess, tyro,
# bitsandbytes). Carry them as wheels: run --download-wheels here, keep .whl/ out of git
# (`echo /.whl/ >> .git/info/exclude`) and name `.whl` in the run's carry. Everything that travels
# must stay under 64 MiB: the wheels are ~58 MB, so untracked bulk such as bench/.cache/ must be
# ignored too. Writes $OUT/gpu_bench.json, $OUT/gpu_bench.log and $OUT/nvidia-smi.txt (or bench/).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=${BENCH_WHEELS:-.whl}
PY=${PYTHON:-python3}

if [[ "${1:-}" == "--download-wheels" ]]; then
    DL=${PYTHON:-.venv/bin/python}
    [[ -x "$DL" ]] || DL=python3
    # the versions of this checkout's .venv (what the tests pass with), for CPython 3.12 x86-64
    pin() {
        local v
        v=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true)
        if [[ -n "$v" ]]; then echo "$1==$v"; else echo "$1"; fi
    }
    mkdir -p "$WHEELS"
    packages=()
    for p in transformers datasets dill multiprocess tyro docstring-parser typeguard bitsandbytes; do packages+=("$(pin "$p")"); done
    echo "gpu.sh: downloading ${packages[*]} into $WHEELS"
    "$DL" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$WHEELS" "${packages[@]}"
    du -sh "$WHEELS"
    # what a run would send: tracked + untracked-not-ignored files (read-only git queries)
    bytes=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r du -cb 2>/dev/null | awk '/\ttotal$/ {s += $1} END {print s + 0}')
    wheel_bytes=$(du -sb "$WHEELS" | cut -f1)
    if git check-ignore -q "$WHEELS/x.whl" 2>/dev/null; then total=$((bytes + wheel_bytes)); else total=$bytes; fi
    echo "gpu.sh: the working tree + carried wheels come to $((total / 1048576)) MiB (limit 64 MiB)"
    if ((total > 64 * 1048576)); then
        echo "gpu.sh: too big to travel; largest untracked, not-ignored paths:" >&2
        git ls-files -z --others --exclude-standard | xargs -0 -r du -b 2>/dev/null | sort -rn | head -5 >&2
        echo "gpu.sh: ignore them (e.g. echo /bench/.cache/ >> .git/info/exclude) or carry fewer wheels" >&2
    fi
    git check-ignore -q "$WHEELS/x.whl" 2>/dev/null || echo "gpu.sh: note: $WHEELS is not ignored by git: it travels as an untracked file (and could be committed)"
    exit 0
fi

OUT_DIR=${OUT:-bench}
mkdir -p "$OUT_DIR"

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu.sh: nvidia-smi not found: run this on a machine with an NVIDIA GPU (for a CPU check: python3 bench/gpu_bench.py --tiny --device cpu)" >&2
    exit 2
fi
nvidia-smi | tee "$OUT_DIR/nvidia-smi.txt"

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    site=/tmp/gpu_bench_site
    echo "gpu.sh: installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

if ! "$PY" -c "import transformers" 2>/dev/null; then
    echo "gpu.sh: '$PY' cannot import transformers: this machine lacks the project's Python dependencies." >&2
    echo "gpu.sh: run 'bash bench/gpu.sh --download-wheels' where PyPI is reachable and carry .whl, or set PYTHON to an interpreter that has them." >&2
    exit 3
fi
# the versions that run (gpu_bench.json records them too): transformers older than pyproject's 5.24 may fail PPO
"$PY" -c "import sys; sys.path.insert(0, 'bench'); import gpu_bench, torch; print('gpu.sh:', gpu_bench.versions(), 'cuda', torch.cuda.is_available())"

rc=0
PYTHONUNBUFFERED=1 timeout 570 "$PY" bench/gpu_bench.py "$@" 2>&1 | tee "$OUT_DIR/gpu_bench.log" || rc=$?
((rc != 124)) || echo "gpu.sh: gpu_bench.py hit the 570 s timeout; $OUT_DIR/gpu_bench.json holds what was measured before" >&2
exit "$rc"
