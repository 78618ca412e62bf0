"""``kdistill serve MODEL``: an OpenAI-compatible HTTP server for a local Hugging Face causal LM.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (with
``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``n``, ``logit_bias`` and log-probs:
chat ``logprobs``/``top_logprobs``, completions ``logprobs=<k>``), plus ``GET /v1/stats`` (counters).

Prompt scoring, as in vLLM and the legacy OpenAI API: ``/v1/completions`` with ``echo: true, logprobs: k,
max_tokens: 0`` returns the log-prob of every prompt token given the tokens before it and the top-k of each of
those distributions (``choices[0].logprobs``: ``tokens``, ``token_logprobs`` (the first ``null``),
``top_logprobs`` (``{token: logprob}``, the first ``null``), ``text_offset``). ``prompt`` may be token ids (a
list of ints, or a list of such lists) so a client scores exactly the ids it tokenised, and
``return_tokens_as_token_ids: true`` (vLLM's extension) names tokens ``"token_id:<id>"`` instead of their text,
which is unambiguous (byte-level pieces often decode to the same string). With ``max_tokens > 0`` the generated
tokens follow the echoed prompt.

* Binds ``127.0.0.1`` unless told otherwise; an optional bearer token (``--api-key-env``).
* Limits with 4xx errors that say why: request body size (413), ``max_tokens`` / prompt length /
  ``top_logprobs`` / ``n`` (400), a full queue (503 with ``Retry-After``), wrong model (404).
* Concurrent requests are batched: an asyncio queue feeds one worker that takes up to
  ``max_batch_size`` waiting requests (waiting at most ``batch_wait_ms`` for company) and decodes them
  together in one left-padded forward pass per token with a KV cache. Sampling, temperature, seed,
  ``max_tokens``, stop strings and ``logit_bias`` are per request, so any requests can share a batch.
  A request that cannot be decoded never fails the others of its batch: a failed batch is decoded again one
  request at a time, and only the request that fails alone gets a 500. ``seed`` is a signed 64-bit integer
  (as in the OpenAI API); a seed outside that range is a 400.
* The model loads through the one loader, :func:`kdistill.teachers.lm.load_causal_lm`; :func:`serve` checks
  every option, the API key variable and the address (binding the port) before it loads anything.

Reported log-probs are those of the model's distribution after ``logit_bias`` and before
temperature / top-p (what the model thinks; the sampling knobs only change which token is picked).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import KDistillError

_FALLBACK_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # OpenAI's schema: a signed 64-bit integer


# ------------------------------------------------------------------------------------------ loading


def load_served_lm(model: str, *, dtype: str = "float32") -> tuple[Any, Any, str]:
    """``(model, tokenizer, served_name)`` through the one loader, :func:`kdistill.teachers.lm.load_causal_lm`
    (zoo name, saved folder, or -- online -- a hub id); the served name is the zoo name / hub id as given, or
    the folder's name."""
    from .lm import load_causal_lm, served_name

    lm, tok = load_causal_lm(model, dtype=dtype)
    return lm, tok, served_name(model)


# --------------------------------------------------------------------------------------- generation


