"""ppo.py: GAE, KL-shaped rewards and whitening against the textbook; the rollout (EOS
truncation, the no-EOS score, masks under left padding, first ratio 1, KL 0 against itself);
learning a rule-based reward; the smoke run; kill-and-resume."""

import copy
import dataclasses
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from dgx_spark_summary_from_human_feedback import tiny
from dgx_spark_summary_from_human_feedback.data import QUERY_FORMAT, encode
from dgx_spark_summary_from_human_feedback.models import (
    load_policy,
    load_reward_model,
    logprobs_from_logits,
    response_logits,
)
from dgx_spark_summary_from_human_feedback.rollout import masked_whiten, value_predictions
from dgx_spark_summary_from_human_feedback.rollout import rollout as sample_rollout
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

ppo = load_script("ppo")


@pytest.fixture
def one_thread():
    """Torch's 2 threads spin against other processes on a shared 2-core machine: 1 is faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prefix_mask(lengths: list[int], R: int, dtype=torch.float64) -> torch.Tensor:
    """(B, R) response mask: each row's tokens up to and including its EOS (all R without one)."""
    return (torch.arange(R)[None, :] < torch.tensor(lengths)[:, None]).to(dtype)


# ---- GAE, rewards, whitening


def naive_gae(rewards, values, mask, gamma, lam):
    """Textbook GAE, one row and one token at a time; the value after the last real token is 0."""
    advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        n = int(mask[i].sum())
        gae = 0.0
        for t in reversed(range(n)):
            next_value = float(values[i, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[i, t]) + gamma * next_value - float(values[i, t])
            gae = delta + gamma * lam * gae
            advantages[i, t] = gae
            returns[i, t] = gae + float(values[i, t])
    return advantages, returns


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_gae_equals_a_naive_loop(gamma):
    g = torch.Generator().manual_seed(0)
    R = 9
    mask = prefix_mask([9, 1, 5, 3, 8], R)  # no padding; EOS at position 0; EOS mid-sequence
    rewards = torch.randn(5, R, generator=g, dtype=torch.float64) * mask  # as kl_rewards makes them: 0 after EOS
    values = torch.randn(5, R, generator=g, dtype=torch.float64)  # garbage after EOS: must be ignored
    advantages, returns = ppo.compute_advantages(rewards, values, mask, gamma, 0.95)
    expected_advantages, expected_returns = naive_gae(rewards, values, mask, gamma, 0.95)
    torch.testing.assert_close(advantages, expected_advantages, atol=1e-10, rtol=0)  # 0 after EOS too
    real = mask.bool()
    torch.testing.assert_close(returns[real], expected_returns[real], atol=1e-10, rtol=0)


def test_kl_rewards_is_zero_kl_and_the_score_at_the_last_real_token_when_policy_is_reference():
    mask = prefix_mask([6, 3, 1], 6, torch.float32)  # no EOS; EOS at 2; EOS at 0
    logprobs = torch.randn(3, 6) * mask
    scores = torch.tensor([0.5, -1.25, 2.0])
    rewards, non_score_rewards, kl = ppo.kl_rewards(logprobs, logprobs.clone(), scores, mask, 0.05)
    assert torch.equal(kl, torch.zeros(3, 6))
    assert torch.equal(non_score_rewards, torch.zeros(3, 6))
    expected = torch.zeros(3, 6)
    expected[0, 5], expected[1, 2], expected[2, 0] = 0.5, -1.25, 2.0  # no-EOS row: the final position
    assert torch.equal(rewards, expected)


def test_kl_rewards_penalise_real_tokens_only_and_put_the_score_on_the_eos():
    g = torch.Generator().manual_seed(1)
    mask = prefix_mask([6, 3, 1], 6, torch.float32)
    logprobs, ref_logprobs = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)  # garbage after EOS
    scores = torch.tensor([0.5, -1.25, 2.0])
    rewards, non_score_rewards, kl = ppo.kl_rewards(logprobs, ref_logprobs, scores, mask, 0.1)
    after_eos = mask == 0
    assert torch.all(rewards[after_eos] == 0) and torch.all(kl[after_eos] == 0)  # exactly 0 after EOS
    torch.testing.assert_close(kl[~after_eos], (logprobs - ref_logprobs)[~after_eos])
    expected = -0.1 * (logprobs - ref_logprobs) * mask
    expected[0, 5] += 0.5
    expected[1, 2] += -1.25
    expected[2, 0] += 2.0
    torch.testing.assert_close(rewards, expected)
    torch.testing.assert_close(
        non_score_rewards, -0.1 * (logprobs - ref_logprobs) * mask
    )  # the penalty alone, no score


