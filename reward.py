"""Stage 2: pairwise reward model (Stiennon et al. 2020, sec. 3.4; N+ details 9-12).

    python reward.py --sft-path out/sft                                 # backbone from SFT (N+)
    python reward.py --sft-path out/sft --base-model Qwen/Qwen2.5-1.5B  # the seed's better RM
    python reward.py --preset smoke --sft-path out/smoke/sft --output-dir out/smoke/reward
    python reward.py --eval-only --reward-path out/reward --dataset comparisons.jsonl  # -> out/reward-eval

Writes OUT/ (an AutoModelForSequenceClassification checkpoint, num_labels=1, safetensors; no
remote code), OUT/checkpoints/, OUT/metrics.jsonl, OUT/report.md with accuracy by split,
confidence, policy pair and batch, a calibration plot, and the normalisation before/after.

The score of a query+response is the head's output at its last token, the EOS (N+ detail 10),
read by `models.get_score`, the one function PPO and evaluation also call. The loss is
-log sigmoid(score_chosen - score_rejected); each query runs once and both summaries run on its KV cache
(`models.get_pair_scores`: half the tokens, the same scores and gradients as two full rows). After
training the reference summaries of the SFT split (8,192 random rows by default) are scored and their mean is subtracted
(N+ detail 12). Qwen2's classification head has no bias term, so the offset is stored as
`config.score_bias` and added by `get_score`; plain `from_pretrained(...)(...).logits` gives the
raw, unnormalised score (add `model.config.score_bias` yourself).

Defaults are the original implementation's 1.5B recipe: batch 128 (8 x 16), lr 5e-5, 3% warmup,
cosine to 0, 1 epoch, clip 1.0, 8-bit AdamW on CUDA, dropout off. The N+ recipe instead trains
from the SFT model with batch 64 and lr 3e-6 (`--batch-size 64 --lr 3e-6`); on Qwen2.5 the seed
found a 1.5B base model better than the 0.5B SFT init (validation accuracy about 0.62-0.66).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dgx_spark_summary_from_human_feedback import cli, tiny
from dgx_spark_summary_from_human_feedback.checkpoint import (
    export_final,
    latest_checkpoint,
    make_output_dir,
    push_run,
    resume_point,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dgx_spark_summary_from_human_feedback.data import Lengths, load_tokenizer
from dgx_spark_summary_from_human_feedback.errors import InputError
from dgx_spark_summary_from_human_feedback.judge import wilson_interval
from dgx_spark_summary_from_human_feedback.models import (
    check_checkpoint,
    disable_dropout,
    get_pair_scores,
    get_score,
    load_reward_model,
)
from dgx_spark_summary_from_human_feedback.preprocess import load_stage_data
from dgx_spark_summary_from_human_feedback.tracking import (
    Logger,
    accuracy_tables,
    config_table,
    markdown_table,
    plot_curves,
    read_metrics,
)
from dgx_spark_summary_from_human_feedback.training import (
    PAIR_COLUMNS,
    OptimizerKind,
    Precision,
    Strategy,
    all_reduce_sum,
    batch_indices,
    check_finite,
    clip_gradients,
    distribute,
    full_state_dicts,
    get_lr,
    load_optimizer_state,
    make_optimizer,
    micro_batch_layout,
    micro_batches,
    no_sync,
    pair_batch,
    seed_everything,
    set_lr,
    setup_runtime,
    steps_per_epoch,
)


@dataclass
class Config:
    preset: Literal["spark", "quick", "smoke"] = "spark"
    """spark: the full recipe; quick: ~1 h on one Spark (Qwen2.5-0.5B, a slice of the Hub data); smoke: tiny
    model + bundled fixtures, offline on CPU"""
    sft_path: str = "out/sft"
    """SFT checkpoint: the backbone (N+ detail 9) and always the tokenizer"""
    base_model: str | None = None
    """start from this causal LM instead of the SFT model (e.g. Qwen/Qwen2.5-1.5B)"""
    dataset: str = "openai/summarize_from_feedback"
    """raw comparisons (Hub or local files, processed now) or a processed preference dataset"""
    sft_dataset: str = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"
    """SFT data whose reference summaries set the normalisation offset"""
    output_dir: str | None = None
    """where the model, checkpoints, metrics and report go (default: out/reward; with --eval-only:
    REWARD_PATH-eval, never a training run's directory)"""
    epochs: int = 1
    """passes over the training comparisons"""
    max_steps: int | None = None
    """stop after this many optimizer steps (default: epochs x steps per epoch)"""
    batch_size: int = 128
    """comparisons per optimizer step, across all processes"""
    micro_batch_size: int = 8
    """comparisons per forward pass (2x sequences: chosen and rejected together)"""
    lr: float = 5e-5
    """peak learning rate"""
    warmup_ratio: float = 0.03
    """share of the steps spent warming up"""
    weight_decay: float = 0.0
    """AdamW weight decay on >= 2-D weights"""
    grad_clip: float = 1.0
    """max global gradient norm (0 = off)"""
    optimizer: OptimizerKind = "auto"
    """auto = bitsandbytes 8-bit AdamW on CUDA, torch fused AdamW on CPU"""
    precision: Precision = "auto"
    """auto = fp32 weights + bf16 autocast on CUDA, fp32 on CPU"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass (less memory)"""
    strategy: Strategy = "ddp"
    """under torchrun: ddp (replicas) or fsdp2 (sharded weights and optimizer state)"""
    query_length: int = 512
    """query tokens when processing raw data"""
    response_length: int = 133
    """max summary tokens (EOS included) when processing raw data"""
    eval_interval: int = 100
    """validation accuracy on a subset and a checkpoint every this many steps"""
    num_eval_rows: int = 1024
    """validation comparisons scored during training"""
    max_final_eval_rows: int | None = None
    """cap on comparisons per split in the final evaluation (default: all)"""
    num_norm_rows: int = 8192
    """SFT reference summaries scored to normalise (0 = the whole train split)"""
    eval_only: bool = False
    """only evaluate `reward_path` (no training)"""
    reward_path: str | None = None
    """reward checkpoint to evaluate with --eval-only"""
    resume: bool = False
    """continue from OUT/checkpoints' last checkpoint"""
    allow_config_change: bool = False
    """resume even if the saved config differs in fields that change the result"""
    seed: int = 42
    """seed for head init and data order"""
    device: str = "auto"
    """cuda, cpu or auto"""
    wandb_project: str | None = None
    """log to this wandb project (offline without WANDB_API_KEY)"""
    push_to_hub: str | None = None
    """REPO_ID to upload the final model and its card to (token from HF_TOKEN)"""


PRESETS = {
    "smoke": dict(
        preset="smoke",
        sft_path="out/smoke/sft",
        dataset=str(tiny.COMPARISONS_FILE),
        sft_dataset=str(tiny.SFT_DIR),
        output_dir="out/smoke/reward",
        epochs=6,
        batch_size=16,
        micro_batch_size=8,
        lr=2e-3,
        eval_interval=12,
        num_eval_rows=64,
        num_norm_rows=0,
    ),
    # a first hour on one Spark: 40 steps of 128 pairs from the quick SFT model; accuracy on 512
    # pairs at steps 0, 20, 40, then on 1,024 pairs per validation split; offset from 1,024 references
    "quick": dict(
        preset="quick",
        sft_path="out/quick/sft",
        output_dir="out/quick/reward",
        max_steps=40,
        eval_interval=20,
        num_eval_rows=512,
        max_final_eval_rows=1024,
        num_norm_rows=1024,
    ),
}


def pair_scores(score_fn, rows: dict, runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) scores of the chosen and of the rejected summaries, from one pass over each query.

    `score_fn(queries, query_mask, responses, response_mask)` is `models.get_pair_scores` bound to
    the model (wrapped by DDP/FSDP2 under torchrun).
    """
    with runtime.autocast():
        scores = score_fn(*pair_batch(rows, runtime.device))
    return scores.view(-1, 2).unbind(1)


def pairwise_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(score_chosen - score_rejected), summed over the pairs (Stiennon et al. eq. 1)."""
    return -F.logsigmoid(chosen_scores - rejected_scores).sum()


def train_step(
    score_fn,
    model,
    optimizer,
    train,
    indices: list[int],
    pair_lengths: list[int],
    cfg: Config,
    runtime,
    step: int,
    out_dir,
) -> dict:
    """One optimizer step on the comparisons `indices` of `train`: this process's share in
    micro-batches of similar length, `pairwise_loss` over the batch, clip, step. Returns
    train/loss, train/accuracy, train/margin (over all processes), grad_norm, this process's tokens."""
    by_length = [pair_lengths[i] for i in indices]
    micros = list(micro_batches(indices, by_length, cfg.micro_batch_size, runtime.rank, runtime.world_size))
    loss_total, correct, margin = (torch.zeros((), device=runtime.device) for _ in range(3))
    tokens = 0
    for i, micro in enumerate(micros):
        rows = train[micro]
        with no_sync(score_fn, skip=i < len(micros) - 1):
            chosen, rejected = pair_scores(score_fn, rows, runtime)
            loss_sum = pairwise_loss(chosen, rejected)
            # mean over the whole batch for any micro-batch split; x world_size undoes the
            # average over processes that DDP/FSDP2 apply
            (loss_sum / cfg.batch_size * runtime.world_size).backward()
        loss_total += loss_sum.detach()
        correct += (chosen > rejected).sum().detach()
        margin += (chosen - rejected).sum().detach()
        tokens += int(2 * rows["query_token_len"].sum() + rows["chosen_token_len"].sum())
        tokens += int(rows["rejected_token_len"].sum())
    grad_norm = clip_gradients(model.parameters(), cfg.grad_clip)
    check_finite(step, {"train/loss": float(loss_total) / cfg.batch_size, "grad_norm": grad_norm}, out_dir)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss, accuracy, mean_margin = (
        float(all_reduce_sum(x, runtime)) / cfg.batch_size for x in (loss_total, correct, margin)
    )
    stats = {"train/loss": loss, "train/accuracy": accuracy, "train/margin": mean_margin}
    return {**stats, "grad_norm": grad_norm, "tokens": tokens}


@torch.no_grad()
def score_split(score_fn, data, micro_batch_size: int, runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) chosen and rejected scores of every comparison in `data`."""
    chosen, rejected = [], []
    for start in range(0, len(data), micro_batch_size):
        c, r = pair_scores(score_fn, data[start : start + micro_batch_size], runtime)
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


@torch.no_grad()
def reference_scores(model, data, micro_batch_size: int, runtime) -> torch.Tensor:
    """(N,) scores of the SFT reference summaries (query + ' summary<EOS>')."""
    model.eval()
    scores = []
    for start in range(0, len(data), micro_batch_size):
        rows = data[start : start + micro_batch_size]
        lengths = rows["query_reference_response_token_len"]
        T = int(lengths.max())
        mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
        with runtime.autocast():
            scores.append(
                get_score(
                    model, rows["query_reference_response_token"][:, :T].to(runtime.device), mask.to(runtime.device)
                )
                .float()
                .cpu()
            )
    return torch.cat(scores)


def calibration(chosen: torch.Tensor, rejected: torch.Tensor, png: Path, title: str, bins: int = 10) -> list[dict]:
    """Accuracy against |score difference| in quantile bins, beside the ideal sigmoid(|diff|)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diff = chosen - rejected
    order = diff.abs().argsort()
    rows = []
    for part in order.tensor_split(min(bins, len(order))):
        if len(part) == 0:
            continue
        d = diff[part]
        rows.append(
            {
                "mean_abs_diff": float(d.abs().mean()),
                "n": len(part),
                "accuracy": float((d > 0).float().mean()),
                "ideal": float(torch.sigmoid(d.abs()).mean()),
            }
        )
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    ax.plot([r["mean_abs_diff"] for r in rows], [r["accuracy"] for r in rows], "o-", label="reward model")
    xs = torch.linspace(0, max(r["mean_abs_diff"] for r in rows) * 1.05 + 1e-3, 100)
    ax.plot(xs, torch.sigmoid(xs), "--", label="ideal: sigmoid(|diff|)")
    ax.set_xlabel("|score(chosen) - score(rejected)|")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return rows


def evaluate_splits(model, ds, cfg: Config, runtime, out: Path) -> tuple[dict, str]:
    """Accuracy by split/confidence/policy pair/batch, calibration PNGs: (metrics, markdown)."""
    metrics, sections = {}, []
    for split in [s for s in ("validation", "validation_cnndm") if s in ds]:
        data = ds[split]
        if cfg.max_final_eval_rows:
            data = data.select(range(min(cfg.max_final_eval_rows, len(data))))
        chosen, rejected = score_split(
            functools.partial(get_pair_scores, model),
            data.with_format("torch", columns=PAIR_COLUMNS),
            cfg.micro_batch_size,
            runtime,
        )
        accuracy = float((chosen > rejected).float().mean())
        low, high = wilson_interval(float((chosen > rejected).sum()), len(data))
        # the baseline any RM must beat: "the longer summary wins" (ties count half) on the same pairs
        longer = torch.tensor(data["chosen_token_len"]) - torch.tensor(data["rejected_token_len"])
        length_rule = float(((longer > 0).float() + 0.5 * (longer == 0).float()).mean())
        metrics[f"eval/{split}/accuracy"] = accuracy
        metrics[f"eval/{split}/accuracy_ci_low"], metrics[f"eval/{split}/accuracy_ci_high"] = low, high
        metrics[f"eval/{split}/length_rule_accuracy"] = length_rule
        metrics[f"eval/{split}/margin"] = float((chosen - rejected).mean())
        workers = set(data["worker"]) if "worker" in data.column_names else set()
        labels = (
            "GPT-4 verdicts" if any("gpt-4" in str(w).lower() for w in workers) else "human preference labels (OpenAI)"
        )
        curve = calibration(chosen, rejected, out / f"calibration_{split}.png", f"{split} (n={len(data)})")
        sections.append(
            f"### {split}: accuracy {accuracy:.4f} [95% CI {low:.3f}, {high:.3f}] (n={len(data)}, labels: {labels}); "
            f'"the longer summary wins": {length_rule:.4f}\n\n'
            f"![calibration](calibration_{split}.png)\n\n"
            + accuracy_tables(
                chosen, rejected, data, {"confidence": "confidence", "policies": "policy pair", "batch": "batch"}
            )
            + f"Calibration:\n\n{markdown_table(curve, ['mean_abs_diff', 'n', 'accuracy', 'ideal'])}\n"
        )
    return metrics, "\n".join(sections)


def main(cfg: Config) -> None:
    # ---- setup
    runtime = setup_runtime(cfg.device, cfg.precision, tiny_model=cfg.preset == "smoke")
    seed_everything(cfg.seed)
    if cfg.eval_only and not cfg.reward_path:
        raise InputError("--eval-only needs --reward-path DIR (a reward.py output directory)")
    output_dir = cfg.output_dir or "out/reward"
    if cfg.eval_only:  # an evaluation writes metrics.jsonl and report.md: never over a training run's
        output_dir = cfg.output_dir or f"{cfg.reward_path.rstrip('/')}-eval"
        if any((Path(output_dir).expanduser() / name).exists() for name in ("model.safetensors", "checkpoints")):
            raise InputError(
                f"--output-dir {output_dir} holds a training run, whose metrics and report --eval-only would "
                "overwrite: pass another --output-dir"
            )
    out = make_output_dir(output_dir)
    config = dataclasses.asdict(cfg)
    # fail on a wrong checkpoint before minutes of data processing
    if cfg.eval_only:
        check_checkpoint(cfg.reward_path, "reward")
    else:
        check_checkpoint(cfg.base_model or cfg.sft_path, "policy")
    tokenizer = load_tokenizer(cfg.reward_path if cfg.eval_only else cfg.sft_path)

    # ---- data
    lengths = Lengths(cfg.query_length, cfg.response_length)
    splits = ("validation",) if cfg.eval_only else ("train", "validation")
    ds = load_stage_data(cfg.dataset, tokenizer, "comparisons", splits, lengths)

    if cfg.eval_only:
        model = load_reward_model(cfg.reward_path, tokenizer, dtype=runtime.param_dtype, device=runtime.device)
        metrics, text = evaluate_splits(model, ds, cfg, runtime, out)
        Logger(out, config).log(metrics, 0)
        (out / "report.md").write_text(
            f"# Reward model evaluation: {cfg.reward_path}\n\n{text}\n\n## Config\n\n{config_table(config)}\n"
        )
        print(json.dumps(metrics, indent=2))
        return

    train = ds["train"].with_format("torch", columns=PAIR_COLUMNS)
    val_rows = (
        ds["validation"]
        .select(range(min(cfg.num_eval_rows, len(ds["validation"]))))
        .with_format("torch", columns=PAIR_COLUMNS)
    )
    pair_lengths = [
        q + max(c, r)
        for q, c, r in zip(
            ds["train"]["query_token_len"], ds["train"]["chosen_token_len"], ds["train"]["rejected_token_len"]
        )
    ]
    grad_accum_steps = micro_batch_layout(cfg.batch_size, cfg.micro_batch_size, runtime.world_size)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch(len(train), cfg.batch_size)
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    print(
        f"train {len(train)} comparisons, {total_steps} steps of {cfg.batch_size} = {cfg.micro_batch_size} x "
        f"{grad_accum_steps} x {runtime.world_size} processes"
    )

    # ---- model and optimizer
    resume = resume_point(out, config, cfg.allow_config_change) if cfg.resume else None
    if resume:
        model = load_reward_model(str(resume[0]), tokenizer, dtype=runtime.param_dtype, device=runtime.device)
    else:
        torch.manual_seed(cfg.seed)  # the head's init
        model = load_reward_model(
            cfg.base_model or cfg.sft_path, tokenizer, dtype=runtime.param_dtype, device=runtime.device, new_head=True
        )
    disable_dropout(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    # each query runs once for both summaries (not under gradient checkpointing, which drops the cache)
    # (nor under FSDP2: the cache's keys and values reach the layers' weights in the backward pass
    # without passing FSDP2's hooks, which have already freed the gathered weights)
    sharded = cfg.strategy == "fsdp2" and runtime.world_size > 1
    pair_fn = functools.partial(get_pair_scores, share_prefix=not (cfg.gradient_checkpointing or sharded))
    score_fn = distribute(model, pair_fn, runtime, cfg.strategy)  # DDP/FSDP2 under torchrun
    optimizer = make_optimizer(
        list(model.parameters()),
        lr=cfg.lr,
        betas=(0.9, 0.999),
        weight_decay=cfg.weight_decay,
        eps=1e-8,
        kind=cfg.optimizer,
        device=runtime.device,
        sharded=cfg.strategy == "fsdp2" and runtime.world_size > 1,
    )
    start_step = 0
    if resume:
        load_optimizer_state(model, optimizer, resume[1]["optimizer"])
        set_rng_state(resume[1]["rng"])
        start_step = resume[1]["step"]
        print(f"resumed from {resume[0]} at step {start_step}")
    logger = Logger(
        out, config, project=cfg.wandb_project, resume_step=start_step if resume else None, enabled=runtime.is_main
    )

    def evaluate_and_checkpoint(step: int, save: bool = True) -> float:
        chosen, rejected = score_split(score_fn, val_rows, cfg.micro_batch_size, runtime)  # every process scores all
        accuracy = float((chosen > rejected).float().mean())
        logger.log({"val/accuracy": accuracy, "val/margin": float((chosen - rejected).mean())}, step)
        if not save:
            return accuracy
        model_state, optimizer_state = full_state_dicts(model, optimizer, runtime)  # collective under FSDP2
        if runtime.is_main:
            state = {"optimizer": optimizer_state, "rng": rng_state()}
            save_checkpoint(
                out,
                step,
                {"model": model},
                tokenizer,
                state,
                config,
                metric=accuracy,
                higher_is_better=True,
                model_state_dicts={"model": model_state},
            )
        runtime.barrier()
        return accuracy

    # ---- loop: lr, eval/checkpoint, micro-steps, clip, step, log
    bar = tqdm(
        range(start_step, total_steps),
        initial=start_step,
        total=total_steps,
        disable=not runtime.is_main,
        desc="reward",
    )
    t0, tokens_seen = time.time(), 0
    for step in bar:
        lr = get_lr(step, lr=cfg.lr, min_lr=0.0, warmup_steps=warmup_steps, decay_steps=total_steps)
        set_lr(optimizer, lr)
        # step 0 included: the starting model's accuracy; a resumed run logs its first evaluation again
        if step % cfg.eval_interval == 0:
            evaluate_and_checkpoint(step, save=step > start_step)

        indices = batch_indices(step, len(train), cfg.batch_size, cfg.seed)
        stats = train_step(score_fn, model, optimizer, train, indices, pair_lengths, cfg, runtime, step, out)
        tokens_seen += stats.pop("tokens")
        tokens_per_s = tokens_seen * runtime.world_size / (time.time() - t0)
        grad_norm = stats.pop("grad_norm")
        logger.log({**stats, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}, step)
        loss, accuracy = stats["train/loss"], stats["train/accuracy"]
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.2f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
    evaluate_and_checkpoint(total_steps)
    if not runtime.is_main:
        return
    if getattr(model, "_is_fully_sharded", False):  # FSDP2: the main process continues on the full weights
        model = load_reward_model(
            str(latest_checkpoint(out)), tokenizer, dtype=runtime.param_dtype, device=runtime.device
        )
    model.eval()

    # ---- normalise so reference summaries score 0 on average (N+ detail 12), evaluate, save
    sft = load_stage_data(cfg.sft_dataset, tokenizer, "sft", ("train",), Lengths(cfg.query_length, 63))["train"]
    if cfg.num_norm_rows:
        sft = sft.shuffle(seed=cfg.seed).select(range(min(cfg.num_norm_rows, len(sft))))
    sft = sft.with_format("torch", columns=["query_reference_response_token", "query_reference_response_token_len"])
    before = reference_scores(model, sft, cfg.micro_batch_size, runtime)
    model.config.score_bias = getattr(model.config, "score_bias", 0.0) - float(before.mean())
    after = reference_scores(model, sft, cfg.micro_batch_size, runtime)
    norm = {
        "norm/reference_mean_before": float(before.mean()),
        "norm/reference_mean_after": float(after.mean()),
        "norm/reference_std": float(after.std()),
        "norm/rows": len(sft),
    }
    metrics, text = evaluate_splits(model, ds, cfg, runtime, out)
    logger.log({**norm, **metrics}, total_steps)
    logger.finish()
    export_final(out, model, tokenizer)
    records = read_metrics(out / "metrics.jsonl")
    plot_curves(records, ["train/loss", "train/accuracy", "val/accuracy", "lr"], out / "curves.png", "reward model")
    results = "\n".join(f"- **{k}**: {v:.4f}" for k, v in {**metrics, **norm}.items())
    during = [r["val/accuracy"] for r in records if "val/accuracy" in r]  # step 0 is the untrained head on its backbone
    if during:
        accuracy = f"step 0 {during[0]:.4f} -> end {during[-1]:.4f}"
        results = f"- **val/accuracy** ({len(val_rows)} validation pairs): {accuracy}\n{results}"
    (out / "report.md").write_text(
        f"# Reward model report\n\n## Results\n\n{results}\n\n![training curves](curves.png)\n\n"
        f"## Normalisation\n\nMean score of {len(sft)} SFT reference summaries: "
        f"{norm['norm/reference_mean_before']:.4f} before, "
        f"{norm['norm/reference_mean_after']:.2e} after (config.score_bias = {model.config.score_bias:.4f}).\n\n"
        f"## Evaluation\n\n{text}\n\n## Config\n\n{config_table(config)}\n"
    )
    print(json.dumps({**metrics, **norm}, indent=2))
    if cfg.push_to_hub:
        push_run(out, cfg.push_to_hub)


if __name__ == "__main__":
    cli.run(main, Config, presets=PRESETS)
