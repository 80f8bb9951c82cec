"""Following the run's shard table: where each replay shard is now.

A shard actor replaced on another node (its node died, or Ray moved it) listens at a new
address. The driver keeps the authoritative table (index -> URL); writers and the sampler are
given a plain callable that returns it (``shard_table``, injected by whoever builds them, so
nothing here knows how the driver publishes it) and poll it every ``poll_s`` seconds. A pull
rather than a push: collectors and the learner spend their time in long calls, so a pushed
update would wait for the call to end; the pull runs inside those calls, between inserts and
batches. An empty string in the table means the shard is gone for good (the driver stopped
replacing it): it is skipped from then on, never connected to again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from common.config import redact_url

log = logging.getLogger(__name__)

ShardTable = Callable[[], Sequence[str]]
GONE = ""


class TableFollower:
    """Polls ``shard_table`` and says which shards moved since the last poll.

    The callable may block briefly and may fail (the driver is busy or restarting): a failure
    or a table of another length is ignored and the current URLs are kept.
    """

    def __init__(self, urls: Sequence[str], shard_table: ShardTable | None, poll_s: float = 1.0) -> None:
        self.urls = list(urls)
        self._table = shard_table
        self._poll_s = poll_s
        self._next_poll = 0.0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._table is not None

    def current(self) -> list[str]:
        """The newest URLs, read now (at construction: a replacement actor starts with the
        table as it is, not as it was when its factory was made)."""
        self.changes(force=True)
        return list(self.urls)

    def changes(self, force: bool = False) -> dict[int, str]:
        """``{index: new URL}`` for the shards whose URL changed since the last call; empty
        when no poll is due. One caller gets each change (the others see none)."""
        if self._table is None:
            return {}
        now = time.monotonic()
        if not force and now < self._next_poll:
            return {}
        if not self._lock.acquire(blocking=False):
            return {}
        try:
            self._next_poll = now + self._poll_s
            try:
                table = list(self._table())
            except Exception as exc:  # the driver is busy or gone: keep what we have
                log.debug("shard table unavailable: %s", exc)
                return {}
            if len(table) != len(self.urls):
                return {}
            changed = {i: u for i, (u, old) in enumerate(zip(table, self.urls, strict=True)) if u != old}
            for i, url in changed.items():
                log.warning(
                    "replay shard %d moved: %s -> %s", i, redact_url(self.urls[i]), redact_url(url) if url else "(gone)"
                )
                self.urls[i] = url
            return changed
        finally:
            self._lock.release()
