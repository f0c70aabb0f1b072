"""Direct preference optimisation on TL;DR comparisons (Rafailov et al. 2023, the DPO loss and
its TL;DR experiment; N+ (arXiv 2403.17031), its TL;DR DPO baseline).

    python dpo.py --sft-path out/sft                                          # N+'s TL;DR DPO recipe
    python dpo.py --preset smoke --sft-path out/smoke/sft --output-dir out/smoke/dpo   # offline, CPU
    python dpo.py --resume --output-dir out/dpo ...                           # continue
    torchrun --nproc_per_node 2 dpo.py ...                                    # DDP (--strategy fsdp2 shards)

Writes OUT/ (a plain AutoModelForCausalLM policy), OUT/checkpoints/, OUT/metrics.jsonl,
OUT/reference_logprobs.safetensors, OUT/report.md with implicit-reward accuracy on `validation`
and `validation_cnndm` by confidence and policy pair, and curves.

Policy and reference both start from the SFT checkpoint; the data is the preference dataset the
reward model trains on (`process_comparison_dataset`). Per comparison, with logp the summed
log-probs of a summary's tokens (EOS included) given the query:
  1. implicit rewards r = beta * (logp - ref_logp) of the chosen and the rejected summary;
  2. loss -log sigmoid(r_chosen - r_rejected) (`dpo_loss`); with `--label-smoothing` eps the
     conservative variant (1 - eps) * that + eps * -log sigmoid(r_rejected - r_chosen).
The reference is the policy before its first update, so its log-probs are computed once, with
the policy itself, before training (train rows and the evaluated validation rows), and saved
with the run: no reference model sits in memory while training, and `--resume` reads them back.
Each query runs once with both summaries on its KV cache (`models.get_pair_logprobs`, the
reward step's `pair_hidden_states`), and the LM head runs only at summary tokens.

Defaults are N+'s TL;DR DPO: beta 0.05, batch 64, lr 3e-6, 1 epoch, from SFT with SFT as the
reference. Departures and choices: lr decays linearly to 0 without warmup; fp32 master weights
with bf16 autocast and 8-bit AdamW on CUDA, as the other stages. The original implementation
used beta 0.1, label smoothing 0.1 and lr 5e-5, about 100x the usual DPO lr (its eval loss
stayed above ln 2): `--beta 0.1 --label-smoothing 0.1 --lr 5e-5` reproduces it.
Metrics use TRL's DPOTrainer names (rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected), so curves compare.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
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
from dgx_spark_summary_from_human_feedback.models import (
    check_checkpoint,
    disable_dropout,
    get_pair_logprobs,
    load_policy,
)
from dgx_spark_summary_from_human_feedback.preprocess import load_stage_data
from dgx_spark_summary_from_human_feedback.tracking import (
    Logger,
    accuracy_tables,
    config_table,
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
    preset: Literal["spark", "smoke"] = "spark"
    """spark: N+'s TL;DR DPO recipe; smoke: tiny model + bundled fixtures, offline on CPU"""
    sft_path: str = "out/sft"
    """SFT checkpoint: the policy's start, the reference, and the tokenizer"""
    dataset: str = "openai/summarize_from_feedback"
    """raw comparisons (Hub or local files, processed now) or a processed preference dataset"""
    output_dir: str = "out/dpo"
    """where the policy, checkpoints, reference log-probs, metrics and report go"""
    epochs: int = 1
    """passes over the training comparisons"""
    max_steps: int | None = None
    """stop after this many optimizer steps (default: epochs x steps per epoch)"""
    batch_size: int = 64
    """comparisons per optimizer step, across all processes (N+: 64)"""
    micro_batch_size: int = 8
    """comparisons per forward pass (each query once, its two summaries on its KV cache)"""
    lr: float = 3e-6
    """peak learning rate, decayed linearly to 0 (N+: 3e-6; the original implementation: 5e-5)"""
    warmup_ratio: float = 0.0
    """share of the steps spent warming up"""
    beta: float = 0.05
    """strength of the implicit KL constraint: implicit reward = beta * (logp - ref_logp) (N+: 0.05)"""
    label_smoothing: float = 0.0
    """conservative DPO: assumed probability that a label is flipped (the original implementation: 0.1)"""
    weight_decay: float = 0.0
    """AdamW weight decay on >= 2-D weights"""
    grad_clip: float = 1.0
    """max global gradient norm (0 = off)"""
    optimizer: OptimizerKind = "auto"
    """auto = bitsandbytes 8-bit AdamW on CUDA, torch fused AdamW on CPU"""
    precision: Precision = "auto"
    """auto = fp32 weights + bf16 autocast on CUDA, fp32 on CPU"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass (runs two full rows per comparison: the KV-cache sharing
    needs the cache)"""
    strategy: Strategy = "ddp"
    """under torchrun: ddp (replicas) or fsdp2 (sharded weights and optimizer state)"""
    query_length: int = 512
    """query tokens when processing raw data"""
    response_length: int = 133
    """max summary tokens (EOS included) when processing raw data"""
    eval_interval: int = 100
    """validation loss and implicit-reward accuracy on a subset, and a checkpoint, every this many steps"""
    num_eval_rows: int = 1024
    """validation comparisons evaluated during training"""
    max_final_eval_rows: int | None = None
    """cap on comparisons per split in the final evaluation (default: all)"""
    resume: bool = False
    """continue from OUT/checkpoints' last checkpoint (the reference log-probs are read back)"""
    allow_config_change: bool = False
    """resume even if the saved config differs in fields that change the result"""
    seed: int = 42
    """seed for data order"""
    device: str = "auto"
    """cuda, cpu or auto"""
    wandb_project: str | None = None
    """log to this wandb project (offline without WANDB_API_KEY)"""
    push_to_hub: str | None = None
    """REPO_ID to upload the final policy and its card to (token from HF_TOKEN)"""


