#!/usr/bin/env python3
"""One GPU run of our real training steps at Qwen2.5-0.5B size, offline (issue 8, item 3).

    bash bench/gpu.sh                                   # on a lent H100/H200
    python3 bench/gpu_bench.py --tiny --device cpu      # here: every code path on a tiny model
    python3 bench/gpu_bench.py --only sft,ppo_512       # a subset

Nothing is downloaded: random-weight Qwen2 checkpoints of spark_projection's shapes, a word-level tokenizer
with Qwen2.5's layout (EOS = pad = 151643, so `load_tokenizer` adds [PAD] = 151644), random ids with the
real sample's token lengths. Timed with the recipe's defaults, through bench/common.py's handles on the
stages' own steps: `sft.train_step`, `reward.train_step` at 0.5B and (time left) 1.5B, PPO updates at rollout
64 and 512 (rollout and training apart, `rollout.sample_responses` alone for the decoding rate); the first
step or update not counted. Also a bf16 GEMM and a device copy (the achieved rates spark_projection.py
calibrates with). FLOPs and bytes are counted by spark_projection's functions. `mfu_6N_spec` = 6 x
parameters x non-pad tokens/s / datasheet peak. Each part in try/except, the JSON rewritten after each.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, replace
from importlib.metadata import version
from pathlib import Path

for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)
T_START = time.perf_counter()  # the time budget counts from here (imports included)
BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import spark_projection as sp  # pure Python: shapes, lengths, FLOP counts
import torch


class Run:
    """The device and the one JSON file of a GPU script, rewritten after every part so that a run killed by
    its timeout keeps what it measured. No part starts after `budget_s`; step loops stop after `hard_s`."""

    def __init__(self, out: Path, device: str, budget_s: float, hard_s: float, data: dict):
        self.out, self.device, self.cuda, self.budget_s, self.hard_s = out, device, device == "cuda", budget_s, hard_s
        self.data = data | {"measurements": {}, "skipped": {}, "errors": {}}
        self.save()

    def elapsed(self) -> float:
        return time.perf_counter() - T_START

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    def timed(self, fn) -> float:
        """Seconds of fn(), CUDA-synchronised."""
        if self.cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    def reset_memory(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def memory(self) -> dict:
        if self.cuda:
            return {"peak_memory_allocated_gb": torch.cuda.max_memory_allocated() / 1e9}
        return {"process_max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.out)

    def part(self, key: str, fn) -> None:
        """fn(result): fills the dict stored under measurements[key]; one failure must not lose the rest."""
        if self.elapsed() > self.budget_s:
            self.data["skipped"][key] = f"past the budget ({self.elapsed():.0f} s)"
            return
        print(f"[{key}] at {self.elapsed():.0f} s", flush=True)
        self.reset_memory()
        try:
            fn(self.data["measurements"].setdefault(key, {}))
        except Exception as e:  # noqa: BLE001 - record and go on
            self.data["errors"][key] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
            print(f"[{key}] failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        self.save()


def versions() -> dict:
    packages = ("torch", "transformers", "datasets", "bitsandbytes", "tyro")
    return {m: version(m) for m in packages if importlib.util.find_spec(m)}


def qwen2_config(shape: sp.Shape, eos: int, pad: int):
    """Qwen2.5's architecture at `shape` (rope theta 1e6, RMSNorm eps 1e-6); one score output as a reward model."""
    from dgx_spark_summary_from_human_feedback import tiny

    dims = dict(hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers)
    dims |= dict(num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, tie_word_embeddings=shape.tied)
    rope = dict(max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6)
    return tiny.model_config(vocab_rows=shape.vocab, eos_token_id=eos, pad_token_id=pad, num_labels=1, **dims, **rope)


