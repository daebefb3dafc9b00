"""Algorithms end to end: learning on CartPole, determinism, vmapped sweeps, chunked training,
truncation bootstrapping in the shared collection, continuous actions, the CNN torso, evaluation,
and config errors raised before anything compiles."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PROBE_GAMMA, all_finite, assert_trees_equal, f32, tree_max_abs_diff
from flax import struct
from gymnax.environments import environment, spaces

from rlcx_jax import envs, nets, rl
from rlcx_jax.envs import probes
from rlcx_jax.envs.normalize import init_stats
from rlcx_jax.envs.wrappers import EpisodeStatsWrapper
from rlcx_jax.rl import a2c, common, dqn, evaluate, onpolicy, ppo, reinforce, rollout
from rlcx_jax.rl.common import Hooks
from rlcx_jax.seams import ExtensionTerms

ALGORITHMS = ["ppo", "a2c", "reinforce", "dqn"]


# ----------------------------------------------------------------------------------------------
# Learning, determinism, sweeps: one class per CartPole run (one compilation, one xdist worker)
# ----------------------------------------------------------------------------------------------
class _CartPoleRun:
    """Tests every algorithm's CartPole run must pass; subclasses name the run in `RUN_SPECS`."""

    run_name = ""

    def test_improves_cartpole_return(self, runs):
        returns = np.asarray(runs.get(self.run_name).out.metrics.episode.episode_return)
        assert returns.ndim == 1 and len(returns) >= 8
        first, last = returns[:2].mean(), returns[-2:].mean()
        assert last > 2.0 * first and last - first > 30.0, returns.round(1)

    def test_same_seed_gives_bit_identical_parameters(self, runs):
        run = runs.get(self.run_name)
        again = run.rerun()
        assert_trees_equal(run.out.state.params, again.state.params)
        assert_trees_equal(run.out.metrics, again.metrics)
        other = run.rerun(key=jax.random.PRNGKey(1))
        assert tree_max_abs_diff(run.out.state.params, other.state.params) > 1e-3


class TestPPOCartPole(_CartPoleRun):
    run_name = "ppo-cartpole"

    def test_vmapped_sweep_tracks_separate_runs_and_learns(self, runs):
        """A vmapped (seed, lr) sweep on CartPole: each lane starts out as the same run made alone
        and every lane learns.

        Only the first logged block (8 updates) is compared: lanes differ from the separate runs by
        about one float32 ulp (XLA on CPU emits different code for some elementwise ops in the
        batched program), and over a long run one such difference eventually flips a sampled
        discrete action, after which the trajectories legitimately diverge. The exact comparison
        of whole runs is on Pendulum, where actions are continuous (TestPendulumPPO)."""
        run = runs.get(self.run_name)
        keys, lrs = jnp.stack([run.key, run.key, jax.random.PRNGKey(1)]), [1e-4, 2.5e-4, 2.5e-4]
        hparams = jax.tree.map(lambda x: jnp.broadcast_to(x, (3,)), run.hparams)
        hparams = hparams.replace(lr=jnp.asarray(lrs, jnp.float32))
        swept = jax.block_until_ready(jax.jit(jax.vmap(run.trainer.train))(keys, hparams))
        for i in range(3):
            single = run.rerun(key=keys[i], hparams=run.hparams.replace(lr=lrs[i]))
            lane = jax.tree.map(lambda x: x[i], swept.metrics)  # noqa: B023
            np.testing.assert_allclose(lane.episode.episode_return[0], single.metrics.episode.episode_return[0], rtol=1e-4)
            np.testing.assert_allclose(lane.loss[0], single.metrics.loss[0], rtol=1e-3, atol=1e-6)
            np.testing.assert_array_equal(lane.env_steps, single.metrics.env_steps)
            returns = np.asarray(lane.episode.episode_return)
            assert returns[-2:].mean() > 1.5 * returns[:2].mean(), returns.round(1)

    def test_evaluation_before_and_after_training(self, runs):
        run = runs.get(self.run_name)
        evaluator = jax.jit(evaluate.make_evaluator(run.trainer, num_episodes=16, greedy=False))
        before_state = jax.jit(run.trainer.init)(run.key, run.hparams)
        key = jax.random.PRNGKey(3)
        before = np.asarray(evaluator(before_state.params, before_state.obs_stats, key))
        after = np.asarray(evaluator(run.out.state.params, run.out.state.obs_stats, key))
        assert before.shape == after.shape == (16,)
        assert np.all(before >= 1) and np.all(after <= 500)
        assert after.mean() > 2.0 * before.mean(), (before.mean(), after.mean())


