#!/usr/bin/env python3
"""Issue 17's GPU checks and timings, side by side in one process, at Qwen2.5-0.5B shape.

    python bench/gpu_issue17.py --out $OUT/gpu_issue17.json     # a lent H100/H200 (< 8 min)
    python bench/gpu_issue17.py --cpu-smoke --out /tmp/s.json   # here: every code path, tiny shapes

Nothing is downloaded: the policy and reward model are Qwen2 models built from a config written
out in code (`spark_projection.QWEN_0_5B`: hidden 896, 24 layers, 14 / 2 heads, MLP 4864,
vocabulary 151,936, tied embeddings) with random weights, fp32 weights under bf16 autocast as the
stages train; rows are random ids with TL;DR-like lengths (queries 200-512 tokens, left padded;
53 response tokens; SFT responses 20-63 tokens). What it measures, each part in try/except and
the JSON rewritten after each, none started after --budget-s:

1. decode: `generation.generate` with decoding eager, static and cuda_graph, batch 64 (PPO's
   rollout 64), 128 (one generation batch of the rollout 512) and 512: ms per decoding step
   ((generate - prefill) / 52 steps; median of the repeats), and whether static and cuda_graph
   give eager's tokens under the same generator (bf16 kernels may round differently over the
   longer static key range, so the share of equal tokens and the first step's logits gap are
   recorded rather than asserted). Issue target: <= 6 ms per step at batch 64.
2. packed: each packed attention (`sdpa_packed`: one SDPA call per row; `varlen_packed`;
   `flex_packed`, compiled) against the padded forward on 16 SFT-shaped rows: hidden states and
   parameter gradients (max |diff| / max |padded|); then SFT's `lm_loss_sum` forward + backward,
   non-pad tokens/s, padded vs varlen vs flex (those whose gradients ran).
3. reward_sweep: `models.get_pair_scores` forward + backward (reward.py's step, no optimizer)
   at 4, 8, 16, 32 pairs per micro-batch: non-pad tokens/s and peak memory.
4. ppo_sweep: the PPO training forward (`models.response_logits` -> log-probs, and the value
   head on `hidden_states`) forward + backward at 8, 16, 32, 64 episodes per micro-batch (padded,
   and packed with each kernel that passed 2.): episodes/s and peak memory.

No result here is a claim until it has run on a GPU; the lead reads the JSON and decides which
defaults change (`generation.Decoding`, `models.PackedAttention`, micro-batch sizes).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)

T_START = time.perf_counter()
BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import spark_projection as sp  # noqa: E402 - pure Python shapes
import torch  # noqa: E402

from dgx_spark_summary_from_human_feedback.generation import generate, prefill  # noqa: E402
from dgx_spark_summary_from_human_feedback.models import (  # noqa: E402
    PACKED_FLEX, PACKED_SDPA, PACKED_VARLEN, get_pair_scores, hidden_states, lm_loss_sum, logprobs_from_logits, response_logits,
)  # fmt: skip

RESPONSE_LENGTH = 53  # PPO's response_length


class Run:
    """Device, autocast, timer and the JSON that is rewritten after every part."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device("cpu" if args.cpu_smoke else "cuda")
        self.cuda = self.device.type == "cuda"
        self.out = Path(args.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.data = {"script": "bench/gpu_issue17.py", "argv": sys.argv[1:], "environment": environment(self.device), "results": {}, "errors": {}}
        self.save()

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def elapsed(self) -> float:
        return time.perf_counter() - T_START

    def timed(self, fn) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def peak_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 1e9 if self.cuda else None

    def reset_peak(self):
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def save(self):
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.out)

    def part(self, name: str, fn):
        if self.elapsed() > self.args.budget_s:
            self.data["errors"][name] = f"skipped: {self.elapsed():.0f} s spent, budget {self.args.budget_s} s"
            print(f"[{name}] skipped (budget)", flush=True)
            return
        print(f"[{name}] start at {self.elapsed():.0f} s", flush=True)
        try:
            fn(self.data["results"].setdefault(name, {}))
        except Exception as e:  # noqa: BLE001 - record and go on to the next part
            self.data["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
            print(f"[{name}] failed: {type(e).__name__}: {e}", flush=True)
        self.save()
        print(json.dumps({name: self.data["results"].get(name)}, default=str)[:3000], flush=True)


def environment(device) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__, "device": str(device)}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), capability=".".join(map(str, torch.cuda.get_device_capability())), cuda=torch.version.cuda)
    try:
        importlib.import_module("torch.nn.attention.varlen")
        env["varlen_attn"] = "available"
    except ImportError as e:
        env["varlen_attn"] = f"missing ({e})"
    return env


