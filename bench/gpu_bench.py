#!/usr/bin/env python3
"""One GPU run of our real training code at Qwen2.5-0.5B size, offline (issue 8, item 3).

    bash bench/gpu.sh                                   # on a lent H100/H200 (checks, then this)
    python3 bench/gpu_bench.py                          # the same, directly
    python3 bench/gpu_bench.py --tiny --device cpu      # CPU check of every code path (< 2 min)
    python3 bench/gpu_bench.py --only sft,ppo_512       # a subset

Nothing is downloaded: the model is a Qwen2 built from a config written out below (hidden 896,
24 layers, 14 heads / 2 KV heads, MLP 4864, vocabulary 151,936, tied embeddings, rope theta 1e6)
with random weights, saved to a temporary directory so that our own loaders read it; the
tokenizer is a word-level stand-in with Qwen2.5's layout (EOS = pad = <|endoftext|> = 151643, so
`data.load_tokenizer` adds [PAD] = 151644); rows are random ids with TL;DR token lengths drawn
from the real sample's distribution (`spark_projection.EMBEDDED_PERCENTILES`: query median 338,
44-526, cut to 512; SFT response median 32, up to 63 with EOS).

What is timed, all with the recipe's defaults (`sft.Config`, `reward.Config`, `ppo.Config`):
- sft: optimizer steps of sft.py's loop body (batch 128 = 16 x 8): `training.batch_indices` /
  `micro_batches`, `sft.sft_batch`, `models.lm_loss_sum` through `training.distribute`, backward,
  clip, `make_optimizer`'s AdamW. The loop body is the same dozen lines as sft.main (which also
  evaluates, checkpoints and samples, so is not timed whole).
- reward_0.5b (and reward_1.5b when time is left): reward.py's loop body (batch 128 pairs = 8 x 16)
  with `reward.pair_scores` / `models.get_pair_scores` (each query once for both summaries).
- ppo_64, ppo_512: `ppo.main` itself, in this process, for a few updates at rollout batch 64 and
  512 (4 PPO epochs, 53 sampled tokens, micro-batch 16, forward batch 32, generation batch 128),
  with all four models (policy, value, bf16 reference, bf16 reward model loaded from the random
  reward checkpoint: no rule-based score). Only I/O is replaced: checkpoint saving, the final
  export, the report and the sample table are no-ops. `ppo.generate`, `ppo.rollout` and
  `ppo.Logger` are wrapped to time generation and the no-grad forwards (CUDA-synchronised) and to
  stamp each update; the first update (warm-up) is not counted. Random weights almost never
  sample EOS, so every response is the full 53 tokens, which PPO computes on anyway.
Also: a bf16 GEMM and a device copy (the GPU's achieved peak FLOP/s and bandwidth, for
spark_projection.py), the optimizer used (bitsandbytes 8-bit AdamW when it works, else torch
fused AdamW), and whether TRL is importable.

Each measurement runs in try/except; the JSON (default $OUT/gpu_bench.json, else
bench/gpu_bench.json) is rewritten after each one and after each PPO update, so a run killed by
its timeout keeps what it measured. No measurement starts after --budget-s; loops stop after
--hard-s (keeping at least one timed step). MFU is reported two ways: `mfu_6N_spec` = 6 x
parameters x non-pad tokens/s / datasheet peak (989 TFLOP/s dense BF16 on H100 SXM and H200),
and `efficiency_counted_*` = FLOPs counted from the shapes (padding, causal attention, the LM head
only where our code runs it: spark_projection's counters) / achieved or datasheet peak.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import importlib.util
import itertools
import json
import os
import platform
import random
import resource
import shutil
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

for _key, _value in {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1",
}.items():  # fmt: skip
    os.environ.setdefault(_key, _value)

T_START = time.perf_counter()  # the time budget counts from here (imports included)
BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]

import spark_projection as sp  # pure Python: shapes, lengths, FLOP counters

REQUIRED = ["torch", "numpy", "transformers", "tokenizers", "safetensors", "datasets", "tqdm"]
EOS_TEXT = "<|endoftext|>"


class StopBench(Exception):
    """Raised from inside ppo.main when the time budget is spent (after >= 1 timed update)."""


# ---------------------------------------------------------------------------------------------
# dependencies, device, output


def check_dependencies() -> tuple[dict[str, str], list[str]]:
    """({missing module: error}, [stubbed modules]). tyro only parses the stages' CLIs, which this
    script never calls, so a machine without it gets an empty stand-in."""
    missing = {}
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a broken install counts as missing
            missing[name] = f"{type(e).__name__}: {e}"
    stubbed = []
    if importlib.util.find_spec("tyro") is None:

        def _no_cli(*args, **kwargs):
            raise RuntimeError("tyro is a stand-in here (gpu_bench.py): the stage CLIs are not available")

        sys.modules["tyro"] = types.ModuleType("tyro")
        sys.modules["tyro"].cli = _no_cli
        sys.modules["tyro"].conf = types.SimpleNamespace(UseAppendAction=None)
        stubbed.append("tyro")
    return missing, stubbed


def version_of(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return "not available"


class Report:
    """The one JSON file, rewritten atomically after every measurement."""

    def __init__(self, path: Path, data: dict):
        self.path = path
        self.data = data

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.path)


class Clock:
    def __init__(self, budget_s: float, hard_s: float, start: float | None = None):
        self.start = time.perf_counter() if start is None else start
        self.budget_s, self.hard_s = budget_s, hard_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def past_hard(self) -> bool:
        return self.elapsed() > self.hard_s


@dataclasses.dataclass
class Context:
    device: str  # "cuda" or "cpu"
    tiny: bool
    optimizer: str
    clock: Clock
    report: Report
    shape: sp.Shape
    spec_peak: float | None = None
    gemm_peak: float | None = None

    def sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def reset_memory(self) -> None:
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def memory(self) -> dict:
        if self.device == "cuda":
            import torch

            return {"peak_memory_allocated_gb": torch.cuda.max_memory_allocated() / 1e9, "peak_memory_reserved_gb": torch.cuda.max_memory_reserved() / 1e9}
        return {"process_max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def pick_optimizer(device: str) -> tuple[str, str]:
    """What `make_optimizer(kind="auto")` picks, checked by one real 8-bit step on the GPU."""
    if device != "cuda":
        return "adamw-fused", "CPU: torch fused AdamW (what kind='auto' picks off CUDA)"
    try:
        import bitsandbytes as bnb
        import torch

        p = torch.nn.Parameter(torch.randn(8192, device="cuda"))
        p.grad = torch.randn_like(p)
        bnb.optim.AdamW8bit([p], lr=1e-3).step()
        torch.cuda.synchronize()
        return "adamw8bit", f"bitsandbytes {bnb.__version__} AdamW8bit (what kind='auto' picks on CUDA)"
    except Exception as e:  # noqa: BLE001 - missing or without kernels for this CUDA
        return "adamw-fused", f"bitsandbytes unusable ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}): torch fused AdamW instead"


# ---------------------------------------------------------------------------------------------
# offline stand-ins: tokenizer, random checkpoints, rows with TL;DR lengths


def build_tokenizer(directory: Path, n_tokens: int) -> None:
    """Word-level tokenizer of `n_tokens` ids whose last is <|endoftext|> (EOS = pad, as Qwen2.5)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(n_tokens - 1)}
    vocab[EOS_TEXT] = n_tokens - 1
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TEXT, pad_token=EOS_TEXT).save_pretrained(str(directory))


