#!/usr/bin/env python3
"""Issue 17's GPU checks and timings, side by side in one process, at Qwen2.5-0.5B shape.

    python bench/gpu_issue17.py --out $OUT/gpu_issue17.json     # a lent H100/H200 (< 8 min)
    python bench/gpu_issue17.py --cpu-smoke --out /tmp/s.json   # here: every code path, tiny shapes

Random-weight Qwen2 models (gpu_bench.py's config of spark_projection.QWEN_0_5B), fp32 weights under bf16
autocast as the stages train; random ids with TL;DR-like lengths (queries 200-512 tokens, left padded; 53
response tokens; SFT rows 250-575). Parts, each in try/except with the JSON rewritten after it:
1. decode: `generation.generate` eager / static / cuda_graph at batch 64, 128 and 512: ms per decoding
   step ((generate - prefill) / 52, median of the repeats), the share of tokens equal to eager's under the
   same generator and the first step's logits gap (recorded, not asserted: bf16 kernels may round
   differently over the longer static key range). Issue target: <= 6 ms per step at batch 64.
2. packed: each packed attention (`sdpa_packed`, `varlen_packed`, `flex_packed`) against the padded
   forward on 16 SFT rows (hidden states and gradients, max |diff| / max |padded|); then SFT's
   `lm_loss_sum` forward + backward, non-pad tokens/s, padded vs the kernels whose gradients ran.
3. reward_sweep: `get_pair_scores` forward + backward at 4-32 pairs per micro-batch: tokens/s, memory.
4. ppo_sweep: PPO's training forward (`response_logits` log-probs + the value head) forward + backward at
   8-64 episodes per micro-batch, padded and packed with each kernel that passed 2.: episodes/s, memory.
No result is a claim until it has run on a GPU; the lead decides which defaults change.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
from pathlib import Path

import gpu_bench
import torch
from gpu_bench import Run, sp

from dgx_spark_summary_from_human_feedback.generation import eager_decoder, generate, prefill, static_decoder
from dgx_spark_summary_from_human_feedback.models import PACKED_FLEX, PACKED_SDPA, PACKED_VARLEN, get_pair_scores
from dgx_spark_summary_from_human_feedback.models import hidden_states, lm_loss_sum, logprobs_from_logits
from dgx_spark_summary_from_human_feedback.models import response_logits


def sizes(run: Run) -> dict:
    """Token lengths (query, SFT row), response tokens, batches, repeats; --cpu-smoke: tiny."""
    if not run.cuda:
        lengths = {"query": (8, 24), "sft": (16, 40), "response": 6, "reps": 1}
        return lengths | {"decode": [4, 8], "micro": [2, 4], "pairs": [1, 2]}
    lengths = {"query": (200, 512), "sft": (250, 575), "response": 53, "reps": 3}
    return lengths | {"decode": [64, 128, 512], "micro": [8, 16, 32, 64], "pairs": [4, 8, 16, 32]}


def build(run: Run, kind: str):
    """A random-weight Qwen2 causal LM or scalar-head reward model at the run's shape, fp32 (pad 0, EOS last)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    shape = sp.QWEN_0_5B if run.cuda else sp.TINY
    torch.manual_seed(0)
    with torch.device(run.device):
        auto = AutoModelForCausalLM if kind == "policy" else AutoModelForSequenceClassification
        config = gpu_bench.qwen2_config(shape, eos=shape.vocab - 1, pad=0)
        model = auto.from_config(config, attn_implementation=PACKED_SDPA)
    model.config.score_bias = 0.0
    return model.train()


def use_attention(model, name: str) -> None:
    """Switch the model's (packed) attention implementation in place, as the loaders' `attention=`."""
    model.set_attn_implementation(name)
    assert model.config._attn_implementation == name, model.config._attn_implementation


