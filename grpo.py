"""Online RL without a value model: GRPO (Shao et al. 2024, DeepSeekMath) and RLOO (Ahmadian et
al. 2024, "Back to Basics"), on the rollouts of ppo.py.

    python grpo.py --sft-path out/sft --reward-path out/reward                  # GRPO, k = 8
    python grpo.py --advantage rloo --sft-path out/sft --reward-path out/reward # RLOO
    python grpo.py --preset smoke --sft-path out/smoke/sft --reward-path out/smoke/reward \\
        --output-dir out/smoke/grpo                                               # offline, CPU
    torchrun --nproc_per_node 2 grpo.py ...                                       # DDP

Policy and frozen reference start from the SFT model; the reward model is frozen and normalised.
There is no value model: the baseline of a response is the other responses to the same query.
Each update:
  1. take `batch_size / group_size` queries and sample `group_size` responses to each, exactly
     `response_length` tokens at `temperature`, EOS not special (`rollout.rollout`, as PPO);
  2. truncate after the first EOS; score with `models.get_score`; no EOS -> `no_eos_score`;
  3. the return of a response: with `--kl-in reward` (default) N+'s per-token KL-shaped reward
     (`rollout.kl_rewards`) summed over the response, score - kl_coef * KL; with `--kl-in loss`
     the score alone;
  4. sequence advantages within each group: grpo (r - mean) / (std + eps), or rloo r - the mean
     of the other k - 1 returns (no std); every token of a response gets its advantage;
  5. `update_epochs` passes of the clipped surrogate (PPO's, without the value loss), plus with
     `--kl-in loss` kl_coef x the k3 estimator exp(ref - logp) - (ref - logp) - 1 per token.
As in ppo.py, log-probs are taken at logits / temperature, so the first minibatch's ratio is 1.

Defaults mirror ppo.py's N+ recipe so that the two differ only in the baseline: 512 episodes
per update (64 queries x 8), 4 epochs, 1 minibatch, lr 3e-6 with linear decay, clip 0.2, KL
coefficient 0.05 as a per-token reward, temperature 0.7, 53 tokens, no-EOS score -1, 1M
episodes. Departures from the GRPO paper: its KL is a k3 loss term (`--kl-in loss`) and its
loss a per-sequence mean of token means; here the loss is summed over the minibatch's real
tokens and divided by their count, as in ppo.py (no length bias between short and long responses).
"""

from __future__ import annotations

import dataclasses
import functools
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
    make_output_dir,
    push_run,
    resume_point,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_text_atomic,
)
from dgx_spark_summary_from_human_feedback.data import Lengths, load_tokenizer
from dgx_spark_summary_from_human_feedback.errors import InputError
from dgx_spark_summary_from_human_feedback.generation import Decoding
from dgx_spark_summary_from_human_feedback.models import (
    check_checkpoint,
    disable_dropout,
    get_score,
    load_policy,
    load_reward_model,
    logprobs_from_logits,
    response_logits,
)
from dgx_spark_summary_from_human_feedback.preprocess import load_stage_data
from dgx_spark_summary_from_human_feedback.rollout import (
    Rollout,
    ScoreFn,
    entropy_from_logits,
    first_real_column,
    kl_rewards,
    masked_mean,
    minibatch_order,
    process_means,
    query_batch,
    rl_metrics,
    rollout,
)
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
    all_reduce_sum,
    batch_indices,
    check_finite,
    clip_gradients,
    distribute,
    frozen_dtype,
    get_lr,
    make_optimizer,
    micro_batch_layout,
    no_sync,
    seed_everything,
    set_lr,
    setup_runtime,
)


