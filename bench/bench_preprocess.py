"""SFT preprocessing of a full-size split: 116,722 posts through the project's CLI. Target <= 60 s.

    .venv/bin/python bench/bench_preprocess.py                          # sample BPE, then tiny tokenizer
    .venv/bin/python bench/bench_preprocess.py --tokenizers tiny --repeats 2 --rows 20000

The posts are synthetic but shaped like the real ones: each is a real-sample post (drawn with
replacement from ../shared/data/tldr_real_sample/sft.jsonl) perturbed at the word level (about 5%
of adjacent words swapped, 2% replaced by words of another post; newlines and paragraph
structure kept), with its title and summary perturbed the same way, so lengths, newline
counts and the share of queries over 512 tokens follow the real distribution while no two rows
are identical (no cache in the tokenizer can help).

Timed: `process_sft_dataset.main` (the CLI a user runs: load the JSONL, `preprocess.process_sft` with
query 512, response 63, long responses truncated, length statistics, `save_to_disk`), as a
whole (`profile_ours.py preprocess` shows where the time goes). Tokenizers (the Qwen2.5 tokenizer cannot be loaded offline):
- sample: bench/common.py's 8,192-token BPE, whose token counts on the real sample match
  Qwen2.5's (query median 352 vs 338; ~2% of queries over 512 tokens, so the truncation
  search runs as often as it would with Qwen);
- tiny: the project's 788-token fixture tokenizer: queries ~2.2x longer, ~80% over 512, so
  nearly every row takes the truncation search: a pessimistic bound.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (offline environment and sys.path first)

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
    sample = [json.loads(line) for line in (common.SAMPLE / "sft.jsonl").read_text().splitlines() if line.strip()]
    vocabulary = [w for r in sample for w in r["post"].split() if w.isalpha()]
    rng = random.Random(seed)
    chars = []
    with path.open("w") as f:
        for i in range(n):
            row = rng.choice(sample)
            post = perturb(row["post"], rng, vocabulary)
            chars.append(len(post))
            out = {"id": f"syn-{i}", "subreddit": row["subreddit"], "title": perturb(row["title"], rng, vocabulary), "post": post, "summary": perturb(row["summary"], rng, vocabulary)}
            f.write(json.dumps(out, ensure_ascii=False) + "\n")
    return common.length_summary(chars)


def timed_cli(jsonl: Path, tokenizer_dir: Path, out: Path) -> dict:
    """Seconds of the CLI's main, once (load, process, statistics, save, card)."""
    cfg = process_sft_dataset.Config(dataset=str(jsonl), tokenizer=str(tokenizer_dir), output_dir=str(out), long_response="truncate")
    t = time.perf_counter()
    process_sft_dataset.main(cfg)
    return {"total": time.perf_counter() - t}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--tokenizers", default="sample,tiny")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--target", type=float, default=60.0, help="seconds")
    args = parser.parse_args()
    threads = common.set_threads()

    rates: dict[str, list[float]] = {}
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "train.jsonl"
        t = time.perf_counter()
        chars = write_synthetic(jsonl, args.rows)
        print(f"wrote {args.rows:,} synthetic posts in {time.perf_counter() - t:.1f}s (post characters {chars}), threads {threads}")
        for kind in [k for k in args.tokenizers.split(",") if k]:
            tokenizer_dir = common.tokenizer_dir(kind)
            for r in range(args.repeats):
                phases = timed_cli(jsonl, tokenizer_dir, Path(tmp) / f"out-{kind}-{r}")
                runs.setdefault(kind, []).append(phases)
                rates.setdefault(f"{kind} (rows/s)", []).append(args.rows / phases["total"])
                print(f"  {kind} tokenizer, run {r + 1}: " + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items())
                      + (" (meets" if phases["total"] <= args.target else " (MISSES") + f" the {args.target:.0f} s target)", flush=True)  # fmt: skip
    seconds = {kind: [p["total"] for p in ps] for kind, ps in runs.items()}
    common.print_table(f"SFT preprocessing of {args.rows:,} posts (process_sft_dataset CLI), seconds", "s", seconds, {})
    common.record("preprocess", dict(vars(args), post_chars=chars), "seconds (and rows/s)", seconds, {}, {"phases": runs, "rows_per_s": rates})


if __name__ == "__main__":
    main()