def random_rows(run: Run, B: int, vocab: int, lengths: tuple[int, int], seed: int, left: bool = False):
    """(B, longest) random ids, each row's length drawn from `lengths`, padded (pad id 0), and the mask."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(lengths[0], lengths[1] + 1, (B,), generator=g)[:, None]
    ids, positions = torch.randint(1, vocab - 1, (B, lengths[1]), generator=g), torch.arange(lengths[1])[None]
    mask = (positions >= lengths[1] - n if left else positions < n).long()
    return (ids * mask).to(run.device), mask.to(run.device)


def rel_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (in fp32)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))


def measure(run: Run, result: dict, key: str, step, reps: int, **counts) -> None:
    """result[key]: the median ms of `step` after a warm-up call (flex compiles there), each of `counts` per
    second, peak memory; or the exception (out of memory, a kernel that does not run here: a result too)."""
    if run.elapsed() > run.budget_s:
        result[key] = "skipped (budget)"
        return
    try:
        run.reset_memory()
        step()
        t = statistics.median(run.timed(step) for _ in range(reps))
    except Exception as e:  # noqa: BLE001
        result[key] = f"{type(e).__name__}: {str(e)[:400]}"
        return
    result[key] = {"ms": round(t * 1e3, 1)} | {f"{name}_per_s": round(n / t, 1) for name, n in counts.items()}
    result[key]["peak_gb"] = run.memory().get("peak_memory_allocated_gb")


def part_decode(run: Run, result: dict) -> None:
    s = sizes(run)
    policy = build(run, "policy").eval()
    vocab, R = policy.config.vocab_size, s["response"]
    modes = ["eager", "static"] + (["cuda_graph"] if run.cuda else [])
    for B in s["decode"]:
        if run.elapsed() > run.budget_s:
            result[f"batch_{B}"] = "skipped (budget)"
            continue
        ids, mask = random_rows(run, B, vocab, s["query"], seed=B, left=True)
        row = result[f"batch_{B}"] = {"query_tokens": int(mask.sum()), "Tq": ids.shape[1], "response_tokens": R}
        with torch.no_grad(), run.autocast():
            prefill_s = statistics.median(run.timed(lambda: prefill(policy, ids, mask)) for _ in range(s["reps"]))
        row["prefill_ms"] = round(prefill_s * 1e3, 2)
        tokens, first_logits = {}, {}
        for mode in modes:

            def sample(mode=mode):
                with run.autocast():
                    g = torch.Generator(device=run.device).manual_seed(1)
                    kwargs = {"max_new_tokens": R, "temperature": 0.7, "generator": g, "decoding": mode}
                    tokens[mode] = generate(policy, ids, mask, **kwargs)

            total = statistics.median([run.timed(sample) for _ in range(s["reps"] + 1)][1:])  # the first: warm-up
            row[mode] = {"generate_ms": round(total * 1e3, 1), "episodes_per_s": round(B / total, 1)}
            row[mode]["ms_per_step"] = round((total - prefill_s) * 1e3 / (R - 1), 3)
            with torch.no_grad(), run.autocast():  # the first decoding step's logits, fed the same first token
                if mode == "eager":
                    logits, decode = eager_decoder(policy, ids, mask)
                else:
                    logits, decode = static_decoder(policy, ids, mask, R, cuda_graph=mode == "cuda_graph")
                first_logits[mode] = decode(logits.argmax(-1)).float().clone()
        for mode in modes[1:]:
            row[mode]["same_tokens_as_eager"] = float((tokens[mode] == tokens["eager"]).float().mean())
            row[mode]["first_step_logits_gap"] = rel_gap(first_logits[mode], first_logits["eager"])
        run.save()


def packed_ok(run: Run) -> list[str]:
    """varlen and flex, unless they failed part 2's equality check (or it did not run)."""
    packed = run.data["measurements"].get("packed", {})
    return [k for k in (PACKED_VARLEN, PACKED_FLEX) if "grad_gap_max" in packed.get(k, {})]


