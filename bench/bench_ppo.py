"""PPO update: ours (ppo.py) vs TRL 1.12's PPOTrainer vs our own pad-to-512-query baseline.

    bench/.venv-trl112/bin/python bench/bench_ppo.py               # both sides in this one venv
    bench/.venv-trl112/bin/python bench/bench_ppo.py --updates 8 --batch-size 32
    .venv/bin/python bench/bench_ppo.py --no-trl                   # ours vs padded only

Both sides run in bench/.venv-trl112 (trl==1.12.0, the last release with PPOTrainer, in
trl.experimental.ppo; the project is installed there too, with the same torch and transformers
as the project venv), in one process, taking turns update by update: each contender runs in its
own thread, and at the end of every PPO update hands the turn to the next one and waits, so
only one computes at a time and the sequence is ours, padded, TRL, ours, padded, TRL, ...
Each starts from the same saved weights and seed; its first update (model loading included)
is warmup, every later one is timed from getting the turn to the end of the update.
Throughput = episodes (queries) per second of one update; ratios pair the k-th updates.

One update, equal settings on both sides: rollout batch 16 queries (the same 16 real-sample
queries every update, left padded to the longest of them), 53 response tokens sampled at
temperature 0.7 without stopping at EOS, truncate after the first EOS, reward model score
(no-EOS penalty 1), per-token KL penalty 0.05 (k1), GAE (gamma 1, lambda 0.95), whitened
advantages, 4 PPO epochs of 1 minibatch = 2 micro-batches of 8 (gradient accumulation), clip
0.2 / 0.2, vf coef 0.1, lr 3e-6, fp32, generation and no-grad forwards in chunks of 16. Same policy,
reference, value (from the reward model) and reward models (bench/common.py).
- ours: `ppo.main` itself, unmodified, with checkpoints and sample tables pushed past the run;
  an update ends at its `Logger.log` call.
- pad512: `ppo.main` with `ppo.rollout` wrapped to left-pad the queries to 512 tokens first and
  `ppo.first_real_column` (its per-chunk trimming of leading padding) returning 0 and the
  forwards on padded rows (`models.hidden_states(pack=False)`), so every generation, forward and
  backward runs on 512 + 53 = 565 columns (the fixed-shape layout N+ used). The rest of ppo.py
  (length-sorted micro-batches, response-only LM head) is unchanged.
- unpacked (`--unpacked`): ours with the forwards on padded rows (`pack=False`), each chunk and
  micro-batch left padded to its longest query: what packing saves.
- trl-fast: PPOTrainer with TRL's defaults except the settings above, fp32, gradient
  checkpointing off and num_sample_generations=0 (its periodic sample table needs an eval set;
  ours is switched off too); an update ends at its on_step_end callback. `--trl-variants
  default` keeps gradient_checkpointing=True, which PPOTrainer 1.12 never applies (its own
  train() does not call gradient_checkpointing_enable): the same computation.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import tempfile
import threading
import time
from pathlib import Path

import common  # noqa: F401  (offline environment and sys.path first)
import spark_projection as sp
import torch

import ppo
from dgx_spark_summary_from_human_feedback import models
from dgx_spark_summary_from_human_feedback.training import batch_indices

SEED = 42


def settings(args) -> dict:
    return dict(
        batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, forward_batch_size=args.forward_batch_size, generation_batch_size=args.forward_batch_size,
        num_minibatches=1, ppo_epochs=4, lr=3e-6, kl_coef=0.05, gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
        temperature=0.7, response_length=args.response_length, whiten_rewards=False,
    )  # fmt: skip


def query_dataset(tokenizer, batch_size: int, cache: Path) -> tuple[str, list[list[int]]]:
    """The rollout queries: one fixed batch of real-sample posts, saved as a processed dataset
    (ppo.py reads it as is) and returned as unpadded ids (TRL's input)."""
    import datasets

    ds = common.sft_data(tokenizer)
    rows = ds.select(batch_indices(0, len(ds), batch_size, SEED))
    path = cache / "queries"
    datasets.DatasetDict({"train": rows}).save_to_disk(str(path))
    queries = [ids[-n:] for ids, n in zip(rows["query_token"], rows["query_token_len"])]
    return str(path), queries


def flop_counts(queries: list[list[int]], args, vocab: int) -> dict:
    """FLOPs of one update as each side lays it out (multiply-add = 2, backward = 2x forward, no
    EOS: every response is `response_length` long, as with these random models). The ratio
    TRL/ours bounds the speed-up at equal FLOP/s: the work ours leaves out, not faster kernels.
    - TRL 1.12: every forward on the rollout left padded to its longest query; the LM head at
      every position of the reference forward and of the policy's training forward; rollout
      log-probs from the generation logits (no policy forward).
    - ours: chunks and micro-batches trimmed to their own longest query, forwards on packed real
      tokens (CPU), the LM head only at the response positions; the policy's rollout log-probs
      recomputed (N+: the first ratio is exactly 1)."""
    shape = sp.Shape("bench", hidden=common.MODEL_SHAPE["hidden_size"], layers=common.MODEL_SHAPE["num_hidden_layers"], heads=common.MODEL_SHAPE["num_attention_heads"],
                     kv_heads=common.MODEL_SHAPE["num_key_value_heads"], intermediate=common.MODEL_SHAPE["intermediate_size"], vocab=vocab)  # fmt: skip
    R, B, epochs = args.response_length, len(queries), 4
    lengths = sorted((len(q) for q in queries), reverse=True)
    Q = lengths[0]

    def body(tokens_by_row):  # one forward, rows unpadded
        return sum(sp.forward_flops(shape, 1, n, 0) for n in tokens_by_row)

    head = 2 * shape.hidden * shape.vocab
    decode = sum(sp.decode_step_flops(shape, B, Q + t) for t in range(R - 1))
    chunks = [lengths[s : s + args.forward_batch_size] for s in range(0, B, args.forward_batch_size)]
    padded_rows = [Q + R] * B
    trl = {
        "generation": body([Q] * B) + B * head + decode,
        "rollout_forwards": 3 * body(padded_rows) + head * B * (Q + R),  # reference (full head), value, reward
        "training": epochs * 3 * (2 * body(padded_rows) + head * B * (Q + R)),  # policy (full head) + value
    }
    ours = {
        "generation": sum(body([c[0]] * len(c)) for c in chunks) + B * head + decode,
        "rollout_forwards": 4 * body([n + R for n in lengths]) + 2 * head * B * R,  # policy, reference (response head), value, reward
        "training": epochs * 3 * (2 * body([n + R for n in lengths]) + head * B * R),
    }
    return {"trl": trl, "ours": ours, "ratio_trl_over_ours": sum(trl.values()) / sum(ours.values())}


class Turns:
    """Round-robin turns between contender threads: one computes, the others wait."""

    def __init__(self, names: list[str], threads: int):
        self.names, self.threads = names, threads
        self.gates = {n: threading.Semaphore(0) for n in names}
        self.alive = set(names)
        self.lock = threading.Lock()
        self.started: dict[str, float] = {}
        self.seconds: dict[str, list[float]] = {n: [] for n in names}

    def begin(self, name: str) -> None:
        torch.set_num_threads(self.threads)  # per thread: the setting is not inherited
        self.gates[name].acquire()
        self.started[name] = time.perf_counter()

    def update_done(self, name: str) -> None:
        """End of one update: record its time, hand over, wait for the next turn."""
        self.seconds[name].append(time.perf_counter() - self.started[name])
        self._hand_over(name)
        self.gates[name].acquire()
        self.started[name] = time.perf_counter()

    def finish(self, name: str) -> None:
        with self.lock:
            self.alive.discard(name)
        self._hand_over(name)

    def _hand_over(self, name: str) -> None:
        with self.lock:
            i = self.names.index(name)
            for k in range(1, len(self.names) + 1):
                nxt = self.names[(i + k) % len(self.names)]
                if nxt in self.alive:
                    self.gates[nxt].release()
                    return

    def run(self, targets: dict[str, callable]) -> None:
        errors = []

        def main(name, fn):
            self.begin(name)
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported after the others finish
                errors.append((name, e))
            finally:
                self.finish(name)

        threads = [threading.Thread(target=main, args=(n, targets[n]), name=n) for n in self.names]
        for t in threads:
            t.start()
        self.gates[self.names[0]].release()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"{errors[0][0]} failed") from errors[0][1]


