#!/usr/bin/env python3
"""One GPU run of our real training steps at Qwen2.5-0.5B size, offline (issue 8, item 3).

    bash bench/gpu.sh                                   # on a lent H100/H200
    python3 bench/gpu_bench.py --tiny --device cpu      # here: every code path on a tiny model
    python3 bench/gpu_bench.py --only sft,ppo_512       # a subset

Nothing is downloaded: the model is a Qwen2 built from spark_projection's shape (hidden 896, 24
layers, 14 / 2 heads, MLP 4864, vocabulary 151,936, tied, rope theta 1e6) with random weights,
saved so that our own loaders read it; the tokenizer a word-level stand-in with Qwen2.5's layout
(EOS = pad = 151643, so `load_tokenizer` adds [PAD] = 151644); rows random ids with the real
sample's token lengths (`spark_projection.load_lengths`: query median 338, cut to 512; SFT
response median 32, at most 63).

Timed, with the recipe's defaults (`sft.Config`, `reward.Config`, `ppo.Config`), through the
stages' own functions (bench/common.py): `sft.train_step` (batch 128 = 16 x 8), `reward.train_step`
at 0.5B and, when time is left, 1.5B (128 pairs = 8 x 16), and PPO updates at rollout batch 64
and 512 (`ppo.load_models`' four models, `ppo_rollout` / `rewards_and_advantages` /
`ppo_update` / `update_metrics`; rollout and training timed apart, CUDA-synchronised; one
`generation.generate` chunk timed alone for the decoding rate). First step or update not counted.
Also a bf16 GEMM and a device copy (the achieved FLOP/s and bandwidth, for spark_projection.py)
and the optimizer used (bitsandbytes 8-bit AdamW when it works, else torch fused AdamW).

Each measurement runs in try/except; the JSON ($OUT/gpu_bench.json, else bench/gpu_bench.json)
is rewritten after each, so a run killed by its timeout keeps what it measured. None starts after
--budget-s; loops stop after --hard-s (keeping one timed step). `mfu_6N_spec` = 6 x parameters x
non-pad tokens/s / datasheet peak (989 TFLOP/s dense BF16 on H100 SXM and H200). FLOPs are
counted from the shapes by spark_projection.py, not here.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

T_START = time.perf_counter()  # the time budget counts from here (imports included)
BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import spark_projection as sp  # noqa: E402  (pure Python: shapes, lengths)

REQUIRED = ["torch", "numpy", "transformers", "tokenizers", "safetensors", "datasets", "tqdm"]
EOS_TEXT = "<|endoftext|>"


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


def save(path: Path, data: dict) -> None:
    """Rewrite the one JSON file atomically (after every measurement)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


@dataclass
class Context:
    device: str  # "cuda" or "cpu"
    tiny: bool
    optimizer: str
    shape: sp.Shape
    hard_s: float
    spec_peak: float | None = None
    gemm_peak: float | None = None

    def sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def past_hard(self) -> bool:
        return time.perf_counter() - T_START > self.hard_s

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


