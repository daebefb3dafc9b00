"""Environments: gymnax adapter (1.x API) with clear errors, plus wrappers.

`make(name, **param_overrides)` returns `(env, env_params)` for every gymnax id. The environment
parameters are an ordinary pytree, so a batch of tasks is one `vmap` over them (docs/architecture.md, "Seams").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import gymnax

from rlcx_jax.configs import envs as env_table
from rlcx_jax.envs.wrappers import (
    ClipActionWrapper,
    EpisodeStats,
    EpisodeStatsWrapper,
    FlattenObservationWrapper,
    RescaleActionWrapper,
)

__all__ = [
    "register",
    "make_training_env",
    "wrap_for_training",
    "make",
    "list_envs",
    "check_env_name",
    "has_discrete_actions",
    "EpisodeStatsWrapper",
    "FlattenObservationWrapper",
    "EpisodeStats",
]


# Our own jittable environments (probe envs, task families): id -> factory() -> (env, env_params).
_EXTRA_ENVS: dict[str, Callable[[], tuple[Any, Any]]] = {}


def register(name: str, factory: Callable[[], tuple[Any, Any]], discrete: bool | None = None) -> None:
    """Register one of our own gymnax-compatible environments under `name` (`discrete`: whether its
    actions are, found from the environment when None)."""
    if name in _EXTRA_ENVS or name in env_table.GYMNAX_ENVS:
        raise ValueError(f"Environment {name!r} is already registered")
    _EXTRA_ENVS[name] = factory
    if discrete is None:
        env, env_params = factory()
        discrete = _discrete(env.action_space(env_params))
    env_table.add_env(name, discrete)


def list_envs() -> list[str]:
    """All environment ids that `make` accepts."""
    return list(env_table.known_envs())


check_env_name = env_table.check_env_name
has_discrete_actions = env_table.has_discrete_actions


def make(name: str, **param_overrides: Any) -> tuple[Any, Any]:
    """Build a gymnax environment and its (possibly overridden) parameters.

    Args:
      name: a gymnax id such as "CartPole-v1" or "Breakout-MinAtar".
      **param_overrides: fields of the environment's `EnvParams` to replace, e.g.
        `max_steps_in_episode=200`.

    Returns:
      `(env, env_params)`; `env.step` follows gymnax 1.x: it returns
      `(obs, state, reward, terminated, truncated, info)` and auto-resets.
    """
    check_env_name(name)
    if name in _EXTRA_ENVS:
        env, env_params = _EXTRA_ENVS[name]()
    else:
        env, env_params = gymnax.make(name)
    if param_overrides:
        fields = {f.name for f in dataclasses.fields(env_params)}
        unknown = sorted(set(param_overrides) - fields)
        if unknown:
            raise ValueError(
                f"Unknown parameter(s) {unknown} for environment {name!r}; its EnvParams fields are {sorted(fields)}"
            )
        env_params = env_params.replace(**param_overrides)
    check = getattr(env, "check_params", None)
    if check is not None:  # our environments may check concrete parameters before anything compiles
        check(env_params)
    return env, env_params


def _discrete(space: Any) -> bool:
    return hasattr(space, "n")


def make_training_env(name: str, env_kwargs: tuple[tuple[str, Any], ...] = ()) -> tuple[Any, Any]:
    """`make` plus the episode-statistics wrapper that every rollout reads (and action clipping for
    continuous action spaces)."""
    env, env_params = make(name, **dict(env_kwargs))
    return wrap_for_training(env, env_params), env_params


def wrap_for_training(env: Any, env_params: Any, rescale_actions: bool = False) -> Any:
    """The wrappers every rollout reads: episode statistics, and action clipping for continuous
    action spaces (also for environments built outside `make`, e.g. a task family's). With
    `rescale_actions`, continuous actions are taken in [-1, 1] and scaled to the space's bounds."""
    if not _discrete(env.action_space(env_params)):
        if rescale_actions:
            env = RescaleActionWrapper(env)
        env = ClipActionWrapper(env)
    return EpisodeStatsWrapper(env)


# Probe environments with known answers, PointNavigation-v0, EntityNavigation-v0 and MultiTaskCartPole-v0
# register themselves on import (kept last: they use `register`).
from rlcx_jax.envs import entities as entities  # noqa: E402,F401  (EntityNavigation-v0)
from rlcx_jax.envs import probes as probes  # noqa: E402,F401
from rlcx_jax.envs import task_set as task_set  # noqa: E402,F401  (MultiTaskCartPole-v0)
from rlcx_jax.envs import tasks as tasks  # noqa: E402,F401  (PointNavigation-v0; task families)