class TestA2CCartPole(_CartPoleRun):
    run_name = "a2c-cartpole"


class TestReinforceCartPole(_CartPoleRun):
    run_name = "reinforce-cartpole"


class TestDQNCartPole(_CartPoleRun):
    run_name = "dqn-cartpole"

    def test_greedy_evaluation(self, runs):
        run = runs.get(self.run_name)
        returns = evaluate.evaluate("dqn", run.config, run.out.state.params, jax.random.PRNGKey(0), num_episodes=8)
        assert returns.shape == (8,)
        assert float(returns.mean()) > 100.0


# ----------------------------------------------------------------------------------------------
# Truncation vs termination in the shared on-policy collection
# ----------------------------------------------------------------------------------------------
@struct.dataclass
class ScriptState(environment.EnvState):
    time: jax.Array
    kind: jax.Array
    offset: jax.Array


class Scripted(environment.Environment):
    """Hand-built episodes, time limit 3. At reset `kind` is drawn: 0 runs into the time limit
    (truncated), 1 terminates at step 2, 2 terminates exactly at the limit (terminated and
    truncated at once: termination wins). Obs = (offset + time, kind, time), offset ~ U(0, 1) drawn
    per episode, so no two observations coincide."""

    @property
    def default_params(self):
        return probes.ProbeParams(max_steps_in_episode=3)

    def reset_env(self, key, params):
        key_kind, key_offset = jax.random.split(key)
        state = ScriptState(
            time=jnp.zeros((), jnp.int32),
            kind=jax.random.randint(key_kind, (), 0, 3),
            offset=jax.random.uniform(key_offset),
        )
        return self.get_obs(state), state

    def step_env(self, key, state, action, params):
        state = state.replace(time=state.time + 1)
        terminated = ((state.kind == 1) & (state.time == 2)) | ((state.kind == 2) & (state.time == 3))
        return self.get_obs(state), state, jnp.float32(1.0), terminated, {}

    def get_obs(self, state, params=None, key=None):
        return jnp.stack([state.offset + state.time, state.kind, state.time]).astype(jnp.float32)

    def action_space(self, params=None):
        return spaces.Discrete(1)

    def observation_space(self, params):
        return spaces.Box(0.0, 5.0, (3,), jnp.float32)


def known_value(obs):
    """The 'critic' of this test: a fixed, injective function of the observation."""
    return 10.0 * obs[..., 0] + obs[..., 1] + 0.1 * obs[..., 2]