@dataclass
class Config:
    preset: Literal["spark", "smoke"] = "spark"
    """spark: ppo.py's N+ recipe without the value model; smoke: tiny models + bundled fixtures, offline on CPU"""
    sft_path: str = "out/sft"
    """SFT checkpoint: policy and reference (and the tokenizer)"""
    reward_path: str = "out/reward"
    """normalised reward checkpoint that scores the responses"""
    dataset: str = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"
    """queries: raw TL;DR posts (processed now) or a processed SFT dataset"""
    output_dir: str = "out/grpo"
    """where the policy, checkpoints, metrics and report go"""
    advantage: Literal["grpo", "rloo"] = "grpo"
    """grpo: (r - group mean) / (group std + eps); rloo: r - mean of the other responses to the query"""
    group_size: int = 8
    """responses sampled per query (k); at least 2: the others are the baseline"""
    kl_in: Literal["reward", "loss"] = "reward"
    """reward: N+'s per-token KL penalty in the return; loss: GRPO's k3 estimator as a loss term"""
    kl_coef: float = 0.05
    """KL coefficient (fixed), in the reward or in the loss"""
    total_episodes: int = 1_000_000
    """responses sampled over the run (as ppo.py's episodes)"""
    batch_size: int = 512
    """responses per update across all processes: batch_size / group_size queries"""
    num_minibatches: int = 1
    """optimizer steps per epoch"""
    update_epochs: int = 4
    """passes over each rollout batch (ppo.py: 4; GRPO papers often 1, where the ratio stays 1)"""
    micro_batch_size: int = 16
    """sequences per training forward/backward (gradient accumulation up to a minibatch)"""
    forward_batch_size: int = 32
    """sequences per no-grad forward (log-probs, scores)"""
    generation_batch_size: int = 128
    """sequences sampled together"""
    decoding: Decoding = "eager"
    """decoding steps: eager, static or cuda_graph (`generation.Decoding`)"""
    lr: float = 3e-6
    """learning rate, decayed linearly to 0"""
    cliprange: float = 0.2
    """policy ratio clip"""
    temperature: float = 0.7
    """sampling temperature, also dividing the logits of every training forward"""
    response_length: int = 53
    """tokens sampled per query (N+: 53)"""
    no_eos_score: float = -1.0
    """score given to responses without an EOS"""
    grad_clip: float = 1.0
    """max gradient norm (0 = off)"""
    optimizer: OptimizerKind = "auto"
    """auto = bitsandbytes 8-bit AdamW on CUDA, torch fused AdamW on CPU"""
    precision: Precision = "auto"
    """auto = fp32 trainable weights + bf16 autocast on CUDA, fp32 on CPU"""
    gradient_checkpointing: bool = False
    """recompute the policy's activations in the backward pass"""
    sample_interval: int = 10
    """updates between sample tables (query, response, score, advantage) in samples.jsonl"""
    save_interval: int = 20
    """updates between checkpoints"""
    resume: bool = False
    """continue from OUT/checkpoints' last checkpoint"""
    allow_config_change: bool = False
    """resume even if the saved config differs in fields that change the result"""
    seed: int = 42
    """seed for data order, sampling and minibatch shuffles"""
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
        reward_path="out/smoke/reward",
        dataset=str(tiny.SFT_DIR),
        output_dir="out/smoke/grpo",
        group_size=4,
        total_episodes=16 * 24,
        batch_size=16,
        micro_batch_size=8,
        forward_batch_size=16,
        generation_batch_size=16,
        lr=3e-4,
        response_length=24,
        sample_interval=6,
        save_interval=6,
    ),
}


# ---------------------------------------------------------------------------------------------
# models: the policy trained, its reference and the reward model frozen


@dataclass
class Models:
    policy: torch.nn.Module
    ref_policy: torch.nn.Module
    score_fn: ScoreFn  # the frozen reward model's `get_score` (or a test's rule)
    policy_logits: torch.nn.Module  # `response_logits` of the policy, DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer


def load_models(
    cfg: Config, tokenizer, runtime, resume_dir: Path | None = None, score_fn: ScoreFn | None = None
) -> Models:
    """Policy and frozen reference from the SFT model (the policy from `resume_dir` when
    resuming), the frozen reward model's score unless `score_fn` replaces it, and the optimizer."""
    policy = load_policy(
        str(resume_dir) if resume_dir else cfg.sft_path, tokenizer, dtype=runtime.param_dtype, device=runtime.device
    )
    ref_policy = (
        load_policy(cfg.sft_path, tokenizer, dtype=frozen_dtype(runtime), device=runtime.device)
        .eval()
        .requires_grad_(False)
    )
    if score_fn is None:
        reward_model = (
            load_reward_model(cfg.reward_path, tokenizer, dtype=frozen_dtype(runtime), device=runtime.device)
            .eval()
            .requires_grad_(False)
        )
        score_fn = functools.partial(get_score, reward_model)
    for model in (policy, ref_policy):
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    policy_logits = distribute(policy, response_logits, runtime)  # DDP under torchrun; each process samples its share
    optimizer = make_optimizer(
        list(policy.parameters()),
        lr=cfg.lr,
        betas=(0.9, 0.999),
        weight_decay=0.0,
        eps=1e-5,
        kind=cfg.optimizer,
        device=runtime.device,
    )
    return Models(policy, ref_policy, score_fn, policy_logits, optimizer)


