"""Reward-model optimizer step: ours (`reward.train_step`) vs TRL's RewardTrainer.

    bench/.venv-trl/bin/python bench/bench_reward.py
    bench/.venv-trl/bin/python bench/bench_reward.py --repeats 8 --batch-size 16 --micro-batch-size 8

Same reward model (common.py: our N+ head on the benchmark backbone), the same comparisons per
step (`training.batch_indices` over the real-sample pairs, query 512, responses 133), the same
batch layout, fp32, lr 5e-5, AdamW (0.9, 0.999), no weight decay, clip 1.0:
- ours: `reward.train_step`, the step reward.main runs (micro-batches sorted by length, each
  query once with both summaries on its KV cache, `pairwise_loss`, fused AdamW).
- trl-default: RewardTrainer on pre-tokenized `chosen_ids` / `rejected_ids` (our exact
  query+summary+EOS ids), TRL's defaults otherwise (gradient checkpointing on, logging every 10
  steps) except fp32, the batch layout, the optimizer settings and sequential sampling.
- trl-fast: gradient checkpointing off, logging only at the end, no tqdm.
Interleaved as bench_sft.py. Throughput = non-pad tokens (chosen + rejected) / seconds.
"""

from __future__ import annotations

import dataclasses
import tempfile

import common
import torch

import reward
from dgx_spark_summary_from_human_feedback.training import PAIR_COLUMNS, setup_runtime

TRL_VARIANTS = {"default": {}, "fast": dict(gradient_checkpointing=False, logging_steps=10_000, disable_tqdm=True)}


def trl_loss(variant, reward_dir, tokenizer, ds, steps, cfg, on_round) -> float:
    import datasets
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    rows = ds.select([i for indices in steps for i in indices])
    dataset = datasets.Dataset.from_dict({
        "chosen_ids": [ids[:n] for ids, n in zip(rows["query_chosen_token"], rows["query_chosen_token_len"])],
        "rejected_ids": [ids[:n] for ids, n in zip(rows["query_rejected_token"], rows["query_rejected_token_len"])],
    })  # fmt: skip
    model = AutoModelForSequenceClassification.from_pretrained(str(reward_dir), num_labels=1, dtype=torch.float32, attn_implementation="sdpa")
    with tempfile.TemporaryDirectory() as out:
        config = RewardConfig(
            output_dir=out, per_device_train_batch_size=cfg.micro_batch_size, gradient_accumulation_steps=cfg.batch_size // cfg.micro_batch_size,
            max_steps=len(steps), learning_rate=cfg.lr, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.grad_clip, bf16=False, use_cpu=True, report_to="none", save_strategy="no", train_sampling_strategy="sequential",
            lr_scheduler_type="constant", seed=cfg.seed, **TRL_VARIANTS[variant],
        )  # fmt: skip
        callbacks = [common.interleave_callback(on_round)]
        return RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks).train().training_loss


def main() -> None:
    args = common.pair_bench_args(__doc__)
    common.set_threads()
    runtime = setup_runtime("cpu")
    cfg = reward.Config(batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, lr=5e-5, seed=42)
    tokenizer = common.load_tokenizer(args.tokenizer)
    _, reward_dir = common.write_models(tokenizer, args.tokenizer)
    ds = common.comparison_data(tokenizer)
    train = ds.with_format("torch", columns=PAIR_COLUMNS)
    steps, tokens = common.pair_rounds(ds, cfg, args.warmup + args.repeats)

    variants = [v for v in args.trl_variants.split(",") if v]

    def contenders() -> dict:  # a fresh copy per TRL variant, so that the losses compare
        return {"ours": common.reward_step(reward_dir, tokenizer, train, cfg, runtime)}

    def run_trl(variant, on_round) -> float:
        return trl_loss(variant, reward_dir, tokenizer, ds, steps, cfg, on_round)

    rates, ratios, loss_check = common.interleaved_rounds("RewardTrainer", variants, contenders, run_trl, steps, tokens, args.warmup)
    common.print_table(f"Reward-model optimizer step (batch {cfg.batch_size} pairs, micro {cfg.micro_batch_size})", "tok/s", rates, ratios)
    settings = dict(vars(args), tokens_per_step=tokens, reward=dataclasses.asdict(cfg), trl_variants={v: TRL_VARIANTS[v] for v in variants})
    common.record("reward", settings, "non-pad tokens/s", rates, ratios, {"loss_check": loss_check})


if __name__ == "__main__":
    main()
