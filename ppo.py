"""Stage 3: PPO against the reward model (Stiennon et al. 2020, sec. 3.4; N+ details 13-25).

    python ppo.py --sft-path out/sft --reward-path out/reward            # the N+ recipe
    python ppo.py --preset smoke --sft-path out/smoke/sft --reward-path out/smoke/reward \\
        --output-dir out/smoke/ppo                                         # offline, CPU
    python ppo.py --resume --output-dir out/ppo ...                        # continue

Policy and frozen reference start from the SFT model; the value model starts from the reward
model (N+ detail 14); the reward model is frozen and normalised. Each update:
  1. sample exactly `response_length` tokens per query at `temperature`, EOS not special;
  2. truncate after the first EOS (the EOS trick); the rest becomes padding;
  3. score query+response with `models.get_score`; no EOS -> score `no_eos_score`;
  4. per-token reward -kl_coef * (logprob - ref_logprob) up to and including EOS, nothing after,
     plus the score at the last real token;
  5. GAE (gamma, lambda) -> advantages (whitened over real tokens) and returns;
  6. `ppo_epochs` passes of clipped-surrogate + clipped-value updates.
Log-probs are always taken with the training forward at logits / temperature, so the first
minibatch's ratio is exactly 1 (N+ detail 19).

Defaults are the N+ final recipe: rollout batch 512, 4 PPO epochs, 1 minibatch, lr 3e-6 with
linear decay, gamma 1, lambda 0.95, clip 0.2 (policy and value), value-loss coefficient 0.1,
KL coefficient 0.05, temperature 0.7, top-k 0, top-p 1, 53 response tokens, rewards not
whitened, advantages whitened, 1M episodes. Where the Spark forces a change: one process
holds four models (policy, value, reference, reward), so the reference and reward model run in
bf16 without gradients, the optimizers are 8-bit on CUDA, and forward/generation/training run
in separate micro-batches (`--micro-batch-size`, `--forward-batch-size`,
`--generation-batch-size`). Departure: the score goes on the EOS token itself (N+'s code adds
it one position after the EOS).
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
    masked_whiten,
    minibatch_order,
    process_means,
    query_batch,
    rl_metrics,
    rollout,
    value_predictions,
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
    preset: Literal["spark", "quick", "smoke"] = "spark"
    """spark: the N+ recipe; quick: ~1 h on one Spark (32 updates of 64); smoke: tiny models +
    bundled fixtures, offline on CPU"""
    sft_path: str = "out/sft"
    """SFT checkpoint: policy and reference (and the tokenizer)"""
    reward_path: str = "out/reward"
    """normalised reward checkpoint: the reward model and the value model's init"""
    dataset: str = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"
    """queries: raw TL;DR posts (processed now) or a processed SFT dataset"""
    output_dir: str = "out/ppo"
    """where the policy, value model, checkpoints, metrics and report go"""
    total_episodes: int = 1_000_000
    """queries sampled over the run (N+: 1M = 1,953 updates of 512)"""
    batch_size: int = 512
    """rollout batch: queries per update, across all processes"""
    num_minibatches: int = 1
    """optimizer steps per PPO epoch"""
    micro_batch_size: int = 16
    """sequences per training forward/backward (gradient accumulation up to a minibatch)"""
    forward_batch_size: int = 32
    """sequences per no-grad forward (log-probs, values, scores)"""
    generation_batch_size: int = 128
    """queries sampled together"""
    decoding: Decoding = "eager"
    """decoding steps: eager, static (preallocated KV cache) or cuda_graph (static, each step a replayed CUDA graph)"""
    ppo_epochs: int = 4
    """passes over each rollout batch"""
    lr: float = 3e-6
    """learning rate of policy and value model, decayed linearly to 0"""
    kl_coef: float = 0.05
    """per-token KL penalty coefficient (fixed)"""
    gamma: float = 1.0
    """discount"""
    lam: float = 0.95
    """GAE lambda"""
    cliprange: float = 0.2
    """policy ratio clip"""
    cliprange_value: float = 0.2
    """value prediction clip"""
    vf_coef: float = 0.1
    """value-loss coefficient"""
    temperature: float = 0.7
    """sampling temperature, also dividing the logits of every training forward"""
    response_length: int = 53
    """tokens sampled per query (N+: 53)"""
    no_eos_score: float = -1.0
    """score given to responses without an EOS"""
    whiten_rewards: bool = False
    """whiten per-token rewards over real tokens (N+: off)"""
    grad_clip: float = 1.0
    """max gradient norm over policy and value together (0 = off)"""
    optimizer: OptimizerKind = "auto"
    """auto = bitsandbytes 8-bit AdamW on CUDA, torch fused AdamW on CPU"""
    precision: Precision = "auto"
    """auto = fp32 trainable weights + bf16 autocast on CUDA, fp32 on CPU"""
    gradient_checkpointing: bool = False
    """recompute activations of policy and value in the backward pass"""
    sample_interval: int = 10
    """updates between sample tables (query, response, score) in samples.jsonl"""
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
        output_dir="out/smoke/ppo",
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
    # a first hour on one Spark: 32 updates of 64 episodes (the recipe's 4 epochs, KL 0.05, 53
    # tokens) at lr 1e-5 instead of 3e-6, so that 32 updates move the score visibly
    "quick": dict(
        preset="quick",
        sft_path="out/quick/sft",
        reward_path="out/quick/reward",
        output_dir="out/quick/ppo",
        total_episodes=32 * 64,
        batch_size=64,
        generation_batch_size=64,
        lr=1e-5,
        sample_interval=4,
        save_interval=8,
    ),
}


