"""The TL;DR pipeline: query format and truncation, [PAD] != EOS, labels, splits, bad rows, CLIs."""

import json
import subprocess
import sys

import datasets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from dgx_spark_summary_from_human_feedback import tiny
from dgx_spark_summary_from_human_feedback.data import QUERY_FORMAT, encode, load_raw, truncate_query
from dgx_spark_summary_from_human_feedback.errors import InputError
from dgx_spark_summary_from_human_feedback.preprocess import Report, process_comparisons, process_sft

from .conftest import REAL_SAMPLE, needs_real_sample

PKG = "dgx_spark_summary_from_human_feedback"


def openai_truncate(tokenizer, fields, length):
    """The reference algorithm (OpenAI/N+): re-tokenise after every cut at the last newline."""
    fields = dict(fields)
    while len(encode(tokenizer, QUERY_FORMAT.format(**fields))) > length:
        if "\n" not in fields["post"]:
            return None  # OpenAI then cuts characters; ours cuts tokens (tested separately)
        fields["post"] = fields["post"][: fields["post"].rindex("\n")]
    return fields


def sft_dataset(rows, split="train"):
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def row(post="A post.\n\nSecond paragraph.", title="A title", subreddit="tifu", summary="short summary", id="r0"):
    return {"id": id, "subreddit": subreddit, "title": title, "post": post, "summary": summary}


# ---- tokenizer


def test_tiny_tokenizer_reproduces_the_qwen_trap_and_load_tokenizer_fixes_it(tokenizer):
    raw = AutoTokenizer.from_pretrained(str(tiny.TOKENIZER_DIR))
    assert raw.pad_token_id == raw.eos_token_id  # the trap: pad == EOS, as in Qwen2.5
    assert tokenizer.pad_token == "[PAD]"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.pad_token_id < tiny.MODEL_VOCAB_ROWS  # fits the spare embedding rows: no resize
    assert tokenizer.padding_side == "left"


def test_tiny_tokenizer_build_is_deterministic_and_matches_shipped(tmp_path):
    tiny.build_tokenizer(tmp_path / "a")
    tiny.build_tokenizer(tmp_path / "b")
    a = json.loads((tmp_path / "a" / "tokenizer.json").read_text())
    b = json.loads((tmp_path / "b" / "tokenizer.json").read_text())
    shipped = json.loads((tiny.TOKENIZER_DIR / "tokenizer.json").read_text())
    assert a["model"]["vocab"] == b["model"]["vocab"] == shipped["model"]["vocab"]
    assert a["model"]["merges"] == shipped["model"]["merges"]


def test_shipped_fixtures_match_their_generator():
    for rel, text in tiny.fixture_texts().items():
        assert (tiny.FIXTURES / rel).read_text() == text, f"fixtures/{rel} is stale: run python -m {PKG}.tiny"


def test_fixtures_cover_the_edge_cases(tokenizer):
    sft, comparisons = tiny.make_fixture_rows()
    train = sft["train"]
    assert len(train) >= 64 and len(comparisons) >= 64
    assert len({r["subreddit"] for r in train}) >= 3
    assert any(r["post"].count("\n") > 20 and len(encode(tokenizer, r["post"])) > 512 for r in train)
    assert any("\n" not in r["post"] and len(encode(tokenizer, r["post"])) > 512 for r in train)
    assert any(len(encode(tokenizer, r["title"])) > 512 for r in train)
    assert any("🙂" in r["post"] for r in train)
    assert any(len(encode(tokenizer, " " + r["summary"])) > 63 for r in train)
    assert any(c["batch"] == "cnndm0" for c in comparisons)


# ---- query format and truncation


def test_short_query_is_exact_and_left_padded_to_512(tokenizer):
    ds = process_sft(sft_dataset([row()]), tokenizer)["train"][0]
    assert ds["query"] == "SUBREDDIT: r/tifu\n\nTITLE: A title\n\nPOST: A post.\n\nSecond paragraph.\n\nTL;DR:"
    ids = encode(tokenizer, ds["query"])
    assert len(ds["query_token"]) == 512
    assert ds["query_token"][-len(ids) :] == ids
    assert ds["query_token"][: 512 - len(ids)] == [tokenizer.pad_token_id] * (512 - len(ids))
    assert ds["query_token_len"] == len(ids)