@dataclass
class GenRequest:
    """One sequence to continue. ``top_logprobs`` < 0 means no log-probs are wanted."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_logprobs: int = -1
    logit_bias: dict[int, float] = field(default_factory=dict)
    echo: bool = False  # also score the prompt: GenResult.prompt_logprobs / prompt_top_logprobs


@dataclass
class GenResult:
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    #: with ``echo``: log-prob of each prompt token given the tokens before it (None for the first), and the
    #: top ``top_logprobs`` entries of that distribution (None for the first; empty lists when top_logprobs <= 0)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)


class Generator:
    """Batched incremental decoding with a KV cache (left padding, per-row sampling parameters)."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tok = tokenizer
        self.eos_ids = set()
        for src in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
            e = getattr(src, "eos_token_id", None)
            if e is not None:
                self.eos_ids.update(e if isinstance(e, (list, tuple)) else [e])
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0))
        self.vocab = int(model.get_input_embeddings().weight.shape[0])
        self.device = next(model.parameters()).device

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    @torch.no_grad()
    def generate(self, reqs: Sequence[GenRequest]) -> list[GenResult]:
        b = len(reqs)
        length = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((b, length), self.pad_id, dtype=torch.long)
        attn = torch.zeros((b, length), dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, length - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            attn[i, length - len(r.prompt_ids):] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        pos = (attn.cumsum(-1) - 1).clamp_min(0)
        gens = []
        for r in reqs:
            g = torch.Generator()
            # torch takes seeds in [-2**63, 2**64); seed + i (n > 1) may leave it, so wrap modulo 2**64
            g.manual_seed(int(r.seed) % 2**64 if r.seed is not None else secrets.randbits(63))
            gens.append(g)
        bias = torch.zeros((b, self.vocab))
        for i, r in enumerate(reqs):
            for t, v in r.logit_bias.items():
                if 0 <= t < self.vocab:
                    bias[i, t] = float(v)
        out_ids: list[list[int]] = [[] for _ in reqs]
        out_lp: list[list[float]] = [[] for _ in reqs]
        out_top: list[list[list[tuple[int, float]]]] = [[] for _ in reqs]
        finish = [""] * b
        texts: list[str | None] = [None] * b  # set when a stop string ended the row
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
        past = out.past_key_values
        echoed = [self._score_prompt(out.logits[i], r, bias[i], length) if r.echo else ([], [])
                  for i, r in enumerate(reqs)]
        logits = out.logits[:, -1].float().cpu()
        for i, r in enumerate(reqs):
            if r.max_tokens <= 0:  # echo only (prompt scoring): nothing to generate
                finish[i] = "length"
        steps = max(r.max_tokens for r in reqs)
        for step in range(steps):
            logp = torch.log_softmax(logits[:, : self.vocab] + bias, dim=-1)
            nxt = torch.full((b,), self.pad_id, dtype=torch.long)
            for i, r in enumerate(reqs):
                if finish[i]:
                    continue
                if r.temperature <= 0:
                    tok = int(torch.argmax(logp[i]))
                else:
                    p = torch.softmax((logits[i, : self.vocab] + bias[i]) / r.temperature, dim=-1)
                    if r.top_p < 1.0:
                        sp, si = torch.sort(p, descending=True)
                        keep = sp.cumsum(0) - sp < r.top_p
                        p = torch.zeros_like(p).scatter(0, si[keep], sp[keep])
                    tok = int(torch.multinomial(p, 1, generator=gens[i]))
                nxt[i] = tok
                out_ids[i].append(tok)
                out_lp[i].append(float(logp[i, tok]))
                if r.top_logprobs > 0:
                    v, k = torch.topk(logp[i], min(r.top_logprobs, self.vocab))
                    out_top[i].append([(int(a), float(c)) for a, c in zip(k, v, strict=True)])
                elif r.top_logprobs == 0:
                    out_top[i].append([])
                if tok in self.eos_ids:
                    out_ids[i].pop()
                    out_lp[i].pop()
                    if r.top_logprobs >= 0:
                        out_top[i].pop()
                    finish[i] = "stop"
                    continue
                if r.stop:
                    text = self.decode(out_ids[i])
                    cut = min((text.find(s) for s in r.stop if s and s in text), default=-1)
                    if cut >= 0:
                        texts[i] = text[:cut]
                        finish[i] = "stop"
                        continue
                if len(out_ids[i]) >= r.max_tokens:
                    finish[i] = "length"
            if all(finish) or step == steps - 1:
                break
            attn = torch.cat([attn, torch.ones((b, 1), dtype=attn.dtype, device=self.device)], dim=1)
            pos = pos[:, -1:] + 1
            out = self.model(input_ids=nxt.unsqueeze(1).to(self.device), attention_mask=attn, position_ids=pos,
                             past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1].float().cpu()
        results = []
        for i, r in enumerate(reqs):
            text = texts[i] if texts[i] is not None else self.decode(out_ids[i])
            results.append(GenResult(out_ids[i], text, finish[i] or "length", out_lp[i], out_top[i], *echoed[i]))
        return results

    def _score_prompt(self, row_logits: torch.Tensor, r: GenRequest, bias: torch.Tensor, length: int
                      ) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
        """Log-probs of the prompt's own tokens from the prefill logits ``(length, V)`` of its (left-padded) row:
        token j is scored by the distribution at position j - 1 (after ``logit_bias``, like generated tokens)."""
        n = len(r.prompt_ids)
        lps: list[float | None] = [None]
        tops: list[list[tuple[int, float]] | None] = [None]
        if n < 2:
            return lps, tops
        logp = torch.log_softmax(row_logits[length - n:length - 1, : self.vocab].float().cpu() + bias, dim=-1)
        nxt = torch.tensor(r.prompt_ids[1:], dtype=torch.long)
        lps += logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1).tolist()
        if r.top_logprobs > 0:
            v, k = torch.topk(logp, min(r.top_logprobs, self.vocab), dim=-1)
            tops += [list(zip(ki.tolist(), vi.tolist(), strict=True)) for ki, vi in zip(k, v, strict=True)]
        else:
            tops += [[] for _ in range(n - 1)]
        return lps, tops


