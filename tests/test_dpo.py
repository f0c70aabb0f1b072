"""dpo.py: the loss and implicit rewards against a hand computation; the shared-prefix log-probs
against full rows (values and gradients); the cached reference log-probs against a live
forward; learning on the fixtures; the smoke run's outputs; kill-and-resume."""

import copy
import functools
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dgx_spark_summary_from_human_feedback import tiny
from dgx_spark_summary_from_human_feedback.data import Lengths, load_tokenizer
from dgx_spark_summary_from_human_feedback.models import get_pair_logprobs, load_policy
from dgx_spark_summary_from_human_feedback.preprocess import load_stage_data
from dgx_spark_summary_from_human_feedback.tracking import read_metrics
from dgx_spark_summary_from_human_feedback.training import PAIR_COLUMNS, setup_runtime

from .stage_fixtures import (  # noqa: F401
    assert_same_weights,
    load_script,
    run_killed_and_uninterrupted,
    sft_smoke_dir_fixture,
)

dpo = load_script("dpo")
FULL_ROW_COLUMNS = [
    *PAIR_COLUMNS,
    "query_chosen_token",
    "query_chosen_token_len",
    "query_rejected_token",
    "query_rejected_token_len",
]


# ---- the loss


def test_dpo_loss_and_implicit_rewards_equal_a_hand_computation():
    chosen, rejected = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0])
    ref_chosen, ref_rejected = torch.tensor([-11.0, -20.0]), torch.tensor([-11.0, -16.0])
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
    # row 1: r_c = 0.1 * (-10 + 11) = 0.1, r_r = 0.1 * (-12 + 11) = -0.1, loss = log(1 + e^-0.2)
    # row 2: r_c = 0, r_r = 0.1 * (-15 + 16) = 0.1, loss = log(1 + e^0.1)
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.1, 0.0]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-0.1, 0.1]))
    torch.testing.assert_close(losses, torch.tensor([math.log(1 + math.exp(-0.2)), math.log(1 + math.exp(0.1))]))
    assert abs(float(losses[0]) - 0.598138869) < 1e-6

    # conservative DPO: (1 - eps) * -log sigmoid(m) + eps * -log sigmoid(-m)
    smoothed, _, _ = dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1, label_smoothing=0.25)
    expected = [0.75 * math.log(1 + math.exp(-m)) + 0.25 * math.log(1 + math.exp(m)) for m in (0.2, -0.1)]
    torch.testing.assert_close(smoothed, torch.tensor(expected))


def test_dpo_loss_is_ln2_with_zero_rewards_when_policy_is_reference_and_its_gradient_pushes_the_pair_apart():
    chosen = torch.tensor([-7.0, -3.0], requires_grad=True)
    rejected = torch.tensor([-5.0, -9.0], requires_grad=True)
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(
        chosen, rejected, chosen.detach(), rejected.detach(), beta=0.05
    )
    torch.testing.assert_close(losses, torch.full((2,), math.log(2)))
    assert torch.equal(chosen_rewards, torch.zeros(2)) and torch.equal(rejected_rewards, torch.zeros(2))
    losses.sum().backward()
    torch.testing.assert_close(chosen.grad, torch.full((2,), -0.025))  # -beta * sigmoid(-0) = -beta / 2
    torch.testing.assert_close(rejected.grad, torch.full((2,), 0.025))


# ---- log-probs: each query once vs full rows, and the cached reference


@pytest.fixture(scope="module")
def pair_rows(tokenizer):
    ds = load_stage_data(str(tiny.COMPARISONS_FILE), tokenizer, "comparisons", ("train",), Lengths(512, 133))["train"]
    rows = ds.select(range(6)).with_format("torch", columns=FULL_ROW_COLUMNS)[:]
    assert not torch.equal(rows["chosen_token_len"], rows["rejected_token_len"])  # summaries of different lengths
    assert len(set(rows["query_token_len"].tolist())) > 1  # queries of different lengths: left padding
    return rows


@pytest.fixture(scope="module")
def policy(tiny_model_dir, tokenizer):
    return load_policy(str(tiny_model_dir), tokenizer)


