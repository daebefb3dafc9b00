"""Tuned default settings per (algorithm, environment): what `rlcx train ALG --env ENV` should start from.

A `Preset` holds flat values keyed by the CLI's flag field names: config fields (`num_envs`,
`num_steps`, `update_epochs`, ...), hyperparameter fields (`lr`, `gamma`, `ent_coef`, ...), network
fields prefixed `net_` (`net_torso`, `net_hidden`, `net_activation`, `net_conv_features`, ...) and
`total_steps` (environment steps per seed). Every preset says where its numbers come from
(`source`) and, where this repository measured it, what it reached (`measured`; the figures come from
`benchmarks/results/presets_<cpu>.json`, written by `python benchmarks/presets.py`).

This module imports neither jax nor anything that does: the CLI reads it before jax is imported.

    from rlcx_jax import presets
    p = presets.get("ppo", "Pendulum-v1")
    p.values["lr"], p.total_steps, p.source
    presets.split(p.values, config_fields, net_fields, hparam_fields)   # -> (config, net, hparams) kwargs
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

__all__ = ["Preset", "FrozenValues", "PRESETS", "CLASSIC_CONTROL", "MINATAR", "get", "available", "split", "NET_PREFIX"]

NET_PREFIX = "net_"
"""Prefix of the network fields among a preset's values (as on the command line)."""
TOTAL_STEPS = "total_steps"
"""The key of the environment steps per seed among a preset's values."""

CLASSIC_CONTROL: tuple[str, ...] = (
    "CartPole-v1",
    "Acrobot-v1",
    "MountainCar-v0",
    "MountainCarContinuous-v0",
    "Pendulum-v1",
)
"""gymnax 1.0.1's classic-control environments."""
MINATAR: tuple[str, ...] = (
    "Asterix-MinAtar",
    "Breakout-MinAtar",
    "Freeway-MinAtar",
    "Seaquest-MinAtar",
    "SpaceInvaders-MinAtar",
)
"""gymnax 1.0.1's registered MinAtar environments."""


class FrozenValues(Mapping[str, Any]):
    """A read-only, hashable mapping of flag names to values (sorted by name)."""

    __slots__ = ("_items",)

    def __init__(self, values: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()) -> None:
        pairs = list(values.items()) if isinstance(values, Mapping) else list(values)
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"A name appears twice: {sorted(names)}")
        self._items: tuple[tuple[str, Any], ...] = tuple(sorted(pairs))

    def __getitem__(self, name: str) -> Any:
        for key, value in self._items:
            if key == name:
                return value
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other.items())

    def __repr__(self) -> str:
        return f"FrozenValues({dict(self._items)!r})"


@dataclasses.dataclass(frozen=True)
class Preset:
    """Settings for one algorithm on one environment.

    values: flat flag values (config fields, `net_`-prefixed network fields, hyperparameter fields and
      `total_steps`); any mapping given is stored as a read-only, hashable `FrozenValues`.
    source: where the settings come from (a publication, a library's config, a benchmark of this repo).
    measured: what the settings reached here, with the command that measured it ("" when not measured).
    """

    algorithm: str
    env: str
    values: Mapping[str, Any]
    source: str
    measured: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.values, FrozenValues):
            object.__setattr__(self, "values", FrozenValues(self.values))

    @property
    def total_steps(self) -> int | None:
        """Environment steps per seed, or None when the preset leaves the default."""
        return self.values.get(TOTAL_STEPS)


def _preset(algorithm: str, env: str, values: Mapping[str, Any], source: str, measured: str = "") -> Preset:
    return Preset(algorithm, env, FrozenValues(values), source, measured)


_MEASURED = "(python benchmarks/presets.py: 4 seeds, 32 evaluation episodes each, AMD EPYC 2 cores, 2026-12-05)"
"""Where the `measured` figures come from (benchmarks/results/presets_amd-epyc.json)."""

# ----------------------------------------------------------------------------------------------
# Shared blocks of settings
# ----------------------------------------------------------------------------------------------
_PUREJAXRL_PPO: dict[str, Any] = dict(
    num_envs=4,
    num_steps=128,
    update_epochs=4,
    num_minibatches=4,
    anneal_lr=True,
    lr=2.5e-4,
    gamma=0.99,
    gae_lambda=0.95,
    clip_eps=0.2,
    ent_coef=0.01,
    vf_coef=0.5,
    max_grad_norm=0.5,
    net_torso="mlp",
    net_hidden=(64, 64),
    net_activation="tanh",
    total_steps=499_712,
)
"""PureJaxRL's CartPole PPO configuration (purejaxrl/ppo.py), the library's PPO defaults; 5e5 steps rounded
down to whole updates (976 of 512 steps), as PureJaxRL and the CLI do."""

