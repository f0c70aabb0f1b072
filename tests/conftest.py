"""Shared test fixtures: the tiny tokenizer and model, offline settings, the real sample."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread for the tiny models, here and in every stage subprocess: on a 2-core
# machine torch's default spins against the other process and runs several times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from dgx_spark_summary_from_human_feedback import tiny  # noqa: E402
from dgx_spark_summary_from_human_feedback.data import load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REAL_SAMPLE = REPO.parent / "shared" / "data" / "tldr_real_sample"
needs_real_sample = pytest.mark.skipif(
    not (REAL_SAMPLE / "sft.jsonl").exists(), reason=f"real TL;DR sample not found at {REAL_SAMPLE}"
)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(str(tiny.TOKENIZER_DIR))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return tiny.write_model(tmp_path_factory.mktemp("tiny_model"))
