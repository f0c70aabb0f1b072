"""The LLM judge client against a fake OpenAI-compatible server over real HTTP: verdict parsing, A/B
randomisation, retries, cache, unparseable replies, the API key, bounded concurrency, Wilson CIs."""

import json
import math

import pytest

from dgx_spark_summary_from_human_feedback.judge import Judge, JudgeError, parse_verdict, wilson_interval, win_rate

from .fake_judge import FakeJudge, summaries_of


def items(n, good_first=True, tag=""):
    """(post, first, second) triples; the first summary (or the second) says GOOD."""
    good, plain = f"a GOOD summary {tag}".strip(), "a plain summary"
    return [
        (f"post {i} {tag}".strip(), f"{i}: {good if good_first else plain}", f"{i}: {plain if good_first else good}")
        for i in range(n)
    ]


def judge(server, tmp_path, **kwargs):
    kwargs.setdefault("backoff_s", 0.01)
    return Judge(server.url, "fake", tmp_path / "cache.jsonl", **kwargs)


# ---- parsing


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("Comparison: A covers the main point.\nPreferred: A", "A"),
        ('Comparison: B is more accurate.\nPreferred: "B"', "B"),
        ('**Comparison:** A is tighter.\n**Preferred:** "A"', "A"),
        ("comparison: b is better\npreferred: b", "B"),
        ("Preferred: 'B'", "B"),
        ("Preferred: A\nOn reflection...\nPreferred: B", "B"),  # the last Preferred line decides
        ("I cannot decide between them.", None),
        ("Preferred: Both are fine", None),  # not a verdict, not guessed
        ("", None),
    ],
)
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


# ---- A/B order


def test_order_is_randomised_but_the_verdict_follows_the_content(tmp_path):
    with FakeJudge() as server:
        j = judge(server, tmp_path)
        first_good = j.compare(items(16), seed=0)
        second_good = j.compare(items(16, good_first=False), seed=0)
        prompts = [s["body"]["messages"][-1]["content"] for s in server.seen[:16]]
    assert [r["first_wins"] for r in first_good] == [True] * 16
    assert [r["first_wins"] for r in second_good] == [False] * 16
    swaps = [r["swapped"] for r in first_good]
    assert 0 < sum(swaps) < 16
    assert swaps == [r["swapped"] for r in second_good]  # the seed alone fixes the order
    # the server saw the first summary in slot B exactly when the item was swapped
    by_post = {p.split("### Post:\n", 1)[1].split("\n", 1)[0]: summaries_of(p) for p in prompts}
    for (post, first, second), r in zip(items(16), first_good):
        assert by_post[post] == ((second, first) if r["swapped"] else (first, second))


def test_order_is_deterministic_per_seed(tmp_path):
    with FakeJudge() as server:
        j = judge(server, tmp_path)
        a, b, c = (j.compare(items(16), seed=s) for s in (0, 0, 1))
    assert [r["swapped"] for r in a] == [r["swapped"] for r in b]
    assert [r["swapped"] for r in a] != [r["swapped"] for r in c]
    assert all(r["first_wins"] for r in a + b + c)


# ---- retries


@pytest.mark.parametrize("failures", [[503], [429], [503, 429, 500]])
def test_retries_on_429_and_5xx_then_succeeds(tmp_path, failures):
    with FakeJudge(fail_first=failures) as server:
        j = judge(server, tmp_path, max_retries=5)
        [result] = j.compare(items(1), seed=0)
    assert result["first_wins"] is True
    assert j.requests == server.count == len(failures) + 1


def test_client_error_is_not_retried(tmp_path):
    with FakeJudge(always_fail=400) as server:
        j = judge(server, tmp_path, max_retries=5)
        with pytest.raises(JudgeError, match="HTTP 400"):
            j.ask("a prompt")
    assert j.requests == server.count == 1
    assert not (tmp_path / "cache.jsonl").exists() or "a prompt" not in (tmp_path / "cache.jsonl").read_text()


def test_persistent_server_error_gives_up_after_max_retries(tmp_path):
    with FakeJudge(always_fail=500) as server:
        j = judge(server, tmp_path, max_retries=2)
        with pytest.raises(JudgeError, match=r"failed 3 times \(last: HTTP 500\)"):
            j.ask("a prompt")
    assert j.requests == server.count == 3


