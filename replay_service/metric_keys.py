"""Names of the replay metrics the control plane and the benchmarks read (run totals and
progress, replay size, data wait, shard restarts). writer.py, counters.py, sampler.py and
owner.py produce them with these constants; this module imports nothing, so the control plane
can use it without loading the codec's dependencies."""

from __future__ import annotations

# ReplayWriter.metrics().
BYTES_TOTAL = "replay_writer/bytes_total"
TRANSITIONS_TOTAL = "replay_writer/transitions_total"
DROPPED_TRANSITIONS_TOTAL = "replay_writer/dropped_transitions_total"

# The sampler's metrics (sampler.py, counters.py).
SIZE = "replay_sampler/size"
SAMPLED_TRANSITIONS_TOTAL = "replay_sampler/sampled_transitions_total"
CORRUPT_TOTAL = "replay_sampler/corrupt_total"
WAIT_SECONDS_TOTAL = "replay_sampler/wait_seconds_total"

# ShardOwner.metrics(): the control plane counts shard restarts into the run's restarts.
RESTARTS_TOTAL = "replay_shard/restarts_total"
