"""Names of the collector's and the evaluator's metrics that other packages read (the run
supervisor's progress and replacement checks, the training curves, the eval scheduler's choice
of the best checkpoint, `convoy evaluate`, the benchmarks). collector.py and evaluator.py
produce them with these constants; this module imports nothing, so the control plane can use
it without loading torch."""

from __future__ import annotations

# Collector.metrics().
COLLECTOR_ENV_STEPS_TOTAL = "collector/env_steps_total"
COLLECTOR_EPISODES_TOTAL = "collector/episodes_total"
COLLECTOR_WEIGHTS_VERSION = "collector/weights_version"
COLLECTOR_LAST_ACTING_VERSION = "collector/last_acting_version"
# Wall time (unix seconds) of the first step acted with the newest weight version: the end of
# that version's fan-out to this collector (deploy/run/timing.py).
COLLECTOR_ACTING_SINCE = "collector/acting_version_timestamp_seconds"
COLLECTOR_LAST_EPISODE_RETURN = "collector/last_episode_return"
COLLECTOR_MEAN_RETURN = "collector/mean_return"
COLLECTOR_ROUTE_COMPLETION = "collector/route_completion"
COLLECTOR_SUCCESS_RATE = "collector/success_rate"

# Evaluator.evaluate().
EVAL_PREFIX = "eval/"
EVAL_RETURN = "eval/return"
EVAL_RETURN_MIN = "eval/return_min"
EVAL_ROUTE_COMPLETION = "eval/route_completion"
EVAL_SUCCESS_RATE = "eval/success_rate"
EVAL_COLLISION_RATE = "eval/collision_rate"
EVAL_OFF_ROAD_RATE = "eval/off_road_rate"
EVAL_EPISODE_STEPS = "eval/episode_steps"
EVAL_WEIGHTS_VERSION = "eval/weights_version"
