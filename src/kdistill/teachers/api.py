"""Teacher client for any OpenAI-compatible endpoint (``kdistill serve``, vLLM, llama.cpp, hosted APIs).

* ``base_url`` + ``model``; the API key is read from the environment variable named by ``api_key_env``
  (the key itself never appears in a config file).
* ``chat`` / ``complete`` requests, with ``top_logprobs`` turned into per-token
  ``{token: logprob}`` dicts (soft targets for the pipelines).
* Bounded concurrency (an ``asyncio.Semaphore``), a per-request timeout, retries with exponential
  backoff and full jitter on 429 / 5xx / timeouts / connection errors (``Retry-After`` honoured).
* A request budget and a token budget: once spent, the remaining requests are not sent and come back
  with ``status="skipped_budget"`` -- the job stops cleanly, everything already answered is stored.
  (The token budget is checked before each send, so requests already in flight -- at most
  ``concurrency`` -- may overshoot it by their own tokens.)
* Every successful answer is written to the :class:`~kdistill.teachers.store.ResponseStore` (committed)
  before it is returned, and a stored answer is returned without any request.
* :meth:`APITeacher.preflight` fails once, clearly, on a missing API key, an unreachable endpoint, a
  rejected key or an unknown model -- before any work starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import KDistillError, close_matches
from .store import ResponseStore, request_key

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Prefixes of well-known credentials (OpenAI / Anthropic / Stripe sk-, Hugging Face hf_, GitHub ghp_ & co,
# GitLab glpat-, Slack xox?-, Google AIza, AWS access key ids AKIA / ASIA). Matched case-sensitively, so
# upper-case variable names such as HF_TOKEN or SK_KEY stay valid names.
_TOKEN_PREFIXES = ("sk-", "sk_", "hf_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "glpat-",
                   "xoxa-", "xoxb-", "xoxp-", "xoxr-", "xoxs-", "AIza", "pk_live_", "rk_live_", "pk_test_",
                   "rk_test_")
_AWS_KEY_ID = re.compile(r"(AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[A-Z0-9]{12,}")


def _looks_random(v: str) -> bool:
    """A long string mixing letters and digits with high per-character entropy (a key, not a name)."""
    core = v.replace("_", "")
    if len(core) < 20:
        return False
    digits = sum(c.isdigit() for c in core)
    lower, upper = any(c.islower() for c in core), any(c.isupper() for c in core)
    if not digits or not (lower and upper or digits >= 4):
        return False
    counts = {c: core.count(c) for c in set(core)}
    entropy = -sum(n / len(core) * math.log2(n / len(core)) for n in counts.values())
    return entropy >= 3.5


def looks_like_secret(value: str) -> bool:
    """True unless ``value`` is plausibly the *name* of an environment variable (``[A-Za-z_][A-Za-z0-9_]*``,
    no known token prefix, not a long random string)."""
    if not _ENV_NAME.fullmatch(value) or len(value) > 64:
        return True
    if _AWS_KEY_ID.fullmatch(value):
        return True
    if value.startswith(_TOKEN_PREFIXES) and len(value) >= 16:
        return True
    return _looks_random(value)


def check_api_key_env(value: str | None, what: str = "api_key_env") -> str | None:
    """``value`` if it is an environment-variable name (or ``None``); otherwise a :class:`KDistillError` that
    never repeats the value, since what users put there by mistake is usually the key itself."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise KDistillError(f"{what}: got an empty or non-string value, expected the name of an environment "
                            "variable that holds the API key, e.g. OPENAI_API_KEY.")
    if looks_like_secret(value):
        raise KDistillError(f"{what}: the value ({len(value)} characters, not shown) looks like a secret token, not "
                            "an environment-variable name; expected a name such as OPENAI_API_KEY "
                            "([A-Za-z_][A-Za-z0-9_]*). Fix: put the token in an environment variable and give its "
                            "name, e.g. `export OPENAI_API_KEY=...` and api_key_env=OPENAI_API_KEY; if this token is "
                            "real and was shared or logged, revoke it.")
    return value


