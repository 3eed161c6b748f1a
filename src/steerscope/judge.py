"""AxBench-style LLM-judge ratings of steered text (docs/ecosystem.md §6, methods.md §1.5).

Three ratings in {0, 1, 2} per generation — **concept** (is the steered concept there?),
**instruction** (is the text still about the prompt?), **fluency** — combined as their harmonic
mean, which is 0 as soon as one of them is 0 (steering that produces the concept by destroying the
text scores nothing). An unparseable rating counts as 0, as in AxBench, and is flagged.

The client speaks the OpenAI chat-completions protocol over plain ``urllib`` (no SDK dependency),
so any compatible server works: OpenAI, vLLM, llama.cpp, LiteLLM, Ollama. It is configured by
environment variables, so no key ever appears on a command line:

==============================  =============================================  ===================
variable                        meaning                                        default
==============================  =============================================  ===================
``STEERSCOPE_JUDGE_BASE_URL``   API root (``…/v1``); else ``OPENAI_BASE_URL``  OpenAI's
``STEERSCOPE_JUDGE_MODEL``      model name                                     ``gpt-4o-mini``
``STEERSCOPE_JUDGE_API_KEY``    bearer token; else ``OPENAI_API_KEY``          none
``STEERSCOPE_JUDGE_TIMEOUT``    seconds per request                            60
``STEERSCOPE_JUDGE_RETRIES``    retries after the first attempt                4
==============================  =============================================  ===================

Network errors, timeouts, HTTP 429/5xx and answers that are not a chat completion are retried
with exponential backoff; after the last retry a :class:`JudgeError` (a SteerscopeError: one line
in the CLI) is raised that carries every rating completed so far, so a long judging run that dies
at item 900 keeps the first 899. Authentication and other 4xx errors are not retried.

The offline default of the project is the lexical GenSuccess metric; the judge is opt-in.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from steerscope.errors import SteerscopeError

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o-mini"  # AxBench's judge

_SCALE = (
    'rate it on a scale from 0 to 2, where 0 means {zero}, 1 means {one}, and 2 means {two}. '
    'Give your rating in exactly this format: "Rating: [[score]]".'
)

CONCEPT_PROMPT = (
    "[System]\nAct as an impartial judge. Decide whether the concept below appears in the text "
    "fragment below. Judge only whether the concept is clearly present; ignore grammar and "
    "coherence.\n\nFirst explain briefly where the fragment refers to the concept, then "
    + _SCALE.format(zero="the concept is absent", one="it is present only weakly or indirectly",
                    two="it is clearly incorporated")
    + "\n\n[Concept Start]\n{concept}\n[Concept End]\n\n"
    "[Sentence Fragment Start]\n{sentence}\n[Sentence Fragment End]\n"
)
INSTRUCTION_PROMPT = (
    "[System]\nAct as an impartial judge. Decide how related the text fragment below is to the "
    "instruction below. Judge only relatedness; ignore grammar, coherence and informativeness."
    "\n\nFirst explain briefly which parts relate to the instruction, then "
    + _SCALE.format(zero="unrelated", one="somewhat related", two="clearly related")
    + "\n\n[Instruction Start]\n{instruction}\n[Instruction End]\n\n"
    "[Sentence Fragment Start]\n{sentence}\n[Sentence Fragment End]\n"
)
FLUENCY_PROMPT = (
    "[System]\nAct as an impartial judge of the fluency of the text fragment below. Judge only "
    "fluency; ignore completeness, relevance and informativeness.\n\nFirst describe briefly any "
    "unnatural phrasing, grammatical errors or repetition, then "
    + _SCALE.format(zero="not fluent (incomprehensible or repetitive)",
                    one="somewhat fluent with noticeable errors", two="fluent, almost perfect")
    + "\n\n[Sentence Fragment Start]\n{sentence}\n[Sentence Fragment End]\n"
)

_RATING = re.compile(r"Rating:\s*\[\[\s*([0-9]+(?:\.[0-9]+)?)\s*\]\]")


class JudgeError(SteerscopeError):
    """The judge endpoint failed for good; ``completed`` holds the ratings finished before."""

    def __init__(self, problem: str, fix: str | None, completed: list[Rating]) -> None:
        super().__init__(problem, fix)
        self.completed = completed


@dataclass(frozen=True)
class JudgeConfig:
    """Where and how to reach an OpenAI-compatible chat-completions endpoint."""

    base_url: str = DEFAULT_BASE_URL
    model: str = DEFAULT_MODEL
    api_key: str | None = None
    timeout: float = 60.0
    retries: int = 4
    backoff: float = 1.0  # seconds before the first retry; doubles each time
    max_backoff: float = 30.0
    temperature: float = 0.0
    max_tokens: int = 512

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> JudgeConfig:
        env = os.environ if env is None else env

        def num(name: str, default: float) -> float:
            raw = env.get(name)
            if raw in (None, ""):
                return default
            try:
                return float(raw)
            except ValueError:
                raise SteerscopeError(f"{name}={raw!r} is not a number", "set a number") from None

        base = (env.get("STEERSCOPE_JUDGE_BASE_URL") or env.get("OPENAI_BASE_URL")
                or DEFAULT_BASE_URL)
        if not base.startswith(("http://", "https://")):
            raise SteerscopeError(
                f"judge base URL {base!r} is not an http(s) URL",
                "set STEERSCOPE_JUDGE_BASE_URL to e.g. http://127.0.0.1:8000/v1",
            )
        return cls(
            base_url=base.rstrip("/"),
            model=env.get("STEERSCOPE_JUDGE_MODEL") or DEFAULT_MODEL,
            api_key=env.get("STEERSCOPE_JUDGE_API_KEY") or env.get("OPENAI_API_KEY") or None,
            timeout=num("STEERSCOPE_JUDGE_TIMEOUT", 60.0),
            retries=int(num("STEERSCOPE_JUDGE_RETRIES", 4)),
        )


@dataclass
class Rating:
    """One judged generation: the three ratings, their combined score, and parse flags."""

    item: int
    concept: float
    instruction: float
    fluency: float
    score: float
    unparsed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def harmonic_score(concept: float, instruction: float, fluency: float) -> float:
    """AxBench's aggregate: the harmonic mean of the three ratings, 0 if any of them is 0."""
    vals = (concept, instruction, fluency)
    if any(v <= 0 for v in vals):
        return 0.0
    return 3.0 / sum(1.0 / v for v in vals)


