"""Building the processed TL;DR datasets from raw rows: validation, columns, the report.

The column names follow the N+ preprocessed datasets
(`vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_*` and
`vwxyzjn/summarize_from_feedback_oai_preprocessing_*`) so either feeds our stages. A stage given
raw rows processes them here too (`load_stage_data`), with its own tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase

from .data import (
    CNNDM_QUERY_FORMAT,
    COMPARISON_FEATURES,
    SFT_FEATURES,
    QUERY_FORMAT,
    Lengths,
    check_pad_is_not_eos,
    encode,
    fit_queries,
    is_processed,
    left_pad,
    load_processed,
    load_raw,
    response_ids,
    right_pad,
)
from .errors import InputError

CNNDM_BATCHES = ("batch0_cnndm", "cnndm0", "cnndm2")  # N+: validation rows of these go out of distribution

# ---------------------------------------------------------------------------------------------
# row validation: one-line errors naming the row id and field


def _row_id(row: dict) -> str:
    info = row.get("info") if isinstance(row.get("info"), dict) else row
    return str(info.get("id", "?"))


def _text(row: dict, key: str, where: str, *, allow_empty: bool = True) -> str:
    if key not in row:
        raise InputError(f"row {_row_id(row)}: field '{where}{key}' is missing")
    value = row[key]
    if value is None:
        raise InputError(f"row {_row_id(row)}: field '{where}{key}' is null")
    if not isinstance(value, str):
        raise InputError(f"row {_row_id(row)}: field '{where}{key}' is {type(value).__name__}, expected a string")
    if not allow_empty and not value.strip():
        raise InputError(f"row {_row_id(row)}: field '{where}{key}' is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(
            f"row {_row_id(row)}: field '{where}{key}' holds an unpaired surrogate (invalid Unicode): fix the source "
            "text"
        ) from None
    return value


def sft_query_fields(row: dict) -> dict[str, str]:
    """Query fields of a `vwxyzjn/summarize_from_feedback_tldr_3_filtered` row."""
    return {
        "subreddit": _text(row, "subreddit", ""),
        "title": _text(row, "title", ""),
        "post": _text(row, "post", "", allow_empty=False),
    }


def comparison_query_fields(row: dict) -> tuple[dict[str, str], bool]:
    """Query fields of an `openai/summarize_from_feedback` comparison; True for CNN/DM articles."""
    info = row.get("info")
    if not isinstance(info, dict):
        raise InputError(f"row {_row_id(row)}: field 'info' is missing or not an object")
    if info.get("post") is None and isinstance(info.get("article"), str):
        return {"article": _text(info, "article", "info.", allow_empty=False)}, True
    return {
        "subreddit": _text(info, "subreddit", "info."),
        "title": _text(info, "title", "info."),
        "post": _text(info, "post", "info.", allow_empty=False),
    }, False


def comparison_pair(row: dict) -> tuple[dict, dict]:
    """(chosen, rejected) summaries of a comparison row."""
    summaries = row.get("summaries")
    if not isinstance(summaries, list) or len(summaries) < 2:
        raise InputError(f"row {_row_id(row)}: field 'summaries' needs two summaries")
    choice = row.get("choice")
    if isinstance(choice, bool) or choice not in (0, 1):
        raise InputError(f"row {_row_id(row)}: field 'choice' is {choice!r}, expected 0 or 1")
    for i, summary in enumerate(summaries[:2]):
        if not isinstance(summary, dict):
            raise InputError(f"row {_row_id(row)}: field 'summaries[{i}]' is not an object")
        _text(summary, "text", f"summaries[{i}].", allow_empty=False)
    return summaries[choice], summaries[1 - choice]


# ---------------------------------------------------------------------------------------------
# processing whole datasets


@dataclass
class Report:
    """What processing did to the rows: counts by reason, for the CLI and the dataset card."""

    rows_in: Counter = field(default_factory=Counter)
    rows_out: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    relabelled: Counter = field(default_factory=Counter)
    """rows whose own `split` field disagreed with the file they came from (the file decides)"""


def format_report(report: Report, stats: dict) -> str:
    """The report as text: rows in and out per split (with length statistics when given), cut and dropped rows
    by reason."""
    lines = []
    for split in stats:
        lines.append(f"{split}: {report.rows_in[split]} rows in, {report.rows_out[split]} out")
        for col, s in stats[split].items():
            lines.append(f"  {col:<40} max {s['max']:>5}  p95 {s['p95']:>7.1f}  mean {s['mean']:>7.1f}")
    lines.append("truncated: " + (", ".join(f"{k}: {v}" for k, v in sorted(report.truncated.items())) or "none"))
    lines.append("dropped: " + (", ".join(f"{k}: {v}" for k, v in sorted(report.dropped.items())) or "none"))
    if report.relabelled:
        lines.append(
            "split taken from the file, not the row's own split field: "
            + ", ".join(f"{k}: {v}" for k, v in sorted(report.relabelled.items()))
        )
    return "\n".join(lines)


def _query_response(
    query_ids: list[int], response_ids: list[int], total: int, pad_id: int
) -> tuple[list[int], list[int]]:
    """Unpadded query + response, right padded; labels -100 on query and padding, EOS kept."""
    ids = query_ids + response_ids
    labels = [-100] * len(query_ids) + response_ids + [-100] * (total - len(ids))
    return right_pad(ids, total, pad_id), labels


def _rows(batch: dict) -> list[dict]:
    """The rows of a `Dataset.map(batched=True)` batch (a dict of columns)."""
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


def _parse_rows(rows: list[dict], parse, split: str, skip_bad_rows: bool, report: Report) -> list[tuple]:
    """(row, *parse(row)) per row. A bad row (`parse` raises InputError) stops the run with its
    one-line message, or with --skip-bad-rows is counted by reason and skipped."""
    valid = []
    for row in rows:
        report.rows_in[split] += 1
        try:
            valid.append((row, *parse(row)))
        except InputError as e:
            if not skip_bad_rows:
                raise InputError(f"{e}: fix that row or pass --skip-bad-rows to count and skip such rows") from None
            report.dropped[f"bad row ({str(e).split(': ', 1)[1]})"] += 1
    return valid


def _stop_if_emptied(splits: list[str], report: Report) -> None:
    """Rows went into these splits but none came out: stop with one line, not in a later KeyError."""
    if splits:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(report.dropped.items()))
        raise InputError(
            f"split {splits[0]!r}: all {report.rows_in[splits[0]]} rows were dropped (drops in all splits: {reasons}): "
            "fix the rows, raise --response-length or pass --long-response truncate"
        )


def process_sft(
    raw: datasets.DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    lengths: Lengths = Lengths(),
    *,
    long_response: str = "drop",
    skip_bad_rows: bool = False,
    report: Report | None = None,
) -> datasets.DatasetDict:
    """SFT columns: query, query_token, reference_response(_token, _len), query_reference_response..."""
    check_pad_is_not_eos(tokenizer)
    report = report if report is not None else Report()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    eos_text = tokenizer.decode([eos])

    def process(batch: dict, split: str) -> dict:
        out: dict[str, list] = {k: [] for k in SFT_COLUMNS}
        valid = _parse_rows(
            _rows(batch),
            lambda row: (sft_query_fields(row), _text(row, "summary", "", allow_empty=False)),
            split,
            skip_bad_rows,
            report,
        )
        queries = fit_queries(tokenizer, [fields for _, fields, _ in valid], lengths.query)
        # the dataset's summaries have no leading space: the response is " " + summary + EOS
        responses = response_ids(tokenizer, [" " + summary for _, _, summary in valid], lengths.response, long_response)
        for (row, _, summary), (query_ids, fields, how), (summary_ids, cut) in zip(valid, queries, responses):
            response_text = " " + summary
            if summary_ids is None:
                report.dropped[f"response over {lengths.response} tokens"] += 1
                continue
            if how:
                report.truncated[f"query cut ({how})"] += 1
            if cut:
                report.truncated[f"response cut to {lengths.response} tokens"] += 1
            qr_ids, labels = _query_response(query_ids, summary_ids, lengths.query_response, pad)
            report.rows_out[split] += 1
            out["id"].append(str(row.get("id", "")))
            out["subreddit"].append(fields["subreddit"])
            out["title"].append(fields["title"])
            out["post"].append(fields["post"])
            out["summary"].append(summary)
            out["query"].append(QUERY_FORMAT.format(**fields))
            out["query_token"].append(left_pad(query_ids, lengths.query, pad))
            out["query_token_len"].append(len(query_ids))
            out["reference_response"].append(response_text + eos_text)
            out["reference_response_token"].append(right_pad(summary_ids, lengths.response, pad))
            out["reference_response_token_len"].append(len(summary_ids))
            out["query_reference_response"].append(QUERY_FORMAT.format(**fields) + response_text + eos_text)
            out["query_reference_response_token"].append(qr_ids)
            out["query_reference_response_token_response_label"].append(labels)
            out["query_reference_response_token_len"].append(len(query_ids) + len(summary_ids))
        return out

    processed = datasets.DatasetDict(
        {
            split: ds.map(
                process,
                fn_kwargs={"split": split},
                batched=True,
                remove_columns=ds.column_names,
                load_from_cache_file=False,
                desc=f"SFT {split}",
            )
            for split, ds in raw.items()
        }
    )
    # an empty split has no columns either
    _stop_if_emptied([split for split, ds in processed.items() if len(ds) == 0], report)
    return processed


SFT_COLUMNS = [
    "id",
    "subreddit",
    "title",
    "post",
    "summary",
    "query",
    "query_token",
    "query_token_len",
    "reference_response",
    "reference_response_token",
    "reference_response_token_len",
    "query_reference_response",
    "query_reference_response_token",
    "query_reference_response_token_response_label",
    "query_reference_response_token_len",
]


# A source (a Hub split, a local file) with one of these names decides the split of all its rows.
NAMED_SPLITS = ("train", "validation", "valid1", "valid2", "test", "validation_cnndm")


def comparison_split(row: dict, source_split: str) -> str:
    """N+ splits: train, validation, and validation_cnndm for the CNN/DM batches.

    The file a row comes from decides (train.jsonl -> train, validation.jsonl -> validation),
    whatever the row's own `split` field says: the original release's rows say "valid1" or
    "valid2", and obeying them emptied a user's train split (issue 14). Rows of a source that is
    not named as a split (a single file, OpenAI's batch files) go by their own field, default train.
    """
    split = source_split if source_split in NAMED_SPLITS else (row.get("split") or "train")
    if split == "train":
        return "train"
    return "validation_cnndm" if row.get("batch") in CNNDM_BATCHES else "validation"


def process_comparisons(
    raw: datasets.DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    lengths: Lengths = Lengths(response=133),
    *,
    long_response: str = "drop",
    skip_bad_rows: bool = False,
    report: Report | None = None,
) -> datasets.DatasetDict:
    """Preference columns: query, chosen/rejected (+ _token, _token_len), query_chosen_token, ..."""
    check_pad_is_not_eos(tokenizer)
    report = report if report is not None else Report()
    pad = tokenizer.pad_token_id
    eos_text = tokenizer.decode([tokenizer.eos_token_id])
    parts: dict[str, list[datasets.Dataset]] = {}

    def process(batch: dict, source_split: str, target: str) -> dict:
        out: dict[str, list] = {k: [] for k in COMPARISON_COLUMNS}
        rows = [row for row in _rows(batch) if comparison_split(row, source_split) == target]
        for own in (row.get("split") for row in rows):
            if source_split in NAMED_SPLITS and own and (own == "train") != (target == "train"):
                report.relabelled[f"{source_split} (rows say {own!r})"] += 1
        valid = _parse_rows(
            rows, lambda row: (*comparison_query_fields(row), *comparison_pair(row)), target, skip_bad_rows, report
        )
        reddit = iter(fit_queries(tokenizer, [f for _, f, cnndm, _, _ in valid if not cnndm], lengths.query))
        articles = iter(
            fit_queries(
                tokenizer,
                [f for _, f, cnndm, _, _ in valid if cnndm],
                lengths.cnndm_query,
                CNNDM_QUERY_FORMAT,
                ("article",),
            )
        )
        # the comparison summaries already begin with a space: only EOS is appended
        texts = [s["text"] for _, _, _, chosen, rejected in valid for s in (chosen, rejected)]
        summaries = iter(response_ids(tokenizer, texts, lengths.response, long_response))
        for row, _, cnndm, chosen, rejected in valid:
            query_ids, fields, how = next(articles) if cnndm else next(reddit)
            query_len = lengths.cnndm_query if cnndm else lengths.query
            query = (CNNDM_QUERY_FORMAT if cnndm else QUERY_FORMAT).format(**fields)
            (chosen_ids, chosen_cut), (rejected_ids, rejected_cut) = next(summaries), next(summaries)
            if chosen_ids is None or rejected_ids is None:
                report.dropped[f"response over {lengths.response} tokens"] += 1
                continue
            if how:
                report.truncated[f"query cut ({how})"] += 1
            if chosen_cut or rejected_cut:
                report.truncated[f"response cut to {lengths.response} tokens"] += 1
            report.rows_out[target] += 1
            pair = {"chosen": (chosen, chosen_ids), "rejected": (rejected, rejected_ids)}
            _append_comparison(out, row, query, query_ids, query_len, pair, lengths.response, pad, eos_text)
        return out

    targets = ("train", "validation", "validation_cnndm")
    for source_split, ds in raw.items():
        for target in targets:
            part = ds.map(
                process,
                fn_kwargs={"source_split": source_split, "target": target},
                batched=True,
                remove_columns=ds.column_names,
                load_from_cache_file=False,
                desc=f"comparisons {source_split} -> {target}",
            )
            if len(part):
                parts.setdefault(target, []).append(part)
    _stop_if_emptied([target for target in targets if report.rows_in[target] and target not in parts], report)
    # One type per column in every split, or push_to_hub refuses the DatasetDict: a split whose
    # rows all lack extra.confidence (the CNN/DM batches) would type that column as null.
    return datasets.DatasetDict(
        {
            t: datasets.concatenate_datasets(p).cast_column("confidence", datasets.Value("int64"))
            for t, p in parts.items()
        }
    )


def _append_comparison(
    out: dict,
    row: dict,
    query: str,
    query_ids: list[int],
    query_len: int,
    pair: dict,
    response_len: int,
    pad: int,
    eos_text: str,
) -> None:
    """One comparison's columns appended to `out`; `pair` maps chosen/rejected to (summary, token ids)."""
    info = row["info"]
    extra = row.get("extra") if isinstance(row.get("extra"), dict) else {}
    out["id"].append(str(info.get("id", "")))
    out["query"].append(query)
    out["query_token"].append(left_pad(query_ids, query_len, pad))
    out["query_token_len"].append(len(query_ids))
    for key, (summary, ids) in pair.items():
        qr_ids, labels = _query_response(query_ids, ids, query_len + response_len, pad)
        out[key].append(summary["text"] + eos_text)
        out[f"{key}_token"].append(right_pad(ids, response_len, pad))
        out[f"{key}_token_len"].append(len(ids))
        out[f"query_{key}_token"].append(qr_ids)
        out[f"query_{key}_token_response_label"].append(labels)
        out[f"query_{key}_token_len"].append(len(query_ids) + len(ids))
        out[f"{key}_policy"].append(str(summary.get("policy")))
    policies = pair["chosen"][0].get("policy"), pair["rejected"][0].get("policy")
    out["policies"].append("--".join(sorted(str(p) for p in policies)))
    out["batch"].append(row.get("batch"))
    out["worker"].append(row.get("worker"))
    out["split"].append(row.get("split"))
    out["confidence"].append(extra.get("confidence"))


COMPARISON_COLUMNS = [
    "id",
    "query",
    "query_token",
    "query_token_len",
    "chosen",
    "chosen_token",
    "chosen_token_len",
    "query_chosen_token",
    "query_chosen_token_response_label",
    "query_chosen_token_len",
    "rejected",
    "rejected_token",
    "rejected_token_len",
    "query_rejected_token",
    "query_rejected_token_response_label",
    "query_rejected_token_len",
    "chosen_policy",
    "rejected_policy",
    "policies",
    "batch",
    "worker",
    "split",
    "confidence",
]


RAW_FEATURES = {"sft": SFT_FEATURES, "comparisons": COMPARISON_FEATURES}  # the Hub schema local files are read with


def load_stage_data(
    dataset: str,
    tokenizer: PreTrainedTokenizerBase,
    kind: str,
    splits: tuple[str, ...],
    lengths: Lengths,
    revision: str | None = None,
) -> datasets.DatasetDict:
    """What a stage trains on: a processed dataset as is, or raw TL;DR data processed now.

    `kind` is "sft" or "comparisons". Raw rows are processed with the run's tokenizer, so the
    ids always match the model; a processed dataset must have been made with the same vocabulary.
    """
    key = "query_reference_response_token" if kind == "sft" else "query_chosen_token"
    if is_processed(dataset):
        ds = load_processed(dataset, splits)
    else:
        # OpenAI's raw repository holds two configs; a processed one on the Hub (ours, N+'s) only "default"
        hub_config = "comparisons" if kind == "comparisons" and dataset == "openai/summarize_from_feedback" else None
        # one SFT file is the train split; one comparisons file is named by its stem, so that its
        # rows go by their own `split` field unless the file is named train/validation
        raw = load_raw(
            dataset,
            hub_config,
            split="train" if kind == "sft" else None,
            revision=revision,
            features=RAW_FEATURES[kind],
        )
        if key in next(iter(raw.values())).column_names:
            ds = raw  # a processed dataset on the Hub (ours or N+'s)
        else:
            process = process_sft if kind == "sft" else process_comparisons
            report = Report()
            ds = process(raw, tokenizer, lengths, report=report)
            print(format_report(report, {}))
    missing = [s for s in splits if s not in ds]
    if missing:
        raise InputError(f"{dataset}: split(s) {missing} missing (has {list(ds)})")
    top = max(max(max(ids) for ids in ds[s][:256][key]) for s in splits)
    if top >= len(tokenizer):
        raise InputError(
            f"{dataset}: token id {top} is outside the tokenizer's {len(tokenizer)} ids: the data was made with "
            "another tokenizer"
        )
    check_same_tokenizer(ds[splits[0]], tokenizer, dataset)
    return ds


def vocabulary_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the tokenizer's whole vocabulary (added tokens such as [PAD] included): recorded
    with every processed dataset (processing.json, the card), so that its ids can be traced."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def check_same_tokenizer(rows: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, dataset: str, n: int = 8) -> None:
    """A processed dataset's ids must be this tokenizer's. Its record says so where there is one
    (processing.json of a local save_to_disk directory); every processed dataset, ours or N+'s,
    local or from the Hub, is also checked by content: the query text of its first rows must
    encode to its query ids. N+'s datasets have our columns but Pythia's ids, which fit inside
    Qwen's vocabulary and would otherwise train on garbage silently."""
    record = Path(dataset).expanduser() / "processing.json"
    recorded = (
        json.loads(record.read_text()).get("params", {}).get("tokenizer_vocab_sha256") if record.is_file() else None
    )
    if recorded and recorded != vocabulary_sha256(tokenizer):
        raise InputError(
            f"{dataset} was processed with another tokenizer (vocabulary sha256 {recorded[:12]}..., this run's "
            f"{vocabulary_sha256(tokenizer)[:12]}...): "
            "pass the raw data (processed now with the run's tokenizer) or process it again with this model's "
            "--tokenizer"
        )
    if "query" not in rows.column_names:
        return
    for row in rows.select(range(min(n, len(rows)))):
        expected = encode(tokenizer, row["query"])
        if list(row["query_token"][len(row["query_token"]) - len(expected) :]) != expected:
            raise InputError(
                f"{dataset}: row {row.get('id', '?')}: its query_token ids are not this tokenizer's encoding of its "
                "query text, so it was "
                "processed with another tokenizer (N+'s datasets: Pythia's): pass the raw data (processed now with the "
                "run's tokenizer) "
                "or process it again with this model's --tokenizer"
            )
