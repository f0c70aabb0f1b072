"""TL;DR data: OpenAI's query format and truncation, the [PAD] rule, and the processed columns.

Everything every stage must agree on about tokens lives here: how a post becomes a 512-token
query (N+ details 1-3), how the tokenizer gets a pad token distinct from EOS (N+ detail 4), how
responses end with EOS, and which columns a processed dataset holds. The column names follow the
N+ preprocessed datasets (`vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_*`
and `vwxyzjn/summarize_from_feedback_oai_preprocessing_*`) so either feeds our stages.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from transformers import AutoTokenizer, PreTrainedTokenizerBase

QUERY_FORMAT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
CNNDM_QUERY_FORMAT = "Article:\n{article}\n\nTL;DR:"
CNNDM_BATCHES = ("batch0_cnndm", "cnndm0", "cnndm2")  # N+: validation rows of these go out of distribution
PAD_TOKEN = "[PAD]"
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class InputError(ValueError):
    """Bad user input: the message is one line naming the row/field/path and what to do."""


# ---------------------------------------------------------------------------------------------
# tokenizer


def load_tokenizer(name_or_path: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer and give it a pad token distinct from EOS (N+ detail 4).

    Qwen2.5 ships pad == EOS == `<|endoftext|>` (151643): masks built from `ids == pad_id` would
    then also hide every EOS, and the reward would be read at the wrong token. We add `[PAD]`.
    For Qwen2.5 it gets id 151665, inside the 151,936 embedding rows, so no resize is needed; for
    a model whose embedding has no spare row, `models.fit_embeddings` grows it by one row.
    """
    path = Path(name_or_path)
    if (name_or_path.startswith((".", "/", "~")) or path.suffix) and not path.expanduser().exists():
        raise InputError(f"tokenizer path {name_or_path} does not exist: pass a local directory or a Hub name")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.expanduser()) if path.exists() else name_or_path, revision=revision)
    except (OSError, ValueError) as e:
        if path.expanduser().is_dir():  # e.g. the output directory of a stage that was killed before its export
            raise InputError(f"{name_or_path} holds no tokenizer: pass a finished stage's output directory or a tokenizer directory") from None
        raise InputError(f"cannot load tokenizer {name_or_path!r}: {str(e).splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise InputError(f"tokenizer {name_or_path} has no EOS token: responses must end with one")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = "left"  # queries are left padded (generation appends on the right)
    return tokenizer


def check_pad_is_not_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise InputError(
            f"tokenizer pad id {tokenizer.pad_token_id} equals EOS id {tokenizer.eos_token_id}: "
            "load it with data.load_tokenizer so [PAD] is added"
        )


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------
# query: format, truncate, pad


def _largest_fitting(cuts: list[int], fits) -> int | None:
    """Index of the largest cut that fits, by binary search (token count grows with the cut)."""
    lo, hi, best = 0, len(cuts) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(cuts[mid]):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def _token_ends(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Character offsets at which `text` may be cut between two of its tokens."""
    if tokenizer.is_fast:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return sorted({end for _, end in offsets if 0 < end < len(text)})
    return list(range(1, len(text)))  # slow tokenizers have no offsets: cut between characters


def truncate_query(
    tokenizer: PreTrainedTokenizerBase,
    fields: dict[str, str],
    *,
    length: int = 512,
    format_str: str = QUERY_FORMAT,
    cut_order: tuple[str, ...] = ("post", "title", "subreddit"),
) -> tuple[list[int], dict[str, str], str]:
    """Format a query and cut it to at most `length` tokens, OpenAI's way.

    OpenAI/N+ cut the post at its last "\\n" until the query fits, re-tokenising after every cut
    (quadratic in newlines) and raise when a title alone is too long. The candidate cuts are
    the newline positions, and the token count grows with the cut, so a binary search over them
    finds the same cut in O(log n) tokenisations. With no newline left the post is cut between
    tokens (binary search again); if even an empty post does not fit, the title is cut, then the
    subreddit. Returns (ids, fields as cut, how: "" | "newline:FIELD" | "tokens:FIELD").
    """
    fields = dict(fields)
    ids = encode(tokenizer, format_str.format(**fields))
    if len(ids) <= length:
        return ids, fields, ""
    for name in cut_order:
        text = fields[name]

        def fits(cut: int, base: str = text) -> bool:
            return len(encode(tokenizer, format_str.format(**{**fields, name: base[:cut]}))) <= length

        newlines = [i for i, c in enumerate(text) if c == "\n"]
        best = _largest_fitting(newlines, fits)
        if best is not None:
            fields[name] = text[: newlines[best]]
            return encode(tokenizer, format_str.format(**fields)), fields, f"newline:{name}"
        # no newline cut fits: what is left is the text before the first newline; cut it by tokens
        first_line = text[: newlines[0]] if newlines else text
        cuts = [0] + _token_ends(tokenizer, first_line)
        best = _largest_fitting(cuts, lambda cut: fits(cut, first_line))
        if best is not None:
            fields[name] = first_line[: cuts[best]]
            return encode(tokenizer, format_str.format(**fields)), fields, f"tokens:{name}"
        fields[name] = ""
    raise InputError(f"the query template alone is longer than {length} tokens: raise --query-length")


def left_pad(ids: list[int], length: int, pad_id: int) -> list[int]:
    return [pad_id] * (length - len(ids)) + ids


def right_pad(ids: list[int], length: int, pad_id: int) -> list[int]:
    return ids + [pad_id] * (length - len(ids))


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
        raise InputError(f"row {_row_id(row)}: field '{where}{key}' holds an unpaired surrogate (invalid Unicode): fix the source text") from None
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
class Lengths:
    """Token budgets. Defaults are the Qwen2.5 maxima of the original implementation."""

    query: int = 512
    response: int = 63
    cnndm_query: int = 1919  # N+: CNN/DM articles get a longer query ("Article:\n...\n\nTL;DR:")

    @property
    def query_response(self) -> int:
        return self.query + self.response


@dataclass
class Report:
    """What processing did to the rows: counts by reason, for the CLI and the dataset card."""

    rows_in: Counter = field(default_factory=Counter)
    rows_out: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)


def fit_queries(tokenizer, fields_list: list[dict[str, str]], length: int, format_str: str = QUERY_FORMAT, cut_order=("post", "title", "subreddit")) -> list[tuple[list[int], dict[str, str], str]]:
    """`truncate_query` for many rows: one batched tokenisation, the search only where too long."""
    if not fields_list:
        return []
    first = tokenizer([format_str.format(**f) for f in fields_list], add_special_tokens=False)["input_ids"]
    return [
        (ids, f, "") if len(ids) <= length else truncate_query(tokenizer, f, length=length, format_str=format_str, cut_order=cut_order)
        for ids, f in zip(first, fields_list)
    ]


def response_ids(tokenizer, texts: list[str], max_len: int, long_response: str) -> list[tuple[list[int] | None, bool]]:
    """(tokens + EOS, was cut) per text; None when too long and `long_response` is "drop"."""
    eos = tokenizer.eos_token_id
    out = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []:
        ids = ids + [eos]
        if len(ids) <= max_len:
            out.append((ids, False))
        else:
            out.append((ids[: max_len - 1] + [eos], True) if long_response == "truncate" else (None, False))
    return out


def _query_response(query_ids: list[int], response_ids: list[int], total: int, pad_id: int) -> tuple[list[int], list[int]]:
    """Unpadded query + response, right padded; labels -100 on query and padding, EOS kept."""
    ids = query_ids + response_ids
    labels = [-100] * len(query_ids) + response_ids + [-100] * (total - len(ids))
    return right_pad(ids, total, pad_id), labels


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
        valid = []
        for row in (dict(zip(batch, values)) for values in zip(*batch.values())):
            report.rows_in[split] += 1
            try:
                valid.append((row, sft_query_fields(row), _text(row, "summary", "", allow_empty=False)))
            except InputError as e:
                if not skip_bad_rows:
                    raise InputError(f"{e}: fix that row or pass --skip-bad-rows to count and skip such rows") from None
                report.dropped[f"bad row ({str(e).split(': ', 1)[1]})"] += 1
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
    for split, ds in processed.items():
        if len(ds) == 0:  # an empty split has no columns either: stop here, not in a later KeyError
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(report.dropped.items()))
            raise InputError(f"split {split!r}: all {report.rows_in[split]} rows were dropped (drops in all splits: {reasons}): fix the rows, raise --response-length or pass --long-response truncate")
    return processed


SFT_COLUMNS = [
    "id", "subreddit", "title", "post", "summary", "query", "query_token", "query_token_len",
    "reference_response", "reference_response_token", "reference_response_token_len",
    "query_reference_response", "query_reference_response_token",
    "query_reference_response_token_response_label", "query_reference_response_token_len",
]  # fmt: skip


def comparison_split(row: dict, source_split: str) -> str:
    """N+ splits: train, validation, and validation_cnndm for the CNN/DM batches."""
    split = row.get("split") or source_split
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
        valid = []
        for row in (dict(zip(batch, values)) for values in zip(*batch.values())):
            if comparison_split(row, source_split) != target:
                continue
            report.rows_in[target] += 1
            try:
                valid.append((row, *comparison_query_fields(row), *comparison_pair(row)))
            except InputError as e:
                if not skip_bad_rows:
                    raise InputError(f"{e}: fix that row or pass --skip-bad-rows to count and skip such rows") from None
                report.dropped[f"bad row ({str(e).split(': ', 1)[1]})"] += 1
        reddit = iter(fit_queries(tokenizer, [f for _, f, cnndm, _, _ in valid if not cnndm], lengths.query))
        articles = iter(fit_queries(tokenizer, [f for _, f, cnndm, _, _ in valid if cnndm], lengths.cnndm_query, CNNDM_QUERY_FORMAT, ("article",)))
        # the comparison summaries already begin with a space: only EOS is appended
        texts = [s["text"] for _, _, _, chosen, rejected in valid for s in (chosen, rejected)]
        summaries = iter(response_ids(tokenizer, texts, lengths.response, long_response))
        for row, _, cnndm, chosen, rejected in valid:
            query_ids, fields, how = next(articles) if cnndm else next(reddit)
            query_len = lengths.cnndm_query if cnndm else lengths.query
            query = (CNNDM_QUERY_FORMAT if cnndm else QUERY_FORMAT).format(**fields)
            (chosen_ids, chosen_cut), (rejected_ids, rejected_cut) = next(summaries), next(summaries)
            pair = {"chosen": chosen_ids, "rejected": rejected_ids}
            if pair["chosen"] is None or pair["rejected"] is None:
                report.dropped[f"response over {lengths.response} tokens"] += 1
                continue
            if how:
                report.truncated[f"query cut ({how})"] += 1
            if chosen_cut or rejected_cut:
                report.truncated[f"response cut to {lengths.response} tokens"] += 1
            report.rows_out[target] += 1
            info = row["info"]
            extra = row.get("extra") if isinstance(row.get("extra"), dict) else {}
            out["id"].append(str(info.get("id", "")))
            out["query"].append(query)
            out["query_token"].append(left_pad(query_ids, query_len, pad))
            out["query_token_len"].append(len(query_ids))
            for key, summary in (("chosen", chosen), ("rejected", rejected)):
                ids = pair[key]
                qr_ids, labels = _query_response(query_ids, ids, query_len + lengths.response, pad)
                out[key].append(summary["text"] + eos_text)
                out[f"{key}_token"].append(right_pad(ids, lengths.response, pad))
                out[f"{key}_token_len"].append(len(ids))
                out[f"query_{key}_token"].append(qr_ids)
                out[f"query_{key}_token_response_label"].append(labels)
                out[f"query_{key}_token_len"].append(len(query_ids) + len(ids))
                out[f"{key}_policy"].append(str(summary.get("policy")))
            out["policies"].append("--".join(sorted([str(chosen.get("policy")), str(rejected.get("policy"))])))
            out["batch"].append(row.get("batch"))
            out["worker"].append(row.get("worker"))
            out["split"].append(row.get("split"))
            out["confidence"].append(extra.get("confidence"))
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
    return datasets.DatasetDict({t: datasets.concatenate_datasets(p) for t, p in parts.items()})


COMPARISON_COLUMNS = [
    "id", "query", "query_token", "query_token_len",
    "chosen", "chosen_token", "chosen_token_len", "query_chosen_token",
    "query_chosen_token_response_label", "query_chosen_token_len",
    "rejected", "rejected_token", "rejected_token_len", "query_rejected_token",
    "query_rejected_token_response_label", "query_rejected_token_len",
    "chosen_policy", "rejected_policy", "policies", "batch", "worker", "split", "confidence",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# loading raw and processed data


def load_raw(dataset: str, config_name: str | None = None, split: str = "train", revision: str | None = None) -> datasets.DatasetDict:
    """A Hub dataset, or local .jsonl/.json/.parquet files in the same schema.

    A local file becomes the split `split`; a local directory gives one split per file stem
    (`train.jsonl`, `validation.jsonl`, ...).
    """
    path = Path(dataset).expanduser()
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise InputError(f"{dataset}: unsupported file type {path.suffix!r}, use .jsonl, .json or .parquet")
        return _load_files(LOCAL_SUFFIXES[path.suffix], {split: str(path)}, dataset)
    if path.is_dir():
        files = {p.stem: str(p) for p in sorted(path.iterdir()) if p.suffix in LOCAL_SUFFIXES}
        if not files:
            raise InputError(f"{dataset}: directory holds no .jsonl, .json or .parquet files")
        builders = {LOCAL_SUFFIXES[Path(f).suffix] for f in files.values()}
        if len(builders) > 1:
            raise InputError(f"{dataset}: mixes JSON and Parquet files; keep one format per directory")
        return _load_files(builders.pop(), files, dataset)
    if dataset.startswith((".", "/", "~")) or Path(dataset).suffix in LOCAL_SUFFIXES:
        raise InputError(f"dataset path {dataset} does not exist")
    try:
        return datasets.load_dataset(dataset, config_name, revision=revision)
    except RuntimeError as e:
        if "scripts are no longer supported" not in str(e):
            raise
        # openai/summarize_from_feedback is a loading script, which recent `datasets` refuse:
        # the Hub's automatic Parquet export of the same data loads without running code.
        return datasets.load_dataset(dataset, config_name, revision="refs/convert/parquet")


def _load_files(builder: str, files: dict[str, str], dataset: str) -> datasets.DatasetDict:
    for split, file in files.items():
        if Path(file).stat().st_size == 0:
            raise InputError(f"{file}: file is empty (split {split!r})")
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # the JSON builder logs its parse error too: we print one line
    try:
        loaded = datasets.load_dataset(builder, data_files=files)
    except Exception as e:  # noqa: BLE001 - any parser failure becomes one line naming the file
        _check_json_lines(files)
        cause = e
        while cause.__cause__ is not None:  # "An error occurred while generating the dataset" wraps the parser's own message
            cause = cause.__cause__
        raise InputError(f"{dataset}: cannot be read as {builder} ({type(cause).__name__}: {(str(cause).splitlines() or [''])[0][:200]})") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    for split, ds in loaded.items():
        if len(ds) == 0:
            raise InputError(f"{files[split]}: split {split!r} is empty")
    return loaded


def _check_json_lines(files: dict[str, str]) -> None:
    """Name the first line of a .jsonl file that is not JSON (the parser only counts rows)."""
    import json

    for file in (f for f in files.values() if f.endswith(".jsonl")):
        with open(file, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{file} line {n}: not JSON ({e.msg}): fix or delete that line") from None


def load_processed(dataset: str, splits: tuple[str, ...], revision: str | None = None) -> datasets.DatasetDict:
    """A processed dataset: a `save_to_disk` directory or a Hub name (ours or N+'s)."""
    path = Path(dataset).expanduser()
    if path.exists():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise InputError(f"{dataset} is not a processed dataset (no save_to_disk files): run process_*_dataset first") from None
        except Exception as e:  # noqa: BLE001 - a cut or damaged save_to_disk directory becomes one line
            raise InputError(f"{dataset} cannot be read as a processed dataset ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}): run process_*_dataset again") from None
    else:
        if dataset.startswith((".", "/", "~")):
            raise InputError(f"dataset path {dataset} does not exist")
        loaded = datasets.load_dataset(dataset, revision=revision)
    missing = [s for s in splits if s not in loaded]
    if missing:
        raise InputError(f"{dataset}: split(s) {missing} missing (has {list(loaded)})")
    for split in splits:
        if len(loaded[split]) == 0:
            raise InputError(f"{dataset}: split {split!r} is empty")
    return loaded


def is_processed(dataset: str) -> bool:
    path = Path(dataset).expanduser()
    return path.is_dir() and (path / "dataset_dict.json").exists()


def load_stage_data(
    dataset: str, tokenizer: PreTrainedTokenizerBase, kind: str, splits: tuple[str, ...], lengths: Lengths, revision: str | None = None
) -> datasets.DatasetDict:
    """What a stage trains on: a processed dataset as is, or raw TL;DR data processed now.

    `kind` is "sft" or "comparisons". Raw rows are processed with the run's tokenizer, so the
    ids always match the model; a processed dataset must have been made with the same vocabulary.
    """
    key = "query_reference_response_token" if kind == "sft" else "query_chosen_token"
    if is_processed(dataset):
        ds = load_processed(dataset, splits)
    else:
        raw = load_raw(dataset, "comparisons" if kind == "comparisons" and not Path(dataset).expanduser().exists() else None, revision=revision)
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
        raise InputError(f"{dataset}: token id {top} is outside the tokenizer's {len(tokenizer)} ids: the data was made with another tokenizer")
    return ds


# ---------------------------------------------------------------------------------------------
# statistics and the dataset card


def length_stats(ds: datasets.DatasetDict, columns: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """{split: {column: {max, p95, mean}}} for the integer length columns."""
    import numpy as np

    stats = {}
    for split, d in ds.items():
        stats[split] = {}
        for col in columns:
            values = np.asarray(d[col])
            if values.size:
                stats[split][col] = {"max": int(values.max()), "p95": float(np.percentile(values, 95)), "mean": float(values.mean())}
    return stats


def format_report(report: Report, stats: dict) -> str:
    lines = []
    for split in stats:
        lines.append(f"{split}: {report.rows_in[split]} rows in, {report.rows_out[split]} out")
        for col, s in stats[split].items():
            lines.append(f"  {col:<40} max {s['max']:>5}  p95 {s['p95']:>7.1f}  mean {s['mean']:>7.1f}")
    lines.append("truncated: " + (", ".join(f"{k}: {v}" for k, v in sorted(report.truncated.items())) or "none"))
    lines.append("dropped: " + (", ".join(f"{k}: {v}" for k, v in sorted(report.dropped.items())) or "none"))
    return "\n".join(lines)


def dataset_card(title: str, columns: dict[str, str], params: dict, report_text: str) -> str:
    rows = "\n".join(f"| `{name}` | {doc} |" for name, doc in columns.items())
    params_text = "\n".join(f"| `{k}` | `{v}` |" for k, v in params.items())
    return (
        f"---\ntags:\n- summarization\n- rlhf\n- tldr\n---\n\n# {title}\n\n"
        "Processed with `dgx_spark_summary_from_human_feedback` following OpenAI's *Learning to "
        "summarize from human feedback* and *The N+ Implementation Details of RLHF with PPO*: "
        "query `SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:` cut "
        "at the post's last newline until it fits, left padded with a `[PAD]` token distinct "
        "from EOS; responses end with EOS.\n\n"
        f"## Columns\n\n| column | meaning |\n|---|---|\n{rows}\n\n"
        f"## Parameters\n\n| parameter | value |\n|---|---|\n{params_text}\n\n"
        f"## Processing report\n\n```\n{report_text}\n```\n"
    )


SFT_COLUMN_DOCS = {
    "id": "id of the post in the source dataset",
    "subreddit, title, post": "the query fields as they went into the query (post/title after truncation)",
    "summary": "the reference summary as in the source (no leading space)",
    "query": "the formatted query text",
    "query_token": "query ids, left padded with [PAD] to the query length",
    "query_token_len": "number of non-pad query ids",
    "reference_response": "' ' + summary + EOS text",
    "reference_response_token": "response ids ending with EOS, right padded to the response length",
    "reference_response_token_len": "number of response ids including EOS",
    "query_reference_response": "query text + response text",
    "query_reference_response_token": "unpadded query ids + response ids, right padded to query+response length",
    "query_reference_response_token_response_label": "labels: -100 on query and padding, response ids (EOS kept)",
    "query_reference_response_token_len": "number of non-pad ids in query_reference_response_token",
}

COMPARISON_COLUMN_DOCS = {
    "id": "info.id of the compared post",
    "query": "the formatted query text (CNN/DM rows: 'Article:\\n{article}\\n\\nTL;DR:')",
    "query_token": "query ids, left padded with [PAD]",
    "query_token_len": "number of non-pad query ids",
    "chosen / rejected": "the preferred / other summary text (leading space as in the source) + EOS text",
    "chosen_token / rejected_token": "summary ids ending with EOS, right padded to the response length",
    "chosen_token_len / rejected_token_len": "number of summary ids including EOS",
    "query_chosen_token / query_rejected_token": "unpadded query ids + summary ids, right padded",
    "query_chosen_token_response_label / query_rejected_token_response_label": "-100 on query and padding, summary ids elsewhere",
    "query_chosen_token_len / query_rejected_token_len": "number of non-pad ids",
    "chosen_policy / rejected_policy": "policy that wrote each summary",
    "policies": "the two policies, sorted and joined by '--'",
    "batch": "labelling batch of the comparison",
    "worker": "who labelled it (an anonymised labeller id, or a judge model)",
    "split": "source split field (train / valid1 / valid2)",
    "confidence": "labeller confidence (extra.confidence), null where absent",
}


def save_processed(
    ds: datasets.DatasetDict,
    output_dir: str,
    *,
    title: str,
    column_docs: dict[str, str],
    length_columns: list[str],
    params: dict,
    report: Report,
    push_to_hub: str | None = None,
) -> dict:
    """Print length stats and the report, `save_to_disk` with a card, optionally push; returns stats."""
    import json

    stats = length_stats(ds, length_columns)
    text = format_report(report, stats)
    print(text)
    card = dataset_card(title, column_docs, params, text)
    out = Path(output_dir)
    ds.save_to_disk(str(out))
    (out / "README.md").write_text(card)
    (out / "processing.json").write_text(json.dumps({"params": params, "stats": stats, "truncated": report.truncated, "dropped": report.dropped}, indent=2))
    print(f"saved {out}")
    if push_to_hub:
        from huggingface_hub import DatasetCard

        ds.push_to_hub(push_to_hub)  # token from HF_TOKEN in the environment, never from a file we write
        DatasetCard(card).push_to_hub(push_to_hub, repo_type="dataset")
        print(f"pushed {push_to_hub}")
    return stats
