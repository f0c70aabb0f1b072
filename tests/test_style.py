"""The shape ../shared/STYLE.md and issue 13 ask for, kept by a test: short functions outside the
stage mains, no formatter escapes, one home for each loss and step."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ["sft.py", "reward.py", "ppo.py", "dpo.py", "grpo.py"]
PRODUCT = [REPO / s for s in STAGES] + sorted((REPO / "dgx_spark_summary_from_human_feedback").glob("*.py"))
CODE = PRODUCT + sorted((REPO / "bench").glob("*.py"))
MAIN_LIMITS = {"ppo.py": 120}  # the other stage mains (and evaluate's) read top to bottom, unbounded


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_no_function_outside_the_stage_mains_is_longer_than_80_lines():
    long = []
    for path in CODE:
        for name, length in functions(path):
            is_main = name == "main" and (path.name in STAGES or path.name == "evaluate.py")
            limit = MAIN_LIMITS.get(path.name, 10**6) if is_main else 80
            if length > limit:
                long.append(f"{path.relative_to(REPO)}:{name} {length} lines (limit {limit})")
    assert not long, long


def test_the_formatter_carries_the_lines():
    skips = [
        f"{p.relative_to(REPO)}:{i}"
        for p in CODE
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if line.rstrip().endswith("# fmt: skip")
    ]
    assert not skips, skips


def test_each_loss_and_step_is_defined_once():
    """A loss or step re-typed elsewhere (a benchmark, another stage) would be timed or trained
    as yesterday's code the day the original changes."""
    names = [
        "train_step",
        "pairwise_loss",
        "ppo_losses",
        "ppo_update",
        "grpo_losses",
        "grpo_update",
        "dpo_loss",
        "rollout",
        "kl_rewards",
        "compute_advantages",
        "group_advantages",
    ]
    defined: dict[str, list[str]] = {name: [] for name in names}
    for path in CODE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in defined:
                defined[node.name].append(str(path.relative_to(REPO)))
    twice = {name: where for name, where in defined.items() if len(where) > 1 and name != "train_step"}
    assert not twice, twice
    # train_step: one per stage that trains on a fixed dataset (sft, reward, dpo), never in bench/
    assert sorted(defined["train_step"]) == ["dpo.py", "reward.py", "sft.py"], defined["train_step"]
    assert all(defined.values()), defined