def qwen2_config(shape: sp.Shape, tokenizer):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, max_position_embeddings=32768, rope_theta=1_000_000.0,
        rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=shape.tied, use_sliding_window=False, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


def write_checkpoint(directory: Path, shape: sp.Shape, kind: str, tokenizer, device: str, seed: int) -> None:
    """A random-weight Qwen2 causal LM (`policy`) or scalar-head reward model (`reward`), saved in
    bf16 with the tokenizer, as our stages' outputs are laid out."""
    import torch
    from transformers import Qwen2ForCausalLM, Qwen2ForSequenceClassification

    config = qwen2_config(shape, tokenizer)
    if kind == "reward":
        config.num_labels = 1
    torch.manual_seed(seed)
    with torch.device(device):
        model = (Qwen2ForCausalLM if kind == "policy" else Qwen2ForSequenceClassification)(config)
    if kind == "reward":
        model.config.score_bias = 0.0
    model.to(torch.bfloat16).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    del model


def token_rows(n: int, lengths: sp.LengthSample, eos: int, seed: int, pairs: bool):
    """SFT rows (processed-dataset columns) or comparison pairs, random ids below EOS."""
    import datasets
    import numpy as np

    rng, ids = random.Random(seed), np.random.default_rng(seed)
    Q, pad = sp.BUDGET.query, eos + 1  # [PAD] comes right after EOS in the stand-in tokenizer
    R = 133 if pairs else sp.BUDGET.response

    def response(length: int):
        return np.concatenate([ids.integers(0, eos, length - 1), [eos]])

    cols: dict[str, list] = {}
    for _ in range(n):
        q = min(lengths.draw("query", rng), Q)
        query = ids.integers(0, eos, q)
        if pairs:
            a, b = lengths.draw("reference_response", rng), lengths.draw("ppo_response", rng)
            chosen, rejected = (a, b) if rng.random() < 0.5 else (b, a)
            left = np.full(Q, pad)
            left[Q - q :] = query
            cols.setdefault("query_token", []).append(left)
            cols.setdefault("query_token_len", []).append(q)
            for name, r in (("chosen", chosen), ("rejected", rejected)):
                row = np.full(R, pad)
                row[:r] = response(r)
                cols.setdefault(f"{name}_token", []).append(row)
                cols.setdefault(f"{name}_token_len", []).append(r)
                cols.setdefault(f"query_{name}_token_len", []).append(q + r)
        else:
            r = min(lengths.draw("reference_response", rng), R)
            left = np.full(Q, pad)
            left[Q - q :] = query
            row = np.full(Q + R, pad)
            row[: q + r] = np.concatenate([query, response(r)])
            for key, value in (("query_token", left), ("query_token_len", q), ("query_reference_response_token", row), ("query_reference_response_token_len", q + r), ("reference_response_token_len", r)):
                cols.setdefault(key, []).append(value)
    return datasets.Dataset.from_dict({k: np.stack(v) if isinstance(v[0], np.ndarray) else v for k, v in cols.items()})


