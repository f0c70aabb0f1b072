#!/usr/bin/env python3
"""The tables of README's "A real small-model run (CPU)" from the outputs of bench/real_run.sh.

    python bench/real_summary.py out/real        # markdown on stdout (real_run.sh saves OUT/summary.md)

Reads only what the stages wrote (metrics.jsonl, samples.jsonl, the processed datasets): SFT validation
loss and samples at step 0 and the end, the reward model's accuracy with a 95% Wilson interval beside "the
longer summary wins" on the same pairs, PPO's curves per update, and the evaluation's reward-model score and
win rate against the references for base, SFT and PPO.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main(out: Path) -> None:
    # ---- SFT
    sft = read_metrics(out / "sft" / "metrics.jsonl")
    end = max(r["step"] for r in sft)
    lines = ["### SFT", "", "| | step 0 (base model) | end of SFT |", "|---|---|---|"]
    loss0, loss1 = at(sft, "val/loss", 0), at(sft, "val/loss", end)
    lines.append(row("validation loss", f"{loss0:.3f}", f"{loss1:.3f} ({(loss1 - loss0) / loss0:+.1%})"))
    for key, name in [("eval/rouge1", "ROUGE-1"), ("eval/rouge2", "ROUGE-2"), ("eval/rougeL", "ROUGE-L")]:
        lines.append(row(name, f"{at(sft, key, 0):.3f}", f"{at(sft, key, end):.3f}"))
    lines.append(row("samples ending in EOS", *(f"{1 - at(sft, 'eval/no_eos_rate', s):.1%}" for s in (0, end))))
    lines.append(row("mean response length (tokens)", *(f"{at(sft, 'eval/response_length', s):.1f}" for s in (0, end))))
    samples = [json.loads(x) for x in (out / "sft" / "samples.jsonl").read_text().splitlines()]
    lines += ["", f"n = {len(samples)} validation posts (the same posts at step 0 and the end).", ""]
    lines += ["| post (start) | reference | base model | SFT |", "|---|---|---|---|"]
    for s in samples[:3]:
        post = s["query"].split("POST:", 1)[-1]
        lines.append(row(cut(post, 120), cut(s["reference"]), cut(s.get("base model", "")), cut(s["generation"])))

    # ---- reward model
    rm = read_metrics(out / "reward" / "metrics.jsonl")
    acc, low, high = (at(rm, f"eval/validation/accuracy{k}") for k in ("", "_ci_low", "_ci_high"))
    rule = at(rm, "eval/validation/length_rule_accuracy")
    saved = sorted((out / "reward" / "checkpoints").glob("*/run_config.json"))  # saved with each checkpoint
    config = json.loads(saved[-1].read_text()) if saved else {}
    n = config.get("max_final_eval_rows") or "all"
    rule_ci = wilson_interval(rule * n, n) if isinstance(n, int) else (float("nan"), float("nan"))
    lines += ["", "### Reward model", "", "| | accuracy on held-back pairs | 95% CI |", "|---|---|---|"]
    during = f"during training, {config.get('num_eval_rows', '?')} pairs: step 0 -> end"
    lines.append(f"| {during} | {first(rm, 'val/accuracy'):.3f} -> {at(rm, 'val/accuracy'):.3f} | |")
    lines.append(row(f"reward model (n = {n})", f"{acc:.3f}", f"[{low:.3f}, {high:.3f}]"))
    lines.append(row('"the longer summary wins" (same pairs)', f"{rule:.3f}", f"[{rule_ci[0]:.3f}, {rule_ci[1]:.3f}]"))

    # ---- PPO
    ppo = read_metrics(out / "ppo" / "metrics.jsonl")
    lines += ["", "### PPO", "", "| update | score | KL | response length | no-EOS share |", "|---|---|---|---|---|"]
    for r in (r for r in ppo if "objective/scores" in r):
        scores, kl = f"{r['objective/scores']:.3f}", f"{r['objective/kl']:.3f}"
        lines.append(row(r["step"], scores, kl, f"{r['response_length']:.1f}", f"{r['no_eos_share']:.2f}"))
    lines.append("\nUpdate 1's numbers are its rollouts, sampled before any optimizer step (the SFT policy).")

    # ---- evaluate
    by_policy = defaultdict(list)
    for line in (out / "eval" / "samples.jsonl").read_text().splitlines():
        by_policy[json.loads(line)["policy"]].append(json.loads(line))
    lines += ["", "### Evaluation (reward-model judge, same validation posts)", ""]
    lines.append(
        row("policy", "RM score (reference = 0 on average)", "RM win rate vs reference [95% CI]", "mean length")
    )
    lines[-1] += " ending in EOS | ROUGE-L |"
    lines.append("|---|---|---|---|---|---|")
    for name, records in zip(["base", "SFT", "PPO"], by_policy.values()):
        k, wins = len(records), sum(r["rm_win"] for r in records)
        lo, hi = wilson_interval(wins, k)
        mean = {key: sum(r[key] for r in records) / k for key in ("score", "length", "has_eos", "rougeL")}
        win_rate = f"{wins / k:.3f} [{lo:.3f}, {hi:.3f}] n={k}"
        cells = [
            f"{mean['score']:.3f}",
            win_rate,
            f"{mean['length']:.1f}",
            f"{mean['has_eos']:.1%}",
            f"{mean['rougeL']:.3f}",
        ]
        lines.append(row(name, *cells))
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
