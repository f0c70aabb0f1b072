"""GRPO and RLOO updates: ours (grpo.py's update) vs TRL's GRPOTrainer and RLOOTrainer (latest TRL).

    bench/.venv-trl/bin/python bench/bench_grpo.py                       # GRPO, then RLOO
    bench/.venv-trl/bin/python bench/bench_grpo.py --algorithms rloo --updates 5

Both sides in one process (bench/.venv-trl): a callback after every `epochs`-th TRL optimizer step
(one TRL update: generation, scoring, no-grad forwards, `epochs` optimizer steps) runs one update of
ours on the same queries, so the sequence is TRL, ours, TRL, ... The first update is warmup.
Throughput = episodes (responses) per second of one whole update; ratios pair the k-th updates.

Equal settings: the same 4 real-sample queries every update, 4 responses to each (16 episodes),
53 new tokens (ours always 53, EOS not special; TRL stops at EOS, which the random policy almost
never samples), temperature 0.7 (no top-k / top-p), 4 epochs (TRL: num_iterations) of 1 minibatch =
2 micro-batches of 8, clip 0.2, lr 3e-6 constant, AdamW (0.9, 0.999, eps 1e-5), grad clip 1.0, KL
coefficient 0.05, fp32 on CPU, no vLLM, no gradient checkpointing, dropout off; the same random
policy (also the reference) and reward model from common.py (TRL reads the latter as a sequence
classifier).
- GRPO: advantages (r - mean) / (std + 1e-4) per group, KL as GRPO's k3 loss term; ours
  `--kl-in loss`, TRL loss_type "dapo" (sum over the accumulated batch's tokens / their count, as ours).
- RLOO: r - mean of the other k - 1, KL (log-ratio summed over the response) in the return; ours
  `--kl-in reward`; TRL's ratio and clip are per sequence, ours per token (the same forwards).
- ours: `grpo.load_models`, then per update what grpo.main runs: `grpo_rollout`,
  `returns_and_advantages`, `grpo_update`, `update_metrics`.
- TRL: prompts are our queries decoded (TRL tokenizes text), the reward model reads prompt +
  completion re-tokenized, right padded; every forward left pads to the generation batch's longest
  prompt; on CPU its fused LM head scores every position (`flop_counts`), ours response tokens only.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import tempfile
import time

import common
import spark_projection as sp
import torch

import grpo
from dgx_spark_summary_from_human_feedback.training import batch_indices, setup_runtime

# equal on both sides (run_trl maps them to TRL's names); the KL sits where each algorithm's TRL trainer puts it
LOSS = dict(update_epochs=4, num_minibatches=1, lr=3e-6, kl_coef=0.05, cliprange=0.2, temperature=0.7)
ALGORITHMS = {"grpo": dict(advantage="grpo", kl_in="loss"), "rloo": dict(advantage="rloo", kl_in="reward")}


def ours_update_fn(cfg: grpo.Config, tokenizer, rows: dict, runtime):
    """`update(k)`: one update of grpo.py's on the fixed query rows, as grpo.main runs it."""
    models = grpo.load_models(cfg, tokenizer, runtime)
    sample_generator = torch.Generator(device=runtime.device).manual_seed(cfg.seed)
    shuffle_generator = torch.Generator().manual_seed(cfg.seed)
    group_lengths = rows["query_token_len"].repeat_interleave(cfg.group_size)
    train = functools.partial(
        grpo.grpo_update, models.policy_logits, models.optimizer, list(models.policy.parameters())
    )

    def update(k: int) -> dict:
        batch = grpo.grpo_rollout(models, rows, cfg, tokenizer, runtime, sample_generator)
        advantages, returns, kl, non_score_rewards = grpo.returns_and_advantages(batch, cfg)
        stats = train(batch, advantages, group_lengths, cfg, runtime, shuffle_generator, k, common.CACHE)
        return grpo.update_metrics(batch, advantages, returns, kl, non_score_rewards, stats, cfg.group_size, runtime)

    return update


