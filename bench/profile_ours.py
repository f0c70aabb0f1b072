"""Where our code spends its time: cProfile (Python functions) and torch.profiler (ops) of one of
our steps on the benchmark setup of common.py (the stages' own step functions).

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

from dgx_spark_summary_from_human_feedback.training import PAIR_COLUMNS, batch_indices, setup_runtime


def show(prof: cProfile.Profile, limit: int) -> None:
    s = io.StringIO()
    stats = pstats.Stats(prof, stream=s).strip_dirs()
    stats.sort_stats("cumulative").print_stats(limit)
    stats.sort_stats("tottime").print_stats(limit)
    print(s.getvalue())


def step_fn(kind: str, args):
    """A zero-argument callable running one of our steps, after one warmup call."""
    import ppo
    import reward
    import sft

    runtime = setup_runtime("cpu")
    tokenizer = common.load_tokenizer(args.tokenizer)
    policy_dir, reward_dir = common.write_models(tokenizer, args.tokenizer)
    if kind == "ppo":
        cfg = ppo.Config(batch_size=16, micro_batch_size=8, forward_batch_size=16, generation_batch_size=16, device="cpu",
                         sft_path=str(policy_dir), reward_path=str(reward_dir), seed=42)  # fmt: skip
        ds = common.sft_data(tokenizer).with_format("torch", columns=["query_token", "query_token_len"])
        rows = ds[sorted(batch_indices(0, len(ds), cfg.batch_size, cfg.seed), key=lambda i: -int(ds[i]["query_token_len"]))]
        update, marks = common.ppo_update_fn(cfg, tokenizer, rows, runtime), {}
        update(0)
        return lambda: update(1, tick=lambda phase: marks.setdefault(phase, time.perf_counter())), marks
    if kind == "sft":
        cfg = sft.Config(batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, seed=42)
        ds = common.sft_data(tokenizer).with_format("torch", columns=["query_reference_response_token", "query_reference_response_token_len", "reference_response_token_len"])
        step = common.sft_step(policy_dir, tokenizer, ds, cfg, runtime)
    else:
        cfg = reward.Config(batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, seed=42)
        ds = common.comparison_data(tokenizer).with_format("torch", columns=PAIR_COLUMNS)
        step = common.reward_step(reward_dir, tokenizer, ds, cfg, runtime)
    rows = [batch_indices(k, len(ds), cfg.batch_size, cfg.seed) for k in range(2)]
    step(rows[0], 0)
    return lambda: step(rows[1], 1), {}


def profile_preprocess(args) -> None:
    import bench_preprocess

    from dgx_spark_summary_from_human_feedback import data, preprocess

    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "train.jsonl"
        bench_preprocess.write_synthetic(jsonl, args.rows)
        tokenizer = data.load_tokenizer(str(common.tokenizer_dir(args.tokenizer)))
        raw = data.load_raw(str(jsonl), split="train")
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        preprocess.process_sft(raw, tokenizer, data.Lengths(512, 63), long_response="truncate")
        prof.disable()
        print(f"process_sft of {args.rows} rows ({args.tokenizer} tokenizer): {time.perf_counter() - t:.2f}s")
    show(prof, args.limit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["sft", "reward", "ppo", "preprocess"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--tokenizer", default="sample")
    parser.add_argument("--torch", action="store_true", help="also the torch.profiler op table")
    parser.add_argument("--limit", type=int, default=25)
    args = parser.parse_args()
    common.set_threads()
    if args.what == "preprocess":
        return profile_preprocess(args)
    fn, marks = step_fn(args.what, args)
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    fn()
    prof.disable()
    end = time.perf_counter()
    phases = f" (rollout {marks['rollout'] - t:.2f}s, training {marks['update'] - marks['rollout']:.2f}s)" if marks else ""
    print(f"one {args.what} step: {end - t:.2f}s{phases}")
    show(prof, args.limit)
    if args.torch:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as op_prof:
            fn()
        print(op_prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.limit))


if __name__ == "__main__":
    main()
