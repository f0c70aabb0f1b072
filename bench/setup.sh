#!/usr/bin/env bash
# Create the two TRL virtual environments the benchmarks compare against, beside (not in) the
# project venv, so the project's own dependencies stay clean:
#   bench/.venv-trl     latest trl (SFTTrainer, RewardTrainer)
#   bench/.venv-trl112  trl==1.12.0 (the last release with PPOTrainer, in trl.experimental.ppo)
# Both get torch==2.13.0 FIRST (pip takes the local CPU wheel for that exact version; an unpinned
# torch would pull a multi-GB CUDA build) and the project itself, editable.
#
#   bash bench/setup.sh            # create both (skips a venv that already imports trl)
#   FORCE=1 bash bench/setup.sh    # recreate both
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
TRL_LATEST=${TRL_LATEST:-trl}          # pin e.g. TRL_LATEST=trl==1.16.0 to reproduce exactly
TRL_PPO=${TRL_PPO:-trl==1.12.0}

make_venv() {  # make_venv DIR TRL_SPEC
    local dir=$1 spec=$2
    if [[ -z "${FORCE:-}" ]] && "$dir/bin/python" -c "import trl" 2>/dev/null; then
        echo "$dir: trl $("$dir/bin/python" -c 'import trl; print(trl.__version__)') already there"
        return
    fi
    rm -rf "$dir"
    "$PY" -m venv "$dir"
    "$dir/bin/pip" install -q --upgrade pip
    "$dir/bin/pip" install -q torch==2.13.0                 # the local CPU wheel, before anything can pull CUDA
    "$dir/bin/pip" install -q -e "$ROOT"                    # project (keeps the torch above: it asks torch>=2.9)
    "$dir/bin/pip" install -q "$spec" torch==2.13.0 "transformers==$("$ROOT/.venv/bin/python" -c 'import transformers; print(transformers.__version__)' 2>/dev/null || echo 5.24.0)"
    "$dir/bin/python" -c "import torch, transformers, trl; print('$dir: torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
}

make_venv bench/.venv-trl "$TRL_LATEST"
make_venv bench/.venv-trl112 "$TRL_PPO"
"bench/.venv-trl112/bin/python" -c "from trl.experimental.ppo import PPOConfig, PPOTrainer; print('PPOTrainer importable')"
