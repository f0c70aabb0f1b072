"""What the reward and PPO tests share: stage subprocesses, kill-and-resume, the smoke SFT and
reward runs (once per session), importing a stage script, and an EOS-prone tiny policy."""

import copy
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dgx_spark_summary_from_human_feedback.checkpoint import step_dirs

REPO = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "COLUMNS": "200",
}


def load_script(name: str):
    """A stage script at the repo root (reward.py, ppo.py), imported by path."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# stage subprocesses


def _env(threads: int) -> dict:
    # One intra-op thread: on a shared 2-core machine torch's default of 2 threads spins against
    # the other processes and runs these tiny models several times slower; it also lets the two
    # runs of a kill-and-resume comparison share the cores, with the same float reductions.
    return {**ENV, "OMP_NUM_THREADS": str(threads)}


def run_stage(
    script: str, *args, threads: int = 1, check: bool = True, timeout: int = 600
) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` in the repo root; with `check`, a non-zero exit fails with stderr's tail."""
    result = subprocess.run(
        [sys.executable, script, *map(str, args)],
        cwd=REPO,
        env=_env(threads),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check:
        assert result.returncode == 0, (
            f"{script} {' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr[-3000:]}"
        )
    return result


def start_stage(script: str, *args, log: Path, threads: int = 1) -> subprocess.Popen:
    """The same, in the background; output goes to `log` (a pipe nobody reads could block it)."""
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, script, *map(str, args)], cwd=REPO, env=_env(threads), stdout=f, stderr=subprocess.STDOUT
        )


def newest_step(out_dir: Path) -> int:
    dirs = step_dirs(out_dir)
    return int(dirs[-1].name[len("step_") :]) if dirs else -1


def newest_logged_step(out_dir: Path) -> int:
    path = out_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return max(
        (json.loads(line)["step"] for line in lines if line.endswith("}")), default=-1
    )  # skip a line being written


def kill_after_checkpoint(
    proc: subprocess.Popen, out_dir: Path, step: int, log: Path, progress=newest_logged_step, timeout: float = 540
) -> int:
    """SIGKILL `proc` once checkpoint `step` (or a later one) is complete and the run has got past
    it (`progress(out_dir)`, by default the newest step in metrics.jsonl, is beyond the checkpoint:
    the resumed run must drop what was written since); returns the newest checkpoint's step."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        newest = newest_step(out_dir)
        if newest >= step and progress(out_dir) > newest:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
    return newest_step(out_dir)


def run_killed_and_uninterrupted(
    script: str, args: list, a: Path, b: Path, kill_at: int, progress=newest_logged_step
) -> int:
    """Run `args` into `a` uninterrupted and, beside it, into `b` killed after checkpoint
    `kill_at` (see `kill_after_checkpoint`) and rerun with --resume. Returns the checkpoint
    step `b` resumed from."""
    uninterrupted = start_stage(script, *args, "--output-dir", a, log=a.with_suffix(".log"))
    killed = start_stage(script, *args, "--output-dir", b, log=b.with_suffix(".log"))
    try:
        killed_at = kill_after_checkpoint(killed, b, kill_at, b.with_suffix(".log"), progress)
        assert not (b / "model.safetensors").exists(), "the killed run already exported its final model"
        resumed = run_stage(script, *args, "--output-dir", b, "--resume")
        assert "resumed from" in resumed.stdout
        assert uninterrupted.wait(timeout=600) == 0, a.with_suffix(".log").read_text()[-3000:]
    finally:
        for proc in (uninterrupted, killed):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return killed_at


def assert_same_weights(file_a: Path, file_b: Path) -> None:
    weights_a, weights_b = load_file(str(file_a)), load_file(str(file_b))
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), f"{name} differs between {file_a} and {file_b}"


# ---------------------------------------------------------------------------------------------
# the smoke runs every later stage starts from, once per session (import the *_fixture names
# into a test module to use the fixtures there)


@pytest.fixture(scope="session", name="sft_smoke_dir")
def sft_smoke_dir_fixture(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft_smoke")
    run_stage("sft.py", "--preset", "smoke", "--output-dir", out)
    return out


@pytest.fixture(scope="session", name="reward_smoke_dir")
def reward_smoke_dir_fixture(tmp_path_factory, sft_smoke_dir) -> Path:
    out = tmp_path_factory.mktemp("reward_smoke")
    run_stage("reward.py", "--preset", "smoke", "--sft-path", sft_smoke_dir, "--output-dir", out)
    return out


# ---------------------------------------------------------------------------------------------
# a random policy that ends its responses


def eos_prone(model, eos_token_id: int, boost: float):
    """A copy of a tiny causal LM whose every next-token distribution favours EOS.

    A random tiny model samples EOS about once in 800 tokens, so without this every response
    would run to the length limit. Residual dimension 0 is made a constant 1 (every embedding
    row has 1 there, no layer writes to it), so the final hidden state is positive along it;
    with tied embeddings the EOS row's 1 + `boost` lifts the EOS logit above the rest.
    """
    model = copy.deepcopy(model)
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        assert embedding is model.get_output_embeddings().weight  # tied, as in Qwen2.5
        embedding[:, 0] = 1.0
        embedding[eos_token_id, 0] = 1.0 + boost
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
    return model
