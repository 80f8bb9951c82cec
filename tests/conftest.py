"""Shared fixtures: a real redis-server per test module, and markers that skip without hardware."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

# highway-env renders blank frames under SDL's dummy driver; offscreen renders for real.
os.environ["SDL_VIDEODRIVER"] = "offscreen"

from replay_service.shards import RedisShardProcess


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    has_gpu = torch.cuda.is_available()
    has_carla = bool(os.environ.get("CARLA_ROOT") or os.environ.get("CARLA_HOST"))
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "carla" in item.keywords and not has_carla:
            item.add_marker(pytest.mark.skip(reason="needs CARLA_ROOT or CARLA_HOST (a live CARLA server)"))


@pytest.fixture(scope="module")
def redis_process() -> Iterator[RedisShardProcess]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed; run `make test` (it installs it) or apt-get install redis-server")
    proc = RedisShardProcess()
    yield proc
    proc.stop()


@pytest.fixture
def redis_url(redis_process: RedisShardProcess) -> str:
    """A clean shard for each test (FLUSHALL on a module-scoped server)."""
    import redis

    client = redis.Redis(host=redis_process.host, port=redis_process.port)
    client.flushall()
    client.close()
    return redis_process.url
