"""Shared fixtures: a real redis-server per test module, and markers that skip without hardware."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

# highway-env renders blank frames under SDL's dummy driver; offscreen renders for real.
os.environ["SDL_VIDEODRIVER"] = "offscreen"

from replay_service.launcher import RedisShardProcess
from tests.s3server import S3Endpoint


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
    """A clean shard for each test (FLUSHALL, as the launcher's admin user, on a module-scoped server)."""
    client = redis_process.admin()
    client.flushall()
    client.close()
    return redis_process.url


@pytest.fixture
def two_shards(redis_process: RedisShardProcess) -> list[str]:
    """Two clean shards on one redis-server (databases 0 and 1): separate keys, separate epochs."""
    urls = [redis_process.url.rsplit("/", 1)[0] + f"/{db}" for db in (0, 1)]
    client = redis_process.admin()  # convoy's own user may not flush
    client.flushall()
    client.close()
    return urls


@pytest.fixture(scope="session")
def _moto_server_url() -> Iterator[str]:
    from tests.s3server import start_moto_server

    url, stop = start_moto_server("127.0.0.1")
    try:
        yield url
    finally:
        stop()


@pytest.fixture
def s3_endpoint(_moto_server_url: str, monkeypatch: pytest.MonkeyPatch) -> S3Endpoint:
    """A real S3-protocol server (moto, session-wide) with a fresh bucket for this test; the
    environment (also of subprocesses) points s3:// at it with test credentials."""
    import uuid

    from tests.s3server import create_bucket

    bucket = f"convoy-test-{uuid.uuid4().hex[:12]}"
    create_bucket(_moto_server_url, bucket)
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "CONVOY_S3_ENDPOINT_URL": _moto_server_url,
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return S3Endpoint(url=_moto_server_url, bucket=bucket)