def test_masked_whiten_ignores_padding_and_normalises_real_tokens():
    g = torch.Generator().manual_seed(2)
    mask = prefix_mask([7, 2, 5, 1], 7)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64) * 3 + 2
    padded_differently = torch.where(mask.bool(), x, 1000 * torch.randn(4, 7, generator=g, dtype=torch.float64))
    real = mask.bool()
    whitened = masked_whiten(x, mask)
    torch.testing.assert_close(whitened[real], masked_whiten(padded_differently, mask)[real], atol=1e-12, rtol=0)
    assert abs(float(whitened[real].mean())) < 1e-6
    assert abs(float(whitened[real].var(unbiased=False)) - 1) < 1e-6
    kept_mean = masked_whiten(x, mask, shift_mean=False)
    assert abs(float(kept_mean[real].mean() - x[real].mean())) < 1e-6


# ---- the rollout


SCORE = 5.0  # what the test's score function returns: tells scored rows from no-EOS rows


@pytest.fixture(scope="module")
def rollout(tiny_model_dir, tokenizer):
    """One rollout of 10 left-padded queries of different lengths from an EOS-prone tiny policy
    (about 2 in 3 responses end within 12 tokens)."""
    base = load_policy(str(tiny_model_dir), tokenizer)
    policy, ref_policy = eos_prone(base, tokenizer.eos_token_id, 0.4), eos_prone(base, tokenizer.eos_token_id, 0.4)
    torch.manual_seed(0)
    value_model = load_reward_model(str(tiny_model_dir), tokenizer, new_head=True)
    g = torch.Generator().manual_seed(0)
    lengths = [4, 9, 15, 6, 12, 3, 10, 8, 14, 5]
    T = max(lengths)
    queries = torch.full((len(lengths), T), tokenizer.pad_token_id)
    query_mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        queries[i, T - n :] = torch.randint(1, tokenizer.pad_token_id, (n,), generator=g)  # no EOS, no [PAD]
        query_mask[i, T - n :] = 1
    cfg = ppo.Config(
        response_length=12, generation_batch_size=6, forward_batch_size=4, micro_batch_size=3, temperature=0.7
    )
    calls = []

    def score_fn(query_responses, attention_mask):
        calls.append(attention_mask.clone())
        return torch.full((len(query_responses),), SCORE)

    settings = {
        k: getattr(cfg, k)
        for k in ("response_length", "temperature", "no_eos_score", "generation_batch_size", "forward_batch_size")
    }
    batch = sample_rollout(
        policy,
        ref_policy,
        score_fn,
        queries,
        query_mask,
        tokenizer,
        value_model=value_model,
        generator=torch.Generator().manual_seed(0),
        **settings,
    )
    return {
        "batch": batch,
        "policy": policy,
        "value_model": value_model,
        "queries": queries,
        "query_mask": query_mask,
        "cfg": cfg,
        "score_calls": calls,
    }


def test_rollout_samples_rows_with_and_without_eos(rollout):
    has_eos = rollout["batch"].has_eos
    assert has_eos.any() and not has_eos.all(), "the fixture should exercise both cases"