# ---------------------------------------------------------------------------------------------
# steps 1-2: sample group_size responses to each query, truncate, score


def grpo_rollout(models: Models, rows: dict, cfg: Config, tokenizer, runtime, generator) -> Rollout:
    """The rollout of one update: each of the `rows`' queries (sorted longest first, so that
    chunks need little padding) repeated `group_size` times in a row, so that a group is
    `group_size` consecutive responses (`rollout.rollout`, as PPO)."""
    queries, query_mask = query_batch(rows, runtime.device)
    queries, query_mask = queries.repeat_interleave(cfg.group_size, 0), query_mask.repeat_interleave(cfg.group_size, 0)
    return rollout(
        models.policy,
        models.ref_policy,
        models.score_fn,
        queries,
        query_mask,
        tokenizer,
        response_length=cfg.response_length,
        temperature=cfg.temperature,
        no_eos_score=cfg.no_eos_score,
        generation_batch_size=cfg.generation_batch_size,
        forward_batch_size=cfg.forward_batch_size,
        generator=generator,
        autocast=runtime.autocast,
        decoding=cfg.decoding,
    )


# ---------------------------------------------------------------------------------------------
# steps 3-4: the return of each response, advantages within each group of responses to one query


def group_advantages(returns: torch.Tensor, group_size: int, kind: str, eps: float = 1e-4) -> torch.Tensor:
    """(B,) advantages of (B,) returns laid out as groups of `group_size` consecutive responses
    to one query. grpo: (r - mean) / (std + eps) within the group (a group of equal returns gets
    0, not NaN); rloo: r - mean of the other k - 1 returns, which is k / (k - 1) x (r - mean)."""
    r = returns.view(-1, group_size)  # (queries, k)
    if kind == "grpo":
        advantages = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    else:
        baseline = (r.sum(1, keepdim=True) - r) / (group_size - 1)
        advantages = r - baseline
    return advantages.flatten()


