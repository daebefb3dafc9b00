"""Probe environments: their dynamics, and agents learning their known answers.

Value probes (a-c) train A2C; policy probes (d, e) train PPO, and DQN learns Q on (d). Each run is
one small compilation from `conftest.RUN_SPECS`, in its own test class (one xdist worker each). The
truncation probe (f) is learned in test_algorithms.py, beside the test of the bootstrapping itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PROBE_GAMMA

from rlcx_jax import envs, nets
from rlcx_jax.envs import probes
from rlcx_jax.rl import common

PROBE_IDS = list(probes.PROBES)
T_LIMIT = probes.Truncation.time_limit


# ----------------------------------------------------------------------------------------------
# Dynamics
# ----------------------------------------------------------------------------------------------
def _play(name, actions, seed=0, **overrides):
    """Step one env with the given actions; returns per-step (obs, final_obs, reward, term, trunc)."""
    env, params = envs.make(name, **overrides)
    key = jax.random.PRNGKey(seed)
    obs, state = env.reset(key, params)
    step = jax.jit(env.step)
    rows = []
    for a in actions:
        key, k = jax.random.split(key)
        prev = obs
        obs, state, reward, term, trunc, info = step(k, state, jnp.int32(a), params)
        rows.append((float(prev[0]), float(info["final_observation"][0]), float(reward), bool(term), bool(trunc)))
    return rows


@pytest.mark.parametrize("name", PROBE_IDS)
def test_probe_spaces(name):
    env, params = envs.make(name)
    obs, _ = env.reset(jax.random.PRNGKey(0), params)
    assert obs.shape == (1,) and obs.dtype == jnp.float32
    assert env.observation_space(params).shape == (1,)
    assert env.name == name
    expected_actions = 2 if name in ("Probe-ActionReward-v0", "Probe-ObsActionReward-v0") else 1
    assert env.action_space(params).n == expected_actions == env.num_actions


def test_constant_reward_dynamics():
    for obs, _, r, term, trunc in _play("Probe-ConstantReward-v0", [0] * 4):
        assert (obs, r, term, trunc) == (0.0, 1.0, True, False)


def test_obs_reward_dynamics():
    rows = _play("Probe-ObsReward-v0", [0] * 40)
    assert {row[0] for row in rows} == {-1.0, 1.0}
    for obs, _, r, term, _ in rows:
        assert r == obs and term


def test_two_step_dynamics():
    rows = _play("Probe-TwoStep-v0", [0] * 6)
    assert [(o, r, t) for o, _, r, t, _ in rows] == [(-1.0, 0.0, False), (1.0, 1.0, True)] * 3


def test_action_reward_dynamics():
    rows = _play("Probe-ActionReward-v0", [0, 1, 1, 0])
    assert [(o, r, t) for o, _, r, t, _ in rows] == [(0.0, -1.0, True), (0.0, 1.0, True), (0.0, 1.0, True), (0.0, -1.0, True)]


def test_obs_action_reward_dynamics():
    actions = [0, 1] * 20
    rows = _play("Probe-ObsActionReward-v0", actions)
    assert {row[0] for row in rows} == {-1.0, 1.0}
    for a, (obs, _, r, term, _) in zip(actions, rows):
        assert r == (1.0 if (a == 1) == (obs > 0) else -1.0) and term


def test_truncation_probe_dynamics():
    rows = _play("Probe-Truncation-v0", [0] * (2 * T_LIMIT + 1))
    phases = [2.0 * k / T_LIMIT - 1.0 for k in range(T_LIMIT)]
    np.testing.assert_allclose([r[0] for r in rows], (phases * 3)[: len(rows)], atol=1e-6)
    for t, (_, final, r, term, trunc) in enumerate(rows):
        assert r == 1.0 and not term
        assert trunc == ((t + 1) % T_LIMIT == 0)
        if trunc:  # the pre-reset observation at the limit is the first observation again
            assert final == pytest.approx(-1.0)
    # The time limit is an environment parameter.
    rows = _play("Probe-Truncation-v0", [0] * 6, max_steps_in_episode=3)
    assert [r[4] for r in rows] == [False, False, True] * 2


def test_truncation_reset_probe_dynamics():
    """A B A | A B A | ...: truncated on arriving at B (final obs +1), restarted at A (-1)."""
    rows = _play("Probe-TruncationReset-v0", [0] * 6)
    assert [r[0] for r in rows] == [-1.0, 1.0, -1.0] * 2
    assert [r[2] for r in rows] == [1.0, 0.0, 1.0] * 2
    assert [r[4] for r in rows] == [False, False, True] * 2 and not any(r[3] for r in rows)
    assert rows[2][1] == 1.0  # the pre-reset observation differs from the reset one (-1)


def test_probes_vmap_over_envs():
    env, params = envs.make("Probe-ObsActionReward-v0")
    keys = jax.random.split(jax.random.PRNGKey(0), 64)
    obs, state = jax.vmap(env.reset, in_axes=(0, None))(keys, params)
    actions = (obs[:, 0] > 0).astype(jnp.int32)  # the optimal policy
    _, _, reward, term, _, _ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(keys, state, actions, params)
    np.testing.assert_array_equal(reward, 1.0)
    assert bool(jnp.all(term))


# ----------------------------------------------------------------------------------------------
# Learning the known answers
# ----------------------------------------------------------------------------------------------
def _actor_critic_outputs(run, obs_values):
    agent = common.build_agent(run.config)
    obs = jnp.asarray(obs_values, jnp.float32)[:, None]
    logits, value = agent.apply(run.out.state.params, obs)
    return np.asarray(jax.nn.softmax(logits)), np.asarray(value)


class TestA2CConstantReward:
    def test_learns_constant_value(self, runs):
        run = runs.get("a2c-constant")
        _, v = _actor_critic_outputs(run, [0.0])
        np.testing.assert_allclose(v, [1.0], atol=0.05)
        np.testing.assert_allclose(run.out.metrics.episode.episode_return[-1], 1.0)
        assert float(run.out.metrics.aux.value_loss[-1]) < 1e-3


class TestA2CObsReward:
    def test_learns_obs_dependent_value(self, runs):
        _, v = _actor_critic_outputs(runs.get("a2c-obs"), [-1.0, 1.0])
        np.testing.assert_allclose(v, [-1.0, 1.0], atol=0.05)


class TestA2CTwoStep:
    def test_learns_discounted_two_step_values(self, runs):
        _, v = _actor_critic_outputs(runs.get("a2c-twostep"), [-1.0, 1.0])
        np.testing.assert_allclose(v, [PROBE_GAMMA, 1.0], atol=0.05)


class TestPPOActionReward:
    def test_learns_action_dependent_reward(self, runs):
        run = runs.get("ppo-action")
        probs, v = _actor_critic_outputs(run, [0.0])
        assert probs[0, 1] > 0.95
        np.testing.assert_allclose(v, [1.0], atol=0.1)  # the value of the (near-)optimal policy
        np.testing.assert_allclose(run.out.metrics.episode.episode_return[-1], 1.0, atol=0.05)
        state = run.out.state
        greedy = run.trainer.act(state.params, state.obs_stats, jnp.zeros((3, 1)), jax.random.PRNGKey(0), True)
        np.testing.assert_array_equal(greedy, 1)


class TestPPOObsActionReward:
    def test_learns_obs_conditioned_policy(self, runs):
        run = runs.get("ppo-obsaction")
        probs, v = _actor_critic_outputs(run, [-1.0, 1.0])
        assert probs[0, 0] > 0.95 and probs[1, 1] > 0.95
        np.testing.assert_allclose(v, [1.0, 1.0], atol=0.1)
        np.testing.assert_allclose(run.out.metrics.episode.episode_return[-1], 1.0, atol=0.05)


# Probe-TruncationReset-v0 (gamma = PROBE_GAMMA): the values of A and B for three ways of bootstrapping
# at the time limit (the probe's docstring): from the pre-reset observation (right), from the reset
# observation, and not at all (truncation treated as termination).
V_A = 1.0 / (1.0 - PROBE_GAMMA**2)
V_A_FROM_RESET_OBS = 1.0 / (1.0 - PROBE_GAMMA * (1.0 + PROBE_GAMMA) / 2.0)
V_A_AS_TERMINATION = 1.0 / (1.0 - PROBE_GAMMA**2 / 2.0)


class TestDQNTruncationReset:
    def test_bootstraps_from_the_pre_reset_observation(self, runs):
        run = runs.get("dqn-truncation")
        spec = nets.ActionSpec(discrete=True, num_actions=1)
        qnet = nets.make(run.config.net, (1,), spec, head="q")
        q = np.asarray(qnet.apply({"params": run.out.state.params}, jnp.array([[-1.0], [1.0]])))[:, 0]
        np.testing.assert_allclose(q, [V_A, PROBE_GAMMA * V_A], atol=0.15)
        assert abs(q[0] - V_A_FROM_RESET_OBS) > 0.5 and abs(q[0] - V_A_AS_TERMINATION) > 0.5


class TestDQNActionReward:
    def test_learns_action_values(self, runs):
        run = runs.get("dqn-action")
        spec = nets.ActionSpec(discrete=True, num_actions=2)
        qnet = nets.make(run.config.net, (1,), spec, head="q")
        q = np.asarray(qnet.apply({"params": run.out.state.params}, jnp.zeros((1, 1))))
        np.testing.assert_allclose(q[0], [-1.0, 1.0], atol=0.1)  # one-step episodes: Q = reward
        greedy = run.trainer.act(run.out.state.params, None, jnp.zeros((4, 1)), jax.random.PRNGKey(0), True)
        np.testing.assert_array_equal(greedy, 1)
