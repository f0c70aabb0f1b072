"""Local copies of the real datasets: the file a row comes from decides its split, and files are
read with the Hub's declared schema, not one guessed per file (issue 14, item 5).

The files are built from the real sample (../shared/data/tldr_real_sample), whose comparison
rows carry OpenAI's own `split` field ("valid1") and null `note` / `extra.confidence`, exactly
the shape of the original release that broke the preference pipeline.
"""

import json
import subprocess
import sys

import datasets
import pytest

from dgx_spark_summary_from_human_feedback.data import COMPARISON_FEATURES, SFT_FEATURES, Lengths, load_raw
from dgx_spark_summary_from_human_feedback.errors import InputError
from dgx_spark_summary_from_human_feedback.preprocess import Report, load_stage_data, process_comparisons, process_sft

from .conftest import REAL_SAMPLE

PKG = "dgx_spark_summary_from_human_feedback"
LENGTHS = Lengths(query=512, response=133)


def real_rows(name: str, n: int) -> list[dict]:
    with (REAL_SAMPLE / name).open() as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def write_jsonl(path, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def typed(row: dict, confidence: int = 7) -> dict:
    """A comparison row whose optional fields carry values (the validation file of the release)."""
    row = json.loads(json.dumps(row))
    row["summaries"][0]["note"] = "ref summary is vague"
    row["extra"]["confidence"] = confidence
    row["split"] = "valid2"
    return row


def test_a_directory_file_decides_the_split_of_its_rows(tmp_path, tokenizer):
    rows = real_rows("comparisons.jsonl", 100)
    assert {r["split"] for r in rows} == {"valid1"}  # every row says "validation" about itself
    write_jsonl(tmp_path / "data" / "train.jsonl", rows[:60])
    write_jsonl(tmp_path / "data" / "validation.jsonl", rows[60:])
    report = Report()
    out = process_comparisons(
        load_raw(str(tmp_path / "data")), tokenizer, LENGTHS, long_response="truncate", report=report
    )
    assert sorted(out) == ["train", "validation"]
    assert out["train"]["id"] == [r["info"]["id"] for r in rows[:60]]
    assert out["validation"]["id"] == [r["info"]["id"] for r in rows[60:]]
    assert set(out["train"]["split"]) == {"valid1"}  # the row's own field is kept as data, not obeyed
    assert report.relabelled == {"train (rows say 'valid1')": 60}  # counted and printed, not silent


def test_rows_without_a_named_source_go_by_their_own_split_field(tmp_path, tokenizer):
    """OpenAI's release files (batch3.json, ...) and a single file: each row's `split` decides."""
    rows = real_rows("comparisons.jsonl", 6)
    rows[0]["split"] = rows[1]["split"] = "train"
    path = write_jsonl(tmp_path / "comparisons.jsonl", rows)
    out = process_comparisons(load_raw(str(path)), tokenizer, LENGTHS, long_response="truncate")
    assert len(out["train"]) == 2 and len(out["validation"]) == 4


def test_comparison_files_with_null_and_typed_optional_fields_load_with_the_hub_schema(tmp_path, tokenizer):
    rows = real_rows("comparisons.jsonl", 40)
    write_jsonl(tmp_path / "data" / "train.jsonl", rows[:30])  # note / confidence null, as in the sample
    write_jsonl(tmp_path / "data" / "validation.jsonl", [typed(r) for r in rows[30:]])
    raw = load_raw(str(tmp_path / "data"), features=COMPARISON_FEATURES)
    assert raw["train"].features["extra"]["confidence"] == datasets.Value("int32")  # the Hub's type, not "null"
    assert raw["train"].features["summaries"].feature["note"] == datasets.Value("string")
    out = process_comparisons(raw, tokenizer, LENGTHS, long_response="truncate")
    assert set(out["validation"]["confidence"]) == {7} and set(out["train"]["confidence"]) == {None}


def test_a_value_of_the_wrong_type_names_its_file_line_and_field(tmp_path):
    rows = real_rows("comparisons.jsonl", 5)
    rows[3]["extra"]["confidence"] = "very sure"
    path = write_jsonl(tmp_path / "comparisons.jsonl", rows)
    with pytest.raises(
        InputError,
        match=r"comparisons.jsonl line 4: row oai1b-0003: field 'extra.confidence' is str, expected an integer",
    ):
        load_raw(str(path), features=COMPARISON_FEATURES)


def test_sft_files_whose_columns_differ_in_type_between_files_load_each_on_its_own(tmp_path, tokenizer):
    """The same class in the SFT loader: a column outside the schema, null throughout the train
    file and text in the validation file, once failed as "Couldn't cast array of type string to
    null"; a number where the schema says text names its file, line and field."""
    rows = real_rows("sft.jsonl", 20)
    write_jsonl(tmp_path / "data" / "train.jsonl", [{**r, "note": None} for r in rows[:12]])
    write_jsonl(tmp_path / "data" / "validation.jsonl", [{**r, "note": "checked"} for r in rows[12:]])
    raw = load_raw(str(tmp_path / "data"), features=SFT_FEATURES)
    assert raw["validation"][0]["note"] == "checked"
    out = process_sft(raw, tokenizer, Lengths(512, 63), long_response="truncate")
    assert len(out["train"]) == 12 and len(out["validation"]) == 8
    write_jsonl(tmp_path / "ids" / "train.jsonl", [{**r, "id": i} for i, r in enumerate(rows)])
    with pytest.raises(InputError, match=r"train.jsonl line 1: row 0: field 'id' is int, expected a string"):
        load_raw(str(tmp_path / "ids"), features=SFT_FEATURES)


def test_a_stage_never_starts_on_a_missing_split(tmp_path, tokenizer):
    write_jsonl(tmp_path / "data" / "validation.jsonl", real_rows("comparisons.jsonl", 8))
    with pytest.raises(InputError, match=r"split\(s\) \['train'\] missing"):
        load_stage_data(str(tmp_path / "data"), tokenizer, "comparisons", ("train", "validation"), LENGTHS)


def test_processing_cli_on_release_shaped_files_writes_both_splits(tmp_path):
    """The reported failure end to end: 60 + 40 real rows, exit 0 must mean both splits saved."""
    rows = real_rows("comparisons.jsonl", 100)
    write_jsonl(tmp_path / "data" / "train.jsonl", rows[:60])
    write_jsonl(tmp_path / "data" / "validation.jsonl", [typed(r) for r in rows[60:]])
    from dgx_spark_summary_from_human_feedback import tiny

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            f"{PKG}.process_comparison_dataset",
            "--dataset",
            str(tmp_path / "data"),
            "--tokenizer",
            str(tiny.TOKENIZER_DIR),
            "--output-dir",
            str(tmp_path / "out"),
            "--long-response",
            "truncate",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    saved = datasets.load_from_disk(str(tmp_path / "out"))
    assert len(saved["train"]) == 60 and len(saved["validation"]) == 40