def sequence_returns(batch: Rollout, cfg: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 3: (B,) return of each response, (B, R) KL and KL-penalty rewards (the latter in
    the return only with `kl_in == "reward"`)."""
    rewards, non_score_rewards, kl = kl_rewards(
        batch.logprobs, batch.ref_logprobs, batch.scores, batch.response_mask, cfg.kl_coef
    )
    returns = rewards.sum(1) if cfg.kl_in == "reward" else batch.scores  # gamma 1: the return of the first token
    return returns, kl, non_score_rewards


def returns_and_advantages(batch: Rollout, cfg: Config) -> tuple[torch.Tensor, ...]:
    """Steps 3-4: (B,) advantages and returns, (B, R) KL and KL-penalty rewards."""
    returns, kl, non_score_rewards = sequence_returns(batch, cfg)
    return group_advantages(returns, cfg.group_size, cfg.advantage), returns, kl, non_score_rewards


# ---------------------------------------------------------------------------------------------
# step 5: the loss and the update


def grpo_losses(
    logits, responses, logprobs, ref_logprobs, advantages, mask, token_count, cliprange: float, kl_loss_coef: float
) -> dict[str, torch.Tensor]:
    """One micro-batch's clipped surrogate `pg_loss` (+ `kl_loss_coef` x the k3 KL estimator),
    summed over real tokens and divided by `token_count` (the minibatch's real tokens), and its
    statistics (per-token means over this micro-batch, no gradient). Shapes (B, R); `advantages`
    (B,), one per response; `logits` (B, R, V) at logits / temperature."""
    new_logprobs = logprobs_from_logits(logits, responses)
    log_ratio = (new_logprobs - logprobs) * mask
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]  # every token of a response gets the response's advantage
    pg_losses = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cliprange, 1 + cliprange))
    # k3 (Schulman 2020): unbiased, always >= 0, the GRPO paper's per-token KL
    ref_log_ratio = (ref_logprobs - new_logprobs) * mask
    k3 = torch.exp(ref_log_ratio) - ref_log_ratio - 1
    pg_loss = (pg_losses * mask).sum() / token_count
    kl_loss = (k3 * mask).sum() / token_count
    loss = pg_loss + kl_loss_coef * kl_loss if kl_loss_coef else pg_loss
    with torch.no_grad():
        return {
            "loss": loss,
            "pg_loss": pg_loss,
            "kl_loss": kl_loss,
            "approxkl": masked_mean(0.5 * log_ratio**2, mask),
            "clipfrac": masked_mean(((ratio - 1).abs() > cliprange).float(), mask),
            "entropy": masked_mean(entropy_from_logits(logits), mask),
            "ratio": masked_mean(ratio, mask),
            "pg_loss_mean": masked_mean(pg_losses, mask),
            "k3_mean": masked_mean(k3, mask),
        }


def grpo_update(
    policy_logits,
    optimizer,
    params,
    batch: Rollout,
    advantages,
    query_lengths,
    cfg: Config,
    runtime,
    generator,
    step: int,
    out_dir,
) -> dict[str, torch.Tensor]:
    """Step 5: `update_epochs` passes over the rollout in shuffled minibatches, an optimizer step
    per minibatch over micro-batches (gradient accumulation). Returns each statistic of
    `grpo_losses` over all micro-batches as a (micro-batches,) tensor."""
    n_rows, micro, mask = len(batch.responses), cfg.micro_batch_size, batch.response_mask
    grad_accum_steps = micro_batch_layout(cfg.batch_size // cfg.num_minibatches, micro, runtime.world_size)
    minibatch_size = micro * grad_accum_steps  # this process's rows of a minibatch
    kl_loss_coef = cfg.kl_coef if cfg.kl_in == "loss" else 0.0
    stats: dict[str, list[torch.Tensor]] = {}
    for epoch in range(cfg.update_epochs):
        order = minibatch_order(n_rows, minibatch_size, query_lengths.to(mask.device), generator)
        for i, start in enumerate(range(0, n_rows, micro)):
            if i % grad_accum_steps == 0:  # real tokens of the minibatch this micro-batch opens, all processes
                # (as in ppo.ppo_update: / world_size undoes DDP's average of the gradients)
                minibatch_tokens = mask[order[start : start + minibatch_size]].sum()
                minibatch_tokens = all_reduce_sum(minibatch_tokens, runtime) / runtime.world_size
            mb = order[start : start + micro]
            f = first_real_column(batch.query_mask[mb])  # all-padding leading columns
            last_micro = (i + 1) % grad_accum_steps == 0 or start + micro >= n_rows
            with runtime.autocast(), no_sync(policy_logits, not last_micro):
                logits = policy_logits(
                    batch.query_responses[mb, f:],
                    batch.attention_mask[mb, f:],
                    batch.context_length - f,
                    cfg.temperature,
                )
                losses = grpo_losses(
                    logits,
                    batch.responses[mb],
                    batch.logprobs[mb],
                    batch.ref_logprobs[mb],
                    advantages[mb],
                    mask[mb],
                    minibatch_tokens,
                    cfg.cliprange,
                    kl_loss_coef,
                )
                losses["loss"].backward()
            for k, v in losses.items():
                stats.setdefault(k, []).append(v.detach())
            if last_micro:
                grad_norm = clip_gradients(params, cfg.grad_clip)
                check_finite(
                    step,
                    {
                        "loss/policy": float(losses["pg_loss"].detach()),
                        "grad_norm": grad_norm,
                        "objective/scores": float(batch.scores.mean()),
                    },
                    out_dir,
                )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return {k: torch.stack(v) for k, v in stats.items()}


def update_metrics(
    batch: Rollout, advantages, returns, kl, non_score_rewards, stats: dict, group_size: int, runtime
) -> dict[str, float]:
    """One update's record (N+ metric names where the quantity is the same), averaged over
    processes (`val/num_eos_tokens` summed)."""
    metrics = rl_metrics(batch, kl, non_score_rewards, stats)
    metrics["objective/returns"] = returns.mean()
    metrics["loss/kl_k3_avg"] = stats["k3_mean"].mean()
    metrics["advantages/abs_mean"] = advantages.abs().mean()
    metrics["groups/equal_returns_share"] = (returns.view(-1, group_size).std(1) == 0).float().mean()
    return process_means(metrics, runtime)


# ---------------------------------------------------------------------------------------------
# the run


def check_sizes(cfg: Config, world_size: int) -> int:
    """Queries per process per update; one-line errors for sizes that do not fit in groups."""
    if cfg.group_size < 2:
        raise InputError(
            f"--group-size {cfg.group_size}: GRPO and RLOO need at least 2 responses per query (the others are the "
            "baseline)"
        )
    if cfg.batch_size % cfg.group_size:
        raise InputError(
            f"--batch-size {cfg.batch_size} is not divisible by --group-size {cfg.group_size}: the batch holds whole "
            "groups"
        )
    queries, rest = divmod(cfg.batch_size // cfg.group_size, world_size)
    if rest:
        raise InputError(
            f"--batch-size {cfg.batch_size} / --group-size {cfg.group_size} = {cfg.batch_size // cfg.group_size} "
            f"queries do not split over {world_size} processes"
        )
    micro_batch_layout(cfg.batch_size // cfg.num_minibatches, cfg.micro_batch_size, world_size)
    return queries


def training_state(optimizer, sample_generator, shuffle_generator) -> dict:
    """What a checkpoint holds besides the policy, so that a resumed run continues bit-equal."""
    return {
        "optimizer": optimizer.state_dict(),
        "sample_generator": sample_generator.get_state(),
        "shuffle_generator": shuffle_generator.get_state(),
        "rng": rng_state(),
    }


def restore(resume: tuple, optimizer, sample_generator, shuffle_generator) -> int:
    """Load `training_state`'s checkpoint (`resume`: `checkpoint.resume_point`'s (dir, state))
    back into the optimizer and generators; returns the update to continue from."""
    state = resume[1]
    optimizer.load_state_dict(state["optimizer"])
    sample_generator.set_state(state["sample_generator"])
    shuffle_generator.set_state(state["shuffle_generator"])
    set_rng_state(state["rng"])
    print(f"resumed from {resume[0]} at update {state['step']}")
    return state["step"]


def main(cfg: Config, score_fn: ScoreFn | None = None) -> dict:
    """Run GRPO/RLOO; `score_fn` replaces the reward model (tests use a rule-based score)."""
    # ---- setup
    runtime = setup_runtime(cfg.device, cfg.precision, tiny_model=cfg.preset == "smoke")
    seed_everything(cfg.seed)
    out = make_output_dir(cfg.output_dir)
    config = dataclasses.asdict(cfg)
    check_checkpoint(cfg.sft_path, "policy")  # fail before minutes of data processing
    if score_fn is None:
        check_checkpoint(cfg.reward_path, "reward")
    queries_per_process = check_sizes(cfg, runtime.world_size)
    tokenizer = load_tokenizer(cfg.sft_path)

    # ---- data: queries of the SFT training split
    ds = load_stage_data(cfg.dataset, tokenizer, "sft", ("train",), Lengths(response=63))["train"]
    query_lengths = list(ds["query_token_len"])
    ds = ds.with_format("torch", columns=["query_token", "query_token_len"])
    num_updates = cfg.total_episodes // cfg.batch_size
    queries_per_update = cfg.batch_size // cfg.group_size
    print(
        f"{len(ds)} queries, {num_updates} updates of {queries_per_update} queries x {cfg.group_size} responses "
        f"({cfg.advantage}, KL in the {cfg.kl_in})"
    )

    # ---- models and optimizer
    resume = resume_point(out, config, cfg.allow_config_change) if cfg.resume else None
    models = load_models(cfg, tokenizer, runtime, resume[0] if resume else None, score_fn)
    sample_generator = torch.Generator(device=runtime.device).manual_seed(cfg.seed + runtime.rank)
    shuffle_generator = torch.Generator().manual_seed(cfg.seed)
    start_update = restore(resume, models.optimizer, sample_generator, shuffle_generator) if resume else 0
    # records are logged at update + 1: those up to the resumed update stay
    resume_step = start_update + 1 if resume else None
    logger = Logger(out, config, project=cfg.wandb_project, resume_step=resume_step, enabled=runtime.is_main)
    samples_file = out / "samples.jsonl"
    if runtime.is_main and samples_file.exists():  # like metrics.jsonl: keep what the resumed run will not redo
        lines = samples_file.read_text().splitlines()
        kept = [line for line in lines if resume and json.loads(line)["update"] <= start_update]
        write_text_atomic(samples_file, "".join(line + "\n" for line in kept))

    def checkpoint(update: int) -> None:
        if runtime.is_main:
            state = training_state(models.optimizer, sample_generator, shuffle_generator)
            save_checkpoint(out, update, {"policy": models.policy}, tokenizer, state, config)
        runtime.barrier()

    # ---- loop: update -> epoch -> micro-batch
    updates = range(start_update, num_updates)
    bar = tqdm(updates, initial=start_update, total=num_updates, disable=not runtime.is_main, desc=cfg.advantage)
    t0 = time.time()
    for update in bar:
        if update % cfg.save_interval == 0 and update > start_update:
            checkpoint(update)
        lr = get_lr(update, lr=cfg.lr, min_lr=0.0, warmup_steps=0, decay_steps=num_updates, schedule="linear")
        set_lr(models.optimizer, lr)

        # this process's queries, longest first so that the rollout's chunks need little padding
        indices = batch_indices(update, len(ds), queries_per_update, cfg.seed)[runtime.rank :: runtime.world_size]
        rows = ds[sorted(indices, key=lambda i: -query_lengths[i])]
        assert len(rows["query_token_len"]) == queries_per_process
        batch = grpo_rollout(models, rows, cfg, tokenizer, runtime, sample_generator)  # steps 1-2
        advantages, returns, kl, non_score_rewards = returns_and_advantages(batch, cfg)  # steps 3-4
        group_lengths = rows["query_token_len"].repeat_interleave(cfg.group_size)
        # step 5
        stats = grpo_update(
            models.policy_logits,
            models.optimizer,
            list(models.policy.parameters()),
            batch,
            advantages,
            group_lengths,
            cfg,
            runtime,
            shuffle_generator,
            update,
            out,
        )

        # ---- log
        metrics = update_metrics(batch, advantages, returns, kl, non_score_rewards, stats, cfg.group_size, runtime)
        episodes_per_s = (update + 1 - start_update) * cfg.batch_size / (time.time() - t0)
        metrics.update({"lr": lr, "episode": (update + 1) * cfg.batch_size, "episodes_per_s": episodes_per_s})
        if runtime.device.type == "cuda":
            metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        logger.log(metrics, update + 1)
        bar.set_postfix(
            score=f"{metrics['objective/scores']:.3f}",
            kl=f"{metrics['objective/kl']:.3f}",
            len=f"{metrics['response_length']:.1f}",
        )
        if runtime.is_main and (update % cfg.sample_interval == 0 or update == num_updates - 1):
            write_samples(out, update + 1, tokenizer, batch, advantages, rows, cfg.group_size)

    # ---- save, report
    checkpoint(num_updates)
    if not runtime.is_main:
        return {}
    logger.finish()
    export_final(out, models.policy, tokenizer)
    records = read_metrics(out / "metrics.jsonl")
    write_report(out, config, records)
    if cfg.push_to_hub:
        push_run(out, cfg.push_to_hub)
    return records[-1] if records else {}


def write_samples(
    out: Path, update: int, tokenizer, batch: Rollout, advantages, rows: dict, group_size: int, n_groups: int = 2
) -> None:
    """The responses of the first `n_groups` queries, with their scores and advantages."""
    with (out / "samples.jsonl").open("a") as f:
        for i in range(min(n_groups * group_size, len(batch.scores))):
            g = i // group_size
            q = rows["query_token"][g][-int(rows["query_token_len"][g]) :]
            response = batch.responses[i][batch.response_mask[i].bool()]
            record = {
                "update": update,
                "query": tokenizer.decode(q),
                "response": tokenizer.decode(response, skip_special_tokens=True),
                "score": float(batch.scores[i]),
                "advantage": float(advantages[i]),
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_report(out: Path, config: dict, records: list[dict]) -> None:
    title = config["advantage"].upper()
    plot_curves(records, ["objective/scores", "objective/kl", "response_length"], out / "curves.png", title)
    plot_curves(
        records,
        ["objective/rlhf_reward", "policy/approxkl_avg", "policy/clipfrac_avg", "groups/equal_returns_share"],
        out / "curves_internals.png",
        f"{title} internals",
    )
    samples = (
        [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        if (out / "samples.jsonl").exists()
        else []
    )
    keys = [
        "objective/scores",
        "objective/kl",
        "objective/rlhf_reward",
        "response_length",
        "no_eos_share",
        "groups/equal_returns_share",
        "episodes_per_s",
    ]
    first, final = (records[0], records[-1]) if records else ({}, {})
    summary = "\n".join(f"| {k} | {first.get(k, float('nan')):.4g} | {final.get(k, float('nan')):.4g} |" for k in keys)
    (out / "report.md").write_text(
        f"# {title} report\n\n{config['group_size']} responses per query, advantages {config['advantage']}, KL "
        f"(coefficient {config['kl_coef']}) in the {config['kl_in']}.\n\n"
        f"| metric | first update | last update |\n|---|---|---|\n{summary}\n\n"
        "![score, KL, length](curves.png)\n\n![internals](curves_internals.png)\n\n"
        "## Samples (last update)\n\n"
        f"{markdown_table(samples[-8:], ['query', 'response', 'score', 'advantage'])}\n\n"
        f"## Config\n\n{config_table(config)}\n"
    )


if __name__ == "__main__":
    cli.run(main, Config, presets=PRESETS)
