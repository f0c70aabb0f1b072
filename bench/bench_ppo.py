"""PPO update: ours (ppo.py's update) vs TRL 1.12's PPOTrainer vs ours on N+'s fixed shapes.

    bench/.venv-trl112/bin/python bench/bench_ppo.py               # both sides in this one venv
    bench/.venv-trl112/bin/python bench/bench_ppo.py --updates 8 --batch-size 32
    .venv/bin/python bench/bench_ppo.py --no-trl                   # ours vs padded only

Both sides run in bench/.venv-trl112 (trl==1.12.0, the last release with PPOTrainer, in
trl.experimental.ppo) in one process: a callback at the end of each TRL update runs one update
of each of ours on the same queries, so the sequence is TRL, ours, pad512, TRL, ... Each starts
from the same saved weights and seed; the first update is warmup. Throughput = episodes
(queries) per second of one update; ratios pair the k-th updates.

One update, equal settings on both sides: rollout batch 16 queries (the same 16 real-sample
queries every update, left padded to the longest), 53 response tokens sampled at temperature
0.7 without stopping at EOS, truncate after the first EOS, reward model score (no-EOS penalty
1), per-token KL penalty 0.05, GAE (gamma 1, lambda 0.95), whitened advantages, 4 PPO epochs of
1 minibatch = 2 micro-batches of 8, clip 0.2 / 0.2, vf coef 0.1, lr 3e-6, fp32, generation and
no-grad forwards in chunks of 16; the same policy, reference, value and reward models.
- ours: `common.ppo_update_fn`, i.e. what ppo.main runs per update (`ppo_rollout`,
  `rewards_and_advantages`, `ppo_update`, `update_metrics`) on `ppo.load_models`' models.
- pad512: the same functions with the queries left padded to 512 (`pad_to`) and
  `trim_padding=False`, `pack=False`: every generation, forward and backward on 512 + 53 columns
  (the fixed-shape layout N+ used); the rest (length-sorted micro-batches, response-only LM
  head) unchanged.
- unpacked (`--unpacked`): ours with `pack=False`: forwards on padded rows, each chunk trimmed to
  its longest query: what packing saves.
- trl-fast: PPOTrainer with TRL's defaults except the settings above, fp32, gradient
  checkpointing off, num_sample_generations=0 (`--trl-variants default` keeps gradient
  checkpointing on, which PPOTrainer 1.12 never applies: the same computation).
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

TRL_VARIANTS = {"default": {}, "fast": dict(gradient_checkpointing=False)}


def ppo_config(args) -> ppo.Config:
    return ppo.Config(
        batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, forward_batch_size=args.forward_batch_size,
        generation_batch_size=args.forward_batch_size, num_minibatches=1, ppo_epochs=4, lr=3e-6, kl_coef=0.05, gamma=1.0,
        lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, temperature=0.7, response_length=args.response_length,
        whiten_rewards=False, no_eos_score=-1.0, device="cpu", seed=42,
    )  # fmt: skip


def flop_counts(query_lengths: list[int], cfg, vocab: int) -> dict:
    """FLOPs of one update as each side lays it out (multiply-add = 2, backward = 2x forward, every
    response `response_length` long, as with these random models). TRL/ours bounds the speed-up
    at equal FLOP/s: the work ours leaves out, not faster kernels.
    - TRL 1.12: every forward on the rollout left padded to its longest query; the LM head at
      every position of the reference and of the policy's training forward; rollout log-probs
      from the generation logits (no policy forward).
    - ours: chunks and micro-batches trimmed to their own longest query, packed forwards (CPU),
      the LM head only at response positions; rollout log-probs recomputed (first ratio 1)."""
    m = common.MODEL_SHAPE
    shape = sp.Shape("bench", hidden=m["hidden_size"], layers=m["num_hidden_layers"], heads=m["num_attention_heads"],
                     kv_heads=m["num_key_value_heads"], intermediate=m["intermediate_size"], vocab=vocab)  # fmt: skip
    R, B, epochs = cfg.response_length, len(query_lengths), cfg.ppo_epochs
    lengths = sorted(query_lengths, reverse=True)
    Q = lengths[0]

    def body(tokens_by_row):  # one forward, rows unpadded
        return sum(sp.forward_flops(shape, 1, n, 0) for n in tokens_by_row)

    head = 2 * shape.hidden * shape.vocab
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

    load = dict(dtype=torch.float32, attn_implementation="sdpa")
    policy, ref_policy = (AutoModelForCausalLM.from_pretrained(str(policy_dir), **load) for _ in range(2))
    value_model, reward_model = (AutoModelForSequenceClassification.from_pretrained(str(reward_dir), num_labels=1, **load) for _ in range(2))
    with tempfile.TemporaryDirectory() as out:
        config = PPOConfig(
            output_dir=out, per_device_train_batch_size=cfg.micro_batch_size, gradient_accumulation_steps=cfg.batch_size // cfg.micro_batch_size,
            num_mini_batches=1, local_rollout_forward_batch_size=cfg.forward_batch_size, total_episodes=cfg.batch_size * updates,
            num_ppo_epochs=cfg.ppo_epochs, learning_rate=cfg.lr, kl_coef=cfg.kl_coef, gamma=cfg.gamma, lam=cfg.lam, cliprange=cfg.cliprange,
            cliprange_value=cfg.cliprange_value, vf_coef=cfg.vf_coef, temperature=cfg.temperature, response_length=cfg.response_length,
            whiten_rewards=False, stop_token="eos", missing_eos_penalty=1.0, num_sample_generations=0, bf16=False, use_cpu=True,
            report_to="none", save_strategy="no", disable_tqdm=True, seed=cfg.seed, **TRL_VARIANTS[variant],
        )  # fmt: skip
        trainer = PPOTrainer(
            args=config, processing_class=tokenizer, model=policy, ref_model=ref_policy, reward_model=reward_model, value_model=value_model,
            train_dataset=datasets.Dataset.from_dict({"input_ids": queries}), callbacks=[common.interleave_callback(on_round)],
        )  # fmt: skip
        trainer.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", choices=["sample", "tiny"], default="sample")
    parser.add_argument("--batch-size", type=int, default=16, help="rollout batch (queries per update)")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--forward-batch-size", type=int, default=16, help="queries per generation / no-grad forward chunk")
    parser.add_argument("--response-length", type=int, default=53)
    parser.add_argument("--updates", type=int, default=5, help="timed updates per contender (after one warmup update)")
    parser.add_argument("--pad-to", type=int, default=512, help="query length of the padded baseline")
    parser.add_argument("--trl-variants", default="fast", choices=list(TRL_VARIANTS), help="the TRL configuration (one)")
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--no-padded", action="store_true")
    parser.add_argument("--unpacked", action="store_true", help="also ours with the forwards on padded rows (pack=False)")
    args = parser.parse_args()
    common.set_threads()
    runtime = setup_runtime("cpu")
    cfg = ppo_config(args)
    tokenizer = common.load_tokenizer(args.tokenizer)
    policy_dir, reward_dir = common.write_models(tokenizer, args.tokenizer)
    cfg = dataclasses.replace(cfg, sft_path=str(policy_dir), reward_path=str(reward_dir))
    ds = common.sft_data(tokenizer)
    indices = batch_indices(0, len(ds), cfg.batch_size, cfg.seed)
    rows = ds.select(sorted(indices, key=lambda i: -ds[i]["query_token_len"])).with_format("torch", columns=["query_token", "query_token_len"])
    query_lengths = [int(n) for n in rows["query_token_len"]]
    queries = [ids[-n:].tolist() for ids, n in zip(rows["query_token"], query_lengths)]
    contenders = {"ours": common.ppo_update_fn(cfg, tokenizer, rows[:], runtime)}
    if args.unpacked:
        contenders["unpacked"] = common.ppo_update_fn(cfg, tokenizer, rows[:], runtime, pack=False)
    if not args.no_padded:
        contenders[f"pad{args.pad_to}"] = common.ppo_update_fn(cfg, tokenizer, rows[:], runtime, pad_to=args.pad_to)
    variants = [] if args.no_trl else [args.trl_variants]
    print(f"PPO: {cfg.batch_size} queries per update, context {max(query_lengths)} tokens (lengths {common.length_summary(query_lengths)}), "
          f"{cfg.response_length} response tokens, micro-batch {cfg.micro_batch_size}, 1 + {args.updates} updates each, "
          f"contenders {', '.join(list(contenders) + [f'trl-{v}' for v in variants])}", flush=True)  # fmt: skip

    seconds: dict[str, list[float]] = {}

    def on_round(k: int, trl_seconds: float | None, variant: str | None = None) -> None:
        if variant:
            seconds.setdefault(f"trl-{variant}", []).append(trl_seconds)
        for name, update in contenders.items():
            t = time.perf_counter()
            update(k)
            seconds.setdefault(name, []).append(time.perf_counter() - t)
        print(f"  update {k}: " + ", ".join(f"{n} {ts[-1]:.1f}s" for n, ts in seconds.items()), flush=True)

    for variant in variants:  # TRL's run drives ours: a callback after each of its updates
        run_trl(variant, policy_dir, reward_dir, tokenizer, queries, cfg, args.updates + 1, lambda k, s, v=variant: on_round(k, s, v))
    for k in range(0 if variants else args.updates + 1):
        on_round(k, None)
    seconds = {n: ts[1:] for n, ts in seconds.items()}  # the first update (and its warm-up) is not counted
    rates = {n: [cfg.batch_size / t for t in ts] for n, ts in seconds.items()}
    ratios = {f"ours/{n}": [t / o for t, o in zip(ts, seconds["ours"])] for n, ts in seconds.items() if n != "ours"}
    common.print_table(f"PPO update ({cfg.batch_size} episodes, {cfg.response_length} tokens, {cfg.ppo_epochs} epochs)", "episodes/s", rates, ratios)
    flops = flop_counts(query_lengths, cfg, json.loads((policy_dir / "config.json").read_text())["vocab_size"])
    print("FLOPs of one update (GFLOP): " + "; ".join(f"{side} " + ", ".join(f"{k} {v / 1e9:,.0f}" for k, v in flops[side].items()) for side in ("ours", "trl"))
          + f"; TRL/ours {flops['ratio_trl_over_ours']:.2f} (the speed-up at equal FLOP/s)")  # fmt: skip
    settings = dict(vars(args), ppo=dataclasses.asdict(cfg), trl_variants={v: TRL_VARIANTS[v] for v in variants}, context_length=max(query_lengths))
    common.record("ppo", settings, "episodes/s", rates, ratios, {"seconds": seconds, "flops": flops})


if __name__ == "__main__":
    main()
