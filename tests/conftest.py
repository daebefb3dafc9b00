"""Shared fixtures: every small training configuration is compiled and run once per session.

Test time is compile time (docs/architecture.md, "Tests"): each distinct jitted training function costs several
seconds to compile on a 2-core CPU. So the configurations live in one table (`RUN_SPECS`), the
session-scoped `runs` fixture builds, compiles and runs each at most once per process, and several tests
read one run. Tests that read the same run live in one test class; with `pytest -n 2` the default
`--dist load` is upgraded to `--dist loadscope`, which keeps each class on one worker, so each run is
compiled by one worker only.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlcx_jax import nets, rl
from rlcx_jax.rl import a2c, dqn, ppo, reinforce
from rlcx_jax.rl.common import Trainer, TrainOutput

# CLI runs of the suite (in-process and subprocesses) compile from scratch and write nothing to the
# user's cache directory; the compilation-cache test passes its own directory.
os.environ.setdefault("RLCX_COMPILE_CACHE", "off")


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist: `-n N` implies `--dist load`, which scatters the tests of one class over the
    # workers. `loadscope` is `load` with each test class (and each module's plain functions) kept on
    # one worker, so a class of tests reading one run compiles it once. (`loadgroup` with
    # xdist_group marks would be the other way, but xdist 3.8 tags node ids through an attribute
    # that pytest 9 no longer reads, so it silently degrades to `load`.)
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadscope"


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def f32(tree: Any) -> Any:
    """Every leaf as a strongly typed float32 array, so all calls of a jitted train share one
    compilation (a Python float is weakly typed and would trace a second program)."""
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def assert_trees_equal(a: Any, b: Any) -> None:
    """Bit-identical pytrees (same structure, np.array_equal on every leaf)."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype
        assert np.array_equal(x, y), f"max abs diff {np.max(np.abs(x.astype(np.float64) - y))}"


def tree_max_abs_diff(a: Any, b: Any) -> float:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y)))), a, b)
    return max(jax.tree.leaves(diffs))


def all_finite(tree: Any) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree) if np.asarray(x).dtype.kind == "f")


# ----------------------------------------------------------------------------------------------
# The small training configurations of the suite (one compilation each)
# ----------------------------------------------------------------------------------------------
PROBE_NET = nets.NetConfig(hidden=(32, 32))
PROBE_GAMMA = 0.8


def _probe_a2c(env: str) -> tuple[str, Any, Any]:
    config = a2c.A2CConfig(
        env=env, num_envs=8, num_steps=8, total_timesteps=8 * 8 * 200, log_every=20, net=PROBE_NET
    )
    return "a2c", config, a2c.A2CHParams(lr=3e-3, gamma=PROBE_GAMMA, ent_coef=0.0)


def _probe_dqn(env: str, total_timesteps: int) -> tuple[str, Any, Any]:
    config = dqn.DQNConfig(
        env=env,
        num_envs=4,
        train_frequency=4,
        buffer_size=512,
        batch_size=32,
        learning_starts=64,
        target_update_period=40,
        total_timesteps=total_timesteps,
        log_every=50,
        net=PROBE_NET,
    )
    return "dqn", config, dqn.DQNHParams(lr=1e-3, gamma=PROBE_GAMMA)


def _probe_ppo(env: str) -> tuple[str, Any, Any]:
    config = ppo.PPOConfig(
        env=env,
        num_envs=8,
        num_steps=16,
        total_timesteps=8 * 16 * 50,
        num_minibatches=2,
        update_epochs=4,
        anneal_lr=False,
        log_every=10,
        net=PROBE_NET,
    )
    return "ppo", config, ppo.PPOHParams(lr=3e-3, gamma=PROBE_GAMMA, ent_coef=0.0)


