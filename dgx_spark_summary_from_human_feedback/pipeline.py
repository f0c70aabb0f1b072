"""The whole pipeline in one command: SFT -> reward model -> PPO -> evaluation -> one report.

    python -m dgx_spark_summary_from_human_feedback.pipeline --preset smoke   # offline, CPU, minutes
    python -m dgx_spark_summary_from_human_feedback.pipeline --preset spark   # the real recipe, one Spark
    python -m dgx_spark_summary_from_human_feedback.pipeline --preset spark --nproc-per-node 8

Each stage runs as its own process (`python sft.py ...`, or under torchrun), finds the previous
stage's output by name (OUT/sft, OUT/reward, OUT/ppo), and resumes if OUT/<stage> has
checkpoints (`--resume`), so a killed pipeline restarts where it stopped. Stage flags can be
added with --sft-args, --reward-args, --ppo-args (one string each).
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
from .tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]  # the stage scripts live at the repository root


@dataclass
class Config:
    preset: Literal["smoke", "spark"] = "smoke"
    """smoke: tiny models and bundled fixtures on CPU; spark: the full recipe on the Hub datasets"""
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
    eval_samples: int | None = None
    """validation posts per policy in the evaluation (smoke: 16, spark: 512)"""
    judge_url: str | None = None
    """optional OpenAI-compatible LLM judge for the evaluation"""
    judge_model: str | None = None
    """model name for --judge-url"""
    assets_dir: str | None = None
    """copy the report's figures here (README's assets/)"""


def run_stage(script: str, args: list[str], nproc: int) -> float:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    command = launcher + [str(REPO / script)] + args
    print("$ " + " ".join(shlex.quote(c) for c in command), flush=True)
    start = time.time()
    subprocess.run(command, check=True, cwd=REPO)
    return time.time() - start


def main(cfg: Config) -> None:
    out = Path(cfg.output_dir).resolve()
    sft, rm, ppo, ev = out / "sft", out / "reward", out / "ppo", out / "eval"
    preset = ["--preset", "smoke"] if cfg.preset == "smoke" else []

    def resume(stage_dir: Path) -> list[str]:
        return ["--resume"] if latest_checkpoint(stage_dir) else []

    times = {}
    times["sft"] = run_stage("sft.py", preset + ["--output-dir", str(sft)] + resume(sft) + shlex.split(cfg.sft_args), cfg.nproc_per_node)
    times["reward"] = run_stage("reward.py", preset + ["--sft-path", str(sft), "--output-dir", str(rm)] + resume(rm) + shlex.split(cfg.reward_args), cfg.nproc_per_node)
    times["ppo"] = run_stage("ppo.py", preset + ["--sft-path", str(sft), "--reward-path", str(rm), "--output-dir", str(ppo)] + resume(ppo) + shlex.split(cfg.ppo_args), cfg.nproc_per_node)
    start = time.time()
    result = evaluate.main(
        evaluate.Config(
            policy=[str(sft), str(ppo)], reward_path=str(rm), head_to_head=True, output_dir=str(ev),
            dataset=str(tiny.SFT_DIR) if cfg.preset == "smoke" else evaluate.Config.dataset,
            num_samples=cfg.eval_samples or (16 if cfg.preset == "smoke" else 512), judge_url=cfg.judge_url, judge_model=cfg.judge_model,
        )
    )  # fmt: skip
    times["evaluate"] = time.time() - start
    write_report(out, cfg, result, times)
    print(f"pipeline done: {out / 'report.md'}")


def write_report(out: Path, cfg: Config, result: dict, times: dict) -> None:
    label = " (offline smoke run: tiny random-init model on bundled fixtures; the numbers show the pipeline works, not summary quality)" if cfg.preset == "smoke" else ""
    sft_final = [r for r in read_metrics(out / "sft" / "metrics.jsonl") if "val/loss" in r]
    rm_final = read_metrics(out / "reward" / "metrics.jsonl")[-1]
    ppo_records = read_metrics(out / "ppo" / "metrics.jsonl")
    figures = {"sft/loss.png": "SFT loss", "reward/curves.png": "reward model training", "reward/calibration_validation.png": "reward model calibration",
               "ppo/curves.png": "PPO score, KL, length", "eval/winrate_vs_length.png": "win rate vs length", "eval/score_histogram.png": "score histogram"}  # fmt: skip
    lines = [f"# Pipeline report{label}\n", "| stage | wall time (s) |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in times.items()]
    lines += [
        "", "## Stages\n",
        f"- SFT: validation loss {sft_final[0]['val/loss']:.3f} -> {sft_final[-1]['val/loss']:.3f}" if sft_final else "- SFT: no validation loss logged",
        f"- reward model: validation accuracy {rm_final.get('eval/validation/accuracy', float('nan')):.3f}",
        f"- PPO: score {ppo_records[0]['objective/scores']:.3f} -> {ppo_records[-1]['objective/scores']:.3f}, KL {ppo_records[-1]['objective/kl']:.3f}" if ppo_records else "- PPO: no updates logged",
        "", "## SFT vs PPO (reward-model judge)\n", "| policy | ROUGE-L | mean length | RM score | win rate vs reference [95% CI] |", "|---|---|---|---|---|",
    ]  # fmt: skip
    for path, s in result["summary"].items():
        w = s.get("rm_win_rate", {})
        lines.append(f"| {Path(path).name} | {s['rougeL']:.3f} | {s['mean_length']:.1f} | {s.get('score', float('nan')):.3f} | {w.get('win_rate', float('nan')):.3f} [{w.get('ci_low', float('nan')):.3f}, {w.get('ci_high', float('nan')):.3f}] n={w.get('n', 0)} |")
    if "rm" in result["head_to_head"]:
        h = result["head_to_head"]["rm"]
        lines.append(f"\nSFT vs PPO head to head (reward-model judge): SFT wins {h['win_rate']:.3f} [{h['ci_low']:.3f}, {h['ci_high']:.3f}], n={h['n']}.")
    lines.append("\nFull evaluation: [eval/report.md](eval/report.md)\n")
    for rel, title in figures.items():
        if (out / rel).exists():
            lines.append(f"### {title}\n\n![{title}]({rel})\n")
            if cfg.assets_dir:
                Path(cfg.assets_dir).mkdir(parents=True, exist_ok=True)
                shutil.copy(out / rel, Path(cfg.assets_dir) / f"{cfg.preset}_{rel.replace('/', '_')}")
    (out / "report.md").write_text("\n".join(lines))


if __name__ == "__main__":
    cli.run(main, Config)
