"""NaN/Inf guard: a diverging run stops before applying the update, naming step, terms and checkpoint."""

import re

import pytest
import torch
from safetensors.torch import load_file

from .stage_fixtures import reward_smoke_dir_fixture, run_stage, sft_smoke_dir_fixture  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow
SMOKE = ["--preset", "smoke", "--eval-interval", "2", "--num-eval-samples", "2"]


def one_line_error(result) -> str:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    return lines[0]


def test_sft_divergence_stops_and_names_the_last_good_checkpoint(tmp_path):
    run_stage("sft.py", *SMOKE, "--max-steps", "4", "--output-dir", tmp_path)
    good = load_file(str(tmp_path / "checkpoints" / "step_000004" / "model.safetensors"))
    # resume the finished run with an absurd learning rate: the next update overflows to NaN
    result = run_stage(
        "sft.py",
        *SMOKE,
        "--max-steps",
        "8",
        "--resume",
        "--allow-config-change",
        "--lr",
        "1e30",
        "--output-dir",
        tmp_path,
        check=False,
    )
    line = one_line_error(result)
    assert re.search(r"step [5-7]: non-finite training values \(train/loss=nan, grad_norm=nan\)", line), line
    assert "Last good checkpoint:" in line and "step_00000" in line and "--resume" in line
    # the checkpoint it names is intact: the guard stops before the bad update is saved
    named = line.split("Last good checkpoint: ")[1].split(";")[0]
    weights = load_file(f"{named}/model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert all(
        torch.equal(good[k], load_file(str(tmp_path / "checkpoints" / "step_000004" / "model.safetensors"))[k])
        for k in good
    )


def test_reward_and_ppo_divergence_stop_with_one_line(tmp_path, sft_smoke_dir, reward_smoke_dir):
    line = one_line_error(
        run_stage(
            "reward.py",
            *SMOKE[:4],
            "--max-steps",
            "4",
            "--lr",
            "1e30",
            "--sft-path",
            sft_smoke_dir,
            "--output-dir",
            tmp_path / "rm",
            check=False,
        )
    )
    assert "non-finite training values (train/loss=nan" in line
    line = one_line_error(
        run_stage(
            "ppo.py",
            "--preset",
            "smoke",
            "--lr",
            "1e30",
            "--total-episodes",
            "48",
            "--sft-path",
            sft_smoke_dir,
            "--reward-path",
            reward_smoke_dir,
            "--output-dir",
            tmp_path / "ppo",
            check=False,
        )
    )
    assert re.search(r"step \d+: non-finite training values \(loss/policy=nan", line), line
