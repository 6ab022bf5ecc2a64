"""What a prediction request passes before its body is read: the API key, the per-client rate limit and the
admission limits (uploads, heatmaps) that bound the server's temporary folders, file handles and queues.

Each check is cheap and refuses with an HTTP status and the header a client needs to do the right thing:
401 with ``WWW-Authenticate``, 429 and 503 with ``Retry-After``. Refusals close the connection
(``Connection: close``), so a body the server will not read does not keep a socket open.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Callable, Mapping

from fastapi import HTTPException

KEY_HEADER = "X-API-Key"
"""The header that may carry the key (besides ``Authorization: Bearer KEY``)."""

CLOSE = {"Connection": "close"}


def refuse(status: int, detail: str, **headers: str) -> HTTPException:
    """An HTTP error whose response closes the connection (the request body is not read)."""
    return HTTPException(status, detail, headers={**CLOSE, **{k.replace("_", "-"): v for k, v in headers.items()}})


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


class ApiKey:
    """Checks a request's key against the server's, in constant time.

    Both are hashed first, so the comparison takes the same time whatever the length or content of the
    key a client sends (:func:`hmac.compare_digest` alone reveals the length).
    """

    def __init__(self, key: str):
        self._digest = _digest(key)

    def offered(self, headers: Mapping[str, str]) -> list[str]:
        """Keys a request carries: ``Authorization: Bearer KEY`` and ``X-API-Key: KEY``."""
        keys = []
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            keys.append(token.strip())
        if headers.get(KEY_HEADER.lower(), "").strip():
            keys.append(headers[KEY_HEADER.lower()].strip())
        return keys

    def check(self, headers: Mapping[str, str]) -> None:
        """Raise 401 unless one of the request's keys is the server's (every offered key is compared)."""
        offered = self.offered(headers)
        ok = False
        for key in offered:
            ok |= hmac.compare_digest(_digest(key), self._digest)
        if not ok:
            why = "a wrong API key" if offered else "no API key"
            raise refuse(401, f"this server needs an API key and the request has {why}; send it as "
                              f"'Authorization: Bearer KEY' or '{KEY_HEADER}: KEY'",
                         WWW_Authenticate='Bearer realm="covid-cxr"')


class RateLimiter:
    """A token bucket per client address: ``per_minute`` requests a minute, in bursts of up to ``per_minute``.

    Buckets that have filled up again are forgotten (a full bucket is the same as none), so memory stays
    bounded by the clients active within the last minute.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic, max_clients: int = 10_000):
        if per_minute <= 0:
            raise ValueError(f"per_minute must be > 0, got {per_minute}")
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # tokens a second
        self.clock = clock
        self.max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, time)

    def _tokens(self, client: str, now: float) -> float:
        tokens, then = self._buckets.get(client, (self.capacity, now))
        return min(self.capacity, tokens + (now - then) * self.rate)

    def take(self, client: str) -> float:
        """Take a token for ``client``: 0 when granted, else the seconds until one is available."""
        now = self.clock()
        if len(self._buckets) >= self.max_clients:
            self._buckets = {c: (t, s) for c, (t, s) in self._buckets.items()
                             if self._tokens(c, now) < self.capacity}
        tokens = self._tokens(client, now)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            return 0.0
        self._buckets[client] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def check(self, client: str) -> None:
        """Raise 429 with ``Retry-After`` (whole seconds) when ``client`` has no token left."""
        wait = self.take(client)
        if wait > 0:
            per_minute = int(self.capacity)
            raise refuse(429, f"too many requests from this address: this server allows {per_minute} a minute; "
                              f"retry in {math.ceil(wait)} s", Retry_After=str(math.ceil(wait)))


class Slots:
    """At most ``limit`` holders at once (used on the event loop only, so a counter suffices)."""

    def __init__(self, limit: int, what: str, retry_after_s: int = 1):
        self.limit = limit
        self.what = what
        self.retry_after_s = retry_after_s
        self.used = 0

    def take(self) -> None:
        """Take a slot, or raise 503 with ``Retry-After`` when all are taken."""
        if self.used >= self.limit:
            raise refuse(503, f"the server is busy ({self.limit} {self.what} at once); retry in "
                              f"{self.retry_after_s} s", Retry_After=str(self.retry_after_s))
        self.used += 1

    def release(self) -> None:
        self.used -= 1
