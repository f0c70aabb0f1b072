#!/usr/bin/env python3
"""Project wall time and peak memory of the full recipe on one DGX Spark (issue 8, item 4).

    python bench/spark_projection.py                          # markdown tables + assumptions
    python bench/spark_projection.py --bench-json PATH        # measured GPU numbers (default bench/gpu_bench.json)
    python bench/spark_projection.py --json                   # the same as JSON
    python bench/spark_projection.py --efficiency 0.5         # override every compute efficiency

A model, not a measurement. Every phase of every stage is
    time = FLOPs / (GB10 peak x efficiency) + bytes / GB10 bandwidth,
with FLOPs counted from the model shapes (matmuls, causal attention, the LM head only where our
code runs it) and bytes from the traffic that does not scale with FLOPs (optimizer steps,
weight casts, fp32 logits). Decoding steps are max(bytes / bandwidth, FLOPs / peak, host
overhead per step). The efficiencies and the host overhead come from `bench/gpu_bench.py` run on
an H100/H200 when its JSON is there (each phase's measured time minus its memory term on that
GPU); otherwise from stated assumptions. Memory is an analytic estimate (weights, gradients,
optimizer state, activations, logits), printed beside the peak measured on the GPU for the same
micro-batches. Nothing is typed in by hand: the inputs are the constants below (hardware
facts), the stage Configs' defaults, the package's query format and token budgets, and the
measurements. `gpu_bench.py` and `bench_ppo.py` take their model shapes, length distributions
and FLOP counts from here, so a measurement and its projection count the same way.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from dgx_spark_summary_from_human_feedback.data import QUERY_FORMAT, Lengths

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SAMPLE = REPO.parent / "shared" / "data" / "tldr_real_sample"
DEFAULT_BENCH_JSON = Path(__file__).resolve().parent / "gpu_bench.json"
BUDGET = Lengths()  # the stages' token budgets: queries cut to 512, SFT responses to 63 (EOS included)

# ---------------------------------------------------------------------------------------------
# hardware facts (RECIPE.md "DGX Spark (GB10)")

SPARK = {
    "name": "DGX Spark (GB10)",
    "peak_bf16_flops": 92e12,  # measured BF16 GEMM, not a datasheet number
    "bandwidth_spec": 273e9,
    "bandwidth": 225e9,  # 220-230 GB/s measured: the midpoint is what the projection uses
    "memory_visible_gb": 119.7,
}
# datasheet dense BF16 peak and HBM bandwidth, matched on torch.cuda.get_device_name()
GPU_SPECS = [  # (substring, peak BF16 dense FLOP/s, bandwidth B/s), first match wins
    ("H100 PCIE", 756e12, 2.0e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100", 989e12, 3.35e12),
    ("H200", 989e12, 4.8e12),
    ("A100", 312e12, 2.0e12),
]


def gpu_spec(name: str) -> tuple[float | None, float | None]:
    return next(((peak, bandwidth) for key, peak, bandwidth in GPU_SPECS if key in name.upper()), (None, None))


def seconds(flops: float, bytes_: float, efficiency: float) -> float:
    """A phase on the GB10: its FLOPs at `efficiency` of the peak, plus its non-FLOP bytes."""
    return flops / (SPARK["peak_bf16_flops"] * efficiency) + bytes_ / SPARK["bandwidth"]


# ---------------------------------------------------------------------------------------------
# model shapes, FLOPs (multiply-add = 2 FLOPs), bytes and memory


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

    def layer_matmul_params(self) -> int:
        d, kv, i = self.hidden, self.kv_dim, self.intermediate
        return 2 * d * d + 2 * d * kv + 3 * d * i  # q, o; k, v; gate, up, down

    def matmul_params(self) -> int:
        """Weights of the decoder's matrix products (no embedding, head, norms or biases)."""
        return self.layers * self.layer_matmul_params()

    def params(self, head: str = "lm") -> int:
        """Parameters of the causal LM (`head="lm"`, a tied head counted once) or of the
        reward/value model (`head="score"`: one 1 x hidden score row instead of the LM head)."""
        d, kv = self.hidden, self.kv_dim
        layer = self.layer_matmul_params() + (d + 2 * kv) + 2 * d  # + q/k/v biases + two RMSNorms
        total = self.vocab * d + self.layers * layer + d  # + final norm
        return total + (self.vocab * d if head == "lm" and not self.tied else 0) + (d if head == "score" else 0)