_MINATAR_PPO: dict[str, Any] = dict(
    num_envs=64,
    num_steps=128,
    update_epochs=4,
    num_minibatches=8,
    anneal_lr=True,
    lr=1e-3,
    gamma=0.99,
    gae_lambda=0.95,
    clip_eps=0.2,
    ent_coef=0.01,
    vf_coef=0.5,
    max_grad_norm=0.5,
    net_torso="cnn",
    net_hidden=(128,),
    net_activation="relu",
    net_conv_features=16,
    net_conv_kernel=3,
    total_steps=3_997_696,
)
"""PureJaxRL's MinAtar PPO settings (64 envs x 128 steps, 4 epochs of 8 minibatches, relu, annealed) with
Young & Tian 2019's MinAtar network (one 3x3 conv of 16 channels, then 128 units) and lr 1e-3, which
benchmarks/distillation.py found on Breakout-MinAtar (a 2-seed 2M-step probe: lr 5e-4 stayed at the
7-point plateau on both seeds, lr 1e-3 reached 11 and 25; 8 seeds at 2M steps: IQM 16.0 [9.6, 33.9],
2 of 8 seeds at 7, the others 12 to 48); 4M steps (488 updates of 8192), so that more seeds leave the plateau
(benchmarks/presets.py, 4 seeds at 4M: all four did, IQM 24.6)."""

_MINATAR_SOURCE = (
    "PureJaxRL's MinAtar PPO settings with Young & Tian 2019's MinAtar CNN (3x3 conv, 16 channels, 128 units); "
    "lr 1e-3 from benchmarks/distillation.py's Breakout-MinAtar teachers (8 seeds, 2M steps: IQM 16.0); 4M steps"
)

_PUREJAXRL_DQN: dict[str, Any] = dict(
    num_envs=10,
    buffer_size=10_000,
    batch_size=128,
    learning_starts=10_000,
    train_frequency=10,
    target_update_period=500,
    eps_start=1.0,
    eps_end=0.05,
    eps_decay_fraction=0.5,
    double=False,
    lr=2.5e-4,
    gamma=0.99,
    max_grad_norm=10.0,
    tau=1.0,
    net_torso="mlp",
    net_hidden=(120, 84),
    net_activation="relu",
    total_steps=500_000,
)
"""PureJaxRL's CartPole DQN configuration (purejaxrl/dqn.py), the library's DQN defaults."""


