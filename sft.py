"""Stage 1: supervised fine-tuning on Reddit TL;DR (Stiennon et al. 2020, sec. 3.5; N+ details 1-8).

    python sft.py                                        # Qwen2.5-0.5B, the DGX Spark recipe
    python sft.py --preset smoke --output-dir out/sft    # offline, CPU, tiny model, < 2 minutes
    python sft.py --resume --output-dir out/sft          # continue from the last checkpoint
    torchrun --nproc_per_node 2 sft.py ...               # DDP; --batch-size stays the global batch

Writes OUT/ (final model, loads with AutoModelForCausalLM.from_pretrained), OUT/checkpoints/
(last and best, with optimizer and RNG state), OUT/metrics.jsonl, OUT/report.md.

Defaults are the original implementation's recipe: 1 epoch of 116,722 posts, batch 128
(16 x 8), lr 3e-6 -> 3e-7 with 10 warmup steps and cosine decay to step 800, AdamW (0.9, 0.95),
weight decay 0.1, clip 1.0, 8-bit AdamW on CUDA. Departures from N+ (and why):
- the loss covers the response only (N+ trained on query+reference: `--train-on-query`);
- fp32 master weights with bf16 autocast (pure bf16 loses lr-3e-6 updates under its resolution);
- no fixed padding to 575: batches are padded to their longest row, the LM head runs only on
  labelled positions, and the loss is summed over the whole batch, divided by its token count.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
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
from dgx_spark_summary_from_human_feedback.generation import Decoding, query_tokens_of, summarize
from dgx_spark_summary_from_human_feedback.models import disable_dropout, lm_loss_sum, load_policy
from dgx_spark_summary_from_human_feedback.preprocess import load_stage_data
from dgx_spark_summary_from_human_feedback.rouge import rouge_scores
from dgx_spark_summary_from_human_feedback.tracking import (
    Logger,
    config_table,
    markdown_table,
    plot_curves,
    read_metrics,
)
from dgx_spark_summary_from_human_feedback.training import (
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
    model: str = "Qwen/Qwen2.5-0.5B"
    """base model (Hub name or directory); `tiny` builds the random 2-layer Qwen2 of tiny.py"""
    dataset: str = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"
    """raw TL;DR posts (Hub or local files, processed now) or a processed dataset (save_to_disk dir or Hub)"""
    output_dir: str = "out/sft"
    """where the model, checkpoints, metrics and report go"""
    epochs: int = 1
    """passes over the training split"""
    max_steps: int | None = None
    """stop after this many optimizer steps (default: epochs x steps per epoch)"""
    batch_size: int = 128
    """examples per optimizer step, across all processes"""
    micro_batch_size: int = 16
    """examples per forward pass; grad-accum steps = batch / (micro x processes)"""
    lr: float = 3e-6
    """peak learning rate"""
    min_lr: float = 3e-7
    """learning rate after `decay_steps`"""
    warmup_steps: int = 10
    """linear warmup steps"""
    decay_steps: int = 800
    """cosine decay ends here; flat at min_lr after"""
    weight_decay: float = 0.1
    """AdamW weight decay on >= 2-D weights only"""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas"""
    eps: float = 1e-8
    """AdamW epsilon"""
    grad_clip: float = 1.0
    """max global gradient norm (0 = off)"""
    optimizer: OptimizerKind = "auto"
    """auto = bitsandbytes 8-bit AdamW on CUDA, torch fused AdamW on CPU"""
    precision: Precision = "auto"
    """auto = fp32 weights + bf16 autocast on CUDA, fp32 on CPU"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass (less memory, ~30% slower)"""
    strategy: Strategy = "ddp"
    """under torchrun: ddp (replicas) or fsdp2 (sharded weights and optimizer state)"""
    train_on_query: bool = False
    """also put loss on the query tokens (N+ did; the original implementation did not)"""
    query_length: int = 512
    """query tokens when processing raw data"""
    response_length: int = 63
    """max response tokens (EOS included) when processing raw data and when sampling"""
    eval_interval: int = 100
    """evaluate validation loss and save a checkpoint every this many steps"""
    num_eval_rows: int = 512
    """fixed validation subset for the loss"""
    num_eval_samples: int = 64
    """validation posts summarised (temperature `eval_temperature`) for ROUGE and the sample table"""
    eval_temperature: float = 0.01
    """N+ samples at 0.01 for evaluation (0 = greedy)"""
    decoding: Decoding = "eager"
    """decoding steps of the evaluation samples: eager, static or cuda_graph (`generation.Decoding`)"""
    resume: bool = False
    """continue from OUT/checkpoints' last checkpoint"""
    allow_config_change: bool = False
    """resume even if the saved config differs in fields that change the result"""
    seed: int = 42
    """seed for data order and sampling"""
    device: str = "auto"
    """cuda, cpu or auto"""
    wandb_project: str | None = None
    """log to this wandb project (offline without WANDB_API_KEY); metrics.jsonl is always written"""
    push_to_hub: str | None = None
    """REPO_ID to upload the final model and its card to (token from HF_TOKEN)"""


