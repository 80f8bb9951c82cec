"""convoy on a real multi-node Ray cluster: one Linux network namespace per node.

The head (no ``collector`` resource) must get the learner, the worker (``{collector: 2,
replay: 1}``) both collectors and the shard, and the run stores everything on an S3-protocol
server (moto) that every node reaches on the bridge. Then checkpoints are listed, pulled
and evaluated as a user would, and the shard is shown to refuse clients without the
run's password.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.multinode import NetnsCluster, stop_run, unavailable_reason
from tests.s3server import create_bucket, start_moto_server

pytestmark = [pytest.mark.e2e, pytest.mark.multinode]
REPO = Path(__file__).resolve().parents[1]
PASSWORD = "mn-test-secret-" + "x7Qp2"  # set through the environment; must never be printed or saved


@pytest.fixture(scope="module")
def s3_cluster() -> object:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)

    def start_s3(cluster: NetnsCluster) -> dict[str, str]:
        url, stop = start_moto_server(cluster.gateway)
        cluster.on_close(stop)
        create_bucket(url, "convoy-mn")
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "CONVOY_S3_ENDPOINT_URL": url,
        }

    cluster = NetnsCluster(
        [{"num_cpus": 1}, {"num_cpus": 2, "resources": {"collector": 2, "replay": 1}}],
        setup=start_s3,
    )
    try:
        yield cluster
    finally:
        cluster.close()


def test_run_across_nodes_with_s3_storage(s3_cluster: NetnsCluster, tmp_path: Path) -> None:
    cluster = s3_cluster
    head, worker = cluster.nodes
    run_uri = "s3://convoy-mn/runs/mn1"
    proc, out = cluster.train(
        head,
        f"run.out_dir={run_uri}",
        "run.total_env_steps=2000",
        "run.checkpoint_every_updates=20",
        env={"CONVOY_REPLAY_PASSWORD": PASSWORD},
    )
    try:
        shard = out.wait_for(r"placement: shard 0 -> node (\S+) \(redis://convoy@([\d.]+):(\d+)/0\)", timeout=240)
        assert shard.group(1) == worker.address and shard.group(2) == worker.address
        host, port = shard.group(2), int(shard.group(3))
        # The shard listens on the worker's own address, and only with the run's password.
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=host, port=port, socket_timeout=5).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=host, port=port, password="wrong", socket_timeout=5).ping()
        with pytest.raises(redis.AuthenticationError):  # the default user is off, whatever the password
            redis.Redis(host=host, port=port, password=PASSWORD, socket_timeout=5).ping()
        assert redis.Redis(host=host, port=port, username="convoy", password=PASSWORD, socket_timeout=5).ping()
        try:
            proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            pytest.fail("the run did not finish within 600 s:\n" + out.text[-5000:])
    finally:
        stop_run(proc)
    text = out.text
    assert proc.returncode == 0, text[-5000:]
    assert PASSWORD not in text
    learner = re.search(r"placement: learner -> node (\S+)", text)
    assert learner and learner.group(1) == head.address, text[-3000:]
    collectors = re.findall(r"placement: collector (\d) -> node (\S+)", text)
    assert sorted(collectors) == [("0", worker.address), ("1", worker.address)], text[-3000:]
    done = re.search(
        r"done \(budget\): env_steps (\d+) .* updates (\d+) .* weights v(\d+), collectors acted with up to v(\d+)", text
    )
    assert done, text[-3000:]
    env_steps, updates, version, acting = map(int, done.groups())
    assert env_steps == 2000 and updates > 0 and version > 0 and acting > 0

    def convoy(*args: str) -> object:
        return cluster.run(head, [sys.executable, "-m", "deploy.cli", *args], cwd=str(REPO), timeout=300)

    summary_text = convoy_cat(cluster, head, run_uri + "/summary.json")
    summary = json.loads(summary_text)
    assert summary["exit_reason"] == "budget" and summary["env_steps"] == 2000 and summary["corrupt_segments"] == 0
    config_text = convoy_cat(cluster, head, run_uri + "/config.yaml")
    assert PASSWORD not in config_text and "password: '***'" in config_text

    listed = convoy("checkpoints", "list", run_uri, "--json")
    assert listed.returncode == 0, listed.stderr[-3000:]  # type: ignore[attr-defined]
    checkpoints = json.loads(listed.stdout)  # type: ignore[attr-defined]
    assert checkpoints and checkpoints[-1]["updates"] == updates
    pulled = tmp_path / "pulled"
    pulled.mkdir()
    pull = convoy("checkpoints", "pull", run_uri, "--checkpoint", "latest", "--to", str(pulled))
    assert pull.returncode == 0, pull.stderr[-3000:]  # type: ignore[attr-defined]
    (ckpt_dir,) = [p for p in pulled.iterdir() if p.is_dir()]
    ev = convoy("evaluate", "--checkpoint", str(ckpt_dir), "--episodes", "1", "--json")
    assert ev.returncode == 0, ev.stderr[-3000:]  # type: ignore[attr-defined]
    result = json.loads(ev.stdout)  # type: ignore[attr-defined]
    assert result["episodes"] == 1 and result["updates"] == updates


def convoy_cat(cluster: NetnsCluster, node: object, uri: str) -> str:
    """Read one object of the run's storage from inside a node, as a user's tools would."""
    r = cluster.run(
        node,  # type: ignore[arg-type]
        [sys.executable, "-c", "import sys; from common import storage; print(storage.read_text(sys.argv[1]))", uri],
        cwd=str(REPO),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_a_shard_moved_to_another_node_is_found_by_writers_and_the_learner(tmp_path: Path) -> None:
    """The node holding the shard dies mid-run: the supervisor replaces the shard on the other
    replay node, at a new address, and the collectors' writers and the learner's sampler follow
    it there (inserts and samples reach it) until the run ends on its budget."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    nodes = [
        {"num_cpus": 2, "resources": {"collector": 2}},  # driver, learner and collectors
        {"num_cpus": 1, "resources": {"replay": 1}},
        {"num_cpus": 1, "resources": {"replay": 1}},
    ]
    with NetnsCluster(nodes) as cluster:
        head = cluster.nodes[0]
        proc, out = cluster.train(
            head,
            f"run.out_dir={tmp_path / 'moved'}",
            "run.total_env_steps=2000",
            "collector.num_collectors=2",
            env={"CONVOY_REPLAY_PASSWORD": PASSWORD},
        )
        try:
            placed = out.wait_for(r"placement: shard 0 -> node (\S+) \(redis://convoy@([\d.]+):(\d+)/0\)", timeout=240)
            out.wait_for(r"env_steps +[1-9]\d{2,} ", timeout=240)  # collectors are inserting
            (dying,) = [n for n in cluster.nodes if n.address == placed.group(1)]
            cluster.stop_node(dying)
            moved = out.wait_for(
                r"replay shard 0 replaced at a new address, redis://convoy:?\*{0,3}@([\d.]+):(\d+)/0", timeout=180
            )
            host, port = moved.group(1), int(moved.group(2))
            assert host != dying.address
            client = redis.Redis(host=host, port=port, username="convoy", password=PASSWORD, socket_timeout=5)
            deadline = time.monotonic() + 120
            inserted = sampled = 0
            while time.monotonic() < deadline and not (inserted > 0 and sampled > 0):
                inserted, sampled = (int(v or 0) for v in client.mget("cvy:inserted_total", "cvy:sampled_total"))
                time.sleep(0.5)
            assert inserted > 0 and sampled > 0, (inserted, sampled, out.text[-3000:])
            try:
                proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                pytest.fail("the run did not finish within 600 s:\n" + out.text[-5000:])
        finally:
            stop_run(proc)
        text = out.text
        assert proc.returncode == 0, text[-5000:]
        assert re.search(r"done \(budget\): env_steps 2000", text), text[-3000:]
        assert PASSWORD not in text
        summary = json.loads((tmp_path / "moved" / "summary.json").read_text())
        print("moved-shard summary.json:", json.dumps(summary, indent=2))
        assert summary["exit_reason"] == "budget" and summary["shard_restarts"] >= 1, summary
