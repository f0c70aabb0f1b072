"""Build the SFT dataset: TL;DR posts -> 512-token queries + ' summary<EOS>' responses.

    python -m dgx_spark_summary_from_human_feedback.process_sft_dataset --output-dir data/sft
    python -m dgx_spark_summary_from_human_feedback.process_sft_dataset \\
        --dataset ../shared/data/tldr_real_sample/sft.jsonl --tokenizer DIR --output-dir OUT
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from . import cli
from .data import Lengths
from .publish import build


@dataclass
class Config:
    dataset: str = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"
    """Hub name, or local .jsonl/.json/.parquet file(s) with fields id, subreddit, title, post, summary"""
    split: str = "train"
    """split name given to a single local file (a directory gives one split per file stem)"""
    revision: str | None = None
    """Hub revision of the dataset"""
    tokenizer: str = "Qwen/Qwen2.5-0.5B"
    """Hub name or local directory; a [PAD] token distinct from EOS is added when needed"""
    output_dir: str = "data/sft"
    """where `save_to_disk` writes the processed DatasetDict (and README.md, the card)"""
    query_length: int = 512
    """query tokens (OpenAI/N+: 512); longer queries are cut at the post's last newline"""
    response_length: int = 63
    """max response tokens including EOS (63 = the longest reference with Qwen2.5's vocabulary)"""
    long_response: Literal["drop", "truncate"] = "drop"
    """what to do with a summary over `response_length`: drop the row or cut it (EOS kept)"""
    skip_bad_rows: bool = False
    """count and skip malformed rows instead of stopping at the first one"""
    push_to_hub: str | None = None
    """REPO_ID to push the dataset and its card to (token from HF_TOKEN)"""


def main(cfg: Config) -> None:
    build(cfg, "sft", Lengths(query=cfg.query_length, response=cfg.response_length))


if __name__ == "__main__":
    cli.run(main, Config)
