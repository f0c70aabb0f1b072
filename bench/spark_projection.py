#!/usr/bin/env python3
"""Project wall time and peak memory of the recipe on one DGX Spark (issue 8 item 4, issue 14 item 4).

    python bench/spark_projection.py                       # full recipe (markdown; --json: JSON)
    python bench/spark_projection.py --bench-json bench/gpu_results/gpu_bench_h200_no_cudnn_sdpa.json
    python bench/spark_projection.py --preset quick --bench-json bench/gpu_results/gpu_bench_h200_no_cudnn_sdpa.json

A model, not a measurement. A phase takes FLOPs / (GB10 peak x efficiency) + bytes / GB10 bandwidth, a
decoding step max(bytes / bandwidth, FLOPs / peak, host overhead). FLOPs are counted from the model shapes
(matmuls, causal attention, the LM head only where our code runs it), bytes from the traffic that does not
scale with FLOPs (optimizer steps, weight casts, fp32 logits). Efficiencies and the host overhead come from
a `gpu_bench.py` run (each phase's measured time minus its memory term on that GPU), else are assumed
(`--efficiency` overrides them all). Memory is an analytic estimate beside the peak the GPU measured. Sizes:
the stage Configs' defaults, or (`--preset quick`) their PRESETS["quick"] plus the evaluations a quick run
does. `gpu_bench.py` and `bench_ppo.py` count FLOPs with the functions here.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from dgx_spark_summary_from_human_feedback.data import QUERY_FORMAT, Lengths

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SAMPLE = REPO.parent / "shared" / "data" / "tldr_real_sample"
FILES = ("sft.jsonl", "comparisons.jsonl")  # its posts and its judged pairs
BUDGET = Lengths()  # the stages' token budgets: queries cut to 512, SFT responses to 63 (EOS included)
ASSUMED_EFFICIENCY, ASSUMED_STEP_OVERHEAD_S = 0.35, 0.015  # without a GPU measurement
SPARK = {  # RECIPE.md "DGX Spark (GB10)"
    "name": "DGX Spark (GB10)",
    "peak_bf16_flops": 92e12,  # measured BF16 GEMM, not a datasheet number
    "bandwidth_spec": 273e9,
    "bandwidth": 225e9,  # 220-230 GB/s measured: the midpoint is what the projection uses
    "memory_visible_gb": 119.7,
}
GPU_SPECS = {  # datasheet dense BF16 FLOP/s and bandwidth B/s, by a substring of the device name: first match wins
    "H100 PCIE": (756e12, 2.0e12),
    "H100 NVL": (835e12, 3.9e12),
    "H100": (989e12, 3.35e12),
    "H200": (989e12, 4.8e12),
    "A100": (312e12, 2.0e12),
}


def gpu_spec(name: str) -> tuple[float | None, float | None]:
    return next((spec for key, spec in GPU_SPECS.items() if key in name.upper()), (None, None))


def seconds(flops: float, bytes_: float, efficiency: float) -> float:
    return flops / (SPARK["peak_bf16_flops"] * efficiency) + bytes_ / SPARK["bandwidth"]


# ---- model shapes, FLOPs (multiply-add = 2 FLOPs), bytes and memory


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 151936
    tied: bool = True

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def matmul_params(self) -> int:
        """Weights of the decoder's matrix products: q, o; k, v; gate, up, down (no embedding, norms, biases)."""
        d, kv, i = self.hidden, self.kv_dim, self.intermediate
        return self.layers * (2 * d * d + 2 * d * kv + 3 * d * i)

    def params(self, head: str = "lm") -> int:
        """The causal LM (`head="lm"`, a tied head counted once) or the reward/value model (`"score"`: 1 x hidden)."""
        d, kv = self.hidden, self.kv_dim
        total = self.vocab * d + self.matmul_params() + self.layers * ((d + 2 * kv) + 2 * d) + d  # biases, norms
        return total + (self.vocab * d if head == "lm" and not self.tied else 0) + (d if head == "score" else 0)