# ---------------------------------------------------------------------------------------------
# models and rows


def build(run: Run, kind: str):
    """A random-weight Qwen2 causal LM or scalar-head reward model at the run's shape, fp32."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Qwen2Config

    shape = sp.TINY if run.args.cpu_smoke else sp.QWEN_0_5B
    config = Qwen2Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, max_position_embeddings=32768, rope_theta=1_000_000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=shape.tied, use_sliding_window=False, num_labels=1, pad_token_id=0, eos_token_id=shape.vocab - 1,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(run.device):
        model = (AutoModelForCausalLM if kind == "policy" else AutoModelForSequenceClassification).from_config(config, attn_implementation=PACKED_SDPA)
    if kind == "reward":
        model.config.score_bias = 0.0
    return model


def use_attention(model, name: str) -> None:
    """Switch the model's (packed) attention implementation in place, as the loaders' `attention=`."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name
    assert model.config._attn_implementation == name, model.config._attn_implementation


def left_padded(run: Run, B: int, vocab: int, lo: int, hi: int, seed: int):
    """(B, hi) random ids, each row's length drawn from [lo, hi], left padded (pad id 0), and mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (B,), generator=g)
    ids = torch.randint(1, vocab - 1, (B, hi), generator=g)
    mask = (torch.arange(hi)[None] >= hi - lengths[:, None]).long()
    return (ids * mask).to(run.device), mask.to(run.device)


def right_padded(run: Run, B: int, vocab: int, lo: int, hi: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (B,), generator=g)
    ids = torch.randint(1, vocab - 1, (B, hi), generator=g)
    mask = (torch.arange(hi)[None] < lengths[:, None]).long()
    return (ids * mask).to(run.device), mask.to(run.device)


def sizes(run: Run) -> dict:
    if run.args.cpu_smoke:
        return dict(query=(8, 24), sft=(16, 40), response=6, decode_batches=[4, 8], micro=[2, 4], reps=1, train_steps=1)
    return dict(query=(200, 512), sft=(250, 575), response=RESPONSE_LENGTH, decode_batches=[64, 128, 512], micro=[8, 16, 32, 64], reps=3, train_steps=3)


def rel_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (in fp32)."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


# ---------------------------------------------------------------------------------------------
# 1. decoding: eager vs static vs CUDA graphs


def part_decode(run: Run, result: dict) -> None:
    s = sizes(run)
    policy = build(run, "policy").eval()
    vocab, R = policy.config.vocab_size, s["response"]
    modes = ["eager", "static"] + (["cuda_graph"] if run.cuda else [])
    for B in s["decode_batches"]:
        if run.elapsed() > run.args.budget_s:
            result[f"batch_{B}"] = "skipped (budget)"
            continue
        ids, mask = left_padded(run, B, vocab, *s["query"], seed=B)
        row = result[f"batch_{B}"] = {"query_tokens": int(mask.sum()), "Tq": ids.shape[1], "response_tokens": R}
        with torch.no_grad(), run.autocast():
            prefill_s = statistics.median(run.timed(lambda: prefill(policy, ids, mask)) for _ in range(s["reps"]))
        row["prefill_ms"] = round(prefill_s * 1e3, 2)
        tokens, first_logits = {}, {}
        for mode in modes:
            times = []
            for rep in range(s["reps"] + 1):  # the first is a warm-up (allocator, cuBLAS plans)

                def sample():
                    with run.autocast():
                        tokens[mode] = generate(policy, ids, mask, max_new_tokens=R, temperature=0.7, generator=torch.Generator(device=run.device).manual_seed(1), decoding=mode)

                t = run.timed(sample)
                if rep:
                    times.append(t)
            total = statistics.median(times)
            row[mode] = {"generate_ms": round(total * 1e3, 1), "ms_per_step": round((total - prefill_s) * 1e3 / (R - 1), 3), "episodes_per_s": round(B / total, 1)}
            # the first decoding step's logits, fed the same first token
            with torch.no_grad(), run.autocast():
                logits, decode = decoder_of(policy, ids, mask, R, mode)
                first_logits[mode] = decode(logits.argmax(-1)).float().clone()
        for mode in modes[1:]:
            row[mode]["same_tokens_as_eager"] = float((tokens[mode] == tokens["eager"]).float().mean())
            row[mode]["first_step_logits_gap"] = rel_gap(first_logits[mode], first_logits["eager"])
        if "cuda_graph" in row:
            row["cuda_graph_speedup_vs_eager"] = round(row["eager"]["ms_per_step"] / row["cuda_graph"]["ms_per_step"], 2)
        run.save()
    del policy


def decoder_of(policy, ids, mask, R, mode):
    from dgx_spark_summary_from_human_feedback.generation import eager_decoder, static_decoder

    if mode == "eager":
        return eager_decoder(policy, ids, mask)
    return static_decoder(policy, ids, mask, R, cuda_graph=mode == "cuda_graph")


# ---------------------------------------------------------------------------------------------
# 2. packed training forwards: padded vs per-row SDPA vs varlen vs flex


def kernels(run: Run) -> list[str]:
    return [PACKED_SDPA, PACKED_VARLEN, PACKED_FLEX]


def part_packed(run: Run, result: dict) -> None:
    s = sizes(run)
    policy = build(run, "policy").train()
    vocab = policy.config.vocab_size
    micro = 16 if run.cuda else 4
    ids, mask = right_padded(run, micro, vocab, *s["sft"], seed=7)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : s["sft"][0] - 10] = -100  # the "query": only the response is labelled, as in SFT
    result["rows"] = {"micro_batch": micro, "T": ids.shape[1], "non_pad_tokens": int(mask.sum())}

    def forward_backward(pack):
        policy.zero_grad(set_to_none=True)
        with run.autocast():
            hidden = hidden_states(policy, ids, mask, pack=pack)
            loss = (hidden[mask.bool()].float() ** 2).mean()
        loss.backward()
        return hidden.detach().float(), {n: p.grad.detach().float().clone() for n, p in policy.named_parameters() if p.grad is not None}

    # equality: hidden states and gradients of each kernel against the padded forward
    use_attention(policy, PACKED_SDPA)
    padded_hidden, padded_grads = forward_backward(False)
    keep = mask.bool()
    for kernel in kernels(run):
        row = result.setdefault(kernel, {})
        try:
            use_attention(policy, kernel)
            with torch.no_grad(), run.autocast():
                hidden = hidden_states(policy, ids, mask, pack=True).float()
            row["hidden_gap"] = rel_gap(hidden[keep], padded_hidden[keep])
            row["pad_rows_zero"] = bool((hidden[~keep] == 0).all())
            _, grads = forward_backward(True)
            row["grad_gap_max"] = max(rel_gap(grads[n], g) for n, g in padded_grads.items())
        except Exception as e:  # noqa: BLE001 - a kernel that does not run here is a result
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    # speed: sft's `lm_loss_sum` forward + backward, non-pad tokens/s, each with its default
    # packing: padded with sdpa_packed on CUDA (the per-row loop measured 2x slower there), one
    # packed row with varlen/flex (on CPU every kernel packs)
    for kernel in [PACKED_SDPA] + one_call_kernels(run, result):
        name = "padded" if kernel == PACKED_SDPA and run.cuda else kernel
        use_attention(policy, kernel)

        def step():
            with run.autocast():
                loss, n = lm_loss_sum(policy, ids, mask, labels)
            (loss / n).backward()

        try:
            step()  # warm-up (flex compiles here)
            t = statistics.median(run.timed(step) for _ in range(s["train_steps"]))
            result.setdefault(name, {})["fwd_bwd_tokens_per_s"] = round(int(mask.sum()) / t)
            result[name]["fwd_bwd_ms"] = round(t * 1e3, 1)
        except Exception as e:  # noqa: BLE001
            result.setdefault(name, {})["speed_error"] = f"{type(e).__name__}: {str(e)[:400]}"
        policy.zero_grad(set_to_none=True)
        run.save()
    use_attention(policy, PACKED_SDPA)
    del policy


def one_call_kernels(run: Run, packed: dict) -> list[str]:
    """varlen and flex, unless they failed the equality check of part 2 (or it did not run)."""
    return [k for k in (PACKED_VARLEN, PACKED_FLEX) if "grad_gap_max" in packed.get(k, {})]


# ---------------------------------------------------------------------------------------------
# 3. reward micro-batch sweep; 4. PPO micro-batch sweep


def part_reward_sweep(run: Run, result: dict) -> None:
    s = sizes(run)
    reward_model = build(run, "reward").train()
    vocab = reward_model.config.vocab_size
    for pairs in [m // 2 for m in s["micro"]] if not run.cuda else [4, 8, 16, 32]:
        if run.elapsed() > run.args.budget_s:
            result[f"pairs_{pairs}"] = "skipped (budget)"
            continue
        queries, query_mask = left_padded(run, pairs, vocab, *s["query"], seed=pairs)
        responses, response_mask = right_padded(run, 2 * pairs, vocab, *((10, 63) if run.cuda else (2, 8)), seed=pairs + 1)

        def step():
            with run.autocast():
                scores = get_pair_scores(reward_model, queries, query_mask, responses, response_mask)
                loss = -torch.nn.functional.logsigmoid(scores[0::2] - scores[1::2]).mean()
            loss.backward()

        try:
            run.reset_peak()
            step()
            t = statistics.median(run.timed(step) for _ in range(s["train_steps"]))
            tokens = int(query_mask.sum()) * 2 + int(response_mask.sum())  # as two full rows per pair
            result[f"pairs_{pairs}"] = {"ms": round(t * 1e3, 1), "pairs_per_s": round(pairs / t, 1), "row_tokens_per_s": round(tokens / t), "peak_gb": run.peak_gb()}
        except Exception as e:  # noqa: BLE001 - out of memory is a result too
            result[f"pairs_{pairs}"] = f"{type(e).__name__}: {str(e)[:300]}"
        reward_model.zero_grad(set_to_none=True)
        run.save()
    del reward_model


def part_ppo_sweep(run: Run, result: dict) -> None:
    s = sizes(run)
    policy, value_model = build(run, "policy").train(), build(run, "reward").train()
    vocab, R = policy.config.vocab_size, s["response"]
    packed_ok = one_call_kernels(run, run.data["results"].get("packed", {}))
    for micro in s["micro"]:
        queries, query_mask = left_padded(run, micro, vocab, *s["query"], seed=micro)
        responses, response_mask = right_padded(run, micro, vocab, 5, R, seed=micro + 1)
        qr, am = torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1)
        Tq = queries.shape[1]
        for kernel in [PACKED_SDPA] + packed_ok:  # each with its default packing, as in part 2
            name = "padded" if kernel == PACKED_SDPA and run.cuda else kernel
            if run.elapsed() > run.args.budget_s:
                result[f"micro_{micro}_{name}"] = "skipped (budget)"
                continue
            use_attention(policy, kernel)
            use_attention(value_model, kernel)

            def step():
                with run.autocast():
                    logprobs = logprobs_from_logits(response_logits(policy, qr, am, Tq, 0.7), responses)
                    hidden = hidden_states(value_model, qr, am)[:, Tq - 1 : -1]  # ppo.value_predictions' forward
                    values = value_model.score(hidden).squeeze(-1).float()
                    loss = -(logprobs * response_mask).sum() / response_mask.sum() + 0.1 * ((values**2) * response_mask).sum() / response_mask.sum()
                loss.backward()

            try:
                run.reset_peak()
                step()
                t = statistics.median(run.timed(step) for _ in range(s["train_steps"]))
                result[f"micro_{micro}_{name}"] = {"ms": round(t * 1e3, 1), "episodes_per_s": round(micro / t, 1), "peak_gb": run.peak_gb()}
            except Exception as e:  # noqa: BLE001
                result[f"micro_{micro}_{name}"] = f"{type(e).__name__}: {str(e)[:300]}"
            policy.zero_grad(set_to_none=True)
            value_model.zero_grad(set_to_none=True)
            run.save()
    use_attention(policy, PACKED_SDPA)
    del policy, value_model


def summary(results: dict) -> dict:
    """The numbers the issue asks for, in one place: ms per decoding step per mode and batch,
    each packed kernel's gaps and tokens/s, the fastest reward and PPO micro-batch."""
    out = {}
    for batch, row in results.get("decode", {}).items():
        if isinstance(row, dict):
            out[f"decode_{batch}_ms_per_step"] = {m: row[m]["ms_per_step"] for m in ("eager", "static", "cuda_graph") if m in row}
            out[f"decode_{batch}_same_tokens"] = {m: row[m].get("same_tokens_as_eager") for m in ("static", "cuda_graph") if m in row}
    for kernel, row in results.get("packed", {}).items():
        if kernel != "rows" and isinstance(row, dict):
            out[f"packed_{kernel}"] = {k: row[k] for k in ("hidden_gap", "grad_gap_max", "fwd_bwd_tokens_per_s", "error") if k in row}
    for part, unit in (("reward_sweep", "row_tokens_per_s"), ("ppo_sweep", "episodes_per_s")):
        rows = {k: v for k, v in results.get(part, {}).items() if isinstance(v, dict)}
        if rows:
            best = max(rows, key=lambda k: rows[k][unit])
            out[f"{part}_best"] = {"at": best, unit: rows[best][unit], "peak_gb": rows[best]["peak_gb"]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", str(BENCH)), "gpu_issue17.json"), help="JSON written after every part")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: every code path, no timing worth reading")
    parser.add_argument("--budget-s", type=float, default=420, help="no part or batch starts after this many seconds")
    parser.add_argument("--only", default="decode,packed,reward_sweep,ppo_sweep", help="comma-separated parts")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_issue17.py: no CUDA device; for a CPU check of the code paths pass --cpu-smoke", file=sys.stderr)
        return 2
    if args.cpu_smoke:
        torch.set_num_threads(1)
    run = Run(args)
    parts = {"decode": part_decode, "packed": part_packed, "reward_sweep": part_reward_sweep, "ppo_sweep": part_ppo_sweep}
    for name in args.only.split(","):
        run.part(name, lambda result, fn=parts[name]: fn(run, result))
        if run.cuda:
            torch.cuda.empty_cache()
    run.data["summary"] = summary(run.data["results"])
    run.save()
    print(json.dumps(run.data["summary"], indent=1))
    print(f"gpu_issue17.py: wrote {run.out} after {run.elapsed():.0f} s; errors: {list(run.data['errors']) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
