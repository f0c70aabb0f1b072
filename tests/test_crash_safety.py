"""SIGKILL at random moments, in the middle of writing a checkpoint too, never corrupts the last
good checkpoint, and `--resume` carries the run to the end (issue 9).

One smoke SFT run that saves a checkpoint every step is killed five times at seeded random
moments (some while it starts up, some a random time into training, some the instant a
checkpoint's temporary directory appears or its training_state.pt is being written) and resumed
each time. After every kill the newest checkpoint must load with the project's loader and with
plain `from_pretrained`; at the end the run finishes and its weights equal those of an
uninterrupted run, bit for bit.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from dgx_spark_summary_from_human_feedback.checkpoint import latest_checkpoint, load_state
from dgx_spark_summary_from_human_feedback.tracking import read_metrics

from .conftest import REPO

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}
STEPS = 40
ARGS = [
    "sft.py",
    "--preset",
    "smoke",
    "--eval-interval",
    "1",
    "--max-steps",
    str(STEPS),
    "--num-eval-samples",
    "2",
]  # a save every step
# (when to kill, seconds): "startup" = that long after launch; "training" = that long after the run's
# first new checkpoint; "save" = that long after a temporary checkpoint directory of this process
# appears; "state" = the instant its training_state.pt appears
TRIALS = [
    ("training", (0.2, 1.5)),
    ("save", (0.0, 0.0)),
    ("startup", (0.5, 3.0)),
    ("save", (0.002, 0.02)),
    ("state", (0.0, 0.0)),
]


def start(out: Path, log: Path, *extra: str) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, *ARGS, "--output-dir", str(out), *extra],
            cwd=REPO,
            env=ENV,
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def own_tmp_dirs(out: Path, pid: int) -> list[Path]:
    root = out / "checkpoints"
    return (
        [p for p in root.iterdir() if p.name.startswith(".tmp-step_") and p.name.endswith(f"-{pid}")]
        if root.exists()
        else []
    )


def newest_step(out: Path) -> int:
    last = latest_checkpoint(out)
    return int(last.name[len("step_") :]) if last else -1


def wait_for(proc: subprocess.Popen, condition, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while proc.poll() is None and not condition() and time.time() < deadline:
        time.sleep(0.001)


def kill(proc: subprocess.Popen, out: Path, when: str, delay: float) -> None:
    started_from = newest_step(out)
    if when == "startup":
        wait_for(proc, lambda: False, timeout=delay)
    elif when == "training":
        wait_for(proc, lambda: newest_step(out) > started_from)
        time.sleep(delay)
    elif when == "save":
        wait_for(proc, lambda: bool(own_tmp_dirs(out, proc.pid)))
        time.sleep(delay)
    else:  # "state"
        wait_for(proc, lambda: any((d / "training_state.pt").exists() for d in own_tmp_dirs(out, proc.pid)))
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def assert_loadable(step_dir: Path) -> int:
    """The checkpoint loads with the project's loader and with plain transformers; returns its step."""
    state = load_state(step_dir)
    assert {"optimizer", "rng", "step"} <= set(state), sorted(state)
    assert state["step"] == int(step_dir.name[len("step_") :])
    AutoModelForCausalLM.from_pretrained(str(step_dir))
    json.loads((step_dir / "run_config.json").read_text())
    return state["step"]


@pytest.mark.slow
def test_sigkill_at_random_moments_never_corrupts_the_last_checkpoint(tmp_path):
    rng = random.Random(9)
    out = tmp_path / "killed"
    reference = start(tmp_path / "uninterrupted", tmp_path / "uninterrupted.log")  # the same run, never killed
    try:
        step, killed_in_save = -1, []
        for trial, (when, (low, high)) in enumerate(TRIALS):
            log = tmp_path / f"trial{trial}.log"
            proc = start(out, log, *(["--resume"] if trial else []))
            if trial == 0:  # the first kill needs a checkpoint to protect
                wait_for(proc, lambda: newest_step(out) >= 1)
            kill(proc, out, when, rng.uniform(low, high))
            assert proc.returncode == -signal.SIGKILL, (
                f"trial {trial} ({when}) ended before the kill:\n{log.read_text()[-3000:]}"
            )
            killed_in_save.append(bool(own_tmp_dirs(out, proc.pid)))

            last = latest_checkpoint(out)
            assert last is not None, f"trial {trial} ({when}): no checkpoint left"
            new_step = assert_loadable(last)
            assert new_step >= step, (
                f"trial {trial} ({when}): the newest checkpoint went back from step {step} to {new_step}"
            )
            step = new_step
            best_file = out / "checkpoints" / "best.json"  # written after its step directory is in place
            best = (
                out / "checkpoints" / f"step_{json.loads(best_file.read_text())['step']:06d}"
                if best_file.exists()
                else last
            )
            if best != last:
                assert_loadable(best)
        assert any(killed_in_save), "no kill landed inside a checkpoint save"
        assert step < STEPS, "the kills came too late to interrupt the run"

        final = subprocess.run(
            [sys.executable, *ARGS, "--output-dir", str(out), "--resume"],
            cwd=REPO,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert final.returncode == 0, final.stderr[-3000:]
        assert f"resumed from {out / 'checkpoints' / f'step_{step:06d}'}" in final.stdout
        assert reference.wait(timeout=600) == 0, (tmp_path / "uninterrupted.log").read_text()[-3000:]
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()

    assert read_metrics(out / "metrics.jsonl")[-1]["step"] == STEPS
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")], (
        "a killed save's temporary directory was left behind"
    )
    killed = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    uninterrupted = AutoModelForCausalLM.from_pretrained(str(tmp_path / "uninterrupted")).state_dict()
    assert killed.keys() == uninterrupted.keys()
    for name, weight in killed.items():
        assert weight.equal(uninterrupted[name]), f"{name} differs from the uninterrupted run"