def full_row_logprobs(model, rows: dict, key: str) -> torch.Tensor:
    """(B,) summed log-probs of each summary, each query+summary run alone, unpadded, through
    plain transformers."""
    sums = []
    for i in range(len(rows["query_token_len"])):
        n, q = int(rows[f"query_{key}_token_len"][i]), int(rows["query_token_len"][i])
        ids = rows[f"query_{key}_token"][i, :n][None]
        logprobs = model(input_ids=ids).logits[0, q - 1 : n - 1].float().log_softmax(-1)
        sums.append(logprobs.gather(1, ids[0, q:n, None]).sum())
    return torch.stack(sums)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_pair_logprobs_equal_full_rows_in_values_and_gradients(policy, pair_rows, share_prefix):
    """Each query once with both summaries on its KV cache (or two padded full rows): the DPO
    loss and its gradients equal those of every query+summary run alone."""
    runtime = setup_runtime("cpu", "fp32")
    ref = torch.tensor([[-50.0, -40.0]]).repeat(6, 1)  # any fixed reference: the gradient is the policy's
    policy.zero_grad()
    chosen, rejected = dpo.pair_logprobs(
        functools.partial(get_pair_logprobs, policy, share_prefix=share_prefix), pair_rows, runtime
    )
    losses, _, _ = dpo.dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta=0.5)
    losses.sum().backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()

    chosen_full, rejected_full = (
        full_row_logprobs(policy, pair_rows, "chosen"),
        full_row_logprobs(policy, pair_rows, "rejected"),
    )
    torch.testing.assert_close(chosen, chosen_full.detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(rejected, rejected_full.detach(), atol=1e-4, rtol=0)
    assert chosen.unique().numel() == 6  # the rows really differ
    losses_full, _, _ = dpo.dpo_loss(chosen_full, rejected_full, ref[:, 0], ref[:, 1], beta=0.5)
    losses_full.sum().backward()
    for name, p in policy.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    policy.zero_grad()


@torch.no_grad()
def test_pair_logprobs_are_zero_on_padding_and_per_token_equal_full_rows(policy, pair_rows):
    queries, query_mask, responses, response_mask = dpo.pair_batch(pair_rows, "cpu")
    logprobs = get_pair_logprobs(policy, queries, query_mask, responses, response_mask)  # (12, Tr)
    assert torch.all(logprobs[response_mask == 0] == 0)
    assert torch.all(logprobs[response_mask == 1] < 0)
    n, q = int(pair_rows["query_rejected_token_len"][2]), int(pair_rows["query_token_len"][2])
    ids = pair_rows["query_rejected_token"][2, :n][None]
    alone = policy(input_ids=ids).logits[0, q - 1 : n - 1].log_softmax(-1).gather(1, ids[0, q:n, None]).squeeze(1)
    torch.testing.assert_close(logprobs[5, : n - q], alone, atol=1e-5, rtol=0)  # row 5: the rejected summary of query 2


def test_cached_reference_logprobs_equal_a_live_reference_forward(policy, tokenizer):
    """`reference_logprobs` in micro-batches of mixed lengths equals the plain forward of each row."""
    ds = load_stage_data(str(tiny.COMPARISONS_FILE), tokenizer, "comparisons", ("train",), Lengths(512, 133))["train"]
    data = ds.select(range(10)).with_format("torch", columns=FULL_ROW_COLUMNS)
    cached = dpo.reference_logprobs(policy, data, 4, setup_runtime("cpu", "fp32"))  # (10, 2)
    with torch.no_grad():
        live = torch.stack(
            [full_row_logprobs(policy, data[:], "chosen"), full_row_logprobs(policy, data[:], "rejected")], 1
        )
    torch.testing.assert_close(cached, live, atol=1e-4, rtol=0)


def test_train_step_gives_the_same_update_for_any_micro_batch_split(policy, tokenizer, tmp_path):
    """The loss is summed over the batch and divided by the batch size: micro-batches of 2 and
    one micro-batch of 6 give the same step (a per-micro-batch mean would weight them apart)."""
    ds = load_stage_data(str(tiny.COMPARISONS_FILE), tokenizer, "comparisons", ("train",), Lengths(512, 133))["train"]
    train = ds.select(range(6)).with_format("torch", columns=PAIR_COLUMNS)
    lengths = [
        int(q) + max(int(c), int(r))
        for q, c, r in zip(train["query_token_len"], train["chosen_token_len"], train["rejected_token_len"])
    ]
    reference = torch.tensor(
        [[-60.0, -50.0], [-40.0, -45.0], [-70.0, -30.0], [-55.0, -52.0], [-35.0, -65.0], [-48.0, -47.0]]
    )
    runtime = setup_runtime("cpu", "fp32")
    weights, stats = [], []
    for micro in (2, 6):
        model = copy.deepcopy(policy)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        cfg = dpo.Config(batch_size=6, micro_batch_size=micro, beta=0.1, grad_clip=0.0)
        stats.append(
            dpo.train_step(
                functools.partial(get_pair_logprobs, model),
                model,
                optimizer,
                train,
                list(range(6)),
                reference,
                lengths,
                cfg,
                runtime,
                0,
                tmp_path,
            )
        )
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert stats[0]["grad_norm"] > 0
    assert stats[0]["grad_norm"] == pytest.approx(stats[1]["grad_norm"], rel=1e-4)
    assert stats[0]["train/loss"] == pytest.approx(stats[1]["train/loss"], rel=1e-5)
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], atol=1e-6, rtol=1e-5, msg=name)
    assert not torch.equal(
        weights[0]["model.embed_tokens.weight"], policy.model.embed_tokens.weight
    )  # the step moved them


