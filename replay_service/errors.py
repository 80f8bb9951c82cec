"""The errors of talking to a replay shard, shared by the launcher, the RESP client and the shard client,
and the sampler's own."""

from __future__ import annotations


class ShardError(RuntimeError):
    """A shard could not be started, reached or authenticated; the message says which and why."""


class ShardUnavailable(ShardError):
    """A shard did not answer (down, restarting, network); the caller skips it and retries later."""


class ShardAuthError(ShardError):
    """A shard refused our credentials: a configuration error, never retried at start."""


class SampleError(RuntimeError):
    """Sampling failed (for example, every shard is empty or unreachable)."""


class ShardWriteError(ShardError):
    """A shard refused a write (out of memory under ``maxmemory``, or insert.lua rejected its
    arguments); the writer counts it, backs off from that shard and tries another."""
