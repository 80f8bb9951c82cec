"""Starting a CARLA server process: the launch script, the node's GPUs, command line and
environment, and killing the whole process group (the launch scripts start the engine
binary as a child, so killing only the script would orphan it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from actors.carla.errors import SimulatorUnavailable
from actors.carla.ports import PortBlock

LAUNCHERS = ("CarlaUE4.sh", "CarlaUnreal.sh")  # 0.9.x (UE4), 0.10 (UE5)


def find_launcher(root: str | Path = "") -> Path:
    """The server launch script under ``root`` (or $CARLA_ROOT)."""
    base = str(root) or os.environ.get("CARLA_ROOT", "")
    if not base:
        raise SimulatorUnavailable(
            "no CARLA install to launch: set carla.root or $CARLA_ROOT to the directory holding "
            f"{' or '.join(LAUNCHERS)}, or set carla.host to attach to a running server"
        )
    for name in LAUNCHERS:
        path = Path(base) / name
        if path.is_file():
            return path
    raise SimulatorUnavailable(f"carla.root / $CARLA_ROOT = {base!r} holds neither {' nor '.join(LAUNCHERS)}")


def detect_gpus() -> list[int]:
    """Indices of the node's NVIDIA GPUs (empty when none or no driver)."""
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10, check=True).stdout
            return [i for i, line in enumerate(ln for ln in out.splitlines() if ln.startswith("GPU "))]
        except (OSError, subprocess.SubprocessError):
            pass
    proc = Path("/proc/driver/nvidia/gpus")
    return list(range(len(list(proc.iterdir())))) if proc.is_dir() else []


@dataclass(frozen=True)
class LaunchSpec:
    """How to start a server; :meth:`command` is pure, so tests check the flags without one."""

    executable: Path
    quality_level: str = "Low"
    render_offscreen: bool = True
    extra_args: tuple[str, ...] = ()
    gpus: tuple[int, ...] = ()

    def gpu_for(self, block: PortBlock) -> int | None:
        # Port slots are handed out lowest first, so consecutive servers of a node land on
        # consecutive GPUs.
        return self.gpus[block.slot % len(self.gpus)] if self.gpus else None

    def command(self, block: PortBlock) -> list[str]:
        args = [
            str(self.executable),
            f"-carla-rpc-port={block.rpc}",
            f"-carla-streaming-port={block.streaming}",
            f"-carla-secondary-port={block.secondary}",
            f"-quality-level={self.quality_level}",
            "-nosound",
        ]
        if self.render_offscreen:
            # Off-screen still renders camera sensors (unlike -nullrhi / no-rendering mode);
            # CARLA docs, "Rendering options".
            args.append("-RenderOffScreen")
        gpu = self.gpu_for(block)
        if gpu is not None:
            # Vulkan picks its device from -graphicsadapter (UE4's r.GraphicsAdapter);
            # CUDA_VISIBLE_DEVICES does not steer Vulkan but is set too (see environment()).
            args.append(f"-graphicsadapter={gpu}")
        args.extend(self.extra_args)
        return args

    def environment(self, block: PortBlock, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        gpu = self.gpu_for(block)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        elif env.get("CUDA_VISIBLE_DEVICES") == "":
            # Ray hides GPUs from CPU-only actors with an empty value; the server must not inherit that.
            del env["CUDA_VISIBLE_DEVICES"]
        return env


def kill_group(pgid: int, grace_s: float = 5.0) -> None:
    """SIGTERM the group, give it ``grace_s``, then SIGKILL whatever is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            time.sleep(0.05)
            os.killpg(pgid, 0)  # raises ProcessLookupError once every member is gone
        os.killpg(pgid, signal.SIGKILL)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
