"""Replay shards as the writers and the sampler see them: the shard set of a run, and a client
per shard with the shard's health (backoff after a failure, reconnect after an outage).

The redis-server processes live in launcher.py, the sampler's raw RESP connection in resp.py,
the errors in errors.py.

The module runs past 400 lines because it is the one place that knows a shard's Redis layout:
the key names, insert.lua's arguments and the counters' reply are read and written only by the
client calls here, and a client's connections belong to a :class:`ShardHealth` generation
(a failure or a move makes every older connection stale), so the two are kept together.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from common.config import redact_url
from replay_service.codec import index_size
from replay_service.errors import ShardAuthError, ShardError, ShardUnavailable, ShardWriteError
from replay_service.launcher import RedisShardProcess
from replay_service.resp import RespConnection, pack

log = logging.getLogger(__name__)

KEY_PREFIX = "cvy:"
SEG_PREFIX = KEY_PREFIX + "seg:"
K_NEXT, K_HEAD, K_SIZE, K_BYTES, K_LENS, K_INSERTED, K_EVICTED, K_EPOCH, K_SAMPLED = (
    KEY_PREFIX + s
    for s in ("next", "head", "size", "bytes", "lens", "inserted_total", "evicted_total", "epoch", "sampled_total")
)
_STAT_KEYS = [K_SIZE, K_BYTES, K_INSERTED, K_EVICTED, K_HEAD, K_NEXT, K_EPOCH, K_SAMPLED]


def segment_key(epoch: str, seq: int) -> str:
    """Segment keys carry the shard's epoch, so a restarted shard's new segments never alias
    the sequence numbers a reader mirrored before the restart."""
    return f"{SEG_PREFIX}{epoch}:{seq}"


class ShardSet:
    """The shards of a run: started here (``num_shards`` processes) or attached by URL.

    Use as a context manager; on exit it stops exactly what it started.
    """

    def __init__(
        self,
        num_shards: int = 1,
        urls: Sequence[str] = (),
        host: str = "127.0.0.1",
        password: str = "",
        executable: str = "redis-server",
    ) -> None:
        self.processes: list[RedisShardProcess] = []
        self.password = password
        if urls:
            self.urls = list(urls)
        else:
            try:
                for _ in range(num_shards):
                    self.processes.append(RedisShardProcess(host=host, password=password, executable=executable))
            except BaseException:
                self.close()
                raise
            self.urls = [p.url for p in self.processes]
        for url in self.urls:
            check_shard(url, password)

    def close(self) -> None:
        for p in self.processes:
            p.stop()

    def __enter__(self) -> ShardSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(url: str, password: str = "", timeout: float = 5.0) -> redis.Redis:
    """A client for a shard URL; a password in the URL wins over ``password``.

    redis-py's own retries are off: a dead shard must fail fast so the caller can skip it
    (ShardHealth does the backing off), not stall a collector for seconds per call.
    """
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if password and not urlsplit(url).password:
        kwargs["password"] = password
    return redis.Redis.from_url(url, **kwargs)


def redact(url: str) -> str:
    """The URL with any password replaced, for logs and errors."""
    return redact_url(url)


def check_shard(url: str, password: str = "", timeout: float = 3.0) -> None:
    """Fail fast (not hang) on an unreachable shard or a wrong password."""
    client = connect(url, password, timeout=timeout)
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise ShardAuthError(
            f"shard {redact(url)}: authentication failed ({exc}); check replay.password or the URL"
        ) from None
    except redis.ResponseError as exc:
        if "NOAUTH" in str(exc):
            raise ShardAuthError(
                f"shard {redact(url)} requires a password; set replay.password or put it in the URL"
            ) from None
        raise ShardError(f"shard {redact(url)}: {exc}") from None
    except redis.RedisError as exc:
        raise ShardUnavailable(f"shard {redact(url)} is unreachable: {exc}") from None
    finally:
        client.close()


def _script(name: str) -> str:
    return resources.files("replay_service").joinpath(name).read_text()


@dataclass
class ShardStats:
    size: int = 0
    bytes: int = 0
    inserted_total: int = 0
    evicted_total: int = 0
    head: int = 0
    next: int = 0
    epoch: str = ""
    sampled_total: int = 0

    @classmethod
    def from_values(cls, vals: Sequence[Any]) -> ShardStats:
        size, nbytes, ins, ev, head, nxt, epoch, sampled = vals
        return cls(
            size=_int(size),
            bytes=_int(nbytes),
            inserted_total=_int(ins),
            evicted_total=_int(ev),
            head=_int(head),
            next=_int(nxt),
            epoch=epoch.decode(errors="replace") if isinstance(epoch, bytes) else "",
            sampled_total=_int(sampled),
        )


def _int(v: Any) -> int:
    try:
        return int(v) if v is not None else 0
    except (TypeError, ValueError):
        return 0


@dataclass
class InsertResult:
    seq: int
    size: int
    evicted: int
    inserted_total: int
    sampled_total: int
    epoch: str


class ShardHealth:
    """Whether one shard is up, shared by every connection a component has to it.

    The first failure logs once and counts one loss; calls then skip the shard until a retry is
    due (exponential backoff, 0.2 s doubling to ``max_backoff_s``); the first success after a
    loss logs once and counts one reconnect. Nothing is logged per call.
    """

    def __init__(self, index: int, url: str, component: str, max_backoff_s: float = 5.0) -> None:
        self.index = index
        self.url = redact(url)
        self.component = component
        self.max_backoff_s = max_backoff_s
        self.up = True
        self.generation = 0  # bumped on every failure: connections older than this are stale
        self.lost_total = 0
        self.reconnects_total = 0
        self._backoff = 0.0
        self._retry_at = 0.0
        self._lock = threading.Lock()

    def available(self) -> bool:
        """True when the shard is up or a retry is due."""
        return self.up or time.monotonic() >= self._retry_at

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self.generation += 1
            self._backoff = min(self.max_backoff_s, max(0.2, self._backoff * 2))
            self._retry_at = time.monotonic() + self._backoff
            if self.up:
                self.up = False
                self.lost_total += 1
                log.warning(
                    "%s: replay shard %d (%s) lost: %s; skipping it and retrying with backoff",
                    self.component,
                    self.index,
                    self.url,
                    exc,
                )

    def moved(self, url: str) -> None:
        """The shard now listens at ``url`` (replaced on another node): healthy until it fails,
        and every connection to the old address stale."""
        with self._lock:
            self.url = redact(url)
            self.generation += 1
            self.up = True
            self._backoff = 0.0
            self._retry_at = 0.0

    def retire(self) -> None:
        """The shard is gone for good (the driver stopped replacing it): never retried."""
        with self._lock:
            self.generation += 1
            self.up = False
            self._retry_at = float("inf")

    def succeeded(self) -> bool:
        """Mark the shard up; True when this ends an outage."""
        if self.up:
            return False
        with self._lock:
            if self.up:
                return False
            self.up = True
            self._backoff = 0.0
            self.reconnects_total += 1
            log.warning("%s: replay shard %d (%s) is back", self.component, self.index, self.url)
            return True


_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, OSError)


def check_shards_at_start(clients: Sequence[ShardClient], health: Sequence[ShardHealth]) -> None:
    """A wrong password is a clear error now; an unreachable shard is marked down (and retried
    later), unless every shard is unreachable. The caller closes its connections on error."""
    for client, h in zip(clients, health, strict=True):
        if not h.available():
            continue  # gone for good (see ShardHealth.retire)
        try:
            client.ping()
        except ShardUnavailable as exc:
            h.failed(exc)
    if not any(h.up for h in health):
        raise ShardUnavailable(f"no replay shard is reachable: {', '.join(h.url for h in health)}")


class ShardClient:
    """The replay operations on one shard: atomic insert+evict, index reads, batch fetch.

    Connection-level failures raise :class:`ShardUnavailable` (the next call reconnects);
    a refused password raises :class:`ShardAuthError`.
    """

    def __init__(self, url: str, password: str = "", timeout: float = 5.0) -> None:
        self.url = url
        self.password = password
        self.timeout = timeout
        self.redis = connect(url, password, timeout)
        self._insert = self.redis.register_script(_script("insert.lua"))
        self._raw: RespConnection | None = None
        self.generation = 0  # the ShardHealth generation its connections belong to

    def reset(self, generation: int) -> None:
        """Drop connections made before a shard failure (they point at a dead or restarted server)."""
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        self.redis.connection_pool.disconnect()
        self.generation = generation

    def _fail(self, exc: BaseException) -> ShardError:
        if isinstance(exc, redis.AuthenticationError) or "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
            return ShardAuthError(f"shard {redact(self.url)}: {exc}")
        return ShardUnavailable(f"shard {redact(self.url)}: {exc}")

    def ping(self) -> None:
        try:
            self.redis.ping()
        except (redis.RedisError, OSError) as exc:
            raise self._fail(exc) from None

    def insert(self, blob: bytes, num_transitions: int, capacity: int, epoch: str) -> InsertResult:
        """Store one encoded segment (see insert.lua); ``epoch`` is used if the shard has none yet."""
        try:
            seq, size, evicted, ins, sampled, ep = self._insert(
                keys=[K_NEXT, K_HEAD, K_SIZE, K_BYTES, K_LENS, K_INSERTED, K_EVICTED, K_EPOCH, K_SAMPLED],
                args=[blob, num_transitions, capacity, SEG_PREFIX, epoch],
            )
        except _REDIS_DOWN as exc:
            raise self._fail(exc) from None
        except redis.ResponseError as exc:
            if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
                raise self._fail(exc) from None
            # OOM under maxmemory, or insert.lua refusing its arguments: the writer counts it.
            raise ShardWriteError(f"shard {redact(self.url)} refused the insert: {exc}") from None
        return InsertResult(int(seq), int(size), int(evicted), int(ins), int(sampled), ep.decode())

    def stats(self) -> ShardStats:
        try:
            return ShardStats.from_values(self.redis.mget(_STAT_KEYS))
        except (redis.RedisError, OSError) as exc:
            raise self._fail(exc) from None

    def lengths(self, seqs: Sequence[int]) -> list[int | None]:
        if not seqs:
            return []
        try:
            vals = self.redis.hmget(K_LENS, [str(s) for s in seqs])
        except (redis.RedisError, OSError) as exc:
            raise self._fail(exc) from None
        return [_int(v) or None for v in vals]

    def raw(self) -> RespConnection:
        if self._raw is None:
            self._raw = RespConnection(self.url, self.password, self.timeout)
        return self._raw

    def _execute(self, payload: bytes, count: int) -> list[Any]:
        try:
            return self.raw().execute(payload, count)
        except ShardUnavailable:
            self._raw = None
            raise

    def indexes(self, epoch: str, seqs: Sequence[int], lengths: Sequence[int]) -> list[Any]:
        """Prefix + offset table of each segment (what :func:`codec.parse_index` reads); one round trip."""
        if not seqs:
            return []
        payload = b"".join(
            pack("GETRANGE", segment_key(epoch, s), 0, index_size(n) - 1) for s, n in zip(seqs, lengths, strict=True)
        )
        return self._execute(payload, len(seqs))

    def values(self, epoch: str, seqs: Sequence[int]) -> list[Any]:
        """Whole segment values (the learner's resident mirror pulls each once); one round trip."""
        if not seqs:
            return []
        return self._execute(b"".join(pack("GET", segment_key(epoch, s)) for s in seqs), len(seqs))

    def fetch_send(
        self, epoch: str, seqs: Sequence[int], starts: Sequence[int], ends: Sequence[int], report_sampled: int = 0
    ) -> int:
        """Send one batch request: GETRANGE ``[start, end)`` of each segment, then the shard's counters.

        ``report_sampled`` transitions are added to the shard's sampled counter in the same
        trip (the rate limiter's shared state, see ratelimit.py). Returns the reply count for
        :meth:`fetch_recv`; sending to every shard before reading overlaps their work.
        """
        ep = SEG_PREFIX.encode() + epoch.encode() + b":"
        parts = []
        for s, a, b in zip(seqs, starts, ends, strict=True):
            key = b"%s%d" % (ep, s)
            sa, sb = b"%d" % a, b"%d" % (b - 1)
            parts.append(
                b"*4\r\n$8\r\nGETRANGE\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                % (len(key), key, len(sa), sa, len(sb), sb)
            )
        if report_sampled:
            parts.append(pack("INCRBY", K_SAMPLED, report_sampled))
        parts.append(pack("MGET", *_STAT_KEYS))
        try:
            self.raw().send(b"".join(parts))
        except ShardUnavailable:
            self._raw = None
            raise
        return len(parts)

    def fetch_recv(self, count: int, report_sampled: int = 0) -> tuple[list[Any], ShardStats]:
        raw = self.raw()
        try:
            replies = raw.recv(count)
        except ShardUnavailable:
            self._raw = None
            raise
        stats_reply = replies[-1]
        if not isinstance(stats_reply, list):
            raise self._fail(RuntimeError(f"MGET answered {stats_reply!r}"))
        n = count - 1 - (1 if report_sampled else 0)
        return replies[:n], ShardStats.from_values(stats_reply)

    def fetch(
        self, epoch: str, seqs: Sequence[int], starts: Sequence[int], ends: Sequence[int], report_sampled: int = 0
    ) -> tuple[list[Any], ShardStats]:
        """One round trip: the byte ranges of a batch (see :meth:`fetch_send`)."""
        count = self.fetch_send(epoch, seqs, starts, ends, report_sampled)
        return self.fetch_recv(count, report_sampled)

    def report_sampled(self, n: int) -> None:
        if n:
            try:
                self.redis.incrby(K_SAMPLED, n)
            except (redis.RedisError, OSError) as exc:
                raise self._fail(exc) from None

    def get_segment(self, epoch: str, seq: int) -> bytes | None:
        try:
            value = self.redis.get(segment_key(epoch, seq))
        except (redis.RedisError, OSError) as exc:
            raise self._fail(exc) from None
        return bytes(value) if value is not None else None

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        self.redis.close()
