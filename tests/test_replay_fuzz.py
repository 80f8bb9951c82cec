"""Property tests: malformed bytes into the replay decoders never escape as anything but
CorruptSegmentError (and never reach pickle: the format has no code path that could)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.schema import ACTION_DIM, FRAME_SHAPE, STACK, VECTOR_DIM, Segment
from replay_service.codec import (
    RECORD_DTYPE,
    SPAN,
    CorruptSegmentError,
    FrameCodec,
    decode_batch,
    decode_segment,
    decode_transition_parts,
    encode_segment,
    index_size,
    parse_index,
)

FUZZ = settings(max_examples=3_000, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def _segment(t: int) -> Segment:
    rng = np.random.default_rng(t)
    yy, xx = np.mgrid[0:84, 0:84]
    frames = np.stack([((xx + 3 * i) // 7 % 2 * 90 + yy).astype(np.uint8) for i in range(t + STACK)])
    return Segment(
        frames=frames,
        vectors=rng.normal(size=(t + 1, VECTOR_DIM)).astype(np.float32),
        actions=rng.uniform(-1, 1, (t, ACTION_DIM)).astype(np.float32),
        rewards=rng.normal(size=t).astype(np.float32),
        terminated=np.zeros(t, bool),
        truncated=np.zeros(t, bool),
        policy_versions=np.zeros(t, np.int64),
        episode_id=1,
        collector_id=2,
        segment_index=3,
    )


BLOBS = {c: encode_segment(_segment(3), FrameCodec(c)) for c in ("zstd", "lz4", "none")}


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """Truncations, byte flips, splices, random prefixes and foreign values around a valid blob."""
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "random", "prefix_only", "extend"]))
    data = bytearray(base)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            # Bias towards the structured front (prefix, table, header, first units).
            pos = draw(st.one_of(st.integers(0, 400), st.integers(0, len(data) - 1)))
            data[pos] = draw(st.integers(0, 255))
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "splice":
        a = draw(st.integers(0, len(data)))
        data[a:a] = draw(st.binary(min_size=1, max_size=64))
    elif kind == "random":
        return draw(st.binary(max_size=512))
    elif kind == "prefix_only":
        data = data[:32] + draw(st.binary(max_size=256))
    else:
        data += draw(st.binary(min_size=1, max_size=32))
    return bytes(data)


def _check_segment(seg: Segment) -> None:
    seg.validate()
    assert seg.frames.shape[1:] == FRAME_SHAPE


@FUZZ
@given(st.sampled_from(sorted(BLOBS)).flatmap(lambda c: mutated(BLOBS[c])))
def test_decode_segment_raises_only_corrupt_segment_error(blob: bytes) -> None:
    try:
        seg = decode_segment(blob)
    except CorruptSegmentError:
        return
    _check_segment(seg)


ZSTD = BLOBS["zstd"]
_, _T, _UOFF, _, _TABLE = parse_index(ZSTD[: index_size(3)])


@FUZZ
@given(
    st.integers(0, _T - 1).flatmap(
        lambda t: st.tuples(st.just(t), mutated(ZSTD[_UOFF + int(_TABLE[t]) : _UOFF + int(_TABLE[t + SPAN])]))
    ),
    st.sampled_from([0, 1, 2, 7]),
    st.booleans(),
)
def test_transition_decoders_raise_only_corrupt_segment_error(
    item: tuple[int, bytes], codec_id: int, shift_offsets: bool
) -> None:
    t, units = item
    offsets = _TABLE[t : t + SPAN + 1].copy()
    if shift_offsets:
        offsets[2] += 1
    frames = np.zeros((SPAN, *FRAME_SHAPE), np.uint8)
    try:
        recs = decode_transition_parts(codec_id, units, offsets, frames)
        assert recs.shape == (2,) and recs.dtype == RECORD_DTYPE
    except CorruptSegmentError:
        pass
    # The batch decoder never raises; it says per item whether it decoded.
    out_f = np.zeros((2, SPAN, *FRAME_SHAPE), np.uint8)
    out_r = np.zeros((2, 2), RECORD_DTYPE)
    good = ZSTD[_UOFF + int(_TABLE[0]) : _UOFF + int(_TABLE[SPAN])]
    ok = decode_batch(
        np.array([2, codec_id], np.uint8), [good, units], np.stack([_TABLE[: SPAN + 1], offsets]), out_f, out_r
    )
    assert ok[0], "a good item must survive a bad neighbour in the same batch"
    assert np.array_equal(out_f[0], _segment(3).frames[:SPAN])


def test_unmodified_blobs_decode() -> None:
    for blob in BLOBS.values():
        _check_segment(decode_segment(blob))
    with pytest.raises(CorruptSegmentError, match="magic"):
        decode_segment(b"\x80\x04\x95" + bytes(64))  # a pickle header is just a foreign value
