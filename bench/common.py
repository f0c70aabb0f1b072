"""What the CPU benchmarks share (bench/README.md): the model, the tokenizer, the data, our contenders, timing,
records. Our contenders are the stage scripts' own steps, imported, never re-typed; a baseline changes their
inputs or arguments (`pad_to`, `pack`, `trim_padding`), not their code.
"""

from __future__ import annotations

import dataclasses
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
from dgx_spark_summary_from_human_feedback.training import batch_indices, distribute, make_optimizer  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "data" / "tldr_real_sample"
SAMPLE_FILES = ("sft.jsonl", "comparisons.jsonl")
CACHE = BENCH / ".cache"
RESULTS = BENCH / "results.jsonl"
SAMPLE_VOCAB = 8192
SFT_COLUMNS = ["query_reference_response_token", "query_reference_response_token_len", "reference_response_token_len"]

# the benchmark model (stated in every record): Qwen2.5-0.5B's proportions (GQA, tied embeddings, the LM head
# about a third of the weights) at a size 2 CPU cores train
MODEL_SHAPE = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4}
MODEL_SHAPE |= {"num_attention_heads": 4, "num_key_value_heads": 2}


# ---- tokenizer, models, data


def sample_available() -> bool:
    return all((SAMPLE / f).exists() for f in SAMPLE_FILES)


def build_sample_tokenizer(output_dir: Path, vocab_size: int = SAMPLE_VOCAB) -> None:
    """A byte-level BPE trained on the sample's formatted queries and summaries, whose token counts there match
    Qwen2.5's (query median 352 vs 338, reference 33 vs 32); pad == EOS like Qwen2.5."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sft, comparisons = ([json.loads(x) for x in (SAMPLE / f).read_text().splitlines()] for f in SAMPLE_FILES)
    corpus = [data.QUERY_FORMAT.format(**preprocess.sft_query_fields(r)) + " " + r["summary"] for r in sft]
    corpus += [s["text"] for c in comparisons for s in c["summaries"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[tiny.EOS], initial_alphabet=alphabet)
    trainer.show_progress = False
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=tiny.EOS, pad_token=tiny.EOS)
    tokenizer.save_pretrained(str(output_dir))


def tokenizer_dir(kind: str) -> Path:
    """`sample` (the BPE above, built once into bench/.cache), or `tiny`: the 788-token fixture tokenizer
    (queries ~2.2x too long); `tiny` too when the sample is missing."""
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


def model_config(tokenizer):
    rows = (len(tokenizer) + 63) // 64 * 64 + 64  # spare rows past [PAD], as Qwen2.5 has
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return tiny.model_config(vocab_rows=rows, **ids, **MODEL_SHAPE)


def write_models(tokenizer, kind: str, seed: int = 0) -> tuple[Path, Path]:
    """(policy dir, reward dir): a random causal LM and a reward model (our N+ head) on the same backbone,
    cached; both sides of every benchmark load these, so they start from identical weights."""
    from transformers import AutoModelForCausalLM

    from dgx_spark_summary_from_human_feedback.models import load_reward_model

    policy_dir, reward_dir = CACHE / f"models-{kind}-{seed}" / "policy", CACHE / f"models-{kind}-{seed}" / "reward"
    if (policy_dir / "config.json").exists() and (reward_dir / "config.json").exists():
        return policy_dir, reward_dir
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(policy_dir))
    tokenizer.save_pretrained(str(policy_dir))
    torch.manual_seed(seed + 1)
    load_reward_model(str(policy_dir), tokenizer, new_head=True).save_pretrained(str(reward_dir))
    tokenizer.save_pretrained(str(reward_dir))
    return policy_dir, reward_dir


def sft_data(tokenizer):
    """The real sample's posts (the fixtures without it) through our `process_sft`: query 512, response 63,
    long responses truncated; one datasets.Dataset."""
    if sample_available():
        raw = data.load_raw(str(SAMPLE / "sft.jsonl"), split="train")
    else:
        raw = data.load_raw(str(tiny.SFT_DIR))
        raw = type(raw)({"train": raw["train"]})
    return preprocess.process_sft(raw, tokenizer, data.Lengths(512, 63), long_response="truncate")["train"]


def comparison_data(tokenizer):
    """The real sample's pairs through `process_comparisons` (query 512, responses 133), every split together."""
    import datasets

    path = SAMPLE / "comparisons.jsonl" if sample_available() else tiny.COMPARISONS_FILE
    raw = data.load_raw(str(path), split="train")
    ds = preprocess.process_comparisons(raw, tokenizer, data.Lengths(512, 133), long_response="truncate")
    return datasets.concatenate_datasets([ds[s] for s in ("train", "validation") if s in ds])  # not CNN/DM


