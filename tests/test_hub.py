"""The Hub paths end to end, against the small Hub of tests/hub_server.py on 127.0.0.1 (issue 16).

The real clients run unchanged: every command is a subprocess with HF_ENDPOINT pointing at the
server (huggingface_hub reads it once, at import), a fake HF_TOKEN, HF_HUB_OFFLINE=0 and its own
HF_HOME, so no cache is shared with another test or run. The server holds the two source datasets
as the Hub lays them out: `vwxyzjn/summarize_from_feedback_tldr_3_filtered` as Parquet files,
`openai/summarize_from_feedback` as a loading script on `main` with the Hub's Parquet export of
its `comparisons` config under `refs/convert/parquet`, both built from the bundled fixtures.
"""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest

from dgx_spark_summary_from_human_feedback import tiny
from dgx_spark_summary_from_human_feedback.data import COMPARISON_FEATURES, SFT_FEATURES  # the Hub's declared schemas

from .conftest import REPO
from .hub_server import LocalHub

PKG = "dgx_spark_summary_from_human_feedback"
TOKEN = "hf_LocalHubFakeToken4Tests0123456789"  # shaped like a real token, so a leak of it is findable
USER = "alice"
TOKENIZER = str(tiny.TOKENIZER_DIR)
SFT_SOURCE = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"
COMPARISON_SOURCE = "openai/summarize_from_feedback"


def parquet(rows: list[dict], features: datasets.Features | None = None) -> bytes:
    buf = io.BytesIO()
    datasets.Dataset.from_list(rows, features=features).to_parquet(buf)
    return buf.getvalue()


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def seed_sources(hub: LocalHub) -> None:
    sft = hub.add_repo("dataset", SFT_SOURCE)
    readme = (
        "---\nconfigs:\n- config_name: default\n  data_files:\n"
        + "".join(f"  - split: {s}\n    path: data/{s}-*\n" for s in ("train", "validation", "test"))
        + "---\n"
    )
    sft.commit(
        "main",
        {
            "README.md": readme.encode(),
            **{
                f"data/{s}-00000-of-00001.parquet": parquet(jsonl(tiny.SFT_DIR / f"{s}.jsonl"), SFT_FEATURES)
                for s in ("train", "validation", "test")
            },
        },
    )

    comparisons = hub.add_repo("dataset", COMPARISON_SOURCE)
    comparisons.commit(
        "main",
        {
            "summarize_from_feedback.py": b"import datasets  # a loading script: never run\n",
            "README.md": b"---\nlicense: mit\n---\n",
        },
    )
    rows = jsonl(tiny.COMPARISONS_FILE)
    axis = [{"info": {"id": "axis-0"}, "summary": {"text": " an axis row"}}]  # another config, another schema
    comparisons.commit(
        "refs/convert/parquet",  # the parquet-converter's layout: CONFIG/SPLIT/NNNN.parquet, no README
        {
            "comparisons/train/0000.parquet": parquet([r for r in rows if r["split"] == "train"], COMPARISON_FEATURES),
            "comparisons/validation/0000.parquet": parquet(
                [r for r in rows if r["split"] != "train"], COMPARISON_FEATURES
            ),
            "axis/test/0000.parquet": parquet(axis),
            "axis/validation/0000.parquet": parquet(axis),
        },
    )
    hub.add_repo("model", "bob/taken")  # someone else's repository
    hub.add_repo("dataset", "team/taken", owner="bob")  # in alice's organisation, but bob's: she may not write it


@pytest.fixture(scope="module")
def hub():
    server = LocalHub({TOKEN: USER}, orgs={USER: ["team"]})
    seed_sources(server)
    yield server
    server.stop()


