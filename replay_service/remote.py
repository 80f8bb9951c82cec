"""The thin Ray wrapper around :class:`replay_service.owner.ShardOwner`; nothing else here uses Ray."""

from __future__ import annotations

from typing import Any

import ray

from replay_service.owner import ShardOwner

LOOPBACK = "127.0.0.1"


@ray.remote(num_cpus=0, max_restarts=0)
class ShardActor:
    """Owns one redis-server on the node Ray places it on.

    ``bind`` is ``"loopback"`` (single-node runs: nothing outside the machine can reach it)
    or ``"node"`` (multi-node runs: the node's own address, which every node can reach; the
    driver then always passes a password). ``port`` asks for a port (a replacement shard
    asks for its predecessor's, to come back on the same address); 0 picks a free one.
    """

    def __init__(self, index: int, bind: str, port: int, password: str, executable: str, maxmemory: int = 0) -> None:
        if bind == "node":
            host = ray.util.get_node_ip_address()
        elif bind == "loopback":
            host = LOOPBACK
        else:
            raise ValueError(f"shard bind must be 'loopback' or 'node', got {bind!r}")
        if host not in (LOOPBACK, "localhost", "::1") and not password:
            raise ValueError("a shard reachable from other nodes needs a password")
        self.index = index
        self.owner = ShardOwner(
            host=host, port=port or None, password=password, executable=executable, maxmemory=maxmemory
        )

    def url(self) -> str:
        return self.owner.url

    def node(self) -> dict[str, Any]:
        return {"node_id": ray.get_runtime_context().get_node_id(), "address": ray.util.get_node_ip_address()}

    def kill_server(self) -> int:
        return self.owner.kill_server()

    def metrics(self) -> dict[str, float]:
        return self.owner.metrics()

    def close(self) -> None:
        self.owner.close()
