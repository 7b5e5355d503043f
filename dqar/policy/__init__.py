"""The learned reuse policy: traces with measured reuse errors, an MLP trained on them, and its decider.

- `collect` — full-compute generations → features and measured labels (`dqar policy collect`);
- `train` — the MLP, held-out split by seed, checkpoint + report (`dqar policy train`);
- `decider` — `PolicyDecider`, used while sampling via `ReuseConfig(policy="...")`;
- `evaluate` — policy vs gate vs calibrated plan vs static schedules at matched reuse (`dqar policy evaluate`).
"""
from .features import FEATURES
from .model import PolicyCheckpoint, PolicyNet, load_policy, save_policy

__all__ = ["FEATURES", "PolicyCheckpoint", "PolicyNet", "load_policy", "save_policy"]
