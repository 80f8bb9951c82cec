"""Names of the learner's metrics. td3.py, agent.py and loop.py produce them with these
constants, and other packages read the flat ``*_KEY`` names from here: this module imports
nothing, so the control plane can use it without loading torch."""

from __future__ import annotations

# TD3Agent.update()'s tensor metrics (td3.critic_loss, td3.actor_loss and the agent's
# gradient norms).
CRITIC_LOSS = "critic/loss"
CRITIC_Q_MEAN = "critic/q_mean"
CRITIC_Q_MAX = "critic/q_max"
CRITIC_TARGET_MEAN = "critic/target_mean"
CRITIC_GRAD_NORM = "critic/grad_norm"
CRITIC_GRAD_NORM_CLIPPED = "critic/grad_norm_clipped"
ACTOR_LOSS = "actor/loss"
ACTOR_GRAD_NORM = "actor/grad_norm"
ACTOR_GRAD_NORM_CLIPPED = "actor/grad_norm_clipped"
# Learner.train()'s measures of the data it trained on.
POLICY_LAG_MEAN = "policy_lag_mean"
POLICY_LAG_MAX = "policy_lag_max"
RANDOM_ACTION_FRACTION = "random_action_fraction"


def flat_key(name: str) -> str:
    """The key under which Learner.train() reports the metric ``name``."""
    return f"learner/{name.replace('/', '_')}"


# Keys of the dict Learner.train() returns that other packages read.
UPDATES_TOTAL_KEY = "learner/updates_total"  # above 0 once the learner has updated
WEIGHTS_VERSION_KEY = "learner/weights_version"
NONFINITE_TOTAL_KEY = "learner/nonfinite_total"
CONSECUTIVE_NONFINITE_KEY = "learner/consecutive_nonfinite"
CHECKPOINT_FAILURES_TOTAL_KEY = "learner/checkpoint_failures_total"  # failed checkpoint writes
READY_KEY = "learner/ready"  # 1.0 once replay holds enough transitions to train on
TRAIN_SECONDS_TOTAL_KEY = "learner/train_seconds_total"  # wall time spent in train()
DATA_WAIT_SECONDS_TOTAL_KEY = "learner/data_wait_seconds_total"  # of which waiting for batches
CRITIC_LOSS_KEY = flat_key(CRITIC_LOSS)  # present only in results of calls that updated
CRITIC_Q_MEAN_KEY = flat_key(CRITIC_Q_MEAN)
CRITIC_Q_MAX_KEY = flat_key(CRITIC_Q_MAX)
CRITIC_TARGET_MEAN_KEY = flat_key(CRITIC_TARGET_MEAN)
CRITIC_GRAD_NORM_KEY = flat_key(CRITIC_GRAD_NORM)
CRITIC_GRAD_NORM_CLIPPED_KEY = flat_key(CRITIC_GRAD_NORM_CLIPPED)
ACTOR_LOSS_KEY = flat_key(ACTOR_LOSS)
ACTOR_GRAD_NORM_KEY = flat_key(ACTOR_GRAD_NORM)
ACTOR_GRAD_NORM_CLIPPED_KEY = flat_key(ACTOR_GRAD_NORM_CLIPPED)
POLICY_LAG_MEAN_KEY = flat_key(POLICY_LAG_MEAN)
POLICY_LAG_MAX_KEY = flat_key(POLICY_LAG_MAX)
RANDOM_ACTION_FRACTION_KEY = flat_key(RANDOM_ACTION_FRACTION)
