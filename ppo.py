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
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
from tqdm import tqdm

from dgx_spark_summary_from_human_feedback import cli, tiny
from dgx_spark_summary_from_human_feedback.checkpoint import (
    export_final, make_output_dir, push_run, resume_point, rng_state, save_checkpoint, set_rng_state, write_text_atomic,
)
from dgx_spark_summary_from_human_feedback.data import Lengths, load_stage_data, load_tokenizer
from dgx_spark_summary_from_human_feedback.generation import generate, truncate_after_eos
from dgx_spark_summary_from_human_feedback.models import (
    check_checkpoint, disable_dropout, get_score, hidden_states, last_token_index, load_policy, load_reward_model, logprobs_from_logits,
    response_logits,
)  # fmt: skip
from dgx_spark_summary_from_human_feedback.tracking import Logger, config_table, markdown_table, plot_curves, read_metrics
from dgx_spark_summary_from_human_feedback.training import (
    OptimizerKind, Precision, all_reduce_sum, batch_indices, check_finite, clip_gradients, distribute, frozen_dtype, get_lr, make_optimizer, micro_batch_layout,
    no_sync, seed_everything, set_lr, setup_runtime,
)  # fmt: skip


@dataclass
class Config:
    preset: Literal["spark", "smoke"] = "spark"
    """spark: the N+ recipe; smoke: tiny models + bundled fixtures, offline on CPU"""
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
        preset="smoke", sft_path="out/smoke/sft", reward_path="out/smoke/reward", dataset=str(tiny.SFT_DIR),
        output_dir="out/smoke/ppo", total_episodes=16 * 24, batch_size=16, micro_batch_size=8, forward_batch_size=16,
        generation_batch_size=16, lr=3e-4, response_length=24, sample_interval=6, save_interval=6,
    ),
}  # fmt: skip

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (query_responses, attention_mask) -> (B,) scores


