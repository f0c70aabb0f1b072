#!/usr/bin/env bash
# Run every benchmark; each prints its table and appends a JSON line to bench/results.jsonl.
#
#   bash bench/setup.sh        # once: bench/.venv-trl (latest trl) and bench/.venv-trl112 (trl 1.12.0)
#   bash bench/run_all.sh      # ~40 min on a busy 2-core box
#   BENCH_THREADS=2 bash bench/run_all.sh     # torch threads (default: all cores, 1 if the box is busy)
#   ARGS_SFT="--repeats 8" ARGS_PPO="--rounds 5" bash bench/run_all.sh
#
# Which interpreter runs what: the SFT, reward, DPO and GRPO benchmarks run ours and TRL side by side in
# bench/.venv-trl; the PPO benchmark runs ours and TRL 1.12's PPOTrainer side by side in
# bench/.venv-trl112 (the project is installed in both, with the project venv's torch and
# transformers); preprocessing needs no TRL and runs in the project venv.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TRL_EXPERIMENTAL_SILENCE=1 PYTHONWARNINGS=ignore
for venv in bench/.venv-trl bench/.venv-trl112; do
    [[ -x $venv/bin/python ]] || { echo "$venv missing: run bash bench/setup.sh first" >&2; exit 1; }
done
quiet() { grep -v --line-buffered -E "Loading weights|Writing model shards|it/s\]$|s/it\]$|^\{'|^===training|Passing .generation_config"; }

echo "== SFT step: ours vs TRL SFTTrainer vs pad-to-575"
bench/.venv-trl/bin/python bench/bench_sft.py ${ARGS_SFT:-} 2>&1 | quiet
echo "== reward step: ours vs TRL RewardTrainer"
bench/.venv-trl/bin/python bench/bench_reward.py ${ARGS_REWARD:-} 2>&1 | quiet
echo "== DPO step: ours vs TRL DPOTrainer"
bench/.venv-trl/bin/python bench/bench_dpo.py ${ARGS_DPO:-} 2>&1 | quiet
echo "== PPO update: ours vs TRL 1.12 PPOTrainer vs padded queries"
bench/.venv-trl112/bin/python bench/bench_ppo.py ${ARGS_PPO:-} 2>&1 | quiet
echo "== GRPO and RLOO updates: ours vs TRL GRPOTrainer / RLOOTrainer"
bench/.venv-trl/bin/python bench/bench_grpo.py ${ARGS_GRPO:-} 2>&1 | quiet
echo "== SFT preprocessing of 116,722 posts"
.venv/bin/python bench/bench_preprocess.py ${ARGS_PREPROCESS:-} 2>&1 | quiet
echo "results appended to bench/results.jsonl"