def test_unreachable_judge_is_a_judge_error(tmp_path):
    with FakeJudge() as server:
        url = server.url
    j = Judge(
        url, "fake", tmp_path / "cache.jsonl", max_retries=1, backoff_s=0.01, timeout_s=5
    )  # server closed: connection refused
    with pytest.raises(JudgeError, match="failed 2 times"):
        j.ask("a prompt")


def test_url_with_or_without_the_chat_completions_path(tmp_path):
    with FakeJudge() as server:
        for url in (server.url, server.url + "/", server.url + "/chat/completions"):
            Judge(url, "fake", tmp_path / f"{len(url)}.jsonl").ask(
                "### Summary A:\nx\n### Summary B:\ny\n### Instructions:"
            )
        assert [s["path"] for s in server.seen] == ["/v1/chat/completions"] * 3
        assert {s["body"]["model"] for s in server.seen} == {"fake"}


# ---- cache


def test_cache_answers_a_rerun_without_http_and_holds_no_key(tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-fake-123")
    with FakeJudge() as server:
        first = judge(server, tmp_path, api_key_env="JUDGE_TEST_KEY").compare(items(6), seed=0)
        assert server.count == 6
        again = judge(server, tmp_path, api_key_env="JUDGE_TEST_KEY")
        assert again.compare(items(6), seed=0) == first
        assert server.count == 6 and again.requests == 0
        other_model = Judge(server.url, "another", tmp_path / "cache.jsonl", api_key_env="JUDGE_TEST_KEY")
        other_model.compare(items(6), seed=0)  # the cache is keyed by model: a new judge asks again
        assert server.count == 12
    lines = (tmp_path / "cache.jsonl").read_text().splitlines()
    assert len(lines) == 12 and all(json.loads(line)["reply"].startswith("Comparison:") for line in lines)
    assert "sk-fake-123" not in (tmp_path / "cache.jsonl").read_text()


# ---- unparseable replies


def test_unparseable_replies_are_counted_not_coin_flipped(tmp_path):
    triples = items(5) + items(2, good_first=False, tag="b") + items(3, tag="NONSENSE")
    with FakeJudge(nonsense_if="NONSENSE") as server:
        results = judge(server, tmp_path).compare(triples, seed=0)
    outcomes = [None if r["first_wins"] is None else float(r["first_wins"]) for r in results]
    assert outcomes == [1.0] * 5 + [0.0] * 2 + [None] * 3
    assert results[-1]["reply"] == "I like both of them, honestly."
    w = win_rate(outcomes)
    assert (w["n"], w["unparseable"]) == (7, 3)
    assert w["win_rate"] == pytest.approx(5 / 7)
    assert (w["ci_low"], w["ci_high"]) == pytest.approx(wilson_interval(5, 7))


def test_win_rate_counts_ties_as_half_and_is_nan_when_nothing_parsed():
    assert win_rate([1.0, 0.5, 0.0, 0.5])["win_rate"] == pytest.approx(0.5)
    w = win_rate([None, None])
    assert math.isnan(w["win_rate"]) and (w["n"], w["unparseable"]) == (0, 2)


# ---- API key


def test_api_key_is_sent_as_a_bearer_header_from_the_named_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-fake-123")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeJudge() as server:
        for name, env in (("a", "JUDGE_TEST_KEY"), ("b", "UNSET_JUDGE_TEST_KEY")):
            Judge(server.url, "fake", tmp_path / f"{name}.jsonl", api_key_env=env).ask(
                "### Summary A:\nx\n### Summary B:\ny\n### Instructions:"
            )
    assert [s["authorization"] for s in server.seen] == ["Bearer sk-fake-123", None]


# ---- concurrency


def test_concurrency_is_bounded(tmp_path):
    with FakeJudge(delay_s=0.05) as server:
        results = judge(server, tmp_path, concurrency=2).compare(items(8), seed=0)
    assert all(r["first_wins"] for r in results)
    assert server.count == 8
    assert server.max_in_flight == 2


# ---- Wilson interval


@pytest.mark.parametrize("wins, n", [(0, 5), (1, 10), (5, 10), (9, 10), (10, 10), (37.5, 100), (640, 1000)])
def test_wilson_interval_contains_p_within_unit_interval(wins, n):
    low, high = wilson_interval(wins, n)
    assert 0.0 <= low <= wins / n <= high <= 1.0 + 1e-12
    assert low < high


def test_wilson_interval_known_value_narrows_with_n_and_is_nan_without_data():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    widths = [high - low for low, high in (wilson_interval(n * 0.3, n) for n in (10, 100, 1000))]
    assert widths[0] > widths[1] > widths[2]
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