@dataclasses.dataclass
class Workspace:
    root: Path
    shape: sp.Shape
    policy_dir: Path
    reward_dir: Path
    sft_data_dir: Path
    sft_rows: object
    pairs: object
    lengths: sp.LengthSample


def build_workspace(ctx: Context, root: Path, lengths: sp.LengthSample) -> Workspace:
    import datasets

    from dgx_spark_summary_from_human_feedback.data import load_tokenizer

    n_tokens = ctx.shape.vocab - 292  # Qwen2.5's layout: EOS 151643 with 293 rows to spare
    build_tokenizer(root / "tokenizer", n_tokens)
    tokenizer = load_tokenizer(str(root / "tokenizer"))  # adds [PAD] = n_tokens
    policy_dir, reward_dir = root / "policy", root / "reward"
    write_checkpoint(policy_dir, ctx.shape, "policy", tokenizer, ctx.device, seed=0)
    write_checkpoint(reward_dir, ctx.shape, "reward", tokenizer, ctx.device, seed=1)
    n_rows = 64 if ctx.tiny else 2048
    sft_rows = token_rows(n_rows, lengths, tokenizer.eos_token_id, seed=2, pairs=False)
    datasets.DatasetDict({"train": sft_rows}).save_to_disk(str(root / "sft_data"))
    pairs = token_rows(n_rows, lengths, tokenizer.eos_token_id, seed=3, pairs=True)
    return Workspace(root, ctx.shape, policy_dir, reward_dir, root / "sft_data", sft_rows, pairs, lengths)


# ---------------------------------------------------------------------------------------------
# measurements


def throughput(ctx: Context, records: list[dict], params: int) -> dict:
    """Totals over the timed steps -> tokens/s, counted FLOP/s, MFU and efficiencies."""
    timed = [r for r in records if not r["warmup"]]
    seconds = sum(r["seconds"] for r in timed)
    out = {
        "steps_timed": len(timed), "step_seconds": [round(r["seconds"], 4) for r in records], "seconds_timed": seconds,
        "tokens_nonpad": sum(r["tokens"] for r in timed), "tokens_padded": sum(r["padded_tokens"] for r in timed),
        "flops_counted": sum(r["flops"] for r in timed), "bytes_counted": sum(r["bytes"] for r in timed), "params": params,
        "loss_first_last": [records[0]["loss"], records[-1]["loss"]],
    }  # fmt: skip
    if seconds > 0:
        out["tokens_nonpad_per_s"] = out["tokens_nonpad"] / seconds
        out["flops_counted_per_s"] = out["flops_counted"] / seconds
        out["mfu_6N_spec"] = 6 * params * out["tokens_nonpad_per_s"] / ctx.spec_peak if ctx.spec_peak else None
        out["efficiency_counted_vs_spec"] = out["flops_counted_per_s"] / ctx.spec_peak if ctx.spec_peak else None
        out["efficiency_counted_vs_gemm"] = out["flops_counted_per_s"] / ctx.gemm_peak if ctx.gemm_peak else None
    return out


def run_steps(ctx: Context, step_fn, warmup: int, steps: int) -> list[dict]:
    records = []
    for i in range(warmup + steps):
        if i > warmup and ctx.clock.past_hard():
            break
        ctx.sync()
        t = time.perf_counter()
        info = step_fn(i)
        ctx.sync()
        info.update(seconds=time.perf_counter() - t, warmup=i < warmup)
        records.append(info)
    return records


