"""Where our code spends its time: cProfile (Python functions) and torch.profiler (ops) of one of our steps
on the benchmark setup of common.py (the stages' own step functions).

    .venv/bin/python bench/profile_ours.py sft            # one sft.train_step (bench_sft defaults)
    .venv/bin/python bench/profile_ours.py reward         # one reward.train_step
    .venv/bin/python bench/profile_ours.py ppo            # one PPO update, rollout and training timed apart
    .venv/bin/python bench/profile_ours.py preprocess --rows 3000
    .venv/bin/python bench/profile_ours.py sft --torch    # add the torch op table
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path

import common

from dgx_spark_summary_from_human_feedback.training import PAIR_COLUMNS, batch_indices


def step_fn(kind: str, args):
    """(a zero-argument callable running one of our steps after one warmup call, its phase marks)."""
    import ppo
    import reward
    import sft

    runtime, tokenizer, policy_dir, reward_dir = common.setup(args.tokenizer)
    if kind == "ppo":
        sizes = dict(batch_size=16, micro_batch_size=8, forward_batch_size=16, generation_batch_size=16, seed=42)
        cfg = ppo.Config(**sizes, device="cpu", sft_path=str(policy_dir), reward_path=str(reward_dir))
        ds = common.sft_data(tokenizer).with_format("torch", columns=["query_token", "query_token_len"])
        indices = batch_indices(0, len(ds), cfg.batch_size, cfg.seed)
        rows = ds[sorted(indices, key=lambda i: -int(ds[i]["query_token_len"]))]
        update, marks = common.ppo_update_fn(cfg, tokenizer, rows, runtime), {}
        update(0)
        return lambda: update(1, tick=lambda phase: marks.setdefault(phase, time.perf_counter())), marks
    sizes = dict(batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, seed=42)
    if kind == "sft":
        cfg, ds = sft.Config(**sizes), common.sft_data(tokenizer).with_format("torch", columns=common.SFT_COLUMNS)
        step = common.sft_step(policy_dir, tokenizer, ds, cfg, runtime)
    else:
        cfg, ds = reward.Config(**sizes), common.comparison_data(tokenizer).with_format("torch", columns=PAIR_COLUMNS)
        step = common.reward_step(reward_dir, tokenizer, ds, cfg, runtime)
    rows = [batch_indices(k, len(ds), cfg.batch_size, cfg.seed) for k in range(2)]
    step(rows[0], 0)
    return lambda: step(rows[1], 1), {}


def preprocess_fn(args):
    """`process_sft` of `--rows` synthetic posts (bench_preprocess.py's), without the CLI around it."""
    import bench_preprocess

    from dgx_spark_summary_from_human_feedback import data, preprocess

    common.set_threads()
    with tempfile.TemporaryDirectory() as tmp:
        bench_preprocess.write_synthetic(Path(tmp) / "train.jsonl", args.rows)
        raw = data.load_raw(str(Path(tmp) / "train.jsonl"), split="train")
    tokenizer = data.load_tokenizer(str(common.tokenizer_dir(args.tokenizer)))
    return lambda: preprocess.process_sft(raw, tokenizer, data.Lengths(512, 63), long_response="truncate"), {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["sft", "reward", "ppo", "preprocess"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--rows", type=int, default=3000, help="synthetic posts for `preprocess`")
    parser.add_argument("--tokenizer", default="sample")
    parser.add_argument("--torch", action="store_true", help="also the torch.profiler op table")
    parser.add_argument("--limit", type=int, default=25)
    args = parser.parse_args()
    fn, marks = preprocess_fn(args) if args.what == "preprocess" else step_fn(args.what, args)
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    fn()
    prof.disable()
    print(f"one {args.what} step: {time.perf_counter() - t:.2f}s")
    if marks:
        print(f"rollout {marks['rollout'] - t:.2f}s, training {marks['update'] - marks['rollout']:.2f}s")
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).strip_dirs()
    stats.sort_stats("cumulative").print_stats(args.limit)
    stats.sort_stats("tottime").print_stats(args.limit)
    print(out.getvalue())
    if args.torch:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as op_prof:
            fn()
        print(op_prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.limit))


if __name__ == "__main__":
    main()
