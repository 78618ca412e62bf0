"""Durable store of black-box teacher responses (SQLite, WAL mode).

One row per request, keyed by a SHA-256 of the canonical JSON of ``(endpoint, model, request body)``
(messages or prompt plus every generation parameter). The API client writes the row -- and commits
it -- *before* it hands the answer to the caller, so a job killed at any point (``kill -9`` included)
and started again finds every answer it has already paid for and re-sends none of them. Only
successful responses are stored; failures are retried on the next run.

WAL mode lets several readers (a report, a second job) look at the file while one job writes, and
``synchronous=FULL`` makes each commit durable before ``put`` returns.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import KDistillError

FORMAT_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    request TEXT NOT NULL,
    response TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    seconds REAL NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces) used for hashing and storage."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_key(endpoint: str, model: str, body: Mapping[str, Any]) -> str:
    """Hash of (endpoint, model, request body without ``model``/``stream``): the store's row key.

    Any change to the messages/prompt or to a generation parameter (temperature, max_tokens, seed,
    logprobs, ...) gives a new key; key order in ``body`` does not matter.
    """
    payload = {k: v for k, v in body.items() if k not in ("model", "stream")}
    text = canonical_json({"v": FORMAT_VERSION, "endpoint": endpoint, "model": model, "body": payload})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ResponseStore:
    """A thread-safe SQLite response store.

    >>> store = ResponseStore(":memory:")
    >>> k = request_key("chat", "m", {"messages": [{"role": "user", "content": "hi"}]})
    >>> store.get(k) is None
    True
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            p = Path(self.path)
            if p.exists() and p.is_dir():
                raise KDistillError(f"response store: got directory {self.path!r}, expected a file path such as "
                                    f"{str(p / 'responses.sqlite')!r}.")
            p.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise KDistillError(f"response store {self.path!r} cannot be opened ({e}); expected an SQLite file "
                                "written by kdistill. Fix: point `store` at a new path.") from None
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('format_version', ?)", (str(FORMAT_VERSION),))
        got = self._db.execute("SELECT value FROM meta WHERE name='format_version'").fetchone()[0]
        if got != str(FORMAT_VERSION):
            raise KDistillError(f"response store {self.path!r}: format version {got}, expected {FORMAT_VERSION}. "
                                "Fix: use a new store path.")

    @property
    def journal_mode(self) -> str:
        with self._lock:
            return str(self._db.execute("PRAGMA journal_mode").fetchone()[0])

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored response JSON for ``key``, or None."""
        with self._lock:
            row = self._db.execute("SELECT response FROM responses WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM responses WHERE key=?", (key,)).fetchone() is not None

    def put(self, key: str, *, endpoint: str, model: str, request: Mapping[str, Any], response: Mapping[str, Any],
            seconds: float = 0.0) -> None:
        """Write one row and commit (durable when this returns). An existing key is kept as is."""
        usage = response.get("usage") or {}
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO responses VALUES (?,?,?,?,?,?,?,?,?)",
                (key, endpoint, model, canonical_json(dict(request)), canonical_json(dict(response)),
                 int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), float(seconds),
                 time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def keys(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT key FROM responses ORDER BY created")]

    def rows(self) -> Iterator[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT key, endpoint, model, request, response, seconds FROM responses "
                                    "ORDER BY created").fetchall()
        for key, endpoint, model, req, resp, secs in rows:
            yield {"key": key, "endpoint": endpoint, "model": model, "request": json.loads(req),
                   "response": json.loads(resp), "seconds": secs}

    def stats(self) -> dict[str, Any]:
        """Row count and summed token usage / request latencies of what is stored."""
        with self._lock:
            n, pt, ct, secs = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(prompt_tokens),0), COALESCE(SUM(completion_tokens),0), "
                "COALESCE(SUM(seconds),0) FROM responses").fetchone()
        return {"rows": int(n), "prompt_tokens": int(pt), "completion_tokens": int(ct),
                "latency_seconds_sum": float(secs)}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ResponseStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