def bench_gemm(ctx: Context) -> dict:
    import torch

    n, reps = (512, 3) if ctx.tiny else (8192, 20)
    a = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    ctx.sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    ctx.sync()
    gemm = 2 * n**3 * reps / (time.perf_counter() - t)
    x = torch.empty((64 if ctx.tiny else 2048) * 2**20, dtype=torch.uint8, device=ctx.device)
    y = torch.empty_like(x)
    y.copy_(x)
    ctx.sync()
    t = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    ctx.sync()
    copy = 2 * x.numel() * reps / (time.perf_counter() - t)  # bytes read + written
    if not ctx.tiny:
        ctx.gemm_peak = gemm
    return {"gemm_bf16_flops": gemm, "gemm_size": n, "copy_bandwidth_bytes_per_s": copy, "copy_bytes": x.numel()}


def sft_setup(ctx: Context, ws: Workspace) -> types.SimpleNamespace:
    """sft.main's setup with the recipe defaults: config, runtime, model, optimizer, rows."""
    import sft
    from dgx_spark_summary_from_human_feedback.data import load_tokenizer
    from dgx_spark_summary_from_human_feedback.models import disable_dropout, load_policy
    from dgx_spark_summary_from_human_feedback.training import make_optimizer, setup_runtime

    cfg = sft.Config()
    runtime = setup_runtime(ctx.device, cfg.precision)
    tokenizer = load_tokenizer(str(ws.policy_dir))
    model = load_policy(str(ws.policy_dir), tokenizer, dtype=runtime.param_dtype, device=runtime.device)
    disable_dropout(model)
    model.train()
    optimizer = make_optimizer(list(model.parameters()), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps, kind=ctx.optimizer, device=runtime.device)
    columns = ["query_reference_response_token", "query_reference_response_token_len", "reference_response_token_len"]
    return types.SimpleNamespace(
        cfg=cfg, runtime=runtime, model=model, optimizer=optimizer, train=ws.sft_rows.with_format("torch", columns=columns),
        batch=8 if ctx.tiny else cfg.batch_size, micro=4 if ctx.tiny else cfg.micro_batch_size,
        lengths=list(ws.sft_rows["query_reference_response_token_len"]), response_lengths=list(ws.sft_rows["reference_response_token_len"]),
    )  # fmt: skip


def bench_sft(ctx: Context, ws: Workspace) -> dict:
    import torch

    import sft
    from dgx_spark_summary_from_human_feedback.models import lm_loss_sum
    from dgx_spark_summary_from_human_feedback.training import batch_indices, check_finite, clip_gradients, distribute, micro_batches

    setup = sft_setup(ctx, ws)
    cfg, runtime, model, optimizer, train = setup.cfg, setup.runtime, setup.model, setup.optimizer, setup.train
    batch, micro, lengths, response_lengths = setup.batch, setup.micro, setup.lengths, setup.response_lengths
    loss_fn = distribute(model, lm_loss_sum, runtime, cfg.strategy)

    def step(i: int) -> dict:  # sft.main's loop body
        indices = batch_indices(i, len(train), batch, cfg.seed)
        rows_per_micro = list(micro_batches(indices, [lengths[k] for k in indices], micro, runtime.rank, runtime.world_size))
        n_labels = sum(response_lengths[k] for k in indices)
        loss_total = torch.zeros((), device=runtime.device)
        work = {"tokens": 0, "padded_tokens": 0, "flops": 0.0, "bytes": 0.0}
        for rows in rows_per_micro:
            ids, mask, labels = sft.sft_batch(train[rows], cfg.train_on_query, runtime.device)
            with runtime.autocast():
                loss_sum, _ = loss_fn(ids, mask, labels)
                (loss_sum / n_labels * runtime.world_size).backward()
            loss_total += loss_sum.detach()
            counted = sp.sft_micro_work(ws.shape, [(lengths[k] - response_lengths[k], response_lengths[k]) for k in rows])
            for key in work:
                work[key] += counted[key]
        grad_norm = clip_gradients(model.parameters(), cfg.grad_clip)
        loss = float(loss_total) / n_labels
        check_finite(i, {"train/loss": loss, "grad_norm": grad_norm}, ws.root)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        work["bytes"] += sp.BYTES["optimizer_step_per_param"][ctx.optimizer] * ws.shape.params("lm")
        return {**work, "loss": loss}

    warmup, steps = (1, 2) if ctx.tiny else (1, 5)
    records = run_steps(ctx, step, warmup, steps)
    params = sum(p.numel() for p in model.parameters())
    return {
        "method": "sft.main's loop body on our functions (batch_indices, micro_batches, sft_batch, lm_loss_sum via distribute, clip, make_optimizer)",
        "batch_size": batch, "micro_batch_size": micro, "optimizer": ctx.optimizer, **throughput(ctx, records, params), **ctx.memory(),
    }  # fmt: skip


