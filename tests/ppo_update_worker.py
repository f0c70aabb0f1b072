"""One `ppo.ppo_update` (or `grpo.grpo_update`) on a fixed rollout, alone or under torchrun
(tests/test_distributed.py).

    python tests/ppo_update_worker.py POLICY_DIR VALUE_DIR OUT_DIR [grpo]
    torchrun --nproc_per_node 2 tests/ppo_update_worker.py POLICY_DIR VALUE_DIR OUT_DIR [grpo]

Every process samples the same whole rollout (same seed, same models) and computes advantages
over all of it, then updates on its share of the rows: what two processes can be made to agree
on with one. The optimizers are plain SGD, so the update is proportional to the gradient and a
gradient scaled by the number of processes, or averaged per process over unequal token counts,
shows in the weights (Adam would normalise the scale away). Rank 0 writes OUT/weights.safetensors.
"""

import dataclasses
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dgx_spark_summary_from_human_feedback.data import load_tokenizer  # noqa: E402
from dgx_spark_summary_from_human_feedback.models import load_policy, response_logits  # noqa: E402
from dgx_spark_summary_from_human_feedback.rollout import rollout  # noqa: E402
from dgx_spark_summary_from_human_feedback.training import distribute  # noqa: E402
from dgx_spark_summary_from_human_feedback.training import setup_runtime  # noqa: E402
from tests.stage_fixtures import load_script  # noqa: E402

QUERY_LENGTHS = [4, 9, 15, 6, 12, 3, 10, 8]  # left padding differs per row


def fixed_queries(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    T = max(QUERY_LENGTHS)
    queries = torch.full((len(QUERY_LENGTHS), T), tokenizer.pad_token_id)
    query_mask = torch.zeros(len(QUERY_LENGTHS), T, dtype=torch.long)
    for i, n in enumerate(QUERY_LENGTHS):
        queries[i, T - n :] = torch.randint(1, tokenizer.pad_token_id, (n,), generator=g)
        query_mask[i, T - n :] = 1
    return queries, query_mask


def share_of(batch, runtime):
    """This process's rows of a rollout: every other row."""
    share = slice(runtime.rank, None, runtime.world_size)
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return share, type(batch)(**{k: v[share] if torch.is_tensor(v) else v for k, v in fields.items()})


def score(query_responses, attention_mask):
    return (query_responses[:, -1] % 7).float() / 7


def main(policy_dir: str, value_dir: str, out: Path) -> dict:
    ppo = load_script("ppo")
    runtime = setup_runtime("cpu", "fp32")
    tokenizer = load_tokenizer(policy_dir)
    cfg = ppo.Config(
        sft_path=policy_dir,
        reward_path=value_dir,
        batch_size=8,
        num_minibatches=1,
        micro_batch_size=2,
        ppo_epochs=2,
        response_length=10,
        forward_batch_size=8,
        generation_batch_size=8,
        grad_clip=0.0,
        device="cpu",
        precision="fp32",
    )
    models = ppo.load_models(cfg, tokenizer, runtime, score_fn=score)
    models.policy_optimizer = torch.optim.SGD(models.policy.parameters(), lr=0.1)
    models.value_optimizer = torch.optim.SGD(models.value_model.parameters(), lr=0.1)
    queries, query_mask = fixed_queries(tokenizer)
    batch = ppo.ppo_rollout(models, queries, query_mask, cfg, tokenizer, runtime, torch.Generator().manual_seed(0))
    advantages, returns, _, _ = ppo.rewards_and_advantages(batch, cfg)
    share, local = share_of(batch, runtime)
    ppo.ppo_update(
        models,
        local,
        advantages[share],
        returns[share],
        local.query_mask.sum(1),
        cfg,
        runtime,
        torch.Generator().manual_seed(1),
        0,
        out,
    )
    weights = {f"policy.{k}": v.detach().clone() for k, v in models.policy.state_dict().items()}
    weights |= {f"value.{k}": v.detach().clone() for k, v in models.value_model.state_dict().items()}
    return weights | {"response_tokens": batch.response_mask.sum(1)}  # the rollout's lengths, to check they differ


def grpo_main(policy_dir: str, out: Path) -> dict:
    """The same for GRPO: groups of 2 responses to 4 queries, advantages over the whole rollout."""
    grpo = load_script("grpo")
    runtime = setup_runtime("cpu", "fp32")
    tokenizer = load_tokenizer(policy_dir)
    cfg = grpo.Config(
        sft_path=policy_dir,
        batch_size=8,
        group_size=2,
        num_minibatches=1,
        micro_batch_size=2,
        update_epochs=2,
        response_length=10,
        forward_batch_size=8,
        generation_batch_size=8,
        grad_clip=0.0,
        device="cpu",
        precision="fp32",
    )
    policy, ref_policy = load_policy(policy_dir, tokenizer), load_policy(policy_dir, tokenizer).requires_grad_(False)
    policy_logits = distribute(policy, response_logits, runtime)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    queries, query_mask = fixed_queries(tokenizer)
    queries, query_mask = queries[:4].repeat_interleave(2, 0), query_mask[:4].repeat_interleave(2, 0)
    batch = rollout(
        policy,
        ref_policy,
        score,
        queries,
        query_mask,
        tokenizer,
        response_length=cfg.response_length,
        temperature=cfg.temperature,
        no_eos_score=cfg.no_eos_score,
        generation_batch_size=8,
        forward_batch_size=8,
        generator=torch.Generator().manual_seed(0),
    )
    returns, _, _ = grpo.sequence_returns(batch, cfg)
    advantages = grpo.group_advantages(returns, cfg.group_size, cfg.advantage)
    share, local = share_of(batch, runtime)
    params = list(policy.parameters())
    grpo.grpo_update(
        policy_logits,
        optimizer,
        params,
        local,
        advantages[share],
        local.query_mask.sum(1),
        cfg,
        runtime,
        torch.Generator().manual_seed(1),
        0,
        out,
    )
    weights = {f"policy.{k}": v.detach().clone() for k, v in policy.state_dict().items()}
    return weights | {"response_tokens": batch.response_mask.sum(1)}


if __name__ == "__main__":
    out = Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    weights = grpo_main(sys.argv[1], out) if sys.argv[4:] == ["grpo"] else main(sys.argv[1], sys.argv[2], out)
    runtime = setup_runtime("cpu", "fp32")
    if runtime.is_main:
        save_file(weights, str(out / "weights.safetensors"))
    runtime.barrier()
