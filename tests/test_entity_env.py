"""EntityNavigation: observation layout and mask convention, hand-computed steps, the random slot
permutation, jit / vmap over keys and params, registration, and a random rollout with auto-reset.

Fast by design: small batches, one jitted function per test.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlcx_jax import envs
from rlcx_jax.configs import envs as env_table
from rlcx_jax.envs import entities
from rlcx_jax.envs.entities import EntityNavigation, EntityNavParams, EntityNavState, entity_mask

N = 8  # max_entities of the registered env
ENV = EntityNavigation(max_entities=N)  # one instance, so gymnax's jitted `step` compiles once for all tests
_reset_batch = jax.jit(jax.vmap(ENV.reset, in_axes=(0, None)))
_step_env = jax.jit(ENV.step_env)
_step = ENV.step  # jitted by gymnax (static self)


def _act(a: int) -> jax.Array:
    """Actions as int32 arrays, so every call hits the same compiled step."""
    return jnp.asarray(a, jnp.int32)


def _np(tree):
    return jax.tree.map(np.asarray, tree)


def _stack(params_list):
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *params_list)


def _index(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def _check_obs(obs: np.ndarray, state, num_entities: int) -> None:
    """The layout of one observation [N, 4], checked against the state with numpy."""
    obs = np.asarray(obs)
    assert obs.shape == (N, 4) and obs.dtype == np.float32
    present = obs[:, 0]
    assert set(np.unique(present)) <= {0.0, 1.0}
    assert present.sum() == num_entities
    np.testing.assert_array_equal(present.astype(bool), np.asarray(state.present))
    np.testing.assert_array_equal(np.asarray(entity_mask(obs)), present.astype(bool))
    goal = obs[:, 1]
    assert goal.sum() == 1.0 and set(np.unique(goal)) <= {0.0, 1.0}
    goal_slot = int(np.argmax(goal))
    assert goal_slot == int(state.goal_index) and present[goal_slot] == 1.0
    padding = present == 0.0
    assert np.all(obs[padding] == 0.0)
    want = np.asarray(state.entities, np.float64) - np.asarray(state.agent, np.float64)[None, :]
    np.testing.assert_allclose(obs[~padding, 2:], want[~padding], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Reset: observation layout
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_entities", [1, 4, 8])
def test_reset_observation_layout(num_entities: int) -> None:
    params = EntityNavParams(num_entities=num_entities, goal_radius=0.5)  # a wide radius tests the goal placement
    keys = jax.random.split(jax.random.PRNGKey(num_entities), 256)
    obs, state = _reset_batch(keys, params)
    assert obs.shape == (256, N, 4) and obs.dtype == jnp.float32
    space = ENV.observation_space(params)
    assert tuple(space.shape) == (N, 4)
    obs, state = np.asarray(obs), _np(state)
    assert np.all(obs >= np.asarray(space.low)) and np.all(obs <= np.asarray(space.high))
    assert np.all(np.abs(state.agent) <= 1.0) and np.all(np.abs(state.entities) <= 1.0)
    assert np.all(state.time == 0)
    goal_xy = state.entities[np.arange(256), state.goal_index]
    assert np.all(np.linalg.norm(goal_xy - state.agent, axis=-1) >= 0.5)  # never starts at the goal
    for i in range(256):
        _check_obs(obs[i], _index(state, i), num_entities)
    # Deterministic per key; different keys give different episodes.
    again, _ = _reset_batch(keys, params)
    np.testing.assert_array_equal(np.asarray(again), obs)
    assert not np.array_equal(obs[0], obs[1])


def test_entity_mask_convention() -> None:
    obs = np.zeros((2, 3, N, 4), np.float32)
    obs[0, 1, [2, 5], 0] = 1.0
    obs[1, 2, 0, 0] = 1.0
    obs[1, 2, 1, 2:] = 0.7  # padding features other than 0 do not count
    mask = entity_mask(obs)
    assert mask.shape == (2, 3, N) and mask.dtype == jnp.bool_
    want = np.zeros((2, 3, N), bool)
    want[0, 1, [2, 5]] = True
    want[1, 2, 0] = True
    np.testing.assert_array_equal(np.asarray(mask), want)
    assert "entity_mask" in entities.__all__


def test_max_entities_is_validated_and_sets_the_shape() -> None:
    env = EntityNavigation(max_entities=3)
    params = EntityNavParams(num_entities=2)
    obs, _ = env.reset(jax.random.PRNGKey(0), params)
    assert obs.shape == (3, 4) and int(np.asarray(obs)[:, 0].sum()) == 2
    # num_entities beyond max_entities is clipped to it.
    obs, _ = env.reset(jax.random.PRNGKey(0), params.replace(num_entities=7))
    assert int(np.asarray(obs)[:, 0].sum()) == 3
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="max_entities"):
            EntityNavigation(max_entities=bad)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Step: by hand
# ----------------------------------------------------------------------------------------------
def _state(agent, slots: dict[int, tuple[float, float]], goal_index: int, time: int = 0) -> EntityNavState:
    entities_xy = np.full((N, 2), 0.9, np.float32)
    entities_xy[0] = (0.1, 0.0)  # an absent slot right on the agent's path: must never cost anything
    present = np.zeros(N, bool)
    for slot, xy in slots.items():
        entities_xy[slot] = xy
        present[slot] = True
    return EntityNavState(
        agent=jnp.asarray(agent, jnp.float32),
        entities=jnp.asarray(entities_xy),
        present=jnp.asarray(present),
        goal_index=jnp.asarray(goal_index, jnp.int32),
        time=jnp.asarray(time, jnp.int32),
    )


def test_actions_move_and_clip() -> None:
    params = EntityNavParams(step_size=0.25)
    state = _state((0.0, 0.0), {3: (-0.8, -0.8)}, goal_index=3)
    want = {0: (0.0, 0.0), 1: (0.0, 0.25), 2: (0.0, -0.25), 3: (-0.25, 0.0), 4: (0.25, 0.0)}
    for action, xy in want.items():
        _, new, *_ = _step_env(jax.random.PRNGKey(0), state, _act(action), params)
        np.testing.assert_allclose(np.asarray(new.agent), xy, atol=1e-7)
        assert int(new.time) == 1
    edge = _state((0.9, -0.95), {3: (-0.8, -0.8)}, goal_index=3)
    _, new, *_ = _step_env(jax.random.PRNGKey(0), edge, _act(4), params)  # +x past the wall
    np.testing.assert_allclose(np.asarray(new.agent), (1.0, -0.95), atol=1e-7)
    _, new, *_ = _step_env(jax.random.PRNGKey(0), edge, _act(2), params)  # -y past the wall
    np.testing.assert_allclose(np.asarray(new.agent), (0.9, -1.0), atol=1e-7)
    assert ENV.num_actions == 5 and ENV.action_space(params).n == 5


def test_hand_computed_rewards_termination_and_distractor_penalty() -> None:
    params = EntityNavParams(shaping_scale=2.0, goal_reward=1.5, distractor_penalty=0.5, goal_radius=0.1)
    # Agent at the origin, goal in slot 2 at (0.25, 0), a distractor in slot 5 at (0.1, 0.05).
    state = _state((0.0, 0.0), {2: (0.25, 0.0), 5: (0.1, 0.05)}, goal_index=2)

    # +x: agent (0.1, 0); d 0.25 -> 0.15; the distractor is 0.05 away (touched), the absent slot 0 at
    # (0.1, 0) is not counted. r = 2 * (0.25 - 0.15) - 0.5 = -0.3.
    obs, state1, reward, terminated, truncated, info = _step(jax.random.PRNGKey(1), state, _act(4), params)
    np.testing.assert_allclose(np.asarray(state1.agent), (0.1, 0.0), atol=1e-7)
    assert float(reward) == pytest.approx(2.0 * (0.25 - 0.15) - 0.5, abs=1e-6)
    assert not bool(terminated) and not bool(truncated)
    np.testing.assert_allclose(np.asarray(obs)[2], (1.0, 1.0, 0.15, 0.0), atol=1e-6)
    np.testing.assert_allclose(np.asarray(obs)[5], (1.0, 0.0, 0.0, 0.05), atol=1e-6)
    assert np.all(np.asarray(obs)[0] == 0.0)

    # +x again: agent (0.2, 0), d = 0.05 < 0.1: the goal is reached. The distractor is
    # sqrt(0.1^2 + 0.05^2) = 0.112 away (not touched). r = 2 * (0.15 - 0.05) + 1.5 = 1.7; terminates
    # and auto-resets (the final observation is the pre-reset one).
    obs, state2, reward, terminated, truncated, info = _step(jax.random.PRNGKey(2), state1, _act(4), params)
    assert float(reward) == pytest.approx(2.0 * (0.15 - 0.05) + 1.5, abs=1e-6)
    assert bool(terminated) and not bool(truncated)
    assert float(info["discount"]) == 0.0
    np.testing.assert_allclose(np.asarray(info["final_observation"])[2], (1.0, 1.0, 0.05, 0.0), atol=1e-6)
    assert int(state2.time) == 0  # reset
    _check_obs(obs, state2, int(params.num_entities))

    # Moving away from the goal: stay at the distractor costs the penalty; -x from (0.1, 0) costs shaping.
    _, _, reward, terminated, *_ = _step(jax.random.PRNGKey(3), state1, _act(0), params)
    assert float(reward) == pytest.approx(-0.5, abs=1e-6) and not bool(terminated)
    _, _, reward, *_ = _step(jax.random.PRNGKey(3), state1, _act(3), params)
    assert float(reward) == pytest.approx(2.0 * (0.15 - 0.25), abs=1e-6)

    # The penalty is per touched distractor: two distractors on the agent cost twice.
    crowded = _state((0.0, 0.0), {2: (0.8, 0.8), 4: (0.02, 0.0), 6: (0.0, 0.03)}, goal_index=2)
    _, _, reward, *_ = _step(jax.random.PRNGKey(4), crowded, _act(0), params)
    assert float(reward) == pytest.approx(-1.0, abs=1e-6)
    # Default params: no penalty, shaping scale 1, goal reward 1.
    _, _, reward, *_ = _step(jax.random.PRNGKey(4), crowded, _act(0), ENV.default_params)
    assert float(reward) == 0.0
    assert bool(ENV.is_terminated(state2.replace(agent=state2.entities[state2.goal_index]), params))


def test_truncation_at_max_steps() -> None:
    params = EntityNavParams(max_steps_in_episode=5)
    state = _state((0.0, 0.0), {2: (0.9, 0.9)}, goal_index=2, time=4)
    _, new, _, terminated, truncated, info = _step(jax.random.PRNGKey(0), state, _act(0), params)
    assert bool(truncated) and not bool(terminated) and float(info["discount"]) == 1.0
    assert int(new.time) == 0


# ----------------------------------------------------------------------------------------------
# The slot permutation
# ----------------------------------------------------------------------------------------------
def test_goal_slot_and_present_slots_are_spread_over_slots() -> None:
    params = EntityNavParams(num_entities=3)
    keys = jax.random.split(jax.random.PRNGKey(7), 256)
    obs, state = _reset_batch(keys, params)
    goal_slots = np.asarray(state.goal_index)
    np.testing.assert_array_equal(goal_slots, np.argmax(np.asarray(obs)[:, :, 1], axis=1))
    counts = np.bincount(goal_slots, minlength=N)
    assert counts.min() >= 16, counts  # expected 32 per slot
    present_counts = np.asarray(state.present).sum(axis=0)  # expected 256 * 3 / 8 = 96 per slot
    assert present_counts.min() >= 60 and present_counts.max() <= 132, present_counts
    # Given the present set, the goal is any of the present entities (not e.g. always the lowest slot).
    lowest_present = np.argmax(np.asarray(state.present), axis=1)
    assert 0.2 < np.mean(goal_slots == lowest_present) < 0.5  # expected 1/3


# ----------------------------------------------------------------------------------------------
# jit / vmap over keys and params
# ----------------------------------------------------------------------------------------------
def test_vmap_over_keys_and_params_equals_a_python_loop() -> None:
    params_list = [
        EntityNavParams(num_entities=1, step_size=0.1),
        EntityNavParams(num_entities=3, step_size=0.2, distractor_penalty=0.3),
        EntityNavParams(num_entities=8, goal_radius=0.3, shaping_scale=0.5),
        EntityNavParams(num_entities=5, goal_reward=2.0, max_steps_in_episode=2),
    ]
    batch = _stack(params_list)
    keys = jax.random.split(jax.random.PRNGKey(11), 4)
    step_keys = jax.random.split(jax.random.PRNGKey(12), 4)
    actions = jnp.array([1, 4, 3, 0], jnp.int32)

    @jax.jit
    def batched(keys, step_keys, actions, params):
        obs, state = jax.vmap(ENV.reset)(keys, params)
        out = jax.vmap(ENV.step)(step_keys, state, actions, params)
        return obs, state, out

    obs_b, state_b, out_b = batched(keys, step_keys, actions, batch)
    for i, params in enumerate(params_list):
        obs, state = ENV.reset(keys[i], params)
        out = _step(step_keys[i], state, actions[i], params)
        _check_obs(obs, state, params.num_entities)
        for got, want in zip(jax.tree.leaves((obs_b, state_b, out_b)), jax.tree.leaves((obs, state, out))):
            np.testing.assert_allclose(np.asarray(got[i]), np.asarray(want), atol=1e-6)
    assert list(np.asarray(obs_b)[:, :, 0].sum(axis=1)) == [1, 3, 8, 5]


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------
def test_make_registry_and_static_table() -> None:
    env, params = envs.make("EntityNavigation-v0", num_entities=6)
    assert isinstance(env, EntityNavigation) and env.max_entities == N
    assert params.num_entities == 6 and params.max_steps_in_episode == 50
    assert env.name == "EntityNavigation-v0"
    obs, _ = _reset_batch(jax.random.split(jax.random.PRNGKey(0), 256), params)  # ENV: the same shapes
    assert np.all(np.asarray(obs)[:, :, 0].sum(axis=1) == 6)
    _, default = envs.make("EntityNavigation-v0")
    assert default.num_entities == 4
    with pytest.raises(ValueError, match=r"Unknown parameter\(s\) \['n_entities'\].*num_entities"):
        envs.make("EntityNavigation-v0", n_entities=6)
    assert "EntityNavigation-v0" in envs.list_envs()
    assert env_table.known_envs()["EntityNavigation-v0"] is True
    assert envs.has_discrete_actions("EntityNavigation-v0")
    # The CLI's check reads the static table, without importing rlcx_jax.envs (or jax).
    code = (
        "import sys\nfrom rlcx_jax.configs import envs\n"
        "envs.check_env_name('EntityNavigation-v0')\n"
        "print(envs.known_envs()['EntityNavigation-v0'], 'rlcx_jax.envs' in sys.modules, 'jax' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False", "False"]


# ----------------------------------------------------------------------------------------------
# Random rollout
# ----------------------------------------------------------------------------------------------
def test_random_rollout_scan_no_nans_and_auto_resets() -> None:
    env = ENV
    counts = [1, 2, 6, 8]
    params = _stack([EntityNavParams(num_entities=n, distractor_penalty=0.1) for n in counts])
    num_envs, num_steps = len(counts), 200

    @jax.jit
    def run(key):
        key_reset, key_run = jax.random.split(key)
        obs, state = jax.vmap(env.reset)(jax.random.split(key_reset, num_envs), params)

        def body(carry, key):
            state = carry
            key_act, key_step = jax.random.split(key)
            actions = jax.random.randint(key_act, (num_envs,), 0, env.num_actions)
            obs, state, reward, terminated, truncated, _ = jax.vmap(env.step)(
                jax.random.split(key_step, num_envs), state, actions, params
            )
            return state, (obs, reward, terminated, truncated, state.time)

        _, traj = jax.lax.scan(body, state, jax.random.split(key_run, num_steps))
        return traj

    obs, reward, terminated, truncated, time = (np.asarray(x) for x in run(jax.random.PRNGKey(5)))
    assert obs.shape == (num_steps, num_envs, N, 4)
    assert np.all(np.isfinite(obs)) and np.all(np.isfinite(reward))
    done = terminated | truncated
    assert np.all(time[done] == 0) and np.all(time[~done] > 0)  # auto-reset exactly at episode ends
    assert np.all(truncated.sum(axis=0) >= 1)  # 200 random steps cross the 50-step limit
    assert np.all(time <= 50)
    np.testing.assert_array_equal(obs[..., 0].sum(axis=-1), np.broadcast_to(counts, (num_steps, num_envs)))
    np.testing.assert_array_equal(obs[..., 1].sum(axis=-1), 1.0)
    assert np.all(np.abs(obs[..., 2:]) <= 2.0)


@pytest.mark.parametrize("n", [0, 9, -1])
def test_entity_count_out_of_range_fails_in_one_line_when_the_env_is_made(n: int) -> None:
    with pytest.raises(ValueError, match=r"num_entities must be in \[1, 8\]") as err:
        envs.make("EntityNavigation-v0", num_entities=n)
    assert "\n" not in str(err.value)
