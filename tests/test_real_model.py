"""Real pretrained weights on real text (issue 14): SmolLM2-135M-Instruct on the real TL;DR sample.

What a random 2-layer model cannot show: a tokenizer whose pad is its EOS (`<|im_end|>`, id 2)
and an embedding with no spare row, so `[PAD]` must grow it by exactly one row; a chat-tuned
EOS that generation has to stop at; a 49k-row tied head; checkpoints that must load back with
plain `from_pretrained`. Each method's step runs once on it: SFT, the reward head, PPO, DPO on
real judged pairs, GRPO on groups of sampled responses. The model is built (or taken from its
cache) by `../shared/tools/real_model.sh` with this interpreter: a failed build fails these
tests, it never skips them. Cost: about two minutes of CPU once the model is cached.
"""

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import dpo
import grpo
import ppo
import sft
from dgx_spark_summary_from_human_feedback.checkpoint import export_final
from dgx_spark_summary_from_human_feedback.data import SFT_FEATURES, Lengths, encode, load_raw, load_tokenizer
from dgx_spark_summary_from_human_feedback.generation import summarize
from dgx_spark_summary_from_human_feedback.models import (
    get_pair_logprobs,
    get_score,
    load_policy,
    load_reward_model,
    response_logits,
)
from dgx_spark_summary_from_human_feedback.preprocess import process_comparisons, process_sft
from dgx_spark_summary_from_human_feedback.rollout import rollout as sample_rollout
from dgx_spark_summary_from_human_feedback.rollout import value_predictions
from dgx_spark_summary_from_human_feedback.training import (
    PAIR_COLUMNS,
    distribute,
    make_optimizer,
    pair_batch,
    setup_runtime,
)

from .conftest import REAL_SAMPLE, REPO

pytestmark = pytest.mark.slow

EOS, ROWS = 2, 49152  # <|im_end|>; embedding rows of SmolLM2 (= its vocabulary: no spare row)


