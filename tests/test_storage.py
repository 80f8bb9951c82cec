"""Run storage on URIs and checkpoints on it: manifest-last commits, pruning, best, pull.

Parametrized over a local path, ``file://``, ``memory://`` and ``s3://`` (a real moto
server); the S3 writer-kill test goes through a throttled proxy so that the kill lands in
the middle of the upload.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from common import storage
from common.config import load_config
from common.storage import StorageError, open_store
from learner.checkpoint import (
    NETWORKS,
    CheckpointData,
    CheckpointError,
    best_checkpoint,
    list_checkpoints,
    load_checkpoint,
    mark_best,
    pull_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    scan_checkpoints,
)
from tests.s3server import S3Endpoint, ThrottledProxy

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("local", "file", "memory", "s3")


@pytest.fixture(params=BACKENDS)
def run_uri(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    kind = request.param
    if kind == "local":
        yield str(tmp_path / "run")
    elif kind == "file":
        yield f"file://{tmp_path}/run"
    elif kind == "memory":
        uri = f"memory://convoy-test-{uuid.uuid4().hex[:8]}/run"
        yield uri
        open_store(uri).remove("")
    else:
        endpoint: S3Endpoint = request.getfixturevalue("s3_endpoint")
        yield f"{endpoint.uri}/run"


def _data(updates: int, n: int = 8) -> CheckpointData:
    g = torch.Generator().manual_seed(updates)
    return CheckpointData(
        networks={name: {"w": torch.randn(n, generator=g), "b": torch.randn(2, generator=g)} for name in NETWORKS},
        optimizers={"actor": {"state": {0: {"step": torch.tensor(float(updates))}}, "param_groups": []}},
        rng={"torch": torch.get_rng_state()},
        state={"env_steps": 100 * updates, "weights_version": updates // 2},
        config_yaml=f"# updates {updates}\n",
    )


def _ckpts(run: str) -> str:
    return storage.join(run, "checkpoints")


def _names(run: str) -> list[str]:
    return [c.name for c in list_checkpoints(run)]


# ----- the storage layer -----------------------------------------------------------------


def test_store_reads_writes_lists_and_removes_whole_objects(run_uri: str) -> None:
    store = open_store(run_uri)
    assert store.list() == [] and not store.exists("a")
    store.write_bytes("a/b.bin", b"\x00\x01")
    store.write_many({"a/c.txt": b"c", "d.txt": b"d"})
    storage.write_text(storage.join(run_uri, "config.yaml"), "x: 1\n")
    assert store.list() == ["a", "config.yaml", "d.txt"]
    assert store.list("a") == ["b.bin", "c.txt"] and store.list("d.txt") == [] and store.list("nope") == []
    assert store.read_bytes("a/b.bin") == b"\x00\x01"
    assert storage.read_text(storage.join(run_uri, "config.yaml")) == "x: 1\n"
    assert storage.exists(storage.join(run_uri, "d.txt")) and not storage.exists(storage.join(run_uri, "e.txt"))
    store.write_bytes("d.txt", b"replaced")
    assert store.read_bytes("d.txt") == b"replaced"
    with pytest.raises(FileNotFoundError):
        store.read_bytes("missing.txt")
    store.remove("a")
    store.remove("never-there")
    assert store.list() == ["config.yaml", "d.txt"]
    assert store.url("d.txt") == f"{run_uri}/d.txt"


def test_unknown_protocol_and_missing_extras_are_named() -> None:
    with pytest.raises(StorageError, match="nosuchproto"):
        open_store("nosuchproto://bucket/run")
    # A fresh interpreter where s3fs and gcsfs cannot be imported, as without the extras.
    code = (
        "import sys; sys.modules['s3fs'] = None; sys.modules['gcsfs'] = None\n"
        "from common.storage import StorageError, open_store\n"
        "for uri in ('s3://bucket/run', 'gs://bucket/run'):\n"
        "    try:\n"
        "        open_store(uri)\n"
        "    except StorageError as exc:\n"
        "        print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install 'convoy[s3]'" in out.stdout and "pip install 'convoy[gcs]'" in out.stdout


def test_redact_drops_credentials_from_uris() -> None:
    assert storage.redact("s3://AKIA:secret@bucket/run") == "s3://bucket/run"
    assert storage.redact("s3://bucket/run") == "s3://bucket/run"


# ----- checkpoints -----------------------------------------------------------------------


def test_save_list_load_round_trip(run_uri: str) -> None:
    first = save_checkpoint(_ckpts(run_uri), 4, _data(4))
    second = save_checkpoint(_ckpts(run_uri), 8, _data(8))
    assert second == f"{run_uri}/checkpoints/ckpt-0000000008"
    infos = list_checkpoints(run_uri)
    assert [(c.name, c.uri, c.updates, c.env_steps, c.weights_version) for c in infos] == [
        ("ckpt-0000000004", first, 4, 400, 2),
        ("ckpt-0000000008", second, 8, 800, 4),
    ]
    assert all(c.size_bytes > 0 and c.time > 0 and not c.best for c in infos)
    assert resolve_checkpoint(run_uri) == second
    assert resolve_checkpoint(run_uri, "ckpt-0000000004") == first
    assert resolve_checkpoint(first) == first
    data = load_checkpoint(run_uri)
    expected = _data(8)
    for net in NETWORKS:
        for k, v in expected.networks[net].items():
            assert torch.equal(data.networks[net][k], v), f"{net}.{k}"
    assert data.state["updates"] == 8 and data.state["env_steps"] == 800
    assert torch.equal(data.optimizers["actor"]["state"][0]["step"], torch.tensor(8.0))
    assert data.config_yaml == "# updates 8\n"
    only_actor = load_checkpoint(first, networks=("actor",), full=False)
    assert set(only_actor.networks) == {"actor"} and only_actor.optimizers == {}


def test_a_checkpoint_without_manifest_does_not_exist_for_readers(run_uri: str, tmp_path: Path) -> None:
    good = save_checkpoint(_ckpts(run_uri), 4, _data(4))
    # A newer checkpoint whose writer died before the manifest: its files, no manifest.
    partial = open_store(storage.join(_ckpts(run_uri), "ckpt-0000000008"))
    partial.write_bytes("actor.safetensors", b"half")
    partial.write_bytes("state.json", b'{"updates": 8}')
    assert _names(run_uri) == ["ckpt-0000000004"]
    assert resolve_checkpoint(run_uri) == good
    assert load_checkpoint(run_uri).state["updates"] == 4
    assert scan_checkpoints(run_uri) == (list_checkpoints(run_uri), ["ckpt-0000000008"])
    for attempt in (
        lambda: resolve_checkpoint(run_uri, "ckpt-0000000008"),
        lambda: load_checkpoint(partial.uri),
        lambda: pull_checkpoint(run_uri, "ckpt-0000000008", tmp_path / "pulled"),
    ):
        with pytest.raises(CheckpointError, match=r"ckpt-0000000008.* is incomplete: it has no manifest.json"):
            attempt()
    assert not (tmp_path / "pulled").exists()


def test_prune_keeps_the_newest_complete_and_the_best(run_uri: str) -> None:
    root = _ckpts(run_uri)
    save_checkpoint(root, 1, _data(1), keep=2)
    save_checkpoint(root, 2, _data(2), keep=2)
    mark_best(run_uri, "ckpt-0000000001", {"mean_return": 7.5})
    assert best_checkpoint(run_uri) == ("ckpt-0000000001", {"mean_return": 7.5})
    # Debris: an older dead writer's files, and a newer checkpoint still being uploaded.
    open_store(storage.join(root, "ckpt-0000000000")).write_bytes("actor.safetensors", b"dead")
    open_store(storage.join(root, "ckpt-0000000009")).write_bytes("actor.safetensors", b"uploading")
    save_checkpoint(root, 3, _data(3), keep=2)
    save_checkpoint(root, 4, _data(4), keep=2)
    infos = list_checkpoints(run_uri)
    assert [(c.name, c.best) for c in infos] == [
        ("ckpt-0000000001", True),
        ("ckpt-0000000003", False),
        ("ckpt-0000000004", False),
    ]
    remaining = open_store(root).list()
    assert "ckpt-0000000000" not in remaining and "ckpt-0000000002" not in remaining
    assert "ckpt-0000000009" in remaining, "an incomplete checkpoint newer than every complete one may be live"
    assert resolve_checkpoint(run_uri, "best") == f"{root}/ckpt-0000000001"
    assert load_checkpoint(run_uri, name="best").state["updates"] == 1
    # keep=1 still keeps the newest complete one (and the best).
    save_checkpoint(root, 5, _data(5), keep=1)
    assert _names(run_uri) == ["ckpt-0000000001", "ckpt-0000000005"]


def test_best_pointer_errors(run_uri: str) -> None:
    save_checkpoint(_ckpts(run_uri), 4, _data(4))
    assert best_checkpoint(run_uri) is None
    with pytest.raises(CheckpointError, match="has no best checkpoint yet"):
        resolve_checkpoint(run_uri, "best")
    with pytest.raises(CheckpointError, match="no complete checkpoint 'ckpt-0000000005'"):
        mark_best(run_uri, "ckpt-0000000005", {})
    with pytest.raises(CheckpointError, match="not a checkpoint name"):
        mark_best(run_uri, "final", {})
    mark_best(run_uri, f"{run_uri}/checkpoints/ckpt-0000000004", {"success_rate": 1.0})
    assert best_checkpoint(run_uri) == ("ckpt-0000000004", {"success_rate": 1.0})
    with pytest.raises(CheckpointError, match="expected latest, best or ckpt-<updates>"):
        resolve_checkpoint(run_uri, "newest")
    with pytest.raises(CheckpointError, match=r"no checkpoint 'ckpt-0000000007' in .*\(there: ckpt-0000000004\)"):
        resolve_checkpoint(run_uri, "ckpt-0000000007")


def test_rewriting_a_checkpoint_of_the_same_name_never_removes_it(run_uri: str) -> None:
    first = save_checkpoint(_ckpts(run_uri), 4, _data(4))
    # The same contents again (a final checkpoint right after a periodic one): skipped.
    assert save_checkpoint(_ckpts(run_uri), 4, _data(4)) == first
    assert _names(run_uri) == ["ckpt-0000000004"]
    final = _data(4)
    final.state["env_steps"] = 999
    second = save_checkpoint(_ckpts(run_uri), 4, final)
    # Other contents: a new name, the complete one stays until pruning removes it.
    assert second != first and storage.basename(second).startswith("ckpt-0000000004-")
    assert [(c.name, c.env_steps) for c in list_checkpoints(run_uri)] == [
        ("ckpt-0000000004", 400),
        (storage.basename(second), 999),
    ]
    assert load_checkpoint(run_uri).state["env_steps"] == 999
    manifest = json.loads(open_store(second).read_bytes("manifest.json"))
    assert manifest["name"] == storage.basename(second)


def test_pull_verifies_and_renames_into_place(run_uri: str, tmp_path: Path) -> None:
    save_checkpoint(_ckpts(run_uri), 4, _data(4))
    save_checkpoint(_ckpts(run_uri), 8, _data(8))
    into = tmp_path / "pulled"
    into.mkdir()
    got = pull_checkpoint(run_uri, "latest", into)
    assert got == into / "ckpt-0000000008"
    files = [f"{n}.safetensors" for n in NETWORKS] + ["optimizers.pt", "rng.pt", "state.json", "config.yaml"]
    assert sorted(p.name for p in got.iterdir()) == sorted([*files, "manifest.json"])
    assert load_checkpoint(got).state["updates"] == 8
    named = pull_checkpoint(run_uri, "ckpt-0000000004", tmp_path / "as-named")
    assert named == tmp_path / "as-named" and load_checkpoint(named).state["updates"] == 4
    with pytest.raises(CheckpointError, match="already exists"):
        pull_checkpoint(run_uri, "latest", into)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_tampered_file_fails_pull_and_load_naming_the_file(run_uri: str, tmp_path: Path) -> None:
    save_checkpoint(_ckpts(run_uri), 4, _data(4))
    ckpt = open_store(resolve_checkpoint(run_uri))
    original = ckpt.read_bytes("critic.safetensors")
    tampered = original[:-1] + bytes([original[-1] ^ 0xFF])  # same size, one byte flipped
    ckpt.write_bytes("critic.safetensors", tampered)
    target = tmp_path / "downloads" / "pulled"
    with pytest.raises(CheckpointError, match=r"critic\.safetensors: sha256 [0-9a-f]+ does not match the manifest"):
        pull_checkpoint(run_uri, "latest", target)
    assert not target.exists(), "nothing is renamed into place"
    assert list(target.parent.iterdir()) == [], "the temporary download is removed"
    with pytest.raises(CheckpointError, match=r"critic\.safetensors"):
        load_checkpoint(run_uri)
    ckpt.write_bytes("critic.safetensors", original + b"extra")
    with pytest.raises(CheckpointError, match=r"critic\.safetensors: size \d+ bytes, the manifest says \d+"):
        pull_checkpoint(run_uri, "latest", target)
    ckpt.remove("critic.safetensors")
    with pytest.raises(CheckpointError, match=r"critic\.safetensors is missing"):
        pull_checkpoint(run_uri, "latest", target)
    assert not target.exists()


def test_missing_run_is_a_clear_error(run_uri: str, tmp_path: Path) -> None:
    assert list_checkpoints(run_uri) == []
    with pytest.raises(CheckpointError, match=r"no run at .*: nothing is stored there"):
        scan_checkpoints(run_uri)
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*: nothing is stored there"):
        pull_checkpoint(run_uri, "latest", tmp_path / "x")
    storage.write_text(storage.join(run_uri, "config.yaml"), "run: {}\n")  # a run that has no checkpoint yet
    assert scan_checkpoints(run_uri) == ([], [])
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*: no complete checkpoint under"):
        load_checkpoint(run_uri)
    assert not (tmp_path / "x").exists()


def test_learner_checkpoints_and_restores_on_a_uri() -> None:
    from learner.loop import Learner
    from tests.test_resume import OVERRIDES, IndexedSource

    run = f"memory://convoy-test-{uuid.uuid4().hex[:8]}/run"
    try:
        cfg = load_config(None, OVERRIDES)
        a = Learner(cfg, IndexedSource(), run)
        a.train(2, env_steps=50)
        written = a.checkpoint(wait=True)
        assert written == f"{run}/checkpoints/ckpt-0000000002" == a.last_checkpoint
        a.close()
        b = Learner(cfg, IndexedSource(start=2), run)
        assert b.restore(run) == written
        assert b.updates == 2 and b.env_steps == 50
        for net, state in a.agent.state_dicts().items():
            for k, v in state.items():
                assert torch.equal(b.agent.state_dicts()[net][k], v), f"{net}.{k}"
        b.close()
    finally:
        open_store(run).remove("")


# ----- S3: a writer killed mid-upload, and the CLI -----------------------------------------

_WRITER = """
import sys
import torch
from learner.checkpoint import NETWORKS, CheckpointData, save_checkpoint