def test_collect_bootstraps_from_final_observation_only_on_truncation():
    env = EpisodeStatsWrapper(Scripted())
    env_params = env.default_params
    config = onpolicy.OnPolicyConfig(num_envs=64, num_steps=12)
    spec = nets.ActionSpec(discrete=True, num_actions=1)

    def apply(params, obs, method=None):  # a one-action policy and the known critic
        logits = jnp.zeros(obs.shape[:-1] + (1,))
        if method == "policy":
            return logits
        if method == "value":
            return known_value(obs)
        return logits, known_value(obs)

    agent = onpolicy.Agent(config, env, env_params, spec, (3,), None, apply, Hooks(), ExtensionTerms())
    gamma = 0.9
    state = onpolicy.ActorCriticState(
        params={},
        opt_state=None,
        runner=rollout.reset(env, env_params, jax.random.PRNGKey(0), config.num_envs),
        obs_stats=init_stats((3,)),
        key=jax.random.PRNGKey(1),
        update_step=jnp.zeros((), jnp.int32),
        hparams=a2c.A2CHParams(gamma=gamma),
        env_params=env_params,
        ext={},
    )
    new_state, col = jax.jit(lambda s, k: onpolicy.collect(agent, s, k))(state, jax.random.PRNGKey(2))
    traj = jax.tree.map(np.asarray, col.traj)
    v_t, v_tm1, discount = np.asarray(col.v_t), np.asarray(col.v_tm1), np.asarray(col.discount_t)
    final_obs = np.asarray(new_state.runner.obs)
    term, trunc = traj.terminated, traj.truncated
    kind, time = traj.next_obs[..., 1], traj.next_obs[..., 2]  # after the step, before any reset

    # Every case occurs in this hand-built trajectory, including a truncation at the last step
    # (where the bootstrap must not be the critic on the reset observation either).
    assert trunc.any() and term.any()
    assert trunc[-1].any() and not trunc[-1].all()
    both = (kind == 2) & (time == 3)
    assert both.any() and np.all(term[both]) and not np.any(trunc[both])  # termination wins
    np.testing.assert_array_equal(trunc, (kind == 0) & (time == 3))
    np.testing.assert_array_equal(term, ((kind == 1) & (time == 2)) | both)

    np.testing.assert_allclose(v_tm1, known_value(traj.obs), rtol=1e-6)
    following_obs = np.concatenate([traj.obs[1:], final_obs[None]], axis=0)  # after any reset
    # Truncated: V(final pre-reset obs), which is not the observation the env was reset to.
    np.testing.assert_allclose(v_t[trunc], known_value(traj.next_obs[trunc]), rtol=1e-6)
    assert not np.any(np.all(np.isclose(traj.next_obs[trunc], following_obs[trunc]), axis=-1))
    # Otherwise the rollout's own next-step value (after the last step: V of the current obs).
    np.testing.assert_array_equal(v_t[:-1][~trunc[:-1]], v_tm1[1:][~trunc[:-1]])
    np.testing.assert_allclose(v_t[-1][~trunc[-1]], known_value(final_obs[~trunc[-1]]), rtol=1e-6)
    # Terminated: discount 0 (nothing is bootstrapped); gamma everywhere else.
    np.testing.assert_allclose(discount, np.where(term, 0.0, gamma), rtol=1e-6)
    # Outside episode ends, next_obs is the next observation.
    cont = ~(term | trunc)[:-1]
    np.testing.assert_array_equal(traj.next_obs[:-1][cont], traj.obs[1:][cont])


def test_truncation_values_evaluate_every_truncated_step_in_groups_under_vmap():
    """The critic on the pre-reset observation at every truncated step and zero elsewhere, for no
    truncation, fewer than one group (num_envs) of them and several groups; vmapped over the three
    cases at once (where the group loop runs for the longest), equal to each case alone."""
    num_steps, num_envs = 6, 4

    def apply(params, obs, method=None):
        assert method == "value"
        return known_value(obs)

    config = onpolicy.OnPolicyConfig(num_envs=num_envs, num_steps=num_steps)
    agent = onpolicy.Agent(config, None, None, None, (3,), None, apply, Hooks(), ExtensionTerms())
    state = onpolicy.ActorCriticState(
        params={}, opt_state=None, runner=None, obs_stats=init_stats((3,)), key=None, update_step=None,
        hparams=None, env_params=None, ext={},
    )  # fmt: skip
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(3, num_steps, num_envs, 3)).astype(np.float32)
    truncated = np.zeros((3, num_steps, num_envs), bool)
    truncated[1, [0, 5], [2, 1]] = True  # two
    truncated[2] = rng.random((num_steps, num_envs)) < 0.6  # several groups of four
    assert truncated[2].sum() > 2 * num_envs
    want = np.where(truncated, known_value(obs), 0.0)

    def values(t, o):
        return onpolicy.truncation_values(agent, state, t, o)

    batched = jax.jit(jax.vmap(values))(truncated, obs)
    np.testing.assert_allclose(np.asarray(batched), want, rtol=1e-6)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(jax.jit(values)(truncated[i], obs[i])), want[i], rtol=1e-6)