def pick_optimizer(device: str) -> tuple[str, str]:
    """What `make_optimizer(kind="auto")` picks, checked by one real 8-bit step on the GPU."""
    if device != "cuda":
        return "adamw-fused", "CPU: torch fused AdamW (what kind='auto' picks off CUDA)"
    try:
        import bitsandbytes as bnb

        p = torch.nn.Parameter(torch.randn(8192, device="cuda"))
        p.grad = torch.randn_like(p)
        bnb.optim.AdamW8bit([p], lr=1e-3).step()
        torch.cuda.synchronize()
        return "adamw8bit", f"bitsandbytes {bnb.__version__} AdamW8bit (what kind='auto' picks on CUDA)"
    except Exception as e:  # noqa: BLE001 - missing or without kernels for this CUDA
        return "adamw-fused", f"bitsandbytes unusable ({type(e).__name__}: {str(e)[:200]}): torch fused AdamW instead"


# ---- offline stand-ins: tokenizer, random checkpoints, rows with TL;DR lengths


def write_checkpoint(directory: Path, shape: sp.Shape, kind: str, tokenizer, device: str, seed: int) -> None:
    """A random Qwen2 causal LM (`policy`) or scalar-head reward model of `shape`, saved in bf16 with the
    tokenizer, laid out as our stages' outputs."""
    from transformers import Qwen2ForCausalLM, Qwen2ForSequenceClassification

    torch.manual_seed(seed)
    with torch.device(device):
        model_class = Qwen2ForCausalLM if kind == "policy" else Qwen2ForSequenceClassification
        model = model_class(qwen2_config(shape, tokenizer.eos_token_id, tokenizer.pad_token_id))
    model.config.score_bias = 0.0
    model.to(torch.bfloat16).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def token_rows(n: int, lengths: sp.LengthSample, eos: int, seed: int):
    """n processed rows with both stages' columns, random ids below EOS with TL;DR token lengths: an SFT row
    (query + reference response) and a comparison (the query, chosen, rejected)."""
    import datasets
    import numpy as np

    rng, ids = random.Random(seed), np.random.default_rng(seed)
    Q, R, P, pad = sp.BUDGET.query, sp.BUDGET.response, 133, eos + 1  # [PAD] right after EOS in the stand-in

    def padded(tokens, width: int, left: bool = False):
        return np.pad(tokens, (width - len(tokens), 0) if left else (0, width - len(tokens)), constant_values=pad)

    def response(n: int):
        return np.append(ids.integers(0, eos, n - 1), eos)

    cols: dict[str, list] = {}
    for _ in range(n):
        q, r = min(lengths.draw("query", rng), Q), min(lengths.draw("reference_response", rng), R)
        query = ids.integers(0, eos, q)
        a, b = lengths.draw("reference_response", rng), lengths.draw("ppo_response", rng)
        chosen, rejected = (a, b) if rng.random() < 0.5 else (b, a)
        row = {"query_token": padded(query, Q, left=True), "query_token_len": q, "reference_response_token_len": r}
        row |= {"query_reference_response_token": padded(np.append(query, response(r)), Q + R)}
        row |= {"query_reference_response_token_len": q + r}
        for name, m in (("chosen", chosen), ("rejected", rejected)):
            row |= {f"{name}_token": padded(response(m), P), f"{name}_token_len": m, f"query_{name}_token_len": q + m}
        for key, value in row.items():
            cols.setdefault(key, []).append(value)
    return datasets.Dataset.from_dict({k: np.stack(v) if isinstance(v[0], np.ndarray) else v for k, v in cols.items()})