def test_long_post_is_cut_at_its_last_newline_that_fits(tokenizer):
    post = "\n".join(f"Line {i} of a very long story about my roommate and the car." for i in range(300))
    ids, fields, how = truncate_query(tokenizer, {"subreddit": "tifu", "title": "t", "post": post}, length=512)
    assert how == "newline:post" and len(ids) <= 512
    cut = len(fields["post"])
    assert post[cut] == "\n" and fields["post"] == post[:cut]
    next_cut = post.index("\n", cut + 1)  # one more line would not fit
    assert len(encode(tokenizer, QUERY_FORMAT.format(subreddit="tifu", title="t", post=post[:next_cut]))) > 512


def test_truncation_matches_the_sequential_openai_loop(tokenizer):
    sft, _ = tiny.make_fixture_rows()
    checked = 0
    for r in sft["train"] + sft["validation"]:
        fields = {"subreddit": r["subreddit"], "title": r["title"], "post": r["post"]}
        expected = openai_truncate(tokenizer, fields, 512)
        if expected is None:
            continue
        _, got, _ = truncate_query(tokenizer, fields, length=512)
        assert got == expected
        checked += 1
    assert checked > 100


def test_post_without_newline_is_cut_by_tokens(tokenizer):
    post = "word " * 2000
    ids, fields, how = truncate_query(tokenizer, {"subreddit": "tifu", "title": "t", "post": post}, length=512)
    assert how == "tokens:post" and len(ids) <= 512
    assert post.startswith(fields["post"]) and len(fields["post"]) > 1000  # most of the budget used
    assert len(ids) >= 510


def test_title_too_long_terminates_by_cutting_the_title(tokenizer):
    title = "title words " * 1000
    ids, fields, how = truncate_query(tokenizer, {"subreddit": "tifu", "title": title, "post": "a\nb\nc"}, length=512)
    assert how == "tokens:title" and fields["post"] == "" and len(ids) <= 512
    assert title.startswith(fields["title"])


class CountingTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("lines", [100, 3000])
def test_tokenizations_per_row_grow_logarithmically(tokenizer, lines):
    counting = CountingTokenizer(tokenizer)
    post = "\n".join(f"line {i}" for i in range(lines))
    truncate_query(counting, {"subreddit": "tifu", "title": "t", "post": post}, length=512)
    assert counting.calls <= 2 * 12 + 3  # log2(3000) ~ 12; the OpenAI loop would need ~lines calls


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    title=st.text(st.characters(exclude_categories=("Cs",)), max_size=300),
    post=st.text(
        alphabet=st.sampled_from(list("ab \n\t.🙂é日")) | st.characters(exclude_categories=("Cs",)),
        min_size=1,
        max_size=1500,
    ),
    length=st.integers(min_value=40, max_value=200),
)
def test_random_queries_always_fit_and_never_hang(tokenizer, title, post, length):
    fields = {"subreddit": "tifu", "title": title, "post": post}
    ids, cut, how = truncate_query(tokenizer, fields, length=length)
    assert len(ids) <= length
    assert post.startswith(cut["post"]) and title.startswith(cut["title"])
    if how == "newline:post":
        assert post[len(cut["post"])] == "\n"


# ---- SFT rows


def test_sft_response_labels_keep_eos_and_mask_query_and_padding(tokenizer):
    out = process_sft(sft_dataset([row(summary="my dog ate my car")]), tokenizer)["train"][0]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    response = encode(tokenizer, " my dog ate my car") + [eos]
    assert out["reference_response_token"][: len(response)] == response
    assert out["reference_response_token_len"] == len(response)
    assert out["reference_response"] == " my dog ate my car" + tokenizer.eos_token
    q = out["query_token_len"]
    ids, labels = out["query_reference_response_token"], out["query_reference_response_token_response_label"]
    assert len(ids) == len(labels) == 575
    assert ids[: q + len(response)] == out["query_token"][-q:] + response
    assert ids[q + len(response) :] == [pad] * (575 - q - len(response))
    assert labels[:q] == [-100] * q
    assert labels[q : q + len(response)] == response and labels[q + len(response) - 1] == eos
    assert set(labels[q + len(response) :]) == {-100}
    assert out["query_reference_response_token_len"] == q + len(response)
    assert pad not in ids[: q + len(response)]  # pad never appears inside real content


