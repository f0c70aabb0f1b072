#!/usr/bin/env python3
"""Split the real TL;DR sample into train/validation files for the small real run (issue 14).

    python bench/real_split.py OUT [--sample ../shared/data/tldr_real_sample] [--seed 0] [--validation 200]

Writes OUT/sft/{train,validation}.jsonl (posts) and OUT/comparisons/{train,validation}.jsonl
(judged pairs), each a seeded shuffle cut into 800 / 200 rows. The two shuffles are independent
(both files hold the same 1,000 posts): the reward model's held-back pairs are not the SFT
validation posts. The comparison rows keep their own `split` field ("valid1"); the file decides.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def split_file(source: Path, out: Path, seed: int, n_validation: int) -> dict[str, int]:
    rows = [line for line in source.read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    parts = {"train": rows[n_validation:], "validation": rows[:n_validation]}
    out.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(json.loads(r), ensure_ascii=False) + "\n" for r in part))
    return {k: len(v) for k, v in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--sample", type=Path, default=REPO.parent / "shared" / "data" / "tldr_real_sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--validation", type=int, default=200)
    args = parser.parse_args()
    for name in ("sft", "comparisons"):
        counts = split_file(args.sample / f"{name}.jsonl", args.out / name, args.seed, args.validation)
        print(f"{args.out / name}: {counts}")


if __name__ == "__main__":
    main()