PRESETS = {
    "smoke": dict(
        preset="smoke",
        sft_path="out/smoke/sft",
        dataset=str(tiny.COMPARISONS_FILE),
        output_dir="out/smoke/dpo",
        epochs=4,
        batch_size=16,
        micro_batch_size=8,
        lr=1e-3,
        beta=0.1,
        eval_interval=6,
        num_eval_rows=64,
    )
}

REFERENCE_FILE = "reference_logprobs.safetensors"


# ---------------------------------------------------------------------------------------------
# the loss


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B,) losses, chosen and rejected implicit rewards (detached) from (B,) summed log-probs.

    Rafailov et al. eq. 7: -log sigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r))); with label
    smoothing eps (conservative DPO) the loss also counts the flipped label with weight eps.
    """
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    margin = chosen_rewards - rejected_rewards
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def pair_logprobs(logprobs_fn, rows: dict, runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) summed log-probs of the chosen and of the rejected summaries, one pass per query.

    `logprobs_fn(queries, query_mask, responses, response_mask)` is `models.get_pair_logprobs`
    bound to the policy (wrapped by DDP/FSDP2 under torchrun).
    """
    with runtime.autocast():
        logprobs = logprobs_fn(*pair_batch(rows, runtime.device))  # (2B, Tr), 0 on padding
    return logprobs.sum(1).view(-1, 2).unbind(1)


# ---------------------------------------------------------------------------------------------
# reference log-probs: computed once, kept with the run


@torch.no_grad()
def reference_logprobs(model, data, micro_batch_size: int, runtime) -> torch.Tensor:
    """(N, 2) summed log-probs of (chosen, rejected) of every row of `data` under `model`; each
    process computes its share of the rows, and all end with every row."""
    model.eval()
    logprobs_fn = functools.partial(get_pair_logprobs, model)
    out = torch.zeros(len(data), 2, device=runtime.device)
    share = list(range(runtime.rank, len(data), runtime.world_size))
    for start in range(0, len(share), micro_batch_size):
        rows = share[start : start + micro_batch_size]
        chosen, rejected = pair_logprobs(logprobs_fn, data[rows], runtime)
        out[rows] = torch.stack([chosen, rejected], 1).float()
    model.train()
    return all_reduce_sum(out, runtime).cpu()


def load_reference(path: Path, expected: dict[str, str]) -> dict[str, torch.Tensor] | None:
    """The saved reference log-probs, or None when absent or made for other data or another SFT model."""
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        if f.metadata() != expected:
            return None
        return {key: f.get_tensor(key) for key in f.keys()}


