"""``convoy bench learner`` end to end on tiny settings: its figures exist and are sane, and the
``before`` variant really runs the old shift implementation."""

from __future__ import annotations

import math

from deploy.bench import learner as bench
from learner import augment


def test_bench_learner_reports_sane_figures_and_interleaved_variants() -> None:
    result = bench.run(
        "cpu",
        32,
        0.3,
        ["learner.encoder=none", "learner.hidden_dim=32", "replay.mirror=host"],
        frames_steps=300,
        replay_transitions=600,
        variants=("before", "after"),
    )
    for key in ("updates_per_s_synthetic", "updates_per_s_fed", "baseline_updates_per_s"):
        assert math.isfinite(result[key]) and result[key] > 0, key  # type: ignore[operator]
    assert 0 < result["fed_ratio"] < 2 and result["replay_mirror"] == "host"  # type: ignore[operator]
    variants = result["variants"]
    assert set(variants) == {"before", "after"}  # type: ignore[arg-type]
    assert all(v["updates_per_s"] > 0 and v["batch_size"] == 32 for v in variants.values())  # type: ignore[attr-defined]
    assert result["after_vs_before"] > 0  # type: ignore[operator]


def test_the_before_variant_trains_with_the_gather_shift_and_puts_the_fast_one_back() -> None:
    fast = augment.shift
    with bench._shift_of("after"):
        assert augment.shift is fast
    with bench._shift_of("before"):
        assert augment.shift is augment.gather_shift
    assert augment.shift is fast
