"""Process-level tuning shared by the components' entry points."""

from __future__ import annotations

import ctypes
import functools
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc_for_bulk_buffers(trim_threshold: int = 256 << 20, mmap_threshold: int = 32 << 20) -> bool:
    """Keep glibc from returning freed heap to the kernel after every batch.

    With glibc's default, dynamic thresholds a process that allocates and frees megabytes per
    batch (replay batches, decoded frames, reply buffers) can have its heap trimmed after each
    batch and page-faults the same memory back in on the next one; we measured bulk Redis reads
    at under half speed in that state. Fixed thresholds keep those pages mapped. Returns False
    where glibc's mallopt is not available (other libcs): nothing changes there.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)) and bool(
            libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        )
    except (OSError, AttributeError):
        return False
    if not ok:
        log.debug("mallopt refused the bulk-buffer thresholds")
    return ok


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()
