"""Follow-up checks on a lent GPU after bench/gpu.sh (one short run, < 5 minutes):

1. reward NaN: gpu_bench's 0.5B reward step hit grad_norm=nan at step 4 (H200, bf16 autocast,
   shared-prefix `get_pair_scores`). Rerun that loop, test every micro-batch's gradients, and on
   the first non-finite one recompute it under each SDPA backend and without the shared prefix.
2. SFT step profile: gpu_bench measured 6% MFU; where does a step's time go (torch.profiler).
3. packed vs padded forwards (`models.hidden_states(pack=...)`) on CUDA: same states? faster?

    bash bench/gpu.sh --checks        # on the lent machine (wheels as for gpu.sh)
    python bench/gpu_checks.py --tiny --device cpu   # here: every code path, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import gpu_bench as gb  # sets the offline environment and sys.path

sp = gb.sp


def sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def reward_nan(ctx, ws, out: dict, steps: int, force: bool = False) -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import reward
    from dgx_spark_summary_from_human_feedback.data import load_tokenizer
    from dgx_spark_summary_from_human_feedback.models import disable_dropout, get_pair_scores, load_reward_model
    from dgx_spark_summary_from_human_feedback.training import batch_indices, clip_gradients, distribute, make_optimizer, micro_batches, setup_runtime

    cfg = reward.Config()
    batch, micro = (8, 4) if ctx.tiny else (cfg.batch_size, cfg.micro_batch_size)
    runtime = setup_runtime(ctx.device, cfg.precision)
    tokenizer = load_tokenizer(str(ws.policy_dir))
    torch.manual_seed(cfg.seed)
    model = load_reward_model(str(ws.policy_dir), tokenizer, dtype=runtime.param_dtype, device=runtime.device, new_head=True)
    disable_dropout(model)
    model.train()
    optimizer = make_optimizer(list(model.parameters()), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8, kind=ctx.optimizer, device=runtime.device)
    train = ws.pairs.with_format("torch", columns=reward.PAIR_COLUMNS)
    pair_lengths = [max(c, r) for c, r in zip(ws.pairs["query_chosen_token_len"], ws.pairs["query_rejected_token_len"])]
    params = list(model.parameters())
    score_fn = distribute(model, get_pair_scores, runtime)  # as reward.py
    backends = {n: getattr(torch.backends.cuda, f"{n}_sdp_enabled")() for n in ("flash", "mem_efficient", "math", "cudnn")} if ctx.device == "cuda" else {}
    log = {"sdp_enabled": backends, "steps": []}
    out["reward_nan"] = log

    def run_micro(rows, share_prefix=True, backend=None):
        for p in params:
            p.grad = None
        fn = lambda *a: get_pair_scores(model, *a, share_prefix=share_prefix)  # noqa: E731
        ctx_mgr = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
        with ctx_mgr:
            chosen, rejected = reward.pair_scores(fn, rows, runtime)
            loss = -F.logsigmoid(chosen - rejected).sum()
            loss.backward()
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        return {"loss": float(loss.detach()), "scores_finite": bool(torch.isfinite(chosen).all() and torch.isfinite(rejected).all()), "nan_grad_params": len(bad), "first_bad": bad[-3:]}

    for i in range(steps):
        indices = batch_indices(i, len(train), batch, cfg.seed)
        step_log = {"step": i, "micro": []}
        log["steps"].append(step_log)
        found = None
        for k, rows_idx in enumerate(micro_batches(indices, [pair_lengths[j] for j in indices], micro, 0, 1)):
            rows = train[rows_idx]
            chosen, rejected = reward.pair_scores(score_fn, rows, runtime)
            (-F.logsigmoid(chosen - rejected).sum() / batch).backward()
            finite = all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
            if (not finite or force) and found is None:
                found = (k, rows_idx, rows)
                break
        step_log["finite"] = found is None
        if found is not None:
            k, rows_idx, rows = found
            qlen = rows["query_token_len"].tolist()
            step_log["bad_micro"] = {"index": k, "query_len": qlen, "chosen_len": rows["chosen_token_len"].tolist(), "rejected_len": rows["rejected_token_len"].tolist()}
            variants = {"default": {}, "no_shared_prefix": {"share_prefix": False}}
            if ctx.device == "cuda":
                variants.update({f"only_{b.name.lower()}": {"backend": b} for b in (SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION)})
            for name, kw in variants.items():
                try:
                    step_log[name] = run_micro(rows, **kw)
                except Exception as e:  # noqa: BLE001
                    step_log[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"gpu_checks: reward step {i} micro {k}: " + json.dumps({n: step_log[n] for n in variants}), flush=True)
            return
        clip_gradients(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"gpu_checks: reward step {i} finite", flush=True)


def sft_profile(ctx, ws, out: dict) -> None:
    from torch.profiler import ProfilerActivity, profile

    import sft
    from dgx_spark_summary_from_human_feedback.models import lm_loss_sum
    from dgx_spark_summary_from_human_feedback.training import batch_indices, clip_gradients, micro_batches

    setup = gb.sft_setup(ctx, ws)
    runtime, model, optimizer, train, batch, micro, lengths = setup.runtime, setup.model, setup.optimizer, setup.train, setup.batch, setup.micro, setup.lengths
    phases: dict[str, float] = {}

    def timed(name, fn):
        sync(ctx.device)
        t = time.perf_counter()
        value = fn()
        sync(ctx.device)
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
        return value

    def step(i):
        indices = batch_indices(i, len(train), batch, setup.cfg.seed)
        for rows in micro_batches(indices, [lengths[k] for k in indices], micro, 0, 1):
            ids, mask, labels = timed("data", lambda rows=rows: sft.sft_batch(train[rows], False, runtime.device))
            with runtime.autocast():
                loss, _ = timed("forward", lambda: lm_loss_sum(model, ids, mask, labels))
                timed("backward", lambda: (loss / 1000).backward())
        timed("clip", lambda: clip_gradients(model.parameters(), setup.cfg.grad_clip))
        timed("optimizer", lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))

    step(0)
    phases.clear()
    t = time.perf_counter()
    step(1)
    out["sft_phases_s"] = {**phases, "step": time.perf_counter() - t}
    print("gpu_checks: sft phases " + json.dumps(out["sft_phases_s"]), flush=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device == "cuda" else [])
    with profile(activities=activities) as prof:
        step(2)
        sync(ctx.device)
    sort = "cuda_time_total" if ctx.device == "cuda" else "cpu_time_total"
    out["sft_profile_by_device_time"] = prof.key_averages().table(sort_by=sort, row_limit=25)
    out["sft_profile_by_cpu_self"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    print(out["sft_profile_by_device_time"], flush=True)


def packing(ctx, ws, out: dict) -> None:
    import random

    import torch

    from dgx_spark_summary_from_human_feedback.data import load_tokenizer
    from dgx_spark_summary_from_human_feedback.models import hidden_states, load_policy
    from dgx_spark_summary_from_human_feedback.training import setup_runtime

    runtime = setup_runtime(ctx.device, "auto")
    tokenizer = load_tokenizer(str(ws.policy_dir))
    model = load_policy(str(ws.policy_dir), tokenizer, dtype=runtime.param_dtype, device=runtime.device)
    rng = random.Random(0)
    B, R = (4, 8) if ctx.tiny else (16, 53)
    query_lengths = sorted((min(ws.lengths.draw("query", rng), sp.BUDGET.query) for _ in range(B)), reverse=True)
    if ctx.tiny:
        query_lengths = [max(2, q // 8) for q in query_lengths]
    T = query_lengths[0] + R
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, q in enumerate(query_lengths):
        mask[b, query_lengths[0] - q :] = 1
    ids = torch.randint(0, tokenizer.eos_token_id, (B, T)).masked_fill(mask == 0, tokenizer.pad_token_id)
    ids, mask = ids.to(runtime.device), mask.to(runtime.device)
    keep = mask.bool()
    result = {"rows": B, "columns": T, "real_tokens": int(mask.sum()), "query_lengths": query_lengths}
    states = {}
    for pack in (False, True, False, True):
        model.zero_grad(set_to_none=True)
        sync(ctx.device)
        t = time.perf_counter()
        with runtime.autocast():
            hidden = hidden_states(model, ids, mask, pack=pack)
            hidden[keep].float().pow(2).mean().backward()
        sync(ctx.device)
        result.setdefault(f"fwd_bwd_s_pack_{pack}", []).append(time.perf_counter() - t)
        states[pack] = hidden.detach()[keep].float()
    with torch.no_grad(), runtime.autocast():
        for pack in (False, True):
            times = []
            for _ in range(3):
                sync(ctx.device)
                t = time.perf_counter()
                hidden_states(model, ids, mask, pack=pack)
                sync(ctx.device)
                times.append(time.perf_counter() - t)
            result[f"forward_s_pack_{pack}"] = times
    result["max_abs_diff"] = float((states[True] - states[False]).abs().max())
    result["max_abs"] = float(states[False].abs().max())
    try:
        from torch.nn.attention import varlen  # noqa: F401

        result["varlen_attn"] = "available"
    except Exception as e:  # noqa: BLE001
        result["varlen_attn"] = f"{type(e).__name__}: {e}"
    out["packing"] = result
    print("gpu_checks: packing " + json.dumps(result), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--reward-steps", type=int, default=8)
    ap.add_argument("--force-diagnose", action="store_true", help="diagnose the first micro-batch even if finite (tests the code path)")
    args = ap.parse_args()
    missing, _ = gb.check_dependencies()
    if missing:
        print(f"gpu_checks: missing {missing}", file=sys.stderr)
        return 2
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    path = Path(os.environ["OUT"]) / "gpu_checks.json" if os.environ.get("OUT") else gb.BENCH / "gpu_checks.json"
    out: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__, "errors": {}}
    report = gb.Report(path, out)
    optimizer, _ = gb.pick_optimizer(device)
    shape = sp.TINY if args.tiny else sp.QWEN_0_5B
    ctx = gb.Context(device, args.tiny, optimizer, gb.Clock(400, 450), report, shape)
    lengths = sp.load_lengths(None)
    with tempfile.TemporaryDirectory() as root:
        ws = gb.build_workspace(ctx, Path(root), lengths)
        for name, fn in (("reward_nan", lambda: reward_nan(ctx, ws, out, args.reward_steps, args.force_diagnose)), ("sft_profile", lambda: sft_profile(ctx, ws, out)), ("packing", lambda: packing(ctx, ws, out))):
            t = time.perf_counter()
            try:
                fn()
            except Exception as e:  # noqa: BLE001
                out["errors"][name] = traceback.format_exc()[-3000:]
                print(f"gpu_checks: {name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            out[f"{name}_wall_s"] = time.perf_counter() - t
            ctx.reset_memory()
            report.save()
    print(f"gpu_checks: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