# ---------------------------------------------------------------------------------------------
# models: policy and value trained, reference and reward model frozen


@dataclass
class Models:
    policy: torch.nn.Module
    value_model: torch.nn.Module
    ref_policy: torch.nn.Module
    score_fn: ScoreFn  # the frozen reward model's `get_score` (or a test's rule)
    policy_logits: torch.nn.Module  # `response_logits` of the policy, DDP-wrapped under torchrun
    value_fn: torch.nn.Module  # `value_predictions` of the value model, likewise
    policy_optimizer: torch.optim.Optimizer
    value_optimizer: torch.optim.Optimizer
    pack: bool | None = None  # `models.hidden_states`' packing in every forward (None: on CPU)

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return list(self.policy.parameters()) + list(self.value_model.parameters())


def load_models(cfg: Config, tokenizer, runtime, resume_dir: Path | None = None, score_fn=None, pack=None) -> Models:
    """Policy and frozen reference from the SFT model, value model from the reward model (N+
    detail 14), frozen reward model; the trained pair from `resume_dir` when resuming."""
    device, frozen = runtime.device, frozen_dtype(runtime)
    policy = load_policy(
        str(resume_dir) if resume_dir else cfg.sft_path, tokenizer, dtype=runtime.param_dtype, device=device
    )
    value_path = str(resume_dir / "value") if resume_dir else cfg.reward_path
    value_model = load_reward_model(value_path, tokenizer, dtype=runtime.param_dtype, device=device)
    ref_policy = load_policy(cfg.sft_path, tokenizer, dtype=frozen, device=device).eval().requires_grad_(False)
    if score_fn is None:
        reward_model = load_reward_model(cfg.reward_path, tokenizer, dtype=frozen, device=device)
        score_fn = functools.partial(get_score, reward_model.eval().requires_grad_(False), pack=pack)
    for model in (policy, value_model, ref_policy):
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        value_model.gradient_checkpointing_enable()
    # under torchrun each process samples and scores its share of the rollout; DDP averages the
    # gradients of policy and value (FSDP2 is not offered here: sampling needs whole weights)
    policy_logits = distribute(policy, functools.partial(response_logits, pack=pack), runtime)
    value_fn = distribute(value_model, functools.partial(value_predictions, pack=pack), runtime)
    # N+: eps 1e-5
    adam = dict(lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-5, kind=cfg.optimizer, device=device)
    return Models(
        policy,
        value_model,
        ref_policy,
        score_fn,
        policy_logits,
        value_fn,
        policy_optimizer=make_optimizer(list(policy.parameters()), **adam),
        value_optimizer=make_optimizer(list(value_model.parameters()), **adam),
        pack=pack,
    )