@contextlib.contextmanager
def patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


@contextlib.contextmanager
def ours_hooks(turns: Turns, pad_to: dict[str, int], unpacked: tuple[str, ...] = ()):
    """ppo.py's names, patched for every thread at once; each thread finds its own behaviour by name."""
    real_rollout = ppo.rollout

    class TurnLogger(ppo.Logger):
        def log(self, metrics, step):
            if "episode" in metrics:  # the per-update record: the update is over
                turns.update_done(threading.current_thread().name)
            super().log(metrics, step)

    def rollout(policy, ref_policy, value_model, score_fn, queries, query_mask, cfg, tokenizer, *rest):
        width = pad_to.get(threading.current_thread().name)
        if width:  # the padded baseline: left-pad the queries to `width` before anything runs on them
            queries = torch.nn.functional.pad(queries, (width - queries.shape[1], 0), value=tokenizer.pad_token_id)
            query_mask = torch.nn.functional.pad(query_mask, (width - query_mask.shape[1], 0), value=0)
        return real_rollout(policy, ref_policy, value_model, score_fn, queries, query_mask, cfg, tokenizer, *rest)

    class QuietBar:  # ppo.main's progress bar, silenced: several threads would print over each other
        def __init__(self, iterable, **kwargs):
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)

        def set_postfix(self, *args, **kwargs):
            pass

    with contextlib.ExitStack() as stack:
        for name, value in (("Logger", TurnLogger), ("rollout", rollout), ("write_samples", lambda *a, **k: None), ("tqdm", QuietBar)):
            stack.enter_context(patched(ppo, name, value))
        if hasattr(ppo, "first_real_column"):  # ppo.py trims all-padding leading columns per chunk: not in the padded baseline
            real_first = ppo.first_real_column
            stack.enter_context(patched(ppo, "first_real_column", lambda mask: 0 if pad_to.get(threading.current_thread().name) else real_first(mask)))
        if "pack" in inspect.signature(models.hidden_states).parameters:  # forwards on packed rows: not in the padded ones
            real_hidden = models.hidden_states

            def hidden_states(model, input_ids, attention_mask, pack=None):
                name = threading.current_thread().name
                return real_hidden(model, input_ids, attention_mask, pack=False if name in unpacked or pad_to.get(name) else pack)

            for module in (models, ppo):
                stack.enter_context(patched(module, "hidden_states", hidden_states))
        yield


