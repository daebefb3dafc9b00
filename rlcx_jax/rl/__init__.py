"""RL core: one file per algorithm, shared returns / losses / rollout / evaluation."""

from __future__ import annotations

import dataclasses
import difflib
from types import ModuleType
from typing import Any

from rlcx_jax.rl import a2c, dqn, ppo, reinforce


@dataclasses.dataclass(frozen=True)
class AlgorithmSpec:
    """How to build one algorithm: its module (with `make`) and its config / hparams types."""

    module: ModuleType
    config_cls: type
    hparams_cls: type


ALGORITHMS: dict[str, AlgorithmSpec] = {
    "dqn": AlgorithmSpec(dqn, dqn.DQNConfig, dqn.DQNHParams),
    "reinforce": AlgorithmSpec(reinforce, reinforce.ReinforceConfig, reinforce.ReinforceHParams),
    "a2c": AlgorithmSpec(a2c, a2c.A2CConfig, a2c.A2CHParams),
    "ppo": AlgorithmSpec(ppo, ppo.PPOConfig, ppo.PPOHParams),
}


def get(name: str) -> AlgorithmSpec:
    """The AlgorithmSpec for `name`, or a ValueError listing the known algorithms."""
    if name not in ALGORITHMS:
        close = difflib.get_close_matches(name, list(ALGORITHMS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown algorithm {name!r}.{hint} Known: {', '.join(ALGORITHMS)}")
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