# ---------------------------------------------------------------------------------------------
# steps 1-5: rollout, KL-shaped rewards, advantages


def ppo_rollout(
    models: Models, queries, query_mask, cfg: Config, tokenizer, runtime, generator, trim_padding=True
) -> Rollout:
    """Steps 1-3 (`rollout.rollout`) with this stage's models and settings."""
    return rollout(
        models.policy,
        models.ref_policy,
        models.score_fn,
        queries,
        query_mask,
        tokenizer,
        value_model=models.value_model,
        response_length=cfg.response_length,
        temperature=cfg.temperature,
        no_eos_score=cfg.no_eos_score,
        generation_batch_size=cfg.generation_batch_size,
        forward_batch_size=cfg.forward_batch_size,
        generator=generator,
        autocast=runtime.autocast,
        trim_padding=trim_padding,
        pack=models.pack,
        decoding=cfg.decoding,
    )


def compute_advantages(rewards, values, response_mask, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 5: GAE. Values after the EOS are 0, so the EOS step bootstraps from nothing (terminal)."""
    values, rewards = values * response_mask, rewards * response_mask
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    R = rewards.shape[1]
    for t in reversed(range(R)):
        next_values = values[:, t + 1] if t + 1 < R else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    returns = advantages + values
    return advantages * response_mask, returns


def rewards_and_advantages(batch: Rollout, cfg: Config) -> tuple[torch.Tensor, ...]:
    """Steps 4-5 on a rollout: (advantages whitened over real tokens, returns, KL, KL-penalty rewards)."""
    mask = batch.response_mask
    rewards, non_score_rewards, kl = kl_rewards(batch.logprobs, batch.ref_logprobs, batch.scores, mask, cfg.kl_coef)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
    advantages, returns = compute_advantages(rewards, batch.values, mask, cfg.gamma, cfg.lam)
    return masked_whiten(advantages, mask) * mask, returns, kl, non_score_rewards


# ---------------------------------------------------------------------------------------------
# step 6: the PPO losses and epochs


def ppo_losses(
    logits, new_values, responses, logprobs, values, advantages, returns, mask, token_count, cliprange, cliprange_value
) -> dict[str, torch.Tensor]:
    """One micro-batch's clipped surrogate `pg_loss` and clipped value loss `v_loss`, each summed
    over its real tokens and divided by `token_count` (the minibatch's real tokens, so that the
    micro-batches add up to the minibatch mean), and their statistics (per-token means over this
    micro-batch, no gradient). Shapes (B, R); `logits` (B, R, V) at logits / temperature."""
    new_logprobs = logprobs_from_logits(logits, responses)
    # clipped value loss
    values_clipped = values + (new_values - values).clamp(-cliprange_value, cliprange_value)
    vf_losses = torch.max((new_values - returns) ** 2, (values_clipped - returns) ** 2)
    v_loss = 0.5 * (vf_losses * mask).sum() / token_count
    # clipped surrogate
    log_ratio = (new_logprobs - logprobs) * mask
    ratio = torch.exp(log_ratio)
    pg_losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    pg_loss = (pg_losses * mask).sum() / token_count
    with torch.no_grad():
        return {
            "pg_loss": pg_loss,
            "v_loss": v_loss,
            "approxkl": masked_mean(0.5 * log_ratio**2, mask),
            "clipfrac": masked_mean((ratio - 1).abs() > cliprange, mask),
            "vf_clipfrac": masked_mean(((new_values - values).abs() > cliprange_value).float(), mask),
            "entropy": masked_mean(entropy_from_logits(logits), mask),
            "ratio": masked_mean(ratio, mask),
            "pg_loss_mean": masked_mean(pg_losses, mask),
            "v_loss_mean": 0.5 * masked_mean(vf_losses, mask),
        }


def ppo_update(
    models: Models,
    batch: Rollout,
    advantages,
    returns,
    query_lengths,
    cfg: Config,
    runtime,
    generator,
    step: int,
    out_dir,
    trim_padding: bool = True,
) -> dict[str, torch.Tensor]:
    """Step 6: `ppo_epochs` passes over the rollout in shuffled minibatches, an optimizer step
    per minibatch over micro-batches of `micro_batch_size` (gradient accumulation). Returns each
    statistic of `ppo_losses` over all micro-batches, as a (micro-batches,) tensor."""
    n_rows, micro_batch_size, mask = len(batch.responses), cfg.micro_batch_size, batch.response_mask
    grad_accum_steps = micro_batch_layout(cfg.batch_size // cfg.num_minibatches, micro_batch_size, runtime.world_size)
    minibatch_size = micro_batch_size * grad_accum_steps  # this process's rows of a minibatch
    stats: dict[str, list[torch.Tensor]] = {}
    for epoch in range(cfg.ppo_epochs):
        order = minibatch_order(n_rows, minibatch_size, query_lengths.to(mask.device), generator)
        for i, start in enumerate(range(0, n_rows, micro_batch_size)):
            if i % grad_accum_steps == 0:  # real tokens of the minibatch this micro-batch opens, all processes
                # (a mean per process would weight unequal token counts unequally; / world_size
                # undoes the average over processes that DDP applies to the gradients)
                minibatch_tokens = mask[order[start : start + minibatch_size]].sum()
                minibatch_tokens = all_reduce_sum(minibatch_tokens, runtime) / runtime.world_size
            mb = order[start : start + micro_batch_size]
            f = first_real_column(batch.query_mask[mb]) if trim_padding else 0  # all-padding leading columns
            mb_query_responses, mb_attention_mask = batch.query_responses[mb, f:], batch.attention_mask[mb, f:]
            context_length = batch.context_length - f
            last_micro = (i + 1) % grad_accum_steps == 0 or start + micro_batch_size >= n_rows
            with (
                runtime.autocast(),
                no_sync(models.policy_logits, not last_micro),
                no_sync(models.value_fn, not last_micro),
            ):
                logits = models.policy_logits(mb_query_responses, mb_attention_mask, context_length, cfg.temperature)
                new_values = models.value_fn(mb_query_responses, mb_attention_mask, context_length)
                losses = ppo_losses(
                    logits,
                    new_values,
                    batch.responses[mb],
                    batch.logprobs[mb],
                    batch.values[mb],
                    advantages[mb],
                    returns[mb],
                    mask[mb],
                    minibatch_tokens,
                    cfg.cliprange,
                    cfg.cliprange_value,
                )
                (losses["pg_loss"] + cfg.vf_coef * losses["v_loss"]).backward()
            for k, v in losses.items():
                stats.setdefault(k, []).append(v.detach())
            if last_micro:
                optimizer_step(models, losses, batch, cfg, step, out_dir)
    return {k: torch.stack(v) for k, v in stats.items()}


def optimizer_step(models: Models, losses: dict, batch: Rollout, cfg: Config, step: int, out_dir) -> None:
    grad_norm = clip_gradients(models.trainable, cfg.grad_clip)
    terms = {"loss/policy": float(losses["pg_loss"].detach()), "loss/value": float(losses["v_loss"].detach())}
    check_finite(step, {**terms, "grad_norm": grad_norm, "objective/scores": float(batch.scores.mean())}, out_dir)
    models.policy_optimizer.step()
    models.value_optimizer.step()
    models.policy_optimizer.zero_grad(set_to_none=True)
    models.value_optimizer.zero_grad(set_to_none=True)


def update_metrics(batch: Rollout, kl, non_score_rewards, stats: dict, runtime) -> dict[str, float]:
    """One update's record under N+'s metric names (so curves compare with the published runs),
    averaged over processes (`val/num_eos_tokens` summed)."""
    metrics = rl_metrics(batch, kl, non_score_rewards, stats)
    metrics["loss/value_avg"] = stats["v_loss_mean"].mean()
    metrics["val/clipfrac_avg"] = stats["vf_clipfrac"].mean()
    return process_means(metrics, runtime)


# ---------------------------------------------------------------------------------------------
# the run


def main(cfg: Config, score_fn: ScoreFn | None = None) -> dict:
    """Run PPO; `score_fn` replaces the reward model (tests use a rule-based score)."""
    # ---- setup
    runtime = setup_runtime(cfg.device, cfg.precision, tiny_model=cfg.preset == "smoke")
    seed_everything(cfg.seed)
    out = make_output_dir(cfg.output_dir)
    config = dataclasses.asdict(cfg)
    check_checkpoint(cfg.sft_path, "policy")  # fail before minutes of data processing
    check_checkpoint(cfg.reward_path, "reward")
    tokenizer = load_tokenizer(cfg.sft_path)

    # ---- data: queries of the SFT training split
    ds = load_stage_data(cfg.dataset, tokenizer, "sft", ("train",), Lengths(response=63))["train"]
    query_lengths = list(ds["query_token_len"])
    ds = ds.with_format("torch", columns=["query_token", "query_token_len"])
    num_updates = cfg.total_episodes // cfg.batch_size
    minibatch_size = cfg.batch_size // cfg.num_minibatches
    grad_accum_steps = micro_batch_layout(minibatch_size, cfg.micro_batch_size, runtime.world_size)
    print(
        f"{len(ds)} queries, {num_updates} updates of {cfg.batch_size} episodes, "
        f"{cfg.num_minibatches} minibatch(es) of {cfg.micro_batch_size} x {grad_accum_steps}"
    )

    # ---- models and optimizers
    resume = resume_point(out, config, cfg.allow_config_change) if cfg.resume else None
    models = load_models(cfg, tokenizer, runtime, resume[0] if resume else None, score_fn)
    sample_generator = torch.Generator(device=runtime.device).manual_seed(cfg.seed + runtime.rank)
    shuffle_generator = torch.Generator().manual_seed(cfg.seed)
    start_update = 0
    if resume:
        state = resume[1]
        models.policy_optimizer.load_state_dict(state["policy_optimizer"])
        models.value_optimizer.load_state_dict(state["value_optimizer"])
        sample_generator.set_state(state["sample_generator"])
        shuffle_generator.set_state(state["shuffle_generator"])
        set_rng_state(state["rng"])
        start_update = state["step"]
        print(f"resumed from {resume[0]} at update {start_update}")
    # records are logged at update + 1: those up to the resumed update stay
    resume_step = start_update + 1 if resume else None
    logger = Logger(out, config, project=cfg.wandb_project, resume_step=resume_step, enabled=runtime.is_main)
    samples_file = out / "samples.jsonl"
    if runtime.is_main and samples_file.exists():  # like metrics.jsonl: keep what the resumed run will not redo
        kept = [
            line
            for line in samples_file.read_text().splitlines()
            if resume and json.loads(line)["update"] <= start_update
        ]
        write_text_atomic(samples_file, "".join(line + "\n" for line in kept))

    def checkpoint(update: int) -> None:
        if runtime.is_main:
            state = {
                "policy_optimizer": models.policy_optimizer.state_dict(),
                "value_optimizer": models.value_optimizer.state_dict(),
                "sample_generator": sample_generator.get_state(),
                "shuffle_generator": shuffle_generator.get_state(),
                "rng": rng_state(),
            }
            trained = {"policy": models.policy, "value": models.value_model}
            save_checkpoint(out, update, trained, tokenizer, state, config)
        runtime.barrier()

    # ---- loop: lr, checkpoint, rollout, advantages, PPO epochs, log
    bar = tqdm(
        range(start_update, num_updates),
        initial=start_update,
        total=num_updates,
        disable=not runtime.is_main,
        desc="ppo",
    )
    t0 = time.time()
    for update in bar:
        if update % cfg.save_interval == 0 and update > start_update:
            checkpoint(update)
        lr = get_lr(update, lr=cfg.lr, min_lr=0.0, warmup_steps=0, decay_steps=num_updates, schedule="linear")
        set_lr(models.policy_optimizer, lr)
        set_lr(models.value_optimizer, lr)

        # this process's queries, longest first so that the rollout's chunks need little padding
        indices = batch_indices(update, len(ds), cfg.batch_size, cfg.seed)[runtime.rank :: runtime.world_size]
        rows = ds[sorted(indices, key=lambda i: -query_lengths[i])]
        queries, query_mask = query_batch(rows, runtime.device)
        batch = ppo_rollout(models, queries, query_mask, cfg, tokenizer, runtime, sample_generator)  # steps 1-3
        advantages, returns, kl, non_score_rewards = rewards_and_advantages(batch, cfg)  # steps 4-5
        stats = ppo_update(
            models, batch, advantages, returns, rows["query_token_len"], cfg, runtime, shuffle_generator, update, out
        )

        # ---- log (N+ metric names)
        metrics = update_metrics(batch, kl, non_score_rewards, stats, runtime)
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
            write_samples(out, update + 1, tokenizer, batch, rows)

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


def write_samples(out: Path, update: int, tokenizer, batch: Rollout, rows: dict, n: int = 8) -> None:
    with (out / "samples.jsonl").open("a") as f:
        for i in range(min(n, len(batch.scores))):
            query = rows["query_token"][i][-int(rows["query_token_len"][i]) :]
            response = batch.responses[i][batch.response_mask[i].bool()]
            record = {
                "update": update,
                "query": tokenizer.decode(query),
                "response": tokenizer.decode(response, skip_special_tokens=True),
                "score": float(batch.scores[i]),
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_report(out: Path, config: dict, records: list[dict]) -> None:
    plot_curves(records, ["objective/scores", "objective/kl", "response_length"], out / "curves.png", "PPO")
    internals = ["objective/rlhf_reward", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/value_avg"]
    plot_curves(records, internals, out / "curves_ppo.png", "PPO internals")
    samples_file = out / "samples.jsonl"
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()] if samples_file.exists() else []
    last = samples[-8:]
    keys = [
        "objective/scores",
        "objective/kl",
        "objective/rlhf_reward",
        "response_length",
        "no_eos_share",
        "episodes_per_s",
    ]
    first, final = (records[0], records[-1]) if records else ({}, {})
    summary = "\n".join(f"| {k} | {first.get(k, float('nan')):.4g} | {final.get(k, float('nan')):.4g} |" for k in keys)
    (out / "report.md").write_text(
        f"# PPO report\n\n| metric | first update | last update |\n|---|---|---|\n{summary}\n\n"
        "The first update's score, KL, length and no-EOS share are those of its rollouts, sampled\n"
        "before any optimizer step: they are the starting (SFT) policy's, i.e. step 0.\n\n"
        "![score, KL, length](curves.png)\n\n![PPO internals](curves_ppo.png)\n\n"
        f"## Samples (last update)\n\n{markdown_table(last, ['query', 'response', 'score'])}\n\n"
        f"## Config\n\n{config_table(config)}\n"
    )


if __name__ == "__main__":
    cli.run(main, Config, presets=PRESETS)