def stand_ins(root: Path, shape: sp.Shape, device: str, rows: int, lengths: sp.LengthSample):
    """The stand-in tokenizer (Qwen2.5's layout: EOS = pad = vocab - 293), random checkpoints root/policy and
    root/reward, and the rows."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dgx_spark_summary_from_human_feedback.data import load_tokenizer

    eos, n = "<|endoftext|>", shape.vocab - 293
    backend = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(n)} | {eos: n}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=eos).save_pretrained(str(root / "tok"))
    tokenizer = load_tokenizer(str(root / "tok"))  # adds [PAD] right after EOS
    for kind, seed in (("policy", 0), ("reward", 1)):
        write_checkpoint(root / kind, shape, kind, tokenizer, device, seed)
    return tokenizer, token_rows(rows, lengths, tokenizer.eos_token_id, seed=2)


# ---- measurements: the stages' own steps (bench/common.py), timed


def bench_train_step(run: Run, kind: str, policy_dir: Path, shape: sp.Shape, rows, optimizer: str, n: int) -> dict:
    """`n` optimizer steps of SFT (`kind="sft"`) or the reward model from `policy_dir` (a new score head), with
    the stage's default Config; the first is warmup. FLOPs, bytes and padded tokens of each micro-batch as
    spark_projection counts them."""
    import common
    import reward
    import sft

    from dgx_spark_summary_from_human_feedback.data import load_tokenizer
    from dgx_spark_summary_from_human_feedback.training import PAIR_COLUMNS, batch_indices, micro_batches, setup_runtime

    cfg = (sft if kind == "sft" else reward).Config(optimizer=optimizer, device=run.device)
    cfg = replace(cfg, batch_size=8, micro_batch_size=4) if shape in (sp.TINY, sp.TINY_WIDE) else cfg
    runtime, tokenizer = setup_runtime(run.device, cfg.precision), load_tokenizer(str(policy_dir))
    q = rows["query_token_len"]
    if kind == "sft":
        train = rows.with_format("torch", columns=common.SFT_COLUMNS)
        step = common.sft_step(policy_dir, tokenizer, train, cfg, runtime)
        lengths = list(zip(q, rows["reference_response_token_len"]))
    else:
        train = rows.with_format("torch", columns=PAIR_COLUMNS)
        step = common.reward_step(policy_dir, tokenizer, train, cfg, runtime, new_head=True)
        lengths = list(zip(q, rows["chosen_token_len"], rows["rejected_token_len"]))
    steps = [batch_indices(k, len(rows), cfg.batch_size, cfg.seed) for k in range(n)]
    seconds = []
    for k in range(n):
        if k < 2 or run.elapsed() < run.hard_s:  # past --hard-s: stop, keeping one timed step
            seconds.append(run.timed(lambda k=k: step(steps[k], k)))
    params = shape.params("lm" if kind == "sft" else "score")
    longest = [q + max(rest) for q, *rest in lengths]  # how the stage sorts a batch into micro-batches
    totals = dict.fromkeys(("flops", "bytes", "tokens", "padded_tokens"), 0)
    for indices in steps[1 : len(seconds)]:
        for m in micro_batches(indices, [longest[i] for i in indices], cfg.micro_batch_size):
            work = sp.micro_work(kind, shape, [lengths[i] for i in m])
            totals = {key: totals[key] + work[key] for key in totals}
        totals["bytes"] += sp.BYTES["optimizer_step_per_param"][optimizer] * params
    timed = sum(seconds[1:])
    out = {"method": f"{kind}.train_step (bench/common.py)", "model": shape.name, "batch_size": cfg.batch_size}
    out |= {"micro_batch_size": cfg.micro_batch_size, "optimizer": optimizer, "params": params}
    out |= {"step_seconds": [round(s, 4) for s in seconds], "steps_timed": len(seconds) - 1, "seconds_timed": timed}
    out |= {"tokens_nonpad": totals["tokens"], "tokens_padded": totals["padded_tokens"]}
    out |= {"flops_counted": totals["flops"], "bytes_counted": totals["bytes"]}
    if timed > 0:
        out["tokens_nonpad_per_s"] = totals["tokens"] / timed
        spec = sp.gpu_spec(torch.cuda.get_device_name())[0] if run.cuda else None
        out["mfu_6N_spec"] = 6 * params * out["tokens_nonpad_per_s"] / spec if spec else None
    return out | run.memory()


def bench_ppo(run: Run, root: Path, shape: sp.Shape, rows, batch: int, updates: int, optimizer: str) -> dict:
    """PPO updates (ppo.Config's defaults) on one fixed rollout batch of queries: rollout and training timed
    apart; then the rollout's sampling once more, alone."""
    import common
    import ppo

    from dgx_spark_summary_from_human_feedback.data import load_tokenizer
    from dgx_spark_summary_from_human_feedback.models import load_policy
    from dgx_spark_summary_from_human_feedback.rollout import sample_responses
    from dgx_spark_summary_from_human_feedback.training import batch_indices, setup_runtime

    cfg = ppo.Config(sft_path=str(root / "policy"), reward_path=str(root / "reward"), batch_size=batch)
    cfg = replace(cfg, optimizer=optimizer, device=run.device)
    if shape is sp.TINY:
        cfg = replace(cfg, micro_batch_size=4, forward_batch_size=8, generation_batch_size=8, response_length=12)
    runtime, tokenizer = setup_runtime(run.device, cfg.precision), load_tokenizer(cfg.sft_path)
    ds = rows.with_format("torch", columns=["query_token", "query_token_len"])
    queries = ds[sorted(batch_indices(0, len(ds), batch, cfg.seed), key=lambda i: -int(rows[i]["query_token_len"]))]
    update, marks, timed = common.ppo_update_fn(cfg, tokenizer, queries, runtime), {}, []

    def tick(phase: str) -> None:
        if run.cuda:
            torch.cuda.synchronize()
        marks[phase] = time.perf_counter()

    for k in range(updates):
        if k >= 2 and run.elapsed() > run.hard_s:
            break
        tick("start")
        metrics = update(k, tick)
        rollout, train = marks["rollout"] - marks["start"], marks["update"] - marks["rollout"]
        timed.append({"update_s": rollout + train, "rollout_s": rollout, "train_s": train})
        timed[-1]["response_length"] = metrics["response_length"]
    policy = load_policy(cfg.sft_path, tokenizer, dtype=runtime.param_dtype, device=runtime.device)
    sampling = dict(response_length=cfg.response_length, temperature=cfg.temperature, autocast=runtime.autocast)
    ids, mask = ppo.query_batch(queries, runtime.device)
    sampling |= {"batch_size": cfg.generation_batch_size}
    generation_s = run.timed(lambda: sample_responses(policy, ids, mask, tokenizer, **sampling))
    means = {k: sum(u[k] for u in timed[1:]) / max(len(timed) - 1, 1) for k in ("update_s", "rollout_s", "train_s")}
    means |= {"generation_s": generation_s, "rollout_forward_s": means["rollout_s"] - generation_s}
    settings = {k: getattr(cfg, k) for k in sp.PPO_FIELDS}
    context = int(queries["query_token_len"].max())
    out = {"method": "ppo update (bench/common.ppo_update_fn); generation_s: rollout.sample_responses alone"}
    out |= settings | {"optimizer": optimizer, "context_length": context, "timed_updates": timed}
    out |= {"timed_means": means, "episodes_per_s": batch / means["update_s"]}
    out["work_per_update"] = sp.ppo_update_work(shape, batch, context, settings, optimizer)
    chunks = -(-batch // cfg.generation_batch_size)
    return out | {"generation_ms_per_step": 1e3 * generation_s / (chunks * cfg.response_length)} | run.memory()


def bench_gemm(run: Run, tiny: bool) -> dict:
    """The achieved bf16 GEMM rate and copy bandwidth: what spark_projection calibrates with."""
    n, reps = (512, 3) if tiny else (8192, 20)
    a, b = (torch.randn(n, n, device=run.device, dtype=torch.bfloat16) for _ in range(2))
    run.timed(lambda: [a @ b for _ in range(3)])
    gemm = 2 * n**3 * reps / run.timed(lambda: [a @ b for _ in range(reps)])
    x = torch.empty((64 if tiny else 2048) * 2**20, dtype=torch.uint8, device=run.device)
    y = torch.empty_like(x)
    y.copy_(x)
    copy = 2 * x.numel() * reps / run.timed(lambda: [y.copy_(x) for _ in range(reps)])  # bytes read + written
    return {"gemm_bf16_flops": gemm, "gemm_size": n, "copy_bandwidth_bytes_per_s": copy, "copy_bytes": x.numel()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model and batches: exercises every code path on CPU")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_bench.json, else bench/gpu_bench.json)")
    ap.add_argument("--only", default=None, help="a subset of: sft,reward_0.5b,ppo_64,ppo_512,reward_1.5b")
    ap.add_argument("--budget-s", type=float, default=480.0, help="no measurement starts after this many seconds")
    ap.add_argument("--hard-s", type=float, default=540.0, help="step loops stop after this many seconds")
    args = ap.parse_args(argv)
    out = Path(args.out or Path(os.environ.get("OUT", BENCH)) / "gpu_bench.json")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    peak, bandwidth = sp.gpu_spec(name) if device == "cuda" else (None, None)
    spec = {"type": device, "name": name, "spec_peak_bf16_flops": peak, "spec_bandwidth_bytes_per_s": bandwidth}
    data = {"schema": "gpu_bench/3", "argv": sys.argv[1:], "tiny": args.tiny, "device": spec}
    run = Run(out, device, args.budget_s, args.hard_s, data)
    import transformers

    transformers.logging.set_verbosity_error()
    optimizer, why = pick_optimizer(device)
    shape, large = (sp.TINY, sp.TINY_WIDE) if args.tiny else (sp.QWEN_0_5B, sp.QWEN_1_5B)
    lengths = sp.load_lengths(None)  # the embedded table: the device machine has no ../shared
    lengths = lengths.scaled(0.125) if args.tiny else lengths  # a CPU check of the code paths, not a measurement
    run.data |= {"optimizer": {"kind": optimizer, "why": why}, "lengths": lengths.summary()}
    run.data["versions"] = versions()
    run.data["model"] = {"shape": asdict(shape), "params_causal_lm": shape.params()}
    run.data["model"]["params_reward"] = shape.params("score")
    print(f"gpu_bench: {name} ({device}), torch {torch.__version__}, optimizer {optimizer}, writing {out}", flush=True)
    selected = set(args.only.split(",")) if args.only else None

    def part(key: str, fn) -> None:
        if selected is None or key in selected or key == "gemm":
            run.part(key, lambda result: result.update(fn()))

    def train(kind: str, checkpoint: Path, model: sp.Shape, steps: int) -> dict:  # --tiny: 3 steps
        return bench_train_step(run, kind, checkpoint, model, rows, optimizer, 3 if args.tiny else steps)

    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as tmp:
        root = Path(tmp)
        part("gemm", lambda: bench_gemm(run, args.tiny))
        tokenizer, rows = stand_ins(root, shape, device, 64 if args.tiny else 2048, lengths)
        part("sft", lambda: train("sft", root / "policy", shape, 6))
        part("reward_0.5b", lambda: train("reward", root / "policy", shape, 5))
        ppo_runs = (("ppo_64", 8, 3), ("ppo_512", 16, 3)) if args.tiny else (("ppo_64", 64, 5), ("ppo_512", 512, 4))
        for key, batch, updates in ppo_runs:
            part(key, lambda b=batch, u=updates: bench_ppo(run, root, shape, rows, b, u, optimizer))

        def reward_large() -> dict:
            write_checkpoint(root / "large", large, "policy", tokenizer, device, seed=4)
            run.reset_memory()  # the bf16 build is freed: peak memory is the training's
            return train("reward", root / "large", large, 4)

        part("reward_1.5b", reward_large)
    run.save()
    rates = {k: r.get("episodes_per_s") or r.get("tokens_nonpad_per_s") for k, r in run.data["measurements"].items()}
    print(f"gpu_bench: wrote {out} ({run.elapsed():.0f} s): {rates}; errors: {list(run.data['errors'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
