"""The n-step return window of a sampled transition: the one place its rule is written.

For a transition at step ``t`` of a segment of ``T`` steps and ``learner.n_step = n``, the
window is steps ``t .. t+k-1`` with ``k = min(n, T - t)``, and the TD target is
(Sutton and Barto 2018, section 7.1; DrQ-v2, Yarats et al. 2021, uses n = 3)::

    y = sum_{j<k} gamma^j r_{t+j}  +  discount * min(Q1', Q2')(s_{t+k})
    discount = 0 if step t+k-1 terminated, else gamma^k

* a termination inside the window ends the sum there and nothing is bootstrapped;
* a truncation (time limit) inside the window ends the sum there and bootstraps from that
  step's next observation (Pardo et al. 2018, "Time Limits in Reinforcement Learning");
* a window that crosses the segment's end uses the steps the segment has and bootstraps from
  the segment's last next observation, exactly as a truncation does. The segment's successor
  (same episode) holds the rest, but the two may sit on different shards or one may be
  evicted, so a window never spans segments; the only effect is that the last ``n - 1``
  transitions of a segment use a shorter window, which is still a valid (k-step) target.

``n = 1`` gives ``k = 1`` and ``discount = gamma * (1 - terminated)``: one-step TD3.

Segments end an episode only on their last step (common/schema.py ``Segment.validate``), so
in stored data ``k = min(n, T - t)`` is known from the index alone (what the sampler fetches);
the function below still stops at an end flag anywhere, so it is right for any records.
"""

from __future__ import annotations

import numpy as np

from replay_service.codec import TERMINATED, TRUNCATED


def window_steps(n_step: int, segment_length: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Steps of each window a segment can hold: ``min(n_step, T - t)`` (>= 1 for t < T)."""
    return np.minimum(n_step, np.asarray(segment_length, np.int64) - np.asarray(t, np.int64))


def nstep_window(
    rewards: np.ndarray, flags: np.ndarray, steps: np.ndarray, gamma: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reward sum, bootstrap discount, k) of each row's window.

    ``rewards`` float (B, n) and ``flags`` uint8 (B, n) are the records of steps ``t .. t+n-1``
    (entries at and past ``steps`` are ignored, whatever they hold); ``steps`` (B,) is how many
    of them the segment holds (:func:`window_steps`). ``k`` (B,) is where the next observation
    is: step ``t + k``'s observation, i.e. the next observation of step ``t + k - 1``.
    """
    rewards = np.asarray(rewards, np.float64)
    flags = np.asarray(flags, np.uint8)
    if rewards.ndim != 2 or flags.shape != rewards.shape:
        raise ValueError(f"rewards {rewards.shape} and flags {flags.shape} must be the same (B, n)")
    b, n = rewards.shape
    steps = np.asarray(steps, np.int64)
    if steps.shape != (b,) or (steps < 1).any() or (steps > n).any():
        raise ValueError(f"steps must be (B,) = ({b},) with values in [1, {n}]")
    j = np.arange(n)
    inside = j[None, :] < steps[:, None]
    ends = inside & ((flags & (TERMINATED | TRUNCATED)) != 0)
    # The first end flag (if any) cuts the window after that step.
    k = np.where(ends.any(axis=1), ends.argmax(axis=1) + 1, steps)
    used = j[None, :] < k[:, None]
    powers = gamma ** j.astype(np.float64)
    reward_sum = (np.where(used, rewards, 0.0) * powers).sum(axis=1)
    last_flags = flags[np.arange(b), k - 1]
    terminated = (last_flags & TERMINATED) != 0
    discount = np.where(terminated, 0.0, gamma ** k.astype(np.float64))
    return reward_sum.astype(np.float32), discount.astype(np.float32), k