PRESETS = {
    "smoke": dict(
        preset="smoke",
        model="tiny",
        dataset=str(tiny.SFT_DIR),
        output_dir="out/smoke/sft",
        epochs=12,
        batch_size=16,
        micro_batch_size=8,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=5,
        decay_steps=60,
        eval_interval=10,
        num_eval_rows=32,
        num_eval_samples=8,
    ),
    # a first hour on one Spark (bench/spark_projection.py --preset quick): the recipe's model, data and lr on the
    # first 15,360 posts of a random order, cosine over those 120 steps instead of 800 (issue 14)
    "quick": dict(
        preset="quick",
        output_dir="out/quick/sft",
        max_steps=120,
        decay_steps=120,
        eval_interval=40,
        num_eval_samples=64,
    ),
}


def sft_batch(rows: dict, train_on_query: bool, device, pad_to: int | None = None) -> tuple[torch.Tensor, ...]:
    """Trim a micro-batch to its longest row: (B, T) ids, mask, labels (-100 off the response).

    Lengths, not pad ids, tell query, response and padding apart (N+ detail 4). `pad_to` keeps
    that many columns instead (bench/'s fixed-shape baseline: N+ padded every row to 575).
    """
    lengths = rows["query_reference_response_token_len"]  # (B,)
    response_lengths = rows["reference_response_token_len"]
    T = pad_to or int(lengths.max())
    ids = rows["query_reference_response_token"][:, :T]
    positions = torch.arange(T)[None, :]
    mask = positions < lengths[:, None]
    first_label = 0 if train_on_query else (lengths - response_lengths)[:, None]
    labels = ids.masked_fill(~mask | (positions < first_label), -100)
    return ids.to(device), mask.long().to(device), labels.to(device)


def train_step(
    loss_fn,
    model,
    optimizer,
    train,
    indices: list[int],
    lengths: list[int],
    response_lengths: list[int],
    cfg: Config,
    runtime,
    step: int,
    out_dir,
    pad_to: int | None = None,
) -> dict:
    """One optimizer step on the rows `indices` of `train`: this process's share in micro-batches
    of similar length, response-token loss (`models.lm_loss_sum` through `loss_fn`), clip, step.
    Returns train/loss (over all processes), grad_norm and this process's non-pad tokens."""
    by_length = [lengths[i] for i in indices]
    rows_per_micro = list(micro_batches(indices, by_length, cfg.micro_batch_size, runtime.rank, runtime.world_size))
    # labelled tokens of the whole batch: every response token (+ the query's after its first)
    label_count = sum(lengths[i] - 1 if cfg.train_on_query else response_lengths[i] for i in indices)
    loss_total, tokens = torch.zeros((), device=runtime.device), 0
    for i, rows in enumerate(rows_per_micro):
        ids, mask, labels = sft_batch(train[rows], cfg.train_on_query, runtime.device, pad_to)
        with runtime.autocast(), no_sync(loss_fn, skip=i < len(rows_per_micro) - 1):
            loss_sum, _ = loss_fn(ids, mask, labels)
            # summed over the batch, divided by its label count: the same gradient for any
            # micro-batch split (a per-micro-batch mean would weight short responses more);
            # x world_size undoes the average over processes that DDP/FSDP2 apply
            (loss_sum / label_count * runtime.world_size).backward()
        loss_total += loss_sum.detach()
        tokens += int(mask.sum())
    grad_norm = clip_gradients(model.parameters(), cfg.grad_clip)
    check_finite(step, {"train/loss": float(loss_total) / label_count, "grad_norm": grad_norm}, out_dir)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = float(all_reduce_sum(loss_total, runtime)) / label_count
    return {"train/loss": loss, "grad_norm": grad_norm, "tokens": tokens}


