"""A convoy-started shard is locked down: a password always, protected mode, convoy's ACL user
limited to replay's commands, passwords that cannot inject configuration, a memory bound whose
OOM the writer survives, and insert.lua refusing bad arguments."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
import redis
import zstandard

from replay_service.codec import FRAME_BYTES, CorruptSegmentError, FrameCodec
from replay_service.errors import ShardWriteError
from replay_service.launcher import ADMIN_USER, CLIENT_USER, RedisShardProcess
from replay_service.resp import RespConnection, pack
from replay_service.sampler import ReplaySampler
from replay_service.shards import ShardClient
from replay_service.writer import ReplayWriter
from tests.test_replay import make_segment


def _client(shard: RedisShardProcess, password: str | None, username: str | None = CLIENT_USER) -> redis.Redis:
    return redis.Redis(host=shard.host, port=shard.port, username=username, password=password, socket_timeout=5)


def test_without_the_password_a_client_gets_noauth_and_the_default_user_is_off() -> None:
    shard = RedisShardProcess(password="s3cret")
    try:
        # A plain connection that sends no AUTH: every command answers NOAUTH.
        raw = RespConnection(f"redis://{shard.host}:{shard.port}/0")
        (reply,) = raw.execute(pack("PING"), 1)
        raw.close()
        assert str(reply).startswith("NOAUTH"), reply
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=shard.host, port=shard.port, socket_timeout=5).ping()
        # The old requirepass form (the default user with the password) is refused too.
        with pytest.raises(redis.AuthenticationError):
            _client(shard, "s3cret", username=None).ping()
        with pytest.raises(redis.AuthenticationError):
            _client(shard, "wrong").ping()
        assert _client(shard, "s3cret").ping()
        # Loopback or not, protected mode is on.
        assert shard.admin().config_get("protected-mode") == {"protected-mode": "yes"}
    finally:
        shard.stop()


def test_a_shard_started_without_a_password_still_has_one() -> None:
    shard = RedisShardProcess()
    try:
        assert shard.password and f":{shard.password}@" in shard.url  # the caller gets it in the URL
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=shard.host, port=shard.port, socket_timeout=5).ping()
        assert redis.Redis.from_url(shard.url).ping()
    finally:
        shard.stop()


@pytest.mark.parametrize(
    "command",
    [
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("CONFIG", "GET", "*"),
        ("CONFIG", "SET", "protected-mode", "no"),
        ("DEBUG", "SLEEP", "0"),
        ("KEYS", "*"),
        ("SHUTDOWN", "NOSAVE"),
        ("ACL", "LIST"),
        ("MODULE", "LIST"),
        ("SCRIPT", "FLUSH"),
    ],
)
def test_convoys_user_may_not_run_admin_commands(redis_url: str, command: tuple[str, ...]) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        with pytest.raises(redis.ResponseError, match=r"NOPERM|no permissions|command not allowed"):
            client.execute_command(*command)
        # Not from a script either: ACLs apply to what a script calls.
        with pytest.raises(
            redis.ResponseError, match=r"can.t run this command|not allowed from script|NOPERM|no permissions"
        ):
            client.eval("return redis.call(unpack(ARGV))", 0, *command)
        # Keys outside convoy's prefix are off limits as well.
        with pytest.raises(redis.ResponseError, match=r"NOPERM|no permissions|command not allowed"):
            client.set("elsewhere", 1)
        assert client.ping()
    finally:
        client.close()


@pytest.mark.parametrize(
    "password",
    [
        "with space",
        "a\"quote'both",
        "new\nline",
        "hash#tag",
        # Each an attempt at adding a directive or a user, were the password written as text.
        'x"\nprotected-mode no\nbind 0.0.0.0\nuser evil on nopass ~* &* +@all\n#',
        "pw\r\nrequirepass other",
    ],
)
def test_passwords_with_special_characters_work_and_inject_nothing(password: str) -> None:
    shard = RedisShardProcess(password=password)
    try:
        w = ReplayWriter([shard.url], 100, password=password)
        w.write(make_segment(t=4))
        assert w.transitions_total == 4 and w.write_errors_total == 0
        w.close()
        with ReplaySampler([shard.url], 4, password=password, prefetch=0) as s:
            assert next(s).size == 4
        admin = shard.admin()
        assert admin.config_get("protected-mode") == {"protected-mode": "yes"}
        assert admin.config_get("bind") == {"bind": shard.host}
        assert {line.split()[1] for line in admin.acl_list()} == {"default", CLIENT_USER, ADMIN_USER}
        conf = Path(shard._dir, "redis.conf").read_text()
        assert password not in conf and "evil" not in conf
        assert "requirepass" not in conf
    finally:
        shard.stop()


def test_out_of_memory_writes_are_counted_and_the_writer_goes_on() -> None:
    shard = RedisShardProcess(password="pw")
    try:
        w = ReplayWriter([shard.url], 10_000, password="pw")
        w.write(make_segment(t=4))
        admin = shard.admin()
        admin.config_set("maxmemory", 1)  # every write is now past the limit
        for i in range(3):
            w.write(make_segment(t=4, index=i + 1))  # never raises into the collector
        assert w.write_errors_total >= 1
        assert w.dropped_transitions_total == 12
        m = w.metrics()
        assert m["replay_writer/write_errors_total"] == w.write_errors_total
        admin.config_set("maxmemory", 0)
        deadline = time.monotonic() + 10
        while w.transitions_total == 4 and time.monotonic() < deadline:
            w.write(make_segment(t=4, index=9))  # retried after the backoff
            time.sleep(0.05)
        assert w.transitions_total == 8
        w.close()
    finally:
        shard.stop()


def test_maxmemory_is_set_from_the_capacity() -> None:
    from replay_service.launcher import maxmemory_for

    shard = RedisShardProcess(password="pw", maxmemory=maxmemory_for(1000))
    try:
        assert int(shard.admin().config_get("maxmemory")["maxmemory"]) == maxmemory_for(1000)
        assert shard.admin().config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    finally:
        shard.stop()


@pytest.mark.parametrize(
    ("blob", "t", "capacity", "epoch", "match"),
    [
        (b"x", 0, 100, "ab", "transition count"),
        (b"x", -3, 100, "ab", "transition count"),
        (b"x", "2.5", 100, "ab", "transition count"),
        (b"x", "lots", 100, "ab", "transition count"),
        (b"x", 4, 0, "ab", "capacity"),
        (b"", 4, 100, "ab", "empty segment"),
        (b"x", 4, 100, "not-hex!", "epoch"),
    ],
)
def test_insert_script_refuses_bad_arguments(
    redis_url: str, blob: bytes, t: object, capacity: int, epoch: str, match: str
) -> None:
    client = ShardClient(redis_url)
    try:
        with pytest.raises(ShardWriteError, match=match):
            client.insert(blob, t, capacity, epoch)  # type: ignore[arg-type]
        assert client.stats().next == 0  # nothing was written
    finally:
        client.close()


def test_a_refused_insert_is_counted_by_the_writer(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    w = ReplayWriter([redis_url], 100)
    monkeypatch.setattr("replay_service.writer.os.urandom", lambda n: b"")  # an empty epoch: refused
    w.write(make_segment(t=4))
    assert w.write_errors_total == 1 and w.dropped_transitions_total == 4 and w.transitions_total == 0
    w.close()


def _zstd_frame(window_exp: int) -> bytes:
    """A raw-block zstd frame of one 7056-byte frame whose header declares no content size
    and a window of 2 ** (10 + window_exp) bytes (what a hostile or corrupt value could ask)."""
    header = struct.pack("<I", 0xFD2FB528) + bytes([0x00, window_exp << 3])
    block = ((FRAME_BYTES << 3) | 1).to_bytes(3, "little")  # last block, raw, 7056 bytes
    return header + block + b"\x01" * FRAME_BYTES


def test_zstd_frames_asking_for_a_large_window_are_refused() -> None:
    codec = FrameCodec("zstd")
    out = memoryview(bytearray(FRAME_BYTES))
    assert codec.decompress_stream_into(_zstd_frame(3), out) == FRAME_BYTES  # an 8 KiB window is fine
    huge = _zstd_frame(21)  # 2 GiB: libzstd's default limit (128 MiB) is far above what a frame needs
    with pytest.raises(zstandard.ZstdError, match=r"too much memory|window"):
        codec.decompress_stream_into(huge, out)
    with pytest.raises(CorruptSegmentError):  # the per-frame path refuses it too (no content size)
        codec.decompress(huge)
