"""RL core: one file per algorithm, shared returns / losses / rollout / evaluation."""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

from rlcx_jax.configs import algorithms as configs
from rlcx_jax.rl import a2c, dqn, ppo, reinforce


@dataclasses.dataclass(frozen=True)
class AlgorithmSpec:
    """How to build one algorithm: its module (with `make`) and its config / hparams types."""

    module: ModuleType
    config_cls: type
    hparams_cls: type


_MODULES: dict[str, ModuleType] = {"dqn": dqn, "reinforce": reinforce, "a2c": a2c, "ppo": ppo}
ALGORITHMS: dict[str, AlgorithmSpec] = {
    name: AlgorithmSpec(_MODULES[name], *classes) for name, classes in configs.ALGORITHMS.items()
}
"""Name -> module and classes; the names and classes come from `configs.algorithms.ALGORITHMS` (what
the CLI reads before jax loads)."""


def get(name: str) -> AlgorithmSpec:
    """The AlgorithmSpec for `name`, or a ValueError listing the known algorithms."""
    configs.config_classes(name)  # unknown name: the one error message, with the closest match
    return ALGORITHMS[name]


def head(name: str) -> str:
    """The network head algorithm `name` trains ("actor_critic" or "q")."""
    return str(get(name).config_cls.HEAD)  # type: ignore[attr-defined]


def make(name: str, config: Any = None, hooks: Any = None) -> Any:
    """Build the Trainer of algorithm `name` (default config when None)."""
    spec = get(name)
    config = spec.config_cls() if config is None else config
    if hooks is None:
        return spec.module.make(config)
    return spec.module.make(config, hooks)
