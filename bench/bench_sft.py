"""SFT optimizer step: ours (`sft.train_step`) vs TRL's SFTTrainer vs ours padded to 575.

    bench/.venv-trl/bin/python bench/bench_sft.py                 # all contenders
    bench/.venv-trl/bin/python bench/bench_sft.py --repeats 8 --batch-size 16 --micro-batch-size 8
    .venv/bin/python bench/bench_sft.py --no-trl                  # ours vs pad575 only

All on the same model (common.py), the same rows per step (`training.batch_indices` of the
real-sample SFT data), the same batch / micro-batch layout, fp32, lr 3e-6, AdamW (0.9, 0.95),
weight decay 0.1, clip 1.0:
- ours: `sft.train_step`, the step sft.main runs (length-sorted micro-batches, each trimmed to its
  longest row, packed forwards on CPU, the LM head only on response tokens, fused AdamW).
- pad575: the same `sft.train_step` with `pad_to=575` (every row padded to 575, N+'s layout) and
  `lm_loss_sum(pack=False)`: what dynamic padding and packing save. (Before issue 13 this row
  also ran the LM head at every position; that is no longer part of it.)
- trl-default: SFTTrainer on pre-tokenized `input_ids` + `completion_mask`, completion_only_loss
  (the loss covers exactly our response tokens), TRL's defaults otherwise (gradient checkpointing
  on, logging every 10 steps, entropy and token-accuracy metrics) except fp32, the batch layout,
  the optimizer settings and sequential sampling over the same rows.
- trl-fast: gradient checkpointing off, logging only at the end, no tqdm (padding_free was slower
  on CPU: `--trl-variants default,fast,padfree` shows it).

A callback at each TRL optimizer step times TRL's step and then runs ours and pad575 on the same
rows, so each ratio is taken within one round. Throughput = non-pad tokens / seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile

import common
import torch

import sft
from dgx_spark_summary_from_human_feedback.training import batch_indices, setup_runtime

COLUMNS = ["query_reference_response_token", "query_reference_response_token_len", "reference_response_token_len"]
TRL_VARIANTS = {
    "default": {},
    "fast": dict(gradient_checkpointing=False, logging_steps=10_000, disable_tqdm=True),
    "padfree": dict(gradient_checkpointing=False, logging_steps=10_000, disable_tqdm=True, padding_free=True, max_length=None),
}


def trl_loss(variant, policy_dir, tokenizer, ds, steps, cfg, on_round) -> float:
    """Train TRL's SFTTrainer over `steps` (rows in order), `on_round(k, seconds)` after each step."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    rows = ds.select([i for indices in steps for i in indices])
    lengths, responses = rows["query_reference_response_token_len"], rows["reference_response_token_len"]
    dataset = datasets.Dataset.from_dict({
        "input_ids": [ids[:n] for ids, n in zip(rows["query_reference_response_token"], lengths)],
        "completion_mask": [[0] * (n - r) + [1] * r for n, r in zip(lengths, responses)],
    })  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32, attn_implementation="sdpa")
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out, per_device_train_batch_size=cfg.micro_batch_size, gradient_accumulation_steps=cfg.batch_size // cfg.micro_batch_size,
            max_steps=len(steps), learning_rate=cfg.lr, adam_beta1=cfg.betas[0], adam_beta2=cfg.betas[1], adam_epsilon=cfg.eps,
            weight_decay=cfg.weight_decay, max_grad_norm=cfg.grad_clip, bf16=False, use_cpu=True, report_to="none", save_strategy="no",
            train_sampling_strategy="sequential", lr_scheduler_type="constant", completion_only_loss=True, seed=cfg.seed, **TRL_VARIANTS[variant],
        )  # fmt: skip
        callbacks = [common.interleave_callback(on_round)]
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks)
        return trainer.train().training_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", choices=["sample", "tiny"], default="sample")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1, help="rounds not counted")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per TRL variant")
    parser.add_argument("--trl-variants", default="default,fast")
    parser.add_argument("--no-trl", action="store_true", help="only ours vs pad575 (runs in the project venv)")
    parser.add_argument("--no-pad575", action="store_true")
    args = parser.parse_args()
    common.set_threads()
    runtime = setup_runtime("cpu")
    cfg = sft.Config(batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, optimizer="auto", seed=42)
    tokenizer = common.load_tokenizer(args.tokenizer)
    policy_dir, _ = common.write_models(tokenizer, args.tokenizer)
    ds = common.sft_data(tokenizer)
    train = ds.with_format("torch", columns=COLUMNS)
    rounds = args.warmup + args.repeats
    steps = [batch_indices(k, len(ds), cfg.batch_size, cfg.seed) for k in range(rounds)]
    lengths = ds["query_reference_response_token_len"]
    tokens = [sum(lengths[i] for i in s) for s in steps]
    print(f"SFT rows {len(ds)}: query+response tokens {common.length_summary(lengths)}; batch {cfg.batch_size} = "
          f"{cfg.micro_batch_size} x {cfg.batch_size // cfg.micro_batch_size}, {sum(tokens) / rounds:.0f} non-pad tokens per step")  # fmt: skip

    loss_check = {}
    variants = [] if args.no_trl else [v for v in args.trl_variants.split(",") if v]

    def contenders() -> dict:  # fresh copies per TRL variant, so that the losses compare
        steppers = {"ours": common.sft_step(policy_dir, tokenizer, train, cfg, runtime)}
        if not args.no_pad575:
            steppers["pad575"] = common.sft_step(policy_dir, tokenizer, train, cfg, runtime, pad_to=575)
        return steppers

    def run_trl(variant, on_round) -> float:
        return trl_loss(variant, policy_dir, tokenizer, ds, steps, cfg, on_round)

    rates, ratios, loss_check = common.interleaved_rounds("SFTTrainer", variants, contenders, run_trl, steps, tokens, args.warmup)
    common.print_table(f"SFT optimizer step (batch {cfg.batch_size}, micro {cfg.micro_batch_size})", "tok/s", rates, ratios)
    settings = dict(vars(args), tokens_per_step=tokens, sft=dataclasses.asdict(cfg), trl_variants={v: TRL_VARIANTS[v] for v in variants})
    common.record("sft", settings, "non-pad tokens/s", rates, ratios, {"loss_check": loss_check})


if __name__ == "__main__":
    main()
