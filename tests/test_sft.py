"""sft.py end to end on the tiny model: smoke run, kill-and-resume bit-equality, CLI errors and help."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dgx_spark_summary_from_human_feedback.tracking import read_metrics

from .conftest import REPO
from .test_models import sft

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "COLUMNS": "200",
}
SHORT = ["--preset", "smoke", "--max-steps", "24", "--eval-interval", "4", "--num-eval-samples", "2"]


def run_sft(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "sft.py", *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_smoke")
    result = run_sft("--preset", "smoke", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_smoke_run_learns_and_writes_a_loadable_model_and_report(smoke_dir):
    model = AutoModelForCausalLM.from_pretrained(str(smoke_dir))  # plain HF, no project code
    assert model.config.pad_token_id != model.config.eos_token_id
    for name in ("report.md", "loss.png", "metrics.jsonl", "samples.jsonl"):
        assert (smoke_dir / name).stat().st_size > 0, name
    val = [r["val/loss"] for r in read_metrics(smoke_dir / "metrics.jsonl") if "val/loss" in r]
    assert len(val) >= 3 and val[-1] < 0.7 * val[0]
    report = (smoke_dir / "report.md").read_text()
    assert "val/loss" in report and "eval/rouge1" in report and "![loss curves](loss.png)" in report
    checkpoints = sorted(p.name for p in (smoke_dir / "checkpoints").iterdir())
    assert checkpoints[-1] == "step_000060" and "best.json" in checkpoints


@pytest.mark.slow
def test_step_0_evaluates_the_base_model_and_the_report_shows_the_change(smoke_dir):
    """Issue 14: validation loss and the base model's samples at step 0, so the report shows
    step 0 -> end, not only the end point."""
    records = read_metrics(smoke_dir / "metrics.jsonl")
    start = {k: v for r in records if r["step"] == 0 for k, v in r.items()}
    for key in ("val/loss", "eval/rouge1", "eval/rougeL", "eval/no_eos_rate", "eval/response_length"):
        assert key in start, key
    report = (smoke_dir / "report.md").read_text()
    assert "| metric | step 0 (base model) | end |" in report
    assert f"| val/loss | {start['val/loss']:.4f} |" in report
    rows = [json.loads(line) for line in (smoke_dir / "samples.jsonl").read_text().splitlines()]
    assert all(r["base model"] is not None for r in rows) and "| base model |" in report


@pytest.mark.slow
def test_resume_with_a_changed_lr_is_a_one_line_error(smoke_dir):
    result = run_sft("--preset", "smoke", "--output-dir", str(smoke_dir), "--resume", "--lr", "1e-3")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: resume with a changed config (lr: 0.003 -> 0.001): rerun with the saved values or pass "
        "--allow-config-change"
    ]


def newest_step(out) -> int:
    root = out / "checkpoints"
    steps = [int(p.name[5:]) for p in root.iterdir() if p.name.startswith("step_")] if root.exists() else []
    return max(steps, default=-1)


@pytest.mark.slow
def test_killed_and_resumed_run_is_bit_equal_to_an_uninterrupted_one(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    uninterrupted = subprocess.Popen(
        [sys.executable, "sft.py", *SHORT, "--output-dir", str(a)],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with open(tmp_path / "b.log", "w") as log:
            killed = subprocess.Popen(
                [sys.executable, "sft.py", *SHORT, "--output-dir", str(b)], cwd=REPO, env=ENV, stdout=log, stderr=log
            )
            deadline = time.time() + 300
            while newest_step(b) < 8 and killed.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            killed.send_signal(signal.SIGKILL)
            assert killed.wait() == -signal.SIGKILL, (tmp_path / "b.log").read_text()[
                -2000:
            ]  # killed mid-run, not finished
        assert 8 <= newest_step(b) < 24 and not (b / "model.safetensors").exists()
        leftover = b / "checkpoints" / ".tmp-step_000016-999999"  # what a kill during a save leaves
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"partial")

        resumed = run_sft(*SHORT, "--output-dir", str(b), "--resume")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resumed from" in resumed.stdout
        assert uninterrupted.wait(timeout=600) == 0
    finally:
        if uninterrupted.poll() is None:
            uninterrupted.kill()
            uninterrupted.wait()

    weights_a, weights_b = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    assert not [p.name for p in (b / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    final_a, final_b = read_metrics(a / "metrics.jsonl")[-1], read_metrics(b / "metrics.jsonl")[-1]
    assert final_a["step"] == final_b["step"] == 24 and final_a["val/loss"] == final_b["val/loss"]
    # metrics.jsonl of the resumed run reads as one run: each (step, metric) once, as uninterrupted
    keys = lambda out: sorted(
        (r["step"], k) for r in read_metrics(out / "metrics.jsonl") for k in r if k not in ("step", "tokens_per_s")
    )  # noqa: E731
    assert keys(b) == keys(a)


@pytest.mark.slow
def test_help_documents_every_config_field():
    result = run_sft("--help", timeout=120)
    assert result.returncode == 0
    for f in fields(sft.Config):
        assert f"--{f.name.replace('_', '-')}" in result.stdout, f.name
    assert "--preset {spark,quick,smoke}" in result.stdout


def test_smoke_preset_names_only_config_fields():
    names = {f.name for f in fields(sft.Config)}
    for preset in sft.PRESETS.values():
        assert set(preset) <= names
        json.dumps(preset)  # plain values: they end up in the saved run config


# ---- sft.train_step, the step main() and bench/ run


def sft_train_steps(tiny_model_dir, tokenizer, rows, micro_batch_size: int, pad_to=None, steps: int = 1):
    """A fresh tiny policy after `steps` of `sft.train_step` over all of `rows`: (model, last stats)."""
    import functools

    from dgx_spark_summary_from_human_feedback.models import lm_loss_sum, load_policy
    from dgx_spark_summary_from_human_feedback.training import make_optimizer, setup_runtime

    runtime = setup_runtime("cpu", "fp32")
    cfg = sft.Config(batch_size=len(rows), micro_batch_size=micro_batch_size, lr=1e-3, grad_clip=1.0)
    model = load_policy(str(tiny_model_dir), tokenizer).train()
    optimizer = make_optimizer(
        list(model.parameters()),
        lr=cfg.lr,
        betas=cfg.betas,
        weight_decay=cfg.weight_decay,
        eps=cfg.eps,
        kind="adamw",
        device=runtime.device,
    )
    loss_fn = functools.partial(lm_loss_sum, model, pack=False if pad_to else None)
    lengths, response_lengths = (
        rows["query_reference_response_token_len"][:].tolist(),
        rows["reference_response_token_len"][:].tolist(),
    )
    for step in range(steps):
        stats = sft.train_step(
            loss_fn,
            model,
            optimizer,
            rows,
            list(range(len(rows))),
            lengths,
            response_lengths,
            cfg,
            runtime,
            step,
            "out",
            pad_to=pad_to,
        )
    return model, stats


def test_train_step_is_one_step_of_the_whole_batch_mean_for_any_micro_batch_split(tiny_model_dir, tokenizer):
    """The loss is the batch's summed response-token loss over its label count, whatever the
    micro-batches; so one step with micro-batches of 8 and of 3 (different padding) lands on the
    same weights, and padding every row to 575 columns (bench/'s baseline) changes nothing."""
    import datasets

    from dgx_spark_summary_from_human_feedback import tiny
    from dgx_spark_summary_from_human_feedback.data import load_raw
    from dgx_spark_summary_from_human_feedback.models import lm_loss_sum, load_policy
    from dgx_spark_summary_from_human_feedback.preprocess import process_sft

    raw = datasets.DatasetDict({"train": load_raw(str(tiny.SFT_DIR))["train"].select(range(8))})
    columns = ["query_reference_response_token", "query_reference_response_token_len", "reference_response_token_len"]
    rows = process_sft(raw, tokenizer, long_response="truncate")["train"].with_format("torch", columns=columns)
    ids, mask, labels = sft.sft_batch(rows[:], False, "cpu")
    loss_sum, n = lm_loss_sum(load_policy(str(tiny_model_dir), tokenizer), ids, mask, labels)
    whole, stats = sft_train_steps(tiny_model_dir, tokenizer, rows, 8)
    assert stats["train/loss"] == pytest.approx(float(loss_sum) / n, rel=1e-5)  # the loss before the step
    assert stats["tokens"] == int(rows["query_reference_response_token_len"][:].sum()) and stats["grad_norm"] > 0
    for other in (
        sft_train_steps(tiny_model_dir, tokenizer, rows, 3)[0],
        sft_train_steps(tiny_model_dir, tokenizer, rows, 3, pad_to=575)[0],
    ):
        for p1, p2 in zip(whole.parameters(), other.parameters()):  # Adam near eps: ~2e-5 of fp32 rounding; lr 1e-3
            torch.testing.assert_close(p1, p2, rtol=0, atol=1e-4)
