from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from actors.collector import Collector, collector_noise_std
from actors.segments import SegmentBuilder
from common.config import load_config
from common.networks import Actor, NumpyVectorPolicy
from common.weights import WeightsError, message_to_bytes, pack_weights
from tests.fakes import FakeDrivingEnv, ListSink


def _stream(env: FakeDrivingEnv, steps: int) -> list[tuple]:
    """(obs, action, reward, next_obs, terminated, truncated) for a stream with resets."""
    out = []
    obs, _ = env.reset()
    for _ in range(steps):
        a = np.random.default_rng(len(out)).uniform(-1, 1, 2).astype(np.float32)
        nxt, r, term, trunc, _ = env.step(a)
        out.append((obs, a, r, nxt, term, trunc))
        obs = env.reset()[0] if term or trunc else nxt
    return out


@pytest.mark.parametrize(("segment_length", "episode_len"), [(3, 7), (64, 7), (1, 2), (5, 5)])
def test_segments_rebuild_every_transition_exactly(segment_length: int, episode_len: int) -> None:
    env = FakeDrivingEnv(episode_len=episode_len)
    stream = _stream(env, 30)
    builder = SegmentBuilder(collector_id=3, segment_length=segment_length)
    segments = []
    episode = 0
    builder.start_episode(episode, stream[0][0])
    for i, (_obs, a, r, nxt, term, trunc) in enumerate(stream):
        seg = builder.add(a, r, nxt, term, trunc, policy_version=i)
        if seg is not None:
            segments.append(seg)
        if (term or trunc) and i + 1 < len(stream):
            episode += 1
            builder.start_episode(episode, stream[i + 1][0])
    rebuilt = [seg.transition(t) for seg in segments for t in range(seg.num_transitions)]
    # Every completed transition is rebuilt bit-identically (the unfinished tail stays pending).
    assert len(rebuilt) + builder.pending_steps == len(stream)
    for tr, (obs, a, r, nxt, term, _) in zip(rebuilt, stream, strict=False):
        np.testing.assert_array_equal(tr["image"], obs["image"])
        np.testing.assert_array_equal(tr["next_image"], nxt["image"])
        np.testing.assert_array_equal(tr["vector"], obs["vector"])
        np.testing.assert_array_equal(tr["next_vector"], nxt["vector"])
        np.testing.assert_array_equal(tr["action"], a)
        assert tr["reward"] == np.float32(r) and bool(tr["terminated"]) == term
    for seg in segments:
        seg.validate()
        assert seg.frames.shape[0] == seg.num_transitions + 4  # each frame stored once
        assert seg.num_transitions <= segment_length


def _cfg(**over: object):
    return load_config(None, [f"{k}={v}" for k, v in over.items()])


def test_collector_acts_randomly_until_start_steps_and_weights() -> None:
    cfg = _cfg(**{"collector.start_steps": 20, "collector.segment_length": 4, "learner.hidden_dim": 8})
    sink = ListSink()
    col = Collector(cfg, 0, sink, lambda: FakeDrivingEnv(episode_len=9))
    col.collect(25)
    versions = np.concatenate([s.policy_versions for s in sink.segments])
    assert (versions == 0).all(), "no weights yet: every action is random (version 0)"
    assert col.acting_randomly

    torch.manual_seed(0)
    actor = Actor("nature", 8)
    assert col.set_weights(message_to_bytes(pack_weights(3, actor))) == 3
    # Older versions are ignored.
    assert col.set_weights(message_to_bytes(pack_weights(2, actor))) == 3
    sink.segments.clear()
    pending = col.builder.pending_steps  # steps taken before the weights arrived
    col.collect(20)
    versions = np.concatenate([s.policy_versions for s in sink.segments])
    assert (versions[:pending] == 0).all()
    assert len(versions) > pending and (versions[pending:] == 3).all(), "every later transition carries the version"
    assert col.metrics()["collector/last_acting_version"] == 3
    # Policy actions: deterministic part from the network, plus noise, clipped to [-1, 1].
    acts = np.concatenate([s.actions for s in sink.segments])
    assert np.abs(acts).max() <= 1.0


def test_collector_rejects_weights_for_another_network() -> None:
    cfg = _cfg(**{"learner.hidden_dim": 8})
    col = Collector(cfg, 0, ListSink(), lambda: FakeDrivingEnv())
    with pytest.raises(WeightsError, match="do not fit"):
        col.set_weights(message_to_bytes(pack_weights(1, Actor("nature", 16))))
    assert col.weights_version == 0


def test_nan_observation_drops_unfinished_segment_and_continues() -> None:
    cfg = _cfg(**{"collector.segment_length": 64, "collector.start_steps": 0})
    sink = ListSink()
    col = Collector(cfg, 1, sink, lambda: FakeDrivingEnv(episode_len=10, nan_at=5))
    m = col.collect(30)
    assert m["collector/bad_observations_total"] == 1
    assert m["collector/dropped_steps_total"] == 4  # steps 1..4 of the poisoned episode
    for seg in sink.segments:
        assert np.isfinite(seg.vectors).all()
    assert m["collector/env_steps_total"] == 30


def test_episode_ids_are_unique_across_collectors() -> None:
    cfg = _cfg(**{"collector.segment_length": 3})
    sinks = [ListSink(), ListSink()]
    for i, sink in enumerate(sinks):
        Collector(cfg, i, sink, lambda: FakeDrivingEnv(episode_len=4)).collect(12)
    ids = [{s.episode_id for s in sink.segments} for sink in sinks]
    assert ids[0] and ids[1] and not ids[0] & ids[1]