def run_trl(
    algorithm: str, policy_dir, reward_dir, tokenizer, prompts: list[str], cfg, updates: int, on_update
) -> None:
    """TRL's trainer for `updates` updates; `on_update(k, seconds)` after each (its `epochs` steps)."""
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    load = dict(dtype=torch.float32, attn_implementation="sdpa")
    policy = AutoModelForCausalLM.from_pretrained(str(policy_dir), **load)
    reward_model = AutoModelForSequenceClassification.from_pretrained(str(reward_dir), num_labels=1, **load)
    Config, Trainer = (trl.GRPOConfig, trl.GRPOTrainer) if algorithm == "grpo" else (trl.RLOOConfig, trl.RLOOTrainer)
    extra = dict(loss_type="dapo", scale_rewards="group") if algorithm == "grpo" else dict(normalize_advantages=False)
    seconds = []

    def on_step(k: int, s: float) -> None:  # one TRL optimizer step; an update is `epochs` of them
        seconds.append(s)
        if (k + 1) % cfg.update_epochs == 0:
            on_update(k // cfg.update_epochs, sum(seconds[-cfg.update_epochs :]))

    batch = dict(per_device_train_batch_size=cfg.micro_batch_size, shuffle_dataset=False)
    batch |= dict(
        gradient_accumulation_steps=cfg.batch_size // cfg.micro_batch_size, max_steps=updates * cfg.update_epochs
    )
    sampling = dict(num_generations=cfg.group_size, max_completion_length=cfg.response_length, top_k=0, top_p=1.0)
    loss = dict(temperature=cfg.temperature, num_iterations=cfg.update_epochs, beta=cfg.kl_coef, epsilon=cfg.cliprange)
    adam = dict(learning_rate=cfg.lr, lr_scheduler_type="constant", adam_epsilon=1e-5, max_grad_norm=cfg.grad_clip)
    run = dict(disable_dropout=True, gradient_checkpointing=False, bf16=False, use_cpu=True, seed=cfg.seed)
    run |= dict(report_to="none", save_strategy="no", logging_steps=10_000, disable_tqdm=True, log_completions=False)
    with tempfile.TemporaryDirectory() as out:
        config = Config(output_dir=out, **batch, **sampling, **loss, **adam, **run, **extra)
        dataset = datasets.Dataset.from_dict({"prompt": prompts * updates})  # sequential: the same queries every update
        rewards = dict(reward_funcs=reward_model, reward_processing_classes=tokenizer)
        callbacks = [common.interleave_callback(on_step)]
        Trainer(
            model=policy, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks, **rewards
        ).train()


def flop_counts(query_lengths: list[int], cfg, vocab: int) -> dict:
    """FLOPs of one update as each side lays it out (multiply-add 2, backward 2x forward, every
    response `response_length` long). Both sample with a KV cache from the batch left padded to its
    longest query, recompute the old and reference log-probs and score once. The forwards differ:
    - TRL pads every row to the longest query + response, and on CPU its fused LM head
      (trl.kernels.chunked_logprob) scores every position, not only the completion's: it keeps
      only the valid positions where Triton runs (CUDA, XPU); its backward recomputes the logits.
    - ours packs the real tokens (CPU) and runs the LM head at response positions only."""
    m = common.MODEL_SHAPE
    layout = dict(layers=m["num_hidden_layers"], heads=m["num_attention_heads"], kv_heads=m["num_key_value_heads"])
    shape = sp.Shape("bench", hidden=m["hidden_size"], intermediate=m["intermediate_size"], vocab=vocab, **layout)
    R, head, Q = cfg.response_length, 2 * shape.hidden * shape.vocab, max(query_lengths)
    lengths = [n for n in query_lengths for _ in range(cfg.group_size)]
    B, epochs = len(lengths), cfg.update_epochs

    def body(tokens_by_row):  # one forward, rows unpadded, no LM head
        return sum(sp.forward_flops(shape, 1, n, 0) for n in tokens_by_row)

    generation = body([Q] * B) + B * head + sum(sp.decode_step_flops(shape, B, Q + t) for t in range(R - 1))
    padded, packed = body([Q + R] * B), body([n + R for n in lengths])
    trl_head, our_head = head * B * (Q + R), head * B * R  # one forward's LM head
    trl = dict(generation=generation, rollout_forwards=3 * padded + 2 * trl_head)
    trl["training"] = epochs * (3 * padded + 4 * trl_head)  # + 1: the head's backward recomputes its forward
    ours = dict(
        generation=generation, rollout_forwards=3 * packed + 2 * our_head, training=epochs * 3 * (packed + our_head)
    )
    return {"trl": trl, "ours": ours, "ratio_trl_over_ours": sum(trl.values()) / sum(ours.values())}


def bench(
    algorithm: str, args, tokenizer, runtime, policy_dir, reward_dir, rows, prompts: list[str], settings: dict
) -> None:
    """One algorithm: TRL's trainer driving ours, interleaved; a table and a record."""
    sizes = dict(group_size=args.group_size, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size)
    sizes |= dict(forward_batch_size=args.micro_batch_size, generation_batch_size=args.batch_size)
    paths = dict(sft_path=str(policy_dir), reward_path=str(reward_dir), response_length=args.response_length)
    cfg = grpo.Config(**paths, **sizes, **LOSS, **ALGORITHMS[algorithm], device="cpu", seed=42)
    ours = ours_update_fn(cfg, tokenizer, rows, runtime)
    seconds: dict[str, list[float]] = {"trl": [], "ours": []}

    def on_update(k: int, trl_seconds: float) -> None:
        t = time.perf_counter()
        ours(k)
        seconds["ours"].append(time.perf_counter() - t)
        seconds["trl"].append(trl_seconds)
        print(f"  {algorithm} update {k}: TRL {trl_seconds:.1f}s, ours {seconds['ours'][-1]:.1f}s", flush=True)

    run_trl(algorithm, policy_dir, reward_dir, tokenizer, prompts, cfg, args.updates + 1, on_update)
    seconds = {n: ts[1:] for n, ts in seconds.items()}  # the first update (and its warm-up) is not counted
    rates = {n: [cfg.batch_size / t for t in ts] for n, ts in seconds.items()}
    ratios = {"ours/trl": [t / o for t, o in zip(seconds["trl"], seconds["ours"])]}
    shape = f"{cfg.batch_size} episodes = {cfg.batch_size // cfg.group_size} x {cfg.group_size}, {cfg.response_length} tokens"
    common.print_table(f"{algorithm.upper()} update ({shape}, {cfg.update_epochs} epochs)", "episodes/s", rates, ratios)
    flops = flop_counts(settings["query_lengths"], cfg, common.model_config(tokenizer).vocab_size)
    for side in ("ours", "trl"):
        print(f"GFLOP per update, {side}: " + ", ".join(f"{k} {v / 1e9:,.1f}" for k, v in flops[side].items()))
    print(f"TRL/ours FLOPs {flops['ratio_trl_over_ours']:.2f} (the speed-up at equal FLOP/s)")
    settings = dict(vars(args), **settings, algorithm=algorithm, grpo=dataclasses.asdict(cfg))
    common.record(algorithm, settings, "episodes/s", rates, ratios, {"seconds": seconds, "flops": flops})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", default="grpo,rloo")
    parser.add_argument("--tokenizer", choices=["sample", "tiny"], default="sample")
    parser.add_argument("--batch-size", type=int, default=16, help="responses per update")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--response-length", type=int, default=53)
    parser.add_argument("--updates", type=int, default=3, help="timed updates per side (after one warmup update)")
    args = parser.parse_args()
    common.set_threads()
    runtime = setup_runtime("cpu")
    tokenizer = common.load_tokenizer(args.tokenizer)
    policy_dir, reward_dir = common.write_models(tokenizer, args.tokenizer)
    ds = common.sft_data(tokenizer)
    indices = batch_indices(0, len(ds), args.batch_size // args.group_size, 42)
    indices = sorted(indices, key=lambda i: -ds[i]["query_token_len"])  # longest first, as grpo.main
    rows = ds.select(indices).with_format("torch", columns=["query_token", "query_token_len"])[:]
    query_lengths = [int(n) for n in rows["query_token_len"]]
    prompts = [tokenizer.decode(ids[-n:]) for ids, n in zip(rows["query_token"], query_lengths)]
    retokenized = [len(tokenizer(p)["input_ids"]) for p in prompts]
    print(
        f"queries of {query_lengths} tokens (TRL re-tokenizes them to {retokenized}), {args.group_size} responses each"
    )
    settings = dict(query_lengths=query_lengths, trl_query_lengths=retokenized)
    for algorithm in args.algorithms.split(","):
        bench(algorithm, args, tokenizer, runtime, policy_dir, reward_dir, rows, prompts, settings)


if __name__ == "__main__":
    main()
