"""Where our code spends its time: cProfile (Python functions) and torch.profiler (ops) of one
benchmark step of ours, on the benchmark setup of bench/common.py.

    .venv/bin/python bench/profile_ours.py sft            # one SFT optimizer step (bench_sft defaults)
    .venv/bin/python bench/profile_ours.py reward
    .venv/bin/python bench/profile_ours.py ppo            # one ppo.main run of 2 updates, phases timed
    .venv/bin/python bench/profile_ours.py preprocess --rows 3000
    .venv/bin/python bench/profile_ours.py sft --torch    # add the torch op table
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import common  # noqa: F401
import torch


def show(prof: cProfile.Profile, limit: int) -> None:
    s = io.StringIO()
    stats = pstats.Stats(prof, stream=s).strip_dirs()
    stats.sort_stats("cumulative").print_stats(limit)
    stats.sort_stats("tottime").print_stats(limit)
    print(s.getvalue())


def torch_table(fn, limit: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        fn()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=limit))


def step_fn(kind: str, args):
    """A zero-argument callable running one of our steps (bench setups), after one warmup call."""
    from dgx_spark_summary_from_human_feedback.training import batch_indices, setup_runtime

    runtime = setup_runtime("cpu")
    tokenizer = common.load_tokenizer("sample")
    policy_dir, reward_dir = common.write_models(tokenizer, "sample")
    if kind == "sft":
        import bench_sft

        ds = common.sft_data(tokenizer)
        train = ds.with_format("torch", columns=bench_sft.COLUMNS)
        lengths, response_lengths = list(ds["query_reference_response_token_len"]), list(ds["reference_response_token_len"])
        fn = bench_sft.make_ours(policy_dir, tokenizer, train, lengths, response_lengths, args.micro_batch_size, runtime)
        rows = [batch_indices(k, len(ds), args.batch_size, 42) for k in range(2)]
    else:
        import bench_reward
        import reward

        ds = common.comparison_data(tokenizer)
        train = ds.with_format("torch", columns=reward.PAIR_COLUMNS)
        pair = [max(c, r) for c, r in zip(ds["query_chosen_token_len"], ds["query_rejected_token_len"])]
        fn = bench_reward.make_ours(reward_dir, tokenizer, train, pair, args.batch_size, args.micro_batch_size, runtime)
        rows = [batch_indices(k, len(ds), args.batch_size, 42) for k in range(2)]
    fn(rows[0])
    return lambda: fn(rows[1])


def profile_ppo(args) -> None:
    """Phases of one update (rollout generation, rollout forwards, PPO epochs) and cProfile."""
    import bench_ppo
    import ppo

    tokenizer = common.load_tokenizer("sample")
    policy_dir, reward_dir = common.write_models(tokenizer, "sample")
    phases: dict[str, float] = defaultdict(float)

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            phases[name] += time.perf_counter() - t
            return out

        return wrapper

    class PpoArgs:
        batch_size, micro_batch_size, forward_batch_size, response_length, updates = args.batch_size or 16, args.micro_batch_size or 8, 16, 53, 1

    name = "MainThread"  # one contender, in this thread: it hands the turn to itself
    turns = bench_ppo.Turns([name], torch.get_num_threads())
    turns.gates[name].release()
    turns.begin(name)
    with tempfile.TemporaryDirectory() as cache:
        dataset, _ = bench_ppo.query_dataset(tokenizer, PpoArgs.batch_size, Path(cache))
        originals = {n: getattr(ppo, n) for n in ("generate", "rollout", "response_logits", "value_predictions", "get_score", "compute_advantages")}
        for n, f in originals.items():
            setattr(ppo, n, timed(n, f))
        prof = cProfile.Profile()
        t = time.perf_counter()
        try:
            with bench_ppo.ours_hooks(turns, {}):
                prof.enable()
                bench_ppo.ours_target(policy_dir, reward_dir, dataset, PpoArgs)()
                prof.disable()
        finally:
            for n, f in originals.items():
                setattr(ppo, n, f)
        total = time.perf_counter() - t
    seconds = turns.seconds[name]
    print(f"run {total:.1f}s (model loading, 2 updates, final save); timed update {seconds}")
    print("cumulative seconds inside ppo's names over both updates (rollout includes generate and the no-grad forwards):")
    for n, v in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"  {n:22s} {v:8.2f}s")
    show(prof, args.limit)


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
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--tokenizer", default="sample")
    parser.add_argument("--torch", action="store_true", help="also the torch.profiler op table")
    parser.add_argument("--limit", type=int, default=25)
    args = parser.parse_args()
    common.set_threads()
    if args.what == "ppo":
        return profile_ppo(args)
    if args.what == "preprocess":
        return profile_preprocess(args)
    args.batch_size = args.batch_size or 8
    args.micro_batch_size = args.micro_batch_size or 4
    fn = step_fn(args.what, args)
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    fn()
    prof.disable()
    print(f"one {args.what} step: {time.perf_counter() - t:.2f}s")
    show(prof, args.limit)
    if args.torch:
        torch_table(fn, args.limit)


if __name__ == "__main__":
    sys.exit(main())