def save_reference(path: Path, reference: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in reference.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # a kill leaves the old file or the new one


# ---------------------------------------------------------------------------------------------
# one optimizer step, and evaluation


def train_step(
    logprobs_fn,
    model,
    optimizer,
    train,
    indices: list[int],
    reference: torch.Tensor,
    lengths: list[int],
    cfg: Config,
    runtime,
    step: int,
    out_dir,
) -> dict[str, float]:
    """One optimizer step over the comparisons `indices`: this process's micro-batches (forward
    and backward, gradients summed so that any micro-batch split gives the batch mean), clip,
    NaN guard, AdamW. Returns the batch's TRL metrics (over all processes) and the grad norm."""
    micros = list(
        micro_batches(indices, [lengths[i] for i in indices], cfg.micro_batch_size, runtime.rank, runtime.world_size)
    )
    sums = torch.zeros(7, device=runtime.device)
    for i, micro in enumerate(micros):
        with no_sync(logprobs_fn, skip=i < len(micros) - 1):
            chosen, rejected = pair_logprobs(logprobs_fn, train[micro], runtime)
            ref = reference[micro].to(runtime.device)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                chosen, rejected, ref[:, 0], ref[:, 1], cfg.beta, cfg.label_smoothing
            )
            # x world_size undoes the average over processes that DDP/FSDP2 apply
            (losses.sum() / cfg.batch_size * runtime.world_size).backward()
        sums += torch.stack(
            [
                losses.sum(),
                chosen_rewards.sum(),
                rejected_rewards.sum(),
                (chosen_rewards > rejected_rewards).float().sum(),
                (chosen_rewards - rejected_rewards).sum(),
                chosen.sum(),
                rejected.sum(),
            ]
        ).detach()
    sums = all_reduce_sum(sums, runtime) / cfg.batch_size  # every process sees the same values, and stops together
    grad_norm = clip_gradients(model.parameters(), cfg.grad_clip)
    check_finite(step, {"train/loss": float(sums[0]), "grad_norm": grad_norm}, out_dir)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    names = [
        "train/loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ]
    return {**dict(zip(names, sums.tolist())), "grad_norm": grad_norm}


@torch.no_grad()
def implicit_rewards(
    logprobs_fn, data, reference: torch.Tensor, cfg: Config, runtime
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N,) losses, chosen and rejected implicit rewards of every row of `data` (every process
    computes all: FSDP2 needs every process in every forward)."""
    losses, chosen_rewards, rejected_rewards = [], [], []
    for start in range(0, len(data), cfg.micro_batch_size):
        chosen, rejected = pair_logprobs(logprobs_fn, data[start : start + cfg.micro_batch_size], runtime)
        ref = reference[start : start + cfg.micro_batch_size].to(runtime.device)
        loss, c, r = dpo_loss(chosen.float(), rejected.float(), ref[:, 0], ref[:, 1], cfg.beta, cfg.label_smoothing)
        losses.append(loss.cpu())
        chosen_rewards.append(c.cpu())
        rejected_rewards.append(r.cpu())
    return torch.cat(losses), torch.cat(chosen_rewards), torch.cat(rejected_rewards)


def evaluate_splits(logprobs_fn, ds, eval_sets: dict, reference: dict, cfg: Config, runtime) -> tuple[dict, str]:
    """Implicit-reward accuracy by split, confidence and policy pair: (metrics, markdown)."""
    metrics, sections = {}, []
    for split, data in eval_sets.items():
        losses, chosen, rejected = implicit_rewards(logprobs_fn, data, reference[split], cfg, runtime)
        accuracy = float((chosen > rejected).float().mean())
        metrics.update(
            {
                f"eval/{split}/accuracy": accuracy,
                f"eval/{split}/margin": float((chosen - rejected).mean()),
                f"eval/{split}/loss": float(losses.mean()),
            }
        )
        rows = ds[split].select(range(len(data)))
        sections.append(
            f"### {split}: implicit-reward accuracy {accuracy:.4f} (n={len(data)})\n\n"
            + accuracy_tables(chosen, rejected, rows, {"confidence": "confidence", "policies": "policy pair"})
        )
    return metrics, "\n".join(sections)


def main(cfg: Config) -> dict:
    # ---- setup
    runtime = setup_runtime(cfg.device, cfg.precision, tiny_model=cfg.preset == "smoke")
    seed_everything(cfg.seed)
    out = make_output_dir(cfg.output_dir)
    config = dataclasses.asdict(cfg)
    check_checkpoint(cfg.sft_path, "policy")  # fail on a wrong checkpoint before minutes of data processing
    # and on sizes that do not divide
    grad_accum_steps = micro_batch_layout(cfg.batch_size, cfg.micro_batch_size, runtime.world_size)
    tokenizer = load_tokenizer(cfg.sft_path)

    # ---- data: the reward model's comparisons
    ds = load_stage_data(
        cfg.dataset, tokenizer, "comparisons", ("train", "validation"), Lengths(cfg.query_length, cfg.response_length)
    )
    train = ds["train"].with_format("torch", columns=PAIR_COLUMNS)
    eval_sets = {
        split: ds[split]
        .select(range(min(cfg.max_final_eval_rows or len(ds[split]), len(ds[split]))))
        .with_format("torch", columns=PAIR_COLUMNS)
        for split in ("validation", "validation_cnndm")
        if split in ds
    }
    val_rows = eval_sets["validation"].select(range(min(cfg.num_eval_rows, len(eval_sets["validation"]))))
    pair_lengths = [
        q + max(c, r)
        for q, c, r in zip(
            ds["train"]["query_token_len"], ds["train"]["chosen_token_len"], ds["train"]["rejected_token_len"]
        )
    ]
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch(len(train), cfg.batch_size)
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    print(
        f"train {len(train)} comparisons, {total_steps} steps of {cfg.batch_size} = {cfg.micro_batch_size} x "
        f"{grad_accum_steps} x {runtime.world_size} processes"
    )

    # ---- policy, reference log-probs, optimizer
    resume = resume_point(out, config, cfg.allow_config_change) if cfg.resume else None
    policy = load_policy(
        str(resume[0]) if resume else cfg.sft_path, tokenizer, dtype=runtime.param_dtype, device=runtime.device
    )
    disable_dropout(policy)
    splits = {"train": train, **eval_sets}
    metadata = {
        "sft_path": str(Path(cfg.sft_path).expanduser().resolve()),
        **{f"{s}/rows": str(len(d)) for s, d in splits.items()},
        **{f"{s}/fingerprint": ds[s]._fingerprint for s in splits},
    }
    reference = load_reference(out / REFERENCE_FILE, metadata)
    if reference is None:
        # the SFT policy before any update is the reference; a resumed run loads it afresh
        ref_model = (
            load_policy(cfg.sft_path, tokenizer, dtype=runtime.param_dtype, device=runtime.device) if resume else policy
        )
        disable_dropout(ref_model)
        t = time.time()
        reference = {}
        for split, data in splits.items():
            chosen_rejected = reference_logprobs(ref_model, data, cfg.micro_batch_size, runtime)
            reference[split] = chosen_rejected
        del ref_model
        if runtime.is_main:
            save_reference(out / REFERENCE_FILE, reference, metadata)
        runtime.barrier()
        print(
            f"reference log-probs of {sum(len(d) for d in splits.values())} comparisons in {time.time() - t:.0f} s -> "
            f"{out / REFERENCE_FILE}"
        )
    else:
        print(f"reference log-probs read from {out / REFERENCE_FILE}")
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    policy.train()
    # each query runs once for both summaries; not under gradient checkpointing, which drops the
    # cache, nor under FSDP2, whose hooks the cache's keys and values bypass (as in reward.py)
    sharded = cfg.strategy == "fsdp2" and runtime.world_size > 1
    logprobs_fn = distribute(
        policy,
        functools.partial(get_pair_logprobs, share_prefix=not (cfg.gradient_checkpointing or sharded)),
        runtime,
        cfg.strategy,
    )
    optimizer = make_optimizer(
        list(policy.parameters()),
        lr=cfg.lr,
        betas=(0.9, 0.999),
        weight_decay=cfg.weight_decay,
        eps=1e-8,
        kind=cfg.optimizer,
        device=runtime.device,
        sharded=sharded,
    )
    start_step = 0
    if resume:
        load_optimizer_state(policy, optimizer, resume[1]["optimizer"])
        set_rng_state(resume[1]["rng"])
        start_step = resume[1]["step"]
        print(f"resumed from {resume[0]} at step {start_step}")
    logger = Logger(
        out, config, project=cfg.wandb_project, resume_step=start_step if resume else None, enabled=runtime.is_main
    )

    def evaluate_and_checkpoint(step: int, save: bool = True) -> None:
        losses, chosen, rejected = implicit_rewards(logprobs_fn, val_rows, reference["validation"], cfg, runtime)
        val_loss = float(losses.mean())
        logger.log(
            {
                "val/loss": val_loss,
                "val/rewards/accuracies": float((chosen > rejected).float().mean()),
                "val/rewards/margins": float((chosen - rejected).mean()),
            },
            step,
        )
        if not save:
            return
        model_state, optimizer_state = full_state_dicts(policy, optimizer, runtime)  # collective under FSDP2
        if runtime.is_main:
            state = {"optimizer": optimizer_state, "rng": rng_state()}
            save_checkpoint(
                out,
                step,
                {"model": policy},
                tokenizer,
                state,
                config,
                metric=val_loss,
                model_state_dicts={"model": model_state},
            )
        runtime.barrier()

    # ---- loop: lr, eval/checkpoint, micro-steps, clip, step, log
    bar = tqdm(
        range(start_step, total_steps), initial=start_step, total=total_steps, disable=not runtime.is_main, desc="dpo"
    )
    t0 = time.time()
    for step in bar:
        lr = get_lr(step, lr=cfg.lr, min_lr=0.0, warmup_steps=warmup_steps, decay_steps=total_steps, schedule="linear")
        set_lr(optimizer, lr)
        # step 0: the accuracy before training; a resumed run logs its first evaluation again
        if step % cfg.eval_interval == 0:
            evaluate_and_checkpoint(step, save=step > start_step)

        indices = batch_indices(step, len(train), cfg.batch_size, cfg.seed)
        stats = train_step(
            logprobs_fn, policy, optimizer, train, indices, reference["train"], pair_lengths, cfg, runtime, step, out
        )
        pairs_per_s = (step + 1 - start_step) * cfg.batch_size / (time.time() - t0)
        logger.log({**stats, "lr": lr, "pairs_per_s": pairs_per_s}, step)
        bar.set_postfix(loss=f"{stats['train/loss']:.3f}", acc=f"{stats['rewards/accuracies']:.2f}", lr=f"{lr:.2e}")

    # ---- final evaluation, checkpoint, export, report
    evaluate_and_checkpoint(total_steps)
    metrics, text = evaluate_splits(logprobs_fn, ds, eval_sets, reference, cfg, runtime)
    if not runtime.is_main:
        return {}
    if getattr(policy, "_is_fully_sharded", False):  # FSDP2: the main process continues on the full weights
        policy = load_policy(str(latest_checkpoint(out)), tokenizer, dtype=runtime.param_dtype, device=runtime.device)
    logger.log(metrics, total_steps)
    logger.finish()
    export_final(out, policy, tokenizer)
    write_report(out, config, metrics, text)
    print(json.dumps(metrics, indent=2))
    if cfg.push_to_hub:
        push_run(out, cfg.push_to_hub)
    return metrics


def write_report(out: Path, config: dict, metrics: dict, text: str) -> None:
    records = read_metrics(out / "metrics.jsonl")
    plot_curves(
        records,
        ["train/loss", "rewards/accuracies", "rewards/margins", "val/rewards/accuracies"],
        out / "curves.png",
        "DPO",
    )
    plot_curves(
        records,
        ["rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"],
        out / "curves_logps.png",
        "DPO rewards and log-probs",
    )
    results = "\n".join(f"- **{k}**: {v:.4f}" for k, v in metrics.items())
    (out / "report.md").write_text(
        f"# DPO report\n\nbeta {config['beta']}, label smoothing {config['label_smoothing']}, reference: "
        f"`{config['sft_path']}` "
        f"(log-probs in `{REFERENCE_FILE}`).\n\n## Results\n\n{results}\n\n![loss and accuracy](curves.png)\n\n"
        f"![rewards and log-probs](curves_logps.png)\n\n## Implicit-reward accuracy\n\n"
        f"A comparison counts as right when beta * (logp - ref_logp) is higher for the chosen summary.\n\n{text}\n\n"
        f"## Config\n\n{config_table(config)}\n"
    )


if __name__ == "__main__":
    cli.run(main, Config, presets=PRESETS)
