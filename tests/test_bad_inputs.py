"""Bad inputs through the real CLIs (issue 9).

Every case of the catalogue runs a CLI as a subprocess, the way a user meets it, and checks that
it stops with exit code 1 and exactly one line `error: ...` on stderr naming the row, field, path
or option and what to do, never a traceback; or, for inputs the pipeline is meant to take (a
title longer than the query budget, a post without newlines, control characters, a summary over
the cap, `--skip-bad-rows`), that it succeeds and counts what it cut or dropped. README.md
lists the same cases with the message a user sees.

The stage cases start from one short smoke SFT run per session (`sft_out`); a reward-model
checkpoint and a tokenizer with far more tokens than the tiny model's embedding rows are built
in-process. Most cases stop during setup, a few seconds each (the Python start-up dominates).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgx_spark_summary_from_human_feedback import tiny
from dgx_spark_summary_from_human_feedback.data import Lengths, encode
from dgx_spark_summary_from_human_feedback.preprocess import Report, process_sft

from .conftest import REPO

PKG = "dgx_spark_summary_from_human_feedback"
TOKENIZER = str(tiny.TOKENIZER_DIR)
# one intra-op thread: the machine's few cores are shared, and these models are tiny
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "COLUMNS": "200",
}
SFT_SHORT = ["--preset", "smoke", "--max-steps", "4", "--eval-interval", "2", "--num-eval-samples", "2"]
SFT_ROWS = [json.loads(line) for line in (tiny.SFT_DIR / "train.jsonl").read_text().splitlines()[:20]]
COMPARISON_ROWS = [json.loads(line) for line in tiny.COMPARISONS_FILE.read_text().splitlines()[:10]]


def run(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python ARGS` in the repo root (ARGS: `-m MODULE ...` or `SCRIPT.py ...`)."""
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def module(name: str) -> list[str]:
    return ["-m", f"{PKG}.{name}"]


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 1, no traceback, stderr exactly one line `error: ...` holding every needle."""
    detail = f"exit {result.returncode}\n--- stdout\n{result.stdout[-2000:]}\n--- stderr\n{result.stderr[-4000:]}"
    assert result.returncode == 1, detail
    assert "Traceback" not in result.stderr, detail
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), detail
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------
# what the stage cases start from


@pytest.fixture(scope="session")
def sft_out(tmp_path_factory) -> Path:
    """A finished smoke SFT run: final model at the root, one checkpoint (step 4)."""
    out = tmp_path_factory.mktemp("bad_inputs_sft")
    result = run("sft.py", *SFT_SHORT, "--output-dir", out, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def reward_checkpoint(tmp_path_factory, sft_out) -> Path:
    """A reward-model checkpoint (SFT backbone + fresh head), as reward.py writes one."""
    from dgx_spark_summary_from_human_feedback.data import load_tokenizer
    from dgx_spark_summary_from_human_feedback.models import load_reward_model

    out = tmp_path_factory.mktemp("bad_inputs_rm")
    tokenizer = load_tokenizer(str(sft_out))
    load_reward_model(str(sft_out), tokenizer, new_head=True).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def big_tokenizer(tmp_path_factory) -> Path:
    """A word-level tokenizer with 3,002 tokens: far more than the tiny model's 832 embedding rows."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tiny.EOS: 0, **{f"w{i}": i + 1 for i in range(3000)}, "[UNK]": 3001}
    bpe = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    out = tmp_path_factory.mktemp("big_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=tiny.EOS, unk_token="[UNK]").save_pretrained(str(out))
    return out


class Inputs:
    """What a case needs: its own tmp dir, and the session fixtures only when asked for."""

    def __init__(self, tmp_path: Path, request):
        self.tmp, self.request = tmp_path, request

    def __getattr__(self, fixture: str):
        return self.request.getfixturevalue(fixture)

    def copy_of(self, src: Path, name: str) -> Path:
        return Path(shutil.copytree(src, self.tmp / name))


# ---------------------------------------------------------------------------------------------
# the catalogue: name -> (args, needles the one error line must hold)

CASES = {}


def case(name: str):
    def register(fn):
        CASES[name] = fn
        return fn

    return register


def process_sft_args(t: Inputs, dataset, *extra) -> list:
    return [
        *module("process_sft_dataset"),
        "--dataset",
        dataset,
        "--tokenizer",
        TOKENIZER,
        "--output-dir",
        t.tmp / "out",
        *extra,
    ]


def process_comparisons_args(t: Inputs, dataset, *extra) -> list:
    return [
        *module("process_comparison_dataset"),
        "--dataset",
        dataset,
        "--tokenizer",
        TOKENIZER,
        "--output-dir",
        t.tmp / "out",
        *extra,
    ]


def with_row(rows: list[dict], i: int, **change) -> list[dict]:
    return [{**r, **change} if k == i else r for k, r in enumerate(rows)]


@case("sft-data/renamed-column")
def _(t):
    rows = [{("text" if k == "post" else k): v for k, v in r.items()} for r in SFT_ROWS]
    return process_sft_args(t, write_jsonl(t.tmp / "renamed.jsonl", rows)), ["row train-000", "field 'post' is missing"]


@case("sft-data/missing-column")
def _(t):
    rows = [{k: v for k, v in r.items() if k != "summary"} for r in SFT_ROWS]
    return process_sft_args(t, write_jsonl(t.tmp / "no_summary.jsonl", rows)), [
        "row train-000",
        "field 'summary' is missing",
    ]


@case("sft-data/null-field")
def _(t):
    return process_sft_args(t, write_jsonl(t.tmp / "null.jsonl", with_row(SFT_ROWS, 3, post=None))), [
        "row train-003",
        "field 'post' is null",
    ]


@case("sft-data/empty-field")
def _(t):
    return process_sft_args(t, write_jsonl(t.tmp / "empty_post.jsonl", with_row(SFT_ROWS, 3, post="  \n "))), [
        "row train-003",
        "field 'post' is empty",
    ]


@case("sft-data/non-string-field")
def _(t):
    return process_sft_args(t, write_jsonl(t.tmp / "int_title.jsonl", with_row(SFT_ROWS, 3, title=5))), [
        "row train-003",
        "field 'title' is int, expected a string",
    ]


@case("sft-data/empty-file")
def _(t):
    (t.tmp / "empty.jsonl").write_text("")
    return process_sft_args(t, t.tmp / "empty.jsonl"), [str(t.tmp / "empty.jsonl"), "file is empty"]


@case("sft-data/empty-split-file")
def _(t):
    write_jsonl(t.tmp / "data" / "train.jsonl", SFT_ROWS)
    (t.tmp / "data" / "validation.jsonl").write_text("")
    return process_sft_args(t, t.tmp / "data"), ["validation.jsonl", "file is empty (split 'validation')"]


@case("sft-data/split-emptied-by-drops")
def _(t):
    write_jsonl(t.tmp / "data" / "train.jsonl", SFT_ROWS)
    write_jsonl(t.tmp / "data" / "validation.jsonl", [{**r, "summary": "word " * 100} for r in SFT_ROWS[:5]])
    return process_sft_args(t, t.tmp / "data"), [
        "split 'validation': all 5 rows were dropped",
        "response over 63 tokens",
        "--long-response truncate",
    ]


@case("sft-data/malformed-jsonl-line")
def _(t):
    path = write_jsonl(t.tmp / "malformed.jsonl", SFT_ROWS[:3])
    with path.open("a") as f:
        f.write('{"id": "x", "post": \n')
    return process_sft_args(t, path), [f"{path} line 4: not JSON", "fix or delete that line"]


@case("sft-data/unsupported-extension")
def _(t):
    (t.tmp / "posts.csv").write_text("id,post\n1,hello\n")
    return process_sft_args(t, t.tmp / "posts.csv"), [
        "posts.csv",
        "unsupported file type '.csv'",
        "use .jsonl, .json or .parquet",
    ]


@case("sft-data/nonexistent-dataset")
def _(t):
    return process_sft_args(t, t.tmp / "missing.jsonl"), [f"dataset path {t.tmp / 'missing.jsonl'} does not exist"]


@case("sft-data/nonexistent-tokenizer")
def _(t):
    args = process_sft_args(t, write_jsonl(t.tmp / "ok.jsonl", SFT_ROWS))
    args[args.index(TOKENIZER)] = t.tmp / "no_tokenizer"
    return args, [f"tokenizer path {t.tmp / 'no_tokenizer'} does not exist", "pass a local directory or a Hub name"]


@case("sft-data/tokenizer-dir-without-tokenizer")
def _(t):
    (t.tmp / "empty_dir").mkdir()
    args = process_sft_args(t, write_jsonl(t.tmp / "ok.jsonl", SFT_ROWS))
    args[args.index(TOKENIZER)] = t.tmp / "empty_dir"
    return args, [f"{t.tmp / 'empty_dir'} holds no tokenizer", "pass a finished stage's output directory"]


@case("sft-data/output-dir-under-a-file")
def _(t):
    data = write_jsonl(t.tmp / "ok.jsonl", SFT_ROWS)
    args = process_sft_args(t, data)
    args[args.index(t.tmp / "out")] = data / "sub"
    return args, [f"cannot create output directory {data / 'sub'}", "pass a writable --output-dir"]


@case("comparison-data/choice-out-of-range")
def _(t):
    path = write_jsonl(t.tmp / "choice.jsonl", with_row(COMPARISON_ROWS, 2, choice=2))
    return process_comparisons_args(t, path), ["row train-002", "field 'choice' is 2, expected 0 or 1"]


@case("comparison-data/one-summary")
def _(t):
    path = write_jsonl(t.tmp / "one.jsonl", with_row(COMPARISON_ROWS, 2, summaries=COMPARISON_ROWS[2]["summaries"][:1]))
    return process_comparisons_args(t, path), ["row train-002", "field 'summaries' needs two summaries"]


@case("comparison-data/missing-info")
def _(t):
    path = write_jsonl(t.tmp / "no_info.jsonl", [{k: v for k, v in r.items() if k != "info"} for r in COMPARISON_ROWS])
    return process_comparisons_args(t, path), ["field 'info' is missing or not an object"]


@case("comparison-data/null-post")
def _(t):
    path = write_jsonl(
        t.tmp / "null_post.jsonl", with_row(COMPARISON_ROWS, 1, info={**COMPARISON_ROWS[1]["info"], "post": None})
    )
    return process_comparisons_args(t, path), ["row train-001", "field 'info.post' is null"]


@case("sft/batch-not-divisible")
def _(t):
    return ["sft.py", *SFT_SHORT, "--batch-size", "10", "--micro-batch-size", "4", "--output-dir", t.tmp / "out"], [
        "--batch-size 10 is not divisible by --micro-batch-size 4",
        "pick sizes where batch = micro x grad-accum x processes",
    ]


@case("sft/unknown-preset")
def _(t):
    return ["sft.py", "--preset", "tiny", "--output-dir", t.tmp / "out"], [
        "--preset must be one of ['quick', 'smoke', 'spark']"
    ]


@case("sft/preset-spark-with-a-missing-dataset")
def _(t):
    """`--preset spark`, which --help lists, is taken (the defaults): the error is the dataset's."""
    missing = t.tmp / "nope.jsonl"
    return ["sft.py", "--preset", "spark", "--model", t.sft_out, "--dataset", missing, "--output-dir", t.tmp / "out"], [
        f"dataset path {missing} does not exist"
    ]


@case("sft/unknown-hub-dataset")
def _(t):
    return ["sft.py", *SFT_SHORT, "--dataset", "nobody/no_such_dataset", "--output-dir", t.tmp / "out"], [
        "dataset nobody/no_such_dataset is not a local path and could not be loaded from the Hugging Face Hub",
        "check the name",
    ]


@case("sft/resume-checkpoint-without-run-config")
def _(t):
    out = t.copy_of(t.sft_out, "run")
    (out / "checkpoints" / "step_000004" / "run_config.json").unlink()
    return ["sft.py", *SFT_SHORT, "--output-dir", out, "--resume"], [
        f"{out / 'checkpoints' / 'step_000004'} has no run_config.json",
        "delete that directory",
    ]


@case("sft/nonexistent-dataset")
def _(t):
    return ["sft.py", *SFT_SHORT, "--dataset", t.tmp / "missing", "--output-dir", t.tmp / "out"], [
        f"dataset path {t.tmp / 'missing'} does not exist"
    ]


@case("sft/nonexistent-model")
def _(t):
    return ["sft.py", *SFT_SHORT, "--model", t.tmp / "no_model", "--output-dir", t.tmp / "out"], [
        f"{t.tmp / 'no_model'} does not exist"
    ]


@case("sft/processed-dataset-with-an-empty-split")
def _(t):
    ds = datasets.load_from_disk(str(t.sft_processed))
    datasets.DatasetDict({"train": ds["train"], "validation": ds["validation"].filter(lambda row: False)}).save_to_disk(
        str(t.tmp / "processed")
    )
    return ["sft.py", *SFT_SHORT, "--dataset", t.tmp / "processed", "--output-dir", t.tmp / "out"], [
        f"{t.tmp / 'processed'}: split 'validation' is empty"
    ]


@case("sft/processed-dataset-cut-short")
def _(t):
    processed = t.copy_of(t.sft_processed, "processed")
    arrow = next((processed / "train").glob("*.arrow"))
    os.truncate(arrow, 5000)
    return ["sft.py", *SFT_SHORT, "--dataset", processed, "--output-dir", t.tmp / "out"], [
        f"{processed} cannot be read as a processed dataset",
        "run process_*_dataset again",
    ]


@case("sft/processed-dataset-of-a-foreign-tokenizer-whose-ids-fit")
def _(t):
    """As N+'s datasets (Pythia's ids, all inside Qwen's vocabulary): ids of a 501-token
    tokenizer all fit the tiny tokenizer's 789, so only the content check can tell."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dgx_spark_summary_from_human_feedback.data import load_raw, load_tokenizer

    vocab = {tiny.EOS: 0, **{f"w{i}": i + 1 for i in range(499)}, "[UNK]": 500}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token=tiny.EOS, unk_token="[UNK]").save_pretrained(
        str(t.tmp / "foreign")
    )
    raw = load_raw(str(tiny.SFT_DIR))
    process_sft(
        datasets.DatasetDict({s: raw[s] for s in ("train", "validation")}), load_tokenizer(str(t.tmp / "foreign"))
    ).save_to_disk(str(t.tmp / "processed"))
    return ["sft.py", *SFT_SHORT, "--dataset", t.tmp / "processed", "--output-dir", t.tmp / "out"], [
        f"{t.tmp / 'processed'}: row",
        "its query_token ids are not this tokenizer's encoding of its query text",
        "pass the raw data",
    ]


@case("sft/processed-dataset-recorded-with-another-tokenizer")
def _(t):
    """processing.json records the tokenizer's vocabulary hash; another one stops the run."""
    out = t.tmp / "processed"
    result = run(
        *module("process_sft_dataset"), "--dataset", tiny.SFT_DIR, "--tokenizer", TOKENIZER, "--output-dir", out
    )
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((out / "processing.json").read_text())
    assert len(record["params"]["tokenizer_vocab_sha256"]) == 64
    record["params"]["tokenizer_vocab_sha256"] = "0" * 64  # as if made with another vocabulary
    (out / "processing.json").write_text(json.dumps(record))
    return ["sft.py", *SFT_SHORT, "--dataset", out, "--output-dir", t.tmp / "out"], [
        f"{out} was processed with another tokenizer (vocabulary sha256 000000000000..."
    ]


@case("sft/processed-dataset-of-another-tokenizer")
def _(t):
    from dgx_spark_summary_from_human_feedback.data import load_raw, load_tokenizer

    # ids of the 3,002-token tokenizer, past the tiny tokenizer's 789
    raw = load_raw(str(tiny.SFT_DIR))
    process_sft(
        datasets.DatasetDict({s: raw[s] for s in ("train", "validation")}), load_tokenizer(str(t.big_tokenizer))
    ).save_to_disk(str(t.tmp / "processed"))
    return ["sft.py", *SFT_SHORT, "--dataset", t.tmp / "processed", "--output-dir", t.tmp / "out"], [
        f"{t.tmp / 'processed'}: token id",
        "the data was made with another tokenizer",
    ]


@case("sft/tokenizer-larger-than-the-model")
def _(t):
    model = t.tmp / "model"
    model.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(t.sft_out / f, model / f)
    for f in t.big_tokenizer.iterdir():
        shutil.copy(f, model / f.name)
    return ["sft.py", *SFT_SHORT, "--model", model, "--output-dir", t.tmp / "out"], [
        "tokenizer has 3003 tokens but the model only 832 embedding rows",
        "the tokenizer does not belong to this model",
    ]


@case("sft/output-dir-under-a-file")
def _(t):
    (t.tmp / "file").write_text("x")
    return ["sft.py", *SFT_SHORT, "--output-dir", t.tmp / "file" / "sub"], [
        f"cannot create output directory {t.tmp / 'file' / 'sub'}",
        "pass a writable --output-dir",
    ]


@case("sft/resume-truncated-training-state")
def _(t):
    out = t.copy_of(t.sft_out, "run")
    state = out / "checkpoints" / "step_000004" / "training_state.pt"
    os.truncate(state, 100)
    return ["sft.py", *SFT_SHORT, "--output-dir", out, "--resume"], [
        f"{state} cannot be read",
        "delete that checkpoint directory to resume from an earlier one",
    ]


@case("sft/resume-step-without-model-weights")
def _(t):
    out = t.copy_of(t.sft_out, "run")
    (out / "checkpoints" / "step_000004" / "model.safetensors").unlink()
    return ["sft.py", *SFT_SHORT, "--output-dir", out, "--resume"], [
        f"{out / 'checkpoints' / 'step_000004'} has no model weights",
        "delete that checkpoint directory",
    ]


@case("sft/resume-truncated-model-weights")
def _(t):
    out = t.copy_of(t.sft_out, "run")
    weights = out / "checkpoints" / "step_000004" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return ["sft.py", *SFT_SHORT, "--output-dir", out, "--resume"], [
        f"{weights} is truncated or corrupted",
        "delete that checkpoint directory",
    ]


@case("reward/reward-model-as-sft-path")
def _(t):
    return [
        "reward.py",
        "--preset",
        "smoke",
        "--max-steps",
        "1",
        "--sft-path",
        t.reward_checkpoint,
        "--output-dir",
        t.tmp / "out",
    ], [f"{t.reward_checkpoint} is a reward model", "pass sft.py's or ppo.py's output directory"]


@case("reward/sft-path-of-a-killed-run")
def _(t):
    killed = t.tmp / "killed_sft"  # what a kill before the final export leaves: checkpoints, no model at the root
    shutil.copytree(t.sft_out / "checkpoints", killed / "checkpoints")
    return [
        "reward.py",
        "--preset",
        "smoke",
        "--max-steps",
        "1",
        "--sft-path",
        killed,
        "--output-dir",
        t.tmp / "out",
    ], [f"{killed} is not a Hugging Face checkpoint (no config.json)", "pass the stage's output directory"]


@case("reward/resume-with-a-changed-config")
def _(t):
    args = [
        "reward.py",
        "--preset",
        "smoke",
        "--max-steps",
        "1",
        "--eval-interval",
        "1",
        "--sft-path",
        t.sft_out,
        "--output-dir",
        t.tmp / "out",
    ]
    first = run(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    return [*args, "--resume", "--lr", "1e-4"], [
        "resume with a changed config (lr: 0.002 -> 0.0001)",
        "pass --allow-config-change",
    ]


@case("reward/eval-only-without-reward-path")
def _(t):
    return ["reward.py", "--preset", "smoke", "--eval-only", "--output-dir", t.tmp / "out"], [
        "--eval-only needs --reward-path DIR"
    ]


@case("reward/mistyped-base-model")
def _(t):
    """Checked before the data: the dataset given here does not exist either, and is not what stops it."""
    return [
        "reward.py",
        "--preset",
        "smoke",
        "--sft-path",
        t.sft_out,
        "--base-model",
        "Qwen/Qwen2.5-1.5Bx",
        "--dataset",
        t.tmp / "nope.jsonl",
        "--output-dir",
        t.tmp / "out",
    ], ["Qwen/Qwen2.5-1.5Bx is not a local checkpoint and not a model on the Hugging Face Hub", "check the name"]


@case("reward/pickle-only-checkpoint")
def _(t):
    """Weights as pytorch_model.bin only (pickle: loading can run code): refused, safetensors only."""
    import torch
    from safetensors.torch import load_file

    sft = t.copy_of(t.sft_out, "pickled")
    torch.save(load_file(str(sft / "model.safetensors")), sft / "pytorch_model.bin")
    (sft / "model.safetensors").unlink()
    return ["reward.py", "--preset", "smoke", "--sft-path", sft, "--output-dir", t.tmp / "out"], [
        f"{sft} holds only pickle weights (pytorch_model*.bin)",
        "safetensors",
    ]


@case("reward/eval-only-over-a-training-run")
def _(t):
    run = t.copy_of(t.reward_checkpoint, "run")  # a finished run: model.safetensors at its root
    return [
        "reward.py",
        "--preset",
        "smoke",
        "--eval-only",
        "--reward-path",
        t.reward_checkpoint,
        "--output-dir",
        run,
    ], [f"--output-dir {run} holds a training run", "pass another --output-dir"]


@case("reward/policy-as-reward-path")
def _(t):
    return [
        "reward.py",
        "--preset",
        "smoke",
        "--eval-only",
        "--reward-path",
        t.sft_out,
        "--output-dir",
        t.tmp / "out",
    ], [f"{t.sft_out} holds ['Qwen2ForCausalLM'], not a reward model", "pass reward.py's output directory"]


@case("ppo/reward-model-as-sft-path")
def _(t):
    return [
        "ppo.py",
        "--preset",
        "smoke",
        "--sft-path",
        t.reward_checkpoint,
        "--reward-path",
        t.reward_checkpoint,
        "--output-dir",
        t.tmp / "out",
    ], [f"{t.reward_checkpoint} is a reward model", "pass sft.py's or ppo.py's output directory"]


@case("ppo/policy-as-reward-path")
def _(t):
    return [
        "ppo.py",
        "--preset",
        "smoke",
        "--sft-path",
        t.sft_out,
        "--reward-path",
        t.sft_out,
        "--output-dir",
        t.tmp / "out",
    ], [f"{t.sft_out} holds ['Qwen2ForCausalLM'], not a reward model", "pass reward.py's output directory"]


@case("ppo/batch-not-divisible")
def _(t):
    return [
        "ppo.py",
        "--preset",
        "smoke",
        "--sft-path",
        t.sft_out,
        "--reward-path",
        t.reward_checkpoint,
        "--batch-size",
        "10",
        "--micro-batch-size",
        "4",
        "--output-dir",
        t.tmp / "out",
    ], ["--batch-size 10 is not divisible by --micro-batch-size 4"]


@case("dpo/reward-model-as-sft-path")
def _(t):
    return ["dpo.py", "--preset", "smoke", "--sft-path", t.reward_checkpoint, "--output-dir", t.tmp / "out"], [
        f"{t.reward_checkpoint} is a reward model",
        "pass sft.py's or ppo.py's output directory",
    ]


@case("dpo/batch-not-divisible")
def _(t):
    return [
        "dpo.py",
        "--preset",
        "smoke",
        "--sft-path",
        t.sft_out,
        "--batch-size",
        "10",
        "--micro-batch-size",
        "4",
        "--output-dir",
        t.tmp / "out",
    ], ["--batch-size 10 is not divisible by --micro-batch-size 4"]


@case("grpo/reward-model-as-sft-path")
def _(t):
    return [
        "grpo.py",
        "--preset",
        "smoke",
        "--sft-path",
        t.reward_checkpoint,
        "--reward-path",
        t.reward_checkpoint,
        "--output-dir",
        t.tmp / "out",
    ], [f"{t.reward_checkpoint} is a reward model", "pass sft.py's or ppo.py's output directory"]


@case("grpo/policy-as-reward-path")
def _(t):
    return [
        "grpo.py",
        "--preset",
        "smoke",
        "--sft-path",
        t.sft_out,
        "--reward-path",
        t.sft_out,
        "--output-dir",
        t.tmp / "out",
    ], [f"{t.sft_out} holds ['Qwen2ForCausalLM'], not a reward model", "pass reward.py's output directory"]


@case("grpo/group-size-1")
def _(t):
    return [
        "grpo.py",
        "--preset",
        "smoke",
        "--sft-path",
        t.sft_out,
        "--reward-path",
        t.reward_checkpoint,
        "--group-size",
        "1",
        "--output-dir",
        t.tmp / "out",
    ], ["--group-size 1: GRPO and RLOO need at least 2 responses per query"]


@case("grpo/batch-not-divisible-by-group-size")
def _(t):
    return [
        "grpo.py",
        "--preset",
        "smoke",
        "--sft-path",
        t.sft_out,
        "--reward-path",
        t.reward_checkpoint,
        "--batch-size",
        "18",
        "--group-size",
        "4",
        "--output-dir",
        t.tmp / "out",
    ], ["--batch-size 18 is not divisible by --group-size 4", "the batch holds whole groups"]


@case("grpo/batch-not-divisible")
def _(t):
    return [
        "grpo.py",
        "--preset",
        "smoke",
        "--sft-path",
        t.sft_out,
        "--reward-path",
        t.reward_checkpoint,
        "--batch-size",
        "12",
        "--group-size",
        "4",
        "--micro-batch-size",
        "8",
        "--output-dir",
        t.tmp / "out",
    ], ["--batch-size 12 is not divisible by --micro-batch-size 8"]


def generation_args(checkpoint, *extra) -> list:
    return [*module("generation"), "--checkpoint", checkpoint, "--num-samples", "2", "--max-new-tokens", "4", *extra]


@case("generation/nonexistent-prompt-file")
def _(t):
    return generation_args(t.sft_out, "--prompt-file", t.tmp / "posts.jsonl"), [
        f"prompt file {t.tmp / 'posts.jsonl'} does not exist"
    ]


@case("generation/malformed-prompt-line")
def _(t):
    (t.tmp / "posts.jsonl").write_text('"a post"\n{"post": "unclosed"\n')
    return generation_args(t.sft_out, "--prompt-file", t.tmp / "posts.jsonl"), [
        f"{t.tmp / 'posts.jsonl'} line 2: not JSON"
    ]


@case("generation/prompt-line-neither-string-nor-object")
def _(t):
    (t.tmp / "posts.jsonl").write_text("[1, 2]\n")
    return generation_args(t.sft_out, "--prompt-file", t.tmp / "posts.jsonl"), [
        f"{t.tmp / 'posts.jsonl'} line 1: list",
        "expected a post string or an object",
    ]


@case("generation/nonexistent-checkpoint")
def _(t):
    return generation_args(t.tmp / "no_ckpt", "--prompt-file", t.tmp / "x.jsonl"), [
        f"{t.tmp / 'no_ckpt'} does not exist"
    ]


@case("generation/reward-model-as-checkpoint")
def _(t):
    return generation_args(t.reward_checkpoint, "--dataset", tiny.SFT_DIR), [
        f"{t.reward_checkpoint} is a reward model",
        "pass sft.py's or ppo.py's output directory",
    ]


@case("generation/tokenizer-larger-than-the-model")
def _(t):
    return generation_args(t.sft_out, "--tokenizer", t.big_tokenizer, "--dataset", tiny.SFT_DIR), [
        "tokenizer has 3003 tokens but the model only 832 embedding rows"
    ]


@case("generation/missing-split")
def _(t):
    return generation_args(t.sft_out, "--dataset", tiny.SFT_DIR, "--split", "valid"), [
        f"{tiny.SFT_DIR}: split 'valid' missing",
        "pass --split",
    ]


@case("generation/output-under-a-file")
def _(t):
    (t.tmp / "file").write_text("x")
    return generation_args(t.sft_out, "--dataset", tiny.SFT_DIR, "--output", t.tmp / "file" / "samples.jsonl"), [
        f"cannot create output directory {t.tmp / 'file'}",
        "pass a writable --output",
    ]


def evaluate_args(t: Inputs, *extra) -> list:
    return [
        *module("evaluate"),
        "--dataset",
        tiny.SFT_DIR,
        "--num-samples",
        "2",
        "--max-new-tokens",
        "4",
        "--output-dir",
        t.tmp / "eval",
        *extra,
    ]


@case("evaluate/head-to-head-with-one-policy")
def _(t):
    return evaluate_args(t, "--policy", t.sft_out, "--head-to-head"), ["--head-to-head needs two --policy checkpoints"]


@case("evaluate/head-to-head-against-a-policy-not-evaluated")
def _(t):
    return evaluate_args(t, "--policy", t.sft_out, "--head-to-head-against", t.tmp / "ppo"), [
        f"--head-to-head-against {t.tmp / 'ppo'} is not one of the --policy paths",
        "pass it as --policy too",
    ]


@case("evaluate/no-policy")
def _(t):
    return evaluate_args(t), ["no --policy given", "pass --policy DIR"]


@case("evaluate/judge-url-without-model")
def _(t):
    return evaluate_args(t, "--policy", t.sft_out, "--judge-url", "http://127.0.0.1:9/v1"), [
        "pass --judge-url and --judge-model together"
    ]


@case("evaluate/nonexistent-policy")
def _(t):
    return evaluate_args(t, "--policy", t.tmp / "no_policy"), [f"{t.tmp / 'no_policy'} does not exist"]


@case("evaluate/policy-as-reward-path")
def _(t):
    return evaluate_args(t, "--policy", t.sft_out, "--reward-path", t.sft_out), [
        f"{t.sft_out} holds ['Qwen2ForCausalLM'], not a reward model"
    ]


@pytest.fixture(scope="session")
def sft_processed(tmp_path_factory) -> Path:
    """The fixture SFT data processed with the tiny tokenizer (save_to_disk)."""
    from dgx_spark_summary_from_human_feedback.data import load_raw, load_tokenizer

    out = tmp_path_factory.mktemp("sft_processed")
    process_sft(load_raw(str(tiny.SFT_DIR)), load_tokenizer(TOKENIZER)).save_to_disk(str(out))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_stops_with_one_line_naming_it(name, tmp_path, request):
    args, needles = CASES[name](Inputs(tmp_path, request))
    assert_one_line_error(run(*args), *needles)


def test_catalogue_is_documented():
    doc = (REPO / "README.md").read_text()
    missing = [name for name in [*CASES, *COUNTED] if f"`{name}`" not in doc]
    assert not missing, f"the 'Bad input -> what you see' table lacks {missing}"


def test_read_only_output_location_is_one_line(tmp_path):
    """Root ignores chmod; a pseudo-filesystem where even root cannot create directories stands in."""
    target = Path("/sys/bad_inputs_test_out")
    try:
        target.mkdir()
    except OSError:
        pass
    else:
        target.rmdir()
        pytest.skip("/sys is writable here")
    data = write_jsonl(tmp_path / "ok.jsonl", SFT_ROWS)
    result = run(*module("process_sft_dataset"), "--dataset", data, "--tokenizer", TOKENIZER, "--output-dir", target)
    assert_one_line_error(result, f"cannot create output directory {target}", "pass a writable --output-dir")


# ---------------------------------------------------------------------------------------------
# inputs the pipeline takes: they succeed and the printed statistics count what was cut or dropped

EDGE_ROWS = [
    {
        "id": "long-title",
        "subreddit": "tifu",
        "title": "a very long title " * 400,
        "post": "short post",
        "summary": "a summary",
    },
    {"id": "no-newline", "subreddit": "tifu", "title": "t", "post": "word " * 3000, "summary": "a summary"},
    {
        "id": "control-and-scripts",
        "subreddit": "tifu",
        "title": "t\x00\x07\x1b[31m\u200b\ufeff",
        "post": "Hello\x00 wörld \u202e日本語 Привет مرحبا 🙂🎉\r\n\x0b\x0c more\tstuff " * 80,
        "summary": "control \x01 summary 🙂",
    },
    {"id": "long-summary", "subreddit": "tifu", "title": "t", "post": "p", "summary": "word " * 200},
]

COUNTED = {
    "sft-data/title-over-the-query-budget": "query cut (tokens:title): 1",
    "sft-data/post-without-newline": "query cut (tokens:post): 1",
    "sft-data/control-characters-and-mixed-scripts": "query cut (newline:post): 1",
    "sft-data/summary-over-the-cap": "dropped: response over 63 tokens: 1",
    "sft-data/summary-over-the-cap-truncated": "response cut to 63 tokens: 1",
    "sft-data/skip-bad-rows": "dropped: bad row (field 'post' is null): 1",
    "comparison-data/skip-bad-rows": "dropped: bad row (field 'choice' is 2, expected 0 or 1): 1",
    "comparison-data/summary-over-the-cap": "dropped: response over 133 tokens: 1",
    "comparison-data/summary-over-the-cap-truncated": "response cut to 133 tokens: 1",
}


def test_edge_rows_succeed_cut_to_512_tokens_and_are_counted(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "edge.jsonl", EDGE_ROWS)
    result = run(*process_sft_args(Inputs(tmp_path, None), data))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train: 4 rows in, 3 out" in result.stdout
    for name in (
        "title-over-the-query-budget",
        "post-without-newline",
        "control-characters-and-mixed-scripts",
        "summary-over-the-cap",
    ):
        assert COUNTED[f"sft-data/{name}"] in result.stdout, result.stdout
    rows = {r["id"]: r for r in datasets.load_from_disk(str(tmp_path / "out"))["train"]}
    assert sorted(rows) == ["control-and-scripts", "long-title", "no-newline"]
    for r in rows.values():
        n = r["query_token_len"]
        assert len(r["query_token"]) == 512 and n <= 512
        assert r["query_token"][: 512 - n] == [tokenizer.pad_token_id] * (512 - n)  # left padded
        assert r["query_token"][512 - n :] == encode(tokenizer, r["query"])
    assert rows["long-title"]["post"] == "" and EDGE_ROWS[0]["title"].startswith(rows["long-title"]["title"])
    assert rows["no-newline"]["query_token_len"] >= 500  # cut between tokens, most of the budget used
    assert (
        EDGE_ROWS[2]["post"].startswith(rows["control-and-scripts"]["post"])
        and "日本語" in rows["control-and-scripts"]["post"]
    )

    result = run(*process_sft_args(Inputs(tmp_path / "t", None), data, "--long-response", "truncate"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert COUNTED["sft-data/summary-over-the-cap-truncated"] in result.stdout and "dropped: none" in result.stdout
    cut = next(r for r in datasets.load_from_disk(str(tmp_path / "t" / "out"))["train"] if r["id"] == "long-summary")
    assert cut["reference_response_token_len"] == 63 and cut["reference_response_token"][62] == tokenizer.eos_token_id


def test_skip_bad_rows_counts_and_skips(tmp_path):
    data = write_jsonl(tmp_path / "null.jsonl", with_row(SFT_ROWS, 3, post=None))
    result = run(*process_sft_args(Inputs(tmp_path, None), data, "--skip-bad-rows"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train: 20 rows in, 18 out" in result.stdout  # the bad row and the fixture's over-long summary
    assert COUNTED["sft-data/skip-bad-rows"] in result.stdout
    assert "train-003" not in datasets.load_from_disk(str(tmp_path / "out"))["train"]["id"]

    data = write_jsonl(tmp_path / "choice.jsonl", with_row(COMPARISON_ROWS, 2, choice=2))
    result = run(*process_comparisons_args(Inputs(tmp_path / "c", None), data, "--skip-bad-rows"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert COUNTED["comparison-data/skip-bad-rows"] in result.stdout and "train: 10 rows in, 9 out" in result.stdout


def test_comparison_summary_over_the_cap_is_dropped_or_cut_and_counted(tmp_path, tokenizer):
    long = {**COMPARISON_ROWS[3]["summaries"][0], "text": " word" * 300}
    data = write_jsonl(
        tmp_path / "long.jsonl", with_row(COMPARISON_ROWS, 3, summaries=[long, COMPARISON_ROWS[3]["summaries"][1]])
    )
    result = run(*process_comparisons_args(Inputs(tmp_path, None), data))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        COUNTED["comparison-data/summary-over-the-cap"] in result.stdout and "train: 10 rows in, 9 out" in result.stdout
    )
    result = run(*process_comparisons_args(Inputs(tmp_path / "t", None), data, "--long-response", "truncate"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        COUNTED["comparison-data/summary-over-the-cap-truncated"] in result.stdout and "dropped: none" in result.stdout
    )
    row = next(r for r in datasets.load_from_disk(str(tmp_path / "t" / "out"))["train"] if r["id"] == "train-003")
    key = "chosen" if COMPARISON_ROWS[3]["choice"] == 0 else "rejected"
    assert row[f"{key}_token_len"] == 133 and row[f"{key}_token"][132] == tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------
# property: process_sft on random rows


text = st.text(
    alphabet=st.sampled_from(list("ab \n\t.\x00\x07\r🙂é日ا")) | st.characters(exclude_categories=("Cs",)), max_size=400
)
random_row = st.fixed_dictionaries(
    {
        "subreddit": st.text(st.characters(exclude_categories=("Cs",)), max_size=20),
        "title": text,
        "post": text,
        "summary": text,
    }
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    rows=st.lists(random_row, min_size=1, max_size=6),
    long_response=st.sampled_from(["drop", "truncate"]),
    response=st.integers(4, 63),
)
def test_process_sft_on_random_rows_keeps_every_invariant(tokenizer, rows, long_response, response):
    rows = [{"id": f"r{i}", **r} for i, r in enumerate(rows)]
    rows.append({"id": "anchor", "subreddit": "tifu", "title": "t", "post": "p", "summary": "s"})  # no split ends empty
    report = Report()
    out = process_sft(
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}),
        tokenizer,
        Lengths(response=response),
        long_response=long_response,
        skip_bad_rows=True,
        report=report,
    )["train"]
    assert report.rows_in["train"] == len(rows) == len(out) + sum(report.dropped.values())  # every row out, or counted
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    for r in out:
        q, n = r["query_token_len"], r["reference_response_token_len"]
        assert len(r["query_token"]) == 512 and 0 < q <= 512
        assert (
            r["query_token"][: 512 - q] == [pad] * (512 - q) and pad not in r["query_token"][512 - q :]
        )  # left padded
        response_ids = r["reference_response_token"][:n]
        assert 0 < n <= response and response_ids[-1] == eos  # EOS last, also when cut
        ids, labels = r["query_reference_response_token"], r["query_reference_response_token_response_label"]
        assert len(ids) == len(labels) == 512 + response
        assert ids[: q + n] == r["query_token"][512 - q :] + response_ids
        assert [i for i, label in enumerate(labels) if label != -100] == list(
            range(q, q + n)
        )  # -100 exactly off the response
        assert labels[q : q + n] == response_ids and labels[q + n - 1] == eos
