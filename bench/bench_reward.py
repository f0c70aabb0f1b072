"""Reward-model optimizer step: ours (reward.py) vs TRL's RewardTrainer.

    bench/.venv-trl/bin/python bench/bench_reward.py
    bench/.venv-trl/bin/python bench/bench_reward.py --repeats 8 --batch-size 16 --micro-batch-size 8

Contenders, on the same reward model (bench/common.py: our N+ head on the benchmark backbone),
the same comparisons per step (training.batch_indices over the real-sample pairs, query 512,
responses 133), the same batch layout, fp32, lr 5e-5, AdamW (0.9, 0.999), no weight decay,
clip 1.0:
- ours: exactly reward.py's optimizer step: `micro_batches` sorted by the longer of each pair,
  `reward.pair_scores` through `training.distribute`/`no_sync` (chosen and rejected in one
  forward: each query once, both summaries on its KV cache, `models.get_pair_scores`), -logsigmoid summed / batch, backward, clip, fused AdamW.
- trl-default: RewardTrainer on pre-tokenized `chosen_ids` / `rejected_ids` (our exact
  query+summary+EOS ids), TRL's defaults otherwise (gradient checkpointing on, logging every 10
  steps, reward min/mean/max/accuracy/margin metrics) except fp32, the batch layout, the
  optimizer settings and sequential sampling over the same pairs.
- trl-fast: gradient checkpointing off, logging only at the end, no tqdm.

Interleaved as bench_sft.py: a callback at each TRL optimizer step runs ours on the same pairs.
Throughput = non-pad tokens (chosen + rejected) / seconds.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import common  # noqa: F401  (offline environment and sys.path first)
import torch
import torch.nn.functional as F

import reward
from dgx_spark_summary_from_human_feedback.models import disable_dropout, get_pair_scores, load_reward_model
from dgx_spark_summary_from_human_feedback.training import batch_indices, clip_gradients, distribute, make_optimizer, micro_batches, no_sync, setup_runtime

LR, BETAS, EPS, WEIGHT_DECAY, CLIP, SEED = 5e-5, (0.9, 0.999), 1e-8, 0.0, 1.0, 42


def make_ours(reward_dir, tokenizer, train, pair_lengths, batch_size, micro_batch_size, runtime):
    model = load_reward_model(str(reward_dir), tokenizer, dtype=runtime.param_dtype, device=runtime.device)
    disable_dropout(model)
    model.train()
    optimizer = make_optimizer(list(model.parameters()), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS, kind="auto", device=runtime.device)
    score_fn = distribute(model, get_pair_scores, runtime)  # as reward.py: unchanged in one process

    def step(indices: list[int]) -> float:
        # reward.py's loop body, minus logging; returns the step's mean loss
        loss_total = torch.zeros(())
        micros = list(micro_batches(indices, [pair_lengths[i] for i in indices], micro_batch_size))
        for i, micro in enumerate(micros):
            with no_sync(score_fn, skip=i < len(micros) - 1):
                chosen, rejected = reward.pair_scores(score_fn, train[micro], runtime)
                loss_sum = -F.logsigmoid(chosen - rejected).sum()
                (loss_sum / batch_size).backward()
            loss_total += loss_sum.detach()
        clip_gradients(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss_total) / batch_size

    return step


def trl_dataset(ds, steps: list[list[int]]):
    import datasets

    rows = ds.select([i for indices in steps for i in indices])
    chosen = [ids[:n] for ids, n in zip(rows["query_chosen_token"], rows["query_chosen_token_len"])]
    rejected = [ids[:n] for ids, n in zip(rows["query_rejected_token"], rows["query_rejected_token_len"])]
    return datasets.Dataset.from_dict({"chosen_ids": chosen, "rejected_ids": rejected})


TRL_VARIANTS = {
    "default": {},
    "fast": dict(gradient_checkpointing=False, logging_steps=10_000, disable_tqdm=True),
}


def run_trl(variant, reward_dir, tokenizer, ds, steps, args, on_round) -> float:
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    model = AutoModelForSequenceClassification.from_pretrained(str(reward_dir), num_labels=1, dtype=torch.float32, attn_implementation="sdpa")
    with tempfile.TemporaryDirectory() as out:
        config = RewardConfig(
            output_dir=out, per_device_train_batch_size=args.micro_batch_size, gradient_accumulation_steps=args.batch_size // args.micro_batch_size,
            max_steps=len(steps), learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, weight_decay=WEIGHT_DECAY,
            max_grad_norm=CLIP, bf16=False, use_cpu=True, report_to="none", save_strategy="no", train_sampling_strategy="sequential",
            lr_scheduler_type="constant", seed=SEED, **TRL_VARIANTS[variant],
        )  # fmt: skip
        trainer = RewardTrainer(model=model, args=config, train_dataset=trl_dataset(ds, steps), processing_class=tokenizer, callbacks=[common.interleave_callback(on_round)])
        return trainer.train().training_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", choices=["sample", "tiny"], default="sample")
    parser.add_argument("--batch-size", type=int, default=8, help="comparisons per optimizer step")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="comparisons per forward (2x sequences)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trl-variants", default="default,fast")
    args = parser.parse_args()
    common.set_threads()

    runtime = setup_runtime("cpu")
    tokenizer = common.load_tokenizer(args.tokenizer)
    _, reward_dir = common.write_models(tokenizer, args.tokenizer)
    ds = common.comparison_data(tokenizer)
    train = ds.with_format("torch", columns=reward.PAIR_COLUMNS)
    chosen_len, rejected_len = list(ds["query_chosen_token_len"]), list(ds["query_rejected_token_len"])
    pair_lengths = [max(c, r) for c, r in zip(chosen_len, rejected_len)]
    rounds = args.warmup + args.repeats
    steps = [batch_indices(k, len(ds), args.batch_size, SEED) for k in range(rounds)]
    tokens = [sum(chosen_len[i] + rejected_len[i] for i in s) for s in steps]
    print(f"comparisons {len(ds)}: query+chosen tokens {common.length_summary(chosen_len)}; batch {args.batch_size} = {args.micro_batch_size} x "
          f"{args.batch_size // args.micro_batch_size} pairs, {sum(tokens) / len(tokens):.0f} non-pad tokens per step, threads {torch.get_num_threads()}")  # fmt: skip

    rates: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    loss_check: dict[str, dict] = {}

    for variant in [v for v in args.trl_variants.split(",") if v]:
        print(f"TRL RewardTrainer, {variant} config, interleaved with ours")
        ours = make_ours(reward_dir, tokenizer, train, pair_lengths, args.batch_size, args.micro_batch_size, runtime)  # fresh copy per variant
        losses = []

        def on_round(k: int, trl_seconds: float, variant=variant, losses=losses, ours=ours) -> None:
            t = time.perf_counter()
            losses.append(ours(steps[k]))
            t_ours = time.perf_counter() - t
            print(f"  {'warmup' if k < args.warmup else f'round {k - args.warmup + 1}'}: ours {t_ours:.2f}s, trl-{variant} {trl_seconds:.2f}s", flush=True)
            if k >= args.warmup:
                rates.setdefault("ours", []).append(tokens[k] / t_ours)
                rates.setdefault(f"trl-{variant}", []).append(tokens[k] / trl_seconds)
                ratios.setdefault(f"ours/trl-{variant}", []).append(trl_seconds / t_ours)

        trl_loss = run_trl(variant, reward_dir, tokenizer, ds, steps, args, on_round)
        loss_check[variant] = {"trl": trl_loss, "ours": sum(losses) / len(losses)}
        print(f"  same loss on the same pairs? mean loss TRL {trl_loss:.4f}, ours {loss_check[variant]['ours']:.4f}")

    common.print_table(f"Reward-model optimizer step (batch {args.batch_size} pairs, micro {args.micro_batch_size})", "tok/s", rates, ratios)
    settings = dict(vars(args), tokens_per_step=tokens, trl_variants={v: TRL_VARIANTS[v] for v in args.trl_variants.split(",") if v})
    common.record("reward", settings, "non-pad tokens/s", rates, ratios, {"loss_check": loss_check})


if __name__ == "__main__":
    main()
