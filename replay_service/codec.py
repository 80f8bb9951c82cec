"""The replay storage format: one Redis string per segment, readable by byte range.

Layout (little-endian)::

    0   magic b"CVYS", format u8, codec u8, 2 reserved bytes
    8   u32 T (transitions), u32 header_len, u32 records_off, u32 table_off,
        u32 frames_off, u32 total_len
    32  msgpack header: ids and shapes (never pickle: replay data may come from anywhere)
        records: T + 1 fixed-size step records (RECORD_DTYPE); record t holds the vector of
                 observation t and the action/reward/flags/version of step t; record T holds
                 only the last next-vector
        table:   T + 5 u32 offsets of the T + 4 frames, relative to frames_off
        frames:  each frame compressed on its own

Because records and the frame table are fixed-width, the byte range a transition needs is
computable from the prefix alone: records t..t+1, table entries t..t+5 and then frames t..t+4,
which are one contiguous range. The sampler's Lua script reads exactly those ranges.

A frame stored at exactly its raw size (84*84 bytes) is stored raw: a compressed frame is
only kept when it is smaller, so the rule is unambiguous and incompressible frames cost no
codec overhead.
"""

from __future__ import annotations

import struct
import threading
from typing import Any

import lz4.block
import msgpack
import numpy as np
import zstandard

from common.schema import ACTION_DIM, FRAME_SHAPE, STACK, VECTOR_DIM, Segment

MAGIC = b"CVYS"
FORMAT_VERSION = 1
PREFIX = struct.Struct("<4sBBxxIIIIII")
PREFIX_SIZE = PREFIX.size  # 32
assert PREFIX_SIZE == 32

CODECS = {"none": 0, "lz4": 1, "zstd": 2}
CODEC_NAMES = {v: k for k, v in CODECS.items()}
FRAME_BYTES = FRAME_SHAPE[0] * FRAME_SHAPE[1]

RECORD_DTYPE = np.dtype(
    [
        ("vector", "<f4", (VECTOR_DIM,)),
        ("action", "<f4", (ACTION_DIM,)),
        ("reward", "<f4"),
        ("flags", "u1"),  # bit 0 terminated, bit 1 truncated
        ("version", "<i8"),
    ]
)
RECORD_SIZE = RECORD_DTYPE.itemsize  # 113
TERMINATED, TRUNCATED = 1, 2
# Sanity bound on T so a corrupt prefix cannot make a reader allocate gigabytes.
MAX_TRANSITIONS = 1 << 16
ZSTD_LEVEL = 3


class CorruptSegmentError(ValueError):
    """The one error a reader raises for a value that is not a valid convoy segment."""


class FrameCodec:
    """Per-frame compression; one instance per thread (zstd contexts are not thread-safe)."""

    def __init__(self, name: str) -> None:
        if name not in CODECS:
            raise ValueError(f"replay.codec={name!r}: allowed: {', '.join(CODECS)}")
        self.name = name
        self.id = CODECS[name]
        self._zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL) if name == "zstd" else None
        self._zd = zstandard.ZstdDecompressor() if name == "zstd" else None

    def compress(self, raw: bytes) -> bytes:
        if self.name == "lz4":
            out = lz4.block.compress(raw, store_size=False)
        elif self._zc is not None:
            out = self._zc.compress(raw)
        else:
            return raw
        return out if len(out) < len(raw) else raw

    def decompress(self, data: bytes | memoryview) -> bytes:
        if len(data) == FRAME_BYTES:
            return bytes(data)
        try:
            if self.name == "lz4":
                out = lz4.block.decompress(data, uncompressed_size=FRAME_BYTES)
            elif self._zd is not None:
                out = self._zd.decompress(bytes(data), max_output_size=FRAME_BYTES)
            else:
                raise CorruptSegmentError(f"frame of {len(data)} bytes under codec 'none' (expected {FRAME_BYTES})")
        except CorruptSegmentError:
            raise
        except Exception as exc:  # lz4 and zstd raise their own types on garbage
            raise CorruptSegmentError(f"frame does not decompress with {self.name}: {exc}") from None
        if len(out) != FRAME_BYTES:
            raise CorruptSegmentError(f"frame decompressed to {len(out)} bytes, expected {FRAME_BYTES}")
        return out


