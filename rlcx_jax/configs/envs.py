"""The environment ids training accepts, and whether their actions are discrete, without gymnax.

Importing gymnax takes seconds (it loads seaborn and scipy), so the names are a static table here;
a test checks it against gymnax's registry and every environment's action space. Our own
environments (probe envs, task families) are added by `rlcx_jax.envs.register`.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

__all__ = ["GYMNAX_ENVS", "TASK_SET_SIZES", "known_envs", "add_env", "check_env_name", "has_discrete_actions"]

GYMNAX_ENVS: Mapping[str, bool] = {
    "CartPole-v1": True,
    "Pendulum-v1": False,
    "Acrobot-v1": True,
    "MountainCar-v0": True,
    "MountainCarContinuous-v0": False,
    "Asterix-MinAtar": True,
    "Breakout-MinAtar": True,
    "Freeway-MinAtar": True,
    "Seaquest-MinAtar": True,
    "SpaceInvaders-MinAtar": True,
    "Catch-bsuite": True,
    "DeepSea-bsuite": True,
    "MemoryChain-bsuite": True,
    "UmbrellaChain-bsuite": True,
    "DiscountingChain-bsuite": True,
    "MNISTBandit-bsuite": True,
    "SimpleBandit-bsuite": True,
    "FourRooms-misc": True,
    "MetaMaze-misc": True,
    "PointRobot-misc": False,
    "BernoulliBandit-misc": True,
    "GaussianBandit-misc": True,
    "Reacher-misc": False,
    "Swimmer-misc": False,
    "Pong-misc": True,
    "FrozenLake-misc": True,
}
"""gymnax 1.0.1's registry, in its order: id -> discrete action space."""

# Our own environments: id -> discrete action space (`rlcx_jax.envs` holds their factories).
# Probe and task environments are listed here so that the CLI knows them before `rlcx_jax.envs` is imported.
_EXTRA_ENVS: dict[str, bool] = {
    "Probe-ConstantReward-v0": True,
    "Probe-ObsReward-v0": True,
    "Probe-TwoStep-v0": True,
    "Probe-ActionReward-v0": True,
    "Probe-ObsActionReward-v0": True,
    "Probe-Truncation-v0": True,
    "Probe-TruncationReset-v0": True,
    "PointNavigation-v0": False,  # rlcx_jax.envs.tasks (2D point navigation, MAML)
    "MultiTaskCartPole-v0": True,  # rlcx_jax.envs.task_set (10 CartPole tasks, half with flipped force)
    "EntityNavigation-v0": True,  # rlcx_jax.envs.entities (reach the marked goal among entity tokens)
}


TASK_SET_SIZES: dict[str, int] = {"MultiTaskCartPole-v0": 10}
"""Task-set environments (`rlcx_jax.envs.task_set`): id -> number of tasks (the one-hot's length)."""


def known_envs() -> dict[str, bool]:
    """Every environment id `envs.make` accepts -> whether its actions are discrete."""
    return {**GYMNAX_ENVS, **_EXTRA_ENVS}


def add_env(name: str, discrete: bool) -> None:
    """Make our environment `name` known (called by `rlcx_jax.envs.register`)."""
    _EXTRA_ENVS[name] = discrete


def check_env_name(name: str) -> None:
    """Raise a ValueError naming close matches when `name` is not a known environment id."""
    known = list(known_envs())
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"Unknown environment {name!r}.{hint} Known: {', '.join(known)}")


def has_discrete_actions(name: str) -> bool:
    """Whether environment `name` has a discrete (gymnax `Discrete`) action space."""
    check_env_name(name)
    return known_envs()[name]