def test_rollout_truncates_after_the_first_eos_and_scores_no_eos_rows_with_the_penalty(rollout, tokenizer):
    batch, cfg = rollout["batch"], rollout["cfg"]
    responses, mask = batch.responses, batch.response_mask
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for i in range(len(responses)):
        row = responses[i].tolist()
        if batch.has_eos[i]:
            first = row.index(eos)
            assert row[first + 1 :] == [pad] * (cfg.response_length - first - 1)
            assert mask[i].tolist() == [1.0] * (first + 1) + [0.0] * (cfg.response_length - first - 1)
            assert batch.scores[i] == SCORE
        else:
            assert eos not in row and pad not in row
            assert mask[i].tolist() == [1.0] * cfg.response_length
            assert batch.scores[i] == cfg.no_eos_score


def test_rollout_masks_under_left_padding(rollout):
    batch = rollout["batch"]
    C = batch.context_length
    assert C == rollout["queries"].shape[1]
    assert torch.equal(batch.query_responses[:, :C], rollout["queries"])
    assert torch.equal(batch.attention_mask[:, :C], rollout["query_mask"])  # left padding stays masked
    assert torch.equal(batch.attention_mask[:, C:], batch.response_mask.long())
    # the score sees the same mask, less leading columns that are padding in every row of its chunk
    T = batch.attention_mask.shape[1]
    seen = torch.cat([torch.nn.functional.pad(m, (T - m.shape[1], 0)) for m in rollout["score_calls"]])
    assert torch.equal(seen, batch.attention_mask)
    assert any(m.shape[1] < T for m in rollout["score_calls"])  # some chunk was trimmed
    after_eos = batch.response_mask == 0
    assert after_eos.any()
    for key in ("logprobs", "ref_logprobs", "values"):
        assert torch.all(getattr(batch, key)[after_eos] == 0), key


@torch.no_grad()
def test_rollout_logprobs_and_values_equal_those_of_each_sequence_alone(rollout):
    """Left padding does not change a row's log-probs or values: compare with unpadded forwards."""
    batch, cfg, policy, value_model = rollout["batch"], rollout["cfg"], rollout["policy"], rollout["value_model"]
    C = batch.context_length
    for i in range(len(batch.responses)):
        query = rollout["queries"][i][rollout["query_mask"][i].bool()]
        n = int(batch.response_mask[i].sum())
        response = batch.responses[i, :n]
        ids = torch.cat([query, response])[None]
        logits = policy(input_ids=ids).logits[0, len(query) - 1 : -1] / cfg.temperature
        logprobs = logits.log_softmax(-1).gather(1, response[:, None]).squeeze(1)
        torch.testing.assert_close(batch.logprobs[i, :n], logprobs, atol=1e-4, rtol=0)
        hidden = value_model.model(input_ids=ids).last_hidden_state[0, len(query) - 1 : -1]
        torch.testing.assert_close(batch.values[i, :n], value_model.score(hidden).squeeze(-1), atol=1e-4, rtol=0)
    assert C > len(rollout["queries"][5][rollout["query_mask"][5].bool()])  # some rows really are padded


def test_kl_is_zero_when_the_policy_is_the_reference(rollout):
    batch = rollout["batch"]
    real = batch.response_mask.bool()
    assert (batch.logprobs[real] - batch.ref_logprobs[real]).abs().max() < 1e-6
    assert batch.logprobs[real].abs().min() > 0  # real log-probs, not zeros


def test_first_minibatch_ratio_is_one(rollout, tmp_path):
    """Inside the real update (`ppo.ppo_update`: leading padding trimmed, micro-batches unlike the
    rollout's forward batches, shuffled minibatches) every ratio of the first minibatch of the
    first epoch is 1 (N+ detail 19); after that minibatch's optimizer step the next one's is not."""
    batch = rollout["batch"]
    cfg = dataclasses.replace(
        rollout["cfg"], batch_size=10, num_minibatches=2, micro_batch_size=5, ppo_epochs=1, lr=1e-2
    )
    policy, value_model = (
        copy.deepcopy(rollout["policy"]),
        copy.deepcopy(rollout["value_model"]),
    )  # the fixture's stay untrained
    runtime = setup_runtime("cpu", "fp32")
    adam = dict(lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-5, kind="adamw", device=runtime.device)
    models = ppo.Models(
        policy=policy,
        value_model=value_model,
        ref_policy=None,
        score_fn=None,
        policy_logits=distribute(policy, response_logits, runtime),
        value_fn=distribute(value_model, value_predictions, runtime),
        policy_optimizer=make_optimizer(list(policy.parameters()), **adam),
        value_optimizer=make_optimizer(list(value_model.parameters()), **adam),
    )
    advantages, returns, _, _ = ppo.rewards_and_advantages(batch, cfg)
    stats = ppo.ppo_update(
        models,
        batch,
        advantages,
        returns,
        batch.query_mask.sum(1),
        cfg,
        runtime,
        torch.Generator().manual_seed(3),
        0,
        tmp_path,
    )
    assert len(stats["ratio"]) == 2  # two minibatches of one micro-batch each
    assert (
        abs(float(stats["ratio"][0]) - 1) < 1e-6
        and float(stats["approxkl"][0]) < 1e-10
        and float(stats["clipfrac"][0]) == 0
    )
    assert float(stats["approxkl"][1]) > 1e-6  # the first step moved the policy: the check above can fail