QWEN_0_5B = Shape("Qwen2.5-0.5B", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864)
QWEN_1_5B = Shape("Qwen2.5-1.5B", hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960)
TINY = Shape("tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1024)
TINY_WIDE = Shape("tiny-wide", hidden=96, layers=3, heads=4, kv_heads=2, intermediate=192, vocab=1024)


def attention_flops(shape: Shape, batch: int, q_len: int, kv_len: int | None = None) -> float:
    """QK^T and AV, q_len queries each attending to its causal prefix of kv_len (the useful half)."""
    kv_len = q_len if kv_len is None else kv_len
    return shape.layers * 4 * shape.hidden * batch * (q_len * (kv_len - q_len) + q_len * (q_len + 1) / 2)


def forward_flops(shape: Shape, batch: int, seq_len: int, head_positions: float) -> float:
    """One forward over (batch, seq_len), the LM head run at `head_positions`."""
    matmuls = 2 * shape.matmul_params() * batch * seq_len
    return matmuls + attention_flops(shape, batch, seq_len) + 2 * shape.hidden * shape.vocab * head_positions


def train_flops(shape: Shape, batch: int, seq_len: int, head_positions: float) -> float:
    return 3 * forward_flops(shape, batch, seq_len, head_positions)  # backward = 2 x forward


def decode_step_flops(shape: Shape, batch: int, context: int) -> float:
    """One sampled token per row with a KV cache of `context` tokens."""
    head = 2 * shape.hidden * shape.vocab * batch
    return 2 * shape.matmul_params() * batch + attention_flops(shape, batch, 1, context + 1) + head


BYTES = {  # traffic that does not scale with FLOPs, per parameter or per fp32 logit element
    # 8-bit AdamW: fp32 weight r+w 8, fp32 grad read 4, two 8-bit states r+w 4; + clip_grad_norm 12
    "optimizer_step_per_param": {"adamw8bit": 28, "adamw-fused": 40, "adamw": 40},
    # per micro-batch of a trainable fp32-master model under bf16 autocast: cast (4 + 2), bf16 weight reads
    # forward and backward (2 + 2), fp32 grad accumulation (8), bf16 weight-grad before its cast (2 + 2)
    "micro_weights_per_param": 22,
    "logit_train_sft": 40,  # head out bf16 2, .float() 2+4, cross-entropy ~12, backward ~20
    "logit_train_ppo": 80,  # the same, /temperature 8, entropy under no_grad ~28, more backward ~24
    "logit_forward": 28,  # no-grad log-probs: head out 2, .float() 6, /temperature 8, log_softmax 12
    "logit_sample": 36,  # head out 2, .float() 6, /temperature 8, softmax 12, multinomial 8
    "kv_cache_passes": 3,  # DynamicCache grows by torch.cat: every step reads the cache and copies it
}


def kv_cache_bytes(shape: Shape, batch: int, context: int) -> float:
    return 2 * shape.layers * shape.kv_dim * 2 * batch * context  # k and v, bf16


def decode_step_bytes(shape: Shape, batch: int, context: int) -> float:
    """The bf16 weights once (autocast caches the cast for the whole `generate`), the KV cache, the sampling."""
    weights = 2 * (shape.matmul_params() + shape.vocab * shape.hidden)  # decoder + (tied) LM head
    kv = BYTES["kv_cache_passes"] * kv_cache_bytes(shape, batch, context)
    return weights + kv + BYTES["logit_sample"] * batch * shape.vocab


def activation_bytes_per_token_layer(shape: Shape) -> float:
    """Saved for backward (bf16 autocast, SDPA without a score matrix; an estimate): fp32 residual and RMSNorm
    internals 2 x 10d, bf16 norm outputs for q/k/v and o 8d, q/k/v and their rotary versions 4d + 6kv, K/V
    repeated to all heads 4d, attention output 2d, the MLP's gate/up outputs, SiLU and product 8 x intermediate."""
    return 42 * shape.hidden + 6 * shape.kv_dim + 8 * shape.intermediate


def activation_gb(shape: Shape, tokens: float) -> float:
    return activation_bytes_per_token_layer(shape) * shape.layers * tokens / 1e9


def state_gb(shape: Shape, trainable: bool, heads=("lm",)) -> float:
    """Trainable: fp32 weights 4 + fp32 grads 4 + 8-bit AdamW 2 + the bf16 autocast copy 2; frozen: bf16 2."""
    return sum((4 + 4 + 2 + 2 if trainable else 2) * shape.params(h) / 1e9 for h in heads)


# ---- token lengths: the real TL;DR sample, or percentiles of it embedded for machines without it

# Qwen2.5 tokens per character, from the sample's published medians (its README): formatted
# query 1,415 chars <-> 338 tokens; reference summary " "+text 140 chars <-> 31 tokens (+ EOS).
QUERY_CHARS_PER_TOKEN, RESPONSE_CHARS_PER_TOKEN = 1415 / 338, 140 / 31
# Percentiles 0, 5, ..., 100 of the same conversion of the 1,000-post sample (ends set to the
# published ranges: query 44-526, reference 15-57, PPO 20-56 tokens); EOS included in responses.
EMBEDDED_PERCENTILES = {
    "query": [44, 181, 203, 223, 243, 258, 273, 287, 303, 321, 338, 353, 366, 385, 401, 414, 430, 446, 465, 485, 526],
    "reference_response": [15, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 39, 40, 43, 45, 57],
    "ppo_response": [20, 30, 32, 35, 36, 36, 38, 38, 39, 40, 41, 42, 42, 43, 44, 45, 45, 46, 47, 49, 56],
}


@dataclass
class LengthSample:
    """Token lengths of real rows to draw from (responses include EOS; queries not yet cut)."""

    query: list[int]
    reference_response: list[int]
    ppo_response: list[int]
    source: str

    def draw(self, name: str, rng: random.Random) -> int:
        values = getattr(self, name)
        if self.source.startswith("embedded"):  # inverse CDF between the percentiles
            u = rng.random() * (len(values) - 1)
            lo, hi = int(u), min(int(u) + 1, len(values) - 1)
            return round(values[lo] + (values[hi] - values[lo]) * (u - lo))
        return rng.choice(values)

    def scaled(self, factor: float) -> LengthSample:
        """Every length x factor (at least 1): short rows for gpu_bench's --tiny CPU check."""
        scaled = ([max(1, round(v * factor)) for v in getattr(self, name)] for name in EMBEDDED_PERCENTILES)
        return LengthSample(*scaled, f"{self.source}, x {factor}")

    def summary(self) -> dict:
        def stats(v):
            return {"median": statistics.median(v), "mean": round(statistics.fmean(v), 1), "min": min(v), "max": max(v)}

        return {"source": self.source} | {name: stats(getattr(self, name)) for name in EMBEDDED_PERCENTILES}


def load_lengths(sample_dir: Path | None = DEFAULT_SAMPLE) -> LengthSample:
    """From the real sample when it is there (chars / the ratios above), else the embedded table."""
    if not (sample_dir and all((sample_dir / f).exists() for f in FILES)):
        tables = (list(v) for v in EMBEDDED_PERCENTILES.values())
        return LengthSample(*tables, "embedded percentiles of the real sample (sample not found)")
    rows, pairs = ([json.loads(x) for x in (sample_dir / f).read_text().splitlines() if x.strip()] for f in FILES)
    query = [round(len(QUERY_FORMAT.format(**r)) / QUERY_CHARS_PER_TOKEN) for r in rows]
    reference = [round(len(" " + r["summary"]) / RESPONSE_CHARS_PER_TOKEN) + 1 for r in rows]
    policies = [s["text"] for p in pairs for s in p["summaries"] if s["policy"] != "ref"]
    ppo = [round(len(text) / RESPONSE_CHARS_PER_TOKEN) + 1 for text in policies]
    how = f"tokens = chars / {QUERY_CHARS_PER_TOKEN:.3f} (query), chars / {RESPONSE_CHARS_PER_TOKEN:.3f} + EOS (summaries)"
    return LengthSample(query, reference, ppo, f"real sample {sample_dir} ({len(rows)} posts), {how}")


# ---- one optimizer step / one PPO update, counted


def micro_work(kind: str, shape: Shape, rows: list[tuple]) -> dict:
    """One micro-batch: SFT (query, response) rows padded to the longest; or reward (query, chosen, rejected)
    as `models.get_pair_scores` runs them: the queries once (padded to the longest), then both summaries on
    the query's KV cache. `tokens` counts full rows (two per pair, the unit of the TRL comparison)."""
    weights, V = BYTES["micro_weights_per_param"] * shape.params("lm" if kind == "sft" else "score"), shape.vocab
    if kind == "sft":
        T, labels = max(q + r for q, r in rows), sum(r for _, r in rows)
        flops, bytes_ = train_flops(shape, len(rows), T, labels), weights + BYTES["logit_train_sft"] * labels * V
        tokens, padded = sum(q + r for q, r in rows), len(rows) * T
    else:
        B, Tq, Tr, labels = len(rows), max(q for q, _, _ in rows), max(max(c, r) for _, c, r in rows), 0
        attention = attention_flops(shape, B, Tq) + attention_flops(shape, 2 * B, Tr, Tq + Tr)
        flops, bytes_ = 3 * (2 * shape.matmul_params() * (B * Tq + 2 * B * Tr) + attention), weights
        tokens, padded = sum(2 * q + c + r for q, c, r in rows), B * Tq + 2 * B * Tr
    return {"flops": flops, "bytes": bytes_, "tokens": tokens, "padded_tokens": padded, "labels": labels}


def mean_step(kind: str, shape: Shape, lengths: LengthSample, batch: int, micro: int, n: int = 64) -> dict:
    """The mean of `n` optimizer steps of SFT or the reward model: rows drawn, sorted longest first and cut
    into micro-batches as `training.micro_batches` does; + the largest micro-batch seen."""
    rng, steps, keys = random.Random(0), [], ("flops", "bytes", "tokens", "padded_tokens")
    optimizer = BYTES["optimizer_step_per_param"]["adamw8bit"] * shape.params("lm" if kind == "sft" else "score")
    for _ in range(n):
        rows = []
        for _ in range(batch):
            if kind == "sft":
                q = min(lengths.draw("query", rng), BUDGET.query)
                rows.append((q, min(lengths.draw("reference_response", rng), BUDGET.response)))
            else:
                a, b = lengths.draw("reference_response", rng), lengths.draw("ppo_response", rng)
                rows.append((min(lengths.draw("query", rng), BUDGET.query), a, b))
        rows.sort(key=lambda row: -(row[0] + max(row[1:])))
        micros = [micro_work(kind, shape, rows[s : s + micro]) for s in range(0, batch, micro)]
        step = {k: sum(m[k] for m in micros) for k in keys}
        step["bytes"] += optimizer
        step["peak_tokens"] = max(m["padded_tokens"] for m in micros)
        step["peak_labels"] = max(m["labels"] for m in micros)
        steps.append(step)
    out = {k: statistics.fmean(s[k] for s in steps) for k in keys}
    return out | {k: max(s[k] for s in steps) for k in ("peak_tokens", "peak_labels")}


def chunks(total: int, size: int) -> list[int]:
    return [min(size, total - s) for s in range(0, total, size)]


def ppo_update_work(shape: Shape, batch: int, context: int, p: dict, optimizer: str = "adamw8bit") -> dict:
    """One PPO update of `batch` queries left padded to `context` tokens, as ppo.main runs it: generation in
    chunks, four no-grad forwards (policy, reference, value, reward), then `ppo_epochs` passes of policy +
    value forward/backward in micro-batches."""
    R, T, epochs = p["response_length"], context + p["response_length"], p["ppo_epochs"]
    fwd, micros = chunks(batch, p["forward_batch_size"]), chunks(batch, p["micro_batch_size"])
    gen_chunks, both = chunks(batch, p["generation_batch_size"]), shape.params("lm") + shape.params("score")
    decode = [(b, context + t) for b in gen_chunks for t in range(R - 1)]  # the first token comes from the prefill
    weights, V = BYTES["micro_weights_per_param"] * both, shape.vocab
    micro_bytes = [weights + BYTES["logit_train_ppo"] * b * R * V for b in micros]
    optimizer_bytes = epochs * p["num_minibatches"] * BYTES["optimizer_step_per_param"][optimizer] * both
    return {
        "prefill_flops": sum(forward_flops(shape, b, context, b) for b in gen_chunks),
        "decode_steps": len(decode),
        "decode_flops": sum(decode_step_flops(shape, b, c) for b, c in decode),
        "decode_bytes": sum(decode_step_bytes(shape, b, c) for b, c in decode),
        "forward_flops": sum(2 * forward_flops(shape, b, T, b * R) + 2 * forward_flops(shape, b, T, 0) for b in fwd),
        "forward_bytes": sum(2 * BYTES["logit_forward"] * b * R * V for b in fwd),
        "train_flops": epochs * sum(train_flops(shape, b, T, b * R) + train_flops(shape, b, T, 0) for b in micros),
        "train_bytes": epochs * sum(micro_bytes) + optimizer_bytes,
        "context_length": context,
        "sequence_length": T,
    }


def decode_seconds(shape: Shape, steps: list[tuple[int, int]], overhead: float) -> float:
    """Decoding steps of (batch, context) on the GB10: each the slowest of memory, compute and the host."""
    memory = (decode_step_bytes(shape, b, c) / SPARK["bandwidth"] for b, c in steps)
    compute = (decode_step_flops(shape, b, c) / SPARK["peak_bf16_flops"] for b, c in steps)
    return sum(max(m, f, overhead) for m, f in zip(memory, compute))


# ---- measured inputs: efficiencies and host overhead from a gpu_bench.py run, else assumed


def read_bench(path: Path) -> tuple[dict | None, str]:
    if not path.exists():
        return None, f"{path} not found"
    try:
        bench = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return None, f"{path} is not JSON ({e.msg})"
    device = bench.get("device", {})
    if not isinstance(device, dict):
        return None, f"{path} is not a gpu_bench.py output: not used"
    if bench.get("tiny") or device.get("type") != "cuda":
        return None, f"{path} holds a --tiny or CPU run ({device.get('name', '?')}): not used"
    return bench, f"{path}: {device.get('name')} ({bench.get('versions', {}).get('torch')})"


def efficiency(flops: float, bytes_: float, seconds: float, peak: float, bandwidth: float) -> float:
    """Share of `peak` the compute ran at, once the memory term is out of the measured time (at least a
    quarter of the time is kept as compute, so a memory-heavy phase cannot blow up)."""
    return min(flops / (peak * max(seconds - bytes_ / bandwidth, 0.25 * seconds)), 0.95)


def calibrate(bench: dict | None, bench_note: str, override: float | None = None) -> dict:
    """Efficiency per phase (+ source), host time per decoding step, measured peaks, and notes on where each
    came from. PPO: the prefill at the rollout forwards' efficiency, the rest of generation spread over the
    decoding steps (host overhead, when above the GPU's roofline)."""
    keys = ("sft", "reward", "ppo_forward", "ppo_train", "prefill")
    eff, source = dict.fromkeys(keys, ASSUMED_EFFICIENCY), dict.fromkeys(keys, "assumed")
    cal = {"eff": eff, "eff_source": source, "overhead": ASSUMED_STEP_OVERHEAD_S, "overhead_source": "assumed"}
    cal |= {"peak_gb": {}, "measured": {}, "notes": []}
    if not bench:
        note = f"no GPU measurement ({bench_note}): every compute phase at an ASSUMED {ASSUMED_EFFICIENCY:.0%} of the GB10 peak, host overhead per decoding step ASSUMED {ASSUMED_STEP_OVERHEAD_S * 1e3:.0f} ms"
        cal["notes"].append(note)
    else:
        d, m = bench["device"], bench.get("measurements", {})
        peak = d.get("measured_gemm_bf16_flops") or d.get("spec_peak_bf16_flops")
        bw = d.get("measured_copy_bandwidth_bytes_per_s") or d.get("spec_bandwidth_bytes_per_s")
        how = f"{'measured GEMM' if d.get('measured_gemm_bf16_flops') else 'datasheet'} {peak / 1e12:.0f} TFLOP/s, {'measured copy' if d.get('measured_copy_bandwidth_bytes_per_s') else 'datasheet'} {bw / 1e12:.2f} TB/s"
        note = f"measured on {d['name']}: {how}; each efficiency in the table = counted FLOPs / (GPU peak x (measured time - bytes / GPU bandwidth)), applied to the GB10 unchanged (conservative: the same kernels are less launch-bound on a slower chip)"
        cal["notes"].append(note)
        for key, name in (("sft", "sft"), ("reward", "reward_0.5b"), ("reward_1.5b", "reward_1.5b")):
            r = m.get(name) or {}
            if not r.get("seconds_timed"):
                continue
            eff[key] = efficiency(r["flops_counted"], r["bytes_counted"], r["seconds_timed"], peak, bw)
            source[key], cal["peak_gb"][key] = f"measured ({name})", r.get("peak_memory_allocated_gb")
            rate = {"tokens_per_s": r.get("tokens_nonpad_per_s"), "mfu_6N_spec": r.get("mfu_6N_spec")}
            if key != "reward_1.5b":
                cal["measured"][name] = rate
        run = next((m[k] for k in ("ppo_512", "ppo_64") if (m.get(k) or {}).get("timed_updates")), None)
        if run:
            t, w, name = run["timed_means"], run["work_per_update"], f"ppo_{run['batch_size']}"
            forward = efficiency(w["forward_flops"], w["forward_bytes"], t["rollout_forward_s"], peak, bw)
            eff["ppo_forward"] = eff["prefill"] = forward
            eff["ppo_train"] = efficiency(w["train_flops"], w["train_bytes"], t["train_s"], peak, bw)
            steps = max(w["decode_steps"], 1)
            per_step = max(t["generation_s"] - w["prefill_flops"] / (peak * eff["ppo_forward"]), 0.0) / steps
            roofline = max(w["decode_bytes"] / steps / bw, w["decode_flops"] / steps / peak)
            cal["overhead"] = per_step if per_step > roofline else 0.0
            ms = f"{per_step * 1e3:.1f} ms per decoding step, GPU roofline {roofline * 1e3:.2f} ms"
            cal["overhead_source"] = f"measured ({name}: {ms})"
            source |= dict.fromkeys(("ppo_forward", "ppo_train", "prefill"), f"measured ({name})")
            cal["peak_gb"]["ppo"] = run.get("peak_memory_allocated_gb")
            cal["measured"][name] = {"episodes_per_s": run.get("episodes_per_s"), "timed_means": t}
    if override is not None:
        cal["eff"], cal["eff_source"] = dict.fromkeys(eff, override), dict.fromkeys(eff, "--efficiency")
    cal["eff"].setdefault("reward_1.5b", cal["eff"]["reward"])
    cal["eff_source"].setdefault("reward_1.5b", f"as reward 0.5B ({cal['eff_source']['reward']})")
    cal["notes"] += [
        "host (Python + kernel launch) time per decoding step on the Spark's CPU = 1.0 x the bench host's, or the "
        f"assumed one: {cal['overhead'] * 1e3:.1f} ms",
        "peak memory on the Spark = the same allocations as on the bench GPU (same code, same micro-batches); the "
        "'measured' column is the H100/H200 peak when present",
    ]
    return cal


# ---- the projection


def stage_configs(preset: str | None) -> tuple:
    """sft.Config, reward.Config, ppo.Config: the defaults, or a preset's."""
    sys.path.insert(0, str(REPO))  # sft.py, reward.py, ppo.py live at the repository root
    import ppo
    import reward
    import sft

    return tuple(m.Config(**m.PRESETS[preset]) if preset else m.Config() for m in (sft, reward, ppo))


def row(stage: str, model: str, work: str, flops: float, secs: float, memory: dict, measured, used: str) -> dict:
    memory = {"CUDA context + workspace": 1.0, **memory}
    total = sum(memory.values())
    out = {"stage": stage, "model": model, "work": work, "pflop": flops / 1e15, "hours": secs / 3600}
    out |= {"memory_gb_estimate": total, "memory_gb_parts": memory, "memory_gb_measured": measured}
    return out | {"fits": total < SPARK["memory_visible_gb"], "efficiency": used}


def project_training(kind: str, shape: Shape, key: str, c, rows: int, lengths: LengthSample, cal: dict) -> tuple:
    """SFT or the reward model (Config `c`), one epoch of `rows`: (table row, details)."""
    steps, step = rows // c.batch_size, mean_step(kind, shape, lengths, c.batch_size, c.micro_batch_size)
    step_s = seconds(step["flops"], step["bytes"], cal["eff"][key])
    head = "lm" if kind == "sft" else "score"
    mem = {"trainable model (weights, grads, 8-bit AdamW, bf16 copy)": state_gb(shape, True, (head,))}
    mem[f"activations ({step['peak_tokens']} tokens, longest micro-batch)"] = activation_gb(shape, step["peak_tokens"])
    if kind == "sft":
        logits = f"fp32 logits of {step['peak_labels']} labelled positions (x3: logits, softmax, grad)"
        mem[logits] = 3 * 4 * step["peak_labels"] * shape.vocab / 1e9
        work = f"{steps} steps x {c.batch_size} rows, {step['tokens'] / c.batch_size:.0f} tokens/row ({step['padded_tokens'] / step['tokens'] - 1:.1%} padding)"
    else:
        work = f"{steps} steps x {c.batch_size} pairs, {step['tokens'] / (2 * c.batch_size):.0f} tokens/sequence"
    used = f"{cal['eff'][key]:.0%} ({cal['eff_source'][key]})"
    details = {"steps": steps, "seconds_per_step": step_s, "tokens_per_s": step["tokens"] / step_s, **step}
    stage, peak = "SFT, 1 epoch" if kind == "sft" else "RM, 1 epoch", cal["peak_gb"].get(key)
    return row(stage, shape.name, work, steps * step["flops"], steps * step_s, mem, peak, used), details


def project_ppo(c, lengths: LengthSample, cal: dict) -> tuple[list[dict], dict]:
    """One PPO update (Config `c`) at Qwen2.5-0.5B, then 100k and 1M episodes of them. The queries of an update
    are left padded to its longest (the mean over 64 drawn batches)."""
    shape, eff, rng, B, R = QWEN_0_5B, cal["eff"], random.Random(0), c.batch_size, c.response_length
    context = statistics.fmean(max(min(lengths.draw("query", rng), BUDGET.query) for _ in range(B)) for _ in range(64))
    w = ppo_update_work(shape, B, round(context), {k: getattr(c, k) for k in PPO_FIELDS})
    decode = [(b, round(context) + t) for b in chunks(B, c.generation_batch_size) for t in range(R - 1)]
    train_s = seconds(w["train_flops"], w["train_bytes"], eff["ppo_train"])
    phases = {
        "generation: prefill": seconds(w["prefill_flops"], 0, eff["prefill"]),
        "generation: decoding": decode_seconds(shape, decode, cal["overhead"]),
        "rollout forwards (4 models, no grad)": seconds(w["forward_flops"], w["forward_bytes"], eff["ppo_forward"]),
        f"training ({c.ppo_epochs} epochs, policy + value)": train_s,
    }
    update_s, T, heads = sum(phases.values()), w["sequence_length"], ("lm", "score")
    # training micro-batch: policy and value graphs alive together; fp32 (micro, R, vocab) logits
    # x5 (logits, /T, log_softmax, entropy's softmax, grad). Rollout: the KV cache of a generation
    # chunk x2 (torch.cat copies), fp32 logits of a forward chunk x3. The larger of the two counts.
    train_mem = 2 * activation_gb(shape, c.micro_batch_size * T) + 5 * 4 * c.micro_batch_size * R * shape.vocab / 1e9
    kv_gb = 2 * kv_cache_bytes(shape, c.generation_batch_size, T) / 1e9
    rollout_mem = kv_gb + 3 * 4 * c.forward_batch_size * R * shape.vocab / 1e9
    mem = {
        "policy + value trainable (weights, grads, 8-bit AdamW, bf16 copy)": state_gb(shape, True, heads),
        "reference + reward model, bf16 frozen": state_gb(shape, False, heads),
    }
    states = sum(mem.values())
    peak = f"training micro-batch ({c.micro_batch_size} x {T} tokens, 2 models) + logits"
    mem[peak if train_mem >= rollout_mem else "rollout KV cache + logits"] = max(train_mem, rollout_mem)
    flops = w["prefill_flops"] + w["decode_flops"] + w["forward_flops"] + w["train_flops"]
    work = f"x {B} (4 models; FLOPs counted with queries padded to {context:.0f}, the rollout's longest)"
    used = f"fwd {eff['ppo_forward']:.0%} / train {eff['ppo_train']:.0%} ({cal['eff_source']['ppo_train']})"
    rows, peak, shape = [], cal["peak_gb"].get("ppo"), shape.name
    for n, u in ((n, n // B) for n in (100_000, 1_000_000)):
        rows.append(row(f"PPO, {n:,} episodes", shape, f"{u} updates {work}", u * flops, u * update_s, mem, peak, used))
    memory = {"model_states": states, "training_activations_logits": train_mem, "rollout_kv_logits": rollout_mem}
    details = {"seconds": update_s, "episodes_per_s": B / update_s, "phases_s": phases, "work": w}
    return rows, details | {"context_length": context, "memory_gb": memory}


# what an update's work depends on
PPO_FIELDS = ("batch_size", "micro_batch_size", "forward_batch_size", "generation_batch_size", "ppo_epochs")
PPO_FIELDS += ("response_length", "num_minibatches")


def project(cal: dict, bench_note: str, lengths: LengthSample) -> dict:
    """The full recipe: SFT and the reward model one epoch of the full TL;DR data, PPO 100k / 1M episodes."""
    s, r, p = stage_configs(None)
    sft_row, sft = project_training("sft", QWEN_0_5B, "sft", s, 116_722, lengths, cal)
    rm_row, rm = project_training("reward", QWEN_0_5B, "reward", r, 92_858, lengths, cal)
    rm15_row, rm15 = project_training("reward", QWEN_1_5B, "reward_1.5b", r, 92_858, lengths, cal)
    ppo_rows, ppo_update = project_ppo(p, lengths, cal)
    sizes = ("batch_size", "micro_batch_size", "epochs")
    recipe = {"sft": {"rows": 116_722} | {k: getattr(s, k) for k in sizes}}
    recipe["reward"] = {"pairs": 92_858} | {k: getattr(r, k) for k in sizes}
    recipe["ppo"] = {k: getattr(p, k) for k in PPO_FIELDS}
    bytes_ = "; ".join(f"{k} {v}" for k, v in BYTES.items() if not isinstance(v, dict))
    activations = [activation_bytes_per_token_layer(shape) / 1e3 for shape in (QWEN_0_5B, QWEN_1_5B)]
    assumptions = [
        f"GB10: {SPARK['peak_bf16_flops'] / 1e12:.0f} TFLOP/s BF16 (measured GEMM), {SPARK['bandwidth'] / 1e9:.0f} "
        f"GB/s (220-230 measured; spec {SPARK['bandwidth_spec'] / 1e9:.0f}), {SPARK['memory_visible_gb']} GB visible to CUDA",
        f"token lengths: {lengths.source}; queries cut to {BUDGET.query}, SFT responses to {BUDGET.response}",
        "recipe sizes: sft.Config / reward.Config / ppo.Config defaults; SFT 116,722 rows, RM 92,858 pairs (full "
        "dataset sizes)",
        "reward pairs: one summary drawn from the sample's reference lengths, one from its 1.3B-PPO lengths (stand-in "
        "for the training pairs' policies)",
        "time per phase = FLOPs / (peak x efficiency) + non-FLOP bytes / bandwidth; decoding step = max(bytes / "
        "bandwidth, FLOPs / peak, host overhead)",
        "FLOPs: 2 x matmul weights x tokens (padded as our batches pad), causal attention, LM head only where our code "
        "runs it; backward = 2 x forward",
        f"bytes: {bytes_}; optimizer step {BYTES['optimizer_step_per_param']['adamw8bit']} B/param (8-bit AdamW + "
        "clip)",
        "memory: trainable = fp32 weights 4 + fp32 grads 4 + 8-bit AdamW 2 + bf16 autocast copy 2 B/param; frozen "
        f"bf16 2 B/param; activations {activations[0]:.1f} kB/token/layer at 0.5B, {activations[1]:.1f} at 1.5B (estimate: see activation_bytes_per_token_layer); + 1 GB CUDA context/workspace",
        *cal["notes"],
    ]
    result = {"spark": SPARK, "bench": bench_note, "measured": cal["measured"], "efficiency": cal["eff"]}
    result |= {"efficiency_source": cal["eff_source"], "host_overhead_per_decode_step_s": cal["overhead"]}
    result |= {"host_overhead_source": cal["overhead_source"], "lengths": lengths.summary(), "recipe": recipe}
    result["rows"] = [sft_row, rm_row, rm15_row, *ppo_rows]
    result["details"] = {"sft": sft, "reward": rm, "reward_1.5b": rm15, "ppo_update": ppo_update}
    result["total_hours_sft_rm1.5b_ppo1m"] = sft_row["hours"] + rm15_row["hours"] + ppo_rows[1]["hours"]
    return result | {"assumptions": assumptions}


def markdown(result: dict) -> str:
    out = ["## Projected full recipe on one DGX Spark\n", f"GPU measurements: {result['bench']}\n"]
    out += [
        "| stage | model | work | PFLOP | projected time | est. peak memory | measured peak (bench GPU) | compute "
        "efficiency |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        when = f"{r['hours']:.1f} h" if r["hours"] >= 1 else f"{r['hours'] * 60:.0f} min"
        measured = f"{r['memory_gb_measured']:.1f} GB" if r["memory_gb_measured"] else "-"
        memory = f"{r['memory_gb_estimate']:.1f} GB" + ("" if r["fits"] else " (over 119.7 GB!)")
        cells = [r["stage"], r["model"], r["work"], f"{r['pflop']:,.1f}", when, memory, measured, r["efficiency"]]
        out.append(f"| {' | '.join(cells)} |")
    out += ["\nMemory estimate, by part (GB):\n", "| stage | model | part | GB |", "|---|---|---|---|"]
    firsts = {(r["stage"].split(",")[0], r["model"]): r["memory_gb_parts"] for r in reversed(result["rows"])}
    for (stage, model), memory in reversed(firsts.items()):  # the first row of each stage
        out.extend(f"| {stage} | {model} | {part} | {gb:.1f} |" for part, gb in memory.items())
    total, u = result["total_hours_sft_rm1.5b_ppo1m"], result["details"]["ppo_update"]
    out.append(f"\nSFT + RM (1.5B) + PPO (1M episodes): {total:.1f} h ({total / 24:.1f} days).\n")
    B, rate = result["recipe"]["ppo"]["batch_size"], u["episodes_per_s"]
    out.append(f"One PPO update of {B} episodes: {u['seconds']:.1f} s ({rate:.2f} episodes/s)\n")
    out += ["| phase | seconds | share |", "|---|---|---|"]
    out.extend(f"| {name} | {s:.1f} | {s / u['seconds']:.0%} |" for name, s in u["phases_s"].items())
    rates = [f"{k} {d['tokens_per_s']:,.0f} tokens/s" for k, d in result["details"].items() if k != "ppo_update"]
    out += [f"\nThroughputs: {', '.join(rates)}\n", "Assumptions:\n", *(f"- {a}" for a in result["assumptions"])]
    return "\n".join(out + [f"- host overhead per decoding step: {result['host_overhead_source']}"])


# ---- `--preset quick`: each stage's PRESETS["quick"] and the evaluations a quick run does. Not counted:
# loading and processing the Hub data (about a minute per stage here for 117k posts), models, checkpoints.


def forward_seconds(cal: dict, rows: int, seq_len: float, head_positions: float = 1.0) -> float:
    """No-grad forwards of `rows` sequences (validation loss, reward scores) at PPO's forward efficiency."""
    return seconds(forward_flops(QWEN_0_5B, rows, round(seq_len), head_positions * rows), 0, cal["eff"]["ppo_forward"])


def sample_seconds(cal: dict, rows: int, context: float, new_tokens: int, batch: int) -> float:
    """Sampling `new_tokens` for `rows` queries in batches of `batch`: prefill + decoding steps."""
    prefill = seconds(forward_flops(QWEN_0_5B, rows, round(context), rows), 0, cal["eff"]["prefill"])
    steps = [(b, round(context) + t) for b in chunks(rows, batch) for t in range(new_tokens)]
    return prefill + decode_seconds(QWEN_0_5B, steps, cal["overhead"])


def project_quick(cal: dict, lengths: LengthSample, posts: int = 256) -> list[tuple[str, str, float]]:
    """(part, work, seconds). Evaluations at step 0, every eval_interval and the end, as the stages run them."""
    s, r, p = stage_configs("quick")
    _, d = project_training("sft", QWEN_0_5B, "sft", s, s.max_steps * s.batch_size, lengths, cal)
    row_len, evals = d["tokens"] / s.batch_size, (s.max_steps - 1) // s.eval_interval + 2
    loss = evals * forward_seconds(cal, s.num_eval_rows, row_len, 35)
    samples = 2 * sample_seconds(cal, s.num_eval_samples, row_len - 35, s.response_length, s.micro_batch_size)
    work = f"{s.max_steps} steps x {s.batch_size} rows ({s.max_steps * s.batch_size:,} of 116,722 posts)"
    rows = [("SFT training", work, d["steps"] * d["seconds_per_step"])]
    work = f"{evals} x validation loss on {s.num_eval_rows} posts; samples of {s.num_eval_samples} posts at step 0 and the end"
    rows.append(("SFT evaluation", work, loss + samples))
    _, d = project_training("reward", QWEN_0_5B, "reward", r, r.max_steps * r.batch_size, lengths, cal)
    evals = (r.max_steps - 1) // r.eval_interval + 2
    # two sequences per pair; the references for the normalisation scored twice
    scored = 2 * (evals * r.num_eval_rows + 2 * r.max_final_eval_rows) + 2 * r.num_norm_rows
    work = f"{r.max_steps} steps x {r.batch_size} pairs ({r.max_steps * r.batch_size:,} of 92,858)"
    rows.append(("RM training", work, d["steps"] * d["seconds_per_step"]))
    work = f"{evals} x {r.num_eval_rows} pairs, final {r.max_final_eval_rows} pairs per validation split, {r.num_norm_rows} references twice"
    rows.append(("RM evaluation", work, forward_seconds(cal, scored, d["tokens"] / (2 * r.batch_size))))
    _, d = project_ppo(p, lengths, cal)
    u = p.total_episodes // p.batch_size
    work = f"{u} updates x {p.batch_size} episodes ({p.total_episodes:,}), {p.ppo_epochs} epochs"
    rows.append(("PPO", work, u * d["seconds"]))
    # evaluate.py: SFT and PPO sample the posts (query median 338 tokens, 53 new), the RM scores them and the references
    evaluate = 2 * sample_seconds(cal, posts, 338, 53, 16) + forward_seconds(cal, 3 * posts, 375)
    return rows + [("evaluate (SFT, PPO)", f"{posts} posts per policy, RM scores", evaluate)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["full", "quick"], default="full", help="the recipe or its quick preset")
    ap.add_argument("--bench-json", default=str(REPO / "bench" / "gpu_bench.json"), help="gpu_bench.py's ('' = none)")
    ap.add_argument("--efficiency", type=float, default=None, help="override every compute efficiency")
    ap.add_argument("--json", action="store_true", help="print JSON instead of markdown (full recipe)")
    args = ap.parse_args(argv)
    bench, note = read_bench(Path(args.bench_json)) if args.bench_json else (None, "none given")
    cal, lengths = calibrate(bench, note, args.efficiency), load_lengths()
    if args.preset == "full":
        result = project(cal, note, lengths)
        return print(json.dumps(result, indent=2, default=str) if args.json else markdown(result))
    rows = project_quick(cal, lengths)
    print(f"## `--preset quick` projected on one DGX Spark\n\nCalibration: {note}\n")
    print("| part | work | projected |\n|---|---|---|")
    print("\n".join(f"| {name} | {work} | {secs / 60:.1f} min |" for name, work, secs in rows))
    print(f"| **total** | | **{sum(s for _, _, s in rows) / 60:.0f} min** |")


if __name__ == "__main__":
    main()