@dataclass
class TeacherReply:
    """The outcome of one request. ``status``: ``ok`` | ``error`` (retries exhausted or a 4xx) |
    ``skipped_budget``. ``top_logprobs[i]`` maps token strings to log-probs at generated position i."""

    status: str
    text: str = ""
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    cached: bool = False
    attempts: int = 0
    error: str | None = None
    key: str = ""
    raw: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def parse_response(endpoint: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """Text, tokens, log-probs and usage of the first choice of a chat or completion response."""
    choices = data.get("choices") or []
    if not choices or not isinstance(choices, list):
        raise KDistillError(f"teacher response has no choices: {str(data)[:200]!r}")
    c = choices[0]
    tokens: list[str] = []
    lps: list[float] = []
    tops: list[dict[str, float]] = []
    if endpoint == "chat":
        text = (c.get("message") or {}).get("content") or ""
        for item in ((c.get("logprobs") or {}).get("content") or []):
            tokens.append(item.get("token", ""))
            lps.append(float(item.get("logprob", float("nan"))))
            top: dict[str, float] = {}
            for t in item.get("top_logprobs") or []:
                s, v = t.get("token", ""), float(t.get("logprob", float("-inf")))
                top[s] = max(v, top.get(s, float("-inf")))  # tokens that decode alike: keep the best
            tops.append(top)
    else:
        text = c.get("text") or ""
        lp = c.get("logprobs") or {}
        tokens = list(lp.get("tokens") or [])
        lps = [float(x) if x is not None else float("nan") for x in (lp.get("token_logprobs") or [])]
        tops = [dict(d or {}) for d in (lp.get("top_logprobs") or [])]
    usage = {k: int(v) for k, v in (data.get("usage") or {}).items() if isinstance(v, int)}
    return {"text": text, "tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
            "finish_reason": c.get("finish_reason"), "usage": usage}


class APITeacher:
    """An OpenAI-compatible teacher. Use :meth:`run` (sync) or :meth:`arun` (async) for many requests.

    A request is ``{"messages": [...], **params}`` (chat) or ``{"prompt": "...", **params}`` (completion).
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None,
                 store: ResponseStore | str | None = None, concurrency: int = 8, timeout: float = 60.0,
                 max_retries: int = 4, backoff_base: float = 0.5, backoff_max: float = 20.0,
                 max_requests: int | None = None, max_tokens_budget: int | None = None,
                 transport: Any = None) -> None:
        if concurrency < 1:
            raise KDistillError(f"concurrency: got {concurrency}, expected an integer >= 1.")
        if timeout <= 0:
            raise KDistillError(f"timeout: got {timeout}, expected seconds > 0.")
        if not base_url.startswith(("http://", "https://")):
            raise KDistillError(f"base_url: got {base_url!r}, expected an http(s) URL such as "
                                "'http://127.0.0.1:8000/v1'.")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = check_api_key_env(api_key_env)
        self.store = ResponseStore(store) if isinstance(store, str) else store
        self.concurrency = int(concurrency)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.max_requests = max_requests
        self.max_tokens_budget = max_tokens_budget
        self.transport = transport
        self.counters = {"requests_sent": 0, "responses_ok": 0, "cached": 0, "retries": 0, "errors": 0,
                         "skipped_budget": 0, "deduplicated": 0, "prompt_tokens": 0, "completion_tokens": 0,
                         "http_statuses": {}, "latency_seconds_sum": 0.0}
        self._reserved = 0  # requests sent or in flight, for the request budget
        self._inflight: dict[str, asyncio.Future] = {}

    # ---------------------------------------------------------------- setup

    def api_key(self) -> str | None:
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise KDistillError(f"teacher API key: environment variable {self.api_key_env!r} is not set; expected "
                                f"it to hold the key for {self.base_url}. Fix: `export {self.api_key_env}=...` "
                                "(never put the key itself in the recipe), or remove api_key_env for a server "
                                "without authentication.")
        return key

    def _headers(self) -> dict[str, str]:
        key = self.api_key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _client(self) -> Any:
        import httpx

        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        kw: dict[str, Any] = {"base_url": self.base_url, "timeout": self.timeout, "limits": limits,
                              "headers": self._headers()}
        if self.transport is not None:
            kw["transport"] = self.transport
        return httpx.AsyncClient(**kw)

    async def apreflight(self) -> list[str]:
        """Check key, reachability, authentication and the model name; returns the served model ids."""
        import httpx

        self.api_key()
        try:
            async with self._client() as c:
                r = await c.get("/models", timeout=min(self.timeout, 10.0))
        except (httpx.TransportError, OSError) as e:
            raise KDistillError(f"teacher endpoint {self.base_url} is unreachable ({type(e).__name__}: {e}); "
                                "expected an OpenAI-compatible server. Fix: start it (e.g. `kdistill serve "
                                "smollm2-135m`) or correct teacher.base_url.") from None
        if r.status_code in (401, 403):
            raise KDistillError(f"teacher endpoint {self.base_url} rejected the API key (HTTP {r.status_code}). "
                                f"Fix: check the key in ${self.api_key_env or '<api_key_env unset>'}.")
        if r.status_code != 200:
            raise KDistillError(f"teacher endpoint {self.base_url}/models answered HTTP {r.status_code}; expected "
                                "200 from an OpenAI-compatible server. Check teacher.base_url (it usually ends "
                                "in /v1).")
        try:
            ids = [m["id"] for m in r.json().get("data", [])]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise KDistillError(f"teacher endpoint {self.base_url}/models did not return an OpenAI model list; "
                                "check teacher.base_url (it usually ends in /v1).") from None
        if ids and self.model not in ids:
            m = close_matches(self.model, ids)
            hint = f" Did you mean {' or '.join(repr(x) for x in m)}?" if m else ""
            raise KDistillError(f"teacher model {self.model!r} is not served by {self.base_url}.{hint} "
                                f"Served: {', '.join(ids[:20])}.")
        return ids

    def preflight(self) -> list[str]:
        return asyncio.run(self.apreflight())

    # ---------------------------------------------------------------- requests

    def _budget_left(self) -> bool:
        if self.max_requests is not None and self._reserved >= self.max_requests:
            return False
        used = self.counters["prompt_tokens"] + self.counters["completion_tokens"]
        return not (self.max_tokens_budget is not None and used >= self.max_tokens_budget)

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.backoff_max)
            except ValueError:
                pass
        cap = min(self.backoff_max, self.backoff_base * (2 ** attempt))
        return random.uniform(0.0, cap)  # full jitter: spreads retries of many clients

    async def _one(self, client: Any, sem: asyncio.Semaphore, request: Mapping[str, Any]) -> TeacherReply:
        if "messages" in request:
            endpoint, path = "chat", "/chat/completions"
        elif "prompt" in request:
            endpoint, path = "completions", "/completions"
        else:
            raise KDistillError(f"teacher request: got keys {sorted(request)}, expected 'messages' (chat) or "
                                "'prompt' (completion).")
        body = {**request, "model": self.model}
        key = request_key(endpoint, self.model, body)
        if self.store is not None:
            stored = self.store.get(key)
            if stored is not None:
                self.counters["cached"] += 1
                return TeacherReply(status="ok", cached=True, key=key, raw=stored, **parse_response(endpoint, stored))
        pending = self._inflight.get(key)
        if pending is not None:  # the same request is already on its way: share its answer, send nothing
            self.counters["deduplicated"] += 1
            rep = await asyncio.shield(pending)
            return dataclasses.replace(rep, cached=rep.ok)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            rep = await self._send(client, sem, endpoint, path, body, key)
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(e)
                fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            self._inflight.pop(key, None)
        fut.set_result(rep)
        return rep

    async def _send(self, client: Any, sem: asyncio.Semaphore, endpoint: str, path: str, body: dict[str, Any],
                    key: str) -> TeacherReply:
        import httpx

        async with sem:
            if not self._budget_left():
                self.counters["skipped_budget"] += 1
                return TeacherReply(status="skipped_budget", key=key, error="budget spent")
            self._reserved += 1
            last, auth_failed = "", False
            for attempt in range(self.max_retries + 1):
                if attempt:
                    self.counters["retries"] += 1
                t0 = time.monotonic()
                retry_after = None
                try:
                    self.counters["requests_sent"] += 1
                    r = await client.post(path, json=body)
                    st = self.counters["http_statuses"]
                    st[str(r.status_code)] = st.get(str(r.status_code), 0) + 1
                    if r.status_code == 200:
                        data = r.json()
                        parsed = parse_response(endpoint, data)  # malformed JSON shape -> retried below
                        secs = time.monotonic() - t0
                        if self.store is not None:  # durable before anyone uses the answer
                            self.store.put(key, endpoint=endpoint, model=self.model, request=body, response=data,
                                           seconds=secs)
                        self.counters["responses_ok"] += 1
                        self.counters["latency_seconds_sum"] += secs
                        self.counters["prompt_tokens"] += parsed["usage"].get("prompt_tokens", 0)
                        self.counters["completion_tokens"] += parsed["usage"].get("completion_tokens", 0)
                        return TeacherReply(status="ok", attempts=attempt + 1, key=key, raw=data, **parsed)
                    msg = r.text[:300]
                    last = f"HTTP {r.status_code}: {msg}"
                    if r.status_code in (401, 403):
                        auth_failed = True
                        break
                    if r.status_code not in RETRY_STATUS:
                        break  # a 4xx will not get better by asking again
                    retry_after = r.headers.get("retry-after")
                except (httpx.TransportError, OSError) as e:  # timeouts, refused / reset connections
                    last = f"{type(e).__name__}: {e}"
                except ValueError as e:  # not JSON, or JSON without choices
                    last = f"malformed response: {e}"
                if attempt < self.max_retries:
                    await asyncio.sleep(self._delay(attempt, retry_after))
            if auth_failed:
                raise KDistillError(f"teacher endpoint {self.base_url} rejected the API key ({last}). Fix: check "
                                    f"${self.api_key_env or '<api_key_env unset>'}.")
            self.counters["errors"] += 1
            return TeacherReply(status="error", attempts=attempt + 1, key=key, error=last)

    async def arun(self, requests: Sequence[Mapping[str, Any]],
                   on_reply: Callable[[int, TeacherReply], None] | None = None) -> list[TeacherReply]:
        """Answer ``requests`` (in order). Failures come back as replies, never as exceptions (except a
        rejected API key, which stops everything)."""
        sem = asyncio.Semaphore(self.concurrency)
        t0 = time.monotonic()
        async with self._client() as client:
            async def go(i: int, req: Mapping[str, Any]) -> TeacherReply:
                rep = await self._one(client, sem, req)
                if on_reply is not None:
                    on_reply(i, rep)
                return rep

            tasks = [asyncio.create_task(go(i, r)) for i, r in enumerate(requests)]
            try:
                out = list(await asyncio.gather(*tasks))
            finally:
                for t in tasks:
                    t.cancel()
        self.counters["wall_seconds"] = self.counters.get("wall_seconds", 0.0) + time.monotonic() - t0
        return out

    def run(self, requests: Sequence[Mapping[str, Any]],
            on_reply: Callable[[int, TeacherReply], None] | None = None) -> list[TeacherReply]:
        return asyncio.run(self.arun(requests, on_reply))

    def chat(self, messages: list[dict[str, str]], **params: Any) -> TeacherReply:
        return self.run([{"messages": messages, **params}])[0]

    def complete(self, prompt: str, **params: Any) -> TeacherReply:
        return self.run([{"prompt": prompt, **params}])[0]

    def cost(self) -> dict[str, Any]:
        """Requests, cache hits, tokens and time spent so far (for reports). ``latency_seconds_sum`` adds up
        the latencies of concurrent requests; ``wall_seconds`` is the elapsed time of the ``run`` calls."""
        c = dict(self.counters)
        c["total_tokens"] = c["prompt_tokens"] + c["completion_tokens"]
        return c


# ------------------------------------------------------------------------- prompt scoring (served LM teachers)

#: the fixed text whose log-probs identify a served teacher (see :meth:`EndpointScorer.probe`)
PROBE_TEXT = ("The quick brown fox jumps over the lazy dog. In the beginning was the Word, and 1 + 2 = 3; "
              "knowledge distillation trains a small student to match a large teacher.")
#: largest difference of a probe log-prob that still counts as the same served model: batching and kernels move
#: fp32 log-probs by ~1e-5 and bf16 ones by ~1e-2; a different model moves some of them by far more
PROBE_TOLERANCE = 0.05
_TOKEN_ID = re.compile(r"token_id:(-?\d+)")


def _ids_of(tokens: Sequence[str], base_url: str) -> list[int]:
    out = []
    for s in tokens:
        m = _TOKEN_ID.fullmatch(str(s))
        if m is None:
            raise KDistillError(f"teacher endpoint {base_url} returned tokens as text ({str(s)!r}); expected token "
                                "ids ('token_id:<id>'), since text cannot be mapped back to ids unambiguously "
                                "(byte pieces often decode alike). Fix: serve the teacher with a server that "
                                "supports `return_tokens_as_token_ids` (`kdistill serve`, vLLM).")
        out.append(int(m.group(1)))
    return out


def log1m_mass(log_mass: Any) -> Any:
    """``log(1 - exp(log_mass))`` elementwise (``log_mass <= 0``; ``-inf`` at 0): the log residual outside a
    top-k whose log total mass is ``log_mass``."""
    import torch

    x = log_mass.clamp_max(0.0)
    small = x > -math.log(2.0)
    a = torch.log(-torch.expm1(torch.where(small, x, torch.full_like(x, -1.0))))
    b = torch.log1p(-torch.exp(torch.where(small, torch.full_like(x, -1.0), x)))
    return torch.where(small, a, b)


class EndpointScorer:
    """Top-k next-token log-probs of given token sequences from an OpenAI-compatible server, through an
    :class:`APITeacher` (its concurrency, retries, API key and durable store): one ``/v1/completions`` request
    per sequence with ``echo: true, logprobs: k, max_tokens: 0, return_tokens_as_token_ids: true`` and the
    sequence as token ids. One extra token (``end_id``) is appended to each sequence so that the echo also
    scores the distribution after its last token (a causal model's earlier positions do not see it).

    The served model must use the local tokenizer: :meth:`probe` checks that the server tokenises
    :data:`PROBE_TEXT` to the same ids and returns the probe's log-probs, which identify the served model."""

    def __init__(self, teacher: APITeacher, *, vocab_size: int, end_id: int) -> None:
        self.teacher = teacher
        self.vocab_size = int(vocab_size)
        self.end_id = int(end_id)

    @property
    def fingerprint(self) -> str:
        """The manifest's ``teacher_fingerprint`` of a served teacher (its log-probs are checked by the probe)."""
        return f"endpoint:{self.teacher.model}"

    def _body(self, prompt: Any, k: int) -> dict[str, Any]:
        return {"prompt": prompt, "echo": True, "logprobs": int(k), "max_tokens": 0, "temperature": 0.0,
                "return_tokens_as_token_ids": True}

    def _failed(self, rep: TeacherReply, k: int) -> KDistillError:
        err = rep.error or rep.status
        hint = ""
        if "logprobs" in err and ("400" in err or "422" in err):
            hint = (f" The server refuses {k} top log-probs per token (`kdistill serve` and hosted APIs allow at "
                    "most 20). Fix: set cache.k to what the server allows, e.g. cache.k: 20.")
        return KDistillError(f"teacher endpoint {self.teacher.base_url}: scoring a sequence failed ({err}).{hint} "
                             "Every answer received so far is stored; run `kdistill cache` again to resume.")

    def _topk_of(self, rep: TeacherReply, seq: Sequence[int], k: int) -> tuple[Any, Any, Any]:
        import torch

        n = len(seq)
        tops = rep.top_logprobs
        if len(rep.tokens) != n + 1 or len(tops) != n + 1:
            raise KDistillError(f"teacher endpoint {self.teacher.base_url}: echoed {len(rep.tokens)} tokens for a "
                                f"prompt of {n + 1} token ids; expected the prompt back token for token (echo: true, "
                                "max_tokens: 0). Fix: use a server that scores prompts (kdistill serve, vLLM).")
        if _ids_of(rep.tokens, self.teacher.base_url) != [*seq, self.end_id]:
            raise KDistillError(f"teacher endpoint {self.teacher.base_url}: the echoed token ids differ from the ids "
                                "sent; expected the server to score the ids as given (prompt as a list of ints).")
        lp = torch.empty(n, k, dtype=torch.float32)
        idx = torch.empty(n, k, dtype=torch.int64)
        for j in range(n):  # position j predicts token j + 1: echo entry j + 1
            entry = tops[j + 1] or {}
            if len(entry) < min(k, self.vocab_size):
                raise KDistillError(
                    f"teacher endpoint {self.teacher.base_url} returned {len(entry)} top log-probs per token, "
                    f"expected k={k}; the server caps them at {len(entry)}. Fix: set cache.k: {len(entry)} "
                    "(the manifest records k, and training reads it).")
            items = sorted(zip(_ids_of(list(entry), self.teacher.base_url), entry.values(), strict=True),
                           key=lambda t: -t[1])[:k]
            ids = [i for i, _ in items]
            if max(ids) >= self.vocab_size or min(ids) < 0:
                raise KDistillError(f"teacher endpoint {self.teacher.base_url} returned token id {max(ids)}, outside "
                                    f"the local tokenizer's {self.vocab_size} ids; expected the served model to use "
                                    "the same tokenizer (teacher.tokenizer).")
            idx[j] = torch.tensor(ids)
            lp[j] = torch.tensor([float(v) for _, v in items])
        return lp, idx, log1m_mass(torch.logsumexp(lp, -1))

    def score(self, sequences: Sequence[Sequence[int]], k: int) -> list[TeacherReply]:
        """The echo replies for ``sequences`` (all requests concurrently); an unanswered one raises (answers
        already received stay in the store)."""
        replies = self.teacher.run([self._body([*map(int, s), self.end_id], k) for s in sequences])
        for rep in replies:
            if not rep.ok:
                raise self._failed(rep, k)
        return replies

    def topk(self, sequences: Sequence[Sequence[int]], k: int) -> list[tuple[Any, Any, Any]]:
        """Per sequence of ``n`` tokens: ``(log-probs (n, k) fp32, ids (n, k) int64, log residual (n,) fp32)`` at
        temperature 1, position j being the distribution of token j + 1."""
        return [self._topk_of(rep, seq, k) for seq, rep in zip(sequences, self.score(sequences, k), strict=True)]

    def probe(self, tokenizer: Any, k: int = 1) -> dict[str, Any]:
        """Score :data:`PROBE_TEXT` sent as text (so the *server* tokenises it). Raises unless its ids equal the
        local tokenizer's; returns ``{"ids", "logprobs"}`` (the log-prob of each probe token but the first, 4
        decimals). Asks for ``k`` top log-probs, so a server that refuses them fails here, before any work."""
        self.teacher.preflight()
        rep = self.teacher.run([self._body(PROBE_TEXT, k)])[0]
        if not rep.ok:
            raise self._failed(rep, k)
        local = list(tokenizer(PROBE_TEXT, add_special_tokens=True)["input_ids"])
        served = _ids_of(rep.tokens, self.teacher.base_url)
        if served != local:
            first = next((i for i, (a, b) in enumerate(zip(served, local)) if a != b), min(len(served), len(local)))
            raise KDistillError(f"teacher endpoint {self.teacher.base_url} ({self.teacher.model!r}) tokenises the "
                                f"probe text to {len(served)} ids, the local tokenizer to {len(local)} (first "
                                f"difference at token {first}); expected the same tokenizer, since cached targets "
                                "are indexed by token id. Fix: set teacher.tokenizer to the served model's "
                                "tokenizer (its folder or hub id).")
        if rep.top_logprobs and len(rep.top_logprobs[-1] or {}) < min(k, self.vocab_size):
            raise KDistillError(f"teacher endpoint {self.teacher.base_url} returned {len(rep.top_logprobs[-1] or {})} "
                                f"top log-probs per token, expected k={k}; the server caps them. Fix: set cache.k: "
                                f"{len(rep.top_logprobs[-1] or {})}.")
        return {"ids": served, "logprobs": [round(float(v), 4) for v in rep.token_logprobs[1:]]}


def probe_difference(stored: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """None when two :meth:`EndpointScorer.probe` results come from the same served model (same probe ids,
    log-probs within :data:`PROBE_TOLERANCE`), else what differs."""
    if list(stored.get("ids", [])) != list(current.get("ids", [])):
        return "the probe text tokenises to other ids (another tokenizer)"
    a, b = stored.get("logprobs", []), current.get("logprobs", [])
    if len(a) != len(b):
        return "the probe has another number of log-probs"
    worst = max((abs(float(x) - float(y)) for x, y in zip(a, b, strict=True)), default=0.0)
    if not worst <= PROBE_TOLERANCE:
        return (f"its log-probs on the probe text differ by up to {worst:.4f} (tolerance {PROBE_TOLERANCE}): "
                "another model or other weights")
    return None


class ServedLM:
    """A served teacher standing in for a Hugging Face causal LM where the llm task only *evaluates* it (held-out
    perplexity, agreement, greedy generations): ``model(input_ids=, attention_mask=).logits`` and
    ``model.generate(...)`` through the server. The logits are log-probs: the server's top ``k`` at each position,
    the exact log-prob of the token that follows, and the remaining mass spread evenly over the other ids -- so
    perplexity and top-1 agreement are exact, a top-k KL beyond ``k`` is an approximation. It has no
    parameters (the report counts 0)."""

    def __init__(self, scorer: EndpointScorer, *, k: int) -> None:
        self.scorer, self.k = scorer, int(k)
        self.config = type("ServedConfig", (), {"vocab_size": scorer.vocab_size})()
        self.training = False

    # the parts of nn.Module the llm task touches
    def eval(self) -> ServedLM:
        return self

    def train(self, mode: bool = True) -> ServedLM:
        return self

    def requires_grad_(self, flag: bool = True) -> ServedLM:
        return self

    def parameters(self) -> Any:
        return iter(())

    def buffers(self) -> Any:
        return iter(())

    def __call__(self, input_ids: Any, attention_mask: Any = None, **_: Any) -> Any:
        import torch

        ids = input_ids.cpu()
        attn = torch.ones_like(ids) if attention_mask is None else attention_mask.cpu()
        B, T = ids.shape
        V = self.scorer.vocab_size
        logits = torch.full((B, T, V), -math.inf)
        rows = [ids[b][attn[b].bool()].tolist() for b in range(B)]
        replies = self.scorer.score(rows, self.k)
        for b, (seq, rep) in enumerate(zip(rows, replies, strict=True)):
            lp, idx, res = self.scorer._topk_of(rep, seq, self.k)
            pos = attn[b].bool().nonzero().squeeze(-1)
            nxt = torch.tensor([*seq[1:], self.scorer.end_id])
            exact = torch.tensor([float(v) for v in rep.token_logprobs[1:]])
            outside = ~(idx == nxt.unsqueeze(-1)).any(-1)
            rest = (res.exp() - torch.where(outside, exact.exp(), 0.0)).clamp_min(1e-30)
            others = (V - self.k - outside.long()).clamp_min(1)
            row = (rest / others).log().unsqueeze(-1).expand(len(seq), V).clone()
            row.scatter_(-1, idx, lp)
            row[torch.arange(len(seq)), nxt] = exact
            logits[b, pos] = row
        return type("ServedOutput", (), {"logits": logits.to(input_ids.device)})()

    def generate(self, input_ids: Any, attention_mask: Any = None, max_new_tokens: int = 16,
                 pad_token_id: int | None = None, **_: Any) -> Any:
        """Greedy continuations (temperature 0) from the server, as ``(B, T + new)`` ids padded with
        ``pad_token_id``."""
        import torch

        rows = [r.tolist() for r in input_ids.cpu()]
        reqs = [{"prompt": r, "max_tokens": int(max_new_tokens), "temperature": 0.0, "logprobs": 0,
                 "return_tokens_as_token_ids": True} for r in rows]
        new = []
        for rep in self.scorer.teacher.run(reqs):
            if not rep.ok:
                raise self.scorer._failed(rep, 0)
            new.append(_ids_of(rep.tokens, self.scorer.teacher.base_url))
        width = max(map(len, new), default=0)
        pad = 0 if pad_token_id is None else int(pad_token_id)
        out = torch.full((len(rows), input_ids.shape[1] + width), pad, dtype=torch.long)
        out[:, : input_ids.shape[1]] = input_ids.cpu()
        for i, g in enumerate(new):
            out[i, input_ids.shape[1]:input_ids.shape[1] + len(g)] = torch.tensor(g, dtype=torch.long)
        return out.to(input_ids.device)
