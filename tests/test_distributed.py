"""Real multi-process runs on CPU with gloo: torchrun with two processes equals one process.

Gradient clipping is off (`--grad-clip 0`) and every step's logged gradient norm is compared too:
Adam normalises a gradient's scale away, so a gradient mis-scaled by the number of processes
would leave the weights almost unchanged and show only there.
"""

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dgx_spark_summary_from_human_feedback.models import load_policy, load_reward_model
from dgx_spark_summary_from_human_feedback.tracking import read_metrics

from .conftest import REPO
from .stage_fixtures import eos_prone

pytestmark = pytest.mark.slow
SMOKE = ["--preset", "smoke", "--max-steps", "6", "--eval-interval", "3"]
NO_CLIP = ["--grad-clip", "0"]


def run(script, *args, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    result = subprocess.run(
        launcher + [str(REPO / script), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_close(a_dir, b_dir, atol):
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def assert_same_grad_norms(a_dir, b_dir):
    """Every step's logged (pre-clip, all-reduced) gradient norm agrees between the two runs."""
    a, b = ([r["grad_norm"] for r in read_metrics(d / "metrics.jsonl") if "grad_norm" in r] for d in (a_dir, b_dir))
    assert len(a) == len(b) == 6
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-3, atol=0)


@pytest.fixture(scope="module")
def sft_single(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft1")
    run("sft.py", *SMOKE, *NO_CLIP, "--num-eval-samples", "2", "--output-dir", str(out))
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_sft_two_processes_match_one(tmp_path, sft_single, strategy):
    run(
        "sft.py",
        *SMOKE,
        *NO_CLIP,
        "--num-eval-samples",
        "2",
        "--strategy",
        strategy,
        "--output-dir",
        str(tmp_path),
        nproc=2,
    )
    assert_close(sft_single, tmp_path, atol=1e-5)
    assert_same_grad_norms(sft_single, tmp_path)
    one, two = ((d / "metrics.jsonl").read_text().splitlines() for d in (sft_single, tmp_path))
    assert len(two) == len(one)  # only rank 0 logs


@pytest.fixture(scope="module")
def reward_single(tmp_path_factory, sft_single):
    out = tmp_path_factory.mktemp("reward1")
    run("reward.py", *SMOKE, *NO_CLIP, "--sft-path", str(sft_single), "--output-dir", str(out))
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_reward_two_processes_match_one(tmp_path, sft_single, reward_single, strategy):
    run(
        "reward.py",
        *SMOKE,
        *NO_CLIP,
        "--sft-path",
        str(sft_single),
        "--strategy",
        strategy,
        "--output-dir",
        str(tmp_path),
        nproc=2,
    )
    assert_close(reward_single, tmp_path, atol=1e-4)  # Adam's first steps amplify float reordering
    assert_same_grad_norms(reward_single, tmp_path)


def test_sft_resume_under_two_processes_is_exact(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ["--preset", "smoke", "--eval-interval", "3", "--num-eval-samples", "2"]
    run("sft.py", *args, "--max-steps", "6", "--output-dir", str(straight), nproc=2)
    run("sft.py", *args, "--max-steps", "3", "--output-dir", str(resumed), nproc=2)
    run("sft.py", *args, "--max-steps", "6", "--resume", "--output-dir", str(resumed), nproc=2)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ppo_update_on_a_fixed_rollout_two_processes_match_one(tmp_path, tokenizer, tiny_model_dir):
    """`ppo.ppo_update` (tests/ppo_update_worker.py): the whole rollout in one process against
    half of it in each of two, at the same global batch, with SGD so the weights show the
    gradient's scale. Responses end at different lengths, so the processes hold unequal token
    counts: the loss must be the mean over the minibatch's tokens across processes."""
    policy_dir, value_dir = tmp_path / "policy", tmp_path / "value"
    eos_prone(load_policy(str(tiny_model_dir), tokenizer), tokenizer.eos_token_id, 0.4).save_pretrained(policy_dir)
    torch.manual_seed(0)
    load_reward_model(str(tiny_model_dir), tokenizer, new_head=True).save_pretrained(value_dir)
    for d in (policy_dir, value_dir):
        tokenizer.save_pretrained(d)
    run("tests/ppo_update_worker.py", str(policy_dir), str(value_dir), str(tmp_path / "one"))
    run("tests/ppo_update_worker.py", str(policy_dir), str(value_dir), str(tmp_path / "two"), nproc=2)
    one, two = (load_file(str(tmp_path / d / "weights.safetensors")) for d in ("one", "two"))
    lengths = one.pop("response_tokens")
    assert torch.equal(lengths, two.pop("response_tokens"))  # the same rollout in both
    assert lengths[0::2].sum() != lengths[1::2].sum(), lengths  # the two shares hold different token counts
    start = {f"policy.{k}": v for k, v in load_file(str(policy_dir / "model.safetensors")).items()}
    moved = max(float((one[k] - start[k]).abs().max()) for k in start if k in one)
    assert moved > 1e-3  # the update did something
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=0, msg=k)


def test_grpo_update_on_a_fixed_rollout_two_processes_match_one(tmp_path, tokenizer, tiny_model_dir):
    """`grpo.grpo_update` as the PPO test above: unequal token counts per process must give the
    one-process update (the minibatch's token count is summed over processes)."""
    policy_dir = tmp_path / "policy"
    eos_prone(load_policy(str(tiny_model_dir), tokenizer), tokenizer.eos_token_id, 0.4).save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    for out, nproc in (("one", 1), ("two", 2)):
        run("tests/ppo_update_worker.py", str(policy_dir), "-", str(tmp_path / out), "grpo", nproc=nproc)
    one, two = (load_file(str(tmp_path / d / "weights.safetensors")) for d in ("one", "two"))
    lengths = one.pop("response_tokens")
    assert torch.equal(lengths, two.pop("response_tokens"))
    assert lengths[0::2].sum() != lengths[1::2].sum(), lengths
    start = {f"policy.{k}": v for k, v in load_file(str(policy_dir / "model.safetensors")).items()}
    assert max(float((one[k] - start[k]).abs().max()) for k in start if k in one) > 1e-3
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=0, msg=k)


def test_two_nodes_without_shared_storage_stop_on_resume_with_one_line(tmp_path, sft_single):
    """Two "machines" on this host (torchrun --nnodes 2, one process each), each with its own
    `out` as two Sparks with local disks would have: the run to resume exists on node 0's disk
    only. Both stop at start with the shared-storage line, instead of node 1 starting at step 0
    beside node 0 resuming from its checkpoint."""
    node0, node1 = tmp_path / "node0" / "out", tmp_path / "node1" / "out"
    shutil.copytree(sft_single, node0)
    node1.mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--nproc-per-node",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                str(REPO / "sft.py"),
                *SMOKE,
                *NO_CLIP,
                "--num-eval-samples",
                "2",
                "--resume",
                "--output-dir",
                str(out),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, out in enumerate((node0, node1))
    ]
    results = [(p.wait(timeout=600), p.stderr.read(), p.stdout.read()) for p in procs]
    for rank, (code, stderr, stdout) in enumerate(results):
        assert code != 0, f"node {rank} ran on:\n{stdout[-2000:]}"
        lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert lines, stderr[-3000:]
        assert "is not shared storage: rank 1 on" in lines[0] and "shared filesystem" in lines[0], lines[0]
        assert "resumed from" not in stdout
    assert sorted(p.name for p in (node0 / "checkpoints").iterdir()) == sorted(
        p.name for p in (sft_single / "checkpoints").iterdir()
    )


def test_ppo_two_processes_complete(tmp_path, sft_single):
    rm = tmp_path / "rm"
    run("reward.py", *SMOKE, "--sft-path", str(sft_single), "--output-dir", str(rm))
    out = tmp_path / "ppo"
    run(
        "ppo.py",
        "--preset",
        "smoke",
        "--sft-path",
        str(sft_single),
        "--reward-path",
        str(rm),
        "--total-episodes",
        "48",
        "--output-dir",
        str(out),
        nproc=2,
    )
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # 48 episodes / 16 per update, logged once (rank 0)
    assert (out / "model.safetensors").exists() and (
        out / "checkpoints" / "step_000003" / "value" / "model.safetensors"
    ).exists()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_dpo_two_processes_match_one(tmp_path, sft_single, strategy):
    """Reference log-probs computed in shares and gathered, and the DPO steps, under two processes."""
    single, double = tmp_path / "one", tmp_path / "two"
    run("dpo.py", *SMOKE, *NO_CLIP, "--sft-path", str(sft_single), "--output-dir", str(single))
    run(
        "dpo.py",
        *SMOKE,
        *NO_CLIP,
        "--sft-path",
        str(sft_single),
        "--strategy",
        strategy,
        "--output-dir",
        str(double),
        nproc=2,
    )
    a, b = (
        load_file(str(single / "reference_logprobs.safetensors")),
        load_file(str(double / "reference_logprobs.safetensors")),
    )
    assert a.keys() == b.keys() and all(
        torch.count_nonzero(b[k]) == b[k].numel() for k in b
    )  # every row filled by some process
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=0, msg=k)
    assert_close(single, double, atol=1e-4)
    assert_same_grad_norms(single, double)


def test_grpo_two_processes_complete(tmp_path, sft_single):
    rm = tmp_path / "rm"
    run("reward.py", *SMOKE, "--sft-path", str(sft_single), "--output-dir", str(rm))
    out = tmp_path / "grpo"
    run(
        "grpo.py",
        "--preset",
        "smoke",
        "--sft-path",
        str(sft_single),
        "--reward-path",
        str(rm),
        "--total-episodes",
        "48",
        "--output-dir",
        str(out),
        nproc=2,
    )
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # 48 episodes / 16 per update (2 queries x 4 responses per process), logged once (rank 0)
    assert (out / "model.safetensors").exists() and not (out / "checkpoints" / "step_000003" / "value").exists()
