"""SFT preprocessing of a full-size split: 116,722 posts through the project's CLI. Target <= 60 s.

    .venv/bin/python bench/bench_preprocess.py                          # sample BPE, then tiny tokenizer
    .venv/bin/python bench/bench_preprocess.py --tokenizers tiny --repeats 2 --rows 20000

Synthetic posts shaped like the real ones: real-sample posts (drawn with replacement) with about 5% of
adjacent words swapped and 2% replaced by words of other posts (newlines and paragraphs kept; title and
summary likewise), so lengths, newlines and the share of queries over 512 tokens follow the real sample
while no two rows are identical (no tokenizer cache can help). Timed: `process_sft_dataset.main` as a whole
(load the JSONL, `preprocess.process_sft` with query 512, response 63, long responses truncated, statistics,
`save_to_disk`); `profile_ours.py preprocess` shows where the time goes. Tokenizers (Qwen2.5's cannot be
loaded offline): `sample`, common.py's BPE, whose token counts match Qwen2.5's (~2% of queries over 512, so
the truncation search runs as often as with Qwen); `tiny`, the 788-token fixture tokenizer (queries ~2.2x
longer, ~80% over 512: a pessimistic bound).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import common

from dgx_spark_summary_from_human_feedback import process_sft_dataset

ROWS = 116_722  # vwxyzjn/summarize_from_feedback_tldr_3_filtered train split


def perturb(text: str, rng: random.Random, vocabulary: list[str]) -> str:
    words = text.split(" ")  # newlines stay inside their words: paragraphs survive
    for _ in range(max(1, len(words) // 20)):
        i = rng.randrange(len(words))
        j = min(i + 1, len(words) - 1)
        words[i], words[j] = words[j], words[i]
    for _ in range(len(words) // 50):
        i = rng.randrange(len(words))
        if "\n" not in words[i]:
            words[i] = rng.choice(vocabulary)
    return " ".join(words)


def write_synthetic(path: Path, n: int, seed: int = 0) -> dict:
    sample = [json.loads(line) for line in (common.SAMPLE / "sft.jsonl").read_text().splitlines()]
    vocabulary = [w for r in sample for w in r["post"].split() if w.isalpha()]
    rng, chars = random.Random(seed), []
    with path.open("w") as f:
        for i in range(n):
            row = rng.choice(sample)
            post = perturb(row["post"], rng, vocabulary)
            chars.append(len(post))
            title, summary = perturb(row["title"], rng, vocabulary), perturb(row["summary"], rng, vocabulary)
            out = {"id": f"syn-{i}", "subreddit": row["subreddit"], "title": title, "post": post, "summary": summary}
            f.write(json.dumps(out, ensure_ascii=False) + "\n")
    return common.length_summary(chars)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--tokenizers", default="sample,tiny")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--target", type=float, default=60.0, help="seconds")
    args = parser.parse_args()
    threads, seconds = common.set_threads(), {}
    with tempfile.TemporaryDirectory() as tmp:
        jsonl, t = Path(tmp) / "train.jsonl", time.perf_counter()
        chars = write_synthetic(jsonl, args.rows)
        print(f"wrote {args.rows:,} synthetic posts in {time.perf_counter() - t:.1f}s (post characters {chars})")
        for kind in [k for k in args.tokenizers.split(",") if k]:
            for r in range(args.repeats):
                tokenizer, out = str(common.tokenizer_dir(kind)), f"{tmp}/{kind}{r}"
                paths = {"dataset": str(jsonl), "tokenizer": tokenizer, "output_dir": out}
                cfg = process_sft_dataset.Config(**paths, long_response="truncate")
                t = time.perf_counter()
                process_sft_dataset.main(cfg)
                seconds.setdefault(kind, []).append(time.perf_counter() - t)
                verdict = f"{'meets' if seconds[kind][-1] <= args.target else 'MISSES'} the {args.target:.0f} s target"
                print(f"  {kind} tokenizer, run {r + 1}: {seconds[kind][-1]:.1f}s ({verdict}), threads {threads}")
    common.print_table(f"SFT preprocessing of {args.rows:,} posts (process_sft_dataset CLI), seconds", "s", seconds, {})
    rows_per_s = {f"{kind} (rows/s)": [args.rows / s for s in ts] for kind, ts in seconds.items()}
    phases = {kind: [{"total": s} for s in ts] for kind, ts in seconds.items()}
    extra = {"phases": phases, "rows_per_s": rows_per_s}
    common.record("preprocess", dict(vars(args), post_chars=chars), "seconds (and rows/s)", seconds, {}, extra)


if __name__ == "__main__":
    main()