# The truncation probe (f): values learn 1 / (1 - gamma), never the remaining steps' return.
T_LIMIT = probes.Truncation.time_limit
PHASES = [2.0 * k / T_LIMIT - 1.0 for k in range(T_LIMIT)]
V_BOOTSTRAP = 1.0 / (1.0 - PROBE_GAMMA)  # 5.0
V_IF_TERMINATED = [(1.0 - PROBE_GAMMA ** (T_LIMIT - k)) / (1.0 - PROBE_GAMMA) for k in range(T_LIMIT)]


class _TruncationAsTermination(probes.Truncation):
    """Negative control: the same probe, but the time limit is reported as termination."""

    probe_name = "Probe-TruncationAsTermination-test"

    def _transition(self, key, state, action, params):
        next_phase, reward, _ = super()._transition(key, state, action, params)
        return next_phase, reward, state.time + 1 >= params.max_steps_in_episode


def _values(config, params, obs_values):
    return np.asarray(common.build_agent(config).apply(params, jnp.asarray(obs_values)[:, None])[1])


class TestTruncationProbe:
    run_name = "a2c-truncation"

    def test_values_converge_to_infinite_horizon(self, runs):
        run = runs.get(self.run_name)
        v = _values(run.config, run.out.state.params, PHASES)
        np.testing.assert_allclose(v, V_BOOTSTRAP, rtol=0.08)
        # Far from what treating truncation as termination learns (1.0 for the last phase).
        assert np.all(np.abs(v - np.array(V_IF_TERMINATED))[1:] > 1.0)
        ep = run.out.metrics.episode
        np.testing.assert_allclose(ep.episode_return[-1], T_LIMIT)
        np.testing.assert_allclose(ep.episode_length[-1], T_LIMIT)
        np.testing.assert_array_equal(ep.terminated_fraction, 0.0)

    def test_probe_detects_truncation_treated_as_termination(self, runs):
        """The probe discriminates: the same A2C settings on an env that terminates at the limit
        learn the remaining steps' return, not 1 / (1 - gamma)."""
        run = runs.get(self.run_name)
        name = _TruncationAsTermination.probe_name
        if name not in envs.list_envs():
            envs.register(name, lambda: (_TruncationAsTermination(), _TruncationAsTermination().default_params))
        config = dataclasses.replace(run.config, env=name)
        out = jax.jit(rl.make("a2c", config).train)(run.key, run.hparams)
        np.testing.assert_allclose(_values(config, out.state.params, PHASES), V_IF_TERMINATED, atol=0.3)
        np.testing.assert_array_equal(out.metrics.episode.terminated_fraction, 1.0)

    def test_chunked_learn_equals_one_train_call(self, runs):
        """train(key) == learn(learn(init(key), n/2), n/2): mode (a) is mode (b) scanned."""
        run = runs.get(self.run_name)
        half = run.trainer.num_updates // 2
        learn = jax.jit(run.trainer.learn, static_argnums=1)
        state = jax.jit(run.trainer.init)(run.key, run.hparams)
        state, m1 = learn(state, half)
        state, m2 = learn(state, half)
        metrics = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), m1, m2)
        assert int(state.update_step) == run.trainer.num_updates
        # The same arithmetic in two separately compiled programs: bit-identical on this CPU.
        assert_trees_equal(state.params, run.out.state.params)
        assert_trees_equal(metrics, run.out.metrics)


