"""TL;DR tokens: OpenAI's query format and truncation, the [PAD] rule, padding, and reading datasets.

Everything every stage must agree on about tokens lives here: how a post becomes a 512-token
query (N+ details 1-3), how the tokenizer gets a pad token distinct from EOS (N+ detail 4), how
responses end with EOS, and how raw and processed datasets are read from disk or the Hub.
Building a processed dataset from raw rows is `preprocess.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import datasets
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .errors import InputError
from .hub import hub_errors

QUERY_FORMAT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
CNNDM_QUERY_FORMAT = "Article:\n{article}\n\nTL;DR:"
PAD_TOKEN = "[PAD]"
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}

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
        tokenizer = AutoTokenizer.from_pretrained(
            str(path.expanduser()) if path.exists() else name_or_path, revision=revision
        )
    except (OSError, ValueError) as e:
        if path.expanduser().is_dir():  # e.g. the output directory of a stage that was killed before its export
            raise InputError(
                f"{name_or_path} holds no tokenizer: pass a finished stage's output directory or a tokenizer directory"
            ) from None
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
# token budgets, and many queries and responses at once


@dataclass
class Lengths:
    """Token budgets. Defaults are the Qwen2.5 maxima of the original implementation."""

    query: int = 512
    response: int = 63
    cnndm_query: int = 1919  # N+: CNN/DM articles get a longer query ("Article:\n...\n\nTL;DR:")

    @property
    def query_response(self) -> int:
        return self.query + self.response


def fit_queries(
    tokenizer,
    fields_list: list[dict[str, str]],
    length: int,
    format_str: str = QUERY_FORMAT,
    cut_order=("post", "title", "subreddit"),
) -> list[tuple[list[int], dict[str, str], str]]:
    """`truncate_query` for many rows: one batched tokenisation, the search only where too long."""
    if not fields_list:
        return []
    first = tokenizer([format_str.format(**f) for f in fields_list], add_special_tokens=False)["input_ids"]
    return [
        (ids, f, "")
        if len(ids) <= length
        else truncate_query(tokenizer, f, length=length, format_str=format_str, cut_order=cut_order)
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


# ---------------------------------------------------------------------------------------------
# loading raw and processed data


# The Hub's declared schemas of the raw datasets. Local files are read with these, not with a
# schema guessed per file: a guess turns a column that is null throughout one file (the release's
# `note`, `extra.confidence`) into type "null", and the next file's values then cannot be cast.
_STRING, _INT = datasets.Value("string"), datasets.Value("int32")
SFT_FEATURES = datasets.Features(
    {"id": _STRING, "subreddit": _STRING, "title": _STRING, "post": _STRING, "summary": _STRING}
)
# openai/summarize_from_feedback, config "comparisons"
COMPARISON_FEATURES = datasets.Features(
    {
        "info": {
            "id": _STRING,
            "post": _STRING,
            "title": _STRING,
            "subreddit": _STRING,
            "site": _STRING,
            "article": _STRING,
        },
        "summaries": datasets.List({"text": _STRING, "policy": _STRING, "note": _STRING}),
        "choice": _INT,
        "worker": _STRING,
        "batch": _STRING,
        "split": _STRING,
        "extra": {"confidence": _INT},
    }
)


def load_hub_dataset(name: str, *args, **kwargs) -> datasets.DatasetDict:
    """`datasets.load_dataset` of a Hub name; a name the Hub does not have (or, offline, the
    cache does not hold) stops with one line."""
    with hub_errors(f"loading {name} from the Hub"):  # any other answer of the Hub (401: HF_TOKEN rejected)
        try:
            return datasets.load_dataset(name, *args, **kwargs)
        except (ConnectionError, FileNotFoundError) as e:  # DatasetNotFoundError is a FileNotFoundError
            first = (str(e).splitlines() or [""])[0][:200]
            raise InputError(
                f"dataset {name} is not a local path and could not be loaded from the Hugging Face Hub ({first}): "
                "check the name; offline (HF_HUB_OFFLINE=1) it must be in the cache"
            ) from None


def load_raw(
    dataset: str,
    config_name: str | None = None,
    split: str | None = None,
    revision: str | None = None,
    features: datasets.Features | None = None,
) -> datasets.DatasetDict:
    """A Hub dataset, or local .jsonl/.json/.parquet files in the same schema.

    A local file becomes the split `split` (default: its file stem); a local directory gives one
    split per file stem (`train.jsonl`, `validation.jsonl`, ...). Local files are read one by one
    with `features` (the Hub schema: SFT_FEATURES, COMPARISON_FEATURES) for the columns they hold.
    """
    path = Path(dataset).expanduser()
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise InputError(f"{dataset}: unsupported file type {path.suffix!r}, use .jsonl, .json or .parquet")
        return _load_files({split or path.stem: str(path)}, dataset, features)
    if path.is_dir():
        files = {p.stem: str(p) for p in sorted(path.iterdir()) if p.suffix in LOCAL_SUFFIXES}
        if not files:
            raise InputError(f"{dataset}: directory holds no .jsonl, .json or .parquet files")
        builders = {LOCAL_SUFFIXES[Path(f).suffix] for f in files.values()}
        if len(builders) > 1:
            raise InputError(f"{dataset}: mixes JSON and Parquet files; keep one format per directory")
        return _load_files(files, dataset, features)
    if dataset.startswith((".", "/", "~")) or Path(dataset).suffix in LOCAL_SUFFIXES:
        raise InputError(f"dataset path {dataset} does not exist")
    try:
        return load_hub_dataset(dataset, config_name, revision=revision)
    except RuntimeError as e:
        if "scripts are no longer supported" not in str(e):
            raise
        # openai/summarize_from_feedback is a loading script, which recent `datasets` refuse:
        # the Hub's automatic Parquet export of the same data loads without running code. The
        # export has no card naming its configs, only folders CONFIG/SPLIT/0000.parquet: the
        # config is its data_dir (as a config name, `datasets` would find only "default").
        return load_hub_dataset(dataset, revision="refs/convert/parquet", data_dir=config_name or "default")


def _load_files(files: dict[str, str], dataset: str, features: datasets.Features | None) -> datasets.DatasetDict:
    """Each file on its own (one file's types never constrain another's), with the declared
    features of the columns it holds; a file with columns outside the schema is read as it is."""
    loaded = {}
    for split, file in files.items():
        builder = LOCAL_SUFFIXES[Path(file).suffix]
        if Path(file).stat().st_size == 0:
            raise InputError(f"{file}: file is empty (split {split!r})")
        declared = None
        if features is not None and file.endswith(".jsonl"):
            columns = _check_json_lines(file, features)  # also names a value of the wrong type, by line and field
            if columns <= set(features):
                declared = datasets.Features({k: v for k, v in features.items() if k in columns})
        verbosity = datasets.logging.get_verbosity()
        # the JSON builder logs its parse error too: we print one line
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
        try:
            ds = datasets.load_dataset(builder, data_files={split: file}, features=declared)[split]
            if features is not None and declared is None and set(ds.column_names) <= set(features):  # .json / .parquet
                ds = ds.cast(datasets.Features({k: v for k, v in features.items() if k in ds.column_names}))
        except Exception as e:  # noqa: BLE001 - any parser failure becomes one line naming the file
            if file.endswith(".jsonl"):
                _check_json_lines(file, None)
            cause = e
            # "An error occurred while generating the dataset" wraps the parser's own message
            while cause.__cause__ is not None:
                cause = cause.__cause__
            raise InputError(
                f"{file}: cannot be read as {builder} ({type(cause).__name__}: "
                f"{(str(cause).splitlines() or [''])[0][:200]})"
            ) from None
        finally:
            datasets.logging.set_verbosity(verbosity)
        if len(ds) == 0:
            raise InputError(f"{file}: split {split!r} is empty")
        loaded[split] = ds
    return datasets.DatasetDict(loaded)


_EXPECTED = {"string": (str, "a string"), "int32": (int, "an integer"), "int64": (int, "an integer")}


def _type_error(value, feature, where: str) -> str | None:
    """Why `value` (parsed JSON) does not fit `feature`, naming the field; None if it fits."""
    if value is None:
        return None  # missing values are the row checks' business: they name the field too
    if isinstance(feature, dict):
        if not isinstance(value, dict):
            return f"field '{where}' is {type(value).__name__}, expected an object"
        return next((e for k, f in feature.items() if (e := _type_error(value.get(k), f, f"{where}.{k}"))), None)
    if isinstance(feature, (datasets.List, list)):
        if not isinstance(value, list):
            return f"field '{where}' is {type(value).__name__}, expected a list"
        item = feature.feature if isinstance(feature, datasets.List) else feature[0]
        return next((e for i, v in enumerate(value) if (e := _type_error(v, item, f"{where}[{i}]"))), None)
    kind, name = _EXPECTED.get(getattr(feature, "dtype", ""), (object, "a value"))
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        return f"field '{where}' is {type(value).__name__}, expected {name}"
    return None


def json_lines(file: str | Path):
    """(line number, value) per non-blank line of a JSON-lines file; a line that is not JSON
    stops with one line naming the file and the line."""
    with open(file, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{file} line {n}: not JSON ({e.msg}): fix or delete that line") from None
                yield n, value


def _check_json_lines(file: str, features: datasets.Features | None) -> set[str]:
    """The top-level keys of a .jsonl file; names the first line that is not JSON, and (with
    `features`) the first value whose type the schema cannot hold (a number where text belongs)."""
    columns: set[str] = set()
    for n, row in json_lines(file):
        if not isinstance(row, dict):
            raise InputError(f"{file} line {n}: a JSON {type(row).__name__}, not an object: one row per line")
        columns.update(row)
        if features is not None:
            error = next((e for k, f in features.items() if (e := _type_error(row.get(k), f, k))), None)
            if error:
                info = row.get("info") if isinstance(row.get("info"), dict) else row
                raise InputError(f"{file} line {n}: row {info.get('id', '?')}: {error}: fix that row")
    return columns


def load_processed(dataset: str, splits: tuple[str, ...], revision: str | None = None) -> datasets.DatasetDict:
    """A processed dataset: a `save_to_disk` directory or a Hub name (ours or N+'s)."""
    path = Path(dataset).expanduser()
    if path.exists():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise InputError(
                f"{dataset} is not a processed dataset (no save_to_disk files): run process_*_dataset first"
            ) from None
        except Exception as e:  # noqa: BLE001 - a cut or damaged save_to_disk directory becomes one line
            raise InputError(
                f"{dataset} cannot be read as a processed dataset ({type(e).__name__}: "
                f"{(str(e).splitlines() or [''])[0][:200]}): run process_*_dataset again"
            ) from None
    else:
        if dataset.startswith((".", "/", "~")):
            raise InputError(f"dataset path {dataset} does not exist")
        loaded = load_hub_dataset(dataset, revision=revision)
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
