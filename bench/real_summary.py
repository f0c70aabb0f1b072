#!/usr/bin/env python3
"""The tables of README's "A real small-model run (CPU)" from the outputs of bench/real_run.sh.

    python bench/real_summary.py out/real        # markdown on stdout (real_run.sh saves OUT/summary.md)

Reads only what the stages wrote (metrics.jsonl, samples.jsonl, the processed datasets): SFT
validation loss and samples at step 0 and the end, the reward model's accuracy with a 95% Wilson
interval beside "the longer summary wins" on the same pairs, PPO's curves per update, and the
evaluation's reward-model score and win rate against the references for base, SFT and PPO.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dgx_spark_summary_from_human_feedback.judge import wilson_interval  # noqa: E402
from dgx_spark_summary_from_human_feedback.tracking import read_metrics  # noqa: E402


def at(records: list[dict], key: str, step: int | None = None) -> float:
    values = [r[key] for r in records if key in r and (step is None or r["step"] == step)]
    return values[-1] if values else float("nan")


def first(records: list[dict], key: str) -> float:
    return next((r[key] for r in records if key in r), float("nan"))


def cut(text: str, n: int = 160) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= n else text[: n - 1] + "…"


def main(out: Path) -> None:
    lines = []
    # ---- SFT
    sft = read_metrics(out / "sft" / "metrics.jsonl")
    end = max(r["step"] for r in sft)
    lines += ["### SFT", "", "| | step 0 (base model) | end of SFT |", "|---|---|---|"]
    loss0, loss1 = at(sft, "val/loss", 0), at(sft, "val/loss", end)
    lines.append(f"| validation loss | {loss0:.3f} | {loss1:.3f} ({(loss1 - loss0) / loss0:+.1%}) |")
    for key, name in [("eval/rouge1", "ROUGE-1"), ("eval/rouge2", "ROUGE-2"), ("eval/rougeL", "ROUGE-L")]:
        lines.append(f"| {name} | {at(sft, key, 0):.3f} | {at(sft, key, end):.3f} |")
    lines.append(f"| samples ending in EOS | {1 - at(sft, 'eval/no_eos_rate', 0):.1%} | {1 - at(sft, 'eval/no_eos_rate', end):.1%} |")
    lines.append(f"| mean response length (tokens) | {at(sft, 'eval/response_length', 0):.1f} | {at(sft, 'eval/response_length', end):.1f} |")
    samples = [json.loads(x) for x in (out / "sft" / "samples.jsonl").read_text().splitlines()]
    lines += ["", f"n = {len(samples)} validation posts (the same posts at step 0 and the end).", "",
              "| post (start) | reference | base model | SFT |", "|---|---|---|---|"]  # fmt: skip
    for s in samples[:3]:
        post = s["query"].split("POST:", 1)[-1]
        lines.append(f"| {cut(post, 120)} | {cut(s['reference'])} | {cut(s.get('base model', ''))} | {cut(s['generation'])} |")

    # ---- reward model
    rm = read_metrics(out / "reward" / "metrics.jsonl")
    acc, low, high = at(rm, "eval/validation/accuracy"), at(rm, "eval/validation/accuracy_ci_low"), at(rm, "eval/validation/accuracy_ci_high")
    rule = at(rm, "eval/validation/length_rule_accuracy")
    saved = sorted((out / "reward" / "checkpoints").glob("*/run_config.json"))  # the run's config, saved with each checkpoint
    config = json.loads(saved[-1].read_text()) if saved else {}
    n = config.get("max_final_eval_rows") or "all"
    rule_ci = wilson_interval(rule * n, n) if isinstance(n, int) else (float("nan"), float("nan"))
    lines += ["", "### Reward model", "", "| | accuracy on held-back pairs | 95% CI |", "|---|---|---|",
              f"| during training, {config.get('num_eval_rows', '?')} pairs: step 0 -> end | {first(rm, 'val/accuracy'):.3f} -> {at(rm, 'val/accuracy'):.3f} | |",
              f"| reward model (n = {n}) | {acc:.3f} | [{low:.3f}, {high:.3f}] |",
              f"| \"the longer summary wins\" (same pairs) | {rule:.3f} | [{rule_ci[0]:.3f}, {rule_ci[1]:.3f}] |"]  # fmt: skip

    # ---- PPO
    ppo = read_metrics(out / "ppo" / "metrics.jsonl")
    lines += ["", "### PPO", "", "| update | score | KL | response length | no-EOS share |", "|---|---|---|---|---|"]
    for r in ppo:
        if "objective/scores" in r:
            lines.append(f"| {r['step']} | {r['objective/scores']:.3f} | {r['objective/kl']:.3f} | {r['response_length']:.1f} | {r['no_eos_share']:.2f} |")
    lines.append("\nUpdate 1's numbers are its rollouts, sampled before any optimizer step (the SFT policy).")

    # ---- evaluate
    by_policy = defaultdict(list)
    for line in (out / "eval" / "samples.jsonl").read_text().splitlines():
        r = json.loads(line)
        by_policy[r["policy"]].append(r)
    lines += ["", "### Evaluation (reward-model judge, same validation posts)", "",
              "| policy | RM score (reference = 0 on average) | RM win rate vs reference [95% CI] | mean length | ending in EOS | ROUGE-L |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for name, (path, records) in zip(["base", "SFT", "PPO"], by_policy.items()):
        k = len(records)
        wins = sum(r["rm_win"] for r in records)
        lo, hi = wilson_interval(wins, k)
        score = sum(r["score"] for r in records) / k
        lines.append(
            f"| {name} | {score:.3f} | {wins / k:.3f} [{lo:.3f}, {hi:.3f}] n={k} | {sum(r['length'] for r in records) / k:.1f} | "
            f"{sum(r['has_eos'] for r in records) / k:.1%} | {sum(r['rougeL'] for r in records) / k:.3f} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