# ----------------------------------------------------------------------------------------------
# The presets
# ----------------------------------------------------------------------------------------------
_ALL: tuple[Preset, ...] = (
    # --- PPO, classic control -----------------------------------------------------------------
    _preset(
        "ppo",
        "CartPole-v1",
        _PUREJAXRL_PPO,
        "PureJaxRL's CartPole PPO (purejaxrl/ppo.py); benchmarks/compression.py: IQM 500 over 8 seeds at 500k steps",
        f"IQM 500.0 [500.0, 500.0] at 499,712 steps {_MEASURED}",
    ),
    _preset(
        "ppo",
        "Acrobot-v1",
        _PUREJAXRL_PPO,
        "PureJaxRL's CartPole PPO settings, as benchmarks/compression.py runs them on Acrobot-v1 "
        "(IQM -83.9 over 8 seeds at 500k steps)",
        f"IQM -84.1 [-90.2, -82.8] at 499,712 steps {_MEASURED}",
    ),
    _preset(
        "ppo",
        "Pendulum-v1",
        dict(
            num_envs=16,
            num_steps=128,
            update_epochs=10,
            num_minibatches=32,
            anneal_lr=True,
            lr=1e-3,
            gamma=0.95,
            gae_lambda=0.9,
            clip_eps=0.2,
            ent_coef=0.0,
            vf_coef=0.5,
            max_grad_norm=0.5,
            net_torso="mlp",
            net_hidden=(64, 64),
            net_activation="tanh",
            total_steps=999_424,  # 1M rounded down to whole updates (488 of 2048 steps)
        ),
        "benchmarks/compression.py's Pendulum-v1 setting, tuned there on 8 seeds (IQM -141 after 1M steps; "
        "gamma 0.9 / lr 3e-4 gave -165); rejax's configs/gymnax/pendulum.yaml also uses lr 1e-3, 10 epochs, "
        "no entropy bonus",
        f"IQM -146.0 [-162.8, -123.1] at 999,424 steps {_MEASURED}",
    ),
    _preset(
        "ppo",
        "MountainCar-v0",
        dict(
            num_envs=10,
            num_steps=20,
            update_epochs=5,
            num_minibatches=5,
            anneal_lr=False,
            lr=2.5e-4,
            gamma=0.99,
            gae_lambda=0.98,
            clip_eps=0.2,
            ent_coef=0.0,
            vf_coef=0.5,
            max_grad_norm=0.5,
            net_torso="mlp",
            net_hidden=(64, 64),
            net_activation="tanh",
            total_steps=500_000,
        ),
        "rejax's configs/gymnax/mountaincar.yaml (PPO), which rejax itself marks 'not fitted'; "
        "500k steps instead of 100k. MountainCar's reward is sparse: plain PPO usually stays at -200",
        f"IQM -200.0 [-200.0, -200.0] at 500,000 steps: does not learn, every episode hits the time limit {_MEASURED}",
    ),
    _preset(
        "ppo",
        "MountainCarContinuous-v0",
        dict(
            num_envs=5,
            num_steps=100,
            update_epochs=10,
            num_minibatches=10,
            anneal_lr=False,
            lr=3e-4,
            gamma=0.9,
            gae_lambda=0.95,
            clip_eps=0.2,
            ent_coef=0.0,
            vf_coef=0.5,
            max_grad_norm=10.0,
            net_torso="mlp",
            net_hidden=(64, 64),
            net_activation="relu",
            total_steps=200_000,
        ),
        "rejax's configs/gymnax/continuous_mountaincar.yaml (PPO)",
        f"IQM -0.0 [-0.0, -0.0] at 200,000 steps: the policy learned to stand still, no episode reached the goal "
        f"{_MEASURED}",
    ),
    # --- PPO, MinAtar ---------------------------------------------------------------------------
    *(
        _preset(
            "ppo",
            env,
            _MINATAR_PPO,
            _MINATAR_SOURCE if env == "Breakout-MinAtar" else _MINATAR_SOURCE + "; not tuned on this game",
            f"IQM 24.6 [19.8, 29.6] at 3,997,696 steps, every seed above the 7-point plateau {_MEASURED}"
            if env == "Breakout-MinAtar"
            else "",
        )
        for env in MINATAR
    ),
    # --- DQN, discrete classic control ------------------------------------------------------------
    _preset(
        "dqn",
        "CartPole-v1",
        _PUREJAXRL_DQN,
        "PureJaxRL's CartPole DQN (purejaxrl/dqn.py: 10 envs, 10k buffer, batch 128, 10k steps before learning, "
        "a gradient step every 10 env steps, hard target update every 500, lr 2.5e-4, 120x84 relu, 500k steps)",
        f"IQM 500.0 [500.0, 500.0] at 500,000 steps {_MEASURED}",
    ),
    _preset(
        "dqn",
        "Acrobot-v1",
        dict(_PUREJAXRL_DQN, learning_starts=1_000, net_hidden=(256, 256), total_steps=200_000),
        "PureJaxRL's CartPole DQN with 1k steps before learning and a 256x256 relu network, 200k steps: "
        "benchmarks/distillation.py's DQN teachers (IQM -84.1 over 8 seeds)",
        f"IQM -89.5 [-101.5, -81.1] at 200,000 steps {_MEASURED}",
    ),
)

# No DQN preset for MountainCar-v0: neither rejax's config (adapted: double DQN, lr 5e-3, gamma 1, 200k steps)
# nor rl-baselines3-zoo's tuned one (lr 4e-3, gamma 0.98, 256x256, 120k steps, a gradient step per 2 env
# steps) left -200 on any of 4 seeds here (benchmarks/results/presets_amd-epyc.json has the zoo run).

PRESETS: dict[tuple[str, str], Preset] = {(p.algorithm, p.env): p for p in _ALL}
"""Every preset, keyed by (algorithm, environment id)."""


def get(algorithm: str, env: str) -> Preset | None:
    """The preset of `algorithm` on `env`, or None when there is none."""
    return PRESETS.get((algorithm, env))


def available() -> list[tuple[str, str]]:
    """Every (algorithm, env) pair with a preset, sorted."""
    return sorted(PRESETS)


def split(
    values: Mapping[str, Any],
    config_fields: Iterable[str],
    net_fields: Iterable[str],
    hparam_fields: Iterable[str],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Split flat preset values into (config, network, hyperparameter) keyword arguments.

    `total_steps` goes to the config as `total_timesteps`; `net_`-prefixed names to the network
    without their prefix. A name that belongs to none of the three field lists is a ValueError.
    Pass the field names of the algorithm's config class, `NetConfig` and its hparams class, e.g.
    `[f.name for f in dataclasses.fields(spec.config_cls)]` (this module does not import them).
    """
    config_names, net_names, hparam_names = set(config_fields), set(net_fields), set(hparam_fields)
    config: dict[str, Any] = {}
    net: dict[str, Any] = {}
    hparams: dict[str, Any] = {}
    unknown = []
    for name, value in values.items():
        if name == TOTAL_STEPS:
            config["total_timesteps"] = value
        elif name.startswith(NET_PREFIX) and name[len(NET_PREFIX) :] in net_names:
            net[name[len(NET_PREFIX) :]] = value
        elif name in config_names:
            config[name] = value
        elif name in hparam_names:
            hparams[name] = value
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"Not a config, network or hyperparameter field: {sorted(unknown)}")
    return config, net, hparams
