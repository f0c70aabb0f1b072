"""grpo.py: group advantages (grpo and rloo) against their formulas, equal returns give 0 and no
NaN; the return with the KL in the reward; the first epoch's ratio is 1 and k3 is 0 against
itself; learning a rule-based reward on CPU; the smoke run; kill-and-resume."""

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from dgx_spark_summary_from_human_feedback import tiny
from dgx_spark_summary_from_human_feedback.models import load_policy, response_logits
from dgx_spark_summary_from_human_feedback.rollout import rollout
from dgx_spark_summary_from_human_feedback.tracking import read_metrics
from dgx_spark_summary_from_human_feedback.training import distribute, make_optimizer, setup_runtime

from .stage_fixtures import (  # noqa: F401
    assert_same_weights,
    eos_prone,
    load_script,
    reward_smoke_dir_fixture,
    run_killed_and_uninterrupted,
    sft_smoke_dir_fixture,
)
from .test_ppo import TARGET_IDS, short_query_dataset

grpo = load_script("grpo")


# ---- group advantages


def test_grpo_advantages_have_mean_zero_and_unit_std_in_every_group():
    g = torch.Generator().manual_seed(0)
    returns = torch.randn(5 * 8, generator=g, dtype=torch.float64) * torch.arange(
        1, 41, dtype=torch.float64
    )  # groups of different spread
    advantages = grpo.group_advantages(returns, 8, "grpo", eps=0.0).view(5, 8)
    torch.testing.assert_close(advantages.mean(1), torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(advantages.std(1), torch.ones(5, dtype=torch.float64), atol=1e-12, rtol=0)
    r = returns.view(5, 8)
    torch.testing.assert_close(advantages[2, 3], (r[2, 3] - r[2].mean()) / r[2].std())  # one entry by hand


def test_rloo_advantage_is_the_return_minus_the_mean_of_the_others():
    returns = torch.tensor([1.0, 2.0, 6.0, -3.0, 0.5, 0.5], dtype=torch.float64)
    advantages = grpo.group_advantages(returns, 3, "rloo")
    expected = []
    for group in (returns[:3], returns[3:]):
        for i in range(3):
            others = [float(group[j]) for j in range(3) if j != i]
            expected.append(float(group[i]) - sum(others) / 2)
    assert expected[:3] == [1 - 4, 2 - 3.5, 6 - 1.5]
    torch.testing.assert_close(advantages, torch.tensor(expected, dtype=torch.float64))
    assert float(advantages[3:].mean()) == pytest.approx(0.0)  # rloo is also centred per group, unscaled


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_a_group_of_equal_returns_gets_zero_advantage_and_no_nan(kind):
    returns = torch.tensor([0.7, 0.7, 0.7, 0.7, -1.0, -1.0, -1.0, -1.0, 0.1, 0.2, 0.3, 0.4])
    advantages = grpo.group_advantages(returns, 4, kind)
    assert torch.isfinite(advantages).all()
    assert torch.equal(advantages[:8], torch.zeros(8))
    assert advantages[8:].abs().min() > 0


def test_return_with_the_kl_in_the_reward_is_the_score_minus_the_kl_penalty():
    batch = type("B", (), {})()
    batch.logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, 0.0, 0.0]])
    batch.ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5], [-3.0, -9.0, -9.0]])  # garbage after the second row's EOS
    batch.response_mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    batch.scores = torch.tensor([2.0, -1.0])
    cfg = grpo.Config(kl_coef=0.1, kl_in="reward")
    returns, kl, _ = grpo.sequence_returns(batch, cfg)
    torch.testing.assert_close(returns, torch.tensor([2.0 - 0.1 * (0.5 - 1.0 + 0.0), -1.0 - 0.1 * 2.0]))
    torch.testing.assert_close(kl.sum(1), torch.tensor([-0.5, 2.0]))
    returns, _, _ = grpo.sequence_returns(batch, grpo.Config(kl_coef=0.1, kl_in="loss"))
    assert torch.equal(returns, batch.scores)


# ---- the first epoch's ratio