def part_packed(run: Run, result: dict) -> None:
    s = sizes(run)
    policy = build(run, "policy")
    micro = 16 if run.cuda else 4
    ids, mask = random_rows(run, micro, policy.config.vocab_size, s["sft"], seed=7)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : s["sft"][0] - 10] = -100  # the "query": only the response is labelled, as in SFT
    result["rows"] = {"micro_batch": micro, "T": ids.shape[1], "non_pad_tokens": int(mask.sum())}

    def forward_backward(pack):
        policy.zero_grad(set_to_none=True)
        with run.autocast():
            hidden = hidden_states(policy, ids, mask, pack=pack)
        (hidden[mask.bool()].float() ** 2).mean().backward()
        grads = {n: p.grad.float().clone() for n, p in policy.named_parameters() if p.grad is not None}
        return hidden.detach().float(), grads

    padded_hidden, padded_grads = forward_backward(False)
    keep = mask.bool()
    for kernel in (PACKED_SDPA, PACKED_VARLEN, PACKED_FLEX):
        row = result.setdefault(kernel, {})
        try:
            use_attention(policy, kernel)
            with torch.no_grad(), run.autocast():  # forward first: flex has no backward on CPU
                hidden = hidden_states(policy, ids, mask, pack=True).float()
            row["hidden_gap"] = rel_gap(hidden[keep], padded_hidden[keep])
            row["pad_rows_zero"] = bool((hidden[~keep] == 0).all())
            _, grads = forward_backward(True)
            row["grad_gap_max"] = max(rel_gap(grads[n], g) for n, g in padded_grads.items())
        except Exception as e:  # noqa: BLE001 - a kernel that does not run here is a result
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    # speed: sft's `lm_loss_sum` forward + backward with each kernel's default packing: padded on CUDA with
    # sdpa_packed (its per-row loop measured 2x slower there), one packed row with varlen/flex
    for kernel in [PACKED_SDPA] + packed_ok(run):
        name = "padded" if kernel == PACKED_SDPA and run.cuda else kernel
        use_attention(policy, kernel)

        def step():
            with run.autocast():
                loss, n = lm_loss_sum(policy, ids, mask, labels)
            (loss / n).backward()

        measure(run, result.setdefault("fwd_bwd", {}), name, step, s["reps"], tokens=int(mask.sum()))
        policy.zero_grad(set_to_none=True)
        run.save()
    use_attention(policy, PACKED_SDPA)


def part_reward_sweep(run: Run, result: dict) -> None:
    s = sizes(run)
    reward_model = build(run, "reward")
    vocab = reward_model.config.vocab_size
    for pairs in s["pairs"]:
        queries, query_mask = random_rows(run, pairs, vocab, s["query"], seed=pairs, left=True)
        responses, response_mask = random_rows(run, 2 * pairs, vocab, (10, 63) if run.cuda else (2, 8), seed=pairs + 1)

        def step():
            with run.autocast():
                scores = get_pair_scores(reward_model, queries, query_mask, responses, response_mask)
            (-torch.nn.functional.logsigmoid(scores[0::2] - scores[1::2]).mean()).backward()

        tokens = int(query_mask.sum()) * 2 + int(response_mask.sum())  # as two full rows per pair
        measure(run, result, f"pairs_{pairs}", step, s["reps"], pairs=pairs, row_tokens=tokens)
        reward_model.zero_grad(set_to_none=True)
        run.save()