@torch.no_grad()
def evaluate_loss(loss_fn, data, micro_batch_size: int, runtime) -> float:
    """Mean response-token loss over the fixed validation subset (each process scores a share)."""
    total, count = torch.zeros((), device=runtime.device), torch.zeros((), device=runtime.device)
    for start in range(0, len(data), micro_batch_size):
        ids, mask, labels = sft_batch(data[start : start + micro_batch_size], False, runtime.device)
        share = slice(runtime.rank, None, runtime.world_size)  # FSDP2 needs every process in every forward
        with runtime.autocast():
            loss_sum, n = loss_fn(ids[share], mask[share], labels[share])
        total += loss_sum
        count += n
    return float(all_reduce_sum(total, runtime) / all_reduce_sum(count, runtime).clamp(min=1))


@torch.no_grad()
def sample_validation(model, tokenizer, rows: list[dict], cfg: Config, runtime) -> tuple[list[dict], dict]:
    """Summaries of the validation posts at `eval_temperature`: (samples, their ROUGE-1/2/L against
    the references, share without EOS, mean length in tokens). The same posts at step 0 and the end."""
    model.eval()
    samples = summarize(
        model,
        tokenizer,
        query_tokens_of(rows, tokenizer, cfg.query_length),
        batch_size=cfg.micro_batch_size,
        max_new_tokens=cfg.response_length,
        temperature=cfg.eval_temperature,
        seed=cfg.seed,
        autocast=runtime.autocast,
        decoding=cfg.decoding,
    )
    model.train()
    references = [r["reference_response"].replace(tokenizer.eos_token, "").strip() for r in rows]
    rouge = rouge_scores([s["response"] for s in samples], references)
    n = max(len(samples), 1)
    metrics = {
        **{f"eval/{k}": v for k, v in rouge.items()},
        "eval/no_eos_rate": sum(not s["has_eos"] for s in samples) / n,
        "eval/response_length": sum(len(s["response_token"]) for s in samples) / n,
    }
    return samples, metrics