def parse_rating(text: str, low: float = 0.0, high: float = 2.0) -> float | None:
    """The last ``Rating: [[x]]`` in a reply, if it is within ``[low, high]`` (else None)."""
    found = _RATING.findall(text or "")
    if not found:
        return None
    val = float(found[-1])
    return val if low <= val <= high else None


class _Retryable(Exception):
    """A failure worth another attempt (network, timeout, 429/5xx, malformed answer)."""


class OpenAIJudge:
    """AxBench-style ratings through an OpenAI-compatible ``/chat/completions`` endpoint."""

    def __init__(
        self, config: JudgeConfig | None = None, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.config = config or JudgeConfig.from_env()
        self._sleep = sleep
        self.requests = 0  # attempts made (for tests and cost accounting)

    # ------------------------------------------------------------------ transport
    def _post(self, prompt: str) -> str:
        cfg = self.config
        body = json.dumps({
            "model": cfg.model, "temperature": cfg.temperature, "max_tokens": cfg.max_tokens,
            "messages": [{"role": "user", "content": prompt}],
        }).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if cfg.api_key:
            headers["Authorization"] = f"Bearer {cfg.api_key}"
        req = urllib.request.Request(
            f"{cfg.base_url}/chat/completions", data=body, headers=headers, method="POST"
        )
        self.requests += 1
        try:
            with urllib.request.urlopen(req, timeout=cfg.timeout) as resp:  # noqa: S310 - http(s)
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 429 or exc.code >= 500:
                raise _Retryable(f"HTTP {exc.code}") from None
            raise SteerscopeError(
                f"judge endpoint {cfg.base_url} refused the request: HTTP {exc.code} {exc.reason}",
                "check STEERSCOPE_JUDGE_API_KEY / STEERSCOPE_JUDGE_MODEL",
            ) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise _Retryable(f"unreachable ({reason})") from None
        except http.client.HTTPException as exc:  # not HTTP at all: a bad status line, cut off
            raise _Retryable(f"answer is not HTTP ({type(exc).__name__})") from None
        try:
            data = json.loads(raw.decode("utf-8"))
            content = data["choices"][0]["message"]["content"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise _Retryable(f"answer is not a chat completion: {raw[:60]!r}") from None
        if not isinstance(content, str):
            raise _Retryable("answer has no text content")
        return content

    def complete(self, prompt: str) -> str:
        """The judge's reply to ``prompt``, retrying transient failures with backoff."""
        cfg = self.config
        last = ""
        for attempt in range(cfg.retries + 1):
            try:
                return self._post(prompt)
            except _Retryable as exc:
                last = str(exc)
                if attempt < cfg.retries:
                    self._sleep(min(cfg.max_backoff, cfg.backoff * 2**attempt))
        raise SteerscopeError(
            f"judge endpoint {cfg.base_url} failed {cfg.retries + 1} times: {last}",
            "check STEERSCOPE_JUDGE_BASE_URL and that the server is up",
        )

    # ------------------------------------------------------------------ ratings
    def rate(self, concept: str, instruction: str, response: str, item: int = 0) -> Rating:
        """Concept, instruction and fluency ratings of one generation."""
        vals: dict[str, float] = {}
        unparsed = []
        prompts = {
            "concept": CONCEPT_PROMPT.format(concept=concept, sentence=response),
            "instruction": INSTRUCTION_PROMPT.format(instruction=instruction, sentence=response),
            "fluency": FLUENCY_PROMPT.format(sentence=response),
        }
        for name, prompt in prompts.items():
            val = parse_rating(self.complete(prompt))
            if val is None:
                unparsed.append(name)
                val = 0.0
            vals[name] = val
        return Rating(item, vals["concept"], vals["instruction"], vals["fluency"],
                      harmonic_score(vals["concept"], vals["instruction"], vals["fluency"]),
                      unparsed)

    def rate_many(
        self,
        items: Sequence[tuple[str, str, str]],
        on_rating: Callable[[Rating], None] | None = None,
        done: Sequence[Rating] = (),
    ) -> list[Rating]:
        """Rate ``(concept, instruction, response)`` items in order.

        ``done`` are ratings from an earlier, interrupted run (their ``item`` indices are
        skipped). ``on_rating`` sees each new rating as soon as it exists (e.g. to append it to a
        file). On a failure that survives the retries, :class:`JudgeError` carries all completed
        ratings.
        """
        results = list(done)
        have = {r.item for r in results}
        for i, (concept, instruction, response) in enumerate(items):
            if i in have:
                continue
            try:
                rating = self.rate(concept, instruction, response, item=i)
            except SteerscopeError as exc:
                raise JudgeError(
                    f"{exc.problem} (after {len(results)} of {len(items)} ratings; those are kept)",
                    exc.fix, results,
                ) from None
            results.append(rating)
            if on_rating is not None:
                on_rating(rating)
        return results