def part_ppo_sweep(run: Run, result: dict) -> None:
    s = sizes(run)
    policy, value_model = build(run, "policy"), build(run, "reward")
    vocab, R = policy.config.vocab_size, s["response"]
    for micro in s["micro"]:
        queries, query_mask = random_rows(run, micro, vocab, s["query"], seed=micro, left=True)
        responses, response_mask = random_rows(run, micro, vocab, (5, R), seed=micro + 1)
        qr, am, Tq = torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1), queries.shape[1]
        n = response_mask.sum()

        def step():
            with run.autocast():
                logprobs = logprobs_from_logits(response_logits(policy, qr, am, Tq, 0.7), responses)
                hidden = hidden_states(value_model, qr, am)[:, Tq - 1 : -1]  # ppo.value_predictions' forward
                values = value_model.score(hidden).squeeze(-1).float()
            (-(logprobs * response_mask).sum() / n + 0.1 * ((values**2) * response_mask).sum() / n).backward()

        for kernel in [PACKED_SDPA] + packed_ok(run):  # each with its default packing, as in part 2
            key = f"micro_{micro}_{'padded' if kernel == PACKED_SDPA and run.cuda else kernel}"
            use_attention(policy, kernel)
            use_attention(value_model, kernel)
            measure(run, result, key, step, s["reps"], episodes=micro)
            policy.zero_grad(set_to_none=True)
            value_model.zero_grad(set_to_none=True)
            run.save()


def summary(results: dict) -> dict:
    """The numbers the issue asks for, in one place: ms per decoding step per mode and batch, each packed
    kernel's gaps and tokens/s, the fastest reward and PPO micro-batch."""
    out = {}
    for batch, row in results.get("decode", {}).items():
        if isinstance(row, dict):
            modes = [m for m in ("eager", "static", "cuda_graph") if m in row]
            out[f"decode_{batch}_ms_per_step"] = {m: row[m]["ms_per_step"] for m in modes}
            out[f"decode_{batch}_same_tokens"] = {m: row[m].get("same_tokens_as_eager") for m in modes[1:]}
    packed = results.get("packed", {})
    for kernel in (PACKED_SDPA, PACKED_VARLEN, PACKED_FLEX):
        out[f"packed_{kernel}"] = {k: v for k, v in packed.get(kernel, {}).items() if k != "pad_rows_zero"}
    speeds = packed.get("fwd_bwd", {}).items()
    out["packed_fwd_bwd_tokens_per_s"] = {k: v["tokens_per_s"] for k, v in speeds if isinstance(v, dict)}
    for part, unit in (("reward_sweep", "row_tokens_per_s"), ("ppo_sweep", "episodes_per_s")):
        rows = {k: v for k, v in results.get(part, {}).items() if isinstance(v, dict)}
        if rows:
            best = max(rows, key=lambda k: rows[k][unit])
            out[f"{part}_best"] = {"at": best, unit: rows[best][unit], "peak_gb": rows[best]["peak_gb"]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", gpu_bench.BENCH), "gpu_issue17.json"))
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: every code path, no timing")
    parser.add_argument("--budget-s", type=float, default=420, help="no part or batch starts after this many seconds")
    parser.add_argument("--only", default="decode,packed,reward_sweep,ppo_sweep", help="comma-separated parts")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_issue17.py: no CUDA device; for a CPU check of the code paths pass --cpu-smoke", file=sys.stderr)
        return 2
    if args.cpu_smoke:
        torch.set_num_threads(1)
    device = "cpu" if args.cpu_smoke else "cuda"
    environment = {"versions": gpu_bench.versions(), "device": device}
    environment["varlen_attn"] = importlib.util.find_spec("torch.nn.attention.varlen") is not None
    if device == "cuda":
        environment |= {"gpu": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability()}
    run = Run(Path(args.out), device, args.budget_s, args.budget_s, {"argv": sys.argv[1:], "environment": environment})
    parts = {"decode": part_decode, "packed": part_packed, "reward_sweep": part_reward_sweep}
    parts["ppo_sweep"] = part_ppo_sweep
    for name in args.only.split(","):
        run.part(name, lambda result, fn=parts[name]: fn(run, result))
    run.data["summary"] = summary(run.data["measurements"])
    run.save()
    print(json.dumps(run.data["summary"], indent=1))
    print(f"gpu_issue17.py: wrote {run.out} after {run.elapsed():.0f} s; errors: {list(run.data['errors']) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