# ----------------------------------------------------------------------------------------------
# Continuous actions and the CNN torso (tiny budgets: they must run, not learn)
# ----------------------------------------------------------------------------------------------
class TestPendulumPPO:
    def test_vmapped_sweep_equals_separate_runs(self, runs):
        """One vmapped call over (seed, lr) lanes equals the same runs made one at a time.

        Not bit-identical (tried first): XLA on CPU emits different code for some elementwise ops
        in the batched program, so parameters differ by about one float32 ulp (~1e-7)."""
        run = runs.get("ppo-pendulum")
        keys, lrs = jnp.stack([run.key, run.key, jax.random.PRNGKey(1)]), [1e-4, 1e-3, 1e-3]
        hparams = jax.tree.map(lambda x: jnp.broadcast_to(x, (3,)), run.hparams)
        hparams = hparams.replace(lr=jnp.asarray(lrs, jnp.float32))
        swept = jax.block_until_ready(jax.jit(jax.vmap(run.trainer.train))(keys, hparams))
        for i in range(3):
            single = run.rerun(key=keys[i], hparams=run.hparams.replace(lr=lrs[i]))
            lane = jax.tree.map(lambda x: x[i], swept)  # noqa: B023
            assert tree_max_abs_diff(single.state.params, lane.state.params) < 1e-5
            np.testing.assert_allclose(lane.metrics.loss, single.metrics.loss, rtol=1e-4, atol=1e-6)
        # The lanes are really different runs (learning rate, seed).
        lanes = [jax.tree.map(lambda x: x[i], swept.state.params) for i in range(3)]  # noqa: B023
        assert tree_max_abs_diff(lanes[0], lanes[1]) > 1e-3 and tree_max_abs_diff(lanes[1], lanes[2]) > 1e-3

    def test_continuous_ppo_on_pendulum_runs_without_nan(self, runs):
        run = runs.get("ppo-pendulum")
        assert all_finite(run.out.state.params) and all_finite(run.out.metrics)
        assert run.out.state.params["log_std"].shape == (1,)
        assert float(run.out.metrics.episode.episode_count.sum()) == 0  # 200-step episodes, 128 steps/env
        obs = jnp.zeros((5, 3))
        actions = run.trainer.act(run.out.state.params, run.out.state.obs_stats, obs, jax.random.PRNGKey(0), False)
        assert actions.shape == (5, 1) and actions.dtype == jnp.float32
        assert len(np.unique(np.asarray(actions))) == 5  # sampled from a Gaussian


class TestBreakoutCNN:
    def test_cnn_torso_trains_on_breakout_minatar(self, runs):
        """PPO with the CNN torso, 16k env steps on Breakout-MinAtar, beats a uniformly random policy
        by a wide margin: 64 evaluation episodes each, the same evaluation key. The random policy is
        the trained network with its policy head zeroed (all logits 0: exactly uniform)."""
        run = runs.get("ppo-breakout-cnn")
        params = run.out.state.params
        assert params["actor_torso"]["Conv_0"]["kernel"].shape == (3, 3, 4, 8)
        uniform = {**params, "policy_head": jax.tree.map(jnp.zeros_like, params["policy_head"])}
        evaluate = jax.jit(rl.evaluate.make_evaluator(run.trainer, 64, greedy=False))
        key = jax.random.PRNGKey(1)
        random_return = float(evaluate(uniform, run.out.state.obs_stats, key).mean())
        trained_return = float(evaluate(params, run.out.state.obs_stats, key).mean())
        assert random_return < 1.0  # a random paddle hits the ball about once in three episodes
        assert trained_return > 2.0 + 3 * random_return, (trained_return, random_return)


# ----------------------------------------------------------------------------------------------
# Registry and configuration errors (raised in Python, before anything is traced or compiled)
# ----------------------------------------------------------------------------------------------
def test_algorithm_registry():
    assert set(rl.ALGORITHMS) == set(ALGORITHMS)
    assert rl.get("ppo").config_cls is ppo.PPOConfig
    with pytest.raises(ValueError, match=r"Unknown algorithm 'ppo2'\. Did you mean 'ppo'\?"):
        rl.get("ppo2")
    with pytest.raises(ValueError, match="Unknown algorithm 'sac'"):
        rl.make("sac")


