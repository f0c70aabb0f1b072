"""Evaluation: summaries of one or more policies against the references (and each other).

    python -m dgx_spark_summary_from_human_feedback.evaluate --policy out/sft --policy out/ppo \
        --reward-path out/reward --num-samples 512 --output-dir out/eval
    ... --judge-url http://127.0.0.1:8000/v1 --judge-model NAME      # + an LLM judge (key: env)
    ... --head-to-head                                                 # policy 1 vs policy 2

Per policy: ROUGE-1/2/L against the reference, mean length, share without EOS, reward-model
score, win rate against the reference judged by the reward model and (optionally) by an LLM
through any OpenAI-compatible chat-completions endpoint, with the N+ judge prompt, A/B order
randomised per example, unparseable replies counted (never coin-flipped), retries with backoff
on 429/5xx, bounded concurrency and an on-disk cache. Every win rate is reported with its judge,
n and a 95% Wilson interval.

ROUGE uses the tokenisation of Google's `rouge_score` (lower case, runs of letters and digits,
no stemming), written out here: 40 lines instead of a dependency.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import tyro

from . import cli
from .checkpoint import make_output_dir
from .data import InputError, encode, load_tokenizer, right_pad
from .generation import Decoding, load_rows, query_tokens_of, summarize
from .models import get_score, load_policy, load_reward_model
from .training import frozen_dtype, setup_runtime


def rouge_tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0 or n_pred == 0 or n_ref == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def rouge_n(prediction: str, reference: str, n: int) -> float:
    def grams(tokens):
        return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))

    p, r = grams(rouge_tokens(prediction)), grams(rouge_tokens(reference))
    return _f1(sum((p & r).values()), sum(p.values()), sum(r.values()))


def lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    return _f1(lcs_length(p, r), len(p), len(r))


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures over pairs."""
    n = max(len(predictions), 1)
    return {
        "rouge1": sum(rouge_n(p, r, 1) for p, r in zip(predictions, references)) / n,
        "rouge2": sum(rouge_n(p, r, 2) for p, r in zip(predictions, references)) / n,
        "rougeL": sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n,
    }


# ---------------------------------------------------------------------------------------------
# win rates