def write_checkpoint(directory: Path, shape: sp.Shape, kind: str, tokenizer, device: str, seed: int) -> None:
    """A random-weight Qwen2 causal LM (`policy`) or scalar-head reward model (`reward`) of `shape`,
    saved in bf16 with the tokenizer, as our stages' outputs are laid out."""
    import torch
    from transformers import Qwen2ForCausalLM, Qwen2ForSequenceClassification

    from dgx_spark_summary_from_human_feedback import tiny

    config = tiny.model_config(
        vocab_rows=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, max_position_embeddings=32768, rope_theta=1_000_000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=shape.tied, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
    )  # fmt: skip
    torch.manual_seed(seed)
    with torch.device(device):
        model = (Qwen2ForCausalLM if kind == "policy" else Qwen2ForSequenceClassification)(config)
    model.config.score_bias = 0.0
    model.to(torch.bfloat16).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def token_rows(n: int, lengths, eos: int, seed: int):
    """n processed rows with both stages' columns, random ids below EOS with TL;DR token lengths:
    an SFT row (query + reference response) and a comparison (the query, chosen, rejected)."""
    import datasets
    import numpy as np

    from dgx_spark_summary_from_human_feedback.data import Lengths

    rng, ids = random.Random(seed), np.random.default_rng(seed)
    Q, R, P, pad = Lengths().query, Lengths().response, 133, eos + 1  # [PAD] right after EOS in the stand-in

    def padded(tokens, width: int, left: bool = False):
        row = np.full(width, pad)
        if left:
            row[width - len(tokens) :] = tokens
        else:
            row[: len(tokens)] = tokens
        return row

    def response(n: int):
        return np.append(ids.integers(0, eos, n - 1), eos)

    cols: dict[str, list] = {}
    for _ in range(n):
        q, r = min(lengths.draw("query", rng), Q), min(lengths.draw("reference_response", rng), R)
        query = ids.integers(0, eos, q)
        a, b = lengths.draw("reference_response", rng), lengths.draw("ppo_response", rng)
        chosen, rejected = (a, b) if rng.random() < 0.5 else (b, a)
        row = {"query_token": padded(query, Q, left=True), "query_token_len": q, "reference_response_token_len": r,
               "query_reference_response_token": padded(np.append(query, response(r)), Q + R), "query_reference_response_token_len": q + r}  # fmt: skip
        for name, m in (("chosen", chosen), ("rejected", rejected)):
            row.update({f"{name}_token": padded(response(m), P), f"{name}_token_len": m, f"query_{name}_token_len": q + m})
        for key, value in row.items():
            cols.setdefault(key, []).append(value)
    return datasets.Dataset.from_dict({k: np.stack(v) if isinstance(v[0], np.ndarray) else v for k, v in cols.items()})


@dataclass
class Workspace:
    policy_dir: Path
    reward_dir: Path
    rows: object  # datasets.Dataset with SFT and comparison columns


def build_workspace(ctx: Context, root: Path, lengths) -> Workspace:
    """The stand-in tokenizer (Qwen2.5's layout: EOS = pad = vocab - 293), random checkpoints, rows."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dgx_spark_summary_from_human_feedback.data import load_tokenizer

    vocab = {f"t{i}": i for i in range(ctx.shape.vocab - 293)} | {EOS_TEXT: ctx.shape.vocab - 293}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TEXT, pad_token=EOS_TEXT).save_pretrained(str(root / "tokenizer"))
    tokenizer = load_tokenizer(str(root / "tokenizer"))  # adds [PAD] right after EOS
    for kind, seed in (("policy", 0), ("reward", 1)):
        write_checkpoint(root / kind, ctx.shape, kind, tokenizer, ctx.device, seed)
    return Workspace(root / "policy", root / "reward", token_rows(64 if ctx.tiny else 2048, lengths, tokenizer.eos_token_id, seed=2))


# ---------------------------------------------------------------------------------------------
# measurements: the stages' own steps (common.py), timed


def timed_steps(ctx: Context, step, n: int) -> list[float]:
    """Seconds of step(0) ... step(n-1), CUDA-synchronised; stops early past --hard-s (>= 2 run)."""
    seconds = []
    for k in range(n):
        if k >= 2 and ctx.past_hard():
            break
        ctx.sync()
        t = time.perf_counter()
        step(k)
        ctx.sync()
        seconds.append(time.perf_counter() - t)
    return seconds


def step_result(ctx: Context, seconds: list[float], tokens: list[int], padded: list[int], params: int, cfg) -> dict:
    """Totals over the timed steps (the first is warmup) -> tokens/s and MFU."""
    timed = seconds[1:]
    out = {
        "batch_size": cfg.batch_size, "micro_batch_size": cfg.micro_batch_size, "optimizer": ctx.optimizer, "params": params,
        "steps_timed": len(timed), "step_seconds": [round(s, 4) for s in seconds], "seconds_timed": sum(timed),
        "tokens_nonpad": sum(tokens[1 : len(seconds)]), "tokens_padded": sum(padded[1 : len(seconds)]),
    }  # fmt: skip
    if out["seconds_timed"] > 0:
        out["tokens_nonpad_per_s"] = out["tokens_nonpad"] / out["seconds_timed"]
        out["mfu_6N_spec"] = 6 * params * out["tokens_nonpad_per_s"] / ctx.spec_peak if ctx.spec_peak else None
    return {**out, **ctx.memory()}


def padded_tokens(indices, lengths, micro_batch_size) -> int:
    """Tokens of the step's micro-batches as padded to their longest row (what the forwards see unpacked)."""
    from dgx_spark_summary_from_human_feedback.training import micro_batches

    return sum(len(m) * max(lengths[i] for i in m) for m in micro_batches(indices, [lengths[i] for i in indices], micro_batch_size))