BAD_CONFIGS = [
    ("ppo", ppo.PPOConfig(num_envs=4, num_steps=10, num_minibatches=3), "divisible by num_minibatches"),
    ("ppo", ppo.PPOConfig(env="CartPol-v1"), "Unknown environment 'CartPol-v1'.*CartPole-v1"),
    ("ppo", ppo.PPOConfig(total_timesteps=0), "total_timesteps must be positive"),
    ("ppo", ppo.PPOConfig(total_timesteps=-1000), "total_timesteps must be positive"),
    ("ppo", ppo.PPOConfig(num_steps=0), "num_steps must be positive"),
    ("ppo", ppo.PPOConfig(num_envs=-2), "num_envs must be positive"),
    ("ppo", ppo.PPOConfig(update_epochs=0), "update_epochs must be positive"),
    ("ppo", ppo.PPOConfig(total_timesteps=100), "smaller than one update"),
    ("ppo", ppo.PPOConfig(net=nets.NetConfig(activation="swishy")), "Unknown activation"),
    ("a2c", a2c.A2CConfig(num_steps=-8), "num_steps must be positive"),
    ("reinforce", reinforce.ReinforceConfig(total_timesteps=0), "total_timesteps must be positive"),
    ("dqn", dqn.DQNConfig(buffer_size=10_005), r"buffer_size \(10005\) must be a multiple of train_frequency"),
    ("dqn", dqn.DQNConfig(num_envs=4, train_frequency=10), "multiple of num_envs"),
    ("dqn", dqn.DQNConfig(target_update_period=505), "target_update_period"),
    ("dqn", dqn.DQNConfig(total_timesteps=0), "total_timesteps must be positive"),
    ("dqn", dqn.DQNConfig(learning_starts=-1), "learning_starts must be >= 0"),
    ("dqn", dqn.DQNConfig(buffer_size=1_000, learning_starts=2_000), r"learning_starts \(2000\) exceeds buffer_size"),
    ("dqn", dqn.DQNConfig(eps_end=1.5), "eps_end"),
    ("dqn", dqn.DQNConfig(env="Pendulum-v1"), "^DQN needs a discrete action space; Pendulum-v1's actions are continuous"),
]


@pytest.mark.parametrize("algorithm,config,match", BAD_CONFIGS, ids=[f"{a}-{m[:24]}" for a, _, m in BAD_CONFIGS])
def test_bad_configs_raise_before_compiling(algorithm, config, match, monkeypatch):
    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled before validating")

    monkeypatch.setattr(jax, "jit", no_compiling)
    monkeypatch.setattr(jax.lax, "scan", no_compiling)
    with pytest.raises(ValueError, match=match):
        rl.make(algorithm, config)


def test_hparams_validate():
    with pytest.raises(ValueError, match="gamma must be in"):
        ppo.PPOHParams(gamma=1.5).validate()
    with pytest.raises(ValueError, match="lr must be positive"):
        a2c.A2CHParams(lr=0.0).validate()
    with pytest.raises(ValueError, match="tau must be in"):
        dqn.DQNHParams(tau=2.0).validate()
    with pytest.raises(ValueError, match="max_grad_norm must be positive"):
        reinforce.ReinforceHParams(max_grad_norm=-1.0).validate()
    for hp in (ppo.PPOHParams(), a2c.A2CHParams(), reinforce.ReinforceHParams(), dqn.DQNHParams()):
        hp.validate()


def test_uneven_step_counts_round_down_and_log_every_adapts():
    config = ppo.PPOConfig(total_timesteps=512 * 10 + 100, log_every=3)
    config.validate()
    assert config.num_updates == 10 and config.updates_per_row == 2
    notice = config.rounding_notice()
    assert "rounded down to 5120" in notice and "log_every 3 -> 2" in notice
    assert ppo.PPOConfig(total_timesteps=512 * 10).rounding_notice() is None
    dqn_config = dqn.DQNConfig(total_timesteps=20_480)  # 2048 updates, log_every 50 -> 32
    assert dqn_config.updates_per_row == 32 and "log_every 50 -> 32" in dqn_config.rounding_notice()


# ----------------------------------------------------------------------------------------------
# DQN's gradient_steps and Adam's epsilon (tiny budgets: one compilation per config, a few seconds)
# ----------------------------------------------------------------------------------------------
TINY_DQN = dict(
    num_envs=2,
    train_frequency=4,
    buffer_size=64,
    batch_size=8,
    learning_starts=16,
    target_update_period=8,
    total_timesteps=200,
    log_every=5,
    net=nets.NetConfig(hidden=(16,)),
)


@functools.cache
def _tiny_dqn(**changes) -> tuple[dqn.DQNConfig, Any, Any]:
    """(config, jitted train, output for PRNGKey(0) and default hyperparameters); `changes` are
    config fields set on top of TINY_DQN (none: gradient_steps is left at its default)."""
    config = dqn.DQNConfig(**{**TINY_DQN, **changes})
    train = jax.jit(rl.make("dqn", config).train)
    return config, train, jax.block_until_ready(train(jax.random.PRNGKey(0), f32(dqn.DQNHParams())))


