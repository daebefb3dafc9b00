"""Every flag works.

* A configuration matrix: every field of every algorithm's config, network, hyperparameters and
  CLI-exposed extensions (that is, every `rlcx train` flag except the run options, which
  tests/test_cli.py drives) is set to a non-default value in at least one short training run built
  through the CLI's own parsing (`tyro` -> `cli.build_run`). A new field without such a run fails
  `test_every_flag_is_exercised`.
* Observation normalisation learns where it matters: on a CartPole whose observations are scaled
  by 1000 and offset by 10^4 (a badly calibrated sensor), PPO with `normalize_obs` learns and
  without it does not. (Scaling alone does not separate them on CartPole: a saturated tanh torso
  still sees the signs of angle and velocity, which is enough to balance; measured.)
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tyro

from rlcx_jax import cli, envs, rl
from rlcx_jax.compress.training import find_masks
from rlcx_jax.envs.wrappers import Wrapper
from rlcx_jax.rl import ppo

MINATAR = ["--env", "Breakout-MinAtar", "--net-torso", "cnn", "--net-conv-features", "4", "--net-conv-kernel", "2"]
PRUNE_A = ["--prune-schedule", "gradual", "--prune-distribution", "erk", "--prune-start", "0.1", "--prune-end", "0.6",
           "--prune-every", "2", "--prune-roles", "torso", "head", "--prune-include", ".*kernel", ".*bias",
           "--prune-exclude", ".*Conv_0/.*", "--sparsity", "0.5"]
PRUNE_B = ["--prune-schedule", "oneshot", "--prune-distribution", "global", "--sparsity", "0.3"]
QAT_A = ["--qat-bits", "6", "--qat-scheme", "kmeans", "--no-qat-per-channel", "--no-qat-activations",
         "--qat-recluster-every", "2", "--qat-recluster-iters", "2"]
QAT_B = ["--qat-bits", "8", "--qat-activation-range", "tensor", "--no-qat-symmetric"]
NET_A = ["--net-hidden", "16", "--net-activation", "gelu", "--no-net-separate-critic"]
NET_B = ["--net-hidden", "8", "8", "--net-activation", "elu", "--net-dense-grad", "autodiff"]
ON_POLICY_A = ["--num-envs", "2", "--num-steps", "4", "--log-every", "3", "--prng-impl", "unsafe_rbg",
               "--normalize-obs", "--lr", "5e-4", "--gamma", "0.9", "--max-grad-norm", "0.8", "--ent-coef", "0.02",
               "--vf-coef", "0.25", "--adam-eps", "1e-6"]
ON_POLICY_B = ["--num-envs", "2", "--num-steps", "8", "--prng-impl", "rbg"]
# the "-b" runs: a small memory-attention torso (feature tokens) on the multi-task CartPole, with PCGrad
EXPANSION_B = ["--env", "MultiTaskCartPole-v0", "--net-torso", "memory", "--net-attention-width", "8",
               "--net-attention-heads", "2", "--net-attention-depth", "1", "--net-attention-pool", "mean",
               "--net-memory-slots", "2", "--no-net-entity-mask", "--net-num-tasks", "10", "--net-task-mode",
               "embedding", "--task-gradient", "pcgrad", "--pcgrad-seed", "3", "--task-weights",
               *["1"] * 5, *["2"] * 5, "--head-decay", "0.1"]

# run name -> (algorithm, argv); each run is one compilation of a tiny budget
RUNS: dict[str, tuple[str, list[str]]] = {
    "ppo-a": ("ppo", MINATAR + NET_A + PRUNE_A + QAT_A + ON_POLICY_A + [
        "--total-steps", "128", "--no-anneal-lr", "--no-normalize-advantages", "--update-epochs", "2",
        "--num-minibatches", "2", "--no-clip-value-loss", "--gae-lambda", "0.9", "--clip-eps", "0.1"]),
    "ppo-b": ("ppo", NET_B + EXPANSION_B + PRUNE_B + QAT_B + ON_POLICY_B + ["--total-steps", "64"]),
    "a2c-a": ("a2c", MINATAR + NET_A + PRUNE_A + QAT_A + ON_POLICY_A + [
        "--total-steps", "128", "--anneal-lr", "--normalize-advantages", "--gae-lambda", "0.9"]),
    "a2c-b": ("a2c", NET_B + EXPANSION_B + PRUNE_B + QAT_B + ON_POLICY_B + ["--total-steps", "64"]),
    "reinforce-a": ("reinforce", MINATAR + NET_A + PRUNE_A + QAT_A + ON_POLICY_A + [
        "--total-steps", "128", "--anneal-lr", "--no-normalize-advantages", "--no-use-baseline"]),
    "reinforce-b": ("reinforce", NET_B + EXPANSION_B + PRUNE_B + QAT_B + ON_POLICY_B + ["--total-steps", "64"]),
    "dqn-a": ("dqn", MINATAR + NET_A + PRUNE_A + QAT_A + [
        "--total-steps", "400", "--num-envs", "2", "--log-every", "7", "--prng-impl", "unsafe_rbg", "--anneal-lr",
        "--buffer-size", "100", "--batch-size", "8", "--learning-starts", "40", "--train-frequency", "4",
        "--target-update-period", "20", "--eps-start", "0.9", "--eps-end", "0.1", "--eps-decay-fraction", "0.3",
        "--double", "--huber-delta", "1.0", "--lr", "1e-3", "--gamma", "0.9", "--max-grad-norm", "5.0",
        "--tau", "0.5", "--net-dueling", "--gradient-steps", "2"]),
    "dqn-b": ("dqn", NET_B + EXPANSION_B + PRUNE_B + QAT_B + [
        "--total-steps", "200", "--num-envs", "2", "--prng-impl", "rbg", "--buffer-size", "100", "--batch-size", "8",
        "--learning-starts", "40", "--train-frequency", "4", "--target-update-period", "20", "--adam-eps", "1e-8"]),
}

# algorithm -> {flag field: argv setting it}: flags the algorithm refuses at any non-default value, so
# no run of RUNS can set them; `test_every_flag_is_exercised` checks that they are refused instead.
REFUSED: dict[str, dict[str, list[str]]] = {
    algorithm: {"net_dueling": ["--net-dueling"]} for algorithm in ("ppo", "a2c", "reinforce")
}

RUN_OPTIONS = {f.name for f in dataclasses.fields(cli.RunOptions)}


def _parse(algorithm: str, argv: list[str]) -> Any:
    return tyro.cli(cli.train_args_class(algorithm), args=argv)


def _flag_fields(algorithm: str) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cli.train_args_class(algorithm)) if f.name not in RUN_OPTIONS]


@pytest.mark.parametrize("algorithm", list(rl.ALGORITHMS))
def test_every_flag_is_exercised(algorithm: str) -> None:
    """Every config / network / hyperparameter / extension flag of `algorithm` takes a non-default
    value in some run of RUNS (compared after parsing, so `--no-x` counts for a True default)."""
    parsed = [_parse(a, argv) for a, argv in RUNS.values() if a == algorithm]
    assert parsed, f"no run for {algorithm}"
    refused = REFUSED.get(algorithm, {})
    missed = [
        f.name
        for f in _flag_fields(algorithm)
        if f.name not in refused and all(getattr(p, f.name) == f.default for p in parsed)
    ]
    assert not missed, f"{algorithm}: no run sets {missed} to a non-default value; add it to RUNS"
    for name, argv in refused.items():
        args = _parse(algorithm, argv)
        assert getattr(args, name) != getattr(cli.train_args_class(algorithm)(), name), (algorithm, argv)
        with pytest.raises(ValueError, match=name.replace("_", ".")):  # net_dueling: "net.dueling ..."
            cli.build_run(algorithm, args)


@pytest.mark.parametrize("name", list(RUNS))
def test_run_with_flags_trains(name: str) -> None:
    algorithm, argv = RUNS[name]
    config, hparams = cli.build_run(algorithm, _parse(algorithm, argv))
    trainer = rl.make(algorithm, config)
    out = jax.jit(trainer.train)(jax.random.PRNGKey(0), hparams)
    metrics = jax.tree.map(np.asarray, out.metrics)
    assert metrics.loss.shape == (trainer.num_updates // trainer.log_every,)
    for leaf in jax.tree.leaves(metrics) + jax.tree.leaves(out.state.params):
        assert np.all(np.isfinite(np.asarray(leaf))), name
    masks = find_masks(out.state)
    assert masks is not None  # every run prunes during training
    pruned = sum(int((~np.asarray(m)).sum()) for m in jax.tree.leaves(masks))
    assert pruned > 0, f"{name}: the pruning schedule never pruned"
    if config.normalize_obs if hasattr(config, "normalize_obs") else False:
        assert float(out.state.obs_stats.count) > 1.0  # the running statistics were updated


# ----------------------------------------------------------------------------------------------
# Observation normalisation where it matters
# ----------------------------------------------------------------------------------------------
SCALE, OFFSET = 1000.0, 10_000.0


class MiscalibratedObservation(Wrapper):
    """obs -> SCALE * obs + OFFSET, for the observation after reset and step and the pre-reset one."""

    def reset(self, key: jax.Array, params: Any) -> tuple[jax.Array, Any]:
        obs, state = self._env.reset(key, params)
        return SCALE * obs + OFFSET, state

    def step(self, key, state, action, params):
        obs, state, reward, terminated, truncated, info = self._env.step(key, state, action, params)
        info = dict(info)
        info["final_observation"] = SCALE * info["final_observation"] + OFFSET
        return SCALE * obs + OFFSET, state, reward, terminated, truncated, info


def _miscalibrated_cartpole() -> tuple[Any, Any]:
    env, params = envs.make("CartPole-v1")
    return MiscalibratedObservation(env), params


if "Test-MiscalibratedCartPole-v1" not in envs.list_envs():
    envs.register("Test-MiscalibratedCartPole-v1", _miscalibrated_cartpole)


def test_observation_normalisation_learns_a_miscalibrated_cartpole() -> None:
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    final = {}
    for normalize in (True, False):
        config = ppo.PPOConfig(env="Test-MiscalibratedCartPole-v1", total_timesteps=4 * 128 * 128,
                               normalize_obs=normalize, log_every=8)
        out = jax.jit(jax.vmap(ppo.make(config).train, in_axes=(0, None)))(keys, ppo.PPOHParams())
        final[normalize] = np.asarray(out.metrics.episode.episode_return)[:, -2:].mean(axis=1)
    # measured: normalised 185-411 per seed, raw 39-65 (random actions: about 22)
    assert np.all(final[True] > 120.0), final
    assert final[True].mean() > 3.0 * final[False].mean(), final
    assert jnp.all(jnp.isfinite(final[False]))


@pytest.mark.parametrize("algorithm", list(rl.ALGORITHMS))
def test_every_flag_has_help_text(algorithm: str) -> None:
    """Each flag of `rlcx train` shows its field's attribute docstring in --help (fails for a new
    field added without one)."""
    args_class = cli.train_args_class(algorithm)
    hints = typing.get_type_hints(args_class, include_extras=True)
    undocumented = [
        f.name
        for f in dataclasses.fields(args_class)
        if not any(getattr(m, "help", None) for m in getattr(hints[f.name], "__metadata__", ()))
    ]
    assert not undocumented, f"{algorithm}: flags without help text {undocumented}"


def test_field_docs_reads_attribute_docstrings_and_subclass_overrides() -> None:
    @dataclasses.dataclass(frozen=True)
    class Base:
        a: int = 1
        """Base a."""
        b: int = 2
        c: int = 3
        """Base c."""

    @dataclasses.dataclass(frozen=True)
    class Child(Base):
        c: int = 4
        """Child c."""

    assert cli.field_docs(Child) == {"a": "Base a.", "c": "Child c."}
