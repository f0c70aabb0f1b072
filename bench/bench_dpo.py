"""DPO optimizer step: ours (`dpo.train_step`) vs TRL's DPOTrainer.

    bench/.venv-trl/bin/python bench/bench_dpo.py
    bench/.venv-trl/bin/python bench/bench_dpo.py --repeats 8 --batch-size 16 --micro-batch-size 8

Same policy (common.py's benchmark model, from the same directory), the same comparisons per step
(`training.batch_indices` over the real-sample pairs, query 512, summaries 133), the same batch
layout, fp32, beta 0.05, sigmoid loss, lr 3e-6, AdamW (0.9, 0.999), no weight decay, clip 1.0,
and on both sides the reference log-probs computed before training (no reference model in
memory), outside the timed steps:
- ours: `dpo.train_step`, the step dpo.main runs (micro-batches sorted by length, each query
  once with both summaries on its KV cache, the LM head only at summary tokens, fused AdamW).
- trl-default: DPOTrainer with `precompute_ref_log_probs=True` on the rows' text (prompt = our
  formatted query, chosen / rejected = the summary + EOS; TRL tokenizes prompt+summary itself,
  so its token counts can differ from ours by a token at the seam), `max_length=None` (no cut),
  TRL's defaults otherwise (gradient checkpointing on, logging every 10 steps) except fp32, the
  batch layout, the optimizer settings and sequential sampling.
- trl-fast: gradient checkpointing off, logging only at the end, no tqdm.
Interleaved as bench_reward.py. Throughput = our non-pad tokens (query+chosen + query+rejected)
of the step / seconds, the same numerator for both sides.
"""

from __future__ import annotations

import dataclasses
import tempfile

import common
import torch

import dpo
from dgx_spark_summary_from_human_feedback.models import disable_dropout, get_pair_logprobs, load_policy
from dgx_spark_summary_from_human_feedback.training import PAIR_COLUMNS, distribute, make_optimizer, setup_runtime

TRL_VARIANTS = {"default": {}, "fast": dict(gradient_checkpointing=False, logging_steps=10_000, disable_tqdm=True)}


def ours_step(policy_dir, tokenizer, train, rows: list[int], cfg, runtime):
    """`step(indices, k)`: `dpo.train_step` on those comparisons, the reference log-probs of
    `rows` (the benchmark's) computed first, as dpo.main does before training."""
    policy = load_policy(str(policy_dir), tokenizer, dtype=runtime.param_dtype, device=runtime.device)
    disable_dropout(policy)
    reference = torch.zeros(len(train), 2)
    reference[rows] = dpo.reference_logprobs(policy, train.select(rows), cfg.micro_batch_size, runtime)
    policy.train()
    logprobs_fn = distribute(policy, get_pair_logprobs, runtime)
    optimizer = make_optimizer(list(policy.parameters()), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8, kind=cfg.optimizer, device=runtime.device)
    columns = (train["query_token_len"], train["chosen_token_len"], train["rejected_token_len"])
    pair_lengths = [int(q) + max(int(c), int(r)) for q, c, r in zip(*columns)]  # as dpo.main

    def step(indices: list[int], k: int = 0) -> dict:
        return dpo.train_step(logprobs_fn, policy, optimizer, train, indices, reference, pair_lengths, cfg, runtime, k, common.CACHE)

    return step


def trl_loss(variant, policy_dir, tokenizer, ds, steps, cfg, on_round) -> float:
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    rows = ds.select([i for indices in steps for i in indices])
    dataset = datasets.Dataset.from_dict({"prompt": rows["query"], "chosen": rows["chosen"], "rejected": rows["rejected"]})
    model = AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32, attn_implementation="sdpa")
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out, per_device_train_batch_size=cfg.micro_batch_size, gradient_accumulation_steps=cfg.batch_size // cfg.micro_batch_size,
            max_steps=len(steps), learning_rate=cfg.lr, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.grad_clip, beta=cfg.beta, loss_type=["sigmoid"], max_length=None, precompute_ref_log_probs=True,
            precompute_ref_batch_size=cfg.micro_batch_size, bf16=False, use_cpu=True, report_to="none", save_strategy="no",
            train_sampling_strategy="sequential", lr_scheduler_type="constant", seed=cfg.seed, **TRL_VARIANTS[variant],
        )  # fmt: skip
        callbacks = [common.interleave_callback(on_round)]
        return DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks).train().training_loss


def main() -> None:
    args = common.pair_bench_args(__doc__)
    common.set_threads()
    runtime = setup_runtime("cpu")
    cfg = dpo.Config(batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, seed=42)
    tokenizer = common.load_tokenizer(args.tokenizer)
    policy_dir, _ = common.write_models(tokenizer, args.tokenizer)
    ds = common.comparison_data(tokenizer)
    train = ds.with_format("torch", columns=PAIR_COLUMNS)
    steps, tokens = common.pair_rounds(ds, cfg, args.warmup + args.repeats)

    variants = [v for v in args.trl_variants.split(",") if v]

    def contenders() -> dict:  # a fresh copy per TRL variant, so that the losses compare
        return {"ours": ours_step(policy_dir, tokenizer, train, sorted({i for s in steps for i in s}), cfg, runtime)}

    def run_trl(variant, on_round) -> float:
        return trl_loss(variant, policy_dir, tokenizer, ds, steps, cfg, on_round)

    rates, ratios, loss_check = common.interleaved_rounds("DPOTrainer", variants, contenders, run_trl, steps, tokens, args.warmup)
    common.print_table(f"DPO optimizer step (batch {cfg.batch_size} pairs, micro {cfg.micro_batch_size}, reference precomputed)", "tok/s", rates, ratios)
    settings = dict(vars(args), tokens_per_step=tokens, dpo=dataclasses.asdict(cfg), trl_variants={v: TRL_VARIANTS[v] for v in variants})
    common.record("dpo", settings, "non-pad tokens/s", rates, ratios, {"loss_check": loss_check})


if __name__ == "__main__":
    main()