def bench_reward(ctx: Context, ws: Workspace, policy_dir: Path, shape: sp.Shape) -> dict:
    import torch
    import torch.nn.functional as F

    import reward
    from dgx_spark_summary_from_human_feedback.data import load_tokenizer
    from dgx_spark_summary_from_human_feedback.models import disable_dropout, get_pair_scores, load_reward_model
    from dgx_spark_summary_from_human_feedback.training import batch_indices, check_finite, clip_gradients, distribute, make_optimizer, micro_batches, setup_runtime

    cfg = reward.Config()
    batch, micro = (8, 4) if ctx.tiny else (cfg.batch_size, cfg.micro_batch_size)
    runtime = setup_runtime(ctx.device, cfg.precision)
    tokenizer = load_tokenizer(str(policy_dir))
    torch.manual_seed(cfg.seed)
    model = load_reward_model(str(policy_dir), tokenizer, dtype=runtime.param_dtype, device=runtime.device, new_head=True)
    disable_dropout(model)
    model.train()
    score_fn = distribute(model, get_pair_scores, runtime, cfg.strategy)
    optimizer = make_optimizer(list(model.parameters()), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8, kind=ctx.optimizer, device=runtime.device)
    train = ws.pairs.with_format("torch", columns=reward.PAIR_COLUMNS)
    query_len, chosen_len, rejected_len = (list(ws.pairs[c]) for c in ("query_token_len", "query_chosen_token_len", "query_rejected_token_len"))
    pair_lengths = [max(c, r) for c, r in zip(chosen_len, rejected_len)]

    def step(i: int) -> dict:  # reward.main's loop body
        indices = batch_indices(i, len(train), batch, cfg.seed)
        loss_total = torch.zeros((), device=runtime.device)
        work = {"tokens": 0, "padded_tokens": 0, "flops": 0.0, "bytes": 0.0}
        for rows_idx in micro_batches(indices, [pair_lengths[k] for k in indices], micro, runtime.rank, runtime.world_size):
            rows = train[rows_idx]
            chosen, rejected = reward.pair_scores(score_fn, rows, runtime)
            loss_sum = -F.logsigmoid(chosen - rejected).sum()
            (loss_sum / batch * runtime.world_size).backward()
            loss_total += loss_sum.detach()
            counted = sp.reward_micro_work(shape, [(query_len[k], chosen_len[k] - query_len[k], rejected_len[k] - query_len[k]) for k in rows_idx])
            for key in work:
                work[key] += counted[key]
        grad_norm = clip_gradients(model.parameters(), cfg.grad_clip)
        loss = float(loss_total) / batch
        check_finite(i, {"train/loss": loss, "grad_norm": grad_norm}, ws.root)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        work["bytes"] += sp.BYTES["optimizer_step_per_param"][ctx.optimizer] * shape.params("score")
        return {**work, "loss": loss}

    warmup, steps = (1, 2) if ctx.tiny else (1, 4 if shape is ctx.shape else 3)
    records = run_steps(ctx, step, warmup, steps)
    params = sum(p.numel() for p in model.parameters())
    return {
        "method": "reward.main's loop body on our functions (batch_indices, micro_batches, pair_scores / get_pair_scores via distribute, clip, make_optimizer)",
        "model": shape.name, "batch_size": batch, "micro_batch_size": micro, "optimizer": ctx.optimizer, "sequences_per_pair": 2,
        **throughput(ctx, records, params), **ctx.memory(),
    }  # fmt: skip


def _noop(*args, **kwargs) -> None:
    """Stands in for ppo.py's checkpoint / export / report / sample-table I/O."""


@contextlib.contextmanager
def patched(module, **attrs):
    old = {name: getattr(module, name) for name in attrs}
    for name, value in attrs.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(module, name, value)


