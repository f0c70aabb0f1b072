"""SFT optimizer step: ours (sft.py) vs TRL's SFTTrainer vs our own pad-to-575 baseline.

    bench/.venv-trl/bin/python bench/bench_sft.py                 # all contenders, defaults below
    bench/.venv-trl/bin/python bench/bench_sft.py --repeats 8 --batch-size 16 --micro-batch-size 8
    .venv/bin/python bench/bench_sft.py --no-trl                  # ours vs pad-to-575 only

Contenders, all on the same model (bench/common.py), the same rows per step (training.batch_indices
of the real-sample SFT data), the same batch / micro-batch / gradient accumulation, fp32:
- ours: exactly sft.py's optimizer step: `micro_batches` (sorted by length), `sft.sft_batch`,
  `models.lm_loss_sum` through `training.distribute`/`no_sync` (LM head on labelled positions
  only), summed loss / labels, backward, clip 1.0, torch fused AdamW (sft.py's `auto` on CPU),
  zero_grad. Imported, not copied.
- pad575: the naive baseline: every row padded to 575, the full LM head over every position,
  cross-entropy with ignore_index, same optimizer.
- trl-default: SFTTrainer on pre-tokenized `input_ids` + `completion_mask` with
  completion_only_loss=True (the loss covers exactly our response tokens), TRL's defaults
  otherwise (gradient checkpointing on, logging every 10 steps, padding_free off, entropy and
  token-accuracy metrics) except what must match: fp32 (bf16=False; ours is fp32 on CPU), the
  batch layout, lr/betas/eps/weight decay/clip, sequential sampling over the same rows.
- trl-fast: the fastest TRL configuration found: gradient checkpointing off, logging only at
  the end, no tqdm. (padding_free=True was slower on CPU: sdpa then attends over one packed
  row of every token of the micro-batch; pass --trl-variants default,fast,padfree to see it.)

Interleaving: TRL's train() runs its loop; a callback at each of its optimizer steps times the
step since the last one (data loading, collation, logging included) and then runs our step and
the pad575 step on the same rows. So every round is TRL, ours, pad575 back to back, and each
ratio is taken within one round. Throughput = non-pad tokens of the step's rows / seconds.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import common  # noqa: F401  (sets the offline environment and sys.path first)
import torch
import torch.nn.functional as F

import sft
from dgx_spark_summary_from_human_feedback.models import disable_dropout, lm_loss_sum, load_policy, position_ids
from dgx_spark_summary_from_human_feedback.training import batch_indices, clip_gradients, distribute, make_optimizer, micro_batches, no_sync, setup_runtime

COLUMNS = ["query_reference_response_token", "query_reference_response_token_len", "reference_response_token_len"]
LR, BETAS, EPS, WEIGHT_DECAY, CLIP, SEED = 3e-6, (0.9, 0.95), 1e-8, 0.1, 1.0, 42


def make_ours(policy_dir, tokenizer, train, lengths, response_lengths, micro_batch_size, runtime):
    """A closure running one of sft.py's optimizer steps on the given row indices."""
    model = load_policy(str(policy_dir), tokenizer, dtype=runtime.param_dtype, device=runtime.device)
    disable_dropout(model)
    model.train()
    optimizer = make_optimizer(list(model.parameters()), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS, kind="auto", device=runtime.device)
    loss_fn = distribute(model, lm_loss_sum, runtime)  # as sft.py: unchanged in one process

    def step(indices: list[int]) -> float:
        # sft.py's loop body (train_on_query False), minus logging; returns the step's loss
        n_labels = sum(response_lengths[i] for i in indices)
        loss_total = torch.zeros(())
        micros = list(micro_batches(indices, [lengths[i] for i in indices], micro_batch_size))
        for i, micro in enumerate(micros):
            ids, mask, labels = sft.sft_batch(train[micro], False, runtime.device)
            with runtime.autocast(), no_sync(loss_fn, skip=i < len(micros) - 1):
                loss_sum, _ = loss_fn(ids, mask, labels)
                (loss_sum / n_labels).backward()
            loss_total += loss_sum.detach()
        clip_gradients(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss_total) / n_labels

    return step


