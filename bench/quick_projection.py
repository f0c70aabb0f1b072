#!/usr/bin/env python3
"""Projected wall time of `--preset quick` on one DGX Spark (issue 14, item 4).

    python bench/quick_projection.py            # H200-calibrated (bench/gpu_results), markdown
    python bench/quick_projection.py --bench-json ''   # every efficiency assumed instead

The same model as bench/spark_projection.py (FLOPs / (GB10 peak x measured efficiency) + bytes /
bandwidth, lengths from the real sample), applied to the sizes of each stage's PRESETS["quick"]
instead of the full recipe, plus the evaluations a quick run does (validation forwards and
samples at step 0 and the end) counted as no-grad forwards. Not counted: loading the Hub data
and processing it (about a minute per stage here for 117k posts), model loading, checkpoints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spark_projection as sp  # noqa: E402

DEFAULT_BENCH = Path(__file__).resolve().parent / "gpu_results" / "gpu_bench_h200_no_cudnn_sdpa.json"


def forward_seconds(shape, rows: int, seq_len: float, cal: dict, head_positions: float = 1.0) -> float:
    """No-grad forwards of `rows` sequences (validation loss, reward scores) at PPO's measured forward efficiency."""
    return sp.seconds(sp.forward_flops(shape, rows, round(seq_len), head_positions * rows), 0, cal["eff"]["ppo_forward"])


def sample_seconds(shape, rows: int, context: float, new_tokens: int, batch: int, cal: dict) -> float:
    """Sampling `new_tokens` for `rows` queries in batches of `batch`: prefill + decoding steps."""
    prefill = sp.seconds(sp.forward_flops(shape, rows, round(context), rows), 0, cal["eff"]["prefill"])
    decode = sum(
        max(sp.decode_step_bytes(shape, b, round(context) + t) / sp.SPARK["bandwidth"], sp.decode_step_flops(shape, b, round(context) + t) / sp.SPARK["peak_bf16_flops"], cal["overhead"])
        for b in sp.chunks(rows, batch) for t in range(new_tokens)
    )  # fmt: skip
    return prefill + decode


def project(bench_json: str) -> list[tuple[str, str, float]]:
    sys.path.insert(0, str(sp.REPO))
    import ppo
    import reward
    import sft

    s, r, p = sft.Config(**sft.PRESETS["quick"]), reward.Config(**reward.PRESETS["quick"]), ppo.Config(**ppo.PRESETS["quick"])
    args = argparse.Namespace(assumed_efficiency=0.35, assumed_step_overhead_ms=15.0, host_overhead_scale=1.0, efficiency=None)
    bench, note = sp.read_bench(Path(bench_json)) if bench_json else (None, "none given")
    cal, _ = sp.calibrate(args, bench, note)
    lengths, shape = sp.load_lengths(sp.DEFAULT_SAMPLE), sp.QWEN_0_5B
    rows = []

    _, d = sp.project_training("sft", shape, "sft", {"rows": s.max_steps * s.batch_size, "batch_size": s.batch_size, "micro_batch_size": s.micro_batch_size, "epochs": 1}, lengths, cal)
    row_len = d["tokens"] / s.batch_size
    rows.append(("SFT training", f"{s.max_steps} steps x {s.batch_size} rows ({s.max_steps * s.batch_size:,} of 116,722 posts)", d["steps"] * d["seconds_per_step"]))
    evals = (s.max_steps - 1) // s.eval_interval + 1 + 1  # step 0 and every eval_interval in the loop, the final one
    rows.append(("SFT evaluation", f"{evals} x validation loss on {s.num_eval_rows} posts; samples of {s.num_eval_samples} posts at step 0 and the end",
                 evals * forward_seconds(shape, s.num_eval_rows, row_len, cal, 35) + 2 * sample_seconds(shape, s.num_eval_samples, row_len - 35, s.response_length, s.micro_batch_size, cal)))  # fmt: skip

    _, d = sp.project_training("reward", shape, "reward", {"pairs": r.max_steps * r.batch_size, "batch_size": r.batch_size, "micro_batch_size": r.micro_batch_size, "epochs": 1}, lengths, cal)
    seq_len = d["tokens"] / (2 * r.batch_size)
    rows.append(("RM training", f"{r.max_steps} steps x {r.batch_size} pairs ({r.max_steps * r.batch_size:,} of 92,858)", d["steps"] * d["seconds_per_step"]))
    evals = (r.max_steps - 1) // r.eval_interval + 1 + 1
    scored = 2 * (evals * r.num_eval_rows + 2 * r.max_final_eval_rows) + 2 * r.num_norm_rows  # two sequences per pair; norm scored twice
    rows.append(("RM evaluation", f"{evals} x {r.num_eval_rows} pairs, final {r.max_final_eval_rows} pairs per validation split, {r.num_norm_rows} references twice",
                 forward_seconds(shape, scored, seq_len, cal)))  # fmt: skip

    _, d = sp.project_ppo({k: getattr(p, k) for k in ("batch_size", "micro_batch_size", "forward_batch_size", "generation_batch_size", "ppo_epochs", "response_length", "num_minibatches")}, lengths, cal)
    updates = p.total_episodes // p.batch_size
    rows.append(("PPO", f"{updates} updates x {p.batch_size} episodes ({p.total_episodes:,}), {p.ppo_epochs} epochs", updates * d["seconds"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench-json", default=str(DEFAULT_BENCH), help="gpu_bench.py output calibrating the efficiencies ('' = assumed 35%%)")
    ap.add_argument("--eval-samples", type=int, default=256, help="posts per policy in the pipeline's evaluation")
    args = ap.parse_args()
    rows = project(args.bench_json)
    shape = sp.QWEN_0_5B
    bench, note = sp.read_bench(Path(args.bench_json)) if args.bench_json else (None, "none given")
    cal, _ = sp.calibrate(argparse.Namespace(assumed_efficiency=0.35, assumed_step_overhead_ms=15.0, host_overhead_scale=1.0, efficiency=None), bench, note)
    # evaluate: each of base/SFT/PPO samples the posts, the RM scores them and the references
    n = args.eval_samples
    rows.append(("evaluate (SFT, PPO)", f"{n} posts per policy, RM scores", 2 * sample_seconds(shape, n, 338, 53, 16, cal) + forward_seconds(shape, 3 * n, 375, cal)))
    print(f"## `--preset quick` projected on one DGX Spark\n\nCalibration: {note}\n\n| part | work | projected |\n|---|---|---|")
    for name, work, secs in rows:
        print(f"| {name} | {work} | {secs / 60:.1f} min |")
    print(f"| **total** | | **{sum(s for _, _, s in rows) / 60:.0f} min** |")


if __name__ == "__main__":
    main()
