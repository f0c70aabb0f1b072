"""Reward-model optimizer step: ours (`reward.train_step`) vs TRL's RewardTrainer (bench/README.md).

    bench/.venv-trl/bin/python bench/bench_reward.py
    bench/.venv-trl/bin/python bench/bench_reward.py --repeats 8 --batch-size 16 --micro-batch-size 8

The same reward model (common.py: our N+ head on the benchmark backbone), comparisons per step
(`training.batch_indices` over the real-sample pairs, query 512, responses 133) and batch layout; fp32,
lr 5e-5, AdamW (0.9, 0.999), no weight decay, clip 1.0:
- ours: `reward.train_step`, the step reward.main runs (length-sorted micro-batches, each query once with
  both summaries on its KV cache, `pairwise_loss`, fused AdamW).
- trl-default: RewardTrainer on our exact query+summary+EOS ids (`chosen_ids` / `rejected_ids`), TRL's
  defaults otherwise (gradient checkpointing, logging every 10 steps). trl-fast: gradient checkpointing
  off, logging only at the end, no tqdm.
Interleaved as bench_sft.py. Throughput = non-pad tokens (chosen + rejected) / seconds.
"""

from __future__ import annotations

import common
import torch

import reward
from dgx_spark_summary_from_human_feedback.training import PAIR_COLUMNS

TRL_VARIANTS = {"default": {}, "fast": {"gradient_checkpointing": False, "logging_steps": 10_000, "disable_tqdm": True}}


def trl_loss(variant, reward_dir, tokenizer, ds, steps, cfg, on_round) -> float:
    import datasets
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    rows = ds.select([i for indices in steps for i in indices])
    ids = {}
    for side in ("chosen", "rejected"):
        ids[f"{side}_ids"] = [t[:n] for t, n in zip(rows[f"query_{side}_token"], rows[f"query_{side}_token_len"])]
    load = {"num_labels": 1, "dtype": torch.float32, "attn_implementation": "sdpa"}
    model = AutoModelForSequenceClassification.from_pretrained(str(reward_dir), **load)
    dataset, settings = datasets.Dataset.from_dict(ids), TRL_VARIANTS[variant]
    classes = (RewardTrainer, RewardConfig)
    return common.trl_train(classes, model, dataset, tokenizer, cfg, len(steps), on_round, **settings)


def main() -> None:
    args = common.step_bench_args(__doc__)
    runtime, tokenizer, _, reward_dir = common.setup(args.tokenizer)
    cfg = reward.Config(batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, lr=5e-5, seed=42)
    ds = common.comparison_data(tokenizer)
    train = ds.with_format("torch", columns=PAIR_COLUMNS)

    def contenders(steps) -> dict:  # a fresh copy per TRL variant, so that the losses compare
        return {"ours": common.reward_step(reward_dir, tokenizer, train, cfg, runtime)}

    def trl(variant, steps, on_round) -> float:
        return trl_loss(variant, reward_dir, tokenizer, ds, steps, cfg, on_round)

    columns = ["query_chosen_token_len", "query_rejected_token_len"]
    common.step_bench("reward", "RewardTrainer", args, cfg, ds, columns, contenders, trl, TRL_VARIANTS)


if __name__ == "__main__":
    main()