@pytest.fixture(scope="module")
def model_dir():
    script = REPO.parent / "shared" / "tools" / "real_model.sh"
    result = subprocess.run(
        ["bash", str(script)], env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"building the real model failed:\n{result.stderr[-3000:]}"
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def real_tokenizer(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def policy(model_dir, real_tokenizer):
    torch.manual_seed(0)
    return load_policy(model_dir, real_tokenizer)


@pytest.fixture(scope="module")
def sft_rows(real_tokenizer):
    """32 real posts as our SFT columns, queries cut to 96 tokens to keep the forwards cheap."""
    raw = load_raw(str(REAL_SAMPLE / "sft.jsonl"), split="train", features=SFT_FEATURES)
    raw["train"] = raw["train"].select(range(32))
    return process_sft(raw, real_tokenizer, Lengths(query=96, response=53), long_response="truncate")["train"]


@pytest.fixture(scope="module")
def pair_rows(real_tokenizer):
    """The first 8 GPT-4-judged pairs of the same sample as our preference columns, queries cut to 96 tokens."""
    import datasets

    rows = [json.loads(line) for _, line in zip(range(8), (REAL_SAMPLE / "comparisons.jsonl").open())]
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
    return process_comparisons(raw, real_tokenizer, Lengths(query=96, response=64), long_response="truncate")["train"]


def test_pad_is_added_by_growing_the_embedding_by_exactly_one_row(model_dir, real_tokenizer, policy):
    raw = AutoTokenizer.from_pretrained(model_dir)
    assert raw.pad_token_id == raw.eos_token_id == EOS and len(raw) == ROWS  # the trap, and no spare row
    assert (
        real_tokenizer.pad_token == "[PAD]"
        and real_tokenizer.pad_token_id == ROWS
        and real_tokenizer.eos_token_id == EOS
    )
    plain = AutoModelForCausalLM.from_pretrained(model_dir)
    assert plain.get_input_embeddings().weight.shape[0] == ROWS
    grown = policy.get_input_embeddings().weight
    assert grown.shape[0] == ROWS + 1
    torch.testing.assert_close(
        grown[:ROWS], plain.get_input_embeddings().weight.float(), rtol=0, atol=0
    )  # old rows untouched
    assert policy.get_output_embeddings().weight.data_ptr() == grown.data_ptr()  # the head is still tied
    assert policy.config.pad_token_id == ROWS and policy.config.eos_token_id == EOS


def test_real_sample_keeps_eos_in_labels_and_never_confuses_it_with_padding(sft_rows, pair_rows, real_tokenizer):
    pad = real_tokenizer.pad_token_id
    for row in sft_rows:
        q, r, n = row["query_token_len"], row["reference_response_token_len"], row["query_reference_response_token_len"]
        assert (
            row["query_token"][: 96 - q] == [pad] * (96 - q) and EOS not in row["query_token"]
        )  # left padding is [PAD]
        labels = row["query_reference_response_token_response_label"]
        assert labels[n - 1] == EOS and labels[:q] == [-100] * q and set(labels[n:]) == {-100}  # EOS is learned
        assert pad not in labels
        assert row["query_reference_response_token"][n - 1] == EOS and set(
            row["query_reference_response_token"][n:]
        ) <= {pad}
        assert row["reference_response_token"][r - 1] == EOS and row["reference_response"].endswith("<|im_end|>")
    # the comparisons of the same sample, through the same tokenizer
    assert len(pair_rows) == 8
    for row in pair_rows:
        assert (
            row["chosen_token"][row["chosen_token_len"] - 1] == EOS
            and row["rejected_token"][row["rejected_token_len"] - 1] == EOS
        )


@pytest.fixture(scope="module")
def trained(policy, sft_rows, real_tokenizer):
    """A copy of the policy after 3 SFT steps (sft.train_step) on 4 real posts: (model, loss before, loss after)."""
    model = copy.deepcopy(policy).train()
    cfg = sft.Config(batch_size=4, micro_batch_size=4, train_on_query=False, grad_clip=1.0)
    runtime = setup_runtime("cpu", "fp32")
    columns = ["query_reference_response_token", "query_reference_response_token_len", "reference_response_token_len"]
    rows = sft_rows.select(range(4)).with_format("torch", columns=columns)
    loss_fn = distribute(model, sft.lm_loss_sum, runtime)
    optimizer = make_optimizer(
        list(model.parameters()),
        lr=1e-4,
        betas=(0.9, 0.95),
        weight_decay=0.0,
        eps=1e-8,
        kind="adamw",
        device=runtime.device,
    )
    before = sft.evaluate_loss(loss_fn, rows, 4, runtime)
    lengths, response_lengths = (
        list(sft_rows["query_reference_response_token_len"][:4]),
        list(sft_rows["reference_response_token_len"][:4]),
    )
    for step in range(3):
        sft.train_step(
            loss_fn, model, optimizer, rows, [0, 1, 2, 3], lengths, response_lengths, cfg, runtime, step, None
        )
    return model.eval(), before, sft.evaluate_loss(loss_fn, rows, 4, runtime)


def test_a_few_sft_steps_lower_the_loss(trained):
    _, before, after = trained
    assert 0.5 < before < 8 and after < 0.9 * before, (before, after)  # a real model's loss, not a random one's ~10.8


def test_generation_stops_at_the_chat_tuned_eos_and_pads_with_pad(policy, real_tokenizer):
    """The instruct model ends a chat turn with <|im_end|> = EOS = 2: our sampler keeps that token,
    counts it as the response's last, and fills the rest with [PAD], not with 2."""
    prompt = "<|im_start|>user\nReply with one word: what colour is the sky?<|im_end|>\n<|im_start|>assistant\n"
    samples = summarize(
        policy, real_tokenizer, [encode(real_tokenizer, prompt)] * 2, batch_size=2, max_new_tokens=24, temperature=0.0
    )
    for s in samples:
        assert s["has_eos"] and s["response_token"][-1] == EOS and EOS not in s["response_token"][:-1], s
        assert s["response"].strip() and "<|im_end|>" not in s["response"]


def real_query_responses(real_tokenizer, sft_rows, padding_side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two real query + reference rows of different lengths, padded with [PAD] on one side."""
    seqs = [
        row["query_reference_response_token"][: row["query_reference_response_token_len"]]
        for row in sft_rows.select([0, 5])
    ]
    T = max(map(len, seqs))
    pad = real_tokenizer.pad_token_id
    ids = [([pad] * (T - len(s)) + s) if padding_side == "left" else (s + [pad] * (T - len(s))) for s in seqs]
    mask = [
        ([0] * (T - len(s)) + [1] * len(s)) if padding_side == "left" else ([1] * len(s) + [0] * (T - len(s)))
        for s in seqs
    ]
    return torch.tensor(ids), torch.tensor(mask)


@torch.no_grad()
def test_reward_head_on_smollm2_is_read_at_the_eos_under_left_and_right_padding(model_dir, real_tokenizer, sft_rows):
    torch.manual_seed(0)
    reward_model = load_reward_model(model_dir, real_tokenizer, new_head=True).eval()
    assert reward_model.get_input_embeddings().weight.shape[0] == ROWS + 1
    left = get_score(reward_model, *real_query_responses(real_tokenizer, sft_rows, "left"))
    right = get_score(reward_model, *real_query_responses(real_tokenizer, sft_rows, "right"))
    torch.testing.assert_close(left, right, atol=1e-4, rtol=1e-4)
    for i, row in enumerate(sft_rows.select([0, 5])):  # each equals the score of its sequence alone, at its EOS
        ids = torch.tensor([row["query_reference_response_token"][: row["query_reference_response_token_len"]]])
        assert ids[0, -1] == EOS
        alone = reward_model.score(reward_model.model(input_ids=ids).last_hidden_state[:, -1]).squeeze()
        torch.testing.assert_close(left[i], alone.float(), atol=1e-4, rtol=1e-4)
        before_eos = reward_model.score(reward_model.model(input_ids=ids[:, :-1]).last_hidden_state[:, -1]).squeeze()
        assert abs(float(before_eos - alone)) > 1e-4  # reading one token early would be a different score


def test_one_ppo_update_on_smollm2_starts_at_ratio_one(model_dir, policy, real_tokenizer, sft_rows, tmp_path):
    """ppo.ppo_update on a real rollout: every ratio of the first minibatch is 1 (N+ detail 19),
    after-EOS positions are [PAD] and masked, the EOS itself is a real response token."""
    torch.manual_seed(0)
    reward_model = load_reward_model(model_dir, real_tokenizer, new_head=True).eval().requires_grad_(False)
    value_model, model = copy.deepcopy(reward_model).requires_grad_(True), copy.deepcopy(policy).train()
    rows = sft_rows.select(range(4))
    queries = torch.tensor(rows["query_token"])
    query_mask = (
        torch.arange(queries.shape[1])[None] >= (queries.shape[1] - torch.tensor(rows["query_token_len"]))[:, None]
    ).long()
    cfg = ppo.Config(
        batch_size=4, num_minibatches=2, micro_batch_size=2, ppo_epochs=1, lr=1e-5, response_length=24, temperature=0.7
    )
    batch = sample_rollout(
        model,
        model,
        lambda qr, am: get_score(reward_model, qr, am),
        queries,
        query_mask,
        real_tokenizer,
        value_model=value_model,
        response_length=cfg.response_length,
        temperature=cfg.temperature,
        no_eos_score=cfg.no_eos_score,
        generation_batch_size=4,
        forward_batch_size=4,
        generator=torch.Generator().manual_seed(0),
    )
    pad = real_tokenizer.pad_token_id
    for i in range(4):
        n = int(batch.response_mask[i].sum())
        row = batch.responses[i].tolist()
        if batch.has_eos[i]:
            assert row[n - 1] == EOS and set(row[n:]) <= {pad}
        else:
            assert n == cfg.response_length and float(batch.scores[i]) == cfg.no_eos_score
    runtime = setup_runtime("cpu", "fp32")
    adam = dict(lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-5, kind="adamw", device=runtime.device)
    models = ppo.Models(
        policy=model,
        value_model=value_model,
        ref_policy=None,
        score_fn=None,
        policy_logits=distribute(model, response_logits, runtime),
        value_fn=distribute(value_model, value_predictions, runtime),
        policy_optimizer=make_optimizer(list(model.parameters()), **adam),
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
        torch.Generator().manual_seed(1),
        0,
        tmp_path,
    )
    assert (
        abs(float(stats["ratio"][0]) - 1) < 1e-5
        and float(stats["approxkl"][0]) < 1e-8
        and float(stats["clipfrac"][0]) == 0
    )
    assert float(stats["approxkl"][1]) > 0  # the first step moved the policy, so the check above could fail


def test_dpo_on_smollm2_starts_at_ln2_shares_each_query_exactly_and_learns_the_judged_pairs(
    policy, pair_rows, tmp_path
):
    """dpo.py's step on real weights and real GPT-4-judged pairs: the shared-query forward gives the
    log-probs of two full rows; against itself as the reference the first loss is ln 2 with zero
    margins; one step on the same pairs raises the chosen-over-rejected margin."""
    model = copy.deepcopy(policy).train()
    runtime = setup_runtime("cpu", "fp32")
    rows = pair_rows.select(range(4)).with_format("torch", columns=PAIR_COLUMNS)
    with torch.no_grad():  # each query run once, both summaries on its KV cache == two full rows
        batch = pair_batch(rows[:], runtime.device)
        shared = get_pair_logprobs(model, *batch)
        full = get_pair_logprobs(model, *batch, share_prefix=False)
    torch.testing.assert_close(shared, full, atol=1e-4, rtol=1e-4)
    assert (shared[batch[3] == 0] == 0).all() and (shared[batch[3] == 1] < 0).all()  # 0 on padding only
    reference = dpo.reference_logprobs(model, rows, 4, runtime)  # (4, 2): the model before training
    cfg = dpo.Config(batch_size=4, micro_batch_size=4, beta=0.1, lr=2e-5, grad_clip=1.0)
    optimizer = make_optimizer(
        list(model.parameters()),
        lr=cfg.lr,
        betas=(0.9, 0.999),
        weight_decay=0.0,
        eps=1e-8,
        kind="adamw",
        device=runtime.device,
    )
    logprobs_fn = distribute(model, get_pair_logprobs, runtime)
    lengths = [int(q) + max(int(c), int(r)) for q, c, r in zip(*(rows[k] for k in PAIR_COLUMNS[1::2]))]
    steps = [
        dpo.train_step(
            logprobs_fn, model, optimizer, rows, list(range(4)), reference, lengths, cfg, runtime, k, tmp_path
        )
        for k in range(2)
    ]
    first, last = steps  # the second step's statistics are taken after the first update
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference
    assert abs(first["rewards/margins"]) < 1e-4
    assert last["rewards/margins"] > 0.5 and last["train/loss"] < math.log(2) - 0.1  # measured: 1.82, 0.162
    assert last["rewards/accuracies"] > 0.5


def test_one_grpo_update_on_smollm2_groups_its_responses_and_starts_at_ratio_one(
    model_dir, policy, real_tokenizer, tmp_path
):
    """grpo.py on real weights: 2 queries x 4 sampled responses are 2 groups of 4 consecutive
    rows; each group's advantages have mean 0; the first minibatch's ratios are 1 and its k3 term
    0 (the reference is the policy); the first optimizer step moves the second minibatch."""
    torch.manual_seed(0)
    reward_model = load_reward_model(model_dir, real_tokenizer, new_head=True).eval().requires_grad_(False)
    model, ref_policy = copy.deepcopy(policy).train(), copy.deepcopy(policy).eval().requires_grad_(False)
    runtime = setup_runtime("cpu", "fp32")
    cfg = grpo.Config(
        group_size=4,
        batch_size=8,
        num_minibatches=2,
        micro_batch_size=2,
        update_epochs=1,
        kl_in="loss",
        lr=1e-5,
        response_length=16,
        generation_batch_size=8,
        forward_batch_size=4,
    )
    adam = dict(lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-5, kind="adamw", device=runtime.device)
    models = grpo.Models(
        policy=model,
        ref_policy=ref_policy,
        score_fn=lambda qr, am: get_score(reward_model, qr, am),
        policy_logits=distribute(model, response_logits, runtime),
        optimizer=make_optimizer(list(model.parameters()), **adam),
    )
    # two real posts, each in the instruct model's chat turn asking for a short reply: as raw TL;DR
    # queries (before SFT) no response ends within 16 tokens, every score is the no-EOS penalty and
    # every advantage 0
    posts = [json.loads(line)["post"][:400] for _, line in zip(range(2), (REAL_SAMPLE / "sft.jsonl").open())]
    prompts = [
        encode(
            real_tokenizer,
            f"<|im_start|>user\nIn at most five words, what is this post about?\n\n{post}<|im_end|>\n"
            "<|im_start|>assistant\n",
        )
        for post in posts
    ]
    C = max(map(len, prompts))
    rows = {
        "query_token": torch.tensor([[real_tokenizer.pad_token_id] * (C - len(p)) + p for p in prompts]),
        "query_token_len": torch.tensor([len(p) for p in prompts]),
    }
    batch = grpo.grpo_rollout(models, rows, cfg, real_tokenizer, runtime, torch.Generator().manual_seed(0))
    C, pad = batch.context_length, real_tokenizer.pad_token_id
    assert batch.has_eos.any()
    groups = batch.query_responses[:, :C].view(2, 4, C)
    assert (groups == groups[:, :1]).all() and not torch.equal(groups[0, 0], groups[1, 0])  # a group = one query
    for i in range(8):
        n, row = int(batch.response_mask[i].sum()), batch.responses[i].tolist()
        if batch.has_eos[i]:
            assert row[n - 1] == EOS and set(row[n:]) <= {pad}
    advantages, returns, _, _ = grpo.returns_and_advantages(batch, cfg)
    torch.testing.assert_close(returns, batch.scores)  # kl_in="loss": the return is the score
    assert advantages.view(2, 4).mean(1).abs().max() < 1e-5 and advantages.abs().max() > 0
    stats = grpo.grpo_update(
        models.policy_logits,
        models.optimizer,
        list(model.parameters()),
        batch,
        advantages,
        batch.query_mask.sum(1),
        cfg,
        runtime,
        torch.Generator().manual_seed(1),
        0,
        tmp_path,
    )
    # 2 minibatches of 2 micro-batches: the first two entries come before any optimizer step
    assert (stats["ratio"][:2] - 1).abs().max() < 1e-5 and stats["approxkl"][:2].max() < 1e-8
    assert stats["k3_mean"][:2].abs().max() < 1e-6 and stats["clipfrac"][:2].max() == 0
    assert stats["approxkl"][2:].max() > 0  # the first step moved the policy, so the checks above could fail


@torch.no_grad()
def test_exported_checkpoints_load_with_plain_from_pretrained(trained, model_dir, real_tokenizer, sft_rows, tmp_path):
    model, _, _ = trained
    export_final(tmp_path / "sft", model, real_tokenizer)
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sft"))  # no project code
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "sft"))
    assert tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id == ROWS and tokenizer.eos_token_id == EOS
    assert plain.get_input_embeddings().weight.shape[0] == ROWS + 1 and plain.config.pad_token_id == ROWS
    ids, mask = real_query_responses(real_tokenizer, sft_rows, "right")
    torch.testing.assert_close(
        plain(input_ids=ids, attention_mask=mask).logits,
        model(input_ids=ids, attention_mask=mask).logits,
        atol=1e-4,
        rtol=1e-4,
    )

    torch.manual_seed(0)
    reward_model = load_reward_model(model_dir, real_tokenizer, new_head=True).eval()
    reward_model.config.score_bias = -0.25  # as reward.py's normalisation stores it
    export_final(tmp_path / "reward", reward_model, real_tokenizer)
    plain_rm = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "reward")).eval()
    assert (
        plain_rm.config.num_labels == 1 and plain_rm.config.score_bias == -0.25 and plain_rm.config.pad_token_id == ROWS
    )
    # HF pools at the last non-pad token: with [PAD] != EOS under right padding that is the EOS
    logits = plain_rm(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(
        logits + plain_rm.config.score_bias, get_score(reward_model, ids, mask), atol=1e-4, rtol=1e-4
    )
    assert dataclasses.is_dataclass(ppo.Config)
