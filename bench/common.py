"""What every benchmark shares: the model, the tokenizer, the data, our contenders, timing, records.

Model: a random Qwen2 shaped like Qwen2.5-0.5B but small enough for 2 CPU cores (hidden 256, 4
layers, 4 heads / 2 KV heads, MLP 1024, tied embeddings, fp32; its LM head ~1/3 of the weights,
as on Qwen2.5-0.5B). Tokenizer (`--tokenizer`): `sample` (default), a byte-level BPE of 8,192
tokens trained on the real TL;DR sample, whose token counts there match Qwen2.5's (query median
352 vs 338, reference 33 vs 32), with Qwen2.5's pad == EOS trap; `tiny`, the 788-token fixture
tokenizer (queries ~2.2x too long). Data: ../shared/data/tldr_real_sample run through our own
`preprocess.process_sft` / `process_comparisons` (the bundled fixtures when it is missing).

Our contenders are the stage scripts' own steps (`sft.train_step`, `reward.train_step`,
`ppo.ppo_rollout` + `rewards_and_advantages` + `ppo_update`), imported, never re-typed; a
baseline changes their inputs or arguments (`pad_to`, `pack`, `trim_padding`), not their code.
Every script interleaves the contenders on the same rows in one process; the machine may be
shared, so the ratios are the numbers to trust, absolute rates move with the load.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))  # sft.py, reward.py, ppo.py live at the repository root

import torch  # noqa: E402

from dgx_spark_summary_from_human_feedback import data, preprocess, tiny  # noqa: E402
from dgx_spark_summary_from_human_feedback.training import batch_indices  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "data" / "tldr_real_sample"
CACHE = BENCH / ".cache"
RESULTS = BENCH / "results.jsonl"
SAMPLE_VOCAB = 8192

# the benchmark model (stated in every record)
MODEL_SHAPE = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)


# ---------------------------------------------------------------------------------------------
# tokenizer


def _sample_rows() -> tuple[list[dict], list[dict]]:
    sft = [json.loads(line) for line in (SAMPLE / "sft.jsonl").read_text().splitlines() if line.strip()]
    comparisons = [json.loads(line) for line in (SAMPLE / "comparisons.jsonl").read_text().splitlines() if line.strip()]
    return sft, comparisons


def sample_available() -> bool:
    return (SAMPLE / "sft.jsonl").exists() and (SAMPLE / "comparisons.jsonl").exists()


def build_sample_tokenizer(output_dir: Path, vocab_size: int = SAMPLE_VOCAB) -> None:
    """Byte-level BPE trained on the sample's formatted queries and summaries; pad == EOS like Qwen2.5."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sft, comparisons = _sample_rows()
    corpus = [data.QUERY_FORMAT.format(**preprocess.sft_query_fields(r)) + " " + r["summary"] for r in sft]
    corpus += [s["text"] for c in comparisons for s in c["summaries"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[tiny.EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=tiny.EOS, pad_token=tiny.EOS).save_pretrained(str(output_dir))


def tokenizer_dir(kind: str) -> Path:
    if kind == "tiny" or not sample_available():
        return tiny.TOKENIZER_DIR
    out = CACHE / f"tokenizer-sample-{SAMPLE_VOCAB}"
    if not (out / "tokenizer.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        build_sample_tokenizer(out)
    return out


def load_tokenizer(kind: str = "sample"):
    """The benchmark tokenizer, through the project's loader (adds [PAD] distinct from EOS)."""
    return data.load_tokenizer(str(tokenizer_dir(kind)))


# ---------------------------------------------------------------------------------------------
# models


def model_config(tokenizer):
    rows = (len(tokenizer) + 63) // 64 * 64 + 64  # spare rows past [PAD], as Qwen2.5 has
    return tiny.model_config(vocab_rows=rows, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **MODEL_SHAPE)


def write_models(tokenizer, kind: str, seed: int = 0) -> tuple[Path, Path]:
    """(policy dir, reward dir): a random causal LM and a reward model (our N+ head) on the same backbone.

    Both sides of every benchmark load these directories, so they start from identical weights.
    """
    from transformers import AutoModelForCausalLM

    from dgx_spark_summary_from_human_feedback.models import load_reward_model

    base = CACHE / f"models-{kind}-{seed}"
    policy_dir, reward_dir = base / "policy", base / "reward"
    if (policy_dir / "config.json").exists() and (reward_dir / "config.json").exists():
        return policy_dir, reward_dir
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(policy_dir))
    tokenizer.save_pretrained(str(policy_dir))
    torch.manual_seed(seed + 1)
    reward = load_reward_model(str(policy_dir), tokenizer, new_head=True)
    reward.save_pretrained(str(reward_dir))
    tokenizer.save_pretrained(str(reward_dir))
    return policy_dir, reward_dir


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# data: the real sample through our pipeline


def sft_data(tokenizer):
    """Processed SFT rows (query 512, response 63, long responses truncated): one datasets.Dataset."""
    if sample_available():
        raw = data.load_raw(str(SAMPLE / "sft.jsonl"), split="train")
    else:
        raw = data.load_raw(str(tiny.SFT_DIR))
        raw = type(raw)({"train": raw["train"]})
    return preprocess.process_sft(raw, tokenizer, data.Lengths(512, 63), long_response="truncate")["train"]


def comparison_data(tokenizer):
    """Processed preference rows (query 512, responses 133, truncated), every split together."""
    import datasets

    path = SAMPLE / "comparisons.jsonl" if sample_available() else tiny.COMPARISONS_FILE
    raw = data.load_raw(str(path), split="train")
    ds = preprocess.process_comparisons(raw, tokenizer, data.Lengths(512, 133), long_response="truncate")
    parts = [ds[s] for s in ("train", "validation") if s in ds]  # CNN/DM articles (fixtures only) left out
    return datasets.concatenate_datasets(parts)


def length_summary(values) -> dict:
    v = sorted(int(x) for x in values)
    return {"min": v[0], "median": v[len(v) // 2], "mean": round(statistics.mean(v), 1), "max": v[-1], "n": len(v)}


# ---------------------------------------------------------------------------------------------
# our contenders: each a fresh model and optimizer, and a closure running one step of a stage


def sft_step(model_dir, tokenizer, train, cfg, runtime, pad_to: int | None = None):
    """`step(indices, k)`: `sft.train_step` on those rows (k = its step number). `pad_to`: the
    fixed-shape baseline, every row padded to that many columns and forwards on padded rows."""
    import sft
    from dgx_spark_summary_from_human_feedback.models import disable_dropout, lm_loss_sum, load_policy
    from dgx_spark_summary_from_human_feedback.training import distribute, make_optimizer

    model = load_policy(str(model_dir), tokenizer, dtype=runtime.param_dtype, device=runtime.device)
    disable_dropout(model)
    model.train()
    loss_fn = distribute(model, functools.partial(lm_loss_sum, pack=False if pad_to else None), runtime)
    adam = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps, kind=cfg.optimizer)
    optimizer = make_optimizer(list(model.parameters()), **adam, device=runtime.device)
    lengths = [int(n) for n in train["query_reference_response_token_len"]]
    response_lengths = [int(n) for n in train["reference_response_token_len"]]

    def step(indices: list[int], k: int = 0) -> dict:
        return sft.train_step(loss_fn, model, optimizer, train, indices, lengths, response_lengths, cfg, runtime, k, CACHE, pad_to)

    return step


def reward_step(model_dir, tokenizer, train, cfg, runtime, new_head: bool = False):
    """`step(indices, k)`: `reward.train_step` on those comparisons."""
    import reward
    from dgx_spark_summary_from_human_feedback.models import disable_dropout, get_pair_scores, load_reward_model
    from dgx_spark_summary_from_human_feedback.training import distribute, make_optimizer

    torch.manual_seed(cfg.seed)  # the head's init, as reward.main
    model = load_reward_model(str(model_dir), tokenizer, dtype=runtime.param_dtype, device=runtime.device, new_head=new_head)
    disable_dropout(model)
    model.train()
    score_fn = distribute(model, get_pair_scores, runtime)
    adam = dict(lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8, kind=cfg.optimizer)
    optimizer = make_optimizer(list(model.parameters()), **adam, device=runtime.device)
    columns = (train["query_token_len"], train["chosen_token_len"], train["rejected_token_len"])
    pair_lengths = [int(q) + max(int(c), int(r)) for q, c, r in zip(*columns)]  # as reward.main

    def step(indices: list[int], k: int = 0) -> dict:
        return reward.train_step(score_fn, model, optimizer, train, indices, pair_lengths, cfg, runtime, k, CACHE)

    return step


def ppo_update_fn(cfg, tokenizer, rows: dict, runtime, pad_to: int | None = None, pack: bool | None = None):
    """`update(k, tick)`: one PPO update of ppo.py's on the fixed query rows `rows`, as ppo.main
    runs it (rollout, rewards and advantages, PPO epochs, metrics); `tick(phase)` is called after
    the rollout and after the update (the GPU bench times them). `pad_to`: queries left padded to
    that length and no trimming or packing anywhere (N+'s fixed shapes); `pack`: the forwards'."""
    import ppo

    if pad_to:
        pack = False
    models = ppo.load_models(cfg, tokenizer, runtime, pack=pack)
    sample_generator = torch.Generator(device=runtime.device).manual_seed(cfg.seed)
    shuffle_generator = torch.Generator().manual_seed(cfg.seed)
    queries, query_mask = ppo.query_batch(rows, runtime.device)
    if pad_to:
        queries = torch.nn.functional.pad(queries, (pad_to - queries.shape[1], 0), value=tokenizer.pad_token_id)
        query_mask = torch.nn.functional.pad(query_mask, (pad_to - query_mask.shape[1], 0), value=0)

    def update(k: int, tick=lambda phase: None) -> dict:
        batch = ppo.ppo_rollout(models, queries, query_mask, cfg, tokenizer, runtime, sample_generator, not pad_to)
        tick("rollout")
        advantages, returns, kl, non_score_rewards = ppo.rewards_and_advantages(batch, cfg)
        stats = ppo.ppo_update(
            models, batch, advantages, returns, rows["query_token_len"], cfg, runtime, shuffle_generator, k, CACHE, not pad_to
        )
        metrics = ppo.update_metrics(batch, kl, non_score_rewards, stats, runtime)
        tick("update")
        return metrics

    return update


# ---------------------------------------------------------------------------------------------
# timing, tables, records


def set_threads() -> int:
    """Torch threads: $BENCH_THREADS, else every core, or 1 when the machine is already busy.

    With other processes on a 2-core box, two threads per process oversubscribe the cores and
    every barrier waits on a descheduled thread: one thread was ~2x faster under load 8.
    """
    cores = os.cpu_count() or 1
    n = int(os.environ.get("BENCH_THREADS") or (1 if os.getloadavg()[0] >= cores else cores))
    torch.set_num_threads(n)
    return n


def interleave_callback(on_round):
    """A transformers TrainerCallback calling `on_round(k, seconds)` after each optimizer step k
    of a Trainer, with the seconds since the end of the previous call: TRL's whole step (data
    loading, collation, forward/backward, clip, optimizer, logging), and none of what
    `on_round` itself runs (our side of the round)."""
    from transformers import TrainerCallback

    class Interleave(TrainerCallback):
        mark = 0.0

        def on_train_begin(self, *args, **kwargs):
            self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.mark
            on_round(state.global_step - 1, seconds)
            self.mark = time.perf_counter()

    return Interleave()


def pair_bench_args(doc: str):
    """The command line of the two preference-step benchmarks (reward model, DPO)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", choices=["sample", "tiny"], default="sample")
    parser.add_argument("--batch-size", type=int, default=8, help="comparisons per optimizer step")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="comparisons per forward (2x sequences)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trl-variants", default="default,fast")
    return parser.parse_args()


def pair_rounds(ds, cfg, rounds: int) -> tuple[list[list[int]], list[int]]:
    """Each round's comparison indices (the stages' own batch order) and its non-pad tokens."""
    chosen_len, rejected_len = ds["query_chosen_token_len"], ds["query_rejected_token_len"]
    steps = [batch_indices(k, len(ds), cfg.batch_size, cfg.seed) for k in range(rounds)]
    tokens = [sum(chosen_len[i] + rejected_len[i] for i in s) for s in steps]
    print(
        f"comparisons {len(ds)}: query+chosen tokens {length_summary(chosen_len)}; batch {cfg.batch_size} = "
        f"{cfg.micro_batch_size} x {cfg.batch_size // cfg.micro_batch_size} pairs, {sum(tokens) / rounds:.0f} non-pad tokens per step"
    )
    return steps, tokens


def interleaved_rounds(trainer: str, variants: list[str], contenders, trl_loss, steps: list, tokens: list[int], warmup: int):
    """Time our step functions against TRL's `trainer`, round by round in one process: for each
    TRL variant, `contenders()` gives fresh copies of ours ({name: step}; "ours" first, its
    losses are compared with TRL's), `trl_loss(variant, on_round)` runs TRL and calls
    `on_round(k, seconds)` after its step k, and our contenders run step k right then. With no
    variants, ours run alone. Returns (rates, ratios, loss_check); rates are tokens/s."""
    rates: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    loss_check: dict[str, dict] = {}
    for variant in variants or [None]:
        steppers, losses = contenders(), []

        def on_round(k: int, trl_seconds: float | None, variant=variant, steppers=steppers, losses=losses) -> None:
            seconds = {}
            for name, step in steppers.items():
                t = time.perf_counter()
                stats = step(steps[k], k)
                seconds[name] = time.perf_counter() - t
                if name == "ours":
                    losses.append(stats["train/loss"])
            if trl_seconds is not None:
                seconds[f"trl-{variant}"] = trl_seconds
            label = "warmup" if k < warmup else f"round {k - warmup + 1}"
            print(f"  {label}: " + ", ".join(f"{n} {s:.2f}s" for n, s in seconds.items()), flush=True)
            if k >= warmup:
                for name, s in seconds.items():
                    rates.setdefault(name, []).append(tokens[k] / s)
                    if name != "ours":
                        ratios.setdefault(f"ours/{name}", []).append(s / seconds["ours"])

        if variant is None:
            for k in range(len(steps)):
                on_round(k, None)
            continue
        print(f"TRL {trainer}, {variant} config, interleaved with ours")
        loss = trl_loss(variant, on_round)
        loss_check[variant] = {"trl": loss, "ours": sum(losses) / len(losses)}
        print(f"  same loss on the same rows? mean loss TRL {loss:.4f}, ours {loss_check[variant]['ours']:.4f}")
    return rates, ratios, loss_check


def spread(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "n": len(xs)}


def fmt(x: float) -> str:
    return f"{x:,.2f}" if abs(x) < 100 else f"{x:,.0f}"


def print_table(title: str, unit: str, rates: dict[str, list[float]], ratios: dict[str, list[float]]) -> None:
    print(f"\n{title}")
    print(f"{'':34s} {'min':>10s} {'median':>10s} {'max':>10s}   n")
    for name, xs in rates.items():
        s = spread(xs)
        print(f"{name + ' (' + unit + ')':34s} {fmt(s['min']):>10s} {fmt(s['median']):>10s} {fmt(s['max']):>10s}  {s['n']}")
    for name, xs in ratios.items():
        s = spread(xs)
        print(f"{'ratio ' + name:34s} {s['min']:>10.2f} {s['median']:>10.2f} {s['max']:>10.2f}  {s['n']}")


def versions() -> dict:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads()}
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:
        pass
    return out


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def record(bench: str, settings: dict, unit: str, rates: dict[str, list[float]], ratios: dict[str, list[float]], extra: dict | None = None) -> dict:
    """Append one JSON line to bench/results.jsonl and return it."""
    rec = {
        "bench": bench, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": git_commit(), "host": platform.node(),
        "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "versions": versions(), "model": MODEL_SHAPE, "settings": settings,
        "unit": unit, "rates": {k: spread(v) | {"all": v} for k, v in rates.items()},
        "ratios": {k: spread(v) | {"all": v} for k, v in ratios.items()}, **(extra or {}),
    }  # fmt: skip
    with RESULTS.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec
