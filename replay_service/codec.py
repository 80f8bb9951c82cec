"""The replay storage format: one Redis string per segment, readable by byte range.

Layout (little-endian, format 2)::

    0   prefix (32 bytes): magic b"CVYS", format u8, codec u8, 2 reserved bytes,
        u32 T (transitions), u32 header_len, u32 table_off (= 32), u32 header_off,
        u32 units_off, u32 total_len
    32  table: T + 5 u32 offsets, relative to units_off, of units 0 .. T+3 and of their end
        header: msgpack ids and shapes (never pickle: replay data may come from anywhere)
        units: unit i = [8-byte zstd skippable-frame header][step record i][frame i compressed]

Unit ``i`` pairs frame ``i`` with step record ``i`` (``RECORD_DTYPE``: the vector of
observation ``i`` and the action/reward/flags/version of step ``i``; records past ``T - 1`` hold
only a vector or zeros). Transition ``t`` needs frames ``t .. t+4`` and records ``t, t+1``:
units ``t .. t+4``, one contiguous byte range whose ends are table entries ``t`` and ``t+5``.
An n-step window of ``k`` steps (replay_service/window.py) needs records ``t .. t+k`` and
frames ``t .. t+k+3``: units ``t .. t+k+3``, table entries ``t`` and ``t+k+4``.
The sampler mirrors each segment's table once (prefix + table are the first bytes of the
value), so a batch is one pipelined GETRANGE per transition and nothing else.

Each record is wrapped as a zstd *skippable frame* (magic 0x184D2A50 + length): a run of units
is then a valid concatenation of zstd frames, and a whole batch of transitions decompresses
in one call that skips the records and writes every frame straight into the batch buffer
(:func:`decode_batch`). That one C call releases the GIL, so sampler threads decode in
parallel; a per-frame Python loop was the sampler's bottleneck (~1-2 us of interpreter work
per frame on top of the codec).

Codec choice, measured on 423 frames recorded from the embedded simulator (84x84 gray,
mean bytes per frame / decode time per frame, 2-core box, medians; see ``convoy bench replay``)::

    lz4 (fast)      1046 B   2.0 us        zstd-1   353 B   5.7 us
    lz4hc-9          360 B   1.1 us  (compress 270 us/frame)
    zstd-3           345 B   5.1 us        zstd-6   242 B   2.3-2.7 us (compress 21 us)
    zstd-9           250 B   2.8 us        zstd-19  195 B   4.1 us (compress 2.8 ms)
    zstd-3 + 4 KB trained dictionary: 309 B (-10 %): not worth shipping/versioning a dictionary

zstd-6 is the default: smallest of the cheap levels (lz4's 1046 B/frame misses the 50x
target on its own), decodes as fast as lz4hc once the per-frame Python call is gone (batch
stream decode), and costs a collector ~21 us per frame against a ~7 ms simulator step.
Incompressible frames cost zstd ~9 bytes of framing (raw blocks), 0.13 %.

Every zstd frame carries its content size (7056): libzstd then rejects any frame that does not
decode to exactly one 84x84 frame, so a corrupt value cannot shift pixels between frames.
lz4 and 'none' stay readable (per-frame path); a frame stored at exactly 84*84 bytes under
lz4 is stored raw (compression did not help).

The writer and every reader of this layout stay in this one module (some 460 lines,
a tenth of it this description): the offsets the encoder writes are the offsets the index
parser and the batch decoder trust, so a change to one side is checked against the other here.
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
FORMAT_VERSION = 2
PREFIX = struct.Struct("<4sBBxxIIIIII")
PREFIX_SIZE = PREFIX.size
assert PREFIX_SIZE == 32

CODECS = {"none": 0, "lz4": 1, "zstd": 2}
CODEC_NAMES = {v: k for k, v in CODECS.items()}
CODEC_NONE, CODEC_LZ4, CODEC_ZSTD = 0, 1, 2
FRAME_BYTES = FRAME_SHAPE[0] * FRAME_SHAPE[1]
SPAN = STACK + 1  # frames (and units) one transition reads

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
# zstd skippable frame (RFC 8878 section 3.1.2): decoders skip it, so records interleave
# with compressed frames in one decodable stream.
SKIP_HEADER = struct.pack("<II", 0x184D2A50, RECORD_SIZE)
UNIT_HEAD = len(SKIP_HEADER) + RECORD_SIZE  # bytes before a unit's frame
# Sanity bound on T so a corrupt prefix cannot make a reader allocate gigabytes.
MAX_TRANSITIONS = 1 << 16
ZSTD_LEVEL = 6  # see the table in the module docstring

_SKIP_HEADER_ARR = np.frombuffer(SKIP_HEADER, np.uint8)


def _zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    return zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False, write_dict_id=False)


# The first bytes of every zstd frame this build writes for an 84x84 frame (magic, frame header
# descriptor, 2-byte content size); decode_batch checks them before trusting the batch path.
ZSTD_FRAME_HEAD = _zstd_compressor(ZSTD_LEVEL).compress(bytes(FRAME_BYTES))[:7]
_ZSTD_HEAD_ARR = np.frombuffer(ZSTD_FRAME_HEAD, np.uint8)


class CorruptSegmentError(ValueError):
    """The one error a reader raises for a value that is not a valid convoy segment."""


ZSTD_MAX_WINDOW = 1 << 16


class FrameCodec:
    """Per-frame compression; one instance per thread (zstd contexts are not thread-safe)."""

    def __init__(self, name: str, level: int = ZSTD_LEVEL) -> None:
        if name not in CODECS:
            raise ValueError(f"replay.codec={name!r}: allowed: {', '.join(CODECS)}")
        self.name = name
        self.id = CODECS[name]
        self._zc = _zstd_compressor(level) if name == "zstd" else None
        # A frame needs a window of at most its 7056 bytes; a corrupt or hostile header that asks
        # for more (zstd allows up to 2 GiB) is refused instead of allocated.
        self._zd = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)

    def compress(self, raw: bytes) -> bytes:
        if self._zc is not None:
            # Always a zstd frame (raw blocks when incompressible), so units stay one stream.
            return self._zc.compress(raw)
        if self.name == "lz4":
            out = lz4.block.compress(raw, store_size=False)
            return out if len(out) < len(raw) else raw
        return raw

    def decompress(self, data: bytes | memoryview) -> bytes:
        """One frame; raises only :class:`CorruptSegmentError`."""
        try:
            if self.id == CODEC_ZSTD:
                # Check the declared size first: a corrupt header must not make us allocate it.
                size = zstandard.frame_content_size(data)
                if size != FRAME_BYTES:
                    raise CorruptSegmentError(f"zstd frame declares {size} bytes, expected {FRAME_BYTES}")
                out = self._zd.decompress(data, max_output_size=FRAME_BYTES)
            elif len(data) == FRAME_BYTES:
                return bytes(data)
            elif self.id == CODEC_LZ4:
                out = lz4.block.decompress(data, uncompressed_size=FRAME_BYTES)
            else:
                raise CorruptSegmentError(f"frame of {len(data)} bytes under codec 'none' (expected {FRAME_BYTES})")
        except CorruptSegmentError:
            raise
        except Exception as exc:  # lz4 and zstd raise their own types on garbage
            raise CorruptSegmentError(f"frame does not decompress with {self.name}: {exc}") from None
        if len(out) != FRAME_BYTES:
            raise CorruptSegmentError(f"frame decompressed to {len(out)} bytes, expected {FRAME_BYTES}")
        return out

    def decompress_stream_into(self, data: bytes | memoryview, out: memoryview) -> int:
        """Decompress concatenated zstd frames (skipping skippable ones) into ``out``; returns bytes written."""
        reader = self._zd.stream_reader(data, read_size=max(1, len(data)), read_across_frames=True)
        got = 0
        while got < len(out):
            n = reader.readinto(out[got:])
            if n == 0:
                break
            got += n
        if got == len(out) and reader.read(1):
            raise CorruptSegmentError("zstd stream holds more than the expected frames")
        return got


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


def index_size(num_transitions: int) -> int:
    """Bytes of prefix + offset table: what the sampler reads once per segment."""
    return PREFIX_SIZE + (num_transitions + STACK + 1) * 4


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
    n_units = t + STACK
    records = np.zeros(n_units, dtype=RECORD_DTYPE)
    records["vector"][: t + 1] = seg.vectors
    records["action"][:t] = seg.actions
    records["reward"][:t] = seg.rewards
    records["flags"][:t] = seg.terminated.astype(np.uint8) * TERMINATED + seg.truncated.astype(np.uint8) * TRUNCATED
    records["version"][:t] = seg.policy_versions
    rec_bytes = records.tobytes()
    units = []
    for i in range(n_units):
        units.append(SKIP_HEADER)
        units.append(rec_bytes[i * RECORD_SIZE : (i + 1) * RECORD_SIZE])
        units.append(codec.compress(seg.frames[i].tobytes()))
    sizes = [UNIT_HEAD + len(units[3 * i + 2]) for i in range(n_units)]
    table = np.zeros(n_units + 1, dtype="<u4")
    np.cumsum(sizes, out=table[1:])
    header_off = index_size(t)
    units_off = header_off + len(header)
    total = units_off + int(table[-1])
    prefix = PREFIX.pack(MAGIC, FORMAT_VERSION, codec.id, t, len(header), PREFIX_SIZE, header_off, units_off, total)
    blob = b"".join([prefix, table.tobytes(), header, *units])
    assert len(blob) == total
    return blob


def parse_prefix(blob: bytes | memoryview) -> tuple[int, int, int, int, int]:
    """Check the fixed prefix; returns (codec_id, T, header_off, units_off, total)."""
    if len(blob) < PREFIX_SIZE:
        raise CorruptSegmentError(f"value of {len(blob)} bytes is shorter than the {PREFIX_SIZE}-byte prefix")
    magic, fmt, codec_id, t, hlen, toff, hoff, uoff, total = PREFIX.unpack_from(blob, 0)
    if magic != MAGIC:
        raise CorruptSegmentError(f"bad magic {bytes(magic)!r} (not a convoy segment)")
    if fmt != FORMAT_VERSION:
        raise CorruptSegmentError(f"unsupported segment format {fmt} (this build reads {FORMAT_VERSION})")
    if codec_id not in CODEC_NAMES:
        raise CorruptSegmentError(f"unknown codec id {codec_id}")
    if not 1 <= t <= MAX_TRANSITIONS:
        raise CorruptSegmentError(f"transition count {t} out of range")
    if toff != PREFIX_SIZE or hoff != index_size(t) or uoff != hoff + hlen or total < uoff:
        raise CorruptSegmentError("section offsets are inconsistent")
    return codec_id, t, hoff, uoff, total


def parse_index(data: bytes | memoryview) -> tuple[int, int, int, int, np.ndarray]:
    """Validate prefix + offset table (the first :func:`index_size` bytes of a value).

    Returns (codec_id, T, units_off, total, table as int64). Raises only CorruptSegmentError.
    """
    codec_id, t, _, uoff, total = parse_prefix(data)
    if len(data) < index_size(t):
        raise CorruptSegmentError(f"index of {len(data)} bytes is shorter than {index_size(t)} for T={t}")
    table = np.frombuffer(data, dtype="<u4", count=t + STACK + 1, offset=PREFIX_SIZE).astype(np.int64)
    sizes = np.diff(table)
    max_frame = FRAME_BYTES + 64  # zstd framing of a raw frame is ~10 bytes
    if table[0] != 0 or (sizes <= UNIT_HEAD).any() or (sizes > UNIT_HEAD + max_frame).any():
        raise CorruptSegmentError("unit offset table is not increasing by plausible unit sizes")
    if uoff + int(table[-1]) != total:
        raise CorruptSegmentError(f"units end at {uoff + int(table[-1])}, prefix says the value is {total} bytes")
    return codec_id, t, uoff, total, table


def _check_units(units: np.ndarray, offsets: np.ndarray) -> None:
    """Skippable-frame headers at every unit start (offsets relative to ``units``)."""
    heads = units[offsets[:-1, None] + np.arange(len(SKIP_HEADER))]
    if (heads != _SKIP_HEADER_ARR).any():
        raise CorruptSegmentError("unit does not start with a record header")


def decode_segment(blob: bytes) -> Segment:
    """Decode a whole segment (tests, tools); raises only :class:`CorruptSegmentError`."""
    codec_id, t, hoff, uoff, total = parse_prefix(blob)
    if len(blob) != total:
        raise CorruptSegmentError(f"value is {len(blob)} bytes, prefix says {total}")
    table = parse_index(blob)[4]
    try:
        header: Any = msgpack.unpackb(blob[hoff:uoff], raw=False, strict_map_key=True)
    except Exception as exc:
        raise CorruptSegmentError(f"header is not msgpack: {exc}") from None
    ids = ("episode_id", "collector_id", "segment_index")
    if not isinstance(header, dict) or not all(
        isinstance(header.get(k), int) and not isinstance(header.get(k), bool) and 0 <= header[k] < 2**63 for k in ids
    ):
        raise CorruptSegmentError("header lacks integer episode_id/collector_id/segment_index")
    if header.get("frame_shape") != list(FRAME_SHAPE) or header.get("record_size") != RECORD_SIZE:
        raise CorruptSegmentError(f"header frame_shape/record_size do not match this build: {header!r:.200}")
    units = np.frombuffer(blob, np.uint8, offset=uoff)
    _check_units(units, table)
    rec_idx = (table[:-1, None] + len(SKIP_HEADER)) + np.arange(RECORD_SIZE)
    records = units[rec_idx].reshape(-1).view(RECORD_DTYPE)
    codec = frame_codec(codec_id)
    view = memoryview(blob)[uoff:]
    frames = np.empty((t + STACK, *FRAME_SHAPE), dtype=np.uint8)
    for i in range(t + STACK):
        raw = codec.decompress(view[int(table[i]) + UNIT_HEAD : int(table[i + 1])])
        frames[i] = np.frombuffer(raw, dtype=np.uint8).reshape(FRAME_SHAPE)
    flags = records["flags"][:t]
    if (flags & ~np.uint8(TERMINATED | TRUNCATED)).any():
        raise CorruptSegmentError("unknown bits in step flags")
    seg = Segment(
        frames=frames,
        vectors=records["vector"][: t + 1].astype(np.float32),
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


def decode_units(blob: bytes, out_frames: np.ndarray) -> np.ndarray:
    """Every unit of a whole segment value, for the learner's resident mirror (mirror.py).

    Writes frames ``0 .. T+3`` into ``out_frames`` (at least T + 4 rows of 84x84) and returns
    the T + 4 records. Checks what the byte-range path checks per transition, once for the
    whole segment; zstd segments decode in one stream call (records skipped as skippable
    frames). Raises only :class:`CorruptSegmentError`.
    """
    codec_id, t, _, uoff, total = parse_prefix(blob)
    if len(blob) != total:
        raise CorruptSegmentError(f"value is {len(blob)} bytes, prefix says {total}")
    table = parse_index(blob)[4]
    units = np.frombuffer(blob, np.uint8, offset=uoff)
    _check_units(units, table)
    rec_idx = (table[:-1, None] + len(SKIP_HEADER)) + np.arange(RECORD_SIZE)
    records = units[rec_idx].reshape(-1).view(RECORD_DTYPE)
    pairs = np.stack([records[:t], records[1 : t + 1]], axis=1)  # (t, 2): what transition t reads
    if not _check_records(pairs).all():
        raise CorruptSegmentError("step record has unknown flag bits or non-finite values")
    n = t + STACK
    if len(out_frames) < n:
        raise CorruptSegmentError(f"segment holds {t} transitions, more than the index says")
    dest = out_frames[:n]
    heads = units[(table[:-1] + UNIT_HEAD)[:, None] + np.arange(len(ZSTD_FRAME_HEAD))]
    if codec_id == CODEC_ZSTD and (heads == _ZSTD_HEAD_ARR).all() and dest.flags.c_contiguous:
        try:
            got = frame_codec(CODEC_ZSTD).decompress_stream_into(
                memoryview(units.data), memoryview(dest.reshape(-1).data)
            )
        except zstandard.ZstdError as exc:
            raise CorruptSegmentError(f"zstd stream does not decode: {exc}") from None
        if got != dest.size:
            raise CorruptSegmentError(f"zstd stream decoded to {got} bytes, expected {dest.size}")
        return records
    codec = frame_codec(codec_id)
    view = memoryview(units.data)
    for i in range(n):
        raw = codec.decompress(view[int(table[i]) + UNIT_HEAD : int(table[i + 1])])
        dest[i] = np.frombuffer(raw, dtype=np.uint8).reshape(FRAME_SHAPE)
    return records


def _check_records(recs: np.ndarray) -> np.ndarray:
    """Per-transition validity of (n, r) records: known flag bits and finite numbers in the
    steps it reads (all but the last record, which holds only the next vector), finite vectors."""
    steps = recs[:, :-1]
    ok = ((steps["flags"] & ~np.uint8(TERMINATED | TRUNCATED)) == 0).all(axis=1)
    ok &= np.isfinite(recs["vector"]).all(axis=(1, 2))
    ok &= np.isfinite(steps["action"]).all(axis=(1, 2)) & np.isfinite(steps["reward"]).all(axis=1)
    return np.asarray(ok)


def decode_transition_parts(
    codec_id: int, units: bytes | memoryview, offsets: np.ndarray, out_frames: np.ndarray, records: int = 2
) -> np.ndarray:
    """Decode one transition from its fetched units ``t .. t+s-1`` (the per-item path).

    ``offsets`` are the ``s + 1`` table entries ``t .. t+s`` (any base; ``s = SPAN = 5`` for a
    one-step transition, ``k + 4`` for an n-step window of k steps). Writes frames ``t .. t+s-1``
    into ``out_frames`` (s, 84, 84) and returns records ``t .. t+records-1``. Raises only
    CorruptSegmentError.
    """
    offs = np.asarray(offsets, np.int64)
    span = len(out_frames)
    if offs.shape != (span + 1,) or not 2 <= records <= span:
        raise CorruptSegmentError(f"expected {span + 1} unit offsets, got shape {offs.shape}")
    offs = offs - offs[0]
    if (np.diff(offs) <= UNIT_HEAD).any() or offs[-1] != len(units):
        raise CorruptSegmentError(f"unit offsets do not match the {len(units)} fetched bytes")
    arr = np.frombuffer(units, np.uint8)
    _check_units(arr, offs)
    rec_idx = (offs[:records, None] + len(SKIP_HEADER)) + np.arange(RECORD_SIZE)
    recs = arr[rec_idx].reshape(-1).view(RECORD_DTYPE)
    if not _check_records(recs.reshape(1, records))[0]:
        raise CorruptSegmentError("step record has unknown flag bits or non-finite values")
    codec = frame_codec(codec_id)
    view = memoryview(units)
    for i in range(span):
        raw = codec.decompress(view[int(offs[i]) + UNIT_HEAD : int(offs[i + 1])])
        out_frames[i] = np.frombuffer(raw, dtype=np.uint8).reshape(FRAME_SHAPE)
    return recs


def decode_batch(
    codec_ids: np.ndarray, replies: list[Any], offsets: np.ndarray, out_frames: np.ndarray, out_records: np.ndarray
) -> np.ndarray:
    """Decode fetched transitions in bulk; returns a bool mask of the items that decoded.

    ``replies[i]`` is what GETRANGE returned for item ``i`` (units ``t .. t+s-1``), ``offsets``
    (n, s+1) its table entries, ``codec_ids`` (n,) its segment's codec. Fills ``out_frames``
    (n, s, 84, 84) and ``out_records`` (n, r) (records ``t .. t+r-1``) for the items marked True;
    a one-step transition is s = 5, r = 2, an n-step window of k steps s = k + 4, r = k + 1.
    Never raises for bad
    data: an item that is not bytes, has the wrong length, or fails any check is False.

    zstd items whose frames all carry this build's frame head go through one stream
    decompression; everything else (and every item of a batch whose stream fails) through
    :func:`decode_transition_parts`.
    """
    n = len(replies)
    ok = np.zeros(n, bool)
    if n == 0:
        return ok
    span, n_recs = out_frames.shape[1], out_records.shape[1]
    offs = np.asarray(offsets, np.int64)
    rel = offs - offs[:, :1]
    expect = rel[:, -1]
    lens = np.fromiter((len(r) if isinstance(r, bytes) else -1 for r in replies), np.int64, count=n)
    good = (lens == expect) & (np.diff(rel, axis=1) > UNIT_HEAD).all(axis=1)
    idx = np.flatnonzero(good)
    if len(idx) == 0:
        return ok
    joined = np.frombuffer(b"".join([replies[i] for i in idx]), np.uint8)
    base = np.concatenate([[0], np.cumsum(expect[idx])[:-1]])
    starts = base[:, None] + rel[idx, :span]  # unit starts in `joined`, (m, s)
    heads = joined[starts[..., None] + np.arange(len(SKIP_HEADER))]
    valid = (heads == _SKIP_HEADER_ARR).all(axis=(1, 2))
    rec_pos = starts[:, :n_recs, None] + len(SKIP_HEADER) + np.arange(RECORD_SIZE)
    recs = joined[rec_pos].reshape(len(idx), -1).view(RECORD_DTYPE)
    valid &= _check_records(recs)
    fh = joined[(starts + UNIT_HEAD)[..., None] + np.arange(len(ZSTD_FRAME_HEAD))]
    fast = valid & (codec_ids[idx] == CODEC_ZSTD) & (fh == _ZSTD_HEAD_ARR).all(axis=(1, 2))
    out_records[idx[valid]] = recs[valid]
    slow = idx[valid & ~fast]
    if fast.any():
        f_idx = idx[fast]
        if fast.all():
            stream: bytes | memoryview = memoryview(joined.data)
        else:
            stream = b"".join([replies[i] for i in f_idx])
        # The common case (every item valid and fast) decompresses straight into the output.
        direct = len(f_idx) == n and out_frames.flags.c_contiguous
        dest = out_frames if direct else np.empty((len(f_idx), span, *FRAME_SHAPE), np.uint8)
        codec = frame_codec(CODEC_ZSTD)
        try:
            got = codec.decompress_stream_into(stream, memoryview(dest.reshape(-1).data))
        except (zstandard.ZstdError, CorruptSegmentError):
            got = -1
        if got == dest.size:
            if not direct:
                out_frames[f_idx] = dest
            ok[f_idx] = True
        else:
            # Some item in the stream is bad: find it (and keep the rest) item by item.
            slow = np.concatenate([slow, f_idx])
    for i in slow:
        try:
            out_records[i] = decode_transition_parts(int(codec_ids[i]), replies[i], offs[i], out_frames[i], n_recs)
            ok[i] = True
        except CorruptSegmentError:
            ok[i] = False
    return ok
