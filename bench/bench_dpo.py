"""DPO optimizer step: ours (`dpo.train_step`) vs TRL's DPOTrainer (bench/README.md).

    bench/.venv-trl/bin/python bench/bench_dpo.py
    bench/.venv-trl/bin/python bench/bench_dpo.py --repeats 8 --batch-size 16 --micro-batch-size 8

The same policy (common.py), comparisons per step (`training.batch_indices` over the real-sample pairs,
query 512, summaries 133) and batch layout; fp32, beta 0.05, sigmoid loss, lr 3e-6, AdamW (0.9, 0.999), no
weight decay, clip 1.0; on both sides the reference log-probs computed before training, outside the timed
steps (no reference model in memory):
- ours: `dpo.train_step`, the step dpo.main runs (length-sorted micro-batches, each query once with both
  summaries on its KV cache, the LM head only at summary tokens, fused AdamW).
- trl-default: DPOTrainer with `precompute_ref_log_probs=True` on the rows' text (prompt = our formatted
  query, chosen / rejected = the summary + EOS; TRL tokenizes prompt+summary itself, so its counts can
  differ from ours by a token at the seam), `max_length=None`, TRL's defaults otherwise (gradient
  checkpointing, logging every 10 steps). trl-fast: gradient checkpointing off, logging only at the end.
Interleaved as bench_sft.py. Throughput = our non-pad tokens of the step / seconds, for both sides.
"""

from __future__ import annotations

import common
import torch

import dpo
from dgx_spark_summary_from_human_feedback.models import get_pair_logprobs, load_policy
from dgx_spark_summary_from_human_feedback.training import PAIR_COLUMNS

TRL_VARIANTS = {"default": {}, "fast": {"gradient_checkpointing": False, "logging_steps": 10_000, "disable_tqdm": True}}


def ours_step(policy_dir, tokenizer, train, rows: list[int], cfg, runtime):
    """`step(indices, k)`: `dpo.train_step` on those comparisons, the reference log-probs of `rows` (the
    benchmark's) computed first, as dpo.main does before training."""
    policy = load_policy(str(policy_dir), tokenizer, dtype=runtime.param_dtype, device=runtime.device)
    reference = torch.zeros(len(train), 2)
    reference[rows] = dpo.reference_logprobs(policy, train.select(rows), cfg.micro_batch_size, runtime)
    logprobs_fn, optimizer = common.trainable(policy, get_pair_logprobs, cfg, runtime, (0.9, 0.999), 1e-8)
    columns = (train["query_token_len"], train["chosen_token_len"], train["rejected_token_len"])
    pair_lengths = [int(q) + max(int(c), int(r)) for q, c, r in zip(*columns)]  # as dpo.main

    def step(indices: list[int], k: int = 0) -> dict:
        pairs = (train, indices, reference, pair_lengths)
        return dpo.train_step(logprobs_fn, policy, optimizer, *pairs, cfg, runtime, k, common.CACHE)

    return step


def trl_loss(variant, policy_dir, tokenizer, ds, steps, cfg, on_round) -> float:
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    rows = ds.select([i for indices in steps for i in indices])
    dataset = datasets.Dataset.from_dict({key: rows[key] for key in ("chosen", "rejected")} | {"prompt": rows["query"]})
    model = AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32, attn_implementation="sdpa")
    settings = dict(beta=cfg.beta, loss_type=["sigmoid"], max_length=None, precompute_ref_log_probs=True)
    settings |= dict(precompute_ref_batch_size=cfg.micro_batch_size, **TRL_VARIANTS[variant])
    return common.trl_train((DPOTrainer, DPOConfig), model, dataset, tokenizer, cfg, len(steps), on_round, **settings)


def main() -> None:
    args = common.step_bench_args(__doc__)
    runtime, tokenizer, policy_dir, _ = common.setup(args.tokenizer)
    cfg = dpo.Config(batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, seed=42)
    ds = common.comparison_data(tokenizer)
    train = ds.with_format("torch", columns=PAIR_COLUMNS)

    def contenders(steps) -> dict:  # a fresh copy per TRL variant, so that the losses compare
        used = sorted({i for s in steps for i in s})
        return {"ours": ours_step(policy_dir, tokenizer, train, used, cfg, runtime)}

    def trl(variant, steps, on_round) -> float:
        return trl_loss(variant, policy_dir, tokenizer, ds, steps, cfg, on_round)

    columns = ["query_chosen_token_len", "query_rejected_token_len"]
    common.step_bench("dpo", "DPOTrainer", args, cfg, ds, columns, contenders, trl, TRL_VARIANTS)


if __name__ == "__main__":
    main()
