"""One logger for every stage (metrics.jsonl always, wandb when asked) and the report.md writer."""

from __future__ import annotations

import json
from collections import defaultdict
import math
import os
from pathlib import Path

import torch

from .checkpoint import write_text_atomic


class Logger:
    """Appends every record to OUT/metrics.jsonl and mirrors it to wandb when a project is set.

    wandb never prompts: without WANDB_API_KEY (and no WANDB_MODE) it runs offline. On
    resume at step k, records from step k on are dropped (the resumed run logs them again), so
    the file reads as one clean run.
    Non-main ranks of a torchrun job log nothing.
    """

    def __init__(
        self,
        out_dir: str | Path,
        config: dict,
        *,
        project: str | None = None,
        run_name: str | None = None,
        resume_step: int | None = None,
        enabled: bool = True,
    ):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) < resume_step
            ]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None:
            self.path.write_text("")
        if project:
            import wandb

            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.wandb = wandb.init(
                project=project, name=run_name, config=config, dir=str(out_dir), mode=mode, resume="allow"
            )

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_curves(records: list[dict], keys: list[str], png: str | Path, title: str) -> bool:
    """One panel per key (value against step); False when none of the keys was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None and math.isfinite(r[key])]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def markdown_table(rows: list[dict], columns: list[str], max_chars: int = 300) -> str:
    def cell(value) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        text = text.replace("|", "\\|").replace("\n", "⏎ ")
        return text if len(text) <= max_chars else "…" + text[-max_chars:]

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def accuracy_by(chosen: torch.Tensor, rejected: torch.Tensor, groups: list) -> list[dict]:
    """Preference accuracy (chosen > rejected) and count per group value (confidence, policy
    pair, batch): the reward model's scores or DPO's implicit rewards."""
    correct = (chosen > rejected).tolist()
    by = defaultdict(list)
    for g, c in zip(groups, correct):
        by[str(g)].append(c)
    return [{"group": g, "n": len(v), "accuracy": sum(v) / len(v)} for g, v in sorted(by.items())]


def accuracy_tables(chosen: torch.Tensor, rejected: torch.Tensor, rows, groups: dict[str, str]) -> str:
    """One "By <title>:" accuracy table per column of `rows` in `groups` ({column: title})."""
    tables = (
        markdown_table(accuracy_by(chosen, rejected, rows[column]), ["group", "n", "accuracy"]) for column in groups
    )
    return "".join(f"By {title}:\n\n{table}\n\n" for title, table in zip(groups.values(), tables))


def config_table(config: dict) -> str:
    return markdown_table([{"field": k, "value": v} for k, v in config.items()], ["field", "value"])