def data(updates, n):
    g = torch.Generator().manual_seed(updates)
    return CheckpointData(
        networks={name: {"w": torch.randn(n, generator=g)} for name in NETWORKS},
        rng={"torch": torch.get_rng_state()},
        state={"env_steps": 100 * updates, "weights_version": updates},
        config_yaml="run: {}\\n",
    )

root = sys.argv[1]
save_checkpoint(root, 1, data(1, 16))
print("first", flush=True)
save_checkpoint(root, 2, data(2, 250_000))  # 4 MB in all: seconds through the throttled uplink
print("second", flush=True)
"""


def _keys(endpoint: S3Endpoint, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint.url, region_name="us-east-1")
    try:
        resp = client.list_objects_v2(Bucket=endpoint.bucket, Prefix=prefix)
        return sorted(o["Key"] for o in resp.get("Contents", []))
    finally:
        client.close()


def test_writer_killed_mid_upload_to_s3_leaves_the_previous_checkpoint_latest(s3_endpoint: S3Endpoint) -> None:
    run = f"{s3_endpoint.uri}/run"
    port = int(s3_endpoint.url.rsplit(":", 1)[1])
    proxy = ThrottledProxy("127.0.0.1", port, bytes_per_s=1_000_000)
    env = {**os.environ, "CONVOY_S3_ENDPOINT_URL": proxy.url}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, _ckpts(run)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    partial: list[str] = []
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "first"
        deadline = time.monotonic() + 60
        while not partial and time.monotonic() < deadline and proc.poll() is None:
            partial = _keys(s3_endpoint, "run/checkpoints/ckpt-0000000002/")
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        proxy.close()
    assert partial, "the second checkpoint's upload never started"
    after = _keys(s3_endpoint, "run/checkpoints/ckpt-0000000002/")
    assert after and "run/checkpoints/ckpt-0000000002/manifest.json" not in after, after
    assert not any(k.endswith(".safetensors") for k in after), f"killed before the large files were up: {after}"

    assert _names(run) == ["ckpt-0000000001"]
    assert resolve_checkpoint(run) == f"{run}/checkpoints/ckpt-0000000001"
    data = load_checkpoint(run)
    g = torch.Generator().manual_seed(1)
    for net in NETWORKS:
        assert torch.equal(data.networks[net]["w"], torch.randn(16, generator=g)), net
    assert data.state["updates"] == 1 and data.state["env_steps"] == 100
    # The next complete checkpoint makes the dead writer's files debris, and prunes them.
    save_checkpoint(_ckpts(run), 3, _data(3))
    assert _keys(s3_endpoint, "run/checkpoints/ckpt-0000000002/") == []
    assert _names(run) == ["ckpt-0000000001", "ckpt-0000000003"]


def _convoy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_lists_and_pulls_checkpoints_of_an_s3_run(s3_endpoint: S3Endpoint, tmp_path: Path) -> None:
    run = f"{s3_endpoint.uri}/run"
    storage.write_text(storage.join(run, "config.yaml"), "run: {}\n")
    save_checkpoint(_ckpts(run), 4, _data(4))
    save_checkpoint(_ckpts(run), 8, _data(8))
    mark_best(run, "ckpt-0000000004", {"mean_return": 3.0})
    open_store(storage.join(_ckpts(run), "ckpt-0000000012")).write_bytes("state.json", b"{}")  # being written

    listed = _convoy("checkpoints", "list", run, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["name"], r["updates"], r["env_steps"], r["best"]) for r in rows] == [
        ("ckpt-0000000004", 4, 400, True),
        ("ckpt-0000000008", 8, 800, False),
    ]
    assert all(r["size_bytes"] > 0 and r["uri"].startswith("s3://") for r in rows)
    assert "ckpt-0000000012" in listed.stderr  # incomplete: mentioned, not listed

    table = _convoy("checkpoints", "list", run)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "UPDATES", "ENV"]
    assert lines[1].startswith("ckpt-0000000004") and lines[1].endswith("best")
    assert lines[2].startswith("ckpt-0000000008")

    pulled = _convoy("checkpoints", "pull", run, "--checkpoint", "best", "--to", str(tmp_path / "best"))
    assert pulled.returncode == 0, pulled.stderr
    assert "pulled ckpt-0000000004" in pulled.stdout
    assert load_checkpoint(tmp_path / "best").state["updates"] == 4

    ckpt = open_store(resolve_checkpoint(run))
    ckpt.write_bytes("actor.safetensors", b"x" * len(ckpt.read_bytes("actor.safetensors")))
    bad = _convoy("checkpoints", "pull", run, "--to", str(tmp_path / "latest"))
    assert bad.returncode == 1
    assert any(line.startswith("convoy: ") and "actor.safetensors: sha256" in line for line in bad.stderr.splitlines())
    assert not (tmp_path / "latest").exists()

    incomplete = _convoy("checkpoints", "pull", run, "--checkpoint", "ckpt-0000000012", "--to", str(tmp_path / "i"))
    assert incomplete.returncode == 1 and "is incomplete" in incomplete.stderr

    missing = _convoy("checkpoints", "list", f"{s3_endpoint.uri}/no-such-run")
    assert missing.returncode == 1 and "convoy: no run at" in missing.stderr