def bench_sft(ctx: Context, ws: Workspace) -> dict:
    import common
    import sft
    from dgx_spark_summary_from_human_feedback.data import load_tokenizer
    from dgx_spark_summary_from_human_feedback.training import batch_indices, setup_runtime

    cfg = sft.Config(optimizer=ctx.optimizer, device=ctx.device)
    if ctx.tiny:
        cfg = replace(cfg, batch_size=8, micro_batch_size=4)
    runtime = setup_runtime(ctx.device, cfg.precision)
    columns = ["query_reference_response_token", "query_reference_response_token_len", "reference_response_token_len"]
    step = common.sft_step(ws.policy_dir, load_tokenizer(str(ws.policy_dir)), ws.rows.with_format("torch", columns=columns), cfg, runtime)
    n = 3 if ctx.tiny else 6
    steps = [batch_indices(k, len(ws.rows), cfg.batch_size, cfg.seed) for k in range(n)]
    lengths = ws.rows["query_reference_response_token_len"]
    seconds = timed_steps(ctx, lambda k: step(steps[k], k), n)
    tokens = [sum(lengths[i] for i in s) for s in steps]
    padded = [padded_tokens(s, lengths, cfg.micro_batch_size) for s in steps]
    return {"method": "sft.train_step (bench/common.sft_step)", **step_result(ctx, seconds, tokens, padded, ctx.shape.params("lm"), cfg)}


def bench_reward(ctx: Context, ws: Workspace, policy_dir: Path, shape: sp.Shape) -> dict:
    import common
    import reward
    from dgx_spark_summary_from_human_feedback.data import load_tokenizer
    from dgx_spark_summary_from_human_feedback.training import PAIR_COLUMNS, batch_indices, setup_runtime

    cfg = reward.Config(optimizer=ctx.optimizer, device=ctx.device)
    if ctx.tiny:
        cfg = replace(cfg, batch_size=8, micro_batch_size=4)
    runtime = setup_runtime(ctx.device, cfg.precision)
    train = ws.rows.with_format("torch", columns=PAIR_COLUMNS)
    step = common.reward_step(policy_dir, load_tokenizer(str(policy_dir)), train, cfg, runtime, new_head=True)
    n = 3 if ctx.tiny else (5 if shape is ctx.shape else 4)
    steps = [batch_indices(k, len(ws.rows), cfg.batch_size, cfg.seed) for k in range(n)]
    chosen, rejected = ws.rows["query_chosen_token_len"], ws.rows["query_rejected_token_len"]
    seconds = timed_steps(ctx, lambda k: step(steps[k], k), n)
    tokens = [sum(chosen[i] + rejected[i] for i in s) for s in steps]
    pair = [max(c, r) for c, r in zip(chosen, rejected)]
    padded = [2 * padded_tokens(s, pair, cfg.micro_batch_size) for s in steps]
    result = step_result(ctx, seconds, tokens, padded, shape.params("score"), cfg)
    return {"method": "reward.train_step (bench/common.reward_step)", "model": shape.name, "sequences_per_pair": 2, **result}