def test_ppo_losses_at_ratio_one_are_the_plain_surrogate(rollout):
    """The training forward (logits / temperature, micro-batches unlike the rollout's forward
    batches, shuffled) gives back the rollout's log-probs: every ratio of the first pass is 1,
    so `ppo_losses` sees no KL and clips nothing."""
    batch, cfg, policy, value_model = rollout["batch"], rollout["cfg"], rollout["policy"], rollout["value_model"]
    assert cfg.micro_batch_size != cfg.forward_batch_size
    order = torch.randperm(len(batch.responses), generator=torch.Generator().manual_seed(3))
    for start in range(0, len(order), cfg.micro_batch_size):
        mb = order[start : start + cfg.micro_batch_size]
        logits = response_logits(
            policy, batch.query_responses[mb], batch.attention_mask[mb], batch.context_length, cfg.temperature
        )
        new_values = value_predictions(
            value_model, batch.query_responses[mb], batch.attention_mask[mb], batch.context_length
        )
        mb_mask = batch.response_mask[mb]
        advantages = torch.randn(mb_mask.shape, generator=torch.Generator().manual_seed(start))
        losses = ppo.ppo_losses(
            logits,
            new_values,
            batch.responses[mb],
            batch.logprobs[mb],
            batch.values[mb],
            advantages,
            advantages,
            mb_mask,
            mb_mask.sum(),
            0.2,
            0.2,
        )
        new_logprobs = logprobs_from_logits(logits, batch.responses[mb])
        ratio = torch.exp((new_logprobs - batch.logprobs[mb]) * mb_mask)
        assert (ratio - 1)[mb_mask.bool()].abs().max() < 1e-5
        assert abs(float(losses["ratio"]) - 1) < 1e-5 and float(losses["approxkl"]) < 1e-10
        assert float(losses["clipfrac"]) == 0 and float(losses["vf_clipfrac"]) == 0
        # ratio 1: the surrogate is -advantage per real token
        torch.testing.assert_close(losses["pg_loss"], -(advantages * mb_mask).sum() / mb_mask.sum(), atol=1e-5, rtol=0)


# ---- learning a rule-based reward


TARGET_IDS = 104  # the rule rewards response tokens with ids 1..103: about 1 in 8 of the model's rows


def short_query_dataset(tokenizer, out):
    """The fixture SFT train rows whose query is at most 125 tokens (no 512-token edge cases)."""
    rows = [line for line in (tiny.SFT_DIR / "train.jsonl").read_text().splitlines() if line.strip()]
    short = [
        r
        for r in rows
        if len(encode(tokenizer, QUERY_FORMAT.format(**{k: json.loads(r)[k] for k in ("subreddit", "title", "post")})))
        <= 125
    ]
    assert len(short) >= 32
    out.mkdir()
    (out / "train.jsonl").write_text("\n".join(short) + "\n")
    return out


