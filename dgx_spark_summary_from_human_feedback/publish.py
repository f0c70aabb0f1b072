"""A processed dataset as saved and published: length statistics, the dataset card, `save_to_disk`
and the push, and `build`, the body of both process_*_dataset CLIs.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import datasets

from .checkpoint import make_output_dir
from .data import Lengths, load_raw, load_tokenizer
from .hub import hub_errors
from .preprocess import RAW_FEATURES, Report, format_report, process_comparisons, process_sft, vocabulary_sha256

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
                stats[split][col] = {
                    "max": int(values.max()),
                    "p95": float(np.percentile(values, 95)),
                    "mean": float(values.mean()),
                }
    return stats


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
    stats = length_stats(ds, length_columns)
    text = format_report(report, stats)
    print(text)
    card = dataset_card(title, column_docs, params, text)
    out = Path(output_dir)
    ds.save_to_disk(str(out))
    (out / "README.md").write_text(card)
    (out / "processing.json").write_text(
        json.dumps(
            {"params": params, "stats": stats, "truncated": report.truncated, "dropped": report.dropped}, indent=2
        )
    )
    print(f"saved {out}")
    if push_to_hub:
        from huggingface_hub import DatasetCard, HfApi

        # token from HF_TOKEN in the environment, never from a file we write. The card goes first:
        # `push_to_hub` then adds its metadata (features, splits, data files) to the card's own.
        with hub_errors(f"pushing {out} to {push_to_hub}"):  # the saved dataset stays as it is
            HfApi().create_repo(push_to_hub, repo_type="dataset", exist_ok=True)
            DatasetCard(card).push_to_hub(push_to_hub, repo_type="dataset")
            ds.push_to_hub(push_to_hub)
        print(f"pushed {push_to_hub}")
    return stats


# ---------------------------------------------------------------------------------------------
# the body of both process_*_dataset CLIs

PRODUCTS = {  # kind -> (process function, card title, column docs, length columns the card summarises)
    "sft": (
        process_sft,
        "TL;DR SFT dataset",
        SFT_COLUMN_DOCS,
        ["query_token_len", "reference_response_token_len", "query_reference_response_token_len"],
    ),
    "comparisons": (
        process_comparisons,
        "TL;DR preference dataset",
        COMPARISON_COLUMN_DOCS,
        [
            "query_token_len",
            "chosen_token_len",
            "rejected_token_len",
            "query_chosen_token_len",
            "query_rejected_token_len",
        ],
    ),
}


def build(cfg, kind: str, lengths: Lengths, config_name: str | None = None) -> None:
    """Raw rows -> a processed dataset saved with its card: the whole of a process_*_dataset CLI.

    `cfg` is that CLI's Config (`kind` "sft" or "comparisons"); it goes into the card as is.
    """
    make_output_dir(cfg.output_dir)  # before the processing, which can take minutes
    tokenizer = load_tokenizer(cfg.tokenizer)
    raw = load_raw(cfg.dataset, config_name, split=cfg.split, revision=cfg.revision, features=RAW_FEATURES[kind])
    process, title, column_docs, length_columns = PRODUCTS[kind]
    report = Report()
    ds = process(
        raw, tokenizer, lengths, long_response=cfg.long_response, skip_bad_rows=cfg.skip_bad_rows, report=report
    )
    params = {
        **asdict(cfg),
        "pad_token": tokenizer.pad_token,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "tokenizer_name": tokenizer.name_or_path,
        "tokenizer_vocab_sha256": vocabulary_sha256(tokenizer),
    }
    save_processed(
        ds,
        cfg.output_dir,
        title=title,
        column_docs=column_docs,
        length_columns=length_columns,
        params=params,
        report=report,
        push_to_hub=cfg.push_to_hub,
    )
