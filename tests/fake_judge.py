"""A fake OpenAI-compatible judge served over real HTTP on 127.0.0.1, for the judge and pipeline tests.

    with FakeJudge() as server:                     # prefers the summary containing "GOOD"
        Judge(server.url, "fake", cache_path).compare(items, seed=0)
        server.count                                # POSTs received, failed ones included

It answers POST /v1/chat/completions with `{"choices": [{"message": {"content": ...}}]}`. The
verdict is decided by content, never by position: it reads the prompt's `### Summary A:` and
`### Summary B:` sections and prefers the one containing "GOOD" (else the longer one, A on a
tie). `fail_first` lists HTTP statuses for the first requests, `always_fail` answers every
request with that status, `nonsense_if` makes the reply unparseable for prompts containing that
word, `delay_s` keeps each request in flight that long (to measure concurrency).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def summaries_of(prompt: str) -> tuple[str, str]:
    """(Summary A, Summary B) as they appear in the judge prompt."""
    a = prompt.split("### Summary A:", 1)[1].split("### Summary B:", 1)[0].strip()
    b = prompt.split("### Summary B:", 1)[1].split("### Instructions:", 1)[0].strip()
    return a, b


def prefer(prompt: str) -> str:
    a, b = summaries_of(prompt)
    if ("GOOD" in a) != ("GOOD" in b):
        return "A" if "GOOD" in a else "B"
    return "A" if len(a) >= len(b) else "B"


class FakeJudge:
    def __init__(
        self,
        *,
        fail_first: list[int] | tuple[int, ...] = (),
        always_fail: int | None = None,
        nonsense_if: str | None = None,
        delay_s: float = 0.0,
    ):
        self.fail_first, self.always_fail, self.nonsense_if, self.delay_s = (
            list(fail_first),
            always_fail,
            nonsense_if,
            delay_s,
        )
        self.lock = threading.Lock()
        self.count = 0  # POSTs received
        self.in_flight = self.max_in_flight = 0
        self.seen: list[dict] = []  # {"path", "authorization", "body"} per POST
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.count += 1
                    n = judge.count
                    judge.in_flight += 1
                    judge.max_in_flight = max(judge.max_in_flight, judge.in_flight)
                    judge.seen.append(
                        {"path": self.path, "authorization": self.headers.get("Authorization"), "body": body}
                    )
                time.sleep(judge.delay_s)
                with judge.lock:  # leave before answering: the client may send its next request at once
                    judge.in_flight -= 1
                status = judge.always_fail or (judge.fail_first[n - 1] if n <= len(judge.fail_first) else 200)
                if not self.path.endswith("/v1/chat/completions"):
                    status = 404
                if status != 200:
                    self.send_error(status)
                    return
                prompt = body["messages"][-1]["content"]
                if judge.nonsense_if and judge.nonsense_if in prompt:
                    content = "I like both of them, honestly."
                else:
                    content = f"Comparison: one summary is better.\nPreferred: {prefer(prompt)}"
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeJudge:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