def main(cfg: Config) -> None:
    # ---- setup
    runtime = setup_runtime(cfg.device, cfg.precision, tiny_model=cfg.preset == "smoke")
    seed_everything(cfg.seed)
    out = make_output_dir(cfg.output_dir)
    model_path = cfg.model
    if cfg.model == "tiny":
        model_path = str(out / "tiny-init")
        if runtime.is_main:
            tiny.write_model(model_path, seed=cfg.seed)
        runtime.barrier()
    tokenizer = load_tokenizer(model_path)
    config = dataclasses.asdict(cfg)

    # ---- data
    ds = load_stage_data(
        cfg.dataset, tokenizer, "sft", ("train", "validation"), Lengths(cfg.query_length, cfg.response_length)
    )
    columns = ["query_reference_response_token", "query_reference_response_token_len", "reference_response_token_len"]
    train = ds["train"].with_format("torch", columns=columns)
    val_loss_rows = (
        ds["validation"]
        .select(range(min(cfg.num_eval_rows, len(ds["validation"]))))
        .with_format("torch", columns=columns)
    )
    val_sample_rows = [ds["validation"][i] for i in range(min(cfg.num_eval_samples, len(ds["validation"])))]
    lengths = list(ds["train"]["query_reference_response_token_len"])
    response_lengths = list(ds["train"]["reference_response_token_len"])
    grad_accum_steps = micro_batch_layout(cfg.batch_size, cfg.micro_batch_size, runtime.world_size)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch(len(train), cfg.batch_size)
    print(
        f"train {len(train)} rows, {total_steps} steps of {cfg.batch_size} = {cfg.micro_batch_size} x "
        f"{grad_accum_steps} x {runtime.world_size} processes"
    )

    # ---- model and optimizer
    resume = resume_point(out, config, cfg.allow_config_change) if cfg.resume else None
    model = load_policy(
        str(resume[0]) if resume else model_path, tokenizer, dtype=runtime.param_dtype, device=runtime.device
    )
    disable_dropout(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    # step 0: the base model's samples, before DDP/FSDP2 wrap it, so the report shows the change
    base_samples, base_metrics = (
        sample_validation(model, tokenizer, val_sample_rows, cfg, runtime)
        if not resume and runtime.is_main
        else ([], {})
    )
    runtime.barrier()
    loss_fn = distribute(model, lm_loss_sum, runtime, cfg.strategy)  # DDP/FSDP2 under torchrun
    optimizer = make_optimizer(
        list(model.parameters()),
        lr=cfg.lr,
        betas=cfg.betas,
        weight_decay=cfg.weight_decay,
        eps=cfg.eps,
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

    def checkpoint(step: int, val_loss: float) -> None:
        model_state, optimizer_state = full_state_dicts(model, optimizer, runtime)  # collective under FSDP2
        if runtime.is_main:
            state = {
                "optimizer": optimizer_state,
                "rng": rng_state(),
                "epoch": step // steps_per_epoch(len(train), cfg.batch_size),
            }
            save_checkpoint(
                out,
                step,
                {"model": model},
                tokenizer,
                state,
                config,
                metric=val_loss,
                model_state_dicts={"model": model_state},
            )
        runtime.barrier()

    # ---- loop: lr, eval/checkpoint, micro-steps, clip, step, log
    bar = tqdm(
        range(start_step, total_steps), initial=start_step, total=total_steps, disable=not runtime.is_main, desc="sft"
    )
    t0, tokens_seen = time.time(), 0
    for step in bar:
        lr = get_lr(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, decay_steps=cfg.decay_steps)
        set_lr(optimizer, lr)
        if step % cfg.eval_interval == 0:  # step 0 included: the starting model's validation loss
            val_loss = evaluate_loss(loss_fn, val_loss_rows, cfg.micro_batch_size, runtime)
            logger.log({"val/loss": val_loss, **(base_metrics if step == 0 else {})}, step)
            if step > start_step:  # a resumed run logs its first step's evaluation again, but keeps its checkpoint
                checkpoint(step, val_loss)

        indices = batch_indices(step, len(train), cfg.batch_size, cfg.seed)
        stats = train_step(
            loss_fn, model, optimizer, train, indices, lengths, response_lengths, cfg, runtime, step, out
        )
        tokens_seen += stats["tokens"]
        tokens_per_s = tokens_seen * runtime.world_size / (time.time() - t0)
        record = {
            "train/loss": stats["train/loss"],
            "lr": lr,
            "grad_norm": stats["grad_norm"],
            "tokens_per_s": tokens_per_s,
        }
        logger.log(record, step)
        bar.set_postfix(loss=f"{stats['train/loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")

    # ---- final evaluation, checkpoint, export, report
    val_loss = evaluate_loss(loss_fn, val_loss_rows, cfg.micro_batch_size, runtime)
    checkpoint(total_steps, val_loss)
    if not runtime.is_main:
        return
    if getattr(model, "_is_fully_sharded", False):  # FSDP2: the main process continues on the full weights
        model = load_policy(str(latest_checkpoint(out)), tokenizer, dtype=runtime.param_dtype, device=runtime.device)
    samples, sample_metrics = sample_validation(model, tokenizer, val_sample_rows, cfg, runtime)
    model.eval()
    final = {"val/loss": val_loss, **sample_metrics}
    logger.log(final, total_steps)
    logger.finish()
    export_final(out, model, tokenizer)
    references = [r["reference_response"].replace(tokenizer.eos_token, "").strip() for r in val_sample_rows]
    table = [
        {"query": r["query"], "reference": ref, "generation": s["response"]}
        for r, ref, s in zip(val_sample_rows, references, samples)
    ]
    for row, base in zip(table, base_samples):  # a resumed run has no base samples of its own
        row["base model"] = base["response"]
    (out / "samples.jsonl").write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in table))
    write_report(out, config, final, table)
    print(json.dumps(final, indent=2))
    if cfg.push_to_hub:
        push_run(out, cfg.push_to_hub)


def write_report(out: Path, config: dict, final: dict, table: list[dict]) -> None:
    records = read_metrics(out / "metrics.jsonl")
    plot_curves(records, ["train/loss", "val/loss", "lr"], out / "loss.png", "SFT")
    start = {
        k: v for r in records if r.get("step") == 0 for k, v in r.items() if k in final
    }  # the base model, logged at step 0
    results = "\n".join(f"| {k} | {start.get(k, float('nan')):.4f} | {v:.4f} |" for k, v in final.items())
    columns = (
        ["query", "reference", "base model", "generation"]
        if table and "base model" in table[0]
        else ["query", "reference", "generation"]
    )
    (out / "report.md").write_text(
        "# SFT report\n\n## Results\n\n| metric | step 0 (base model) | end |\n|---|---|---|\n"
        f"{results}\n\n![loss curves](loss.png)\n\n"
        f"## Samples (validation, temperature {config['eval_temperature']})\n\n{markdown_table(table, columns)}\n\n"
        f"## Config\n\n{config_table(config)}\n"
    )


if __name__ == "__main__":
    cli.run(main, Config, presets=PRESETS)