def test_long_summary_is_dropped_and_counted_or_cut_keeping_eos(tokenizer):
    rows = [row(id="ok"), row(id="long", summary="word " * 200)]
    report = Report()
    out = process_sft(sft_dataset(rows), tokenizer, report=report)["train"]
    assert out["id"] == ["ok"] and report.dropped == {"response over 63 tokens": 1}
    out = process_sft(sft_dataset(rows), tokenizer, long_response="truncate")["train"]
    assert out["reference_response_token_len"] == [out["reference_response_token_len"][0], 63]
    assert out["reference_response_token"][1][62] == tokenizer.eos_token_id


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"post": None}, "'post' is null"),
        ({"post": "  "}, "'post' is empty"),
        ({"title": 5}, "'title' is int"),
        ({"summary": None}, "'summary' is null"),
    ],
)
def test_bad_sft_rows_name_row_and_field_or_are_skipped(tokenizer, bad, field):
    rows = [row(id="good"), {**row(id="bad-7"), **bad}]
    if bad.get("title") == 5:  # Arrow cannot hold int and str in one column: test the row check directly
        from dgx_spark_summary_from_human_feedback.preprocess import sft_query_fields

        with pytest.raises(InputError, match="row bad-7: field 'title' is int"):
            sft_query_fields(rows[1])
        return
    with pytest.raises(InputError, match=f"row bad-7: field {field}"):
        process_sft(sft_dataset(rows), tokenizer)
    report = Report()
    out = process_sft(sft_dataset(rows), tokenizer, skip_bad_rows=True, report=report)["train"]
    assert out["id"] == ["good"] and sum(report.dropped.values()) == 1


def test_unpaired_surrogate_is_a_row_error_not_a_tokenizer_traceback():
    from dgx_spark_summary_from_human_feedback.preprocess import sft_query_fields

    with pytest.raises(InputError, match="row r0: field 'post' holds an unpaired surrogate"):
        sft_query_fields(row(post="bad \ud800 text"))


def test_processing_refuses_a_tokenizer_with_pad_equal_to_eos():
    raw = AutoTokenizer.from_pretrained(str(tiny.TOKENIZER_DIR))
    with pytest.raises(InputError, match="equals EOS"):
        process_sft(sft_dataset([row()]), raw)


# ---- comparisons


def comparison(choice=0, split="train", batch="batch3", texts=(" good summary", " lol idk"), id="c0"):
    return {
        "info": {
            "id": id,
            "post": "My post.\n\nMore.",
            "title": "T",
            "subreddit": "tifu",
            "site": None,
            "article": None,
        },
        "summaries": [
            {"text": texts[0], "policy": "sup2", "note": None},
            {"text": texts[1], "policy": "ref", "note": None},
        ],
        "choice": choice,
        "worker": "w",
        "batch": batch,
        "split": split,
        "extra": {"confidence": 7},
    }


def test_comparisons_pick_chosen_by_choice_append_eos_and_route_splits(tokenizer):
    cnndm = comparison(split="valid2", batch="cnndm0", id="cnn")
    cnndm["info"].update(post=None, title=None, subreddit=None, article="Line one.\nLine two.")
    # a source not named as a split (one file of OpenAI's release): each row's own field decides
    raw = datasets.DatasetDict(
        {"batch3": datasets.Dataset.from_list([comparison(1), comparison(0, split="valid1"), cnndm])}
    )
    out = process_comparisons(raw, tokenizer)
    assert sorted(out) == ["train", "validation", "validation_cnndm"]
    t = out["train"][0]
    assert t["chosen"] == " lol idk" + tokenizer.eos_token and t["rejected"] == " good summary" + tokenizer.eos_token
    assert t["chosen_policy"] == "ref" and t["policies"] == "ref--sup2" and t["confidence"] == 7
    chosen = encode(tokenizer, " lol idk") + [tokenizer.eos_token_id]  # no extra leading space
    assert t["chosen_token"][: t["chosen_token_len"]] == chosen and len(t["chosen_token"]) == 133
    q = t["query_token_len"]
    assert t["query_chosen_token"][: q + len(chosen)] == t["query_token"][-q:] + chosen
    assert t["query_chosen_token_response_label"][:q] == [-100] * q
    assert len(t["query_chosen_token"]) == 512 + 133
    c = out["validation_cnndm"][0]
    assert c["query"] == "Article:\nLine one.\nLine two.\n\nTL;DR:" and len(c["query_token"]) == 1919


