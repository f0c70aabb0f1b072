"""Evaluation: summaries of one or more policies against the references (and each other).

    python -m dgx_spark_summary_from_human_feedback.evaluate --policy out/sft --policy out/ppo \
        --reward-path out/reward --num-samples 512 --output-dir out/eval
    ... --judge-url http://127.0.0.1:8000/v1 --judge-model NAME      # + an LLM judge (key: env)
    ... --head-to-head                                                 # policy 1 vs policy 2
    ... --head-to-head-against out/ppo                                 # every other policy vs PPO's

Per policy: ROUGE-1/2/L against the reference (`rouge.py`), mean length, share without EOS,
reward-model score, win rate against the reference judged by the reward model and (optionally)
by an LLM through any OpenAI-compatible chat-completions endpoint (`judge.py`). Every win rate
is reported with its judge, n and a 95% Wilson interval.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import tyro

from . import cli
from .checkpoint import make_output_dir
from .data import encode, load_tokenizer, right_pad
from .errors import InputError
from .generation import Decoding, load_rows, query_tokens_of, summarize
from .judge import JUDGE_PROMPT, Judge, win_rate
from .models import get_score, load_policy, load_reward_model
from .rouge import rouge_l, rouge_scores
from .training import frozen_dtype, setup_runtime

# ---------------------------------------------------------------------------------------------
# the CLI


# each judged comparison shuffles A/B with its own seed, cfg.seed + this; the report names the one it used
AB_SEED = {"reference": 0, "head_to_head": 1, "against": 2}


@dataclass
class Config:
    policy: Annotated[list[str], tyro.conf.UseAppendAction]
    """causal-LM checkpoint(s) to evaluate; repeat --policy for several"""
    dataset: str = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"
    """TL;DR posts with reference summaries: Hub name, local file(s) or a processed SFT dataset"""
    split: str = "validation"
    """split of --dataset"""
    num_samples: int = 256
    """posts to summarise per policy (0 = the whole split)"""
    reward_path: str | None = None
    """normalised reward model: scores, and the reward-model judge"""
    judge_url: str | None = None
    """OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1) for the LLM judge"""
    judge_model: str | None = None
    """model name sent to the judge endpoint"""
    judge_api_key_env: str = "OPENAI_API_KEY"
    """environment variable holding the judge's API key (never written anywhere)"""
    judge_concurrency: int = 8
    """judge requests in flight at once"""
    judge_max_retries: int = 5
    """retries on 429, 5xx and connection errors, with exponential backoff"""
    judge_backoff_s: float = 1.0
    """first retry delay (doubles each retry)"""
    head_to_head: bool = False
    """also judge the first two policies against each other"""
    head_to_head_against: str | None = None
    """also judge every other policy head to head against this one (one of the --policy paths, e.g. PPO's)"""
    temperature: float = 0.01
    """sampling temperature (N+: 0.01; 0 = greedy)"""
    max_new_tokens: int = 53
    """response budget in tokens (N+: 53)"""
    query_length: int = 512
    """query budget, as in training"""
    batch_size: int = 16
    """queries per generation batch"""
    decoding: Decoding = "eager"
    """decoding steps: eager, static or cuda_graph (`generation.Decoding`)"""
    seed: int = 0
    """sampling seed and the judge's A/B order (+ AB_SEED per comparison)"""
    device: str = "auto"
    """cuda, cpu or auto"""
    output_dir: str = "out/eval"
    """samples.jsonl, report.md, plots and the judge cache go here"""


def _reference(row: dict, eos_text: str) -> str:
    if row.get("summary"):
        return row["summary"].strip()
    return str(row.get("reference_response", "")).replace(eos_text, "").strip()


def _rm_ids(tokenizer, row: dict, response: str, has_eos: bool, query_length: int) -> list[int]:
    query = query_tokens_of([row], tokenizer, query_length)[0]
    return query + encode(tokenizer, response) + ([tokenizer.eos_token_id] if has_eos else [])


