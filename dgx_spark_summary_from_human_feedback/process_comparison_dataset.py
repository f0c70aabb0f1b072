"""Build the preference dataset: OpenAI's TL;DR comparisons -> query + chosen/rejected tokens.

    python -m dgx_spark_summary_from_human_feedback.process_comparison_dataset --output-dir data/comparisons
    python -m dgx_spark_summary_from_human_feedback.process_comparison_dataset \\
        --dataset ../shared/data/tldr_real_sample/comparisons.jsonl --tokenizer DIR --output-dir OUT

Rows go to `train`, `validation`, or `validation_cnndm` (validation rows of the CNN/DM batches,
out of distribution, by their `batch` field), as in the N+ preprocessed dataset. The file decides
train or validation (a directory's `train.jsonl` / `validation.jsonl`, the Hub's splits), even
where a row's own `split` field says otherwise ("valid1" in the original release: counted in the
report); only rows of a file not named as a split (OpenAI's batch files) go by their own field.
Local files are read with the Hub's declared schema (`data.COMPARISON_FEATURES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from . import cli
from .data import Lengths
from .publish import build


@dataclass
class Config:
    dataset: str = "openai/summarize_from_feedback"
    """Hub name, or local .jsonl/.json/.parquet file(s) in the `comparisons` schema"""
    config_name: str | None = "comparisons"
    """Hub dataset config"""
    split: str | None = None
    """split name given to a single local file (default: its stem); a file not named train/validation routes each
    row by its own `split` field"""
    revision: str | None = None
    """Hub revision of the dataset"""
    tokenizer: str = "Qwen/Qwen2.5-0.5B"
    """Hub name or local directory; a [PAD] token distinct from EOS is added when needed"""
    output_dir: str = "data/comparisons"
    """where `save_to_disk` writes the processed DatasetDict (and README.md, the card)"""
    query_length: int = 512
    """query tokens for Reddit posts (OpenAI/N+: 512)"""
    cnndm_query_length: int = 1919
    """query tokens for CNN/DM articles (N+: 1919)"""
    response_length: int = 133
    """max summary tokens including EOS (133 = the longest with Qwen2.5's vocabulary)"""
    long_response: Literal["drop", "truncate"] = "drop"
    """what to do with a summary over `response_length`: drop the row or cut it (EOS kept)"""
    skip_bad_rows: bool = False
    """count and skip malformed rows instead of stopping at the first one"""
    push_to_hub: str | None = None
    """REPO_ID to push the dataset and its card to (token from HF_TOKEN)"""


def main(cfg: Config) -> None:
    lengths = Lengths(query=cfg.query_length, response=cfg.response_length, cnndm_query=cfg.cnndm_query_length)
    build(cfg, "comparisons", lengths, cfg.config_name)


if __name__ == "__main__":
    cli.run(main, Config)
