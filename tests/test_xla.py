"""rlcx_jax.xla: the always-on compiler options change how programs run, never what they compute; the
fused-product options (PPO and A2C from 32 environments stepped at once) change only the last bits."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import assert_trees_equal

from rlcx_jax import xla
from rlcx_jax.configs import algorithms
from rlcx_jax.nets import NetConfig
from rlcx_jax.rl import dqn, ppo


def test_cpu_backend_has_options_and_jit_passes_them(monkeypatch):
    assert jax.default_backend() == "cpu"
    assert xla.compiler_options() == dict(xla.OPTIONS["cpu"]) and xla.compiler_options()
    assert xla.compiler_options("tpu") == {}
    seen = {}
    real_jit = jax.jit

    def spy(fn, **kwargs):
        seen.update(kwargs)
        return real_jit(fn, **kwargs)

    monkeypatch.setattr(jax, "jit", spy)
    xla.jit(lambda x: x + 1, compiler_options={"xla_cpu_enable_fast_math": False}, donate_argnums=())
    assert seen["compiler_options"] == {**xla.OPTIONS["cpu"], "xla_cpu_enable_fast_math": False}
    assert seen["donate_argnums"] == ()
    xla.jit(lambda x: x + 1, fused_products=True)
    assert seen["compiler_options"] == {**xla.OPTIONS["cpu"], **xla.FUSED_DOT_OPTIONS["cpu"]}


def test_fused_product_options_are_chosen_per_algorithm_and_size():
    """PPO and A2C take the fused-product options from 32 environments stepped at once on one device;
    REINFORCE and DQN never (slower with them, README "Throughput")."""
    base = dict(xla.OPTIONS["cpu"])
    fused = xla.compiler_options(fused_products=True)
    assert xla.compiler_options() == base and fused == {**base, **xla.FUSED_DOT_OPTIONS["cpu"]} and fused != base
    assert xla.compiler_options("tpu", fused_products=True) == {}
    ppo_config = ppo.PPOConfig(num_envs=4)  # 4 x 8 = 32 environments at 8 seeds
    assert not ppo_config.fused_products(1) and not ppo_config.fused_products(7) and ppo_config.fused_products(8)
    a2c_config = algorithms.A2CConfig(num_envs=16)
    assert not a2c_config.fused_products(1) and a2c_config.fused_products(2)
    for config in (algorithms.ReinforceConfig(), algorithms.DQNConfig()):
        assert not config.fused_products(1) and not config.fused_products(1024)


@pytest.mark.parametrize(
    "make_train, config, hparams",
    [
        (
            ppo.make_train,
            ppo.PPOConfig(num_envs=4, num_steps=32, total_timesteps=4 * 32 * 6, net=NetConfig(hidden=(16, 16))),
            ppo.PPOHParams(),
        ),
        (
            dqn.make_train,
            dqn.DQNConfig(
                num_envs=5, total_timesteps=2_000, buffer_size=500, batch_size=32, learning_starts=200, log_every=10,
                target_update_period=100, net=NetConfig(hidden=(16, 16)),
            ),
            dqn.DQNHParams(),
        ),
    ],
    ids=["ppo", "dqn"],
)
def test_training_with_the_options_is_bit_identical_to_plain_jit(make_train, config, hparams):
    """Every loop of a training run (updates, rollout, epochs, minibatches, replay) compiled with and
    without the options gives the same parameters and metrics, seeds vmapped."""
    train = jax.vmap(make_train(config), in_axes=(0, None))
    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    plain = jax.jit(train)(keys, hparams)
    tuned = xla.jit(train)(keys, hparams)
    assert_trees_equal(plain, tuned)
    assert np.isfinite(np.asarray(tuned.metrics.loss)).all()


def test_fused_product_options_train_to_the_same_values_up_to_rounding():
    """PPO, 8 seeds x 4 environments (the size from which the fused options apply): the parameters
    after six updates match plain jit to float rounding, and the programs differ (the option is in
    effect: the compiled HLO holds YNNPACK fusions that include the activation)."""
    config = ppo.PPOConfig(num_envs=4, num_steps=32, total_timesteps=4 * 32 * 6, net=NetConfig(hidden=(16, 16)))
    train = jax.vmap(ppo.make_train(config), in_axes=(0, None))
    keys = jax.random.split(jax.random.PRNGKey(3), 8)
    plain = jax.jit(train)(keys, ppo.PPOHParams())
    assert config.fused_products(8)
    fused_jit = xla.jit(train, fused_products=True)
    fused = fused_jit(keys, ppo.PPOHParams())
    for a, b in zip(jax.tree.leaves(plain.state.params), jax.tree.leaves(fused.state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    hlo = fused_jit.lower(keys, ppo.PPOHParams()).compile().as_text()
    assert "tanh" in "".join(line for line in hlo.splitlines() if "ynn" in line.lower())
