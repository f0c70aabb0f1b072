"""The offline pipeline end to end, then evaluate.py on its checkpoints: with a fake LLM judge over
HTTP (report, samples, cache), on the real TL;DR sample, and its one-line CLI errors."""

import json
import os
import random
import re
import subprocess
import sys

import pytest

from dgx_spark_summary_from_human_feedback import tiny
from dgx_spark_summary_from_human_feedback.judge import JUDGE_PROMPT

from .conftest import REAL_SAMPLE, REPO, needs_real_sample
from .fake_judge import FakeJudge, prefer

PKG = "dgx_spark_summary_from_human_feedback"
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "COLUMNS": "200",
}
# "0.500 [0.150, 0.850] (n=6, unparseable=0)": every win rate in evaluate's report
WIN_RATE = r"(\d\.\d{3}) \[(\d\.\d{3}), (\d\.\d{3})\] \(n=(\d+), unparseable=(\d+)\)"


def run_module(module, *args, env=ENV, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", f"{PKG}.{module}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    result = run_module(
        "pipeline", "--preset", "smoke", "--output-dir", str(out), timeout=1200
    )  # ~4 min alone on 2 cores; CI machines are shared
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# ---- the pipeline


@pytest.mark.slow
def test_smoke_pipeline_runs_every_stage_and_writes_one_report(pipeline_dir):
    for rel in (
        "sft/config.json",
        "reward/config.json",
        "ppo/config.json",
        "dpo/config.json",
        "grpo/config.json",
        "eval/report.md",
        "eval/samples.jsonl",
    ):
        assert (pipeline_dir / rel).stat().st_size > 0, rel
    report = (pipeline_dir / "report.md").read_text()
    assert "SFT vs PPO" in report and "offline smoke run" in report
    assert "| sft |" in report and "| ppo |" in report
    assert "[eval/report.md](eval/report.md)" in report
    first, last = map(float, re.search(r"SFT: validation loss ([\d.]+) -> ([\d.]+)", report).groups())
    assert last < first
    for stage in ("sft", "reward", "ppo", "dpo", "grpo", "evaluate"):
        assert re.search(rf"^\| {stage} \| \d+ \|$", report, re.M), stage
    samples = read_jsonl(pipeline_dir / "eval" / "samples.jsonl")
    assert {s["policy"] for s in samples} == {str(pipeline_dir / m) for m in ("sft", "ppo", "dpo", "grpo")}
    assert len(samples) == 4 * 16  # smoke: 16 validation posts per policy
    assert "## Head to head" in (pipeline_dir / "eval" / "report.md").read_text()


@pytest.mark.slow
def test_smoke_pipeline_compares_every_method_with_ci_and_against_ppo(pipeline_dir):
    """One table: SFT, PPO, DPO and GRPO on the same posts, each with its RM win rate (n, CI)
    and its win rate against PPO's summaries, which match the evaluation's own samples."""
    report = (pipeline_dir / "report.md").read_text()
    assert "## SFT vs PPO vs DPO vs GRPO" in report
    rate = r"(\d\.\d{3}) \[(\d\.\d{3}), (\d\.\d{3})\] n=(\d+)"
    rows = {
        m: re.search(rf"^\| {m} \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (-?[\d.]+) \| {rate} \| (.*) \|$", report, re.M)
        for m in ("sft", "ppo", "dpo", "grpo")
    }
    assert all(rows.values()), report
    samples = read_jsonl(pipeline_dir / "eval" / "samples.jsonl")
    by_policy = {m: [s for s in samples if s["policy"] == str(pipeline_dir / m)] for m in rows}
    for m, row in rows.items():
        assert int(row.group(8)) == 16
        assert float(row.group(6)) <= float(row.group(5)) <= float(row.group(7))
        assert float(row.group(3)) == pytest.approx(
            sum(not s["has_eos"] for s in by_policy[m]) / 16, abs=1e-3
        )  # no-EOS share (printed to 3 places)
        versus = row.group(9)
        if m == "ppo":
            assert versus == "-"
            continue
        wins = [
            1.0 if a["score"] > b["score"] else 0.5 if a["score"] == b["score"] else 0.0
            for a, b in zip(by_policy[m], by_policy["ppo"])
        ]
        assert [a["id"] for a in by_policy[m]] == [b["id"] for b in by_policy["ppo"]]  # the same posts
        assert float(re.match(rate, versus).group(1)) == pytest.approx(sum(wins) / 16, abs=1e-3)
    assert "- DPO: implicit-reward accuracy 0.000 ->" in report and "- GRPO: score" in report


# ---- evaluate with an LLM judge


@pytest.mark.slow
def test_evaluate_with_a_judge_reports_it_and_reruns_from_the_cache(pipeline_dir, tmp_path):
    out = tmp_path / "eval"
    env = {**ENV, "JUDGE_TEST_KEY": "sk-fake-123"}
    with FakeJudge() as server:
        args = [
            "--policy",
            str(pipeline_dir / "sft"),
            "--policy",
            str(pipeline_dir / "ppo"),
            "--reward-path",
            str(pipeline_dir / "reward"),
            "--dataset",
            str(tiny.SFT_DIR),
            "--num-samples",
            "6",
            "--judge-url",
            server.url,
            "--judge-model",
            "fake",
            "--judge-api-key-env",
            "JUDGE_TEST_KEY",
            "--head-to-head",
            "--output-dir",
            str(out),
        ]
        result = run_module("evaluate", *args, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        requests = server.count
        report = (out / "report.md").read_text()
        samples = read_jsonl(out / "samples.jsonl")
        rerun = run_module("evaluate", *args, env=env)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert server.count == requests  # every reply came from the cache
    assert 0 < requests <= 3 * 6  # two policies vs reference, one head to head, each 6 posts
    assert {s["authorization"] for s in server.seen} == {"Bearer sk-fake-123"}
    assert (out / "report.md").read_text() == report

    # the judge and its prompt stand next to every LLM win rate, with n and a CI
    judged = re.findall(
        rf"judge `fake` at `{re.escape(server.url)}` with the N\+ judge prompt \(below\), A/B order randomised \(seed "
        rf"(\d+)\): {WIN_RATE}",
        report,
    )
    # per policy vs reference (seed 0), then head to head: its own A/B seed, and the report says which
    assert [seed for seed, *_ in judged] == ["0", "0", "1"]
    for _, rate, low, high, n, unparseable in judged:
        assert float(low) <= float(rate) <= float(high) and (int(n), int(unparseable)) == (6, 0)
    rng = random.Random(0)  # the seed the report names for the comparisons with the reference
    swaps = [rng.random() < 0.5 for _ in range(6)]
    for policy in ("sft", "ppo"):
        assert [s["judge_swapped"] for s in samples if s["policy"] == str(pipeline_dir / policy)] == swaps
    assert f"## Judge prompt\n\n```\n{JUDGE_PROMPT}\n```" in report
    assert (
        len(re.findall(rf"judge reward model `{re.escape(str(pipeline_dir / 'reward'))}`.*: {WIN_RATE}", report)) == 3
    )

    # each recorded verdict is the fake judge's, mapped back through the A/B swap
    assert len(samples) == 12
    for policy, line in zip((pipeline_dir / "sft", pipeline_dir / "ppo"), judged):
        records = [s for s in samples if s["policy"] == str(policy)]
        assert len(records) == 6
        for s in records:
            assert s["judge_reply"].startswith("Comparison:") and isinstance(s["judge_swapped"], bool)
            a, b = (s["reference"], s["response"]) if s["judge_swapped"] else (s["response"], s["reference"])
            expected = prefer(JUDGE_PROMPT.format(post="", a=a, b=b)) == ("B" if s["judge_swapped"] else "A")
            assert s["judge_win"] == float(expected)
        assert float(line[1]) == pytest.approx(sum(s["judge_win"] for s in records) / 6, abs=5e-4)
    for path in out.iterdir():
        assert path.suffix == ".png" or "sk-fake-123" not in path.read_text(), path.name


@pytest.mark.slow
def test_evaluate_judges_every_policy_head_to_head_against_ppo(pipeline_dir, tmp_path):
    """--head-to-head-against: each other policy against PPO's summaries on the same posts, by the
    reward model and by the LLM judge, each with n and a CI, in the report and in the result."""
    out = tmp_path / "eval"
    policies = [pipeline_dir / m for m in ("sft", "ppo", "dpo", "grpo")]
    with FakeJudge() as server:
        args = [a for p in policies for a in ("--policy", str(p))]
        args += [
            "--head-to-head-against",
            str(pipeline_dir / "ppo"),
            "--reward-path",
            str(pipeline_dir / "reward"),
            "--dataset",
            str(tiny.SFT_DIR),
            "--num-samples",
            "4",
            "--judge-url",
            server.url,
            "--judge-model",
            "fake",
            "--output-dir",
            str(out),
        ]
        result = run_module("evaluate", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (out / "report.md").read_text()
    section = report.split(f"## Head to head against `{pipeline_dir / 'ppo'}`")[1].split("\n## ")[0]
    for m in ("sft", "dpo", "grpo"):
        rm_line = re.search(rf"- `{re.escape(str(pipeline_dir / m))}`, judge reward model .*: {WIN_RATE}", section)
        llm_line = re.search(rf"- `{re.escape(str(pipeline_dir / m))}`, judge `fake` .*: {WIN_RATE}", section)
        assert rm_line and llm_line, section
        assert int(rm_line.group(4)) == 4 and int(llm_line.group(4)) + int(llm_line.group(5)) == 4
        samples = [s for s in read_jsonl(out / "samples.jsonl") if s["policy"] == str(pipeline_dir / m)]
        ppo_samples = [s for s in read_jsonl(out / "samples.jsonl") if s["policy"] == str(pipeline_dir / "ppo")]
        wins = [
            1.0 if a["score"] > b["score"] else 0.5 if a["score"] == b["score"] else 0.0
            for a, b in zip(samples, ppo_samples)
        ]
        assert float(rm_line.group(1)) == pytest.approx(sum(wins) / 4, abs=1e-3)
    assert f"`{pipeline_dir / 'ppo'}`, judge" not in section  # not against itself


# ---- evaluate on real posts


@pytest.mark.slow
@needs_real_sample
def test_evaluate_on_the_real_sample_without_a_judge(pipeline_dir, tmp_path):
    out = tmp_path / "eval"
    dataset = REAL_SAMPLE / "sft.jsonl"
    result = run_module(
        "evaluate",
        "--policy",
        str(pipeline_dir / "sft"),
        "--dataset",
        str(dataset),
        "--num-samples",
        "8",
        "--output-dir",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert f"8 posts of `{dataset}` (validation)" in report and "ROUGE-1 / 2 / L" in report
    assert "Judge prompt" not in report and "win rate vs reference" not in report  # no judge asked for, none reported
    samples = read_jsonl(out / "samples.jsonl")
    rows = read_jsonl(dataset)[:8]
    assert [s["id"] for s in samples] == [r["id"] for r in rows]
    assert [s["reference"] for s in samples] == [r["summary"].strip() for r in rows]
    assert all(0.0 <= s["rougeL"] <= 1.0 and 0 < s["length"] <= 53 for s in samples)


# ---- bad input


@pytest.mark.parametrize(
    "args, message",
    [
        (["--judge-url", "http://127.0.0.1:9/v1"], "pass --judge-url and --judge-model together"),
        (["--head-to-head"], "--head-to-head needs two --policy checkpoints"),
    ],
)
def test_evaluate_bad_flags_are_one_line_errors(tmp_path, args, message):
    result = run_module(
        "evaluate", "--policy", str(tmp_path / "no_such_policy"), "--output-dir", str(tmp_path / "eval"), *args
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {message}"]


@pytest.mark.slow
def test_evaluate_judge_rejecting_the_key_is_a_one_line_error(pipeline_dir, tmp_path):
    # Fails while JudgeError derives from RuntimeError: cli.run turns only InputError into one line
    with FakeJudge(always_fail=401) as server:
        result = run_module(
            "evaluate",
            "--policy",
            str(pipeline_dir / "sft"),
            "--dataset",
            str(tiny.SFT_DIR),
            "--num-samples",
            "2",
            "--judge-url",
            server.url,
            "--judge-model",
            "fake",
            "--output-dir",
            str(tmp_path / "eval"),
        )
    assert server.count >= 1
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: judge {server.url}/chat/completions answered HTTP 401: check --judge-url, --judge-model and the API "
        "key variable"
    ]