# ---- the smoke run: learning, outputs, kill-and-resume


TRL_METRICS = [
    "train/loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "lr",
    "grad_norm",
]


@pytest.fixture(scope="module")
def dpo_runs(sft_smoke_dir, tmp_path_factory):
    """The smoke preset (24 steps) with an evaluation and checkpoint every 4: (uninterrupted,
    killed after checkpoint 8 and resumed) output directories."""
    root = tmp_path_factory.mktemp("dpo")
    a, b = root / "a", root / "b"
    killed_at = run_killed_and_uninterrupted(
        "dpo.py", ["--preset", "smoke", "--sft-path", sft_smoke_dir, "--eval-interval", 4], a, b, kill_at=8
    )
    assert 8 <= killed_at < 24
    return a, b


@pytest.mark.slow
def test_dpo_smoke_run_learns_the_preference(dpo_runs):
    records = read_metrics(dpo_runs[0] / "metrics.jsonl")
    val = [r for r in records if "val/rewards/accuracies" in r]
    assert val[0]["step"] == 0 and val[0]["val/rewards/accuracies"] == 0.0  # policy == reference: every reward is 0
    assert val[0]["val/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert val[-1]["val/rewards/accuracies"] >= 0.8, [r["val/rewards/accuracies"] for r in val]
    assert val[-1]["val/rewards/margins"] > 0.3
    final = records[-1]
    assert final["eval/validation/accuracy"] >= 0.8
    train = [r for r in records if "rewards/margins" in r]
    assert sum(r["rewards/margins"] for r in train[-4:]) > sum(r["rewards/margins"] for r in train[:4]) + 1.0


@pytest.mark.slow
def test_dpo_smoke_run_writes_a_plain_hf_policy_report_and_trl_metrics(dpo_runs, sft_smoke_dir):
    out = dpo_runs[0]
    for name in ("report.md", "curves.png", "curves_logps.png", "model.safetensors", dpo.REFERENCE_FILE):
        assert (out / name).stat().st_size > 0, name
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.architectures == ["Qwen2ForCausalLM"]
    train = [r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(24))
    for record in train:
        assert all(math.isfinite(record[k]) for k in TRL_METRICS), record
    report = (out / "report.md").read_text()
    assert (
        "### validation: implicit-reward accuracy" in report
        and "### validation_cnndm:" in report
        and "By confidence:" in report
    )


@pytest.mark.slow
def test_saved_reference_logprobs_are_the_sft_models(dpo_runs, sft_smoke_dir):
    """The reference file kept with the run holds the SFT model's log-probs of every train row."""
    saved = load_file(str(dpo_runs[0] / dpo.REFERENCE_FILE))
    tokenizer = load_tokenizer(str(sft_smoke_dir))
    ds = load_stage_data(
        str(tiny.COMPARISONS_FILE), tokenizer, "comparisons", ("train", "validation"), Lengths(512, 133)
    )
    assert saved["train"].shape == (len(ds["train"]), 2) and saved["validation"].shape == (len(ds["validation"]), 2)
    sft = load_policy(str(sft_smoke_dir), tokenizer)
    rows = ds["train"].select(range(0, 96, 12)).with_format("torch", columns=FULL_ROW_COLUMNS)[:]
    with torch.no_grad():
        live = torch.stack([full_row_logprobs(sft, rows, "chosen"), full_row_logprobs(sft, rows, "rejected")], 1)
    torch.testing.assert_close(saved["train"][0:96:12], live, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_killed_and_resumed_dpo_run_is_bit_equal(dpo_runs):
    a, b = dpo_runs
    assert_same_weights(a / "model.safetensors", b / "model.safetensors")
    assert_same_weights(a / dpo.REFERENCE_FILE, b / dpo.REFERENCE_FILE)

    def records(out):
        return [{k: v for k, v in r.items() if k != "pairs_per_s"} for r in read_metrics(out / "metrics.jsonl")]

    assert records(b) == records(a)  # each step once, the same numbers


def test_saved_reference_is_reused_only_for_the_same_data_and_sft_model(tmp_path):
    path = tmp_path / dpo.REFERENCE_FILE
    reference = {"train": torch.randn(5, 2), "validation": torch.randn(3, 2)}
    metadata = {
        "sft_path": "/x/sft",
        "train/rows": "5",
        "train/fingerprint": "abc",
        "validation/rows": "3",
        "validation/fingerprint": "def",
    }
    assert dpo.load_reference(path, metadata) is None  # nothing saved yet
    dpo.save_reference(path, reference, metadata)
    loaded = dpo.load_reference(path, metadata)
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)
    assert dpo.load_reference(path, {**metadata, "sft_path": "/y/sft"}) is None  # another SFT model
    assert dpo.load_reference(path, {**metadata, "train/fingerprint": "abd"}) is None  # other data
    assert [p.name for p in tmp_path.iterdir()] == [dpo.REFERENCE_FILE]  # no temporary file left