def ours_target(policy_dir, reward_dir, dataset, args):
    def run() -> None:
        fields = {f.name for f in dataclasses.fields(ppo.Config)}
        with tempfile.TemporaryDirectory() as out:
            overrides = dict(
                settings(args), sft_path=str(policy_dir), reward_path=str(reward_dir), dataset=dataset, output_dir=out,
                total_episodes=args.batch_size * (args.updates + 1), save_interval=10**9, sample_interval=10**9, device="cpu", seed=SEED,
            )  # fmt: skip
            ppo.main(ppo.Config(**{k: v for k, v in overrides.items() if k in fields}))

    return run


TRL_VARIANTS = {"default": {}, "fast": dict(gradient_checkpointing=False)}


def trl_target(variant, policy_dir, reward_dir, tokenizer, queries, args, turns: Turns):
    def run() -> None:
        import datasets
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        name = threading.current_thread().name

        class Turn(TrainerCallback):
            def on_step_end(self, *a, **k):
                turns.update_done(name)

        load = dict(dtype=torch.float32, attn_implementation="sdpa")
        policy = AutoModelForCausalLM.from_pretrained(str(policy_dir), **load)
        ref_policy = AutoModelForCausalLM.from_pretrained(str(policy_dir), **load)
        value_model = AutoModelForSequenceClassification.from_pretrained(str(reward_dir), num_labels=1, **load)
        reward_model = AutoModelForSequenceClassification.from_pretrained(str(reward_dir), num_labels=1, **load)
        s = settings(args)
        with tempfile.TemporaryDirectory() as out:
            config = PPOConfig(
                output_dir=out, per_device_train_batch_size=args.micro_batch_size, gradient_accumulation_steps=args.batch_size // args.micro_batch_size,
                num_mini_batches=1, local_rollout_forward_batch_size=s["forward_batch_size"], total_episodes=args.batch_size * (args.updates + 1),
                num_ppo_epochs=s["ppo_epochs"], learning_rate=s["lr"], kl_coef=s["kl_coef"], gamma=s["gamma"], lam=s["lam"], cliprange=s["cliprange"],
                cliprange_value=s["cliprange_value"], vf_coef=s["vf_coef"], temperature=s["temperature"], response_length=s["response_length"],
                whiten_rewards=False, stop_token="eos", missing_eos_penalty=1.0, num_sample_generations=0, bf16=False, use_cpu=True,
                report_to="none", save_strategy="no", disable_tqdm=True, seed=SEED, **TRL_VARIANTS[variant],
            )  # fmt: skip
            trainer = PPOTrainer(
                args=config, processing_class=tokenizer, model=policy, ref_model=ref_policy, reward_model=reward_model, value_model=value_model,
                train_dataset=datasets.Dataset.from_dict({"input_ids": queries}), callbacks=[Turn()],
            )  # fmt: skip
            trainer.train()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", choices=["sample", "tiny"], default="sample")
    parser.add_argument("--batch-size", type=int, default=16, help="rollout batch (queries per update)")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--forward-batch-size", type=int, default=16, help="queries per generation / no-grad forward chunk (TRL: local_rollout_forward_batch_size)")
    parser.add_argument("--response-length", type=int, default=53)
    parser.add_argument("--updates", type=int, default=5, help="timed updates per contender (after one warmup update)")
    parser.add_argument("--pad-to", type=int, default=512, help="query length of the padded baseline")
    parser.add_argument("--trl-variants", default="fast")
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--no-padded", action="store_true")
    parser.add_argument("--unpacked", action="store_true", help="also ours with the forwards on padded rows (models.hidden_states(pack=False))")
    args = parser.parse_args()
    threads = common.set_threads()

    tokenizer = common.load_tokenizer(args.tokenizer)
    policy_dir, reward_dir = common.write_models(tokenizer, args.tokenizer)
    variants = [] if args.no_trl else [v for v in args.trl_variants.split(",") if v]
    names = ["ours"] + (["unpacked"] if args.unpacked else []) + ([] if args.no_padded else [f"pad{args.pad_to}"]) + [f"trl-{v}" for v in variants]
    turns = Turns(names, threads)
    with tempfile.TemporaryDirectory() as cache:
        dataset, queries = query_dataset(tokenizer, args.batch_size, Path(cache))
        print(f"PPO: {args.batch_size} queries per update, context {max(map(len, queries))} tokens (lengths {common.length_summary(map(len, queries))}), "
              f"{args.response_length} response tokens, micro-batch {args.micro_batch_size}, 1 + {args.updates} updates each, turns {' -> '.join(names)}, "
              f"threads {threads}", flush=True)  # fmt: skip
        targets = {"ours": ours_target(policy_dir, reward_dir, dataset, args)}
        for name in names[1:]:
            if not name.startswith("trl-"):
                targets[name] = ours_target(policy_dir, reward_dir, dataset, args)
        for v in variants:
            targets[f"trl-{v}"] = trl_target(v, policy_dir, reward_dir, tokenizer, queries, args, turns)
        with ours_hooks(turns, {f"pad{args.pad_to}": args.pad_to}, unpacked=("unpacked",)):
            turns.run(targets)
    seconds = {n: ts[1:] for n, ts in turns.seconds.items()}  # the first update (and model loading) is warmup
    for k in range(len(seconds["ours"])):
        print(f"  update {k + 1}: " + ", ".join(f"{n} {ts[k]:.1f}s" for n, ts in seconds.items() if k < len(ts)))
    rates = {n: [args.batch_size / t for t in ts] for n, ts in seconds.items()}
    ratios = {f"ours/{n}": [t / o for t, o in zip(ts, seconds["ours"])] for n, ts in seconds.items() if n != "ours"}
    common.print_table(f"PPO update ({args.batch_size} episodes, {args.response_length} tokens, 4 epochs)", "episodes/s", rates, ratios)
    flops = flop_counts(queries, args, json.loads((policy_dir / "config.json").read_text())["vocab_size"])
    print("FLOPs of one update (GFLOP): " + "; ".join(f"{side} " + ", ".join(f"{k} {v / 1e9:,.0f}" for k, v in flops[side].items()) for side in ("ours", "trl"))
          + f"; TRL/ours {flops['ratio_trl_over_ours']:.2f} (the speed-up at equal FLOP/s)")  # fmt: skip
    record_settings = dict(vars(args), ppo=settings(args), trl_variants={v: TRL_VARIANTS[v] for v in variants}, context_length=max(map(len, queries)))
    common.record("ppo", record_settings, "episodes/s", rates, ratios, {"seconds": seconds, "flops": flops})


if __name__ == "__main__":
    main()