@pytest.mark.slow  # a whole stage run
def test_ppo_learns_a_rule_based_reward(tmp_path, tokenizer, one_thread):
    """Score = share of a response's tokens (EOS aside) in a target set. From a random tiny policy
    (made to end its responses), 40 updates of 16 should raise it from ~0.07 to well above."""
    R, seed = 12, 0
    tiny.write_model(tmp_path / "init", seed=seed)
    policy = eos_prone(load_policy(str(tmp_path / "init"), tokenizer), tokenizer.eos_token_id, 0.5)
    policy.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    torch.manual_seed(seed)
    value_model = load_reward_model(str(tmp_path / "init"), tokenizer, new_head=True)
    value_model.save_pretrained(tmp_path / "value")
    tokenizer.save_pretrained(tmp_path / "value")

    def rule(query_responses, attention_mask):
        responses, kept = query_responses[:, -R:], attention_mask[:, -R:].bool()  # rollout appends exactly R tokens
        real = kept & (responses != tokenizer.eos_token_id)
        hits = (real & (responses > 0) & (responses < TARGET_IDS)).sum(1)
        return hits / real.sum(1).clamp(min=1)

    cfg = ppo.Config(
        sft_path=str(tmp_path / "policy"),
        reward_path=str(tmp_path / "value"),
        dataset=str(short_query_dataset(tokenizer, tmp_path / "data")),
        output_dir=str(tmp_path / "out"),
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
    ppo.main(cfg, score_fn=rule)
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
    "loss/value_avg",
    "val/clipfrac_avg",
    "policy/entropy_avg",
    "val/ratio",
    "val/ratio_var",
    "val/num_eos_tokens",
    "lr",
    "episode",
]


def newest_sample_update(out) -> int:
    path = out / "samples.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return max((json.loads(line)["update"] for line in lines if line.endswith("}")), default=-1)


@pytest.fixture(scope="module")
def ppo_runs(sft_smoke_dir, reward_smoke_dir, tmp_path_factory):
    """The smoke preset for 12 updates with a checkpoint every 3: (uninterrupted, killed once it
    has written the samples of update 7 past checkpoint 6, then resumed) output directories."""
    root = tmp_path_factory.mktemp("ppo")
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
    resumed_from = run_killed_and_uninterrupted("ppo.py", args, a, b, kill_at=6, progress=newest_sample_update)
    assert 6 <= resumed_from < 12
    return a, b


@pytest.mark.slow
def test_smoke_run_writes_a_plain_hf_policy_report_and_every_n_plus_metric(ppo_runs):
    out = ppo_runs[0]
    for name in ("report.md", "curves.png", "metrics.jsonl", "model.safetensors"):
        assert (out / name).stat().st_size > 0, name
    policy = AutoModelForCausalLM.from_pretrained(str(out))  # plain HF, no project code
    assert policy.config.architectures == ["Qwen2ForCausalLM"]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    for record in records:
        missing = [k for k in N_PLUS_METRICS if k not in record]
        assert not missing, f"step {record['step']}: {missing}"
        assert all(math.isfinite(record[k]) for k in N_PLUS_METRICS)
    assert records[-1]["episode"] == 16 * 12
    assert "![score, KL, length](curves.png)" in (out / "report.md").read_text()
    assert (out / "checkpoints" / "step_000012" / "value" / "model.safetensors").exists()


@pytest.mark.slow
def test_killed_and_resumed_ppo_run_is_bit_equal(ppo_runs):
    a, b = ppo_runs
    assert_same_weights(a / "model.safetensors", b / "model.safetensors")
    assert_same_weights(
        a / "checkpoints/step_000012/value/model.safetensors", b / "checkpoints/step_000012/value/model.safetensors"
    )

    def records(out):
        return [{k: v for k, v in r.items() if k != "episodes_per_s"} for r in read_metrics(out / "metrics.jsonl")]

    assert records(b) == records(a)  # each update once, the same numbers


@pytest.mark.slow
def test_resumed_ppo_samples_jsonl_has_each_update_once(ppo_runs):
    """samples.jsonl is appended to: a resumed run must first drop what the killed run wrote
    after its checkpoint (as metrics.jsonl does), or those updates appear twice."""
    a, b = ppo_runs
    assert (b / "samples.jsonl").read_text() == (a / "samples.jsonl").read_text()
