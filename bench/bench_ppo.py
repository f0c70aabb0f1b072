"""PPO update: ours (ppo.py's update) vs TRL 1.12's PPOTrainer vs ours on N+'s fixed shapes (bench/README.md).

    bench/.venv-trl112/bin/python bench/bench_ppo.py               # both sides in this one venv
    bench/.venv-trl112/bin/python bench/bench_ppo.py --updates 8 --batch-size 32
    .venv/bin/python bench/bench_ppo.py --no-trl                   # ours vs padded only

In one process: a callback at the end of each TRL update runs one update of each of ours on the same queries
(TRL, ours, pad512, TRL, ...), each from the same saved weights and seed; the first update is warmup.
Throughput = episodes (queries) per second of one update; ratios pair the k-th updates. Both sides take
ppo.Config's defaults (53 tokens at temperature 0.7, truncate after EOS, no-EOS penalty 1, KL 0.05, GAE (1,
0.95), 4 epochs of 1 minibatch, clips 0.2, vf coef 0.1, lr 3e-6) on the same 16 real-sample queries every
update, left padded to the longest, in 2 micro-batches of 8, fp32.
- ours: `common.ppo_update_fn`, what ppo.main runs per update, on `ppo.load_models`' models.
- pad512: the same with queries left padded to 512 (`pad_to`), `trim_padding=False`, `pack=False` (N+).
- unpacked (`--unpacked`): ours with `pack=False`: what packing saves.
- trl-fast: PPOTrainer with gradient checkpointing off (`--trl-variants default` keeps it on, which
  PPOTrainer 1.12 never applies: the same computation), num_sample_generations=0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time

import common
import spark_projection as sp
import torch

import ppo
from dgx_spark_summary_from_human_feedback.training import batch_indices, setup_runtime

TRL_VARIANTS = {"default": {}, "fast": {"gradient_checkpointing": False}}


def flop_counts(query_lengths: list[int], cfg, vocab: int) -> dict:
    """FLOPs of one update as each side lays it out (every response `response_length` long, as with these
    random models); TRL/ours bounds the speed-up at equal FLOP/s. TRL 1.12: every forward on the rollout
    left padded to its longest query, the LM head at every position of the reference and of the policy's
    training forward, rollout log-probs from the generation logits. Ours: chunks and micro-batches trimmed to
    their own longest query, packed forwards, the LM head only at response positions, rollout log-probs
    recomputed (first ratio 1)."""
    m = common.MODEL_SHAPE
    dims = [m[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")]
    shape = sp.Shape("bench", *dims, m["intermediate_size"], vocab)
    R, B, epochs = cfg.response_length, len(query_lengths), cfg.ppo_epochs
    lengths = sorted(query_lengths, reverse=True)
    Q, head = lengths[0], 2 * shape.hidden * shape.vocab

    def body(tokens_by_row):  # one forward, rows unpadded, no LM head
        return sum(sp.forward_flops(shape, 1, n, 0) for n in tokens_by_row)

    decode = sum(sp.decode_step_flops(shape, B, Q + t) for t in range(R - 1))
    chunks = [lengths[s : s + cfg.forward_batch_size] for s in range(0, B, cfg.forward_batch_size)]
    padded, real = [Q + R] * B, [n + R for n in lengths]
    trl = {
        "generation": body([Q] * B) + B * head + decode,
        "rollout_forwards": 3 * body(padded) + head * B * (Q + R),  # reference (full head), value, reward
        "training": epochs * 3 * (2 * body(padded) + head * B * (Q + R)),  # policy (full head) + value
    }
    ours = {
        "generation": sum(body([c[0]] * len(c)) for c in chunks) + B * head + decode,
        "rollout_forwards": 4 * body(real) + 2 * head * B * R,  # policy, reference (response head), value, reward
        "training": epochs * 3 * (2 * body(real) + head * B * R),
    }
    return {"trl": trl, "ours": ours, "ratio_trl_over_ours": sum(trl.values()) / sum(ours.values())}


def run_trl(variant, policy_dir, reward_dir, tokenizer, queries, cfg, updates, on_round) -> None:
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    load = {"dtype": torch.float32, "attn_implementation": "sdpa"}
    models = {name: AutoModelForCausalLM.from_pretrained(str(policy_dir), **load) for name in ("model", "ref_model")}
    for name in ("reward_model", "value_model"):
        models[name] = AutoModelForSequenceClassification.from_pretrained(str(reward_dir), num_labels=1, **load)
    c = cfg
    settings = dict(num_ppo_epochs=c.ppo_epochs, learning_rate=c.lr, kl_coef=c.kl_coef, gamma=c.gamma, lam=c.lam)
    settings |= dict(cliprange=c.cliprange, cliprange_value=c.cliprange_value, vf_coef=c.vf_coef)
    settings |= dict(temperature=c.temperature, response_length=c.response_length, whiten_rewards=c.whiten_rewards)
    settings |= dict(stop_token="eos", missing_eos_penalty=1.0, num_mini_batches=c.num_minibatches)
    accumulation = c.batch_size // c.micro_batch_size
    settings |= dict(per_device_train_batch_size=c.micro_batch_size, gradient_accumulation_steps=accumulation)
    settings |= dict(local_rollout_forward_batch_size=c.forward_batch_size, total_episodes=c.batch_size * updates)
    settings |= dict(num_sample_generations=0, bf16=False, use_cpu=True, report_to="none", save_strategy="no")
    with tempfile.TemporaryDirectory() as out:
        config = PPOConfig(output_dir=out, seed=c.seed, disable_tqdm=True, **settings, **TRL_VARIANTS[variant])
        callbacks = [common.interleave_callback(on_round)]
        models |= {"train_dataset": datasets.Dataset.from_dict({"input_ids": queries}), "callbacks": callbacks}
        PPOTrainer(args=config, processing_class=tokenizer, **models).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", choices=["sample", "tiny"], default="sample")
    parser.add_argument("--batch-size", type=int, default=16, help="rollout batch (queries per update)")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--forward-batch-size", type=int, default=16, help="queries per generation / forward chunk")
    parser.add_argument("--response-length", type=int, default=53)
    parser.add_argument("--updates", type=int, default=5, help="timed updates per contender (after one warmup)")
    parser.add_argument("--pad-to", type=int, default=512, help="query length of the padded baseline")
    parser.add_argument("--trl-variants", default="fast", choices=list(TRL_VARIANTS), help="the TRL configuration")
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--no-padded", action="store_true")
    parser.add_argument("--unpacked", action="store_true", help="also ours with forwards on padded rows")
    args = parser.parse_args()
    common.set_threads()
    runtime, tokenizer = setup_runtime("cpu"), common.load_tokenizer(args.tokenizer)
    policy_dir, reward_dir = common.write_models(tokenizer, args.tokenizer)
    sizes = dict(batch_size=args.batch_size, micro_batch_size=args.micro_batch_size)
    sizes |= dict(forward_batch_size=args.forward_batch_size, generation_batch_size=args.forward_batch_size)
    sizes["response_length"] = args.response_length
    cfg = ppo.Config(**sizes, device="cpu", sft_path=str(policy_dir), reward_path=str(reward_dir))
    ds = common.sft_data(tokenizer)
    indices = sorted(batch_indices(0, len(ds), cfg.batch_size, cfg.seed), key=lambda i: -ds[i]["query_token_len"])
    rows = ds.select(indices).with_format("torch", columns=["query_token", "query_token_len"])
    query_lengths = [int(n) for n in rows["query_token_len"]]
    queries = [ids[-n:].tolist() for ids, n in zip(rows["query_token"], query_lengths)]
    contenders = {"ours": common.ppo_update_fn(cfg, tokenizer, rows[:], runtime)}
    if args.unpacked:
        contenders["unpacked"] = common.ppo_update_fn(cfg, tokenizer, rows[:], runtime, pack=False)
    if not args.no_padded:
        contenders[f"pad{args.pad_to}"] = common.ppo_update_fn(cfg, tokenizer, rows[:], runtime, pad_to=args.pad_to)
    variants = [] if args.no_trl else [args.trl_variants]
    names = ", ".join(list(contenders) + [f"trl-{v}" for v in variants])
    context = f"context {max(query_lengths)} tokens (lengths {common.length_summary(query_lengths)})"
    print(f"PPO: {cfg.batch_size} queries per update, {context}, {cfg.response_length} response tokens, ", end="")
    print(f"micro-batch {cfg.micro_batch_size}, 1 + {args.updates} updates each, contenders {names}", flush=True)
    seconds: dict[str, list[float]] = {}

    def on_round(k: int, trl_seconds: float | None, variant: str | None = None) -> None:
        if variant:
            seconds.setdefault(f"trl-{variant}", []).append(trl_seconds)
        for name, update in contenders.items():
            t = time.perf_counter()
            update(k)
            seconds.setdefault(name, []).append(time.perf_counter() - t)
        print(f"  update {k}: " + ", ".join(f"{n} {ts[-1]:.1f}s" for n, ts in seconds.items()), flush=True)

    for v in variants:  # TRL's run drives ours: a callback after each of its updates
        run_trl(v, policy_dir, reward_dir, tokenizer, queries, cfg, args.updates + 1, lambda k, s: on_round(k, s, v))
    for k in range(0 if variants else args.updates + 1):
        on_round(k, None)
    seconds = {n: ts[1:] for n, ts in seconds.items()}  # the first update (and its warm-up) is not counted
    rates = {n: [cfg.batch_size / t for t in ts] for n, ts in seconds.items()}
    ratios = {f"ours/{n}": [t / o for t, o in zip(ts, seconds["ours"])] for n, ts in seconds.items() if n != "ours"}
    title = f"PPO update ({cfg.batch_size} episodes, {cfg.response_length} tokens, {cfg.ppo_epochs} epochs)"
    common.print_table(title, "episodes/s", rates, ratios)
    flops = flop_counts(query_lengths, cfg, json.loads((policy_dir / "config.json").read_text())["vocab_size"])
    sides = [f"{side} " + ", ".join(f"{k} {v / 1e9:,.0f}" for k, v in flops[side].items()) for side in ("ours", "trl")]
    ratio = f"TRL/ours {flops['ratio_trl_over_ours']:.2f} (the speed-up at equal FLOP/s)"
    print(f"FLOPs of one update (GFLOP): {'; '.join(sides)}; {ratio}")
    settings = dict(vars(args), ppo=dataclasses.asdict(cfg), trl_variants={v: TRL_VARIANTS[v] for v in variants})
    settings["context_length"] = max(query_lengths)
    common.record("ppo", settings, "episodes/s", rates, ratios, {"seconds": seconds, "flops": flops})


if __name__ == "__main__":
    main()
