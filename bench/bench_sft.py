"""SFT optimizer step: ours (`sft.train_step`) vs TRL's SFTTrainer vs ours padded to 575 (bench/README.md).

    bench/.venv-trl/bin/python bench/bench_sft.py                 # all contenders
    bench/.venv-trl/bin/python bench/bench_sft.py --repeats 8 --batch-size 16 --micro-batch-size 8
    .venv/bin/python bench/bench_sft.py --no-trl                  # ours vs pad575 only

The same model (common.py), rows per step (`training.batch_indices` of the real-sample SFT data) and batch
layout; fp32, lr 3e-6, AdamW (0.9, 0.95), weight decay 0.1, clip 1.0:
- ours: `sft.train_step`, the step sft.main runs (length-sorted micro-batches, each trimmed to its longest
  row, packed forwards on CPU, the LM head only on response tokens, fused AdamW).
- pad575: the same step with `pad_to=575` (N+'s layout) and `lm_loss_sum(pack=False)`: what dynamic
  padding and packing save.
- trl-default: SFTTrainer on pre-tokenized `input_ids` + `completion_mask` (completion_only_loss: exactly
  our response tokens), TRL's defaults otherwise (gradient checkpointing, logging every 10 steps, entropy
  and token-accuracy metrics). trl-fast: gradient checkpointing off, logging only at the end, no tqdm
  (`padfree`, padding_free=True, was slower on CPU).
A callback at each TRL step times it, then runs ours and pad575 on the same rows. Throughput = non-pad
tokens / seconds.
"""

from __future__ import annotations

import common
import torch

import sft

FAST = {"gradient_checkpointing": False, "logging_steps": 10_000, "disable_tqdm": True}
TRL_VARIANTS = {"default": {}, "fast": FAST, "padfree": FAST | {"padding_free": True, "max_length": None}}


def trl_loss(variant, policy_dir, tokenizer, ds, steps, cfg, on_round) -> float:
    """TRL's SFTTrainer over `steps` (rows in order), `on_round(k, seconds)` after each step."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    rows = ds.select([i for indices in steps for i in indices])
    lengths, responses = rows["query_reference_response_token_len"], rows["reference_response_token_len"]
    input_ids = [ids[:n] for ids, n in zip(rows["query_reference_response_token"], lengths)]
    completion_mask = [[0] * (n - r) + [1] * r for n, r in zip(lengths, responses)]
    dataset = datasets.Dataset.from_dict({"input_ids": input_ids, "completion_mask": completion_mask})
    model = AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32, attn_implementation="sdpa")
    settings = TRL_VARIANTS[variant] | {"completion_only_loss": True, "betas": cfg.betas, "eps": cfg.eps}
    return common.trl_train((SFTTrainer, SFTConfig), model, dataset, tokenizer, cfg, len(steps), on_round, **settings)


def main() -> None:
    args = common.step_bench_args(__doc__, "--no-trl", "--no-pad575")
    runtime, tokenizer, policy_dir, _ = common.setup(args.tokenizer)
    cfg = sft.Config(batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, optimizer="auto", seed=42)
    ds = common.sft_data(tokenizer)
    train = ds.with_format("torch", columns=common.SFT_COLUMNS)

    def contenders(steps) -> dict:  # fresh copies per TRL variant, so that the losses compare
        steppers = {"ours": common.sft_step(policy_dir, tokenizer, train, cfg, runtime)}
        if not args.no_pad575:
            steppers["pad575"] = common.sft_step(policy_dir, tokenizer, train, cfg, runtime, pad_to=575)
        return steppers

    def trl(variant, steps, on_round) -> float:
        return trl_loss(variant, policy_dir, tokenizer, ds, steps, cfg, on_round)

    columns = ["query_reference_response_token_len"]
    common.step_bench("sft", "SFTTrainer", args, cfg, ds, columns, contenders, trl, TRL_VARIANTS)


if __name__ == "__main__":
    main()
