"""A run directory belongs to one run, checkpoint failures are loud, and a corrupt newest
checkpoint is skipped (named) for the newest one that verifies."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import pytest

from common import storage
from common.config import ConfigError, ConvoyConfig, load_config
from deploy.cli.app import main
from deploy.cli.checkpoints import list_command
from deploy.cli.evaluate import evaluate
from deploy.run.driver import train
from deploy.run.resolve import default_out_dir, resolve, with_out_dir
from learner import metric_keys as keys
from learner.checkpoint import list_checkpoints
from learner.loop import CheckpointWriteError, Learner
from tests.test_resume import OVERRIDES, IndexedSource

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "deploy/configs").glob("*.yaml"))
SMALL = [*OVERRIDES, "learner.encoder=none", "env.max_episode_steps=5", "run.total_env_steps=1000000"]


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (and every directory, as b"")."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"") for p in sorted(root.rglob("*"))}


def _learner(run_dir: Path | str, *overrides: str) -> Learner:
    cfg = load_config(REPO / "deploy/configs/local.yaml", [*SMALL, *overrides])
    return Learner(cfg, IndexedSource(), run_dir)


def _run_with_checkpoints(run_dir: Path, updates: tuple[int, ...] = (2, 4)) -> Learner:
    """A run as `convoy train` leaves it: config.yaml, and a checkpoint after each count."""
    cfg = load_config(REPO / "deploy/configs/local.yaml", [*SMALL, f"run.out_dir={run_dir}", "run.run_id=runa"])
    storage.write_text(storage.join(str(run_dir), "config.yaml"), cfg.to_yaml())
    learner = Learner(cfg, IndexedSource(), run_dir)
    done = 0
    for n in updates:
        learner.train(n - done)
        done = n
        learner.checkpoint()
    return learner


def _flip_a_bit(checkpoint: Path, file: str = "actor.safetensors") -> None:
    data = bytearray((checkpoint / file).read_bytes())
    data[len(data) // 2] ^= 0x10
    (checkpoint / file).write_bytes(bytes(data))


# ----- one run per directory -----------------------------------------------------------


def test_shipped_configs_leave_out_dir_open() -> None:
    assert CONFIGS
    for path in CONFIGS:
        assert load_config(path).run.out_dir == "", path


def test_a_second_run_in_the_same_directory_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _run_with_checkpoints(run_dir).close()
    before = _tree(run_dir)
    cfg = load_config(REPO / "deploy/configs/local.yaml", [*SMALL, f"run.out_dir={run_dir}"])
    with pytest.raises(ConfigError) as err:
        train(cfg, out=io.StringIO())
    assert "--resume" in str(err.value) and str(run_dir) in str(err.value)
    # The same through the CLI: one line, exit code 2.
    config = tmp_path / "b.yaml"
    config.write_text(cfg.to_yaml())
    assert main(["train", "--config", str(config)]) == 2
    assert _tree(run_dir) == before
    # A config.yaml alone (a run that died before its first checkpoint) holds the directory too.
    (run_dir / "checkpoints").rename(tmp_path / "moved")
    with pytest.raises(ConfigError, match=r"config\.yaml"):
        resolve(cfg, None, io.StringIO())


def test_runs_without_out_dir_get_distinct_new_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = 1_800_000_000.0
    first = default_out_dir("local-cpu", root=tmp_path, now=now)
    second = default_out_dir("local-cpu", root=tmp_path, now=now)  # the same second
    assert first != second
    assert Path(first).parent == Path(second).parent == tmp_path / "local-cpu"
    assert Path(second).name == Path(first).name + "-2"
    monkeypatch.chdir(tmp_path)
    a = with_out_dir(ConvoyConfig(), "local")
    b = with_out_dir(ConvoyConfig(), "local")
    assert a.run.out_dir != b.run.out_dir and a.run.out_dir.startswith("runs/local/")
    # Each fresh run gets its own lineage id, recorded in its config.
    ra, rb = resolve(a, None, io.StringIO()), resolve(b, None, io.StringIO())
    assert ra.cfg.run.run_id and rb.cfg.run.run_id and ra.cfg.run.run_id != rb.cfg.run.run_id


def test_resume_typo_leaves_the_run_untouched(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _run_with_checkpoints(run_dir).close()
    before = _tree(run_dir)
    config = tmp_path / "c.yaml"
    config.write_text(load_config(REPO / "deploy/configs/local.yaml", [*SMALL, f"run.out_dir={run_dir}"]).to_yaml())
    assert main(["train", "--config", str(config), "--resume", str(tmp_path / "rnu")]) == 1
    assert main(["train", "--resume", str(tmp_path / "rnu")]) == 2
    assert _tree(run_dir) == before


def test_resume_keeps_the_lineage_and_its_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _run_with_checkpoints(run_dir).close()
    cfg = load_config(REPO / "deploy/configs/local.yaml", SMALL)  # no out_dir: the resumed run's
    run = resolve(cfg, str(run_dir), io.StringIO())
    assert run.cfg.run.out_dir == str(run_dir) and run.cfg.run.run_id == "runa"
    assert run.resume is not None and run.resume.endswith("ckpt-0000000004")
    other = tmp_path / "other"
    _learner(other, f"run.out_dir={other}", "run.run_id=runb").checkpoint()
    with pytest.raises(ConfigError, match="another run"):
        resolve(cfg.replace(f"run.out_dir={other}"), str(run_dir), io.StringIO())


# ----- loud checkpoint failures ----------------------------------------------------------


def test_unwritable_out_dir_counts_failures_and_stops_past_the_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    learner = _learner(blocker / "run", "run.checkpoint_every_updates=1", "run.max_checkpoint_failures=2")
    with caplog.at_level(logging.ERROR, logger="learner.loop"):
        learner.train(1)
        learner.flush()
        assert learner.train(0)[keys.CHECKPOINT_FAILURES_TOTAL_KEY] == 1
        stop = r"2 checkpoint writes in a row failed.*max_checkpoint_failures=2"
        with pytest.raises(CheckpointWriteError, match=stop):
            learner.train(5)
    assert learner.checkpoint_failures_total == 2
    assert "checkpoint" in caplog.text and "failed" in caplog.text and "a-file" in caplog.text
    learner.close()


def test_a_success_resets_the_run_of_failures(tmp_path: Path) -> None:
    learner = _learner(tmp_path / "run", "run.max_checkpoint_failures=2")
    learner.consecutive_checkpoint_failures = 1
    learner.checkpoint()
    assert learner.consecutive_checkpoint_failures == 0
    learner.close()


# ----- past a corrupt checkpoint ---------------------------------------------------------


def test_flipped_bit_falls_back_everywhere_naming_the_skipped_one(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _run_with_checkpoints(run_dir).close()
    _flip_a_bit(run_dir / "checkpoints" / "ckpt-0000000004")
    # --resume
    out = io.StringIO()
    cfg = load_config(REPO / "deploy/configs/local.yaml", SMALL)
    run = resolve(cfg, str(run_dir), out)
    assert run.resume is not None and run.resume.endswith("ckpt-0000000002")
    assert "skipped ckpt-0000000004" in out.getvalue() and "sha256" in out.getvalue()
    # a learner restart
    learner = _learner(run_dir, f"run.out_dir={run_dir}", "run.run_id=runa")
    assert learner.restore(str(run_dir)).endswith("ckpt-0000000002") and learner.updates == 2
    learner.close()
    # convoy evaluate
    log = io.StringIO()
    result = evaluate(str(run_dir), 1, log=log)
    assert result["checkpoint"].endswith("ckpt-0000000002") and result["updates"] == 2
    assert "skipped ckpt-0000000004" in log.getvalue()


def test_checkpoints_list_verify_marks_the_corrupt_one(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _run_with_checkpoints(run_dir).close()
    out, err = io.StringIO(), io.StringIO()
    assert list_command(str(run_dir), False, out, err, verify=True) == 0
    assert "CORRUPT" not in out.getvalue()
    _flip_a_bit(run_dir / "checkpoints" / "ckpt-0000000002", "optimizers.pt")
    out, err = io.StringIO(), io.StringIO()
    assert list_command(str(run_dir), False, out, err, verify=True) == 1
    rows = {line.split()[0]: line for line in out.getvalue().splitlines()[1:]}
    assert "CORRUPT" in rows["ckpt-0000000002"] and "CORRUPT" not in rows["ckpt-0000000004"]
    assert "CORRUPT ckpt-0000000002" in err.getvalue() and "optimizers.pt" in err.getvalue()
    assert [c.name for c in list_checkpoints(run_dir)] == ["ckpt-0000000002", "ckpt-0000000004"]


def test_s3_without_credentials_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("s3fs")
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("CONVOY_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    assert main(["checkpoints", "list", "s3://bucket/run"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "s3://bucket/run" in err and "AWS_ACCESS_KEY_ID" in err
    assert main(["checkpoints", "list", "s3://key:secret@bucket/run"]) == 1
    err = capsys.readouterr().err
    assert "secret" not in err and err.count("\n") == 1


def test_learner_restart_and_pruning_see_only_the_runs_own_lineage(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _run_with_checkpoints(run_dir).close()
    # Another run's learner writes into the same directory (an old convoy, or a racing start).
    intruder = _learner(run_dir, f"run.out_dir={run_dir}", "run.run_id=runb", "run.keep_checkpoints=1")
    intruder.train(7)
    intruder.checkpoint()
    intruder.train(1)
    intruder.checkpoint()
    intruder.close()
    names = {c.name: c.run_id for c in list_checkpoints(run_dir)}
    assert names == {"ckpt-0000000002": "runa", "ckpt-0000000004": "runa", "ckpt-0000000008": "runb"}
    learner = _learner(run_dir, f"run.out_dir={run_dir}", "run.run_id=runa")
    assert learner.restore(str(run_dir)).endswith("ckpt-0000000004") and learner.updates == 4
    learner.close()