_local = threading.local()


def frame_codec(codec_id: int) -> FrameCodec:
    """A thread-local codec for a codec id read from a blob."""
    name = CODEC_NAMES.get(codec_id)
    if name is None:
        raise CorruptSegmentError(f"unknown codec id {codec_id}")
    cache: dict[int, FrameCodec] = _local.__dict__.setdefault("codecs", {})
    if codec_id not in cache:
        cache[codec_id] = FrameCodec(name)
    return cache[codec_id]


def encode_segment(seg: Segment, codec: FrameCodec) -> bytes:
    """Serialise a validated segment into the layout above."""
    seg.validate()
    t = seg.num_transitions
    header = msgpack.packb(
        {
            "episode_id": int(seg.episode_id),
            "collector_id": int(seg.collector_id),
            "segment_index": int(seg.segment_index),
            "frame_shape": list(FRAME_SHAPE),
            "stack": STACK,
            "record_size": RECORD_SIZE,
        },
        use_bin_type=True,
    )
    records = np.zeros(t + 1, dtype=RECORD_DTYPE)
    records["vector"] = seg.vectors
    records["action"][:t] = seg.actions
    records["reward"][:t] = seg.rewards
    records["flags"][:t] = seg.terminated.astype(np.uint8) * TERMINATED + seg.truncated.astype(np.uint8) * TRUNCATED
    records["version"][:t] = seg.policy_versions
    frames = [codec.compress(seg.frames[i].tobytes()) for i in range(seg.frames.shape[0])]
    table = np.zeros(len(frames) + 1, dtype="<u4")
    np.cumsum([len(f) for f in frames], out=table[1:])
    records_off = PREFIX_SIZE + len(header)
    table_off = records_off + records.nbytes
    frames_off = table_off + table.nbytes
    total = frames_off + int(table[-1])
    prefix = PREFIX.pack(MAGIC, FORMAT_VERSION, codec.id, t, len(header), records_off, table_off, frames_off, total)
    blob = b"".join([prefix, header, records.tobytes(), table.tobytes(), *frames])
    assert len(blob) == total
    return blob


def parse_prefix(blob: bytes | memoryview) -> tuple[int, int, int, int, int, int, int]:
    """Check the fixed prefix; returns (codec_id, T, header_len, records_off, table_off, frames_off, total)."""
    if len(blob) < PREFIX_SIZE:
        raise CorruptSegmentError(f"value of {len(blob)} bytes is shorter than the {PREFIX_SIZE}-byte prefix")
    magic, fmt, codec_id, t, hlen, roff, toff, foff, total = PREFIX.unpack_from(blob, 0)
    if magic != MAGIC:
        raise CorruptSegmentError(f"bad magic {magic!r} (not a convoy segment)")
    if fmt != FORMAT_VERSION:
        raise CorruptSegmentError(f"unsupported segment format {fmt}")
    if codec_id not in CODEC_NAMES:
        raise CorruptSegmentError(f"unknown codec id {codec_id}")
    if not 1 <= t <= MAX_TRANSITIONS:
        raise CorruptSegmentError(f"transition count {t} out of range")
    if (
        roff != PREFIX_SIZE + hlen
        or toff != roff + (t + 1) * RECORD_SIZE
        or foff != toff + (t + STACK + 1) * 4
        or total < foff
    ):
        raise CorruptSegmentError("section offsets are inconsistent")
    return codec_id, t, hlen, roff, toff, foff, total


def _check_table(table: np.ndarray, limit: int) -> None:
    if table[0] != 0 or (np.diff(table.astype(np.int64)) <= 0).any() or int(table[-1]) > limit:
        raise CorruptSegmentError("frame offset table is not increasing within the value")