# ---------------------------------------------------------------------------------------------
# small pure functions of PPO


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise x over the real tokens only (padding after EOS must not move the statistics)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def kl_rewards(logprobs, ref_logprobs, scores, response_mask, kl_coef) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4: (B, R) per-token rewards and KL. -kl_coef * KL on every real token (EOS included),
    0 after the EOS, and the score added at the last real token."""
    kl = (logprobs - ref_logprobs) * response_mask  # (B, R)
    rewards = -kl_coef * kl
    last = last_token_index(response_mask)  # (B,) the EOS, or the last token without one
    rewards[torch.arange(len(scores), device=rewards.device), last] += scores
    return rewards, kl


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


def value_predictions(value_model, query_responses, attention_mask, context_length: int) -> torch.Tensor:
    """(B, R) value of the state before each response token: the value head at positions
    context_length-1 ... T-2, like the score head but at every position."""
    hidden = hidden_states(value_model, query_responses, attention_mask)[:, context_length - 1 : -1]
    return value_model.score(hidden).squeeze(-1).float() + getattr(value_model.config, "score_bias", 0.0)


def first_real_column(query_mask: torch.Tensor) -> int:
    """Leading columns that are padding in every row of a left-padded batch can be dropped:
    positions come from the mask, so the logits do not change and the forward gets cheaper
    (rows are grouped by query length, so a chunk's rows are padded little among themselves)."""
    return int(query_mask.any(0).long().argmax())


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(-1)
    return torch.logsumexp(logits, -1) - (probs * logits).sum(-1)


def minibatch_order(n_rows: int, minibatch_size: int, query_lengths: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random split into minibatches (as N+), each sorted by query length so that its
    micro-batches group similar lengths; the minibatch's gradient does not depend on that order."""
    order = torch.randperm(n_rows, generator=generator).to(query_lengths.device)
    chunks = [c[query_lengths[c].argsort(descending=True, stable=True)] for c in order.split(minibatch_size)]
    return torch.cat(chunks)


# ---------------------------------------------------------------------------------------------
# rollouts


@torch.no_grad()
def rollout(policy, ref_policy, value_model, score_fn: ScoreFn, queries, query_mask, cfg: Config, tokenizer, runtime, generator) -> dict:
    """Steps 1-3 and the no-grad forwards: everything the update needs, as (B, ...) tensors."""
    B, context_length = queries.shape
    policy.eval()
    responses = []
    for s in range(0, B, cfg.generation_batch_size):
        q, qm = queries[s : s + cfg.generation_batch_size], query_mask[s : s + cfg.generation_batch_size]
        f = first_real_column(qm)
        with runtime.autocast():
            responses.append(generate(policy, q[:, f:], qm[:, f:], max_new_tokens=cfg.response_length, temperature=cfg.temperature, generator=generator))
    policy.train()
    responses, response_mask, has_eos = truncate_after_eos(torch.cat(responses), tokenizer.eos_token_id, tokenizer.pad_token_id)
    query_responses = torch.cat([queries, responses], dim=1)
    attention_mask = torch.cat([query_mask, response_mask.long()], dim=1)
    logprobs, ref_logprobs, values, scores = [], [], [], []
    for s in range(0, B, cfg.forward_batch_size):
        chunk = slice(s, s + cfg.forward_batch_size)
        f = first_real_column(query_mask[chunk])
        qr, am, resp, ctx = query_responses[chunk, f:], attention_mask[chunk, f:], responses[chunk], context_length - f
        with runtime.autocast():
            logprobs.append(logprobs_from_logits(response_logits(policy, qr, am, ctx, cfg.temperature), resp))
            ref_logprobs.append(logprobs_from_logits(response_logits(ref_policy, qr, am, ctx, cfg.temperature), resp))
            values.append(value_predictions(value_model, qr, am, ctx))
            scores.append(score_fn(qr, am).float())
    scores = torch.cat(scores)
    scores = torch.where(has_eos, scores, torch.full_like(scores, cfg.no_eos_score))  # step 3: no EOS -> penalty
    mask = response_mask.float()
    return {
        "query_responses": query_responses, "attention_mask": attention_mask, "responses": responses, "response_mask": mask,
        "has_eos": has_eos, "logprobs": torch.cat(logprobs) * mask, "ref_logprobs": torch.cat(ref_logprobs) * mask,
        "values": torch.cat(values) * mask, "scores": scores, "context_length": context_length,
    }  # fmt: skip


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
    print(f"{len(ds)} queries, {num_updates} updates of {cfg.batch_size} episodes, {cfg.num_minibatches} minibatch(es) of {cfg.micro_batch_size} x {grad_accum_steps}")

    # ---- models and optimizers
    resume = resume_point(out, config, cfg.allow_config_change) if cfg.resume else None
    policy = load_policy(str(resume[0]) if resume else cfg.sft_path, tokenizer, dtype=runtime.param_dtype, device=runtime.device)
    value_model = load_reward_model(str(resume[0] / "value") if resume else cfg.reward_path, tokenizer, dtype=runtime.param_dtype, device=runtime.device)
    ref_policy = load_policy(cfg.sft_path, tokenizer, dtype=frozen_dtype(runtime), device=runtime.device).eval().requires_grad_(False)
    if score_fn is None:
        reward_model = load_reward_model(cfg.reward_path, tokenizer, dtype=frozen_dtype(runtime), device=runtime.device).eval().requires_grad_(False)

        def score_fn(query_responses, attention_mask):
            return get_score(reward_model, query_responses, attention_mask)

    for model in (policy, value_model, ref_policy):
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        value_model.gradient_checkpointing_enable()
    # under torchrun each process samples and scores its share of the rollout; DDP averages the
    # gradients of policy and value (FSDP2 is not offered here: sampling needs whole weights)
    policy_logits = distribute(policy, response_logits, runtime)
    value_fn = distribute(value_model, value_predictions, runtime)
    kwargs = dict(lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-5, kind=cfg.optimizer, device=runtime.device)  # N+: eps 1e-5
    policy_optimizer = make_optimizer(list(policy.parameters()), **kwargs)
    value_optimizer = make_optimizer(list(value_model.parameters()), **kwargs)
    sample_generator = torch.Generator(device=runtime.device).manual_seed(cfg.seed + runtime.rank)
    shuffle_generator = torch.Generator().manual_seed(cfg.seed)
    start_update = 0
    if resume:
        state = resume[1]
        policy_optimizer.load_state_dict(state["policy_optimizer"])
        value_optimizer.load_state_dict(state["value_optimizer"])
        sample_generator.set_state(state["sample_generator"])
        shuffle_generator.set_state(state["shuffle_generator"])
        set_rng_state(state["rng"])
        start_update = state["step"]
        print(f"resumed from {resume[0]} at update {start_update}")
    # records are logged at update + 1: those up to the resumed update stay
    logger = Logger(out, config, project=cfg.wandb_project, resume_step=start_update + 1 if resume else None, enabled=runtime.is_main)
    samples_file = out / "samples.jsonl"
    if runtime.is_main and samples_file.exists():  # like metrics.jsonl: keep what the resumed run will not redo
        kept = [line for line in samples_file.read_text().splitlines() if resume and json.loads(line)["update"] <= start_update]
        write_text_atomic(samples_file, "".join(line + "\n" for line in kept))
    trainable = list(policy.parameters()) + list(value_model.parameters())

    def checkpoint(update: int) -> None:
        if runtime.is_main:
            state = {
                "policy_optimizer": policy_optimizer.state_dict(), "value_optimizer": value_optimizer.state_dict(),
                "sample_generator": sample_generator.get_state(), "shuffle_generator": shuffle_generator.get_state(), "rng": rng_state(),
            }  # fmt: skip
            save_checkpoint(out, update, {"policy": policy, "value": value_model}, tokenizer, state, config)
        runtime.barrier()

    # ---- loop: update -> PPO epoch -> micro-batch
    bar = tqdm(range(start_update, num_updates), initial=start_update, total=num_updates, disable=not runtime.is_main, desc="ppo")
    t0 = time.time()
    for update in bar:
        if update % cfg.save_interval == 0 and update > start_update:
            checkpoint(update)
        lr = get_lr(update, lr=cfg.lr, min_lr=0.0, warmup_steps=0, decay_steps=num_updates, schedule="linear")
        set_lr(policy_optimizer, lr)
        set_lr(value_optimizer, lr)

        # steps 1-3: this rank's queries (longest first, so chunks need little padding), sampled,
        # truncated after EOS, scored
        indices = sorted(batch_indices(update, len(ds), cfg.batch_size, cfg.seed)[runtime.rank :: runtime.world_size], key=lambda i: -query_lengths[i])
        rows = ds[indices]
        n = rows["query_token_len"]
        context_length = int(n.max())
        queries = rows["query_token"][:, -context_length:].to(runtime.device)  # left padded to the longest query
        query_mask = (torch.arange(context_length)[None, :] >= (context_length - n)[:, None]).long().to(runtime.device)
        data = rollout(policy, ref_policy, value_model, score_fn, queries, query_mask, cfg, tokenizer, runtime, sample_generator)
        mask = data["response_mask"]

        # step 4: KL-shaped per-token rewards; step 5: advantages and returns
        rewards, kl = kl_rewards(data["logprobs"], data["ref_logprobs"], data["scores"], mask, cfg.kl_coef)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = compute_advantages(rewards, data["values"], mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask) * mask

        # step 6: PPO epochs over shuffled micro-batches; an optimizer step per minibatch
        local = len(indices)
        micro = cfg.micro_batch_size
        stats = {k: [] for k in ("approxkl", "clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "ratio")}
        minibatch_tokens = None
        context_length = data["context_length"]
        for epoch in range(cfg.ppo_epochs):
            order = minibatch_order(local, micro * grad_accum_steps, n.to(runtime.device), shuffle_generator)
            for i, start in enumerate(range(0, local, micro)):
                if i % grad_accum_steps == 0:  # real tokens of the minibatch this micro-batch opens
                    minibatch_tokens = mask[order[start : start + micro * grad_accum_steps]].sum()
                mb = order[start : start + micro]
                f = first_real_column(query_mask[mb])
                mb_mask, mb_query_responses, mb_attention_mask = mask[mb], data["query_responses"][mb, f:], data["attention_mask"][mb, f:]
                last_micro = (i + 1) % grad_accum_steps == 0 or start + micro >= local
                with runtime.autocast(), no_sync(policy_logits, not last_micro), no_sync(value_fn, not last_micro):
                    logits = policy_logits(mb_query_responses, mb_attention_mask, context_length - f, cfg.temperature)
                    new_values = value_fn(mb_query_responses, mb_attention_mask, context_length - f)
                    new_logprobs = logprobs_from_logits(logits, data["responses"][mb])
                    # clipped value loss
                    mb_values, mb_returns = data["values"][mb], returns[mb]
                    values_clipped = mb_values + (new_values - mb_values).clamp(-cfg.cliprange_value, cfg.cliprange_value)
                    vf_losses = torch.max((new_values - mb_returns) ** 2, (values_clipped - mb_returns) ** 2)
                    v_loss = 0.5 * (vf_losses * mb_mask).sum() / minibatch_tokens
                    # clipped surrogate
                    log_ratio = (new_logprobs - data["logprobs"][mb]) * mb_mask
                    ratio = torch.exp(log_ratio)
                    mb_advantages = advantages[mb]
                    pg_losses = torch.max(-mb_advantages * ratio, -mb_advantages * ratio.clamp(1 - cfg.cliprange, 1 + cfg.cliprange))
                    pg_loss = (pg_losses * mb_mask).sum() / minibatch_tokens
                    loss = pg_loss + cfg.vf_coef * v_loss
                    loss.backward()
                with torch.no_grad():
                    stats["approxkl"].append(masked_mean(0.5 * log_ratio**2, mb_mask))
                    stats["clipfrac"].append(masked_mean((ratio - 1).abs() > cfg.cliprange, mb_mask))
                    stats["vf_clipfrac"].append(masked_mean(((new_values - mb_values).abs() > cfg.cliprange_value).float(), mb_mask))
                    stats["entropy"].append(masked_mean(entropy_from_logits(logits), mb_mask))
                    stats["ratio"].append(masked_mean(ratio, mb_mask))
                    stats["pg_loss"].append(masked_mean(pg_losses, mb_mask))
                    stats["vf_loss"].append(0.5 * masked_mean(vf_losses, mb_mask))
                if last_micro:
                    grad_norm = clip_gradients(trainable, cfg.grad_clip)
                    check_finite(update, {"loss/policy": float(pg_loss.detach()), "loss/value": float(v_loss.detach()), "grad_norm": grad_norm, "objective/scores": float(data["scores"].mean())}, out)
                    policy_optimizer.step()
                    value_optimizer.step()
                    policy_optimizer.zero_grad(set_to_none=True)
                    value_optimizer.zero_grad(set_to_none=True)

        # ---- log (N+ metric names, so curves compare with the published runs)
        episodes = (update + 1) * cfg.batch_size
        ratios = torch.stack(stats["ratio"])
        metrics = {
            "objective/kl": kl.sum(1).mean(), "objective/entropy": (-data["logprobs"]).sum(1).mean(),
            "objective/non_score_reward": (-cfg.kl_coef * kl).sum(1).mean(), "objective/scores": data["scores"].mean(),
            "objective/rlhf_reward": data["scores"].mean() + (-cfg.kl_coef * kl).sum(1).mean(),
            "policy/approxkl_avg": torch.stack(stats["approxkl"]).mean(), "policy/clipfrac_avg": torch.stack(stats["clipfrac"]).mean(),
            "loss/policy_avg": torch.stack(stats["pg_loss"]).mean(), "loss/value_avg": torch.stack(stats["vf_loss"]).mean(),
            "val/clipfrac_avg": torch.stack(stats["vf_clipfrac"]).mean(), "policy/entropy_avg": torch.stack(stats["entropy"]).mean(),
            "val/ratio": ratios.mean(), "val/ratio_var": ratios.var() if len(ratios) > 1 else torch.zeros(()),
            "val/num_eos_tokens": data["has_eos"].float().sum(), "response_length": mask.sum(1).mean(),
            "no_eos_share": (~data["has_eos"]).float().mean(),
        }  # fmt: skip
        metrics = {k: float(all_reduce_sum(v.detach().float().clone(), runtime)) / (1 if k == "val/num_eos_tokens" else runtime.world_size) for k, v in metrics.items()}
        metrics.update({"lr": lr, "episode": episodes, "episodes_per_s": (update + 1 - start_update) * cfg.batch_size / (time.time() - t0)})
        if runtime.device.type == "cuda":
            metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        logger.log(metrics, update + 1)
        bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}", len=f"{metrics['response_length']:.1f}")
        if runtime.is_main and (update % cfg.sample_interval == 0 or update == num_updates - 1):
            write_samples(out, update + 1, tokenizer, data, rows)

    # ---- save, report
    checkpoint(num_updates)
    if not runtime.is_main:
        return {}
    logger.finish()
    export_final(out, policy, tokenizer)
    records = read_metrics(out / "metrics.jsonl")
    write_report(out, config, records)
    final = records[-1] if records else {}
    if cfg.push_to_hub:
        push_run(out, cfg.push_to_hub)
    return final


def write_samples(out: Path, update: int, tokenizer, data: dict, rows: dict, n: int = 8) -> None:
    with (out / "samples.jsonl").open("a") as f:
        for i in range(min(n, len(data["scores"]))):
            q = rows["query_token"][i][-int(rows["query_token_len"][i]) :]
            response = data["responses"][i][data["response_mask"][i].bool()]
            record = {"update": update, "query": tokenizer.decode(q), "response": tokenizer.decode(response, skip_special_tokens=True), "score": float(data["scores"][i])}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_report(out: Path, config: dict, records: list[dict]) -> None:
    plot_curves(records, ["objective/scores", "objective/kl", "response_length"], out / "curves.png", "PPO")
    plot_curves(records, ["objective/rlhf_reward", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/value_avg"], out / "curves_ppo.png", "PPO internals")
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()] if (out / "samples.jsonl").exists() else []
    last = samples[-8:]
    keys = ["objective/scores", "objective/kl", "objective/rlhf_reward", "response_length", "no_eos_share", "episodes_per_s"]
    first, final = (records[0], records[-1]) if records else ({}, {})
    summary = "\n".join(f"| {k} | {first.get(k, float('nan')):.4g} | {final.get(k, float('nan')):.4g} |" for k in keys)
    (out / "report.md").write_text(
        f"# PPO report\n\n| metric | first update | last update |\n|---|---|---|\n{summary}\n\n"
        "![score, KL, length](curves.png)\n\n![PPO internals](curves_ppo.png)\n\n"
        f"## Samples (last update)\n\n{markdown_table(last, ['query', 'response', 'score'])}\n\n## Config\n\n{config_table(config)}\n"
    )


if __name__ == "__main__":
    cli.run(main, Config, presets=PRESETS)
