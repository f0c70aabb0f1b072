"""The whole pipeline in one command: SFT -> reward model -> PPO / DPO / GRPO -> evaluation -> one report.

    python -m dgx_spark_summary_from_human_feedback.pipeline --preset smoke   # offline, CPU, minutes: all methods
    python -m dgx_spark_summary_from_human_feedback.pipeline --preset spark   # the real recipe, one Spark: PPO
    python -m dgx_spark_summary_from_human_feedback.pipeline --preset spark --methods ppo,dpo,grpo
    python -m dgx_spark_summary_from_human_feedback.pipeline --preset spark --nproc-per-node 8

Each stage runs as its own process (`python sft.py ...`, or under torchrun), finds the previous
stage's output by name (OUT/sft, OUT/reward, OUT/ppo, OUT/dpo, OUT/grpo), and resumes if
OUT/<stage> has checkpoints (`--resume`), so a killed pipeline restarts where it stopped. Stage
flags can be added with --sft-args, --reward-args, --ppo-args, --dpo-args, --grpo-args (one
string each). One evaluation compares SFT and every method's policy on the same posts, with the
same reward model and judge, each also head to head against PPO.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from . import cli, evaluate, tiny
from .checkpoint import latest_checkpoint
from .errors import InputError
from .tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]  # the stage scripts live at the repository root


@dataclass
class Config:
    preset: Literal["smoke", "quick", "spark"] = "smoke"
    """smoke: tiny models and bundled fixtures on CPU; quick: ~1 h on one Spark (Qwen2.5-0.5B, a slice of the Hub
    data, PPO); spark: the full recipe on the Hub datasets"""
    output_dir: str = "out/pipeline"
    """OUT/sft, OUT/reward, OUT/ppo, OUT/eval and the combined OUT/report.md"""
    nproc_per_node: int = 1
    """processes per stage (torchrun when > 1)"""
    sft_args: str = ""
    """extra flags for sft.py"""
    reward_args: str = ""
    """extra flags for reward.py"""
    ppo_args: str = ""
    """extra flags for ppo.py"""
    methods: str | None = None
    """comma-separated methods trained from SFT: ppo, dpo, grpo (smoke: all three; spark: ppo)"""
    dpo_args: str = ""
    """extra flags for dpo.py"""
    grpo_args: str = ""
    """extra flags for grpo.py (e.g. --advantage rloo)"""
    eval_samples: int | None = None
    """validation posts per policy in the evaluation (smoke: 16, quick: 256, spark: 512)"""
    judge_url: str | None = None
    """optional OpenAI-compatible LLM judge for the evaluation"""
    judge_model: str | None = None
    """model name for --judge-url"""
    assets_dir: str | None = None
    """copy the report's figures here (README's assets/)"""


def run_stage(script: str, args: list[str], nproc: int) -> float:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    command = launcher + [str(REPO / script)] + args
    print("$ " + " ".join(shlex.quote(c) for c in command), flush=True)
    start = time.time()
    subprocess.run(command, check=True, cwd=REPO)
    return time.time() - start


METHODS = ("ppo", "dpo", "grpo")


def main(cfg: Config) -> None:
    methods = [
        m.strip()
        for m in (cfg.methods or (",".join(METHODS) if cfg.preset == "smoke" else "ppo")).split(",")
        if m.strip()
    ]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InputError(f"--methods {cfg.methods!r}: pick from {', '.join(METHODS)} (comma-separated)")
    if cfg.preset == "quick" and methods != ["ppo"]:
        raise InputError(
            f"--preset quick sizes SFT, reward model and PPO only (not {', '.join(m for m in methods if m != 'ppo')}): "
            "drop --methods or use --preset spark"
        )
    out = Path(cfg.output_dir).resolve()
    sft, rm, ev = out / "sft", out / "reward", out / "eval"
    preset = ["--preset", cfg.preset] if cfg.preset in ("smoke", "quick") else []

    def resume(stage_dir: Path) -> list[str]:
        return ["--resume"] if latest_checkpoint(stage_dir) else []

    times = {}
    times["sft"] = run_stage(
        "sft.py", preset + ["--output-dir", str(sft)] + resume(sft) + shlex.split(cfg.sft_args), cfg.nproc_per_node
    )
    times["reward"] = run_stage(
        "reward.py",
        preset + ["--sft-path", str(sft), "--output-dir", str(rm)] + resume(rm) + shlex.split(cfg.reward_args),
        cfg.nproc_per_node,
    )
    inputs = {
        "ppo": ["--reward-path", str(rm)],
        "dpo": [],
        "grpo": ["--reward-path", str(rm)],
    }  # DPO learns from the comparisons alone
    extra = {"ppo": cfg.ppo_args, "dpo": cfg.dpo_args, "grpo": cfg.grpo_args}
    for m in methods:
        stage_dir = out / m
        times[m] = run_stage(
            f"{m}.py",
            preset
            + ["--sft-path", str(sft), *inputs[m], "--output-dir", str(stage_dir)]
            + resume(stage_dir)
            + shlex.split(extra[m]),
            cfg.nproc_per_node,
        )
    start = time.time()
    policies = [sft] + [out / m for m in methods]
    result = evaluate.main(
        evaluate.Config(
            policy=[str(p) for p in policies],
            reward_path=str(rm),
            head_to_head=len(policies) > 1,
            output_dir=str(ev),
            head_to_head_against=str(out / "ppo") if "ppo" in methods and len(methods) > 1 else None,
            dataset=str(tiny.SFT_DIR) if cfg.preset == "smoke" else evaluate.Config.dataset,
            num_samples=cfg.eval_samples or {"smoke": 16, "quick": 256}.get(cfg.preset, 512),
            judge_url=cfg.judge_url,
            judge_model=cfg.judge_model,
        )
    )
    times["evaluate"] = time.time() - start
    write_report(out, cfg, methods, result, times)
    print(f"pipeline done: {out / 'report.md'}")


def _rate(w: dict | None) -> str:
    """'0.625 [0.386, 0.815] n=16' or '-' when not measured."""
    if not w:
        return "-"
    return f"{w['win_rate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}] n={w['n']}"


FIGURES = {
    "sft/loss.png": "SFT loss",
    "reward/curves.png": "reward model training",
    "reward/calibration_validation.png": "reward model calibration",
    "ppo/curves.png": "PPO score, KL, length",
    "dpo/curves.png": "DPO loss and implicit-reward accuracy",
    "grpo/curves.png": "GRPO score, KL, length",
    "eval/winrate_vs_length.png": "win rate vs length",
    "eval/score_histogram.png": "score histogram",
}


def stage_lines(out: Path, methods: list[str]) -> list[str]:
    """One line per stage: how its headline metric moved."""
    sft_final = [r for r in read_metrics(out / "sft" / "metrics.jsonl") if "val/loss" in r]
    rm_final = read_metrics(out / "reward" / "metrics.jsonl")[-1]
    lines = [
        f"- SFT: validation loss {sft_final[0]['val/loss']:.3f} -> {sft_final[-1]['val/loss']:.3f}"
        if sft_final
        else "- SFT: no validation loss logged",
        f"- reward model: validation accuracy {rm_final.get('eval/validation/accuracy', float('nan')):.3f}",
    ]
    for m in methods:
        records = read_metrics(out / m / "metrics.jsonl")
        if m == "dpo":
            val = [r for r in records if "val/rewards/accuracies" in r]
            final = {k: v for r in records for k, v in r.items()}
            lines.append(
                f"- DPO: implicit-reward accuracy {val[0]['val/rewards/accuracies']:.3f} -> "
                f"{final.get('eval/validation/accuracy', float('nan')):.3f} (validation)"
                if val
                else "- DPO: no evaluation logged"
            )
        else:
            lines.append(
                f"- {m.upper()}: score {records[0]['objective/scores']:.3f} -> {records[-1]['objective/scores']:.3f}, "
                f"KL {records[-1]['objective/kl']:.3f}"
                if records
                else f"- {m.upper()}: no updates logged"
            )
    return lines


def write_report(out: Path, cfg: Config, methods: list[str], result: dict, times: dict) -> None:
    label = (
        " (offline smoke run: tiny random-init model on bundled fixtures; the numbers show the pipeline works, not "
        "summary quality)"
        if cfg.preset == "smoke"
        else ""
    )
    lines = [f"# Pipeline report{label}\n", "| stage | wall time (s) |", "|---|---|"] + [
        f"| {k} | {v:.0f} |" for k, v in times.items()
    ]
    lines += ["", "## Stages\n", *stage_lines(out, methods)]
    names = ["SFT"] + [m.upper() for m in methods]
    judge = f"LLM judge `{cfg.judge_model}`" if cfg.judge_url else None
    against = result.get("head_to_head_against") or {}
    header = "| policy | ROUGE-L | mean length | no-EOS share | RM score | RM win rate vs reference [95% CI] |"
    header += f" {judge} win rate vs reference |" if judge else ""
    header += " vs PPO, RM judge |" + (" vs PPO, LLM judge |" if judge else "") if against else ""
    lines += [
        "",
        f"## {' vs '.join(names)} (same posts, same reward model{', same judge' if judge else ''})\n",
        header,
        "|" + "---|" * header.count(" |"),
    ]
    for name, (path, s) in zip(names, result["summary"].items()):
        score = s.get("score", float("nan"))
        row = f"| {name.lower()} | {s['rougeL']:.3f} | {s['mean_length']:.1f} | {s['no_eos_rate']:.3f} | {score:.3f} |"
        row += f" {_rate(s.get('rm_win_rate'))} |"
        row += f" {_rate(s.get('judge_win_rate'))} |" if judge else ""
        if against:
            h = against.get(path, {})
            row += f" {_rate(h.get('rm'))} |" + (f" {_rate(h.get('judge'))} |" if judge else "")
        lines.append(row)
    if against:
        lines.append("\n'vs PPO': how often the policy's summary beats PPO's on the same post (ties count half).")
    if "rm" in result["head_to_head"]:
        h = result["head_to_head"]["rm"]
        lines.append(
            f"\nSFT vs {names[1]} head to head (reward-model judge): SFT wins {h['win_rate']:.3f} [{h['ci_low']:.3f}, "
            f"{h['ci_high']:.3f}], n={h['n']}."
        )
    lines.append("\nFull evaluation: [eval/report.md](eval/report.md)\n")
    for rel, title in FIGURES.items():
        if (out / rel).exists():
            lines.append(f"### {title}\n\n![{title}]({rel})\n")
            if cfg.assets_dir:
                Path(cfg.assets_dir).mkdir(parents=True, exist_ok=True)
                shutil.copy(out / rel, Path(cfg.assets_dir) / f"{cfg.preset}_{rel.replace('/', '_')}")
    (out / "report.md").write_text("\n".join(lines))


if __name__ == "__main__":
    cli.run(main, Config)
