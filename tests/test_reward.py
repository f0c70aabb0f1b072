"""reward.py and the score it trains: where the score is read under any padding, the head's
init, one forward for a pair, the normalisation, the smoke run, eval-only, kill-and-resume."""

import functools
import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from dgx_spark_summary_from_human_feedback import tiny
from dgx_spark_summary_from_human_feedback.data import Lengths, load_tokenizer
from dgx_spark_summary_from_human_feedback.models import get_pair_scores, get_score, load_reward_model
from dgx_spark_summary_from_human_feedback.preprocess import load_stage_data
from dgx_spark_summary_from_human_feedback.tracking import read_metrics
from dgx_spark_summary_from_human_feedback.training import setup_runtime

from .conftest import REAL_SAMPLE
from .stage_fixtures import (  # noqa: F401
    assert_same_weights,
    load_script,
    reward_smoke_dir_fixture,
    run_killed_and_uninterrupted,
    run_stage,
    sft_smoke_dir_fixture,
)

reward = load_script("reward")
LENGTHS = [6, 11, 17, 9]  # query+response tokens per row, EOS last


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir, tokenizer):
    torch.manual_seed(0)
    model = load_reward_model(str(tiny_model_dir), tokenizer, new_head=True).eval()
    model.config.score_bias = 0.25  # a non-zero offset, so the tests see where it is added
    return model


def sequences(tokenizer, lengths=LENGTHS, seed=0) -> list[torch.Tensor]:
    """Random query+response ids ending with EOS; no EOS or [PAD] before it."""
    g = torch.Generator().manual_seed(seed)
    assert tokenizer.eos_token_id == 0 and tokenizer.pad_token_id == len(tokenizer) - 1
    return [
        torch.cat(
            [torch.randint(1, tokenizer.pad_token_id, (n - 1,), generator=g), torch.tensor([tokenizer.eos_token_id])]
        )
        for n in lengths
    ]