@torch.no_grad()
def rm_scores(reward_model, tokenizer, sequences: list[list[int]], batch_size: int, autocast) -> list[float]:
    """Scores of unpadded query+response id lists (right padded per batch)."""
    scores = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        T = max(len(s) for s in chunk)
        ids = torch.tensor([right_pad(s, T, tokenizer.pad_token_id) for s in chunk], device=reward_model.device)
        mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in chunk], device=reward_model.device)
        with autocast():
            scores += get_score(reward_model, ids, mask).float().tolist()
    return scores


def _plots(out: Path, per_policy: dict[str, list[dict]], reference_scores: list[float] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, samples in per_policy.items():
        scored = sorted((s["length"], s["rm_win"]) for s in samples if s.get("rm_win") is not None)
        if not scored:
            continue
        bins = [
            b for b in (scored[k * len(scored) // 5 : (k + 1) * len(scored) // 5] for k in range(5)) if b
        ]  # length quintiles
        ax.plot(
            [sum(x for x, _ in b) / len(b) for b in bins],
            [sum(w for _, w in b) / len(b) for b in bins],
            "o-",
            label=name,
        )
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("summary length (tokens)")
    ax.set_ylabel("win rate vs reference (reward-model judge)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "winrate_vs_length.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    if reference_scores:
        ax.hist(reference_scores, bins=30, alpha=0.5, label="reference")
    for name, samples in per_policy.items():
        values = [s["score"] for s in samples if s.get("score") is not None]
        if values:
            ax.hist(values, bins=30, alpha=0.5, label=name)
    ax.set_xlabel("reward-model score")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "score_histogram.png", dpi=110)
    plt.close(fig)


def _ci(w: dict) -> str:
    return f"{w['win_rate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}] (n={w['n']}, unparseable={w['unparseable']})"


def policy_summary(records: list[dict], scored: bool, judged: bool) -> dict:
    """ROUGE, length, no-EOS rate, and (when scored / judged) mean scores and win rates vs the references."""
    n = len(records)
    summary = rouge_scores([r["response"] for r in records], [r["reference"] for r in records])
    summary["mean_length"] = sum(r["length"] for r in records) / n
    summary["no_eos_rate"] = sum(not r["has_eos"] for r in records) / n
    if scored:
        summary["score"] = sum(r["score"] for r in records) / n
        summary["reference_score"] = sum(r["reference_score"] for r in records) / n
        summary["rm_win_rate"] = win_rate([r["rm_win"] for r in records])
    if judged:
        summary["judge_win_rate"] = win_rate([r["judge_win"] for r in records])
    return summary


def win_rates(
    first: list[dict], second: list[dict], posts: list[str], scored: bool, judge: Judge | None, seed: int
) -> dict:
    """Win rates of `first`'s summaries over `second`'s on the same posts, by each judge."""
    rates = {}
    if scored:
        rates["rm"] = win_rate(
            [
                1.0 if a["score"] > b["score"] else (0.5 if a["score"] == b["score"] else 0.0)
                for a, b in zip(first, second)
            ]
        )
    if judge is not None:
        verdicts = judge.compare([(p, a["response"], b["response"]) for p, a, b in zip(posts, first, second)], seed)
        rates["judge"] = win_rate([None if v["first_wins"] is None else float(v["first_wins"]) for v in verdicts])
    return rates


def policy_records(
    path: str,
    rows: list[dict],
    posts: list[str],
    cfg: Config,
    runtime,
    reward_model,
    rm_tokenizer,
    judge,
    reference_scores,
):
    """One policy's samples on `rows` with ROUGE-L, length, EOS, and (when given) RM scores and judge verdicts
    against the references; the references' RM scores are computed once and passed back for the next policy."""
    dtype, autocast = frozen_dtype(runtime), runtime.autocast
    tokenizer = load_tokenizer(path)
    model = load_policy(path, tokenizer, dtype=dtype, device=runtime.device).eval()
    references = [_reference(r, tokenizer.eos_token) for r in rows]
    samples = summarize(
        model,
        tokenizer,
        query_tokens_of(rows, tokenizer, cfg.query_length),
        batch_size=cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        seed=cfg.seed,
        autocast=autocast,
        decoding=cfg.decoding,
    )
    del model
    records = []
    for row, ref, s in zip(rows, references, samples):
        records.append(
            {
                "id": row.get("id"),
                "policy": path,
                "reference": ref,
                "response": s["response"],
                "length": len(s["response_token"]),
                "has_eos": s["has_eos"],
                "rougeL": rouge_l(s["response"], ref),
            }
        )
    if reward_model is not None:
        scores = rm_scores(
            reward_model,
            rm_tokenizer,
            [
                _rm_ids(rm_tokenizer, row, r["response"], r["has_eos"], cfg.query_length)
                for row, r in zip(rows, records)
            ],
            cfg.batch_size,
            autocast,
        )
        if reference_scores is None:
            reference_scores = rm_scores(
                reward_model,
                rm_tokenizer,
                [_rm_ids(rm_tokenizer, row, " " + ref, True, cfg.query_length) for row, ref in zip(rows, references)],
                cfg.batch_size,
                autocast,
            )
        for r, s, ref_s in zip(records, scores, reference_scores):
            r.update(score=s, reference_score=ref_s, rm_win=1.0 if s > ref_s else (0.5 if s == ref_s else 0.0))
    if judge is not None:
        verdicts = judge.compare(
            [(p, r["response"], r["reference"]) for p, r in zip(posts, records)], cfg.seed + AB_SEED["reference"]
        )
        for r, v in zip(records, verdicts):
            r.update(
                judge_win=None if v["first_wins"] is None else float(v["first_wins"]),
                judge_swapped=v["swapped"],
                judge_reply=v["reply"],
            )
    return records, reference_scores


def main(cfg: Config) -> dict:
    runtime = setup_runtime(cfg.device)
    if (cfg.judge_url is None) != (cfg.judge_model is None):
        raise InputError("pass --judge-url and --judge-model together")
    if not cfg.policy:
        raise InputError("no --policy given: pass --policy DIR (repeat it for several)")
    if cfg.head_to_head and len(cfg.policy) < 2:
        raise InputError("--head-to-head needs two --policy checkpoints")
    if cfg.head_to_head_against is not None and cfg.head_to_head_against not in cfg.policy:
        raise InputError(
            f"--head-to-head-against {cfg.head_to_head_against} is not one of the --policy paths: pass it as --policy "
            "too"
        )
    out = make_output_dir(cfg.output_dir)
    rows = load_rows(cfg.dataset, cfg.split, cfg.num_samples, None)
    judge = None
    if cfg.judge_url:
        judge = Judge(
            cfg.judge_url,
            cfg.judge_model,
            out / "judge_cache.jsonl",
            api_key_env=cfg.judge_api_key_env,
            concurrency=cfg.judge_concurrency,
            max_retries=cfg.judge_max_retries,
            backoff_s=cfg.judge_backoff_s,
        )
    reward_model = rm_tokenizer = None
    if cfg.reward_path:
        rm_tokenizer = load_tokenizer(cfg.reward_path)
        reward_model = load_reward_model(
            cfg.reward_path, rm_tokenizer, dtype=frozen_dtype(runtime), device=runtime.device
        )
        reward_model.eval()
    posts = [r.get("post") or r.get("query", "") for r in rows]

    # ---- generate and score every policy
    per_policy: dict[str, list[dict]] = {}
    reference_scores = None
    for path in cfg.policy:
        records, reference_scores = policy_records(
            path, rows, posts, cfg, runtime, reward_model, rm_tokenizer, judge, reference_scores
        )
        per_policy[path] = records

    # ---- summaries, head-to-head, report
    summary = {
        path: policy_summary(records, reward_model is not None, judge is not None)
        for path, records in per_policy.items()
    }
    head_to_head, head_to_head_against, against = {}, {}, cfg.head_to_head_against
    if cfg.head_to_head:
        head_to_head = win_rates(
            per_policy[cfg.policy[0]],
            per_policy[cfg.policy[1]],
            posts,
            reward_model is not None,
            judge,
            cfg.seed + AB_SEED["head_to_head"],
        )
    if against:
        head_to_head_against = {
            path: win_rates(
                records, per_policy[against], posts, reward_model is not None, judge, cfg.seed + AB_SEED["against"]
            )
            for path, records in per_policy.items()
            if path != against
        }
    with (out / "samples.jsonl").open("w") as f:
        for records in per_policy.values():
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    if reward_model is not None:
        _plots(out, per_policy, reference_scores)
    write_report(out, cfg, summary, head_to_head, head_to_head_against, len(rows))
    print((out / "report.md").read_text())
    return {"summary": summary, "head_to_head": head_to_head, "head_to_head_against": head_to_head_against}


def write_report(out: Path, cfg: Config, summary: dict, head_to_head: dict, head_to_head_against: dict, n: int) -> None:
    rm_judge = f"reward model `{cfg.reward_path}` (normalised; a win is score(policy) > score(reference))"

    def llm_judge(comparison: str) -> str:
        return (
            f"`{cfg.judge_model}` at `{cfg.judge_url}` with the N+ judge prompt (below), "
            f"A/B order randomised (seed {cfg.seed + AB_SEED[comparison]})"
        )

    lines = [
        f"# Evaluation\n\n{n} posts of `{cfg.dataset}` ({cfg.split}), temperature {cfg.temperature}, at most "
        f"{cfg.max_new_tokens} new tokens.\n"
    ]
    for path, s in summary.items():
        lines.append(f"## `{path}`\n")
        lines.append(f"- ROUGE-1 / 2 / L: {s['rouge1']:.4f} / {s['rouge2']:.4f} / {s['rougeL']:.4f}")
        lines.append(f"- mean length: {s['mean_length']:.1f} tokens; no-EOS rate: {s['no_eos_rate']:.3f}")
        if "score" in s:
            lines.append(f"- reward-model score: {s['score']:.4f} (references: {s['reference_score']:.4f})")
            lines.append(f"- win rate vs reference, judge {rm_judge}: {_ci(s['rm_win_rate'])}")
        if "judge_win_rate" in s:
            lines.append(f"- win rate vs reference, judge {llm_judge('reference')}: {_ci(s['judge_win_rate'])}")
        lines.append("")
    if head_to_head:
        lines.append(f"## Head to head: `{cfg.policy[0]}` vs `{cfg.policy[1]}`\n")
        if "rm" in head_to_head:
            lines.append(f"- win rate of the first, judge {rm_judge.split(' (')[0]}: {_ci(head_to_head['rm'])}")
        if "judge" in head_to_head:
            lines.append(f"- win rate of the first, judge {llm_judge('head_to_head')}: {_ci(head_to_head['judge'])}")
        lines.append("")
    if head_to_head_against:
        lines.append(
            f"## Head to head against `{cfg.head_to_head_against}`\n\nWin rate of each policy's summary over this "
            "one's on the same post (ties count half).\n"
        )
        for path, rates in head_to_head_against.items():
            if "rm" in rates:
                lines.append(f"- `{path}`, judge {rm_judge.split(' (')[0]}: {_ci(rates['rm'])}")
            if "judge" in rates:
                lines.append(f"- `{path}`, judge {llm_judge('against')}: {_ci(rates['judge'])}")
        lines.append("")
    if cfg.reward_path:
        lines.append("![win rate vs length](winrate_vs_length.png)\n\n![score histogram](score_histogram.png)\n")
    if cfg.judge_url:
        lines.append(f"## Judge prompt\n\n```\n{JUDGE_PROMPT}\n```\n")
    (out / "report.md").write_text("\n".join(lines))


if __name__ == "__main__":
    cli.run(main, Config)