def decode_segment(blob: bytes) -> Segment:
    """Decode a whole segment (tests, tools); raises only :class:`CorruptSegmentError`."""
    codec_id, t, hlen, roff, toff, foff, total = parse_prefix(blob)
    if len(blob) != total:
        raise CorruptSegmentError(f"value is {len(blob)} bytes, prefix says {total}")
    try:
        header: Any = msgpack.unpackb(blob[PREFIX_SIZE:roff], raw=False, strict_map_key=True)
    except Exception as exc:
        raise CorruptSegmentError(f"header is not msgpack: {exc}") from None
    ids = ("episode_id", "collector_id", "segment_index")
    if not isinstance(header, dict) or not all(isinstance(header.get(k), int) and 0 <= header[k] < 2**63 for k in ids):
        raise CorruptSegmentError("header lacks integer episode_id/collector_id/segment_index")
    if header.get("frame_shape") != list(FRAME_SHAPE) or header.get("record_size") != RECORD_SIZE:
        raise CorruptSegmentError(f"header frame_shape/record_size do not match this build: {header!r:.200}")
    records = np.frombuffer(blob, dtype=RECORD_DTYPE, count=t + 1, offset=roff)
    table = np.frombuffer(blob, dtype="<u4", count=t + STACK + 1, offset=toff)
    _check_table(table, total - foff)
    codec = frame_codec(codec_id)
    view = memoryview(blob)
    frames = np.empty((t + STACK, *FRAME_SHAPE), dtype=np.uint8)
    for i in range(t + STACK):
        raw = codec.decompress(view[foff + int(table[i]) : foff + int(table[i + 1])])
        frames[i] = np.frombuffer(raw, dtype=np.uint8).reshape(FRAME_SHAPE)
    flags = records["flags"][:t]
    if (flags & ~np.uint8(TERMINATED | TRUNCATED)).any():
        raise CorruptSegmentError("unknown bits in step flags")
    seg = Segment(
        frames=frames,
        vectors=records["vector"].astype(np.float32),
        actions=records["action"][:t].astype(np.float32),
        rewards=records["reward"][:t].astype(np.float32),
        terminated=(flags & TERMINATED).astype(bool),
        truncated=(flags & TRUNCATED).astype(bool),
        policy_versions=records["version"][:t].astype(np.int64),
        episode_id=header["episode_id"],
        collector_id=header["collector_id"],
        segment_index=header["segment_index"],
    )
    try:
        seg.validate()
    except ValueError as exc:
        raise CorruptSegmentError(f"decoded segment breaks the contract: {exc}") from None
    return seg


def decode_transition_parts(
    codec_id: int,
    records: bytes,
    table: bytes,
    frames: bytes,
    out_frames: np.ndarray,
) -> np.ndarray:
    """Decode one sampled transition fetched by byte range.

    ``records`` is records t and t+1, ``table`` the 6 frame offsets t..t+5 and ``frames`` the
    bytes of frames t..t+4. Writes the 5 frames into ``out_frames`` (5, 84, 84) and returns the
    two records. Raises only :class:`CorruptSegmentError`.
    """
    if len(records) != 2 * RECORD_SIZE or len(table) != (STACK + 2) * 4:
        raise CorruptSegmentError("sampled ranges have the wrong size")
    offs = np.frombuffer(table, dtype="<u4").astype(np.int64)
    offs -= offs[0]
    if (np.diff(offs) <= 0).any() or offs[-1] != len(frames):
        raise CorruptSegmentError("frame offsets do not match the fetched frame bytes")
    codec = frame_codec(codec_id)
    view = memoryview(frames)
    for i in range(STACK + 1):
        raw = codec.decompress(view[offs[i] : offs[i + 1]])
        out_frames[i] = np.frombuffer(raw, dtype=np.uint8).reshape(FRAME_SHAPE)
    recs = np.frombuffer(records, dtype=RECORD_DTYPE, count=2)
    if (recs["flags"][0] & ~np.uint8(TERMINATED | TRUNCATED)) != 0:
        raise CorruptSegmentError("unknown bits in step flags")
    return recs