def make_pad575(policy_dir, tokenizer, train, response_lengths, micro_batch_size, runtime):
    """The naive baseline: rows padded to 575, logits at every position, CE with ignore_index."""
    model = load_policy(str(policy_dir), tokenizer, dtype=runtime.param_dtype, device=runtime.device)
    disable_dropout(model)
    model.train()
    optimizer = make_optimizer(list(model.parameters()), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS, kind="auto", device=runtime.device)

    def step(indices: list[int]) -> None:
        n_labels = sum(response_lengths[i] for i in indices)
        for start in range(0, len(indices), micro_batch_size):
            rows = train[indices[start : start + micro_batch_size]]
            ids = rows["query_reference_response_token"]  # (B, 575)
            lengths, response = rows["query_reference_response_token_len"], rows["reference_response_token_len"]
            pos = torch.arange(ids.shape[1])[None, :]
            mask = pos < lengths[:, None]
            labels = ids.masked_fill(~mask | (pos < (lengths - response)[:, None]), -100)
            logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids(mask), use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
            (loss / n_labels).backward()
        clip_gradients(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def trl_dataset(ds, steps: list[list[int]]):
    """TRL's rows in step order (sequential sampler): unpadded ids and the completion mask."""
    import datasets

    order = [i for indices in steps for i in indices]
    rows = ds.select(order)
    input_ids, completion_mask = [], []
    for ids, n, r in zip(rows["query_reference_response_token"], rows["query_reference_response_token_len"], rows["reference_response_token_len"]):
        input_ids.append(ids[:n])
        completion_mask.append([0] * (n - r) + [1] * r)
    return datasets.Dataset.from_dict({"input_ids": input_ids, "completion_mask": completion_mask})


TRL_VARIANTS = {
    "default": {},
    "fast": dict(gradient_checkpointing=False, logging_steps=10_000, disable_tqdm=True),
    "padfree": dict(gradient_checkpointing=False, logging_steps=10_000, disable_tqdm=True, padding_free=True, max_length=None),
}


def run_trl(variant, policy_dir, tokenizer, ds, steps, args, on_round) -> float:
    """Train TRL for len(steps) optimizer steps, `on_round(k, seconds)` after each; its mean loss."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32, attn_implementation="sdpa")
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out, per_device_train_batch_size=args.micro_batch_size, gradient_accumulation_steps=args.batch_size // args.micro_batch_size,
            max_steps=len(steps), learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, weight_decay=WEIGHT_DECAY,
            max_grad_norm=CLIP, bf16=False, use_cpu=True, report_to="none", save_strategy="no", train_sampling_strategy="sequential",
            lr_scheduler_type="constant", completion_only_loss=True, seed=SEED, **TRL_VARIANTS[variant],
        )  # fmt: skip
        callback = common.interleave_callback(on_round)
        trainer = SFTTrainer(model=model, args=config, train_dataset=trl_dataset(ds, steps), processing_class=tokenizer, callbacks=[callback])
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
    tokenizer = common.load_tokenizer(args.tokenizer)
    policy_dir, _ = common.write_models(tokenizer, args.tokenizer)
    ds = common.sft_data(tokenizer)
    train = ds.with_format("torch", columns=COLUMNS)
    lengths = list(ds["query_reference_response_token_len"])
    response_lengths = list(ds["reference_response_token_len"])
    rounds = args.warmup + args.repeats
    steps = [batch_indices(k, len(ds), args.batch_size, SEED) for k in range(rounds)]
    tokens = [sum(lengths[i] for i in s) for s in steps]
    print(f"SFT rows {len(ds)}: query+response tokens {common.length_summary(lengths)}; batch {args.batch_size} = {args.micro_batch_size} x {args.batch_size // args.micro_batch_size}, "
          f"{sum(tokens) / len(tokens):.0f} non-pad tokens per step, threads {torch.get_num_threads()}")  # fmt: skip

    ours = pad575 = None

    def fresh() -> None:  # every TRL variant races freshly loaded copies, so the losses compare
        nonlocal ours, pad575
        ours = make_ours(policy_dir, tokenizer, train, lengths, response_lengths, args.micro_batch_size, runtime)
        pad575 = None if args.no_pad575 else make_pad575(policy_dir, tokenizer, train, response_lengths, args.micro_batch_size, runtime)

    rates: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}

    ours_losses: dict[str, list[float]] = {}

    def timed(fn, k) -> float:
        t = time.perf_counter()
        out = fn(steps[k])
        seconds = time.perf_counter() - t
        if fn is ours:
            ours_losses.setdefault(current[0], []).append(out)
        return seconds

    current = [""]

    def ours_round(k: int, trl_name: str | None, trl_seconds: float | None) -> None:
        current[0] = trl_name or ""
        t_ours = timed(ours, k)
        t_pad = timed(pad575, k) if pad575 else None
        tag = "warmup" if k < args.warmup else f"round {k - args.warmup + 1}"
        print(f"  {tag}: ours {t_ours:.2f}s" + (f", pad575 {t_pad:.2f}s" if t_pad else "") + (f", trl-{trl_name} {trl_seconds:.2f}s" if trl_name else ""), flush=True)
        if k < args.warmup:
            return
        rates.setdefault("ours", []).append(tokens[k] / t_ours)
        if t_pad:
            rates.setdefault("pad575", []).append(tokens[k] / t_pad)
            ratios.setdefault("ours/pad575", []).append(t_pad / t_ours)
        if trl_name:
            rates.setdefault(f"trl-{trl_name}", []).append(tokens[k] / trl_seconds)
            ratios.setdefault(f"ours/trl-{trl_name}", []).append(trl_seconds / t_ours)

    variants = [] if args.no_trl else [v for v in args.trl_variants.split(",") if v]
    loss_check = {}
    for variant in variants:
        print(f"TRL SFTTrainer, {variant} config, interleaved with ours")
        fresh()
        trl_loss = run_trl(variant, policy_dir, tokenizer, ds, steps, args, lambda k, s, v=variant: ours_round(k, v, s))
        mine = sum(ours_losses[variant]) / len(ours_losses[variant])
        loss_check[variant] = {"trl": trl_loss, "ours": mine}
        print(f"  same loss on the same rows? mean loss TRL {trl_loss:.4f}, ours {mine:.4f}")
    if not variants:
        fresh()
        for k in range(rounds):
            ours_round(k, None, None)

    common.print_table(f"SFT optimizer step (batch {args.batch_size}, micro {args.micro_batch_size})", "tok/s", rates, ratios)
    settings = dict(vars(args), tokens_per_step=tokens, trl_variants={v: TRL_VARIANTS[v] for v in variants})
    common.record("sft", settings, "non-pad tokens/s", rates, ratios, {"loss_check": loss_check})


if __name__ == "__main__":
    main()