def test_noise_is_spread_across_collectors() -> None:
    cfg = _cfg(**{"collector.num_collectors": 3, "collector.noise_std": 0.1, "collector.noise_std_max": 0.3})
    assert [round(collector_noise_std(cfg, i), 6) for i in range(3)] == [0.1, 0.2, 0.3]


def test_numpy_vector_policy_matches_the_torch_actor() -> None:
    torch.manual_seed(1)
    actor = Actor("none", 32).eval()
    policy = NumpyVectorPolicy(actor)
    vectors = np.random.default_rng(0).normal(0, 3, (64, 23)).astype(np.float32)
    with torch.no_grad():
        expected = actor(torch.zeros((64, 1, 1, 1), dtype=torch.uint8), torch.from_numpy(vectors)).numpy()
    got = policy(vectors)
    assert got.dtype == np.float32 and got.shape == (64, 2)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)
    assert np.abs(got).max() <= 1.0 and np.abs(got).max() > 0.01  # tanh-squashed, not all zero
    np.testing.assert_allclose(policy(vectors[3]), expected[3], rtol=0, atol=2e-6)  # one observation
    with pytest.raises(ValueError, match="image encoder"):
        NumpyVectorPolicy(Actor("nature", 8))


def test_vector_collector_acts_with_each_loaded_version_as_the_torch_policy() -> None:
    cfg = _cfg(**{"learner.encoder": "none", "learner.hidden_dim": 16, "collector.start_steps": 0})
    col = Collector(cfg, 0, ListSink(), lambda: FakeDrivingEnv(episode_len=50))
    obs, _ = FakeDrivingEnv(episode_len=50).reset(seed=3)
    for version, seed in ((1, 0), (2, 1)):  # a later version must replace the numpy copy too
        torch.manual_seed(seed)
        actor = Actor("none", 16).eval()
        col.set_weights(message_to_bytes(pack_weights(version, actor)))
        state = col.rng.bit_generator.state
        acted = col.act(obs)
        col.rng.bit_generator.state = state  # the same noise draw, added to the torch action
        with torch.no_grad():
            mean = actor(torch.from_numpy(obs["image"])[None], torch.from_numpy(obs["vector"])[None])[0].numpy()
        expected = np.clip(mean + col.rng.normal(0.0, col.noise_std, size=2), -1, 1).astype(np.float32)
        np.testing.assert_allclose(acted, expected, rtol=0, atol=2e-6)


class _SlowEnv(FakeDrivingEnv):
    """A step takes 5 ms of wall time, so that another thread acts while collect() runs."""

    def step(self, action: np.ndarray):  # type: ignore[no-untyped-def]
        time.sleep(0.005)
        return super().step(action)


def test_weights_offered_during_a_call_load_before_the_next_step() -> None:
    cfg = _cfg(**{"learner.encoder": "none", "learner.hidden_dim": 8, "collector.start_steps": 0,
                  "collector.segment_length": 4})  # fmt: skip
    sink = ListSink()
    col = Collector(cfg, 0, sink, lambda: _SlowEnv(episode_len=1000))
    torch.manual_seed(0)
    actor = Actor("none", 8)
    col.set_weights(message_to_bytes(pack_weights(1, actor)))
    replies: list[tuple[float, dict[str, float]]] = []

    def offer_later() -> None:
        time.sleep(0.3)  # well inside the call of 200 steps (at least 1 s)
        offered_at = time.time()
        replies.append((offered_at, col.offer(message_to_bytes(pack_weights(2, actor)))))

    thread = threading.Thread(target=offer_later)
    thread.start()
    col.collect(200)
    thread.join()
    (offered_at, reply), = replies  # fmt: skip
    assert reply["collector/last_acting_version"] == 2, "the offer returns once the collector acts with it"
    assert offered_at <= reply["collector/acting_version_timestamp_seconds"] <= offered_at + 0.5
    versions = np.concatenate([s.policy_versions for s in sink.segments])
    switch = int(np.argmax(versions == 2))
    assert 0 < switch < len(versions) - 50, "version 2 acted in the middle of the call"
    assert (versions[:switch] == 1).all() and (versions[switch:] == 2).all()
    # An older version changes nothing and returns at once; without a call running, an offer
    # returns what the collector acts with after its timeout, and the next call loads it.
    started = time.monotonic()
    assert col.offer(message_to_bytes(pack_weights(1, actor)))["collector/last_acting_version"] == 2
    assert time.monotonic() - started < 0.1 and col.weights_version == 2
    assert col.offer(message_to_bytes(pack_weights(3, actor)), timeout=0.2)["collector/last_acting_version"] == 2
    col.collect(1)
    assert col.weights_version == 3 and col.metrics()["collector/last_acting_version"] == 3


def test_an_offer_returns_when_the_collector_is_stopped() -> None:
    cfg = _cfg(**{"learner.encoder": "none", "learner.hidden_dim": 8})
    col = Collector(cfg, 0, ListSink(), lambda: FakeDrivingEnv())
    threading.Timer(0.2, col.stop.set).start()
    started = time.monotonic()
    col.offer(message_to_bytes(pack_weights(1, Actor("none", 8))), timeout=30)
    assert time.monotonic() - started < 2