def wilson_interval(wins: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a win rate (ties count half)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = wins / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


# The judge prompt of the DPO paper's TL;DR evaluation, which the N+ work reused: the win rates
# it publishes (e.g. Pythia 1B SFT .327 -> PPO .394) were measured with this text.
JUDGE_PROMPT = """Which of the following summaries does a better job of summarizing the most important points in the given forum post, without including unimportant or irrelevant details? Judge based on accuracy, coverage, and coherence.

### Post:
{post}

### Summary A:
{a}

### Summary B:
{b}

### Instructions:
FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why. SECOND, on a new line, state only "A" or "B" to indicate your choice. Your response should use the format:
Comparison: <one-sentence comparison and explanation>
Preferred: <"A" or "B">"""

_PREFERRED = re.compile(r"Preferred:\s*\**\s*(?:summary\s+)?[\"'“”]?\s*([AB])\b", re.IGNORECASE)


def parse_verdict(reply: str) -> str | None:
    """"A" or "B" from the judge's last `Preferred:` line; None when it has none (never guessed)."""
    found = _PREFERRED.findall(reply or "")
    return found[-1].upper() if found else None


class JudgeError(InputError):
    pass


class Judge:
    """An OpenAI-compatible chat-completions client: bounded concurrency, retries, on-disk cache.

    The API key is read from the environment variable `api_key_env` and only ever sent in the
    Authorization header; it is never logged or written. The cache maps (model, prompt) to the
    reply, so rerunning an evaluation costs nothing.
    """

    def __init__(self, url: str, model: str, cache_path: str | Path, *, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 max_retries: int = 5, backoff_s: float = 1.0, timeout_s: float = 120.0, temperature: float = 0.0):  # fmt: skip
        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/chat/completions") else "/chat/completions")
        self.model, self.concurrency, self.max_retries, self.backoff_s, self.timeout_s, self.temperature = model, concurrency, max_retries, backoff_s, timeout_s, temperature
        self.api_key = os.environ.get(api_key_env)
        self.cache_path = Path(cache_path)
        self.cache: dict[str, str] = {}
        if self.cache_path.exists():
            for line in self.cache_path.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    self.cache[entry["key"]] = entry["reply"]
        self._lock = threading.Lock()
        self.requests = 0

    def _key(self, prompt: str) -> str:
        return hashlib.sha256(json.dumps([self.model, self.temperature, prompt]).encode()).hexdigest()

    def _request(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": self.temperature, "max_tokens": 256}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.max_retries + 1):
            with self._lock:
                self.requests += 1
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:
                    raise JudgeError(f"judge {self.url} answered HTTP {e.code}: check --judge-url, --judge-model and the API key variable") from None
                error = f"HTTP {e.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (KeyError, IndexError, json.JSONDecodeError):
                raise JudgeError(f"judge {self.url} returned no chat completion: is it an OpenAI-compatible endpoint?") from None
            if attempt < self.max_retries:
                time.sleep(self.backoff_s * 2**attempt)
        raise JudgeError(f"judge {self.url} failed {self.max_retries + 1} times (last: {error})")

    def ask(self, prompt: str) -> str:
        key = self._key(prompt)
        with self._lock:
            if key in self.cache:
                return self.cache[key]
        reply = self._request(prompt)
        with self._lock:
            self.cache[key] = reply
            with self.cache_path.open("a") as f:
                f.write(json.dumps({"key": key, "reply": reply}) + "\n")
        return reply

    def compare(self, items: list[tuple[str, str, str]], seed: int) -> list[dict]:
        """Judge (post, first, second) triples with A/B order randomised per item by `seed`.

        Returns per item {"first_wins": True/False/None (unparseable), "swapped", "reply"}.
        """
        rng = random.Random(seed)
        swaps = [rng.random() < 0.5 for _ in items]
        prompts = [JUDGE_PROMPT.format(post=post, a=second if swap else first, b=first if swap else second) for (post, first, second), swap in zip(items, swaps)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            replies = list(pool.map(self.ask, prompts))
        results = []
        for reply, swap in zip(replies, swaps):
            verdict = parse_verdict(reply)
            first_wins = None if verdict is None else (verdict == ("B" if swap else "A"))
            results.append({"first_wins": first_wins, "swapped": swap, "reply": reply})
        return results


def win_rate(outcomes: list[float | None]) -> dict:
    """Win rate over parsed outcomes (1 win, 0 loss, 0.5 tie), its 95% CI, n, and unparseable count."""
    parsed = [o for o in outcomes if o is not None]
    wins = sum(parsed)
    low, high = wilson_interval(wins, len(parsed))
    return {"win_rate": wins / len(parsed) if parsed else float("nan"), "ci_low": low, "ci_high": high, "n": len(parsed), "unparseable": len(outcomes) - len(parsed)}


# ---------------------------------------------------------------------------------------------
# the CLI


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
    """sampling seed and the judge's A/B order"""
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
        bins = [b for b in (scored[k * len(scored) // 5 : (k + 1) * len(scored) // 5] for k in range(5)) if b]  # length quintiles
        ax.plot([sum(x for x, _ in b) / len(b) for b in bins], [sum(w for _, w in b) / len(b) for b in bins], "o-", label=name)
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


def main(cfg: Config) -> dict:
    runtime = setup_runtime(cfg.device)
    device, dtype, autocast = runtime.device, frozen_dtype(runtime), runtime.autocast
    if (cfg.judge_url is None) != (cfg.judge_model is None):
        raise InputError("pass --judge-url and --judge-model together")
    if not cfg.policy:
        raise InputError("no --policy given: pass --policy DIR (repeat it for several)")
    if cfg.head_to_head and len(cfg.policy) < 2:
        raise InputError("--head-to-head needs two --policy checkpoints")
    out = make_output_dir(cfg.output_dir)
    rows = load_rows(cfg.dataset, cfg.split, cfg.num_samples, None)
    judge = None
    if cfg.judge_url:
        judge = Judge(cfg.judge_url, cfg.judge_model, out / "judge_cache.jsonl", api_key_env=cfg.judge_api_key_env, concurrency=cfg.judge_concurrency,
                      max_retries=cfg.judge_max_retries, backoff_s=cfg.judge_backoff_s)  # fmt: skip
    reward_model = rm_tokenizer = None
    if cfg.reward_path:
        rm_tokenizer = load_tokenizer(cfg.reward_path)
        reward_model = load_reward_model(cfg.reward_path, rm_tokenizer, dtype=dtype, device=device).eval()
    posts = [r.get("post") or r.get("query", "") for r in rows]

    # ---- generate and score every policy
    per_policy: dict[str, list[dict]] = {}
    reference_scores = None
    for path in cfg.policy:
        tokenizer = load_tokenizer(path)
        model = load_policy(path, tokenizer, dtype=dtype, device=device).eval()
        references = [_reference(r, tokenizer.eos_token) for r in rows]
        samples = summarize(model, tokenizer, query_tokens_of(rows, tokenizer, cfg.query_length), batch_size=cfg.batch_size,
                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed, autocast=autocast,
                            decoding=cfg.decoding)  # fmt: skip
        del model
        records = []
        for row, ref, s in zip(rows, references, samples):
            records.append({"id": row.get("id"), "policy": path, "reference": ref, "response": s["response"], "length": len(s["response_token"]),
                            "has_eos": s["has_eos"], "rougeL": rouge_l(s["response"], ref)})  # fmt: skip
        if reward_model is not None:
            scores = rm_scores(reward_model, rm_tokenizer, [_rm_ids(rm_tokenizer, row, r["response"], r["has_eos"], cfg.query_length) for row, r in zip(rows, records)], cfg.batch_size, autocast)
            if reference_scores is None:
                reference_scores = rm_scores(reward_model, rm_tokenizer, [_rm_ids(rm_tokenizer, row, " " + ref, True, cfg.query_length) for row, ref in zip(rows, references)], cfg.batch_size, autocast)
            for r, s, ref_s in zip(records, scores, reference_scores):
                r.update(score=s, reference_score=ref_s, rm_win=1.0 if s > ref_s else (0.5 if s == ref_s else 0.0))
        if judge is not None:
            verdicts = judge.compare([(p, r["response"], r["reference"]) for p, r in zip(posts, records)], cfg.seed)
            for r, v in zip(records, verdicts):
                r.update(judge_win=None if v["first_wins"] is None else float(v["first_wins"]), judge_swapped=v["swapped"], judge_reply=v["reply"])
        per_policy[path] = records

    # ---- summaries, head-to-head, report
    summary = {}
    for path, records in per_policy.items():
        s = {**rouge_scores([r["response"] for r in records], [r["reference"] for r in records]),
             "mean_length": sum(r["length"] for r in records) / len(records), "no_eos_rate": sum(not r["has_eos"] for r in records) / len(records)}  # fmt: skip
        if reward_model is not None:
            s["score"] = sum(r["score"] for r in records) / len(records)
            s["reference_score"] = sum(r["reference_score"] for r in records) / len(records)
            s["rm_win_rate"] = win_rate([r["rm_win"] for r in records])
        if judge is not None:
            s["judge_win_rate"] = win_rate([r["judge_win"] for r in records])
        summary[path] = s
    head_to_head = {}
    if cfg.head_to_head:
        first, second = per_policy[cfg.policy[0]], per_policy[cfg.policy[1]]
        if reward_model is not None:
            head_to_head["rm"] = win_rate([1.0 if a["score"] > b["score"] else (0.5 if a["score"] == b["score"] else 0.0) for a, b in zip(first, second)])
        if judge is not None:
            verdicts = judge.compare([(p, a["response"], b["response"]) for p, a, b in zip(posts, first, second)], cfg.seed + 1)
            head_to_head["judge"] = win_rate([None if v["first_wins"] is None else float(v["first_wins"]) for v in verdicts])
    with (out / "samples.jsonl").open("w") as f:
        for records in per_policy.values():
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    if reward_model is not None:
        _plots(out, per_policy, reference_scores)
    write_report(out, cfg, summary, head_to_head, len(rows))
    print((out / "report.md").read_text())
    return {"summary": summary, "head_to_head": head_to_head}


def write_report(out: Path, cfg: Config, summary: dict, head_to_head: dict, n: int) -> None:
    rm_judge = f"reward model `{cfg.reward_path}` (normalised; a win is score(policy) > score(reference))"
    llm_judge = f"`{cfg.judge_model}` at `{cfg.judge_url}` with the N+ judge prompt (below), A/B order randomised (seed {cfg.seed})"
    lines = [f"# Evaluation\n\n{n} posts of `{cfg.dataset}` ({cfg.split}), temperature {cfg.temperature}, at most {cfg.max_new_tokens} new tokens.\n"]
    for path, s in summary.items():
        lines.append(f"## `{path}`\n")
        lines.append(f"- ROUGE-1 / 2 / L: {s['rouge1']:.4f} / {s['rouge2']:.4f} / {s['rougeL']:.4f}")
        lines.append(f"- mean length: {s['mean_length']:.1f} tokens; no-EOS rate: {s['no_eos_rate']:.3f}")
        if "score" in s:
            lines.append(f"- reward-model score: {s['score']:.4f} (references: {s['reference_score']:.4f})")
            lines.append(f"- win rate vs reference, judge {rm_judge}: {_ci(s['rm_win_rate'])}")
        if "judge_win_rate" in s:
            lines.append(f"- win rate vs reference, judge {llm_judge}: {_ci(s['judge_win_rate'])}")
        lines.append("")
    if head_to_head:
        lines.append(f"## Head to head: `{cfg.policy[0]}` vs `{cfg.policy[1]}`\n")
        if "rm" in head_to_head:
            lines.append(f"- win rate of the first, judge {rm_judge.split(' (')[0]}: {_ci(head_to_head['rm'])}")
        if "judge" in head_to_head:
            lines.append(f"- win rate of the first, judge {llm_judge}: {_ci(head_to_head['judge'])}")
        lines.append("")
    if cfg.reward_path:
        lines.append("![win rate vs length](winrate_vs_length.png)\n\n![score histogram](score_histogram.png)\n")
    if cfg.judge_url:
        lines.append(f"## Judge prompt\n\n```\n{JUDGE_PROMPT}\n```\n")
    (out / "report.md").write_text("\n".join(lines))


if __name__ == "__main__":
    cli.run(main, Config)
