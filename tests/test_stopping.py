"""Stopping a real `convoy train` (CLI subprocess, real Ray, redis-server and env): SIGINT to the
process group (what Ctrl-C in a terminal does) and SIGTERM to the driver (Kubernetes, `ray job
stop`, systemd) end the run the same clean way, also while every collector is blocked on the
replay rate limit, and a second SIGTERM while it finishes still leaves a valid summary.json.

The replay writer's stop flag on its own (no Ray) is tested here too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Ctrl-C to exit on a 2-core machine with 4 collectors; measured 9-10 s on a heavily loaded one.
STOP_TARGET_S = 20.0


def _start(out_dir: Path, *overrides: str) -> tuple[subprocess.Popen[str], list[str]]:
    """A run with 4 collectors that the rate limiter holds: 4096 samples per inserted transition
    with batches of 32 make the learner ~128 updates behind per transition."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deploy.cli",
            "train",
            "--config",
            "deploy/configs/local-cpu.yaml",
            "run.total_env_steps=1000000",
            "run.eval_every_updates=0",
            "run.progress_every_s=1",
            "collector.num_collectors=4",
            "collector.start_steps=200",
            "collector.steps_per_call=50",
            "learner.batch_size=32",
            "learner.hidden_dim=32",
            "replay.samples_per_insert=4096",
            f"run.out_dir={out_dir}",
            *overrides,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Its own process group, as a terminal gives a foreground job, and SIGINT not ignored:
        # under a shell's background job pytest inherits SIG_IGN for it, and so would the run.
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        env={**os.environ, "SDL_VIDEODRIVER": "offscreen"},
    )
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


def _wait_until_blocked(proc: subprocess.Popen[str], lines: list[str], timeout: float = 600) -> None:
    """Until all 4 collectors are placed and replay stops growing above the warm-up (200): every
    collector then sits in the rate limiter's wait."""
    deadline = time.monotonic() + timeout
    seen: list[int] = []
    while time.monotonic() < deadline:
        assert proc.poll() is None, "".join(lines[-60:])
        progress = [ln for ln in lines if "collectors 4/4" in ln]
        sizes = [int(m.group(1)) for ln in progress if (m := re.search(r"\| replay\s+(\d+) \|", ln))]
        if len(sizes) > len(seen):
            seen = sizes
            if len(seen) >= 4 and seen[-1] >= 200 and seen[-1] == seen[-4]:
                return
        time.sleep(0.2)
    raise AssertionError("the collectors were not held by the rate limiter:\n" + "".join(lines[-60:]))


def _summary(out_dir: Path) -> dict[str, object]:
    summary: dict[str, object] = json.loads((out_dir / "summary.json").read_text())
    return summary


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _send_while_finishing(proc: subprocess.Popen[str], lines: list[str], signum: signal.Signals) -> None:
    """A second ``signum`` once the run says it is stopping (a second `kill`, or a Kubernetes
    grace period running out), while the collectors are being stopped."""
    deadline = time.monotonic() + 60
    while not any(ln.startswith(f"stopping ({signum.name})") for ln in lines):
        assert time.monotonic() < deadline and proc.poll() is None, "".join(lines[-40:])
        time.sleep(0.01)
    proc.send_signal(signum)


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm-twice"])
def test_a_signal_ends_a_rate_limited_run_cleanly_and_in_time(tmp_path: Path, signum: signal.Signals) -> None:
    """Ctrl-C once: a clean end with a final checkpoint. SIGTERM twice (the second while the
    run finishes, which hurries it): still exit 0 and a whole summary.json naming a complete
    checkpoint or none. Both within STOP_TARGET_S."""
    from learner.checkpoint import list_checkpoints

    out_dir = tmp_path / "run"
    proc, lines = _start(out_dir)
    try:
        _wait_until_blocked(proc, lines)
        sent = time.monotonic()
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)  # Ctrl-C reaches every process of the foreground group
        else:
            proc.send_signal(signum)
            _send_while_finishing(proc, lines, signum)
        proc.wait(timeout=120)
        took = time.monotonic() - sent
    finally:
        _stop(proc)
    text = "".join(lines)
    print(f"{signum.name}: exit {proc.returncode} after {took:.1f} s")
    assert proc.returncode == 0, text[-4000:]  # never a signal death (-6 was Ray's SIGTERM abort)
    assert "SIGTERM received" not in text and "Traceback" not in text, text[-4000:]
    assert f"stopping ({signum.name})" in text and "done (interrupted)" in text, text[-3000:]
    summary = _summary(out_dir)  # whole JSON: written before the final checkpoint, atomically
    assert summary["exit_reason"] == "interrupted" and summary["interrupted_by"] == signum.name
    complete = [c.name for c in list_checkpoints(str(out_dir))]  # oldest first
    if signum == signal.SIGINT:
        assert summary["final_checkpoint"] is not None and complete, text[-3000:]
        assert str(summary["final_checkpoint"]).rstrip("/").rsplit("/", 1)[-1] == complete[-1]
    else:
        # The summary names a complete checkpoint or none; one cut short has no manifest and is ignored.
        newest = summary["newest_checkpoint"]
        assert newest is None or str(newest).rstrip("/").rsplit("/", 1)[-1] in complete, (newest, complete)
    assert took < STOP_TARGET_S, f"{signum.name} took {took:.1f} s to end the run:\n{text[-3000:]}"


def test_the_writers_rate_limit_wait_ends_when_stop_is_set(redis_url: str) -> None:
    from replay_service.writer import ReplayWriter
    from tests.test_replay import make_segment

    stop = threading.Event()
    w = ReplayWriter(
        [redis_url], 10_000, samples_per_insert=1000.0, spi_tolerance=100.0, min_size_to_sample=10, stop=stop
    )
    try:
        w.write(make_segment(20))  # past the warm-up: the next write would wait for a learner forever
        threading.Timer(0.5, stop.set).start()
        started = time.monotonic()
        w.write(make_segment(20))
        assert 0.4 < time.monotonic() - started < 5
        assert w.metrics()["replay_writer/rate_limited_total"] == 1
        assert w.transitions_total == 40  # the segment waited for is still written whole
    finally:
        w.close()


def test_the_first_signal_interrupts_later_ones_hurry_and_ignored_ones_stay_ignored() -> None:
    from deploy.run.signals import StopSignals

    term_before = signal.getsignal(signal.SIGTERM)  # an in-process ray.init earlier in the suite sets one
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    signals = StopSignals()
    try:
        signals.install()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)  # ignored: nothing happens
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs in the main thread between bytecodes
        assert signals.received == ["SIGTERM"] and not signals.hurry.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert signals.received == ["SIGTERM", "SIGTERM"] and signals.hurry.is_set()
    finally:
        signals.restore()
        signal.signal(signal.SIGINT, before)
    assert signal.getsignal(signal.SIGTERM) == term_before  # restore puts back what was there
