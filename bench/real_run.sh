#!/usr/bin/env bash
# A measured real run on CPU (issue 14): SmolLM2-135M-Instruct (real pretrained weights) on the
# real TL;DR sample, through every stage: SFT -> reward model -> PPO -> evaluate.
#
#   bash bench/real_run.sh [OUT]          # default OUT=out/real; ~15 CPU-minutes (wall: that / your share of a core)
#
# Sized for a 2-core machine shared with other jobs: 135M parameters train at about 25 tokens/s
# on one free core, so each stage runs a handful of steps on small batches, queries are cut to 96
# tokens (OpenAI's rule: at the post's last newline that fits, else between tokens), and every
# evaluation uses 16 posts or 64 pairs. A smoke test of the real pipeline, not a study. The
# data: the 1,000 posts and 1,000 GPT-4-judged pairs of ../shared/data/tldr_real_sample, each
# shuffled with seed 0 and cut 800 train / 200 validation (bench/real_split.py). The README
# section "A real small-model run (CPU)" quotes this script's output (OUT/summary.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
# one intra-op thread: on 2 cores shared with other jobs, torch's two threads wait on each other at
# every small op (decoding a token is ~300 of them): with two, sampling 16 posts had not finished
# after 19 min (load 10); with one, the whole SFT stage took 4 min (load 3-6; not a clean A/B)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY="${PYTHON:-.venv/bin/python}"
OUT="${1:-out/real}"
QUERY=96                       # query tokens (the recipe's 512 costs ~4x here)
SFT_STEPS="${SFT_STEPS:-8}"    # optimizer steps of 4 posts / 4 pairs / 8 episodes: set these to run longer
RM_STEPS="${RM_STEPS:-6}"
PPO_UPDATES="${PPO_UPDATES:-2}"
mkdir -p "$OUT"
stamp() { echo "== $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg): $*"; }

MODEL=$(PYTHON="$PY" ../shared/tools/real_model.sh)
stamp "model $MODEL"
"$PY" bench/real_split.py "$OUT/data" --seed 0 --validation 200
"$PY" -m dgx_spark_summary_from_human_feedback.process_sft_dataset --dataset "$OUT/data/sft" --tokenizer "$MODEL" \
  --output-dir "$OUT/sft_data" --query-length $QUERY --response-length 53 --long-response truncate
"$PY" -m dgx_spark_summary_from_human_feedback.process_comparison_dataset --dataset "$OUT/data/comparisons" --tokenizer "$MODEL" \
  --output-dir "$OUT/comparison_data" --query-length $QUERY --response-length 64 --long-response truncate

stamp "sft"
# SFT_STEPS steps of 4 posts at lr 5e-5 (~15x the recipe's: a few updates, not 900); validation loss on 16
# posts and samples of the same 16 posts at step 0 (the base model) and at the end
"$PY" sft.py --model "$MODEL" --dataset "$OUT/sft_data" --output-dir "$OUT/sft" --query-length $QUERY --response-length 53 \
  --max-steps $SFT_STEPS --batch-size 4 --micro-batch-size 4 --lr 5e-5 --min-lr 5e-6 --warmup-steps 1 --decay-steps $SFT_STEPS \
  --eval-interval $SFT_STEPS --num-eval-rows 16 --num-eval-samples 16

stamp "reward"
# from the SFT model (N+ detail 9); RM_STEPS steps of 4 pairs; accuracy on 32 pairs at step 0 and the
# end, then on 64 held-back pairs (with the length rule beside it) after normalisation
"$PY" reward.py --sft-path "$OUT/sft" --dataset "$OUT/comparison_data" --sft-dataset "$OUT/sft_data" --output-dir "$OUT/reward" \
  --query-length $QUERY --response-length 64 --max-steps $RM_STEPS --batch-size 4 --micro-batch-size 4 --lr 2e-5 \
  --eval-interval $RM_STEPS --num-eval-rows 32 --max-final-eval-rows 64 --num-norm-rows 16

stamp "ppo"
# PPO_UPDATES updates of 8 queries, 53 sampled tokens (N+), 1 PPO epoch; lr 1e-5, KL coefficient 0.05 (N+)
"$PY" ppo.py --sft-path "$OUT/sft" --reward-path "$OUT/reward" --dataset "$OUT/sft_data" --output-dir "$OUT/ppo" \
  --total-episodes $((8 * PPO_UPDATES)) --batch-size 8 --micro-batch-size 4 --forward-batch-size 8 --generation-batch-size 8 --ppo-epochs 1 \
  --lr 1e-5 --sample-interval 1 --save-interval $PPO_UPDATES

stamp "evaluate"
# base, SFT and PPO on the same 16 validation posts, scored by the reward model, vs the references
"$PY" -m dgx_spark_summary_from_human_feedback.evaluate --policy "$MODEL" --policy "$OUT/sft" --policy "$OUT/ppo" \
  --reward-path "$OUT/reward" --dataset "$OUT/sft_data" --split validation --num-samples 16 --query-length $QUERY \
  --batch-size 8 --output-dir "$OUT/eval"
stamp "done"
"$PY" bench/real_summary.py "$OUT" | tee "$OUT/summary.md"