# ------------------------------------------------------------------------------------------- server


@dataclass
class ServeLimits:
    """Server limits; requests beyond them get a 4xx that names the limit and the fix."""

    max_tokens: int = 512
    max_prompt_tokens: int = 2048
    max_request_bytes: int = 1_000_000
    max_top_logprobs: int = 20
    max_n: int = 8
    max_batch_size: int = 8
    batch_wait_ms: float = 5.0
    max_queue: int = 256


@dataclass
class Faults:
    """Deterministic fault injection for reliability tests (off unless given to ``create_app``): every
    ``error_every``-th generation request gets a 500, every ``malformed_every``-th a 200 whose body is not
    JSON, every ``delay_every``-th is held ``delay_s`` seconds before it is served. Counted per request
    (1-based) across both generation endpoints."""

    error_every: int = 0
    malformed_every: int = 0
    delay_every: int = 0
    delay_s: float = 0.0


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


@dataclass
class _Job:
    req: GenRequest
    future: asyncio.Future


class BatchingEngine:
    """asyncio queue -> one worker that runs ``Generator.generate`` on batches in a thread."""

    def __init__(self, generator: Generator, limits: ServeLimits) -> None:
        self.gen = generator
        self.limits = limits
        self.queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self.batches = 0
        self.batched_sequences = 0
        self.max_batch_seen = 0
        self.failed_batches = 0  # batches that failed together and were decoded again one job at a time
        self.failed_sequences = 0  # jobs that failed even alone (answered 500)

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._worker:
            self._worker.cancel()

    async def submit(self, reqs: Sequence[GenRequest]) -> list[GenResult]:
        assert self.queue is not None
        if self.queue.qsize() + len(reqs) > self.limits.max_queue:
            raise APIError(503, f"server busy: {self.queue.qsize()} sequences already queued (limit "
                           f"{self.limits.max_queue}); retry after a short wait.", "server_busy",
                           headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        jobs = [_Job(r, loop.create_future()) for r in reqs]
        for j in jobs:
            self.queue.put_nowait(j)
        return list(await asyncio.gather(*(j.future for j in jobs)))

    async def _run(self) -> None:
        assert self.queue is not None
        while True:
            first = await self.queue.get()
            batch = [first]
            deadline = time.monotonic() + self.limits.batch_wait_ms / 1000.0
            while len(batch) < self.limits.max_batch_size:
                left = deadline - time.monotonic()
                try:
                    batch.append(self.queue.get_nowait() if left <= 0 else
                                 await asyncio.wait_for(self.queue.get(), left))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
            batch = [j for j in batch if not j.future.cancelled()]
            if not batch:
                continue
            self.batches += 1
            self.batched_sequences += len(batch)
            self.max_batch_seen = max(self.max_batch_seen, len(batch))
            await self._generate(batch)

    async def _generate(self, batch: list[_Job]) -> None:
        """Decode ``batch`` together; if that fails, decode each job alone, so only the job that fails
        alone gets an error and every other job of the batch still gets its answer."""
        try:
            results = await asyncio.to_thread(self.gen.generate, [j.req for j in batch])
        except Exception as e:  # noqa: BLE001 - one failing request must not fail the others or the worker
            if len(batch) == 1:
                self.failed_sequences += 1
                if not batch[0].future.done():
                    batch[0].future.set_exception(APIError(500, f"generation failed: {type(e).__name__}: {e}",
                                                           "server_error"))
                return
            self.failed_batches += 1
            for j in batch:
                if not j.future.done():
                    await self._generate([j])
            return
        for j, res in zip(batch, results, strict=True):
            if not j.future.done():
                j.future.set_result(res)


from pydantic import BaseModel, ConfigDict, field_validator  # noqa: E402


class Message(BaseModel):
    """One chat message (OpenAI format; content parts are reduced to their text)."""
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None

class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we do not use (user, ...)
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, v: int | None) -> int | None:
        if v is not None and not SEED_MIN <= v <= SEED_MAX:
            raise ValueError(f"got {v}, expected an integer from -2**63 to 2**63-1 (a signed 64-bit integer, as in "
                             "the OpenAI API); send a smaller seed")
        return v