def bench_ppo(ctx: Context, ws: Workspace, batch: int, updates: int, name: str) -> dict:
    """ppo.main for `updates` updates; per-update phase times from wrapped generate/rollout/Logger."""
    import ppo

    cfg = ppo.Config(
        sft_path=str(ws.policy_dir), reward_path=str(ws.reward_dir), dataset=str(ws.sft_data_dir), output_dir=str(ws.root / name),
        total_episodes=batch * updates, batch_size=batch, optimizer=ctx.optimizer, device=ctx.device, save_interval=10**9, sample_interval=10**9,
    )  # fmt: skip
    if ctx.tiny:
        cfg = dataclasses.replace(cfg, micro_batch_size=4, forward_batch_size=8, generation_batch_size=8, response_length=12)
    phase = {"generation_s": 0.0, "rollout_s": 0.0, "context_length": None}
    stamps: list[dict] = []
    original_generate, original_rollout, OriginalLogger = ppo.generate, ppo.rollout, ppo.Logger
    p = {k: getattr(cfg, k) for k in ("response_length", "generation_batch_size", "forward_batch_size", "micro_batch_size", "ppo_epochs", "num_minibatches")}
    result = {
        "method": "ppo.main in-process (all four models, reward model included); checkpoint/export/report/sample I/O replaced by no-ops; "
        "generate/rollout/Logger wrapped for CUDA-synchronised phase timing; first update not counted",
        "batch_size": batch, **p, "optimizer": ctx.optimizer,
    }  # fmt: skip

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            ctx.sync()
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            ctx.sync()
            phase[key] += time.perf_counter() - t
            if key == "rollout_s":
                phase["context_length"] = int(args[4].shape[1])  # queries (B, context)
            return out

        return wrapper

    class TimedLogger(OriginalLogger):
        def log(self, metrics: dict, step: int) -> None:
            super().log(metrics, step)
            if "episodes_per_s" not in metrics:  # only the per-update records
                return
            stamps.append({
                "update": step, "t": time.perf_counter(), **{k: phase[k] for k in ("generation_s", "rollout_s", "context_length")},
                "episodes_per_s_logged": metrics["episodes_per_s"], "peak_memory_gb_logged": metrics.get("peak_memory_gb"),
                "response_length": metrics.get("response_length"), "no_eos_share": metrics.get("no_eos_share"), "scores": metrics.get("objective/scores"),
            })  # fmt: skip
            phase.update(generation_s=0.0, rollout_s=0.0)
            summarise()
            ctx.report.data["measurements"][name] = {**result, "partial": True}
            ctx.report.save()
            if len(stamps) >= 2 and ctx.clock.past_hard():
                raise StopBench

    def summarise() -> None:
        per_update = []
        for prev, cur in itertools.pairwise(stamps):
            update_s = cur["t"] - prev["t"]
            work = sp.ppo_update_work(ws.shape, batch, cur["context_length"], p, ctx.optimizer)
            per_update.append({
                "update": cur["update"], "update_s": update_s, "generation_s": cur["generation_s"],
                "rollout_forward_s": cur["rollout_s"] - cur["generation_s"], "train_s": update_s - cur["rollout_s"],
                "context_length": cur["context_length"], "work": work,
            })  # fmt: skip
        result["updates_logged"] = [{k: v for k, v in s.items() if k != "t"} for s in stamps]
        result["timed_updates"] = [{k: v for k, v in u.items() if k != "work"} for u in per_update]
        if per_update:
            n = len(per_update)
            means = {k: sum(u[k] for u in per_update) / n for k in ("update_s", "generation_s", "rollout_forward_s", "train_s")}
            work = {k: sum(u["work"][k] for u in per_update) / n for k in per_update[0]["work"]}
            result["timed_means"] = means
            result["work_per_update"] = work
            result["episodes_per_s"] = batch / means["update_s"]
            result["generation_ms_per_step"] = 1e3 * means["generation_s"] / max(work["decode_steps"] + len(range(0, batch, p["generation_batch_size"])), 1)
            flops = work["prefill_flops"] + work["decode_flops"] + work["forward_flops"] + work["train_flops"]
            result["flops_counted_per_s"] = flops / means["update_s"]
            if ctx.gemm_peak:
                result["efficiency_counted_vs_gemm"] = {
                    "rollout_forward": work["forward_flops"] / means["rollout_forward_s"] / ctx.gemm_peak,
                    "train": work["train_flops"] / means["train_s"] / ctx.gemm_peak,
                    "whole_update": result["flops_counted_per_s"] / ctx.gemm_peak,
                }  # fmt: skip
            if ctx.spec_peak:
                result["mfu_6N_spec_train_padded_tokens"] = 6 * 2 * ws.shape.params("lm") * p["ppo_epochs"] * batch * (work["sequence_length"]) / means["train_s"] / ctx.spec_peak
        result.update(ctx.memory())

    t0 = time.perf_counter()
    with patched(ppo, generate=timed(original_generate, "generation_s"), rollout=timed(original_rollout, "rollout_s"), Logger=TimedLogger,
                 save_checkpoint=_noop, export_final=_noop, write_report=_noop, write_samples=_noop):  # fmt: skip
        try:
            ppo.main(cfg)
            result["stopped_early"] = False
        except StopBench:
            result["stopped_early"] = True
    # loading the models and data: time to the first update's stamp minus one steady update
    result["setup_s"] = max(stamps[0]["t"] - t0 - (stamps[1]["t"] - stamps[0]["t"] if len(stamps) > 1 else 0.0), 0.0) if stamps else None
    summarise()
    result["partial"] = False
    return result