def length_summary(values) -> dict:
    v = sorted(int(x) for x in values)
    return {"min": v[0], "median": v[len(v) // 2], "mean": round(statistics.mean(v), 1), "max": v[-1], "n": len(v)}


# ---- our contenders: each a fresh model and optimizer, and a closure running one step of a stage


def trainable(model, forward, cfg, runtime, betas, eps):
    """(the forward distributed as the stage runs it, the stage's optimizer) for a fresh model, dropout off."""
    from dgx_spark_summary_from_human_feedback.models import disable_dropout

    disable_dropout(model)
    model.train()
    adam = dict(lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, eps=eps, kind=cfg.optimizer)
    return distribute(model, forward, runtime), make_optimizer(list(model.parameters()), **adam, device=runtime.device)


def sft_step(model_dir, tokenizer, train, cfg, runtime, pad_to: int | None = None):
    """`step(indices, k)`: `sft.train_step` on those rows (k = its step number). `pad_to`: the fixed-shape
    baseline, every row padded to that many columns and forwards on padded rows."""
    import sft
    from dgx_spark_summary_from_human_feedback.models import lm_loss_sum, load_policy

    model = load_policy(str(model_dir), tokenizer, dtype=runtime.param_dtype, device=runtime.device)
    loss = functools.partial(lm_loss_sum, pack=False if pad_to else None)
    loss_fn, optimizer = trainable(model, loss, cfg, runtime, cfg.betas, cfg.eps)
    lengths = [int(n) for n in train["query_reference_response_token_len"]]
    response_lengths = [int(n) for n in train["reference_response_token_len"]]

    def step(indices: list[int], k: int = 0) -> dict:
        rows = (train, indices, lengths, response_lengths)
        return sft.train_step(loss_fn, model, optimizer, *rows, cfg, runtime, k, CACHE, pad_to)

    return step


def reward_step(model_dir, tokenizer, train, cfg, runtime, new_head: bool = False):
    """`step(indices, k)`: `reward.train_step` on those comparisons."""
    import reward
    from dgx_spark_summary_from_human_feedback.models import get_pair_scores, load_reward_model

    torch.manual_seed(cfg.seed)  # the head's init, as reward.main
    place = {"dtype": runtime.param_dtype, "device": runtime.device}
    model = load_reward_model(str(model_dir), tokenizer, **place, new_head=new_head)
    score_fn, optimizer = trainable(model, get_pair_scores, cfg, runtime, (0.9, 0.999), 1e-8)
    columns = (train["query_token_len"], train["chosen_token_len"], train["rejected_token_len"])
    pair_lengths = [int(q) + max(int(c), int(r)) for q, c, r in zip(*columns)]  # as reward.main

    def step(indices: list[int], k: int = 0) -> dict:
        return reward.train_step(score_fn, model, optimizer, train, indices, pair_lengths, cfg, runtime, k, CACHE)

    return step


def ppo_update_fn(cfg, tokenizer, rows: dict, runtime, pad_to: int | None = None, pack: bool | None = None):
    """`update(k, tick)`: one PPO update of ppo.py's on the fixed query rows `rows`, as ppo.main runs it
    (rollout, rewards and advantages, PPO epochs, metrics); `tick(phase)` after the rollout and after the
    update. `pad_to`: queries left padded to that length, no trimming or packing (N+'s fixed shapes)."""
    import ppo

    models = ppo.load_models(cfg, tokenizer, runtime, pack=False if pad_to else pack)
    sample_generator = torch.Generator(device=runtime.device).manual_seed(cfg.seed)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    queries, query_mask = ppo.query_batch(rows, runtime.device)
    if pad_to:
        queries = torch.nn.functional.pad(queries, (pad_to - queries.shape[1], 0), value=tokenizer.pad_token_id)
        query_mask = torch.nn.functional.pad(query_mask, (pad_to - query_mask.shape[1], 0), value=0)

    def update(k: int, tick=lambda phase: None) -> dict:
        batch = ppo.ppo_rollout(models, queries, query_mask, cfg, tokenizer, runtime, sample_generator, not pad_to)
        tick("rollout")
        advantages, returns, kl, non_score_rewards = ppo.rewards_and_advantages(batch, cfg)
        lengths = rows["query_token_len"]
        stats = ppo.ppo_update(models, batch, advantages, returns, lengths, cfg, runtime, shuffle, k, CACHE, not pad_to)
        metrics = ppo.update_metrics(batch, kl, non_score_rewards, stats, runtime)
        tick("update")
        return metrics

    return update


# ---- timing, tables, records


def set_threads() -> int:
    """Torch threads: $BENCH_THREADS, else every core, or 1 when the machine is already busy: with other
    processes on a 2-core box, two threads per process wait on each other at every barrier (one thread was
    ~2x faster under load 8)."""
    cores = os.cpu_count() or 1
    n = int(os.environ.get("BENCH_THREADS") or (1 if os.getloadavg()[0] >= cores else cores))
    torch.set_num_threads(n)
    return n


def interleave_callback(on_round):
    """A transformers TrainerCallback calling `on_round(k, seconds)` after each optimizer step k of a Trainer,
    with the seconds since the end of the previous call: TRL's whole step (data loading, collation,
    forward/backward, clip, optimizer, logging), and none of what `on_round` itself runs (our side)."""
    from transformers import TrainerCallback

    class Interleave(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            on_round(state.global_step - 1, time.perf_counter() - self.mark)
            self.mark = time.perf_counter()

    return Interleave()


def setup(tokenizer: str):
    """Torch threads, the CPU runtime, the benchmark tokenizer and models: (runtime, tokenizer, policy, reward)."""
    from dgx_spark_summary_from_human_feedback.training import setup_runtime

    set_threads()
    runtime, tok = setup_runtime("cpu"), load_tokenizer(tokenizer)
    return runtime, tok, *write_models(tok, tokenizer)


def step_bench_args(doc: str, *switches: str):
    """The command line of the optimizer-step benchmarks (SFT, reward model, DPO), + `switches` (flags)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", choices=["sample", "tiny"], default="sample")
    parser.add_argument("--batch-size", type=int, default=8, help="rows or comparisons per optimizer step")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="rows or comparisons per forward")
    parser.add_argument("--warmup", type=int, default=1, help="rounds not counted")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per TRL variant")
    parser.add_argument("--trl-variants", default="default,fast")
    for switch in switches:
        parser.add_argument(switch, action="store_true")
    return parser.parse_args()


def step_bench(bench: str, trainer: str, args, cfg, ds, columns: list[str], contenders, trl_loss, trl_variants: dict):
    """An optimizer-step benchmark: rounds of rows in the stages' own batch order (`training.batch_indices`),
    non-pad tokens = the `columns` summed; `contenders(steps)` (fresh copies of ours) timed against TRL's
    `trl_loss(variant, steps, on_round)` round by round (interleaved_rounds); the table; the record."""
    lengths = [sum(values) for values in zip(*(ds[c] for c in columns))]
    steps = [batch_indices(k, len(ds), cfg.batch_size, cfg.seed) for k in range(args.warmup + args.repeats)]
    tokens = [sum(lengths[i] for i in s) for s in steps]
    layout = f"batch {cfg.batch_size}, micro {cfg.micro_batch_size}"
    print(f"{len(ds)} rows, {columns[0]} {length_summary(ds[columns[0]])}; {layout}", end="")
    print(f"; {sum(tokens) / len(steps):.0f} non-pad tokens per step")
    variants = [] if getattr(args, "no_trl", False) else [v for v in args.trl_variants.split(",") if v]

    def trl(variant, on_round) -> float:
        return trl_loss(variant, steps, on_round)

    ours = functools.partial(contenders, steps)
    rates, ratios, loss_check = interleaved_rounds(trainer, variants, ours, trl, steps, tokens, args.warmup)
    print_table(f"{bench} optimizer step ({layout})", "tok/s", rates, ratios)
    settings = dict(vars(args), tokens_per_step=tokens, trl_variants={v: trl_variants[v] for v in variants})
    settings[bench] = dataclasses.asdict(cfg)
    record(bench, settings, "non-pad tokens/s", rates, ratios, {"loss_check": loss_check})


def trl_train(classes, model, dataset, tokenizer, cfg, steps: int, on_round, **settings) -> float:
    """TRL's trainer (`classes`: Trainer, Config) over `steps` optimizer steps of `dataset` in order, with our
    Config's batch layout and optimizer settings (constant lr, fp32 on CPU, no checkpoints; `settings`: the
    variant's, and betas / eps when not (0.9, 0.999) / 1e-8), `on_round(k, seconds)` after each step; its
    mean loss."""
    import tempfile

    (beta1, beta2), eps = settings.pop("betas", (0.9, 0.999)), settings.pop("eps", 1e-8)
    micro, accumulation = cfg.micro_batch_size, cfg.batch_size // cfg.micro_batch_size
    settings |= dict(per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation, max_steps=steps)
    settings |= dict(learning_rate=cfg.lr, adam_beta1=beta1, adam_beta2=beta2, adam_epsilon=eps)
    settings |= dict(weight_decay=cfg.weight_decay, max_grad_norm=cfg.grad_clip, lr_scheduler_type="constant")
    settings |= dict(train_sampling_strategy="sequential", bf16=False, use_cpu=True, report_to="none")
    trainer_class, config_class = classes
    with tempfile.TemporaryDirectory() as out:
        args = config_class(output_dir=out, save_strategy="no", seed=cfg.seed, **settings)
        callbacks = [interleave_callback(on_round)]
        kwargs = {"train_dataset": dataset, "processing_class": tokenizer, "callbacks": callbacks}
        trainer = trainer_class(model=model, args=args, **kwargs)
        return trainer.train().training_loss


def interleaved_rounds(
    trainer: str, variants: list[str], contenders, trl_loss, steps: list, tokens: list[int], warmup: int
):
    """Time our step functions against TRL's `trainer`, round by round in one process: for each TRL variant,
    `contenders()` gives fresh copies of ours ({name: step}; "ours" first, its losses are compared with TRL's),
    `trl_loss(variant, on_round)` runs TRL and calls `on_round(k, seconds)` after its step k, and our
    contenders run step k right then. With no variants, ours run alone. Returns (rates in tokens/s, ratios
    time of the other / time of ours, loss_check)."""
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
            if k < warmup:
                return
            for name, s in seconds.items():
                rates.setdefault(name, []).append(tokens[k] / s)
                if name != "ours":
                    ratios.setdefault(f"ours/{name}", []).append(s / seconds["ours"])

        if variant is None:
            for k in range(len(steps)):
                on_round(k, None)
            continue
        print(f"TRL {trainer}, {variant} config, interleaved with ours")
        loss_check[variant] = {"trl": trl_loss(variant, on_round), "ours": sum(losses) / len(losses)}
        trl, ours = loss_check[variant]["trl"], loss_check[variant]["ours"]
        print(f"  same loss on the same rows? mean loss TRL {trl:.4f}, ours {ours:.4f}")
    return rates, ratios, loss_check


def spread(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "n": len(xs)}


def print_table(title: str, unit: str, rates: dict[str, list[float]], ratios: dict[str, list[float]]) -> None:
    print(f"\n{title}\n{'':34s} {'min':>10s} {'median':>10s} {'max':>10s}   n")
    for name, xs in rates.items():
        s = spread(xs)
        cells = [f"{x:,.2f}" if abs(x) < 100 else f"{x:,.0f}" for x in (s["min"], s["median"], s["max"])]
        print(f"{name + ' (' + unit + ')':34s} {cells[0]:>10s} {cells[1]:>10s} {cells[2]:>10s}  {s['n']}")
    for name, xs in ratios.items():
        s = spread(xs)
        print(f"{'ratio ' + name:34s} {s['min']:>10.2f} {s['median']:>10.2f} {s['max']:>10.2f}  {s['n']}")


def versions() -> dict:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:
        pass
    return out | {"threads": torch.get_num_threads()}


def record(bench: str, settings: dict, unit: str, rates: dict, ratios: dict, extra: dict | None = None) -> dict:
    """Append one JSON line to bench/results.jsonl and return it."""
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    rec = {"bench": bench, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": git.stdout.strip() or None}
    rec |= {"host": platform.node(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "versions": versions()}
    rec |= {"model": MODEL_SHAPE, "settings": settings, "unit": unit}
    rec |= {"rates": {k: spread(v) | {"all": v} for k, v in rates.items()}}
    rec |= {"ratios": {k: spread(v) | {"all": v} for k, v in ratios.items()}, **(extra or {})}
    with RESULTS.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec
