"""What the RL stages share: a rollout (sample, truncate after EOS, score, no-grad forwards) and
masked statistics over response tokens.

ppo.py calls `rollout` with its value model; a stage without one (GRPO) passes none. Both shape
the reward the same way, N+'s per-token KL penalty (`kl_rewards`), and batch queries and
minibatches alike (`query_batch`, `minibatch_order`). Advantages and the losses stay in each
stage script: they define its algorithm.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from .generation import Decoding, generate, truncate_after_eos
from .models import hidden_states, last_token_index, logprobs_from_logits, response_logits
from .training import all_reduce_sum

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (query_responses, attention_mask) -> (B,) scores


# ---------------------------------------------------------------------------------------------
# statistics over the real tokens of a response (padding after EOS must not move them)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise x over the real tokens only (padding after EOS must not move the statistics)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(-1)
    return torch.logsumexp(logits, -1) - (probs * logits).sum(-1)


def first_real_column(query_mask: torch.Tensor) -> int:
    """Leading columns that are padding in every row of a left-padded batch can be dropped:
    positions come from the mask, so the logits do not change and the forward gets cheaper
    (rows are grouped by query length, so a chunk's rows are padded little among themselves)."""
    return int(query_mask.any(0).long().argmax())


def value_predictions(
    value_model, query_responses, attention_mask, context_length: int, pack: bool | None = None
) -> torch.Tensor:
    """(B, R) value of the state before each response token: the value head at positions
    context_length-1 ... T-2, like the score head but at every position."""
    hidden = hidden_states(value_model, query_responses, attention_mask, pack=pack)[:, context_length - 1 : -1]
    return value_model.score(hidden).squeeze(-1).float() + getattr(value_model.config, "score_bias", 0.0)


# ---------------------------------------------------------------------------------------------
# the rollout


@dataclass
class Rollout:
    """Everything an update needs about one batch of sampled responses, as (B, ...) tensors."""

    query_responses: torch.Tensor  # (B, C + R) queries left padded to C, then the responses
    attention_mask: torch.Tensor  # (B, C + R) long
    responses: torch.Tensor  # (B, R) sampled tokens, padding after the first EOS
    response_mask: torch.Tensor  # (B, R) float: 1 up to and including the EOS
    has_eos: torch.Tensor  # (B,) bool
    logprobs: torch.Tensor  # (B, R) policy log-probs of the responses at logits / temperature, 0 after EOS
    ref_logprobs: torch.Tensor  # (B, R) the same under the frozen reference
    values: torch.Tensor | None  # (B, R) value model's predictions, 0 after EOS (None without one)
    scores: torch.Tensor  # (B,) score of each query+response; no EOS -> `no_eos_score`
    context_length: int  # C

    @property
    def query_mask(self) -> torch.Tensor:
        return self.attention_mask[:, : self.context_length]


@torch.no_grad()
def sample_responses(
    policy,
    queries,
    query_mask,
    tokenizer,
    *,
    response_length: int,
    temperature: float,
    batch_size: int,
    generator=None,
    autocast=contextlib.nullcontext,
    trim_padding: bool = True,
    decoding: Decoding = "eager",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample exactly `response_length` tokens after each left-padded query (EOS not special),
    `batch_size` queries at a time, and truncate after the first EOS: (B, R) responses, their
    mask and (B,) has_eos (`generation.truncate_after_eos`)."""
    policy.eval()
    responses = []
    for s in range(0, len(queries), batch_size):
        q, qm = queries[s : s + batch_size], query_mask[s : s + batch_size]
        f = first_real_column(qm) if trim_padding else 0
        with autocast():
            sampled = generate(
                policy,
                q[:, f:],
                qm[:, f:],
                max_new_tokens=response_length,
                temperature=temperature,
                generator=generator,
                decoding=decoding,
            )
        responses.append(sampled)
    policy.train()
    return truncate_after_eos(torch.cat(responses), tokenizer.eos_token_id, tokenizer.pad_token_id)


@torch.no_grad()
def rollout(
    policy,
    ref_policy,
    score_fn: ScoreFn,
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    tokenizer,
    *,
    response_length: int,
    temperature: float,
    no_eos_score: float,
    generation_batch_size: int,
    forward_batch_size: int,
    value_model=None,
    generator: torch.Generator | None = None,
    autocast=contextlib.nullcontext,
    trim_padding: bool = True,
    pack: bool | None = None,
    decoding: Decoding = "eager",
) -> Rollout:
    """Sample `response_length` tokens after each left-padded query at `temperature` (EOS not
    special), truncate after the first EOS, score (no EOS -> `no_eos_score`), and take the
    policy's and reference's log-probs (and the values) with no-grad forwards.

    Generation runs `generation_batch_size` queries at a time, the forwards `forward_batch_size`;
    each chunk drops its all-padding leading columns unless `trim_padding` is off. `pack` is
    `models.hidden_states`' (None: packed on CPU). The two switches exist for the fixed-shape
    baselines in bench/; the stages leave them alone. `decoding` is `generation.generate`'s.
    """
    B, context_length = queries.shape

    def first(mask):
        return first_real_column(mask) if trim_padding else 0

    responses, response_mask, has_eos = sample_responses(
        policy,
        queries,
        query_mask,
        tokenizer,
        response_length=response_length,
        temperature=temperature,
        batch_size=generation_batch_size,
        generator=generator,
        autocast=autocast,
        trim_padding=trim_padding,
        decoding=decoding,
    )
    query_responses = torch.cat([queries, responses], dim=1)
    attention_mask = torch.cat([query_mask, response_mask.long()], dim=1)
    logprobs, ref_logprobs, values, scores = [], [], [], []
    for s in range(0, B, forward_batch_size):
        chunk = slice(s, s + forward_batch_size)
        f = first(query_mask[chunk])
        qr, am, resp, ctx = query_responses[chunk, f:], attention_mask[chunk, f:], responses[chunk], context_length - f
        with autocast():
            logprobs.append(logprobs_from_logits(response_logits(policy, qr, am, ctx, temperature, pack=pack), resp))
            ref_logprobs.append(
                logprobs_from_logits(response_logits(ref_policy, qr, am, ctx, temperature, pack=pack), resp)
            )
            if value_model is not None:
                values.append(value_predictions(value_model, qr, am, ctx, pack=pack))
            scores.append(score_fn(qr, am).float())
    scores = torch.cat(scores)
    scores = torch.where(has_eos, scores, torch.full_like(scores, no_eos_score))  # no EOS -> penalty
    mask = response_mask.float()
    return Rollout(
        query_responses=query_responses,
        attention_mask=attention_mask,
        responses=responses,
        response_mask=mask,
        has_eos=has_eos,
        logprobs=torch.cat(logprobs) * mask,
        ref_logprobs=torch.cat(ref_logprobs) * mask,
        values=torch.cat(values) * mask if values else None,
        scores=scores,
        context_length=context_length,
    )


# ---------------------------------------------------------------------------------------------
# batches of queries, the KL-shaped reward, minibatches


def query_batch(rows: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) queries left padded to the longest of the rows, and their mask."""
    query_lengths = rows["query_token_len"]  # (B,)
    context_length = int(query_lengths.max())
    queries = rows["query_token"][:, -context_length:]
    query_mask = torch.arange(context_length)[None, :] >= (context_length - query_lengths)[:, None]
    return queries.to(device), query_mask.long().to(device)


def kl_rewards(
    logprobs, ref_logprobs, scores, response_mask, kl_coef
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N+ step 4: (B, R) per-token rewards, their KL-penalty part alone, and the KL. -kl_coef * KL
    on every real token (EOS included), 0 after the EOS, and the score added at the last real
    token."""
    kl = (logprobs - ref_logprobs) * response_mask  # (B, R)
    non_score_rewards = -kl_coef * kl
    rewards = non_score_rewards.clone()
    last = last_token_index(response_mask)  # (B,) the EOS, or the last token without one
    rewards[torch.arange(len(scores), device=rewards.device), last] += scores
    return rewards, non_score_rewards, kl


def minibatch_order(
    n_rows: int, minibatch_size: int, query_lengths: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """A random split into minibatches (as N+), each sorted by query length so that its
    micro-batches group similar lengths; the minibatch's gradient does not depend on that order."""
    order = torch.randperm(n_rows, generator=generator).to(query_lengths.device)
    chunks = [c[query_lengths[c].argsort(descending=True, stable=True)] for c in order.split(minibatch_size)]
    return torch.cat(chunks)


def rl_metrics(batch: Rollout, kl: torch.Tensor, non_score_rewards: torch.Tensor, stats: dict) -> dict:
    """The N+ metrics PPO and GRPO both log, under N+'s names so curves compare: the rollout's
    (score, KL, its penalty, entropy, length, EOS) and the clipped surrogate's (`stats`: the
    update's per-micro-batch approxkl, clipfrac, pg_loss_mean, entropy, ratio)."""
    ratios = stats["ratio"]
    return {
        "objective/kl": kl.sum(1).mean(),
        "objective/entropy": (-batch.logprobs).sum(1).mean(),
        "objective/non_score_reward": non_score_rewards.sum(1).mean(),
        "objective/scores": batch.scores.mean(),
        "objective/rlhf_reward": batch.scores.mean() + non_score_rewards.sum(1).mean(),
        "policy/approxkl_avg": stats["approxkl"].mean(),
        "policy/clipfrac_avg": stats["clipfrac"].mean(),
        "loss/policy_avg": stats["pg_loss_mean"].mean(),
        "policy/entropy_avg": stats["entropy"].mean(),
        "val/ratio": ratios.mean(),
        "val/ratio_var": ratios.var() if len(ratios) > 1 else torch.zeros(()),
        "val/num_eos_tokens": batch.has_eos.float().sum(),
        "response_length": batch.response_mask.sum(1).mean(),
        "no_eos_share": (~batch.has_eos).float().mean(),
    }


def process_means(metrics: dict[str, torch.Tensor], runtime) -> dict[str, float]:
    """An update's metrics as floats, averaged over the processes; `val/num_eos_tokens` is a count
    and is summed (PPO and GRPO log the same way)."""
    summed = {k: float(all_reduce_sum(v.detach().float().clone(), runtime)) for k, v in metrics.items()}
    return {k: v / (1 if k == "val/num_eos_tokens" else runtime.world_size) for k, v in summed.items()}