# ---------------------------------------------------------------------------------------------
# driver


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model and batches: exercises every code path on CPU")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_bench.json, else bench/gpu_bench.json)")
    ap.add_argument("--only", default=None, help="comma-separated subset of: gemm,sft,reward_0.5b,ppo_64,ppo_512,reward_1.5b")
    ap.add_argument("--budget-s", type=float, default=480.0, help="no measurement starts after this many seconds")
    ap.add_argument("--hard-s", type=float, default=540.0, help="step loops and PPO stop after this many seconds")
    ap.add_argument("--keep-workdir", action="store_true", help="keep the temporary checkpoints and data")
    args = ap.parse_args(argv)

    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "gpu_bench.json" if os.environ.get("OUT") else BENCH / "gpu_bench.json")
    missing, stubbed = check_dependencies()
    data: dict = {"schema": "gpu_bench/1", "created_unix": time.time(), "argv": sys.argv[1:], "tiny": args.tiny, "measurements": {}, "skipped": {}, "errors": {}}
    report = Report(out, data)
    if missing:
        hint = (
            "missing Python packages on this machine: " + ", ".join(f"{k} ({v})" for k, v in missing.items())
            + ". The device image has torch, numpy, tokenizers, safetensors, tqdm but not datasets (and an older transformers): "
            "carry wheels (bash bench/gpu.sh --download-wheels here, then run with carry ['.whl']) or a virtual environment."
        )  # fmt: skip
        print(f"gpu_bench: {hint}", file=sys.stderr)
        data["error"] = hint
        report.save()
        return 2

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        data["error"] = "--device cuda but torch.cuda.is_available() is False"
        report.save()
        print(f"gpu_bench: {data['error']}", file=sys.stderr)
        return 2
    try:
        import datasets

        datasets.disable_progress_bars()
        import ppo  # noqa: F401 - fail here, once, if the stages do not import
        import reward  # noqa: F401
        import sft  # noqa: F401
    except Exception as e:  # noqa: BLE001
        data["error"] = f"the stage scripts do not import: {type(e).__name__}: {e}"
        report.save()
        print(f"gpu_bench: {data['error']}", file=sys.stderr)
        return 2

    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    spec_peak, spec_bw = sp.gpu_spec(name) if device == "cuda" else (None, None)
    data["device"] = {"type": device, "name": name, "spec_peak_bf16_flops": spec_peak, "spec_bandwidth_bytes_per_s": spec_bw}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        data["device"].update(capability=f"{props.major}.{props.minor}", total_memory_gb=props.total_memory / 1e9, multiprocessors=props.multi_processor_count)
    data["versions"] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "datasets": version_of("datasets"), "bitsandbytes": version_of("bitsandbytes"), "tyro": "stand-in (not installed)" if stubbed else version_of("tyro"),
        "trl": version_of("trl") if importlib.util.find_spec("trl") else "not available",
    }  # fmt: skip
    optimizer, why = pick_optimizer(device)
    data["optimizer"] = {"kind": optimizer, "why": why}
    data["precision"] = "fp32 master weights + bf16 autocast (setup_runtime 'auto')" if device == "cuda" else "fp32 (CPU)"
    shape = sp.TINY if args.tiny else sp.QWEN_0_5B
    clock = Clock(args.budget_s, args.hard_s, start=T_START)
    ctx = Context(device, args.tiny, optimizer, clock, report, shape, spec_peak=spec_peak)
    lengths = sp.load_lengths(None)  # the embedded table: the device machine has no ../shared
    if args.tiny:
        lengths = lengths.scaled(0.125)  # a CPU check of the code paths, not a measurement
    data["model"] = {"shape": dataclasses.asdict(shape), "params_causal_lm": shape.params("lm"), "params_reward": shape.params("score")}
    data["lengths"] = lengths.summary()
    print(f"gpu_bench: {name} ({device}), torch {torch.__version__}, transformers {transformers.__version__}, optimizer {optimizer}, writing {out}")
    report.save()

    selected = set(args.only.split(",")) if args.only else None
    workdir = Path(tempfile.mkdtemp(prefix="gpu_bench_"))
    ws: Workspace | None = None
    ppo_batches = (8, 16) if args.tiny else (64, 512)
    ppo_updates = {ppo_batches[0]: 2 if args.tiny else 4, ppo_batches[1]: 2 if args.tiny else 3}

    def estimate(key: str) -> float:  # seconds a measurement is expected to need (full size)
        if args.tiny:
            return 5.0
        small = data["measurements"].get(f"ppo_{ppo_batches[0]}", {})
        if key == f"ppo_{ppo_batches[1]}" and small.get("timed_means"):
            per_update = small["timed_means"]["update_s"] * ppo_batches[1] / ppo_batches[0]
            return (small.get("setup_s") or 30.0) + 2 * per_update
        return {"gemm": 10.0, "workspace": 30.0, "sft": 45.0, "reward_0.5b": 45.0, f"ppo_{ppo_batches[0]}": 60.0, f"ppo_{ppo_batches[1]}": 200.0, "reward_1.5b": 75.0}[key]

    def measure(key: str, fn) -> None:
        if selected is not None and key not in selected and key not in ("gemm", "workspace"):
            return
        if clock.elapsed() > args.budget_s or clock.elapsed() + estimate(key) > args.hard_s:
            data["skipped"][key] = f"time budget: {clock.elapsed():.0f} s elapsed, ~{estimate(key):.0f} s needed, limit {args.hard_s:.0f} s"
            print(f"gpu_bench: skip {key}: {data['skipped'][key]}")
            report.save()
            return
        print(f"gpu_bench: {key} (at {clock.elapsed():.0f} s)", flush=True)
        ctx.reset_memory()
        t = time.perf_counter()
        try:
            value = fn()
            if value is not None:
                value["wall_s"] = time.perf_counter() - t
                data["measurements"][key] = value
        except Exception as e:  # noqa: BLE001 - one failure must not lose the rest
            data["errors"][key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
            if not data["measurements"].get(key, {}).get("partial"):  # keep the updates a failed PPO run logged
                data["measurements"].pop(key, None)
            print(f"gpu_bench: {key} failed: {type(e).__name__}: {e}", file=sys.stderr)
        ctx.reset_memory()
        data["elapsed_s"] = clock.elapsed()
        report.save()

    def workspace() -> None:
        nonlocal ws
        t = time.perf_counter()
        ws = build_workspace(ctx, workdir, lengths)
        data["workspace_s"] = time.perf_counter() - t

    try:
        measure("gemm", lambda: bench_gemm(ctx))
        if ctx.gemm_peak:
            data["device"]["measured_gemm_bf16_flops"] = ctx.gemm_peak
            data["device"]["measured_copy_bandwidth_bytes_per_s"] = data["measurements"]["gemm"]["copy_bandwidth_bytes_per_s"]
        measure("workspace", workspace)
        if ws is None:
            data["error"] = "could not build the random checkpoints and data: see errors.workspace"
        else:
            measure("sft", lambda: bench_sft(ctx, ws))
            measure("reward_0.5b", lambda: bench_reward(ctx, ws, ws.policy_dir, shape))
            for batch in ppo_batches:
                measure(f"ppo_{batch}", lambda batch=batch: bench_ppo(ctx, ws, batch, ppo_updates[batch], f"ppo_{batch}"))

            def reward_large() -> dict:
                from dgx_spark_summary_from_human_feedback.data import load_tokenizer

                large = sp.TINY_WIDE if args.tiny else sp.QWEN_1_5B
                directory = workdir / "policy_large"
                write_checkpoint(directory, large, "policy", load_tokenizer(str(ws.policy_dir)), device, seed=4)
                ctx.reset_memory()  # the bf16 build is freed: peak memory is the training's
                return bench_reward(ctx, ws, directory, large)

            measure("reward_1.5b", reward_large)
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        data["elapsed_s"] = clock.elapsed()
        report.save()
    print_summary(data)
    print(f"gpu_bench: wrote {out} ({clock.elapsed():.0f} s)")
    return 0


def print_summary(data: dict) -> None:
    m = data["measurements"]
    lines = ["| measurement | throughput | MFU 6N (spec) | counted eff. vs GEMM | peak memory GB |", "|---|---|---|---|---|"]
    for key, r in m.items():
        if key.startswith("ppo_"):
            value = f"{r.get('episodes_per_s', float('nan')):.2f} episodes/s"
            eff = r.get("efficiency_counted_vs_gemm", {}).get("whole_update") if isinstance(r.get("efficiency_counted_vs_gemm"), dict) else None
            mfu = r.get("mfu_6N_spec_train_padded_tokens")
        elif key == "gemm":
            value = f"{r['gemm_bf16_flops'] / 1e12:.0f} TFLOP/s, copy {r['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s"
            eff = mfu = None
        else:
            value = f"{r.get('tokens_nonpad_per_s', float('nan')):,.0f} tokens/s"
            eff, mfu = r.get("efficiency_counted_vs_gemm"), r.get("mfu_6N_spec")
        mem = r.get("peak_memory_allocated_gb") or r.get("process_max_rss_gb")
        lines.append(f"| {key} | {value} | {f'{mfu:.1%}' if mfu else '-'} | {f'{eff:.1%}' if eff else '-'} | {f'{mem:.1f}' if mem else '-'} |")
    print("\n".join(lines))
    for key, err in data["errors"].items():
        print(f"error in {key}: {err['error']}")
    for key, why in data["skipped"].items():
        print(f"skipped {key}: {why}")


if __name__ == "__main__":
    sys.exit(main())