@pytest.mark.parametrize(
    "change, message",
    [
        ({"choice": 2}, "field 'choice' is 2"),
        ({"summaries": [{"text": " only one", "policy": "a", "note": None}]}, "needs two summaries"),
        (
            {"info": {"id": "c0", "post": None, "title": "T", "subreddit": "tifu", "site": None, "article": None}},
            "'info.post' is null",
        ),
    ],
)
def test_bad_comparisons_give_one_line_errors(tokenizer, change, message):
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_list([{**comparison(), **change}])})
    with pytest.raises(InputError, match=f"row c0: .*{message}"):
        process_comparisons(raw, tokenizer)


# ---- local loading and the CLIs


def test_load_raw_errors_are_one_line(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_raw(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match="empty.jsonl"):
        load_raw(str(tmp_path / "empty.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="unsupported file type"):
        load_raw(str(tmp_path / "x.csv"))


def run_cli(module, *args):
    return subprocess.run([sys.executable, "-m", f"{PKG}.{module}", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module", ["process_sft_dataset", "process_comparison_dataset"])
def test_help_documents_every_option(module):
    import importlib
    from dataclasses import fields

    result = run_cli(module, "--help")
    assert result.returncode == 0
    config = importlib.import_module(f"{PKG}.{module}").Config
    for f in fields(config):
        assert f"--{f.name.replace('_', '-')}" in result.stdout
    assert "split name given to a single local file" in result.stdout or "split assumed" in result.stdout


def test_cli_error_is_one_line_without_traceback(tmp_path):
    result = run_cli(
        "process_sft_dataset",
        "--dataset",
        str(tmp_path / "nope.jsonl"),
        "--tokenizer",
        str(tiny.TOKENIZER_DIR),
        "--output-dir",
        str(tmp_path / "o"),
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: dataset path {tmp_path / 'nope.jsonl'} does not exist"]


def test_fixture_cli_writes_splits_card_and_stats(tmp_path):
    out = tmp_path / "sft"
    result = run_cli(
        "process_sft_dataset",
        "--dataset",
        str(tiny.SFT_DIR),
        "--tokenizer",
        str(tiny.TOKENIZER_DIR),
        "--output-dir",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert (
        "query_token_len" in result.stdout
        and "p95" in result.stdout
        and "dropped: response over 63 tokens" in result.stdout
    )
    ds = datasets.load_from_disk(str(out))
    assert sorted(ds) == ["test", "train", "validation"]
    card = (out / "README.md").read_text()
    assert "query_reference_response_token_response_label" in card and "response_length" in card


@needs_real_sample
def test_real_sample_sft_all_rows_512_tokens_cut_at_newlines(tmp_path, tokenizer):
    out = tmp_path / "sft"
    result = run_cli(
        "process_sft_dataset",
        "--dataset",
        str(REAL_SAMPLE / "sft.jsonl"),
        "--tokenizer",
        str(tiny.TOKENIZER_DIR),
        "--output-dir",
        str(out),
        "--long-response",
        "truncate",
    )
    assert result.returncode == 0, result.stderr
    assert "max" in result.stdout and "truncated:" in result.stdout
    ds = datasets.load_from_disk(str(out))["train"]
    assert len(ds) == 1000
    assert all(len(q) == 512 for q in ds["query_token"])
    source = {json.loads(line)["id"]: json.loads(line) for line in (REAL_SAMPLE / "sft.jsonl").open()}
    cut_at_newline = 0
    for r in ds:
        original = source[r["id"]]["post"]
        assert original.startswith(r["post"])
        if r["post"] != original and "\n" in original:
            assert original[len(r["post"])] == "\n" or "\n" not in r["post"]
            cut_at_newline += original[len(r["post"])] == "\n"
    assert cut_at_newline > 100


@needs_real_sample
def test_real_sample_comparisons(tmp_path):
    out = tmp_path / "cmp"
    result = run_cli(
        "process_comparison_dataset",
        "--dataset",
        str(REAL_SAMPLE / "comparisons.jsonl"),
        "--tokenizer",
        str(tiny.TOKENIZER_DIR),
        "--output-dir",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    ds = datasets.load_from_disk(str(out))
    assert list(ds) == ["validation"]  # the sample's rows are valid1
    assert len(ds["validation"]) + int(result.stdout.split("response over 133 tokens: ")[1].split()[0]) == 1000
    assert all(len(q) == 512 for q in ds["validation"]["query_token"])