class ChatRequest(_Common):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

class CompletionRequest(_Common):
    """``prompt``: a string, a list of strings, a list of token ids or a list of token-id lists (as in the OpenAI
    API). ``return_tokens_as_token_ids`` (a vLLM extension): log-prob tokens come as ``"token_id:<id>"``."""
    prompt: str | list[int] | list[list[int]] | list[str]
    logprobs: int | None = None
    echo: bool = False
    return_tokens_as_token_ids: bool = False


def _token_str(gen: Generator, tid: int, as_id: bool = False) -> str:
    return f"token_id:{tid}" if as_id else gen.tok.decode([tid])


def create_app(model: Any, tokenizer: Any, model_name: str, *, api_key: str | None = None,
               limits: ServeLimits | None = None, faults: Faults | None = None,
               record_requests: bool = False) -> Any:
    """The FastAPI app serving ``model`` under ``model_name``. ``app.state.stats`` counts requests."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response

    limits = limits or ServeLimits()
    gen = Generator(model, tokenizer)
    engine = BatchingEngine(gen, limits)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    created = int(time.time())

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app: Any):
        await engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="kdistill serve", lifespan=lifespan)
    app.state.stats = {"requests": 0, "by_status": {}, "by_path": {}, "prompt_tokens": 0, "completion_tokens": 0}
    app.state.engine = engine
    app.state.num_params = sum(p.numel() for p in model.parameters())
    app.state.fault_counter = 0
    # (endpoint, prompt or last message) of every generation request that reached the model; only kept
    # when asked for (tests count requests with it), so a long-running server does not grow without bound
    app.state.request_log = [] if record_requests else None

    def error_response(status: int, message: str, type_: str, param: str | None = None,
                       headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}},
                            status_code=status, headers=headers)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        stats = app.state.stats
        stats["requests"] += 1
        stats["by_path"][request.url.path] = stats["by_path"].get(request.url.path, 0) + 1

        def done(resp: Any) -> Any:
            stats["by_status"][str(resp.status_code)] = stats["by_status"].get(str(resp.status_code), 0) + 1
            return resp

        if api_key is not None:
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(given.encode(), api_key.encode()):
                return done(error_response(401, "missing or wrong API key: expected header "
                                           "'Authorization: Bearer <key>' with the key the server was started with.",
                                           "authentication_error"))
        if request.method == "POST":
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limits.max_request_bytes:
                return done(error_response(413, f"request body is {declared} bytes; this server accepts at most "
                                           f"{limits.max_request_bytes} (start it with --max-request-bytes to raise "
                                           "the limit).", "request_too_large"))
            body = await request.body()
            if len(body) > limits.max_request_bytes:
                return done(error_response(413, f"request body is {len(body)} bytes; this server accepts at most "
                                           f"{limits.max_request_bytes}.", "request_too_large"))
            if faults is not None and request.url.path.endswith("completions"):
                app.state.fault_counter += 1
                n = app.state.fault_counter
                if faults.error_every and n % faults.error_every == 0:
                    return done(error_response(500, "injected fault: internal error", "server_error"))
                if faults.malformed_every and n % faults.malformed_every == 0:
                    return done(Response("{not json", status_code=200, media_type="application/json"))
                if faults.delay_every and n % faults.delay_every == 0:
                    try:
                        await asyncio.sleep(faults.delay_s)
                    except asyncio.CancelledError:  # server shutting down while a fault delay is pending
                        return done(error_response(503, "server shutting down", "server_busy"))
        return done(await call_next(request))

    @app.exception_handler(APIError)
    async def _api_error(_r: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_r: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            msg = str(err.get("msg", ""))
            msg = msg.removeprefix("Value error, ")  # our own validators' messages stand on their own
            parts.append(f"{loc or 'body'}: {msg}")
        return error_response(400, "invalid request: " + "; ".join(parts), "invalid_request_error")

    def check_common(r: _Common) -> int:
        if r.model != model_name:
            raise APIError(404, f"model {r.model!r} not found; this server serves {model_name!r}.", "not_found",
                           "model")
        if r.stream:
            raise APIError(400, "stream=true is not supported by kdistill serve; send stream=false.", param="stream")
        if not 1 <= r.n <= limits.max_n:
            raise APIError(400, f"n: got {r.n}, expected 1..{limits.max_n}.", param="n")
        if not 0.0 <= r.temperature <= 2.0:
            raise APIError(400, f"temperature: got {r.temperature}, expected 0..2.", param="temperature")
        if not 0.0 < r.top_p <= 1.0:
            raise APIError(400, f"top_p: got {r.top_p}, expected (0, 1].", param="top_p")
        return r.n

    def max_tokens_of(value: int | None) -> int:
        mt = limits.max_tokens if value is None else value
        if mt < 1:
            raise APIError(400, f"max_tokens: got {mt}, expected >= 1 (0 only with echo=true on /v1/completions, "
                           "which scores the prompt).", param="max_tokens")
        if mt > limits.max_tokens:
            raise APIError(400, f"max_tokens: got {mt}, expected <= {limits.max_tokens} (this server's limit; "
                           "start it with --max-tokens-limit to raise it).", param="max_tokens")
        return mt

    def encode_prompt(ids: list[int]) -> list[int]:
        if not ids:
            bos = tokenizer.bos_token_id
            ids = [bos if bos is not None else gen.pad_id]
        if len(ids) > limits.max_prompt_tokens:
            raise APIError(400, f"prompt is {len(ids)} tokens; this server accepts at most "
                           f"{limits.max_prompt_tokens} (shorten it or start the server with a higher "
                           "--max-prompt-tokens).", param="messages")
        return ids

    def bias_of(r: _Common) -> dict[int, float]:
        out = {}
        for k, v in (r.logit_bias or {}).items():
            if not k.lstrip("-").isdigit():
                raise APIError(400, f"logit_bias key {k!r} is not a token id; expected integer strings.",
                               param="logit_bias")
            out[int(k)] = max(-100.0, min(100.0, float(v)))
        return out

    def stops_of(r: _Common) -> list[str]:
        return [r.stop] if isinstance(r.stop, str) else list(r.stop or [])

    def gen_requests(prompt_ids: list[int], r: _Common, mt: int, top: int) -> list[GenRequest]:
        return [GenRequest(prompt_ids, mt, r.temperature, r.top_p, None if r.seed is None else r.seed + i,
                           stops_of(r), top, bias_of(r)) for i in range(r.n)]

    def account(prompt_len: int, results: list[GenResult]) -> dict[str, int]:
        comp = sum(len(x.token_ids) for x in results)
        app.state.stats["prompt_tokens"] += prompt_len
        app.state.stats["completion_tokens"] += comp
        return {"prompt_tokens": prompt_len, "completion_tokens": comp, "total_tokens": prompt_len + comp}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "kdistill"}]}

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        return {**app.state.stats, "batches": engine.batches, "batched_sequences": engine.batched_sequences,
                "max_batch": engine.max_batch_seen, "queued": engine.queue.qsize() if engine.queue else 0,
                "failed_batches": engine.failed_batches, "failed_sequences": engine.failed_sequences}

    @app.post("/v1/chat/completions")
    async def chat(r: ChatRequest) -> dict[str, Any]:
        check_common(r)
        mt = max_tokens_of(r.max_completion_tokens if r.max_completion_tokens is not None else r.max_tokens)
        top = -1
        if r.logprobs:
            top = r.top_logprobs or 0
            if not 0 <= top <= limits.max_top_logprobs:
                raise APIError(400, f"top_logprobs: got {top}, expected 0..{limits.max_top_logprobs}.",
                               param="top_logprobs")
        elif r.top_logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true.", param="top_logprobs")
        if not r.messages:
            raise APIError(400, "messages: got an empty list, expected at least one message.", param="messages")
        msgs = []
        for m in r.messages:
            content = m.content
            if isinstance(content, list):  # OpenAI content parts: keep the text parts
                content = "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
            msgs.append({"role": m.role, "content": content or ""})
        if has_template:
            ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            ids = list(ids)
        else:
            from jinja2 import Template

            ids = tokenizer(Template(_FALLBACK_TEMPLATE).render(messages=msgs), add_special_tokens=True)["input_ids"]
        ids = encode_prompt(list(ids))
        if app.state.request_log is not None:
            app.state.request_log.append(("chat", msgs[-1]["content"]))
        results = await engine.submit(gen_requests(ids, r, mt, top))
        choices = []
        for i, res in enumerate(results):
            choice: dict[str, Any] = {"index": i, "message": {"role": "assistant", "content": res.text},
                                      "finish_reason": res.finish_reason, "logprobs": None}
            if r.logprobs:
                content = []
                for tid, lp, tops in zip(res.token_ids, res.logprobs, res.top_logprobs, strict=False):
                    s = _token_str(gen, tid)
                    content.append({"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")),
                                    "top_logprobs": [{"token": _token_str(gen, t), "logprob": v,
                                                      "bytes": list(_token_str(gen, t).encode("utf-8"))}
                                                     for t, v in tops]})
                choice["logprobs"] = {"content": content}
            choices.append(choice)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name, "choices": choices, "usage": account(len(ids), results)}

    def prompt_list(prompt: str | list[int] | list[list[int]] | list[str]) -> list[str | list[int]]:
        """The prompts of a completion request: strings, or token-id lists."""
        if isinstance(prompt, str):
            prompts: list[Any] = [prompt]
        elif prompt and all(isinstance(x, int) for x in prompt):
            prompts = [list(prompt)]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError(400, "prompt: got an empty list, expected a string, a list of strings, a list of token "
                           "ids or a list of token-id lists.", param="prompt")
        return prompts

    def prompt_ids(prompts: list[str | list[int]]) -> list[list[int]]:
        """Each prompt as token ids: strings are tokenised, token ids taken as they are (so a client scores
        exactly the ids it tokenised)."""
        out = []
        for p in prompts:
            if isinstance(p, str):
                out.append(encode_prompt(list(tokenizer(p, add_special_tokens=True)["input_ids"])))
                continue
            bad = [t for t in p if not 0 <= t < gen.vocab]
            if bad:
                raise APIError(400, f"prompt: token id {bad[0]} is outside this model's vocabulary (0..{gen.vocab - 1})"
                               "; send ids from the served model's tokenizer.", param="prompt")
            out.append(encode_prompt(list(p)))
        return out

    @app.post("/v1/completions")
    async def completions(r: CompletionRequest) -> dict[str, Any]:
        check_common(r)
        if r.echo and r.max_tokens == 0:  # score the prompt only (the legacy OpenAI / vLLM form)
            mt = 0
        else:
            mt = max_tokens_of(r.max_tokens if r.max_tokens is not None else min(16, limits.max_tokens))  # OpenAI: 16
        top = -1
        if r.logprobs is not None:
            top = r.logprobs
            if not 0 <= top <= limits.max_top_logprobs:
                raise APIError(400, f"logprobs: got {top}, expected 0..{limits.max_top_logprobs} (this server's "
                               "limit of top log-probs per token).", param="logprobs")
        prompts = prompt_list(r.prompt)
        id_lists = prompt_ids(prompts)
        if app.state.request_log is not None:
            app.state.request_log.extend(("completions", p) for p in prompts)
        reqs = [g for ids in id_lists for g in gen_requests(ids, r, mt, top)]
        for g in reqs:
            g.echo = r.echo
        results = await engine.submit(reqs)
        as_id = r.return_tokens_as_token_ids
        choices = []
        for i, res in enumerate(results):
            ids, source = id_lists[i // r.n], prompts[i // r.n]
            lp_obj = None
            if r.logprobs is not None:
                token_ids = (ids if r.echo else []) + res.token_ids
                toks = [_token_str(gen, t, as_id) for t in token_ids]
                text_toks = [_token_str(gen, t) for t in token_ids]
                offsets, pos = [], 0
                for s in text_toks:
                    offsets.append(pos)
                    pos += len(s)
                tops_all = (res.prompt_top_logprobs if r.echo else []) + res.top_logprobs
                lp_obj = {"tokens": toks, "token_logprobs": (res.prompt_logprobs if r.echo else []) + res.logprobs,
                          "top_logprobs": [None if tops is None else {_token_str(gen, t, as_id): v for t, v in tops}
                                           for tops in tops_all],
                          "text_offset": offsets}
            echoed = (source if isinstance(source, str) else gen.decode(ids)) if r.echo else ""
            text = echoed + res.text
            choices.append({"index": i, "text": text, "finish_reason": res.finish_reason, "logprobs": lp_obj})
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name, "choices": choices,
                "usage": account(sum(len(x) for x in id_lists), results)}

    return app


# ------------------------------------------------------------------------------------- running it


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket bound to ``(host, port)`` (IPv4 or IPv6, ``SO_REUSEADDR`` like uvicorn);
    failures are one :class:`KDistillError` that says why and what to change."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise KDistillError(f"host: got {host!r}, which does not resolve ({e}); expected an address of this machine "
                            "such as 127.0.0.1 (loopback, the default) or 0.0.0.0 (all interfaces).") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise KDistillError(f"cannot listen on {host}:{port}: {e.strerror or e}; expected a free port on an address "
                            "of this machine. Fix: choose another --port (or stop the process using it), or "
                            "another --host.") from None
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class ServerHandle:
    """A uvicorn server running in a background thread (tests, in-process demos). ``stop()`` ends it.
    ``sock``: an already bound socket (see :func:`bind_socket`) instead of ``host``/``port``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 sock: socket.socket | None = None) -> None:
        import uvicorn

        self.app = app
        self.model_name: str | None = None
        self.sock = sock if sock is not None else bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise KDistillError(f"server on {host}:{self.port} did not start within 30 s.")
            time.sleep(0.02)

    @property
    def base_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_serve_options(*, host: str, port: int, api_key_env: str | None, max_tokens_limit: int,
                        max_prompt_tokens: int, max_request_bytes: int, max_batch_size: int, batch_wait_ms: float,
                        max_queue: int, dtype: str, threads: int | None, background: bool = False,
                        log_level: str = "info") -> None:
    """Every option of :func:`serve` checked before anything loads: one :class:`KDistillError` that lists each
    bad value with what was expected (a ``--port 99999`` fails in milliseconds, not after the model loaded)."""
    from .api import check_api_key_env

    bad: list[str] = []

    def need(ok: bool, name: str, got: object, expected: str) -> None:
        if not ok:
            bad.append(f"{name} (--{name.replace('_', '-')}): got {got!r}, expected {expected}")

    need(isinstance(host, str) and bool(host.strip()) and not any(c.isspace() for c in host), "host", host,
         "an address such as 127.0.0.1 (loopback) or 0.0.0.0 (all interfaces)")
    low = 0 if background else 1
    need(_is_int(port) and low <= port <= 65535, "port", port,
         f"an integer from {low} to 65535" + (" (0: any free port)" if background else ""))
    for name, value in (("max_tokens_limit", max_tokens_limit), ("max_prompt_tokens", max_prompt_tokens),
                        ("max_request_bytes", max_request_bytes), ("max_batch_size", max_batch_size),
                        ("max_queue", max_queue)):
        need(_is_int(value) and value >= 1, name, value, "an integer >= 1")
    need(isinstance(batch_wait_ms, (int, float)) and not isinstance(batch_wait_ms, bool)
         and 0 <= batch_wait_ms <= 60_000, "batch_wait_ms", batch_wait_ms, "milliseconds from 0 to 60000")
    need(threads is None or (_is_int(threads) and threads >= 1), "threads", threads,
         "an integer >= 1 (or leave it unset)")
    need(dtype in _DTYPE_NAMES, "dtype", dtype, f"one of {', '.join(_DTYPE_NAMES)}")
    need(log_level in _LOG_LEVELS, "log_level", log_level, f"one of {', '.join(_LOG_LEVELS)}")
    if bad:
        raise KDistillError("serve: " + "; ".join(bad) + ". Nothing was loaded; fix these options and start again.")
    check_api_key_env(api_key_env, "api_key_env (--api-key-env)")


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, api_key_env: str | None = None,
          max_tokens_limit: int = 512, max_prompt_tokens: int = 2048, max_request_bytes: int = 1_000_000,
          max_batch_size: int = 8, batch_wait_ms: float = 5.0, max_queue: int = 256, dtype: str = "float32",
          threads: int | None = None, background: bool = False, log_level: str = "info") -> ServerHandle | None:
    """Load ``model`` and serve it (blocking, or in a thread with ``background=True`` -> handle; ``port=0``
    then picks a free port). Options, the API key variable and the address are all checked -- and the port
    bound -- before the model loads. ``threads`` sets ``torch.set_num_threads`` (on a CPU shared with other
    jobs, 1 thread avoids oversubscription, which we measured to slow a 135M model down ~10x)."""
    check_serve_options(host=host, port=port, api_key_env=api_key_env, max_tokens_limit=max_tokens_limit,
                        max_prompt_tokens=max_prompt_tokens, max_request_bytes=max_request_bytes,
                        max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms, max_queue=max_queue,
                        dtype=dtype, threads=threads, background=background, log_level=log_level)
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise KDistillError(f"api_key_env {api_key_env!r}: the environment variable is not set; expected it to "
                                f"hold the bearer token clients must send. Fix: `export {api_key_env}=...`.")
    sock = bind_socket(host, port)  # a taken port or a foreign address fails now, not after loading
    try:
        if threads is not None:
            torch.set_num_threads(int(threads))
        if host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: serving on {host}: reachable from other machines"
                  + ("" if api_key else " WITHOUT an API key (use --api-key-env)"))
        lm, tok, name = load_served_lm(model, dtype=dtype)
        limits = ServeLimits(max_tokens=max_tokens_limit, max_prompt_tokens=max_prompt_tokens,
                             max_request_bytes=max_request_bytes, max_batch_size=max_batch_size,
                             batch_wait_ms=batch_wait_ms, max_queue=max_queue)
        app = create_app(lm, tok, name, api_key=api_key, limits=limits)
    except BaseException:
        sock.close()
        raise
    if background:
        handle = ServerHandle(app, host, port, log_level="warning", sock=sock)
        handle.model_name = name
        return handle
    import uvicorn

    bound = sock.getsockname()[1]
    print(json.dumps({"serving": name, "base_url": f"http://{_url_host(host)}:{bound}/v1"}), flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on")).run(sockets=[sock])
    finally:
        sock.close()
    return None