RUN_SPECS: dict[str, tuple[str, Any, Any]] = {
    # CartPole: each algorithm improves its return within a budget that runs in about a second.
    "ppo-cartpole": (
        "ppo",
        ppo.PPOConfig(num_envs=4, num_steps=128, total_timesteps=4 * 128 * 64, log_every=8),
        ppo.PPOHParams(),
    ),
    "a2c-cartpole": (
        "a2c",
        a2c.A2CConfig(num_envs=16, num_steps=8, total_timesteps=16 * 8 * 400, log_every=50),
        a2c.A2CHParams(),
    ),
    "reinforce-cartpole": (
        "reinforce",
        reinforce.ReinforceConfig(num_envs=8, num_steps=256, total_timesteps=8 * 256 * 100, log_every=10),
        reinforce.ReinforceHParams(lr=2e-3),
    ),
    "dqn-cartpole": (
        "dqn",
        dqn.DQNConfig(
            num_envs=10,
            total_timesteps=40_000,
            learning_starts=1_000,
            buffer_size=10_000,
            target_update_period=500,
            log_every=400,
        ),
        dqn.DQNHParams(),
    ),
    # Probe environments with known answers.
    "a2c-constant": _probe_a2c("Probe-ConstantReward-v0"),
    "a2c-obs": _probe_a2c("Probe-ObsReward-v0"),
    "a2c-twostep": _probe_a2c("Probe-TwoStep-v0"),
    "a2c-truncation": _probe_a2c("Probe-Truncation-v0"),
    "ppo-action": _probe_ppo("Probe-ActionReward-v0"),
    "ppo-obsaction": _probe_ppo("Probe-ObsActionReward-v0"),
    "dqn-action": _probe_dqn("Probe-ActionReward-v0", 2_000),
    "dqn-truncation": _probe_dqn("Probe-TruncationReset-v0", 4_000),
    # Continuous actions, a tiny budget (it must run, not learn).
    "ppo-pendulum": (
        "ppo",
        ppo.PPOConfig(
            env="Pendulum-v1", num_envs=4, num_steps=32, total_timesteps=4 * 32 * 4, update_epochs=2, log_every=1
        ),
        ppo.PPOHParams(lr=3e-4, gamma=0.9),
    ),
    # Breakout-MinAtar with the CNN torso: a budget (16k steps, about 10 s with compilation) after which
    # the policy is far above a uniformly random one (about 3.8 against 0.3 per episode, PRNGKey(0)).
    "ppo-breakout-cnn": (
        "ppo",
        ppo.PPOConfig(
            env="Breakout-MinAtar",
            num_envs=8,
            num_steps=64,
            total_timesteps=16_384,
            log_every=8,
            net=nets.NetConfig(torso="cnn", hidden=(64,), activation="relu", conv_features=8),
        ),
        ppo.PPOHParams(lr=5e-3, gamma=0.99),
    ),
}


@dataclasses.dataclass
class Run:
    """One compiled configuration and its result for `key` = PRNGKey(0)."""

    name: str
    algorithm: str
    config: Any
    hparams: Any  # float32 leaves
    trainer: Trainer
    train: Any  # jax.jit(trainer.train)
    key: jax.Array
    out: TrainOutput

    def rerun(self, key: jax.Array | None = None, hparams: Any = None) -> TrainOutput:
        """The same compiled program again (new key and/or hyperparameters of the same types)."""
        key = self.key if key is None else key
        hparams = self.hparams if hparams is None else f32(hparams)
        return jax.block_until_ready(self.train(key, hparams))


class RunCache:
    def __init__(self) -> None:
        self._runs: dict[str, Run] = {}

    def get(self, name: str) -> Run:
        if name not in self._runs:
            algorithm, config, hparams = RUN_SPECS[name]
            trainer = rl.make(algorithm, config)
            train = jax.jit(trainer.train)
            hparams = f32(hparams)
            key = jax.random.PRNGKey(0)
            out = jax.block_until_ready(train(key, hparams))
            self._runs[name] = Run(name, algorithm, config, hparams, trainer, train, key, out)
        return self._runs[name]


@pytest.fixture(scope="session")
def runs() -> RunCache:
    return RunCache()