QWEN_0_5B = Shape("Qwen2.5-0.5B", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864)
QWEN_1_5B = Shape("Qwen2.5-1.5B", hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960)
TINY = Shape("tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1024)
TINY_WIDE = Shape("tiny-wide", hidden=96, layers=3, heads=4, kv_heads=2, intermediate=192, vocab=1024)


def attention_flops(shape: Shape, batch: int, q_len: int, kv_len: int | None = None) -> float:
    """QK^T and AV of causal attention: q_len queries, each attending to its prefix of kv_len
    (the useful half; a masked SDPA call may compute more)."""
    kv_len = q_len if kv_len is None else kv_len
    keys = q_len * (kv_len - q_len) + q_len * (q_len + 1) / 2
    return shape.layers * 4 * shape.hidden * batch * keys


def forward_flops(shape: Shape, batch: int, seq_len: int, head_positions: float) -> float:
    """One forward over (batch, seq_len), the LM head (vocab x hidden) run at `head_positions`."""
    return 2 * shape.matmul_params() * batch * seq_len + attention_flops(shape, batch, seq_len) + 2 * shape.hidden * shape.vocab * head_positions


def train_flops(shape: Shape, batch: int, seq_len: int, head_positions: float) -> float:
    return 3 * forward_flops(shape, batch, seq_len, head_positions)  # backward = 2 x forward


def decode_step_flops(shape: Shape, batch: int, context: int) -> float:
    """One sampled token per row with a KV cache of `context` tokens."""
    return 2 * shape.matmul_params() * batch + attention_flops(shape, batch, 1, context + 1) + 2 * shape.hidden * shape.vocab * batch


BYTES = {  # traffic that does not scale with FLOPs, per parameter or per fp32 logit element
    # 8-bit AdamW step: fp32 weight read+write 8, fp32 grad read 4, two 8-bit states read+write 4;
    # + clip_grad_norm (grad read for the norm, read+write to scale) 12
    "optimizer_step_per_param": {"adamw8bit": 28, "adamw-fused": 40, "adamw": 40},
    # per micro-batch forward+backward of a trainable fp32-master model under bf16 autocast:
    # fp32 -> bf16 cast (read 4, write 2), bf16 weight reads in forward and backward (2 + 2),
    # fp32 grad accumulation (read+write 8), bf16 weight-grad before the cast (write 2, read 2)
    "micro_weights_per_param": 22,
    # SFT loss: LM head out bf16 (2) + .float() (2+4) + cross-entropy (~12) + backward (~20)
    "logit_train_sft": 40,
    # PPO micro-batch: the same, /temperature (8), entropy under no_grad (~28), more backward (~24)
    "logit_train_ppo": 80,
    # no-grad response log-probs: head out (2), .float() (6), /temperature (8), log_softmax (12)
    "logit_forward": 28,
    # sampling one token: head out (2), .float() (6), /temperature (8), softmax (12), multinomial (8)
    "logit_sample": 36,
    # DynamicCache grows by torch.cat: every step reads the cache and copies it: 3x its size
    "kv_cache_passes": 3,
}


def kv_cache_bytes(shape: Shape, batch: int, context: int) -> float:
    return 2 * shape.layers * shape.kv_dim * 2 * batch * context  # k and v, bf16


def decode_step_bytes(shape: Shape, batch: int, context: int) -> float:
    """One decoding step: the bf16 weights once (autocast caches the cast for the whole
    `generate` call), the KV cache, the sampling over the vocabulary."""
    weights = 2 * (shape.matmul_params() + shape.vocab * shape.hidden)  # decoder + (tied) LM head
    return weights + BYTES["kv_cache_passes"] * kv_cache_bytes(shape, batch, context) + BYTES["logit_sample"] * batch * shape.vocab


def activation_bytes_per_token_layer(shape: Shape) -> float:
    """Saved for backward per token and layer (bf16 autocast, SDPA without a score matrix; an
    estimate): fp32 residual stream and RMSNorm internals (2 x 10d), bf16 casts of the norm output
    for q/k/v and o (8d), q/k/v and their rotary versions (4d + 6kv), K/V repeated to all heads
    (4d), attention output (2d), the MLP's gate/up outputs, SiLU and product (8 x intermediate)."""
    return 42 * shape.hidden + 6 * shape.kv_dim + 8 * shape.intermediate


def activation_gb(shape: Shape, tokens: float) -> float:
    return activation_bytes_per_token_layer(shape) * shape.layers * tokens / 1e9


def model_state_gb(params: int, trainable: bool, optimizer: str = "adamw8bit") -> float:
    """fp32 master weights 4 + fp32 grads 4 + optimizer state (8-bit AdamW: 2; fp32 AdamW: 8)
    + the bf16 autocast copy held through a forward/backward 2; frozen: bf16 2."""
    return (4 + 4 + (2 if optimizer == "adamw8bit" else 8) + 2) * params / 1e9 if trainable else 2 * params / 1e9


# ---------------------------------------------------------------------------------------------
# token lengths: the real TL;DR sample, or percentiles of it embedded for machines without it

# Qwen2.5 tokens per character, from the sample's published medians (its README): formatted
# query 1,415 chars <-> 338 tokens; reference summary " "+text 140 chars <-> 31 tokens (+ EOS).
QUERY_CHARS_PER_TOKEN = 1415 / 338
RESPONSE_CHARS_PER_TOKEN = 140 / 31
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
            lo = int(u)
            hi = min(lo + 1, len(values) - 1)
            return round(values[lo] + (values[hi] - values[lo]) * (u - lo))
        return rng.choice(values)

    def scaled(self, factor: float) -> LengthSample:
        """Every length x factor (at least 1): short rows for the --tiny CPU check."""
        query, reference, ppo = ([max(1, round(v * factor)) for v in getattr(self, name)] for name in EMBEDDED_PERCENTILES)
        return LengthSample(query, reference, ppo, f"{self.source}, x {factor}")

    def summary(self) -> dict:
        stats = {name: getattr(self, name) for name in EMBEDDED_PERCENTILES}
        return {"source": self.source} | {
            name: {"median": statistics.median(v), "mean": round(statistics.fmean(v), 1), "min": min(v), "max": max(v)} for name, v in stats.items()
        }


def load_lengths(sample_dir: Path | None = DEFAULT_SAMPLE) -> LengthSample:
    """From the real sample when it is there (chars / the ratios above), else the embedded table."""
    sft, comparisons = (sample_dir / "sft.jsonl", sample_dir / "comparisons.jsonl") if sample_dir else (None, None)
    if not (sft and sft.exists() and comparisons.exists()):
        return LengthSample(*(list(v) for v in EMBEDDED_PERCENTILES.values()), "embedded percentiles of the real sample (sample not found)")
    rows = [json.loads(line) for line in sft.read_text().splitlines() if line.strip()]
    pairs = [json.loads(line) for line in comparisons.read_text().splitlines() if line.strip()]
    query = [round(len(QUERY_FORMAT.format(**r)) / QUERY_CHARS_PER_TOKEN) for r in rows]
    reference = [round(len(" " + r["summary"]) / RESPONSE_CHARS_PER_TOKEN) + 1 for r in rows]
    ppo = [round(len(s["text"]) / RESPONSE_CHARS_PER_TOKEN) + 1 for p in pairs for s in p["summaries"] if s["policy"] != "ref"]
    how = f"tokens = chars / {QUERY_CHARS_PER_TOKEN:.3f} (query), chars / {RESPONSE_CHARS_PER_TOKEN:.3f} + EOS (summaries)"
    return LengthSample(query, reference, ppo, f"real sample {sample_dir} ({len(rows)} posts), {how}")


def recipe_defaults() -> tuple[dict, str]:
    """The stages' batch sizes (their Config defaults) and the full TL;DR dataset sizes."""
    sys.path.insert(0, str(REPO))  # sft.py, reward.py, ppo.py live at the repository root
    import ppo
    import reward
    import sft

    s, r, p = sft.Config(), reward.Config(), ppo.Config()
    ppo_fields = ("batch_size", "micro_batch_size", "forward_batch_size", "generation_batch_size", "ppo_epochs", "response_length", "num_minibatches")
    recipe = {
        "sft": {"rows": 116_722, "batch_size": s.batch_size, "micro_batch_size": s.micro_batch_size, "epochs": s.epochs},
        "reward": {"pairs": 92_858, "batch_size": r.batch_size, "micro_batch_size": r.micro_batch_size, "epochs": r.epochs},
        "ppo": {name: getattr(p, name) for name in ppo_fields},
    }
    return recipe, "sft.Config / reward.Config / ppo.Config defaults"


# ---------------------------------------------------------------------------------------------
# one optimizer step / one PPO update, counted


def sft_micro_work(shape: Shape, rows: list[tuple[int, int]]) -> dict:
    """One SFT micro-batch of (query, response) rows padded to its longest: FLOPs and bytes."""
    T, labels = max(q + r for q, r in rows), sum(r for _, r in rows)
    return {
        "flops": train_flops(shape, len(rows), T, labels),
        "bytes": BYTES["micro_weights_per_param"] * shape.params("lm") + BYTES["logit_train_sft"] * labels * shape.vocab,
        "tokens": sum(q + r for q, r in rows), "padded_tokens": len(rows) * T, "peak_tokens": len(rows) * T, "labels": labels,
    }  # fmt: skip


def reward_micro_work(shape: Shape, pairs: list[tuple[int, int, int]]) -> dict:
    """One reward micro-batch of (query, chosen, rejected) lengths as `models.get_pair_scores`
    runs it: the queries once (left padded to the longest), then both summaries of each on its KV
    cache (right padded to the longest). `tokens` counts the two full rows (the unit of the TRL
    comparison); `padded_tokens` the positions actually run."""
    B, Tq, Tr = len(pairs), max(q for q, _, _ in pairs), max(max(c, r) for _, c, r in pairs)
    flops = 3 * (2 * shape.matmul_params() * (B * Tq + 2 * B * Tr) + attention_flops(shape, B, Tq) + attention_flops(shape, 2 * B, Tr, Tq + Tr))
    return {
        "flops": flops,
        "bytes": BYTES["micro_weights_per_param"] * shape.params("score"),
        "tokens": sum(2 * q + c + r for q, c, r in pairs), "padded_tokens": B * Tq + 2 * B * Tr, "peak_tokens": B * Tq + 2 * B * Tr,
    }  # fmt: skip


def step_work(kind: str, shape: Shape, lengths: LengthSample, batch: int, micro: int, rng: random.Random, optimizer: str = "adamw8bit") -> dict:
    """One optimizer step of SFT or the reward model: rows drawn, sorted by length inside the
    batch and cut into micro-batches as `training.micro_batches` does."""
    if kind == "sft":
        rows = [(min(lengths.draw("query", rng), BUDGET.query), min(lengths.draw("reference_response", rng), BUDGET.response)) for _ in range(batch)]
        rows.sort(key=lambda row: -(row[0] + row[1]))
        micros, params = [sft_micro_work(shape, rows[s : s + micro]) for s in range(0, batch, micro)], shape.params("lm")
    else:
        pairs = []
        for _ in range(batch):
            a, b = lengths.draw("reference_response", rng), lengths.draw("ppo_response", rng)
            pairs.append((min(lengths.draw("query", rng), BUDGET.query), a, b))
        pairs.sort(key=lambda p: -(p[0] + max(p[1], p[2])))
        micros, params = [reward_micro_work(shape, pairs[s : s + micro]) for s in range(0, batch, micro)], shape.params("score")
    total = {k: sum(m[k] for m in micros) for k in ("flops", "bytes", "tokens", "padded_tokens")}
    total["bytes"] += BYTES["optimizer_step_per_param"][optimizer] * params
    return total | {"peak_tokens": max(m["peak_tokens"] for m in micros), "peak_labels": max(m.get("labels", 0) for m in micros)}


def mean_step(kind: str, shape: Shape, lengths: LengthSample, batch: int, micro: int, n: int = 64, seed: int = 0) -> dict:
    rng = random.Random(seed)
    steps = [step_work(kind, shape, lengths, batch, micro, rng) for _ in range(n)]
    out = {k: statistics.fmean(s[k] for s in steps) for k in ("flops", "bytes", "tokens", "padded_tokens")}
    return out | {k: max(s[k] for s in steps) for k in ("peak_tokens", "peak_labels")}


def chunks(total: int, size: int) -> list[int]:
    return [min(size, total - s) for s in range(0, total, size)]


def ppo_update_work(shape: Shape, batch: int, context: int, p: dict, optimizer: str = "adamw8bit") -> dict:
    """One PPO update of `batch` queries left padded to `context` tokens, as ppo.main runs it:
    generation in chunks, four no-grad forwards (policy, reference, value, reward), then
    `ppo_epochs` passes of policy + value forward/backward in micro-batches."""
    R, T = p["response_length"], context + p["response_length"]
    fwd_chunks, micros = chunks(batch, p["forward_batch_size"]), chunks(batch, p["micro_batch_size"])
    gen_chunks = chunks(batch, p["generation_batch_size"])
    lm, score = shape.params("lm"), shape.params("score")
    decode = [(b, context + t) for b in gen_chunks for t in range(R - 1)]  # the first token comes from the prefill
    return {
        "prefill_flops": sum(forward_flops(shape, b, context, b) for b in gen_chunks),
        "decode_steps": len(decode),
        "decode_flops": sum(decode_step_flops(shape, b, c) for b, c in decode),
        "decode_bytes": sum(decode_step_bytes(shape, b, c) for b, c in decode),
        "forward_flops": sum(2 * forward_flops(shape, b, T, b * R) + 2 * forward_flops(shape, b, T, 0) for b in fwd_chunks),
        "forward_bytes": sum(2 * BYTES["logit_forward"] * b * R * shape.vocab for b in fwd_chunks),
        "train_flops": p["ppo_epochs"] * sum(train_flops(shape, b, T, b * R) + train_flops(shape, b, T, 0) for b in micros),
        "train_bytes": p["ppo_epochs"] * sum(BYTES["micro_weights_per_param"] * (lm + score) + BYTES["logit_train_ppo"] * b * R * shape.vocab for b in micros)
        + p["ppo_epochs"] * p["num_minibatches"] * BYTES["optimizer_step_per_param"][optimizer] * (lm + score),
        "context_length": context, "sequence_length": T,
    }  # fmt: skip


def expected_context(lengths: LengthSample, batch: int, n: int = 64, seed: int = 0) -> float:
    """Mean over batches of the longest query (ppo.main left pads each batch to its longest)."""
    rng = random.Random(seed)
    return statistics.fmean(max(min(lengths.draw("query", rng), BUDGET.query) for _ in range(batch)) for _ in range(n))


# ---------------------------------------------------------------------------------------------
# measured inputs: efficiencies and host overhead from a gpu_bench.py run, else assumed


def read_bench(path: Path) -> tuple[dict | None, str]:
    if not path.exists():
        return None, f"{path} not found"
    try:
        bench = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return None, f"{path} is not JSON ({e.msg})"
    device = bench.get("device", {})
    if not isinstance(device, dict):  # e.g. gpu_checks.py's output
        return None, f"{path} is not a gpu_bench.py output: not used"
    if bench.get("tiny") or device.get("type") != "cuda":
        return None, f"{path} holds a --tiny or CPU run ({device.get('name', '?')}): not used"
    return bench, f"{path}: {device.get('name')} ({bench.get('versions', {}).get('torch')})"


def gpu_rates(bench: dict) -> tuple[float, float, str]:
    """(peak FLOP/s, bandwidth B/s) of the benchmarked GPU: measured when the bench measured
    them (apples to apples with the Spark's measured 92 TFLOPS), else its datasheet."""
    device = bench["device"]
    peak = device.get("measured_gemm_bf16_flops") or device.get("spec_peak_bf16_flops")
    bandwidth = device.get("measured_copy_bandwidth_bytes_per_s") or device.get("spec_bandwidth_bytes_per_s")
    how = f"{'measured GEMM' if device.get('measured_gemm_bf16_flops') else 'datasheet'} {peak / 1e12:.0f} TFLOP/s, {'measured copy' if device.get('measured_copy_bandwidth_bytes_per_s') else 'datasheet'} {bandwidth / 1e12:.2f} TB/s"
    return peak, bandwidth, how


def efficiency(flops: float, bytes_: float, seconds: float, peak: float, bandwidth: float) -> float:
    """Share of `peak` the compute ran at, once the memory term is taken out of the measured time
    (at least a quarter of the time is kept as compute, so a memory-heavy phase cannot blow up)."""
    compute = max(seconds - bytes_ / bandwidth, 0.25 * seconds)
    return min(flops / (peak * compute), 0.95)


def calibrate_ppo(cal: dict, run: dict, g_peak: float, g_bw: float) -> None:
    """PPO efficiencies and the host time per decoding step from a measured PPO run."""
    t, w = run["timed_means"], run["work_per_update"]
    eff, source = cal["eff"], f"measured (ppo_{run['batch_size']})"
    eff["ppo_forward"] = efficiency(w["forward_flops"], w["forward_bytes"], t["rollout_forward_s"], g_peak, g_bw)
    eff["ppo_train"] = efficiency(w["train_flops"], w["train_bytes"], t["train_s"], g_peak, g_bw)
    # generation: the prefill at the forward efficiency, the rest spread over the decode steps
    decode_s = max(t["generation_s"] - w["prefill_flops"] / (g_peak * eff["ppo_forward"]), 0.0)
    per_step, steps = decode_s / max(w["decode_steps"], 1), max(w["decode_steps"], 1)
    gpu_bound = max(w["decode_bytes"] / steps / g_bw, w["decode_flops"] / steps / g_peak)
    cal["overhead"] = per_step if per_step > gpu_bound else 0.0
    cal["overhead_source"] = f"measured (ppo_{run['batch_size']}: {per_step * 1e3:.1f} ms per decoding step, GPU roofline {gpu_bound * 1e3:.2f} ms)"
    eff["prefill"] = eff["ppo_forward"]
    cal["eff_source"].update(ppo_forward=source, ppo_train=source, prefill=source)
    cal["peak_gb"]["ppo"] = run.get("peak_memory_allocated_gb")
    cal["measured"][f"ppo_{run['batch_size']}"] = {"episodes_per_s": run.get("episodes_per_s"), "timed_means": t}


def calibrate(args, bench: dict | None, bench_note: str) -> tuple[dict, list[str]]:
    """Efficiency per phase (+ source), host time per decoding step, measured peaks; and the
    assumption lines that say where each came from."""
    keys = ("sft", "reward", "ppo_forward", "ppo_train", "prefill")
    cal = {"eff": dict.fromkeys(keys, args.assumed_efficiency), "eff_source": dict.fromkeys(keys, "assumed"), "overhead": args.assumed_step_overhead_ms / 1e3,
           "overhead_source": "assumed", "peak_gb": {}, "measured": {}}  # fmt: skip
    eff, source, notes = cal["eff"], cal["eff_source"], []
    if bench:
        g_peak, g_bw, how = gpu_rates(bench)
        notes.append(f"measured on {bench['device']['name']}: {how}; each efficiency in the table = counted FLOPs / (GPU peak x (measured time - bytes / GPU bandwidth)), applied to the GB10 unchanged (conservative: the same kernels are less launch-bound on a slower chip)")
        m = bench.get("measurements", {})
        for key, name in (("sft", "sft"), ("reward", "reward_0.5b"), ("reward_1.5b", "reward_1.5b")):
            r = m.get(name) or {}
            if r.get("seconds_timed"):
                eff[key] = efficiency(r["flops_counted"], r["bytes_counted"], r["seconds_timed"], g_peak, g_bw)
                source[key] = f"measured ({name})"
                cal["peak_gb"][key] = r.get("peak_memory_allocated_gb")
                if key != "reward_1.5b":
                    cal["measured"][name] = {"tokens_per_s": r.get("tokens_nonpad_per_s"), "mfu_6N_spec": r.get("mfu_6N_spec")}
        ppo_runs = [m.get(k) for k in ("ppo_512", "ppo_64") if (m.get(k) or {}).get("timed_updates")]
        if ppo_runs:
            calibrate_ppo(cal, ppo_runs[0], g_peak, g_bw)
    else:
        notes.append(f"no GPU measurement ({bench_note}): every compute phase at an ASSUMED {args.assumed_efficiency:.0%} of the GB10 peak, host overhead per decoding step ASSUMED {args.assumed_step_overhead_ms:.0f} ms")
    if args.efficiency is not None:
        cal["eff"], cal["eff_source"] = dict.fromkeys(eff, args.efficiency), dict.fromkeys(eff, "--efficiency")
    cal["eff"].setdefault("reward_1.5b", cal["eff"]["reward"])
    cal["eff_source"].setdefault("reward_1.5b", f"as reward 0.5B ({cal['eff_source']['reward']})")
    cal["overhead"] *= args.host_overhead_scale
    notes.append(f"host (Python + kernel launch) time per decoding step on the Spark's CPU = {args.host_overhead_scale} x the bench host's, or the assumed one: {cal['overhead'] * 1e3:.1f} ms")
    notes.append("peak memory on the Spark = the same allocations as on the bench GPU (same code, same micro-batches); the 'measured' column is the H100/H200 peak when present")
    return cal, notes


# ---------------------------------------------------------------------------------------------
# the projection


def row(stage: str, shape: Shape, work: str, flops: float, secs: float, memory: dict, measured_gb: float | None, efficiency_used: str) -> dict:
    memory = {"CUDA context + workspace": 1.0, **memory}
    total = sum(memory.values())
    return {
        "stage": stage, "model": shape.name, "work": work, "pflop": flops / 1e15, "hours": secs / 3600, "memory_gb_estimate": total,
        "memory_gb_parts": memory, "memory_gb_measured": measured_gb, "fits": total < SPARK["memory_visible_gb"], "efficiency": efficiency_used,
    }  # fmt: skip


def project_training(kind: str, shape: Shape, key: str, sizes: dict, lengths: LengthSample, cal: dict) -> tuple[dict, dict]:
    """SFT or the reward model, one epoch: (table row, details). A step is the mean of 64 drawn batches."""
    batch = sizes["batch_size"]
    steps = sizes["epochs"] * (sizes["rows" if kind == "sft" else "pairs"] // batch)
    step = mean_step(kind, shape, lengths, batch, sizes["micro_batch_size"])
    step_s = seconds(step["flops"], step["bytes"], cal["eff"][key])
    mem = {
        "trainable model (weights, grads, 8-bit AdamW, bf16 copy)": model_state_gb(shape.params("lm" if kind == "sft" else "score"), True),
        f"activations ({step['peak_tokens']} tokens, longest micro-batch)": activation_gb(shape, step["peak_tokens"]),
    }
    if kind == "sft":
        mem[f"fp32 logits of {step['peak_labels']} labelled positions (x3: logits, softmax, grad)"] = 3 * 4 * step["peak_labels"] * shape.vocab / 1e9
        stage, work = "SFT, 1 epoch", f"{steps} steps x {batch} rows, {step['tokens'] / batch:.0f} tokens/row ({step['padded_tokens'] / step['tokens'] - 1:.1%} padding)"
    else:
        stage, work = "RM, 1 epoch", f"{steps} steps x {batch} pairs, {step['tokens'] / (2 * batch):.0f} tokens/sequence"
    efficiency_used = f"{cal['eff'][key]:.0%} ({cal['eff_source'][key]})"
    details = {"steps": steps, "seconds_per_step": step_s, "tokens_per_s": step["tokens"] / step_s, **step}
    return row(stage, shape, work, steps * step["flops"], steps * step_s, mem, cal["peak_gb"].get(key), efficiency_used), details


def project_ppo(p: dict, lengths: LengthSample, cal: dict) -> tuple[list[dict], dict]:
    """One PPO update of the recipe at Qwen2.5-0.5B, then 100k and 1M episodes of them."""
    shape, peak, bandwidth, eff = QWEN_0_5B, SPARK["peak_bf16_flops"], SPARK["bandwidth"], cal["eff"]
    context = expected_context(lengths, p["batch_size"])
    w = ppo_update_work(shape, p["batch_size"], round(context), p)
    decode = [(b, round(context) + t) for b in chunks(p["batch_size"], p["generation_batch_size"]) for t in range(p["response_length"] - 1)]
    phases = {
        "generation: prefill": seconds(w["prefill_flops"], 0, eff["prefill"]),
        "generation: decoding": sum(max(decode_step_bytes(shape, b, c) / bandwidth, decode_step_flops(shape, b, c) / peak, cal["overhead"]) for b, c in decode),
        "rollout forwards (4 models, no grad)": seconds(w["forward_flops"], w["forward_bytes"], eff["ppo_forward"]),
        f"training ({p['ppo_epochs']} epochs, policy + value)": seconds(w["train_flops"], w["train_bytes"], eff["ppo_train"]),
    }
    update_s, T = sum(phases.values()), w["sequence_length"]
    policy, value = shape.params("lm"), shape.params("score")
    # training micro-batch: policy and value graphs alive together; fp32 (micro, R, vocab) logits
    # x5 (logits, /T, log_softmax, entropy's softmax, grad). Rollout: the KV cache of a generation
    # chunk x2 (torch.cat copies), fp32 logits of a forward chunk x3. The larger of the two counts.
    train_mem = 2 * activation_gb(shape, p["micro_batch_size"] * T) + 5 * 4 * p["micro_batch_size"] * p["response_length"] * shape.vocab / 1e9
    rollout_mem = 2 * kv_cache_bytes(shape, p["generation_batch_size"], T) / 1e9 + 3 * 4 * p["forward_batch_size"] * p["response_length"] * shape.vocab / 1e9
    mem = {
        "policy + value trainable (weights, grads, 8-bit AdamW, bf16 copy)": model_state_gb(policy, True) + model_state_gb(value, True),
        "reference + reward model, bf16 frozen": model_state_gb(policy, False) + model_state_gb(value, False),
        (f"training micro-batch ({p['micro_batch_size']} x {T} tokens, 2 models) + logits" if train_mem >= rollout_mem else "rollout KV cache + logits"): max(train_mem, rollout_mem),
    }  # fmt: skip
    flops = w["prefill_flops"] + w["decode_flops"] + w["forward_flops"] + w["train_flops"]
    work = f"x {p['batch_size']} (4 models; FLOPs counted with queries padded to {context:.0f}, the rollout's longest)"
    efficiency_used = f"fwd {eff['ppo_forward']:.0%} / train {eff['ppo_train']:.0%} ({cal['eff_source']['ppo_train']})"
    rows = [
        row(f"PPO, {episodes:,} episodes", shape, f"{episodes // p['batch_size']} updates {work}", episodes // p["batch_size"] * flops,
            episodes // p["batch_size"] * update_s, mem, cal["peak_gb"].get("ppo"), efficiency_used)
        for episodes in (100_000, 1_000_000)
    ]  # fmt: skip
    states = mem["policy + value trainable (weights, grads, 8-bit AdamW, bf16 copy)"] + mem["reference + reward model, bf16 frozen"]
    details = {"seconds": update_s, "episodes_per_s": p["batch_size"] / update_s, "phases_s": phases, "work": w, "context_length": context,
               "memory_gb": {"model_states": states, "training_activations_logits": train_mem, "rollout_kv_logits": rollout_mem}}  # fmt: skip
    return rows, details


def project(args) -> dict:
    lengths = load_lengths(Path(args.sample_dir) if args.sample_dir else None)
    recipe, recipe_source = recipe_defaults()
    bench, bench_note = read_bench(Path(args.bench_json))
    cal, notes = calibrate(args, bench, bench_note)
    sft_row, sft = project_training("sft", QWEN_0_5B, "sft", recipe["sft"], lengths, cal)
    rm_row, rm = project_training("reward", QWEN_0_5B, "reward", recipe["reward"], lengths, cal)
    rm15_row, rm15 = project_training("reward", QWEN_1_5B, "reward_1.5b", recipe["reward"], lengths, cal)
    ppo_rows, ppo_update = project_ppo(recipe["ppo"], lengths, cal)
    rows = [sft_row, rm_row, rm15_row, *ppo_rows]
    assumptions = [
        f"GB10: {SPARK['peak_bf16_flops'] / 1e12:.0f} TFLOP/s BF16 (measured GEMM), {SPARK['bandwidth'] / 1e9:.0f} GB/s (220-230 measured; spec {SPARK['bandwidth_spec'] / 1e9:.0f}), {SPARK['memory_visible_gb']} GB visible to CUDA",
        f"token lengths: {lengths.source}; queries cut to {BUDGET.query}, SFT responses to {BUDGET.response}",
        f"recipe sizes: {recipe_source}; SFT {recipe['sft']['rows']:,} rows, RM {recipe['reward']['pairs']:,} pairs (full dataset sizes)",
        "reward pairs: one summary drawn from the sample's reference lengths, one from its 1.3B-PPO lengths (stand-in for the training pairs' policies)",
        "time per phase = FLOPs / (peak x efficiency) + non-FLOP bytes / bandwidth; decoding step = max(bytes / bandwidth, FLOPs / peak, host overhead)",
        "FLOPs: 2 x matmul weights x tokens (padded as our batches pad), causal attention, LM head only where our code runs it; backward = 2 x forward",
        "bytes: " + "; ".join(f"{k} {v}" for k, v in BYTES.items() if not isinstance(v, dict)) + f"; optimizer step {BYTES['optimizer_step_per_param']['adamw8bit']} B/param (8-bit AdamW + clip)",
        "memory: trainable = fp32 weights 4 + fp32 grads 4 + 8-bit AdamW 2 + bf16 autocast copy 2 B/param; frozen bf16 2 B/param; "
        + f"activations {activation_bytes_per_token_layer(QWEN_0_5B) / 1e3:.1f} kB/token/layer at 0.5B, {activation_bytes_per_token_layer(QWEN_1_5B) / 1e3:.1f} at 1.5B (estimate: see activation_bytes_per_token_layer); + 1 GB CUDA context/workspace",
        *notes,
    ]
    return {
        "spark": SPARK, "bench": bench_note, "measured": cal["measured"], "efficiency": cal["eff"], "efficiency_source": cal["eff_source"],
        "host_overhead_per_decode_step_s": cal["overhead"], "host_overhead_source": cal["overhead_source"], "lengths": lengths.summary(), "recipe": recipe,
        "rows": rows, "details": {"sft": sft, "reward": rm, "reward_1.5b": rm15, "ppo_update": ppo_update},
        "total_hours_sft_rm1.5b_ppo1m": sft_row["hours"] + rm15_row["hours"] + ppo_rows[1]["hours"], "assumptions": assumptions,
    }  # fmt: skip


def markdown(result: dict) -> str:
    out = ["## Projected full recipe on one DGX Spark\n", f"GPU measurements: {result['bench']}\n"]
    out.append("| stage | model | work | PFLOP | projected time | est. peak memory | measured peak (bench GPU) | compute efficiency |")
    out.append("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        when = f"{r['hours']:.1f} h" if r["hours"] >= 1 else f"{r['hours'] * 60:.0f} min"
        measured = f"{r['memory_gb_measured']:.1f} GB" if r["memory_gb_measured"] else "-"
        fits = "" if r["fits"] else " (over 119.7 GB!)"
        out.append(f"| {r['stage']} | {r['model']} | {r['work']} | {r['pflop']:,.1f} | {when} | {r['memory_gb_estimate']:.1f} GB{fits} | {measured} | {r['efficiency']} |")
    out.append("\nMemory estimate, by part (GB):\n")
    out.append("| stage | model | part | GB |")
    out.append("|---|---|---|---|")
    parts = {(r["stage"].split(",")[0], r["model"]): r["memory_gb_parts"] for r in reversed(result["rows"])}  # the first row of each stage
    for (stage, model), memory in reversed(parts.items()):
        out.extend(f"| {stage} | {model} | {part} | {gb:.1f} |" for part, gb in memory.items())
    total = result["total_hours_sft_rm1.5b_ppo1m"]
    out.append(f"\nSFT + RM (1.5B) + PPO (1M episodes): {total:.1f} h ({total / 24:.1f} days).\n")
    u = result["details"]["ppo_update"]
    out.append(f"One PPO update of {result['recipe']['ppo']['batch_size']} episodes: {u['seconds']:.1f} s ({u['episodes_per_s']:.2f} episodes/s)\n")
    out.append("| phase | seconds | share |")
    out.append("|---|---|---|")
    out.extend(f"| {name} | {s:.1f} | {s / u['seconds']:.0%} |" for name, s in u["phases_s"].items())
    out.append("\nThroughputs: " + ", ".join(f"{k} {result['details'][k]['tokens_per_s']:,.0f} tokens/s" for k in ("sft", "reward", "reward_1.5b")) + "\n")
    out.append("Assumptions:\n")
    out.extend(f"- {a}" for a in result["assumptions"])
    out.append(f"- host overhead per decoding step: {result['host_overhead_source']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-json", default=str(DEFAULT_BENCH_JSON), help="gpu_bench.py output (ignored when it is a --tiny or CPU run)")
    ap.add_argument("--sample-dir", default=str(DEFAULT_SAMPLE), help="real TL;DR sample for the length distributions ('' = embedded table)")
    ap.add_argument("--assumed-efficiency", type=float, default=0.35, help="share of the GB10 peak for compute phases without a measurement")
    ap.add_argument("--assumed-step-overhead-ms", type=float, default=15.0, help="host (Python + launch) time per decoding step without a measurement")
    ap.add_argument("--host-overhead-scale", type=float, default=1.0, help="Spark CPU time per decoding step / the bench host's")
    ap.add_argument("--efficiency", type=float, default=None, help="override every compute efficiency")
    ap.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = ap.parse_args(argv)
    result = project(args)
    print(json.dumps(result, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)) if args.json else markdown(result))


if __name__ == "__main__":
    main()