def _ready_updates(config: dqn.DQNConfig) -> int:
    """Updates that learn: the buffer holds learning_starts transitions after that update's collection."""
    n = config.total_timesteps // config.train_frequency
    return sum(min(u * config.train_frequency, config.buffer_size) >= config.learning_starts for u in range(1, n + 1))


def _optimizer_counts(opt_state: Any) -> list[int]:
    """Every step counter in the optax state (Adam's and the learning-rate schedule's)."""
    leaves = jax.tree_util.tree_leaves_with_path(opt_state)
    return [int(x) for path, x in leaves if getattr(path[-1], "name", None) == "count"]


def test_dqn_gradient_steps_take_that_many_optimizer_steps_per_update():
    config, _, out = _tiny_dqn(gradient_steps=3)
    ready = _ready_updates(config)
    assert 0 < ready < config.total_timesteps // config.train_frequency  # some updates only collect
    counts = _optimizer_counts(out.state.opt_state)
    assert len(counts) == 2 and counts == [3 * ready] * 2, (counts, ready)
    assert config.optimizer_steps == 3 * ready  # what learning-rate annealing and pruning schedules count
    assert all_finite(out.state.params) and all_finite(out.metrics)
    assert float(np.asarray(out.metrics.loss)[-1]) > 0.0  # the scanned steps' mean loss is reported
    _, _, one = _tiny_dqn()
    assert tree_max_abs_diff(out.state.params, one.state.params) > 1e-3


def test_dqn_one_gradient_step_is_the_default_run_bit_for_bit():
    default_config, _, default = _tiny_dqn()
    assert default_config.gradient_steps == 1
    config, _, one = _tiny_dqn(gradient_steps=1)  # a separately built and compiled trainer
    assert_trees_equal(one.state.params, default.state.params)
    assert_trees_equal(one.state.opt_state, default.state.opt_state)
    assert_trees_equal(one.metrics, default.metrics)
    # One optimizer step per learning update, none before learning_starts.
    assert _optimizer_counts(one.state.opt_state) == [_ready_updates(config)] * 2


def test_adam_eps_is_a_traced_hyperparameter_that_changes_the_result():
    _, train, default = _tiny_dqn()
    assert float(dqn.DQNHParams().adam_eps) == 1e-5
    hp = f32(dqn.DQNHParams(adam_eps=1e-8))
    small_eps = jax.block_until_ready(train(jax.random.PRNGKey(0), hp))
    assert "adam_eps" in [path[0].name for path, _ in jax.tree_util.tree_flatten_with_path(hp)[0]]  # traced
    assert tree_max_abs_diff(small_eps.state.params, default.state.params) > 1e-6  # measured: 6e-5
    # A vmapped pair of lanes differing only in adam_eps: each lane is its own separate run. Not bit
    # for bit (tried first: a few float32 ulps, as in TestPendulumPPO; measured 3e-8 on the parameters,
    # 7e-9 on the metrics), far closer to its own run than the two runs are to each other (6e-5, 8e-6).
    pair = jax.tree.map(lambda x: jnp.stack([x, x]), f32(dqn.DQNHParams()))
    pair = pair.replace(adam_eps=jnp.asarray([1e-5, 1e-8], jnp.float32))
    train_pair = jax.jit(jax.vmap(rl.make("dqn", dqn.DQNConfig(**TINY_DQN)).train, in_axes=(None, 0)))
    swept = jax.block_until_ready(train_pair(jax.random.PRNGKey(0), pair))
    for i, single in enumerate((default, small_eps)):
        lane = jax.tree.map(lambda x: x[i], swept)  # noqa: B023
        assert tree_max_abs_diff(lane.state.params, single.state.params) < 1e-6
        assert tree_max_abs_diff(lane.metrics, single.metrics) < 1e-7
        assert_trees_equal(lane.metrics.episode, single.metrics.episode)  # the same actions were taken