def pad(seqs: list[torch.Tensor], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, padded on `side`."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, cols], mask[i, cols] = s, 1
    return ids, mask


@torch.no_grad()
def head_at(model, seq: torch.Tensor, position: int) -> torch.Tensor:
    """The head applied by hand to one unpadded sequence's hidden state at `position` (raw: no bias)."""
    hidden = model.model(input_ids=seq[None]).last_hidden_state[0, position]
    return model.score(hidden).squeeze(-1)


# ---- where the score is read


@torch.no_grad()
def test_score_is_read_at_the_eos_under_left_and_right_padding(reward_model, tokenizer):
    seqs = sequences(tokenizer)
    right = get_score(reward_model, *pad(seqs, tokenizer.pad_token_id, "right"))
    left = get_score(reward_model, *pad(seqs, tokenizer.pad_token_id, "left"))
    alone = torch.cat([get_score(reward_model, s[None], torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
    by_hand = torch.stack([head_at(reward_model, s, len(s) - 1) for s in seqs]) + 0.25
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone, by_hand, atol=1e-5, rtol=0)
    assert right.unique().numel() == len(seqs)  # the rows really score differently


@torch.no_grad()
def test_pooling_by_pad_id_misses_the_eos_when_pad_is_eos_but_get_score_does_not(tiny_model_dir, tokenizer):
    raw = AutoTokenizer.from_pretrained(str(tiny.TOKENIZER_DIR))
    assert raw.pad_token_id == raw.eos_token_id  # Qwen2.5's trap
    torch.manual_seed(0)
    model = load_reward_model(str(tiny_model_dir), tokenizer, new_head=True).eval()
    model.config.pad_token_id = raw.pad_token_id  # what a run that kept pad == EOS would have
    seqs = sequences(tokenizer)
    ids, mask = pad(seqs, raw.pad_token_id, "right")
    hf = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)  # HF pools the last id != pad_id
    ours = get_score(model, ids, mask)  # no score_bias set: the raw score
    at_eos = torch.stack([head_at(model, s, len(s) - 1) for s in seqs])
    before_eos = torch.stack([head_at(model, s, len(s) - 2) for s in seqs])
    torch.testing.assert_close(ours, at_eos, atol=1e-5, rtol=0)
    torch.testing.assert_close(hf, before_eos, atol=1e-5, rtol=0)  # the classic bug: the token before EOS
    assert (hf - ours).abs().min() > 1e-4


@torch.no_grad()
def test_hf_pooling_agrees_with_get_score_with_our_pad_token_and_right_padding(reward_model, tokenizer):
    assert reward_model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    ids, mask = pad(sequences(tokenizer, seed=1), tokenizer.pad_token_id, "right")
    hf = reward_model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(
        hf, get_score(reward_model, ids, mask) - reward_model.config.score_bias, atol=1e-5, rtol=0
    )


def test_new_head_is_n_plus_init_and_has_no_offset(tiny_model_dir, tokenizer):
    weights = []
    for seed in range(5):
        torch.manual_seed(seed)
        model = load_reward_model(str(tiny_model_dir), tokenizer, new_head=True)
        assert model.config.score_bias == 0.0
        assert model.score.weight.shape == (1, model.config.hidden_size) and model.score.bias is None
        weights.append(model.score.weight.detach().flatten())
    w = torch.cat(weights)  # 5 x 64 draws
    expected_std = 1 / (model.config.hidden_size + 1) ** 0.5  # N+: 1/sqrt(d+1), not HF's 0.02
    assert abs(float(w.std()) / expected_std - 1) < 0.2
    assert abs(float(w.mean())) < 4 * expected_std / len(w) ** 0.5
    assert not torch.equal(weights[0], weights[1])


# ---- one forward for a pair


@pytest.mark.parametrize("share_prefix", [True, False])
def test_pair_scores_equal_separate_full_forwards_with_the_same_gradients(reward_model, tokenizer, share_prefix):
    """Each query once, both summaries on its KV cache (or two full rows): the same scores as
    `get_score` on each full query+summary, and the same gradients."""
    ds = load_stage_data(str(tiny.COMPARISONS_FILE), tokenizer, "comparisons", ("train",), Lengths(512, 133))["train"]
    rows = ds.select(range(6)).with_format(
        "torch",
        columns=[
            *reward.PAIR_COLUMNS,
            "query_chosen_token",
            "query_chosen_token_len",
            "query_rejected_token",
            "query_rejected_token_len",
        ],
    )[:]
    assert not torch.equal(rows["chosen_token_len"], rows["rejected_token_len"])  # different lengths in one batch
    assert len(set(rows["query_token_len"].tolist())) > 1  # and queries of different lengths (left padding)
    reward_model.zero_grad()
    chosen, rejected = reward.pair_scores(
        functools.partial(get_pair_scores, reward_model, share_prefix=share_prefix), rows, setup_runtime("cpu", "fp32")
    )
    (chosen - rejected).sum().backward()
    grads = {n: p.grad.clone() for n, p in reward_model.named_parameters() if p.grad is not None}
    reward_model.zero_grad()

    def separately(key: str) -> torch.Tensor:
        lengths = rows[f"query_{key}_token_len"]
        T = int(lengths.max())
        mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
        return get_score(reward_model, rows[f"query_{key}_token"][:, :T], mask)

    chosen_ref, rejected_ref = separately("chosen"), separately("rejected")
    torch.testing.assert_close(chosen, chosen_ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(rejected, rejected_ref.detach(), atol=1e-5, rtol=0)
    (chosen_ref - rejected_ref).sum().backward()
    for name, p in reward_model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    reward_model.zero_grad()


# ---- the smoke run


def final_metrics(out) -> dict:
    merged = {}
    for record in read_metrics(out / "metrics.jsonl"):
        merged.update(record)
    return merged


def validation_scores(model_dir, new_head: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) chosen and rejected scores of the smoke validation split, through reward.py's own
    scoring; with `new_head`, of `model_dir` under the head reward.py draws at its default seed."""
    tokenizer = load_tokenizer(str(model_dir))
    torch.manual_seed(reward.Config.seed)
    model = reward.load_reward_model(str(model_dir), tokenizer, new_head=new_head).eval()
    data = reward.load_stage_data(
        str(tiny.COMPARISONS_FILE), tokenizer, "comparisons", ("validation",), reward.Lengths(512, 133)
    )["validation"]
    rows = data.with_format("torch", columns=reward.PAIR_COLUMNS)
    return reward.score_split(functools.partial(get_pair_scores, model), rows, 8, setup_runtime("cpu", "fp32"))


@pytest.mark.slow
def test_smoke_run_learns_from_where_it_started(reward_smoke_dir, sft_smoke_dir):
    """Against the step-0 model (the SFT backbone and the head reward.py draws at its seed),
    not a fixed bar: depending on the seed that random head alone scores 0.0-0.96 accuracy on
    this split, but always with margins near 0 and a loss near log 2. Training must move both
    far, whatever the seed."""
    start, end = validation_scores(sft_smoke_dir, new_head=True), validation_scores(reward_smoke_dir, new_head=False)
    (accuracy0, margin0, loss0), (accuracy, margin, loss) = (
        (float((c > r).float().mean()), float((c - r).mean()), float(reward.pairwise_loss(c, r)) / len(c))
        for c, r in (start, end)
    )
    metrics = final_metrics(reward_smoke_dir)  # the run's own final evaluation is what we scored
    assert accuracy == pytest.approx(metrics["eval/validation/accuracy"]) and margin == pytest.approx(
        metrics["eval/validation/margin"], abs=1e-3
    )
    step0 = next(r for r in read_metrics(reward_smoke_dir / "metrics.jsonl") if r["step"] == 0 and "val/accuracy" in r)
    assert step0["val/accuracy"] == pytest.approx(accuracy0) and step0["val/margin"] == pytest.approx(
        margin0, abs=1e-4
    )  # and its step-0 one
    assert abs(margin0) < 0.5 and abs(loss0 - math.log(2)) < 0.1, (margin0, loss0)  # the start is untrained
    assert loss < loss0 / 4, (loss0, loss)
    assert margin > margin0 + 2.0, (margin0, margin)
    assert accuracy >= accuracy0 and accuracy >= 0.9, (accuracy0, accuracy)


@pytest.mark.slow
def test_step_0_accuracy_is_logged_and_reported_beside_the_length_rule(reward_smoke_dir):
    """Issue 14: the untrained head's validation accuracy at step 0, step 0 -> end in the report,
    and the final accuracy with its 95% interval beside "the longer summary wins"."""
    records = read_metrics(reward_smoke_dir / "metrics.jsonl")
    assert any(r["step"] == 0 and "val/accuracy" in r for r in records)
    final = [r for r in records if "eval/validation/accuracy" in r][-1]
    assert (
        final["eval/validation/accuracy_ci_low"]
        <= final["eval/validation/accuracy"]
        <= final["eval/validation/accuracy_ci_high"]
    )
    assert 0.0 <= final["eval/validation/length_rule_accuracy"] <= 1.0
    report = (reward_smoke_dir / "report.md").read_text()
    assert "step 0 " in report and "-> end" in report and '"the longer summary wins"' in report


@pytest.mark.slow
def test_smoke_run_saves_a_plain_hf_reward_model(reward_smoke_dir):
    metrics = final_metrics(reward_smoke_dir)
    model = AutoModelForSequenceClassification.from_pretrained(str(reward_smoke_dir))  # plain HF, no project code
    assert model.config.num_labels == 1 and model.score.out_features == 1
    config = json.loads((reward_smoke_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"] and "auto_map" not in config
    assert config["score_bias"] == pytest.approx(-metrics["norm/reference_mean_before"], abs=1e-5)
    for name in ("report.md", "calibration_validation.png", "curves.png", "model.safetensors"):
        assert (reward_smoke_dir / name).stat().st_size > 0, name
    report = (reward_smoke_dir / "report.md").read_text()
    assert "eval/validation/accuracy" in report and "![calibration](calibration_validation.png)" in report


@pytest.mark.slow
def test_reference_summaries_score_zero_on_average_after_normalisation(reward_smoke_dir):
    metrics = final_metrics(reward_smoke_dir)
    assert abs(metrics["norm/reference_mean_after"]) < 0.01
    assert abs(metrics["norm/reference_mean_before"]) > 0.1  # there was an offset to remove

    # independently: score the SFT train references with the saved model
    tokenizer = load_tokenizer(str(reward_smoke_dir))
    model = load_reward_model(str(reward_smoke_dir), tokenizer)
    columns = ["query_reference_response_token", "query_reference_response_token_len"]
    sft = load_stage_data(str(tiny.SFT_DIR), tokenizer, "sft", ("train",), Lengths(512, 63))["train"].with_format(
        "torch", columns=columns
    )
    scores = reward.reference_scores(model, sft, 8, setup_runtime("cpu", "fp32"))
    assert len(scores) == metrics["norm/rows"]
    assert abs(float(scores.mean())) < 0.01
    # and the raw score of plain HF (no offset) is the mean before normalisation
    hf = AutoModelForSequenceClassification.from_pretrained(str(reward_smoke_dir)).eval()
    rows = sft[:16]
    T = int(rows["query_reference_response_token_len"].max())
    mask = (torch.arange(T)[None, :] < rows["query_reference_response_token_len"][:, None]).long()
    with torch.no_grad():
        raw = hf(input_ids=rows["query_reference_response_token"][:, :T], attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(raw + hf.config.score_bias, scores[:16], atol=1e-4, rtol=0)


# ---- eval-only


@pytest.mark.slow
@pytest.mark.skipif(
    not (REAL_SAMPLE / "comparisons.jsonl").exists(), reason=f"real TL;DR sample not found at {REAL_SAMPLE}"
)
def test_eval_only_on_gpt4_judged_real_pairs(reward_smoke_dir, tmp_path):
    out = tmp_path / "eval"
    run_stage(
        "reward.py",
        "--eval-only",
        "--reward-path",
        reward_smoke_dir,
        "--dataset",
        REAL_SAMPLE / "comparisons.jsonl",
        "--output-dir",
        out,
        "--max-final-eval-rows",
        "64",
    )
    report = (out / "report.md").read_text()
    assert "labels: GPT-4 verdicts" in report
    assert "(n=64," in report
    # the numbers are the saved model's on those 64 pairs (not, say, a fresh head's), scored here independently
    tokenizer = load_tokenizer(str(reward_smoke_dir))
    model = reward.load_reward_model(str(reward_smoke_dir), tokenizer).eval()
    data = reward.load_stage_data(
        str(REAL_SAMPLE / "comparisons.jsonl"), tokenizer, "comparisons", ("validation",), reward.Lengths(512, 133)
    )["validation"]
    rows = data.select(range(64)).with_format("torch", columns=reward.PAIR_COLUMNS)
    chosen, rejected = reward.score_split(
        functools.partial(get_pair_scores, model), rows, 8, setup_runtime("cpu", "fp32")
    )
    assert final_metrics(out)["eval/validation/accuracy"] == pytest.approx(float((chosen > rejected).float().mean()))
    assert final_metrics(out)["eval/validation/margin"] == pytest.approx(float((chosen - rejected).mean()), abs=1e-4)
    assert (out / "calibration_validation.png").stat().st_size > 0
    assert not (out / "model.safetensors").exists()  # evaluation writes no model


@pytest.mark.slow  # a whole stage run
def test_eval_only_writes_beside_the_run_and_leaves_the_run_alone(tiny_model_dir, tokenizer, tmp_path):
    """README's `--eval-only --reward-path out/reward` without --output-dir: the report goes to
    out/reward-eval; the reward run's own metrics.jsonl and report.md stay as they were."""
    rm = tmp_path / "reward"
    torch.manual_seed(0)
    load_reward_model(str(tiny_model_dir), tokenizer, new_head=True).save_pretrained(rm)
    tokenizer.save_pretrained(rm)
    before = {name: "training run's " + name for name in ("metrics.jsonl", "report.md")}
    for name, text in before.items():
        (rm / name).write_text(text)
    validation = [
        line for line in tiny.COMPARISONS_FILE.read_text().splitlines() if json.loads(line)["split"] != "train"
    ][:4]
    (tmp_path / "pairs.jsonl").write_text("\n".join(validation) + "\n")
    run_stage("reward.py", "--eval-only", "--reward-path", rm, "--dataset", tmp_path / "pairs.jsonl", "--device", "cpu")
    assert {name: (rm / name).read_text() for name in before} == before
    assert "# Reward model evaluation" in (tmp_path / "reward-eval" / "report.md").read_text()
    assert "eval/validation/accuracy" in final_metrics(tmp_path / "reward-eval")


def test_eval_only_with_a_policy_checkpoint_is_a_one_line_error(tiny_model_dir, tmp_path):
    validation = [
        line for line in tiny.COMPARISONS_FILE.read_text().splitlines() if json.loads(line)["split"] != "train"
    ][:4]
    (tmp_path / "pairs.jsonl").write_text("\n".join(validation) + "\n")
    result = run_stage(
        "reward.py",
        "--eval-only",
        "--reward-path",
        tiny_model_dir,
        "--dataset",
        tmp_path / "pairs.jsonl",
        "--output-dir",
        tmp_path / "e",
        check=False,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "not a reward model" in last and str(tiny_model_dir) in last


# ---- kill and resume


RESUME_ARGS = ["--preset", "smoke", "--max-steps", "24", "--eval-interval", "4"]


@pytest.fixture(scope="module")
def resumed_reward_runs(sft_smoke_dir, tmp_path_factory):
    """(uninterrupted, killed after checkpoint 8 and resumed) output directories."""
    root = tmp_path_factory.mktemp("reward_resume")
    a, b = root / "a", root / "b"
    killed_at = run_killed_and_uninterrupted("reward.py", [*RESUME_ARGS, "--sft-path", sft_smoke_dir], a, b, kill_at=8)
    assert 8 <= killed_at < 24
    return a, b


@pytest.mark.slow
def test_killed_and_resumed_reward_run_is_bit_equal(resumed_reward_runs):
    a, b = resumed_reward_runs
    assert_same_weights(a / "model.safetensors", b / "model.safetensors")
    config_a, config_b = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert config_a["score_bias"] == config_b["score_bias"]
    final_a, final_b = final_metrics(a), final_metrics(b)
    assert final_a["eval/validation/accuracy"] == final_b["eval/validation/accuracy"]
    assert final_a["norm/reference_mean_before"] == final_b["norm/reference_mean_before"]


@pytest.mark.slow
def test_resumed_reward_metrics_read_as_one_clean_run(resumed_reward_runs):
    """metrics.jsonl of the resumed run: the same (step, metric) records as the uninterrupted
    run, each once, with the same training losses."""
    a, b = resumed_reward_runs

    def records(out):
        return [
            (r["step"], k, r[k])
            for r in read_metrics(out / "metrics.jsonl")
            for k in sorted(r)
            if k not in ("step", "tokens_per_s")
        ]

    assert records(b) == records(a)


def test_pairwise_loss_and_train_step(tiny_model_dir, tokenizer):
    """`pairwise_loss` is -log sigmoid(chosen - rejected) summed; `reward.train_step` reports its
    batch mean and accuracy before the step, and micro-batches of 3 or 8 give the same update."""
    from dgx_spark_summary_from_human_feedback.models import disable_dropout
    from dgx_spark_summary_from_human_feedback.training import make_optimizer

    chosen, rejected = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])
    expected = -sum(math.log(1 / (1 + math.exp(-(c - r)))) for c, r in zip(chosen.tolist(), rejected.tolist()))
    assert float(reward.pairwise_loss(chosen, rejected)) == pytest.approx(expected)
    runtime = setup_runtime("cpu", "fp32")
    data = reward.load_stage_data(
        str(tiny.COMPARISONS_FILE), tokenizer, "comparisons", ("train",), reward.Lengths(512, 133)
    )["train"]
    train = data.with_format("torch", columns=reward.PAIR_COLUMNS)
    pair_lengths = [
        q + max(c, r) for q, c, r in zip(data["query_token_len"], data["chosen_token_len"], data["rejected_token_len"])
    ]
    models, results = [], []
    for micro_batch_size in (8, 3):  # 3, 3, 2: a per-micro-batch mean would weight the last more
        cfg = reward.Config(batch_size=8, micro_batch_size=micro_batch_size, lr=1e-3)
        torch.manual_seed(0)
        model = reward.load_reward_model(str(tiny_model_dir), tokenizer, new_head=True).train()
        disable_dropout(model)
        optimizer = make_optimizer(
            list(model.parameters()),
            lr=cfg.lr,
            betas=(0.9, 0.999),
            weight_decay=0.0,
            eps=1e-8,
            kind="adamw",
            device=runtime.device,
        )
        before = reward.score_split(functools.partial(get_pair_scores, model), train.select(range(8)), 8, runtime)
        results.append(
            (
                reward.train_step(
                    functools.partial(get_pair_scores, model),
                    model,
                    optimizer,
                    train,
                    list(range(8)),
                    pair_lengths,
                    cfg,
                    runtime,
                    0,
                    "out",
                ),
                before,
            )
        )
        models.append(model)
    for stats, (c, r) in results:
        assert stats["train/loss"] == pytest.approx(float(reward.pairwise_loss(c, r)) / 8, rel=1e-4)
        assert stats["train/accuracy"] == pytest.approx(float((c > r).float().mean()))
    for p1, p2 in zip(*(m.parameters() for m in models)):  # Adam near eps: fp32 rounding up to ~2% of lr
        torch.testing.assert_close(p1, p2, rtol=0, atol=1e-4)