def hub_env(hub: LocalHub, home: Path, token: str | None = TOKEN) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env |= {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",  # Xet storage needs a content-addressed store: uploads take the LFS path
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "200",
    }
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def run(hub: LocalHub, tmp: Path, *args, token: str | None = TOKEN, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python ARGS` in the repo root against the server; the token appears in neither stream."""
    result = subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=REPO,
        env=hub_env(hub, tmp / "hf_home", token),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert TOKEN not in result.stdout + result.stderr
    return result


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 1, no traceback, one `error: ...` line holding every needle, last on stderr (before it
    the libraries may have said what they tried, e.g. huggingface_hub's "Retrying in 2s")."""
    detail = f"exit {result.returncode}\n--- stdout\n{result.stdout[-2000:]}\n--- stderr\n{result.stderr[-4000:]}"
    assert result.returncode == 1, detail
    assert "Traceback" not in result.stderr, detail
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and result.stderr.strip().endswith(lines[0]), detail
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def assert_no_token_in(*dirs: Path) -> None:
    for d in dirs:
        for f in (p for p in d.rglob("*") if p.is_file()):
            assert TOKEN.encode() not in f.read_bytes(), f"the token is written in {f}"


def hub_rows(hub: LocalHub, repo_id: str, path: str) -> list[dict]:
    return pq.read_table(io.BytesIO(hub.files("dataset", repo_id)[path])).to_pylist()


# ---------------------------------------------------------------------------------------------
# datasets: the sources by their default names, processed, pushed, read back by the stages


@pytest.fixture(scope="module")
def model_tokenizer(tmp_path_factory) -> str:
    """The smoke model's tokenizer (a tiny model directory): the datasets the stages train on are
    processed with the model's own tokenizer, as a user does (`--tokenizer` the model)."""
    return str(tiny.write_model(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture(scope="module")
def pushed_datasets(hub, model_tokenizer, tmp_path_factory):
    """Both process scripts with their default --dataset (the Hub sources), pushed to alice/."""
    tmp = tmp_path_factory.mktemp("pushed_datasets")
    args = ["--tokenizer", model_tokenizer, "--output-dir"]
    sft = run(hub, tmp, "-m", f"{PKG}.process_sft_dataset", *args, tmp / "sft", "--push-to-hub", f"{USER}/tldr-sft")
    comparisons = run(
        hub,
        tmp,
        "-m",
        f"{PKG}.process_comparison_dataset",
        *args,
        tmp / "comparisons",
        "--push-to-hub",
        f"{USER}/tldr-comparisons",
    )
    return tmp, ok(sft), ok(comparisons)


def test_source_datasets_load_by_their_default_names_as_the_local_fixtures_do(
    hub, pushed_datasets, model_tokenizer, tmp_path
):
    tmp, _, _ = pushed_datasets
    assert (
        f"GET /api/datasets/{COMPARISON_SOURCE}/revision/refs%2Fconvert%2Fparquet 200" in hub.log
    )  # the export, not the script
    local_args = {
        "process_sft_dataset": ["--dataset", tiny.SFT_DIR],
        "process_comparison_dataset": ["--dataset", tiny.COMPARISONS_FILE],
    }
    for (script, args), name in zip(local_args.items(), ("sft", "comparisons")):
        ok(
            run(
                hub,
                tmp_path,
                "-m",
                f"{PKG}.{script}",
                *args,
                "--tokenizer",
                model_tokenizer,
                "--output-dir",
                tmp_path / name,
            )
        )
        from_hub, from_files = datasets.load_from_disk(str(tmp / name)), datasets.load_from_disk(str(tmp_path / name))
        assert sorted(from_hub) == sorted(from_files)
        for split in from_hub:
            assert from_hub[split].to_list() == from_files[split].to_list(), (
                f"{name}/{split} differs between the Hub source and the fixture files"
            )


def test_processed_datasets_and_their_cards_are_pushed(hub, pushed_datasets):
    tmp, _, _ = pushed_datasets
    for name, title in (("sft", "# TL;DR SFT dataset"), ("comparisons", "# TL;DR preference dataset")):
        local = datasets.load_from_disk(str(tmp / name))
        files = hub.files("dataset", f"{USER}/tldr-{name}")
        assert set(files) == {".gitattributes", "README.md"} | {
            f"data/{split}-00000-of-00001.parquet" for split in local
        }
        for split in local:
            assert (
                hub_rows(hub, f"{USER}/tldr-{name}", f"data/{split}-00000-of-00001.parquet") == local[split].to_list()
            )
        card = files["README.md"].decode()
        assert title in card and "## Processing report" in card and "- rlhf" in card  # our card ...
        assert "configs:" in card and "dataset_info:" in card  # ... and the metadata `datasets` wrote beside it
    assert_no_token_in(tmp)


# ---------------------------------------------------------------------------------------------
# stages: train on the pushed datasets, push the models, load them back by repo id

RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
kind, repo, local = sys.argv[1:]
cls = AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM
remote, here = cls.from_pretrained(repo), cls.from_pretrained(local)
tokenizer = AutoTokenizer.from_pretrained(repo)
ids = torch.tensor([tokenizer("SUBREDDIT: r/tifu\\n\\nTITLE: a title\\n\\nPOST: a post\\n\\nTL;DR: a summary")["input_ids"]])
a, b = remote.state_dict(), here.state_dict()
print(json.dumps({
    "same_weights": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
    "same_logits": torch.equal(remote(ids).logits, here(ids).logits),
    "score_bias": getattr(remote.config, "score_bias", None),
    "pad_is_not_eos": tokenizer.pad_token_id != tokenizer.eos_token_id,
}))
"""


@pytest.mark.slow
def test_stages_train_on_pushed_datasets_push_their_models_and_load_back(hub, pushed_datasets, tmp_path):
    short = ["--preset", "smoke", "--max-steps", "4", "--eval-interval", "2", "--num-eval-samples", "2"]
    ok(
        run(
            hub,
            tmp_path,
            "sft.py",
            *short,
            "--dataset",
            f"{USER}/tldr-sft",
            "--output-dir",
            tmp_path / "sft",
            "--push-to-hub",
            f"{USER}/sft-smoke",
        )
    )
    ok(
        run(
            hub,
            tmp_path,
            "reward.py",
            *short[:-2],
            "--sft-path",
            tmp_path / "sft",
            "--dataset",
            f"{USER}/tldr-comparisons",
            "--sft-dataset",
            f"{USER}/tldr-sft",
            "--num-norm-rows",
            "16",
            "--output-dir",
            tmp_path / "reward",
            "--push-to-hub",
            f"{USER}/reward-smoke",
        )
    )
    ok(
        run(
            hub,
            tmp_path,
            "ppo.py",
            "--preset",
            "smoke",
            "--sft-path",
            tmp_path / "sft",
            "--reward-path",
            tmp_path / "reward",
            "--dataset",
            f"{USER}/tldr-sft",
            "--total-episodes",
            "32",
            "--output-dir",
            tmp_path / "ppo",
            "--push-to-hub",
            f"{USER}/ppo-smoke",
        )
    )
    for stage, kind in (("sft", "policy"), ("reward", "reward"), ("ppo", "policy")):
        repo_id, out = f"{USER}/{stage}-smoke", tmp_path / stage
        files = hub.files("model", repo_id)
        assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(files)
        assert not [
            p for p in files if p.startswith(("checkpoints/", "tiny-init/", ".export")) or p.endswith((".pt", ".bin"))
        ], sorted(files)
        assert (out / "report.md").read_text().strip() in files[
            "README.md"
        ].decode()  # the run's report is the model card
        reloaded = json.loads(ok(run(hub, tmp_path, "-c", RELOAD, kind, repo_id, out)).stdout.splitlines()[-1])
        assert reloaded["same_weights"] and reloaded["same_logits"] and reloaded["pad_is_not_eos"], (stage, reloaded)
        if kind == "reward":  # the normalising offset travels in config.json (plain logits + score_bias = our score)
            assert reloaded["score_bias"] == json.loads((out / "config.json").read_text())["score_bias"] != 0.0
    assert_no_token_in(tmp_path)


# ---------------------------------------------------------------------------------------------
# failures: one line, exit 1, the local output intact, the token nowhere

PUSH_SFT_DATASET = ["-m", f"{PKG}.process_sft_dataset", "--tokenizer", TOKENIZER]


@pytest.mark.parametrize(
    "token, repo_id, needles",
    [
        (None, f"{USER}/x", ["needs a token", "HF_TOKEN"]),
        ("hf_RejectedToken000000000000000000", f"{USER}/x", ["401", "HF_TOKEN"]),
        (TOKEN, "bob/taken", ["may not create repositories under 'bob'", "alice"]),
        (TOKEN, "alice/bad name!", ["is not a repository id", "NAMESPACE/NAME"]),
        (TOKEN, "alice/a/b", ["is not a repository id"]),
    ],
    ids=["missing-token", "rejected-token", "someone-elses-name", "malformed-name", "too-many-parts"],
)
def test_a_push_that_cannot_succeed_stops_before_the_work(hub, tmp_path, token, repo_id, needles):
    out = tmp_path / "out"
    result = run(hub, tmp_path, *PUSH_SFT_DATASET, "--output-dir", out, "--push-to-hub", repo_id, token=token)
    assert_one_line_error(result, repo_id, *needles)
    assert not out.exists()  # nothing processed, nothing half-written
    assert_no_token_in(tmp_path)


def test_loading_with_a_rejected_token_or_a_missing_dataset_is_one_line(hub, tmp_path):
    rejected = run(
        hub, tmp_path, *PUSH_SFT_DATASET, "--output-dir", tmp_path / "a", token="hf_RejectedToken000000000000000000"
    )
    assert_one_line_error(rejected, SFT_SOURCE, "401", "HF_TOKEN")
    missing = run(
        hub, tmp_path, *PUSH_SFT_DATASET, "--dataset", f"{USER}/no-such-dataset", "--output-dir", tmp_path / "b"
    )
    assert_one_line_error(missing, f"{USER}/no-such-dataset", "check the name")


def test_a_taken_name_fails_at_the_push_with_the_local_dataset_intact(hub, tmp_path):
    out = tmp_path / "out"
    result = run(hub, tmp_path, *PUSH_SFT_DATASET, "--output-dir", out, "--push-to-hub", "team/taken")
    assert_one_line_error(result, "team/taken", "403", "may not write there")
    assert "POST /api/repos/create 409" in hub.log  # the name exists: huggingface_hub goes on, the write is refused
    assert sorted(datasets.load_from_disk(str(out))) == ["test", "train", "validation"]
    assert_no_token_in(tmp_path)


@pytest.mark.parametrize(
    "die_on", [pytest.param("lfs", marks=pytest.mark.slow), "commit"]
)  # lfs: huggingface_hub retries for 23 s first
def test_the_hub_going_away_mid_upload_leaves_the_local_dataset_intact(tmp_path, die_on):
    server = LocalHub({TOKEN: USER})
    seed_sources(server)
    server.die_on = die_on  # the Hub drops the connection at the first LFS upload / at the commit, and stops
    out = tmp_path / "out"
    result = run(server, tmp_path, *PUSH_SFT_DATASET, "--output-dir", out, "--push-to-hub", f"{USER}/tldr-sft")
    assert_one_line_error(result, f"{USER}/tldr-sft", "cannot reach the Hub")
    local = datasets.load_from_disk(str(out))  # saved before the push: complete and readable
    assert sorted(local) == ["test", "train", "validation"]
    for split, ds in local.items():  # as many rows as the run reported
        assert len(ds) and re.search(rf"^{split}: \d+ rows in, {len(ds)} out$", result.stdout, re.MULTILINE)
    assert "# TL;DR SFT dataset" in (out / "README.md").read_text()
    assert_no_token_in(tmp_path)


@pytest.mark.slow
def test_the_hub_going_away_while_a_stage_pushes_leaves_its_model_intact(tmp_path):
    server = LocalHub({TOKEN: USER})
    server.die_on = "commit"
    out = tmp_path / "sft"
    result = run(
        server,
        tmp_path,
        "sft.py",
        "--preset",
        "smoke",
        "--max-steps",
        "2",
        "--eval-interval",
        "2",
        "--num-eval-samples",
        "2",
        "--output-dir",
        out,
        "--push-to-hub",
        f"{USER}/sft-smoke",
    )
    assert_one_line_error(result, f"{USER}/sft-smoke", "cannot reach the Hub")
    ok(
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(out)!r})",
            ],
            capture_output=True,
            text=True,
        )
    )
    assert (out / "report.md").exists() and list((out / "checkpoints").glob("step_*"))
    assert_no_token_in(tmp_path)
