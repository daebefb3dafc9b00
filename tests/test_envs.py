"""Environment adapter, wrappers and running observation normalisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlcx_jax import envs, nets
from rlcx_jax.envs import wrappers
from rlcx_jax.envs.normalize import init_stats, normalize_observation, update_stats
from rlcx_jax.rl import rollout

NEEDS_DOWNLOAD = {"MNISTBandit-bsuite"}  # fetches MNIST over the network on construction


# ----------------------------------------------------------------------------------------------
# make / registry
# ----------------------------------------------------------------------------------------------
def test_unknown_env_names_close_matches():
    with pytest.raises(ValueError, match=r"Unknown environment 'CartPole-v2'.*Did you mean 'CartPole-v1'"):
        envs.make("CartPole-v2")
    with pytest.raises(ValueError, match="Unknown environment 'Breakout'.*Breakout-MinAtar"):
        envs.check_env_name("Breakout")
    with pytest.raises(ValueError, match="Unknown environment 'zzzz'"):
        envs.make("zzzz")


def test_param_overrides():
    env, params = envs.make("CartPole-v1", max_steps_in_episode=20, gravity=3.0)
    assert params.max_steps_in_episode == 20 and params.gravity == 3.0
    with pytest.raises(ValueError, match=r"Unknown parameter\(s\) \['max_steps'\].*max_steps_in_episode"):
        envs.make("CartPole-v1", max_steps=20)
    _, probe_params = envs.make("Probe-Truncation-v0", max_steps_in_episode=3)
    assert probe_params.max_steps_in_episode == 3


def test_register_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        envs.register("CartPole-v1", lambda: envs.make("CartPole-v1"))
    with pytest.raises(ValueError, match="already registered"):
        envs.register("Probe-ConstantReward-v0", lambda: None)


def test_list_envs_contains_gymnax_and_probes():
    names = envs.list_envs()
    assert "CartPole-v1" in names and "Breakout-MinAtar" in names
    assert {"Probe-ConstantReward-v0", "Probe-Truncation-v0"} <= set(names)
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", sorted(set(envs.list_envs()) - NEEDS_DOWNLOAD))
def test_make_every_env(name):
    """Every id builds, and reset / step follow gymnax 1.x. Traced with `eval_shape` (no compile):
    this checks the API and the shapes; the probes and CartPole are stepped for real elsewhere."""
    env, params = envs.make(name)
    key = jax.random.PRNGKey(0)
    obs, state = jax.eval_shape(env.reset, key, params)
    space = env.observation_space(params)
    assert tuple(obs.shape) == tuple(space.shape)
    action = env.action_space(params).sample(key)
    out = jax.eval_shape(env.step, key, state, action, params)
    assert len(out) == 6
    next_obs, _, reward, terminated, truncated, info = out
    assert next_obs.shape == obs.shape
    assert reward.shape == () and terminated.shape == () and truncated.shape == ()
    assert info["final_observation"].shape == obs.shape
    # The training wrapper stack traces too, and reports episode statistics.
    wrapped, _ = envs.make_training_env(name)
    _, wstate = jax.eval_shape(wrapped.reset, key, params)
    winfo = jax.eval_shape(wrapped.step, key, wstate, action, params)[5]
    assert winfo["episode"].episode_return.shape == ()


# ----------------------------------------------------------------------------------------------
# Wrappers
# ----------------------------------------------------------------------------------------------
def _random_rollout(name, num_envs, num_steps, env_kwargs=(), seed=0):
    env, params = envs.make_training_env(name, env_kwargs)
    n = env.action_space(params).n

    def policy_fn(key, obs):
        return jax.random.randint(key, (obs.shape[0],), 0, n), None

    @jax.jit
    def run(key):
        key_reset, key_run = jax.random.split(key)
        runner = rollout.reset(env, params, key_reset, num_envs)
        return rollout.collect(env, params, policy_fn, runner, key_run, num_steps)

    return run(jax.random.PRNGKey(seed))


@pytest.mark.parametrize("name, float_tolerance", [("CartPole-v1", 0.0), ("Pendulum-v1", 1e-6)])
def test_collect_equals_stepping_one_step_at_a_time_bit_for_bit(name: str, float_tolerance: float) -> None:
    """`collect` packs the environment states of its carry and the per-environment scalars of every
    step into uint32 arrays inside its scan; the unpacked trajectory and final runner must be what a
    plain scan of `rollout.step` gives: same values, dtypes, shapes (extras of the policy included: a
    float and a bool per environment, and a wider leaf). CartPole's are equal bit for bit. Pendulum's
    floats may differ in the last bit (XLA fuses its trigonometric dynamics differently when the state
    is packed), so they are compared to 1e-6; its integers and flags exactly. A 15-step limit makes
    episodes end."""
    env, params = envs.make_training_env(name, (("max_steps_in_episode", 15),))
    spec = nets.action_spec(env.action_space(params))

    def policy_fn(key, obs):
        if spec.discrete:
            action = jax.random.randint(key, (obs.shape[0],), 0, spec.num_actions)
        else:
            action = jax.random.uniform(key, (obs.shape[0], *spec.shape), minval=-2.0, maxval=2.0)
        extras = {"score": obs[:, 0] * 2.0, "flag": obs[:, 0] > 0, "wide": obs * 3.0}
        return action, extras

    key_reset, key_run = jax.random.split(jax.random.PRNGKey(3))
    runner = rollout.reset(env, params, key_reset, 3)
    end, traj = jax.jit(lambda r, k: rollout.collect(env, params, policy_fn, r, k, 40))(runner, key_run)

    @jax.jit
    def unpacked(r, k):
        keys = jax.random.split(k, (40, 4))
        return jax.lax.scan(lambda c, kk: rollout._step(env, params, policy_fn, c, kk), r, keys)

    runner, reference = unpacked(runner, key_run)
    assert jax.tree.structure(traj) == jax.tree.structure(reference)
    def check(got: jax.Array, want: jax.Array) -> None:
        assert got.dtype == want.dtype and got.shape == want.shape
        if float_tolerance and jnp.issubdtype(got.dtype, jnp.floating):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=float_tolerance, atol=float_tolerance)
        else:
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    for got, want in zip(jax.tree.leaves(traj), jax.tree.leaves(reference)):
        check(got, want)
    for got, want in zip(jax.tree.leaves(end), jax.tree.leaves(runner)):
        check(got, want)
    assert np.asarray(traj.episode.done).any()


def test_episode_stats_wrapper_on_cartpole_matches_numpy():
    """Returns, lengths and the terminated flag against a NumPy tally; a 25-step time limit gives
    both terminations (falling over) and truncations."""
    runner, traj = _random_rollout("CartPole-v1", 4, 300, (("max_steps_in_episode", 25),))
    reward, term, trunc = (np.asarray(x) for x in (traj.reward, traj.terminated, traj.truncated))
    ep = jax.tree.map(np.asarray, traj.episode)
    np.testing.assert_array_equal(ep.done, term | trunc)
    np.testing.assert_array_equal(ep.terminated[ep.done], term[ep.done])
    ret = np.zeros(4)
    length = np.zeros(4, int)
    kinds = set()
    for t in range(reward.shape[0]):
        ret += reward[t]
        length += 1
        np.testing.assert_allclose(ep.episode_return[t], ret, rtol=1e-6)
        np.testing.assert_array_equal(ep.episode_length[t], length)
        for i in np.flatnonzero(ep.done[t]):
            kinds.add(bool(term[t, i]))
            assert length[i] <= 25
            assert bool(trunc[t, i]) == (length[i] == 25 and not term[t, i])
            ret[i], length[i] = 0.0, 0
    assert kinds == {True, False}
    # Transitions: next_obs is the pre-reset observation; it equals the next obs only within an episode.
    obs, next_obs = np.asarray(traj.obs), np.asarray(traj.next_obs)
    within = ~ep.done[:-1]
    np.testing.assert_array_equal(next_obs[:-1][within], obs[1:][within])
    assert not np.any(np.all(next_obs[:-1] == obs[1:], axis=-1)[ep.done[:-1]])
    # Episode metrics are the masked means of the finished episodes.
    m = rollout.EpisodeMetrics.from_stats(traj.episode)
    np.testing.assert_allclose(m.episode_return, ep.episode_return[ep.done].mean(), rtol=1e-5)
    np.testing.assert_allclose(m.episode_count, ep.done.sum())
    np.testing.assert_allclose(m.terminated_fraction, ep.terminated[ep.done].mean(), rtol=1e-6)


@pytest.mark.parametrize(
    "name,env_kwargs,length,ret,terminated",
    [
        ("Probe-ConstantReward-v0", (), 1, 1.0, True),
        ("Probe-TwoStep-v0", (), 2, 1.0, True),
        ("Probe-Truncation-v0", (), 5, 5.0, False),
        ("Probe-Truncation-v0", (("max_steps_in_episode", 3),), 3, 3.0, False),
    ],
)
def test_episode_stats_wrapper_on_probes(name, env_kwargs, length, ret, terminated):
    _, traj = _random_rollout(name, 2, 12, env_kwargs)
    ep = jax.tree.map(np.asarray, traj.episode)
    done_t = np.flatnonzero(ep.done[:, 0])
    np.testing.assert_array_equal(done_t, np.arange(length - 1, 12, length))
    np.testing.assert_array_equal(ep.episode_length[ep.done], length)
    np.testing.assert_allclose(ep.episode_return[ep.done], ret)
    np.testing.assert_array_equal(ep.terminated[ep.done], terminated)
    np.testing.assert_array_equal(np.asarray(traj.truncated)[ep.done], not terminated)


def test_empty_metrics_are_zero_not_nan():
    _, traj = _random_rollout("Probe-Truncation-v0", 2, 3)  # no episode ends within 3 steps
    m = rollout.EpisodeMetrics.from_stats(traj.episode)
    assert float(m.episode_count) == 0.0 and float(m.episode_return) == 0.0


def test_flatten_observation_wrapper():
    env, params = envs.make("Breakout-MinAtar")
    flat = wrappers.FlattenObservationWrapper(env)
    assert flat.observation_shape(params) == (400,)
    key = jax.random.PRNGKey(0)
    obs, state = jax.eval_shape(flat.reset, key, params)
    out = jax.eval_shape(flat.step, key, state, jnp.int32(0), params)
    assert obs.shape == (400,) and out[0].shape == (400,) and out[5]["final_observation"].shape == (400,)
    assert flat.unwrapped is env


def test_clip_action_wrapper_on_pendulum():
    env, params = envs.make_training_env("Pendulum-v1")  # continuous: clipping is added
    assert isinstance(env, wrappers.EpisodeStatsWrapper)
    key = jax.random.PRNGKey(0)
    _, state = env.reset(key, params)
    step = jax.jit(env.step)
    high = float(env.action_space(params).high)
    big = step(key, state, jnp.array([100.0]), params)
    edge = step(key, state, jnp.array([high]), params)
    np.testing.assert_array_equal(big[0], edge[0])
    np.testing.assert_array_equal(big[2], edge[2])


# ----------------------------------------------------------------------------------------------
# Running observation normalisation
# ----------------------------------------------------------------------------------------------
def test_running_stats_match_numpy():
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc=3.0, scale=2.0, size=(n, 5, 3)).astype(np.float32) for n in (4, 1, 7, 16)]
    stats = init_stats((3,))
    update = jax.jit(update_stats)
    for b in batches:
        stats = update(stats, b)
    everything = np.concatenate([b.reshape(-1, 3) for b in batches])
    # The prior (mean 0, var 1, count 1e-4) is negligible after 140 samples.
    np.testing.assert_allclose(stats.mean, everything.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats.var, everything.var(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats.count, len(everything) + 1e-4, rtol=1e-6)
    obs = everything[:10]
    want = np.clip((obs - everything.mean(0)) / np.sqrt(everything.var(0) + 1e-8), -10, 10)
    np.testing.assert_allclose(jax.jit(normalize_observation)(stats, obs), want, rtol=1e-3, atol=1e-3)
    # Clipping.
    assert float(jnp.max(normalize_observation(stats, everything.mean(0) + 1e6))) == 10.0


def test_running_stats_image_obs_and_vmap():
    rng = np.random.default_rng(1)
    data = rng.normal(size=(3, 8, 2, 2)).astype(np.float32)  # 3 independent streams of 8 (2, 2) obs
    stats = jax.vmap(lambda _: init_stats((2, 2)))(jnp.arange(3))
    stats = jax.jit(jax.vmap(update_stats))(stats, data)
    for i in range(3):
        np.testing.assert_allclose(stats.mean[i], data[i].mean(0), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(stats.var[i], data[i].var(0), rtol=1e-3, atol=1e-4)
        single = update_stats(init_stats((2, 2)), data[i])
        np.testing.assert_allclose(stats.mean[i], single.mean, rtol=1e-6, atol=1e-7)
