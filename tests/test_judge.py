"""The judge client against a stub OpenAI-compatible server on 127.0.0.1.

The stub answers a bounded number of requests from a script and then stops by itself (its
thread also has a deadline), so a failing test can never leave a server running.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from steerscope.errors import SteerscopeError
from steerscope.judge import (
    JudgeConfig,
    JudgeError,
    OpenAIJudge,
    harmonic_score,
    parse_rating,
)


class Stub:
    """Serve ``replies`` (one per request: a str is a chat answer, bytes are sent raw, an int is
    an HTTP status) and record the request bodies; stop after the last reply or ``deadline``."""

    def __init__(self, replies: list, deadline: float = 20.0) -> None:
        self.replies = list(replies)
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                n = int(self.headers.get("Content-Length", 0))
                stub.bodies.append(json.loads(self.rfile.read(n)))
                stub.headers.append(dict(self.headers))
                reply = stub.replies.pop(0) if stub.replies else 500
                if isinstance(reply, int):
                    self.send_response(reply)
                    self.end_headers()
                    return
                if isinstance(reply, str):
                    reply = json.dumps({"choices": [{"message": {"role": "assistant",
                                                                 "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.server.timeout = 0.2
        self.n = len(replies)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        end = time.monotonic() + deadline

        def serve() -> None:
            served = 0
            while served < self.n and time.monotonic() < end:
                before = len(self.bodies)
                self.server.handle_request()
                served += len(self.bodies) - before
            self.server.server_close()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join(timeout=25)
        assert not self.thread.is_alive()


def _cfg(url: str, **kw) -> JudgeConfig:
    return JudgeConfig(base_url=url, model="stub-judge", api_key="k-test", timeout=5,
                       **{"retries": 2, "backoff": 0.01, **kw})


def test_harmonic_score_and_parsing() -> None:
    assert harmonic_score(2, 2, 2) == pytest.approx(2.0)
    assert harmonic_score(1, 2, 2) == pytest.approx(3 / (1 + 0.5 + 0.5))
    assert harmonic_score(0, 2, 2) == 0.0
    assert parse_rating("good. Rating: [[2]]") == 2.0
    assert parse_rating("Rating: [[1]] then Rating: [[0]]") == 0.0  # the last one counts
    assert parse_rating("Rating: [[7]]") is None and parse_rating("no rating") is None


def test_ratings_from_stub_server() -> None:
    stub = Stub(["fine. Rating: [[2]]", "Rating: [[1]]", "Rating: [[2]]",
                 "Rating: [[0]]", "Rating: [[2]]", "I refuse"])
    judge = OpenAIJudge(_cfg(stub.url))
    seen = []
    ratings = judge.rate_many([("cats", "Write a story.", "The cat sat."),
                               ("dogs", "Write a story.", "zzz zzz")], on_rating=seen.append)
    stub.join()
    assert [(r.concept, r.instruction, r.fluency) for r in ratings] == [(2, 1, 2), (0, 2, 0)]
    assert ratings[0].score == pytest.approx(harmonic_score(2, 1, 2))
    assert ratings[1].score == 0.0 and ratings[1].unparsed == ["fluency"]
    assert seen == ratings
    body = stub.bodies[0]
    assert body["model"] == "stub-judge" and "cats" in body["messages"][0]["content"]
    assert "Rating: [[score]]" in body["messages"][0]["content"]
    assert stub.headers[0].get("Authorization") == "Bearer k-test"


def test_garbage_then_recovery_is_retried() -> None:
    stub = Stub([b"not json", 503, "Rating: [[2]]", "Rating: [[2]]", "Rating: [[2]]"])
    sleeps: list[float] = []
    judge = OpenAIJudge(_cfg(stub.url), sleep=sleeps.append)
    r = judge.rate("c", "i", "text")
    stub.join()
    assert r.score == 2.0 and judge.requests == 5
    assert sleeps == [0.01, 0.02]  # exponential backoff between the failed attempts


def test_garbage_endpoint_keeps_completed_ratings() -> None:
    stub = Stub(["Rating: [[2]]"] * 3 + [b"<html>oops</html>"] * 3)
    judge = OpenAIJudge(_cfg(stub.url), sleep=lambda s: None)
    with pytest.raises(JudgeError) as info:
        judge.rate_many([("a", "b", "c"), ("d", "e", "f"), ("g", "h", "i")])
    stub.join()
    err = info.value
    assert isinstance(err, SteerscopeError)
    assert len(err.completed) == 1 and err.completed[0].score == 2.0
    msg = str(err)
    assert "failed 3 times" in msg and "not a chat completion" in msg and "1 of 3" in msg
    assert "\n" not in msg
    # resuming with the completed ratings skips them
    stub2 = Stub(["Rating: [[1]]"] * 6)
    judge2 = OpenAIJudge(_cfg(stub2.url))
    ratings = judge2.rate_many([("a", "b", "c"), ("d", "e", "f"), ("g", "h", "i")],
                               done=err.completed)
    stub2.join()
    assert [r.item for r in ratings] == [0, 1, 2] and judge2.requests == 6


def test_unreachable_endpoint() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps: list[float] = []
    judge = OpenAIJudge(_cfg(f"http://127.0.0.1:{port}/v1", retries=3), sleep=sleeps.append)
    with pytest.raises(SteerscopeError, match="failed 4 times: unreachable"):
        judge.complete("hello")
    assert sleeps == [0.01, 0.02, 0.04]


def test_auth_error_is_not_retried() -> None:
    stub = Stub([401])
    judge = OpenAIJudge(_cfg(stub.url), sleep=lambda s: None)
    with pytest.raises(SteerscopeError, match="HTTP 401"):
        judge.complete("hello")
    stub.join()
    assert judge.requests == 1


def test_config_from_env() -> None:
    cfg = JudgeConfig.from_env({"STEERSCOPE_JUDGE_BASE_URL": "http://127.0.0.1:9/v1/",
                                "STEERSCOPE_JUDGE_MODEL": "m", "OPENAI_API_KEY": "x",
                                "STEERSCOPE_JUDGE_RETRIES": "1"})
    assert (cfg.base_url, cfg.model, cfg.api_key, cfg.retries) == ("http://127.0.0.1:9/v1", "m",
                                                                   "x", 1)
    assert JudgeConfig.from_env({}).model == "gpt-4o-mini"
    with pytest.raises(SteerscopeError, match="not an http"):
        JudgeConfig.from_env({"STEERSCOPE_JUDGE_BASE_URL": "ftp://x"})
    with pytest.raises(SteerscopeError, match="not a number"):
        JudgeConfig.from_env({"STEERSCOPE_JUDGE_TIMEOUT": "soon"})


def test_endpoint_that_does_not_speak_http() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(5)
    port = srv.getsockname()[1]

    def serve(n: int = 3) -> None:  # bounded: n connections, then close
        try:
            for _ in range(n):
                conn, _ = srv.accept()
                with conn:
                    conn.recv(65536)
                    conn.sendall(b"garbage garbage\r\n\r\n")
        except OSError:
            pass
        finally:
            srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    judge = OpenAIJudge(_cfg(f"http://127.0.0.1:{port}/v1"), sleep=lambda s: None)
    with pytest.raises(SteerscopeError, match="failed 3 times: answer is not HTTP"):
        judge.complete("hello")
    t.join(timeout=10)
    assert not t.is_alive()