def bench_ppo(ctx: Context, ws: Workspace, batch: int, updates: int) -> dict:
    """PPO updates on one fixed rollout batch of queries: rollout and training timed apart."""
    import common
    import ppo
    from dgx_spark_summary_from_human_feedback.data import load_tokenizer
    from dgx_spark_summary_from_human_feedback.rollout import sample_responses
    from dgx_spark_summary_from_human_feedback.models import load_policy
    from dgx_spark_summary_from_human_feedback.training import batch_indices, setup_runtime

    cfg = ppo.Config(sft_path=str(ws.policy_dir), reward_path=str(ws.reward_dir), batch_size=batch, optimizer=ctx.optimizer, device=ctx.device)
    if ctx.tiny:
        cfg = replace(cfg, micro_batch_size=4, forward_batch_size=8, generation_batch_size=8, response_length=12)
    runtime = setup_runtime(ctx.device, cfg.precision)
    tokenizer = load_tokenizer(cfg.sft_path)
    ds = ws.rows.with_format("torch", columns=["query_token", "query_token_len"])
    rows = ds[sorted(batch_indices(0, len(ds), batch, cfg.seed), key=lambda i: -int(ws.rows[i]["query_token_len"]))]
    update = common.ppo_update_fn(cfg, tokenizer, rows, runtime)
    marks: dict[str, float] = {}

    def tick(phase: str) -> None:
        ctx.sync()
        marks[phase] = time.perf_counter()

    timed = []
    for k in range(updates):
        if k >= 2 and ctx.past_hard():
            break
        tick("start")
        metrics = update(k, tick)
        timed.append({"update_s": marks["update"] - marks["start"], "rollout_s": marks["rollout"] - marks["start"],
                      "train_s": marks["update"] - marks["rollout"], "response_length": metrics["response_length"]})  # fmt: skip
    # decoding alone: the rollout's sampling (`rollout.sample_responses`) once more, timed
    policy = load_policy(cfg.sft_path, tokenizer, dtype=runtime.param_dtype, device=runtime.device)
    queries, query_mask = ppo.query_batch(rows, runtime.device)
    sampling = dict(response_length=cfg.response_length, temperature=cfg.temperature, batch_size=cfg.generation_batch_size, autocast=runtime.autocast)
    tick("start")
    sample_responses(policy, queries, query_mask, tokenizer, **sampling)
    tick("generated")
    chunks = -(-batch // cfg.generation_batch_size)
    generation_s = marks["generated"] - marks["start"]
    means = {k: sum(u[k] for u in timed[1:]) / max(len(timed) - 1, 1) for k in ("update_s", "rollout_s", "train_s")}
    means.update(generation_s=generation_s, rollout_forward_s=means["rollout_s"] - generation_s)
    settings = {k: getattr(cfg, k) for k in ("response_length", "generation_batch_size", "forward_batch_size", "micro_batch_size", "ppo_epochs", "num_minibatches")}
    return {
        "method": "ppo.load_models + ppo_rollout / rewards_and_advantages / ppo_update / update_metrics (bench/common.ppo_update_fn); "
        "generation_s: rollout.sample_responses on the same queries, timed alone",
        "batch_size": batch, **settings, "optimizer": ctx.optimizer, "context_length": int(rows["query_token_len"].max()),
        "timed_updates": timed, "timed_means": means, "episodes_per_s": batch / means["update_s"],
        "work_per_update": sp.ppo_update_work(ctx.shape, batch, int(rows["query_token_len"].max()), settings, ctx.optimizer),
        "generation_ms_per_step": 1e3 * generation_s / (chunks * cfg.response_length), **ctx.memory(),
    }  # fmt: skip


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


# ---------------------------------------------------------------------------------------------
# driver


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model and batches: exercises every code path on CPU")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_bench.json, else bench/gpu_bench.json)")
    ap.add_argument("--only", default=None, help="comma-separated subset of: sft,reward_0.5b,ppo_64,ppo_512,reward_1.5b")
    ap.add_argument("--budget-s", type=float, default=480.0, help="no measurement starts after this many seconds")
    ap.add_argument("--hard-s", type=float, default=540.0, help="step loops stop after this many seconds")
    args = ap.parse_args(argv)

    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "gpu_bench.json" if os.environ.get("OUT") else BENCH / "gpu_bench.json")
    missing, stubbed = check_dependencies()
    data: dict = {"schema": "gpu_bench/2", "argv": sys.argv[1:], "tiny": args.tiny, "measurements": {}, "skipped": {}, "errors": {}}
    if missing:
        data["error"] = "missing Python packages: " + ", ".join(f"{k} ({v})" for k, v in missing.items()) + "; carry wheels (bash bench/gpu.sh --download-wheels)"
        save(out, data)
        print(f"gpu_bench: {data['error']}", file=sys.stderr)
        return 2
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    spec_peak, spec_bw = sp.gpu_spec(name) if device == "cuda" else (None, None)
    optimizer, why = pick_optimizer(device)
    data.update(device={"type": device, "name": name, "spec_peak_bf16_flops": spec_peak, "spec_bandwidth_bytes_per_s": spec_bw}, optimizer={"kind": optimizer, "why": why})
    data["versions"] = {n: version_of(n) for n in ("torch", "transformers", "datasets", "bitsandbytes")} | {"tyro": "stand-in" if stubbed else version_of("tyro")}
    ctx = Context(device, args.tiny, optimizer, sp.TINY if args.tiny else sp.QWEN_0_5B, args.hard_s, spec_peak=spec_peak)
    lengths = sp.load_lengths(None)  # the embedded table: the device machine has no ../shared
    if args.tiny:
        lengths = lengths.scaled(0.125)  # a CPU check of the code paths, not a measurement
    data["model"] = {"shape": asdict(ctx.shape), "params_causal_lm": ctx.shape.params("lm"), "params_reward": ctx.shape.params("score")}
    data["lengths"] = lengths.summary()
    print(f"gpu_bench: {name} ({device}), torch {torch.__version__}, optimizer {optimizer}, writing {out}", flush=True)
    selected = set(args.only.split(",")) if args.only else None
    workdir = Path(tempfile.mkdtemp(prefix="gpu_bench_"))

    def measure(key: str, fn) -> None:
        elapsed = time.perf_counter() - T_START
        if (selected is not None and key not in selected and key != "gemm") or elapsed > args.budget_s:
            data["skipped"][key] = f"not selected or past the budget ({elapsed:.0f} s)"
            return
        print(f"gpu_bench: {key} (at {elapsed:.0f} s)", flush=True)
        ctx.reset_memory()
        t = time.perf_counter()
        try:
            data["measurements"][key] = {**fn(), "wall_s": time.perf_counter() - t}
        except Exception as e:  # noqa: BLE001 - one failure must not lose the rest
            data["errors"][key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
            print(f"gpu_bench: {key} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        data["elapsed_s"] = time.perf_counter() - T_START
        save(out, data)

    try:
        measure("gemm", lambda: bench_gemm(ctx))
        ws = build_workspace(ctx, workdir, lengths)
        measure("sft", lambda: bench_sft(ctx, ws))
        measure("reward_0.5b", lambda: bench_reward(ctx, ws, ws.policy_dir, ctx.shape))
        for batch, updates in ((8, 3), (16, 3)) if args.tiny else ((64, 5), (512, 4)):
            measure(f"ppo_{64 if batch in (8, 64) else 512}", lambda batch=batch, updates=updates: bench_ppo(ctx, ws, batch, updates))

        def reward_large() -> dict:
            from dgx_spark_summary_from_human_feedback.data import load_tokenizer

            large = sp.TINY_WIDE if args.tiny else sp.QWEN_1_5B
            write_checkpoint(workdir / "policy_large", large, "policy", load_tokenizer(str(ws.policy_dir)), device, seed=4)
            ctx.reset_memory()  # the bf16 build is freed: peak memory is the training's
            return bench_reward(ctx, ws, workdir / "policy_large", large)

        measure("reward_1.5b", reward_large)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        save(out, data)
    rates = {k: r.get("episodes_per_s") or r.get("tokens_nonpad_per_s") or r.get("gemm_bf16_flops") for k, r in data["measurements"].items()}
    print(f"gpu_bench: wrote {out} ({time.perf_counter() - T_START:.0f} s): {rates}; errors: {list(data['errors'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