@pytest.fixture(scope="module")
def group_rollout(tiny_model_dir, tokenizer):
    """4 queries x 4 responses from an EOS-prone tiny policy, whose reference is itself."""
    base = load_policy(str(tiny_model_dir), tokenizer)
    policy, ref_policy = eos_prone(base, tokenizer.eos_token_id, 0.4), eos_prone(base, tokenizer.eos_token_id, 0.4)
    g = torch.Generator().manual_seed(0)
    lengths = [9, 15, 6, 12]
    T = max(lengths)
    queries = torch.full((4, T), tokenizer.pad_token_id)
    query_mask = torch.zeros(4, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        queries[i, T - n :] = torch.randint(1, tokenizer.pad_token_id, (n,), generator=g)
        query_mask[i, T - n :] = 1

    def score_fn(query_responses, attention_mask):
        return (query_responses[:, -12:] % 7).float().mean(1)  # any score that differs within a group

    batch = rollout(
        policy,
        ref_policy,
        score_fn,
        queries.repeat_interleave(4, 0),
        query_mask.repeat_interleave(4, 0),
        tokenizer,
        response_length=12,
        temperature=0.7,
        no_eos_score=-1.0,
        generation_batch_size=16,
        forward_batch_size=5,
        generator=torch.Generator().manual_seed(0),
    )
    return {"policy": policy, "batch": batch, "query_lengths": torch.tensor(lengths).repeat_interleave(4)}


@pytest.mark.parametrize("kl_in", ["reward", "loss"])
def test_first_epoch_ratio_is_one_and_k3_is_zero_against_itself(group_rollout, kl_in, tmp_path):
    """The training forward (logits / temperature, other micro-batches, shuffled) gives back the
    rollout's log-probs: every ratio before the first optimizer step is 1, and with the policy
    as its own reference the k3 term is 0; after the step the ratios move."""
    policy = copy.deepcopy(group_rollout["policy"])  # a fresh copy to train
    batch = group_rollout["batch"]
    runtime = setup_runtime("cpu", "fp32")
    # one minibatch of 4 micro-batches of 4 (the rollout's forward chunks were 5)
    cfg = grpo.Config(
        group_size=4,
        batch_size=16,
        micro_batch_size=4,
        update_epochs=2,
        kl_in=kl_in,
        temperature=0.7,
        lr=1e-2,
        grad_clip=0.0,
    )
    returns, _, _ = grpo.sequence_returns(batch, cfg)
    advantages = grpo.group_advantages(returns, 4, "grpo")
    assert advantages.abs().max() > 0
    optimizer = make_optimizer(
        list(policy.parameters()),
        lr=cfg.lr,
        betas=(0.9, 0.999),
        weight_decay=0.0,
        eps=1e-5,
        kind="adamw",
        device=runtime.device,
    )
    stats = grpo.grpo_update(
        distribute(policy, response_logits, runtime),
        optimizer,
        list(policy.parameters()),
        batch,
        advantages,
        group_rollout["query_lengths"],
        cfg,
        runtime,
        torch.Generator().manual_seed(1),
        0,
        tmp_path,
    )
    first, second = stats["ratio"][:4], stats["ratio"][4:]
    assert (first - 1).abs().max() < 1e-5
    assert stats["approxkl"][:4].max() < 1e-10 and stats["clipfrac"][:4].max() == 0
    assert stats["k3_mean"][:4].abs().max() < 1e-6  # policy == reference before the first step
    assert (second - 1).abs().max() > 1e-4  # the optimizer step moved the policy
    assert stats["k3_mean"][4:].max() > 0


# ---- learning a rule-based reward


@pytest.mark.parametrize("advantage,kl_in", [("grpo", "reward"), pytest.param("rloo", "loss", marks=pytest.mark.slow)])
def test_grpo_learns_a_rule_based_reward(tmp_path, tokenizer, advantage, kl_in):
    """Score = share of a response's tokens (EOS aside) in a target set, as ppo.py's test. From a
    random tiny policy made to end its responses, 40 updates of 4 queries x 4 responses should
    raise it well above its start."""
    R, seed = 12, 0
    tiny.write_model(tmp_path / "init", seed=seed)
    policy = eos_prone(load_policy(str(tmp_path / "init"), tokenizer), tokenizer.eos_token_id, 0.5)
    policy.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")

    def rule(query_responses, attention_mask):
        responses, kept = query_responses[:, -R:], attention_mask[:, -R:].bool()  # the rollout appends exactly R tokens
        real = kept & (responses != tokenizer.eos_token_id)
        hits = (real & (responses > 0) & (responses < TARGET_IDS)).sum(1)
        return hits / real.sum(1).clamp(min=1)

    cfg = grpo.Config(
        sft_path=str(tmp_path / "policy"),
        reward_path="unused",
        dataset=str(short_query_dataset(tokenizer, tmp_path / "data")),
        output_dir=str(tmp_path / "out"),
        advantage=advantage,
        kl_in=kl_in,
        group_size=4,
        total_episodes=16 * 40,
        batch_size=16,
        micro_batch_size=16,
        forward_batch_size=16,
        generation_batch_size=16,
        lr=3e-3,
        response_length=R,
        no_eos_score=0.0,
        device="cpu",
        precision="fp32",
        seed=seed,
        save_interval=1000,
        sample_interval=1000,
    )
    grpo.main(cfg, score_fn=rule)
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert len(records) == 40
    scores = [r["objective/scores"] for r in records]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > first + 0.2 and last > 2 * first, f"scores did not rise: {[round(s, 2) for s in scores]}"
    assert all(math.isfinite(r["objective/kl"]) for r in records)
    assert records[-1]["objective/kl"] > 0  # it moved away from the reference to get there


# ---- the smoke run and kill-and-resume


N_PLUS_METRICS = [
    "objective/kl",
    "objective/entropy",
    "objective/non_score_reward",
    "objective/rlhf_reward",
    "objective/scores",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "loss/policy_avg",
    "policy/entropy_avg",
    "val/ratio",
    "val/ratio_var",
    "val/num_eos_tokens",
    "lr",
    "episode",
    "response_length",
    "no_eos_share",
]


@pytest.fixture(scope="module")
def grpo_runs(sft_smoke_dir, reward_smoke_dir, tmp_path_factory):
    """The smoke preset for 12 updates with a checkpoint every 3: (uninterrupted, killed past
    checkpoint 6 and resumed) output directories."""
    root = tmp_path_factory.mktemp("grpo")
    a, b = root / "a", root / "b"
    args = [
        "--preset",
        "smoke",
        "--sft-path",
        sft_smoke_dir,
        "--reward-path",
        reward_smoke_dir,
        "--total-episodes",
        16 * 12,
        "--save-interval",
        3,
    ]
    resumed_from = run_killed_and_uninterrupted("grpo.py", args, a, b, kill_at=6)
    assert 6 <= resumed_from < 12
    return a, b


@pytest.mark.slow
def test_grpo_smoke_run_writes_a_plain_hf_policy_report_and_n_plus_metrics(grpo_runs):
    out = grpo_runs[0]
    for name in ("report.md", "curves.png", "metrics.jsonl", "model.safetensors", "samples.jsonl"):
        assert (out / name).stat().st_size > 0, name
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.architectures == ["Qwen2ForCausalLM"]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    for record in records:
        missing = [k for k in N_PLUS_METRICS if k not in record]
        assert not missing, f"step {record['step']}: {missing}"
        assert all(math.isfinite(record[k]) for k in N_PLUS_METRICS)
    assert records[-1]["episode"] == 16 * 12
    assert not (out / "checkpoints" / "step_000012" / "value").exists()  # no value model


@pytest.mark.slow
def test_killed_and_resumed_grpo_run_is_bit_equal(grpo_runs):
    a, b = grpo_runs
    assert_same_weights(a / "model.safetensors", b / "model.safetensors")

    def records(out):
        return [{k: v for k, v in r.items() if k != "episodes_per_s"} for r in read_metrics(out / "metrics.jsonl")]

    assert records(b) == records(a)
    assert (b / "samples.jsonl").read_text() == (a / "samples.jsonl").read_text()
