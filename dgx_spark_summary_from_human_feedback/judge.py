"""An LLM judge over any OpenAI-compatible chat-completions endpoint, and win rates with intervals.

The N+ judge prompt, A/B order randomised per example, unparseable replies counted (never
coin-flipped), retries with backoff on 429/5xx, bounded concurrency and an on-disk cache. Every
win rate is reported with its n and a 95% Wilson interval.
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
from pathlib import Path

from .errors import InputError


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
    """The verdict, "A" or "B", from the judge's last `Preferred:` line; None when it has none (never guessed)."""
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

    def __init__(
        self,
        url: str,
        model: str,
        cache_path: str | Path,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        timeout_s: float = 120.0,
        temperature: float = 0.0,
    ):
        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/chat/completions") else "/chat/completions")
        self.model, self.temperature, self.concurrency = model, temperature, concurrency
        self.max_retries, self.backoff_s, self.timeout_s = max_retries, backoff_s, timeout_s
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
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "temperature": self.temperature,
                "max_tokens": 256,
            }
        ).encode()
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
                    raise JudgeError(
                        f"judge {self.url} answered HTTP {e.code}: check --judge-url, --judge-model and the API key "
                        "variable"
                    ) from None
                error = f"HTTP {e.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (KeyError, IndexError, json.JSONDecodeError):
                raise JudgeError(
                    f"judge {self.url} returned no chat completion: is it an OpenAI-compatible endpoint?"
                ) from None
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
        prompts = [
            JUDGE_PROMPT.format(post=post, a=second if swap else first, b=first if swap else second)
            for (post, first, second), swap in zip(items, swaps)
        ]
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
    return {
        "win_rate": wins / len(parsed) if parsed else float("nan"),
        "ci_low": low,
        "ci_high": high,
        "n": len(parsed),
        "unparseable": len(outcomes) - len(parsed),
    }
