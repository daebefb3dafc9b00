"""Task families for meta-learning: sampling, validation, the point-navigation dynamics, tasks that
persist across auto-resets, vmap over tasks, and the analytic oracle.

Fast by design: small batches, and one jitted function per family and test.
"""

from __future__ import annotations

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlcx_jax import envs
from rlcx_jax.configs import tasks as task_table
from rlcx_jax.envs import tasks
from rlcx_jax.rl import rollout

FAMILIES = list(task_table.FAMILY_NAMES)
N = 16


def _leaves_equal(a, b) -> bool:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _index(tree, *idx):
    return jax.tree.map(lambda x: x[idx], tree)


def _field_values(family: tasks.TaskFamily, batch) -> dict[str, np.ndarray]:
    """The family's fields read back from a batch of EnvParams (inverse of the family's mapping)."""
    name = family.name
    if name == "point-nav-uniform":
        goal = np.asarray(batch.goal)
        return {"goal_x": goal[..., 0], "goal_y": goal[..., 1]}
    if name in ("point-nav-circle", "point-nav-sparse"):
        goal = np.asarray(batch.goal, np.float64)
        return {"angle": np.mod(np.arctan2(goal[..., 1], goal[..., 0]), 2 * np.pi)}
    if name == "cartpole-flip":
        return {"force_sign": np.sign(np.asarray(batch.force_mag))}
    if name == "meta-maze":
        goal = np.asarray(batch.goal)
        return {"goal_row": goal[..., 0], "goal_col": goal[..., 1]}
    return {field: np.asarray(getattr(batch, field)) for field in family.spec.fields}


# ----------------------------------------------------------------------------------------------
# The jax-free table
# ----------------------------------------------------------------------------------------------
def test_family_table_imports_without_jax_or_numpy():
    code = (
        "import sys\nfrom rlcx_jax.configs import tasks\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'gymnax', 'numpy', 'optax')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_family_table():
    assert tuple(task_table.FAMILIES) == task_table.FAMILY_NAMES == tuple(FAMILIES)
    assert len(FAMILIES) == 9
    cartpole = task_table.FAMILIES["cartpole"]
    assert cartpole.ranges == (
        ("length", 0.25, 1.0),
        ("masspole", 0.05, 0.5),
        ("masscart", 0.5, 2.0),
        ("force_mag", 5.0, 15.0),
    )
    assert set(cartpole.positive) == {"length", "masspole", "masscart", "force_mag"}
    assert task_table.FAMILIES["point-nav-circle"].ranges == (("angle", 0.0, 2 * math.pi),)
    assert task_table.FAMILIES["point-nav-sparse"].setting("sparse_radius") == 0.2
    assert task_table.FAMILIES["meta-maze"].ranges == () and task_table.FAMILIES["cartpole-flip"].ranges == ()
    for spec in task_table.FAMILIES.values():
        assert set(spec.positive) <= set(spec.fields)
        assert spec.env_id in envs.list_envs()
        assert "\n" not in spec.description and spec.description


def test_parse_ranges_applies_overrides_in_family_order():
    got = task_table.parse_ranges("cartpole", ("force_mag=8:12", " length = 0.5:1.5"))
    assert got == (("length", 0.5, 1.5), ("masspole", 0.05, 0.5), ("masscart", 0.5, 2.0), ("force_mag", 8.0, 12.0))
    assert task_table.parse_ranges("pendulum", ()) == task_table.FAMILIES["pendulum"].ranges
    assert task_table.parse_ranges("bandit", ("arm_prob=0:0.3",)) == (("arm_prob", 0.0, 0.3),)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_sampling_is_deterministic_per_key_and_inside_the_ranges(name):
    family = tasks.make_family(name)
    sample = family.sample  # eager here; under jit and vmap below and in test_nested_vmap_seeds_by_tasks
    a, a_again, b = sample(jax.random.PRNGKey(0), N), sample(jax.random.PRNGKey(0), N), sample(jax.random.PRNGKey(1), N)
    assert _leaves_equal(a, a_again)
    assert not _leaves_equal(a, b)
    for leaf in jax.tree.leaves(a):
        assert leaf.shape[0] == N
    # Every leaf has the dtype and trailing shape of one concrete task.
    one = family.task()
    assert jax.tree.structure(one) == jax.tree.structure(a)
    for x, y in zip(jax.tree.leaves(one), jax.tree.leaves(a)):
        assert x.dtype == y.dtype and x.shape == y.shape[1:]
    values = _field_values(family, a)
    for field, low, high in family.ranges:
        v = values[field]
        assert np.all(v >= np.float32(low) - 1e-6) and np.all(v <= np.float32(high) + 1e-6), (field, v)
        assert np.unique(v).size == N  # independent draws, not one value broadcast
    # Fields that are not sampled keep the base value.
    base = jax.tree.map(np.asarray, family.task())
    sampled_params = {"goal", "force_mag", "total_mass", "polemass_length"} | set(family.spec.fields)
    for field in family.base_params.__dataclass_fields__:
        if field not in sampled_params:
            np.testing.assert_array_equal(np.asarray(getattr(a, field))[0], getattr(base, field), err_msg=field)


@pytest.mark.parametrize("name", ["cartpole", "meta-maze"])
def test_sampling_under_jit_and_vmap_over_keys(name):
    family = tasks.make_family(name)
    key = jax.random.PRNGKey(2)
    assert _leaves_equal(jax.jit(family.sample, static_argnums=1)(key, 4), family.sample(key, 4))
    keys = jax.random.split(key, 3)
    batched = jax.jit(jax.vmap(lambda k: family.sample(k, 4)))(keys)
    for leaf in jax.tree.leaves(batched):
        assert leaf.shape[:2] == (3, 4)
    assert _leaves_equal(_index(batched, 1), family.sample(keys[1], 4))  # each row is that key's sample


def test_family_specific_sampling():
    key = jax.random.PRNGKey(3)
    circle = tasks.make_family("point-nav-circle").sample(key, 64)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(circle.goal), axis=-1), 0.5, rtol=1e-6)
    assert np.all(np.asarray(circle.sparse_radius) == 0.0)
    sparse = tasks.make_family("point-nav-sparse").sample(key, 8)
    assert np.allclose(np.asarray(sparse.sparse_radius), 0.2)
    assert np.all(np.asarray(sparse.max_steps_in_episode) == 100)
    family = tasks.make_family("meta-maze")
    maze = family.sample(key, 256)
    cells = {tuple(c) for c in np.asarray(maze.goal).tolist()}
    open_cells = {tuple(c) for c in np.asarray(family.env.coords).tolist()}
    assert cells <= open_cells and len(cells) > len(open_cells) // 2  # 256 draws over 65 cells
    assert np.asarray(maze.goal).dtype == np.int32
    narrow = tasks.make_family("cartpole", ("length=2:3",)).sample(key, 32)
    assert np.all((np.asarray(narrow.length) >= 2.0) & (np.asarray(narrow.length) <= 3.0))
    assert np.all(np.asarray(narrow.max_steps_in_episode) == 200)


def test_cartpole_tasks_are_physically_consistent():
    family = tasks.make_family("cartpole")
    batch = family.sample(jax.random.PRNGKey(4), 32)
    masscart, masspole, length = (np.asarray(x) for x in (batch.masscart, batch.masspole, batch.length))
    np.testing.assert_allclose(batch.total_mass, masscart + masspole, rtol=1e-6)
    np.testing.assert_allclose(batch.polemass_length, masspole * length, rtol=1e-6)
    one = family.task(length=0.8, masspole=0.2)
    assert float(one.length) == np.float32(0.8) and float(one.masscart) == 1.0  # masscart: the base value
    np.testing.assert_allclose(float(one.total_mass), 1.2, rtol=1e-6)
    np.testing.assert_allclose(float(one.polemass_length), 0.16, rtol=1e-6)
    assert int(one.max_steps_in_episode) == 200

    flip = tasks.make_family("cartpole-flip")
    forces = np.asarray(flip.sample(jax.random.PRNGKey(5), 64).force_mag)
    assert set(forces.tolist()) == {-10.0, 10.0}
    assert float(flip.task(force_sign=-1).force_mag) == -10.0
    flipped = flip.task(force_sign=-1)
    np.testing.assert_allclose(float(flipped.total_mass), 1.1, rtol=1e-6)
    np.testing.assert_allclose(float(flipped.polemass_length), 0.05, rtol=1e-6)
    # The flip reverses the push: action 1 accelerates the cart to the left.
    env = flip.env
    obs, state = env.reset(jax.random.PRNGKey(0), flipped)
    state = state.replace(x=0.0, x_dot=0.0, theta=0.0, theta_dot=0.0)
    x_dots = [float(env.step_env(jax.random.PRNGKey(0), state, 1, task)[1].x_dot) for task in (flip.task(), flipped)]
    assert x_dots[0] > 0 > x_dots[1] and x_dots[0] == pytest.approx(-x_dots[1])


def test_task_from_values():
    nav = tasks.make_family("point-nav-uniform")
    np.testing.assert_allclose(nav.task(goal_x=0.1, goal_y=-0.2).goal, [0.1, -0.2], rtol=1e-6)
    np.testing.assert_allclose(nav.task(goal_x=0.1).goal, [0.1, -0.4], rtol=1e-6)  # goal_y from the base
    circle = tasks.make_family("point-nav-circle").task(angle=math.pi / 2)
    np.testing.assert_allclose(circle.goal, [0.0, 0.5], atol=1e-6)
    np.testing.assert_allclose(tasks.make_family("point-nav-circle").task().goal, [0.3, -0.4], atol=1e-6)
    assert float(tasks.make_family("point-nav-sparse").task().sparse_radius) == np.float32(0.2)
    assert float(tasks.make_family("bandit").task(arm_prob=0.7).arm_prob) == np.float32(0.7)
    pend = tasks.make_family("pendulum").task(m=1.3)
    assert (float(pend.m), float(pend.l)) == (np.float32(1.3), 1.0)
    np.testing.assert_array_equal(tasks.make_family("meta-maze").task(goal_row=9, goal_col=3).goal, [9, 3])
    ac = tasks.make_family("acrobot").task(link_mass_2=0.7)
    assert float(ac.link_mass_2) == np.float32(0.7) and ac.available_torque.shape == (3,)


# ----------------------------------------------------------------------------------------------
# Refused values: one-line errors
# ----------------------------------------------------------------------------------------------
REFUSED = [
    (lambda: task_table.parse_ranges("cartpole", ("masspole=-0.1:0.5",)), r"masspole must be > 0, got range -0.1:0.5"),
    (lambda: task_table.parse_ranges("cartpole", ("length=0:1",)), r"length must be > 0, got range 0:1"),
    (lambda: task_table.parse_ranges("cartpole", ("length=1:0.5",)), r"length range 1:0.5 has low > high"),
    (
        lambda: task_table.parse_ranges("cartpole", ("lenght=0.2:1",)),
        r"Unknown field 'lenght' for task family 'cartpole'\. Did you mean 'length'\?.*length, masspole, masscart, force_mag",
    ),
    (
        lambda: task_table.parse_ranges("cartpole", ("length=0.2",)),
        r"Bad task range 'length=0.2': expected field=low:high",
    ),
    (lambda: task_table.parse_ranges("cartpole", ("length0.2:1",)), r"Bad task range"),
    (lambda: task_table.parse_ranges("cartpole", ("length=a:1",)), r"low and high must be numbers"),
    (lambda: task_table.parse_ranges("cartpole", ("length=0.1:inf",)), r"length range must be finite"),
    (lambda: task_table.parse_ranges("cartpole", ("length=0.1:1", "length=0.2:1")), r"given twice"),
    (
        lambda: task_table.parse_ranges("bandit", ("arm_prob=0.5:1.5",)),
        r"arm_prob must lie in \[0, 1\], got range 0.5:1.5",
    ),
    (lambda: task_table.parse_ranges("meta-maze", ("goal_row=1:3",)), r"Task family 'meta-maze' has no sampled fields"),
    (lambda: task_table.check_family("cartpol"), r"Unknown task family 'cartpol'\. Did you mean 'cartpole'"),
    (lambda: tasks.make_family("pendulm"), r"Unknown task family 'pendulm'\. Did you mean 'pendulum'\?"),
    (lambda: tasks.make_family("pendulum", ("m=-1:1",)), r"m must be > 0, got range -1:1"),
    (lambda: tasks.make_family("cartpole").task(masspole=-0.1), r"masspole must be > 0, got -0.1"),
    (lambda: tasks.make_family("cartpole").task(length=0.0), r"length must be > 0, got 0"),
    (lambda: tasks.make_family("cartpole").task(length=math.nan), r"length must be finite"),
    (lambda: tasks.make_family("acrobot").task(link_mass_1=-2.0), r"link_mass_1 must be > 0, got -2"),
    (
        lambda: tasks.make_family("cartpole").task(gravity=3.0),
        r"Unknown field 'gravity' for task family 'cartpole'.*Its task fields: length, masspole, masscart, force_mag",
    ),
    (lambda: tasks.make_family("bandit").task(arm_prob=1.5), r"arm_prob must lie in \[0, 1\], got 1.5"),
    (lambda: tasks.make_family("cartpole-flip").task(force_sign=0.5), r"force_sign must be one of -1, 1, got 0.5"),
    (lambda: tasks.make_family("meta-maze").task(goal_row=2, goal_col=2), r"\(2, 2\) is a wall"),
    (lambda: tasks.make_family("meta-maze").task(goal_row=1.5), r"goal_row must be a whole number"),
    (lambda: tasks.make_family("meta-maze").task(goal_row=0), r"goal_row must lie in \[1, 9\]"),
    (lambda: tasks.make_family("point-nav-uniform").task(goal_x="0.1"), r"goal_x must be a number"),
]


@pytest.mark.parametrize("case", range(len(REFUSED)))
def test_refused_values_one_line(case):
    call, pattern = REFUSED[case]
    with pytest.raises(ValueError, match=pattern) as info:
        call()
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# Point navigation dynamics
# ----------------------------------------------------------------------------------------------
def test_point_navigation_hand_computed_step():
    env = tasks.PointNavigation()
    step = jax.jit(env.step)
    key = jax.random.PRNGKey(0)
    dense = tasks.PointNavParams(goal=jnp.array([0.3, -0.4], jnp.float32))
    obs, state = env.reset(key, dense)
    np.testing.assert_array_equal(obs, [0.0, 0.0])
    assert obs.dtype == jnp.float32 and env.observation_space(dense).shape == (2,)
    np.testing.assert_array_equal(env.reset(jax.random.PRNGKey(9), dense)[0], obs)  # deterministic reset
    action = jnp.array([0.3, -0.05], jnp.float32)  # x clipped to 0.1
    obs, state, reward, term, trunc, info = step(key, state, action, dense)
    np.testing.assert_allclose(obs, [0.1, -0.05], atol=1e-7)
    np.testing.assert_allclose(reward, -math.hypot(0.1 - 0.3, -0.05 + 0.4), rtol=1e-6)
    assert not bool(term) and not bool(trunc) and int(state.time) == 1
    # A second step accumulates: (0.1, -0.05) + (-0.1, 0.1) (both clipped).
    obs, *_ = step(key, state, jnp.array([-1.0, 1.0], jnp.float32), dense)
    np.testing.assert_allclose(obs, [0.0, 0.05], atol=1e-7)
    # Sparse: 0 outside the radius, radius - d inside.
    _, state = env.reset(key, dense)
    far = tasks.PointNavParams(goal=jnp.array([0.3, -0.4], jnp.float32), sparse_radius=0.2)
    assert float(step(key, state, action, far)[2]) == 0.0
    near = tasks.PointNavParams(goal=jnp.array([0.1, 0.0], jnp.float32), sparse_radius=0.2)
    np.testing.assert_allclose(step(key, state, action, near)[2], 0.2 - 0.05, rtol=1e-6)
    np.testing.assert_allclose(tasks.point_nav_reward(jnp.float32(0.5), 0.0), -0.5)
    space = env.action_space(dense)
    assert (space.shape, float(space.low), float(space.high)) == ((2,), -0.1, 0.1)


def test_oracle_return_hand_computed():
    nav = tasks.make_family("point-nav-uniform")
    # Rewards -0.4, -0.3, -0.2, -0.1, then 0 for the remaining 96 steps.
    assert nav.oracle_return(nav.task(goal_x=0.5, goal_y=0.0)) == pytest.approx(-1.0, abs=1e-6)
    # Goal (0.25, -0.05): p = (0.1, -0.05), (0.2, -0.05), (0.25, -0.05): rewards -0.15, -0.05, 0.
    assert nav.oracle_return(nav.task(goal_x=0.25, goal_y=-0.05)) == pytest.approx(-0.2, abs=1e-6)
    sparse = tasks.make_family("point-nav-sparse")
    # Goal (0.5, 0): distances 0.4, 0.3, 0.2, 0.1, then 0 for 96 steps: rewards 0, 0, 0, 0.1, 0.2 x 96.
    assert sparse.oracle_return(sparse.task(angle=0.0)) == pytest.approx(0.1 + 0.2 * 96, abs=1e-5)
    assert tasks.make_family("cartpole").oracle_return(tasks.make_family("cartpole").task()) is None
    with pytest.raises(ValueError, match="one task"):
        nav.oracle_return(nav.sample(jax.random.PRNGKey(0), 2))


def _play_point_nav(batch, policy, num_steps):
    """Run every task of `batch` (vmapped) for num_steps auto-resetting steps with policy(obs, goal) ->
    action; returns per-step (obs, reward, done), each [tasks, num_steps, ...]."""
    env = tasks.PointNavigation()

    def run(task, key):
        obs, state = env.reset(key, task)

        def body(carry, k):
            obs, state = carry
            obs2, state, reward, term, trunc, info = env.step(k, state, policy(obs, task.goal), task)
            return (obs2, state), (obs, reward, jnp.logical_or(term, trunc))

        return jax.lax.scan(body, (obs, state), jax.random.split(key, num_steps))[1]

    outs = jax.jit(jax.vmap(run))(batch, jax.random.split(jax.random.PRNGKey(0), jax.tree.leaves(batch)[0].shape[0]))
    return tuple(np.asarray(x) for x in outs)


def _first_episode_return(rewards, done):
    """Sum of each row's rewards up to and including its first episode end (NumPy)."""
    ended_before = np.cumsum(done, axis=1) - done
    return np.sum(rewards * (ended_before == 0), axis=1)


def test_point_navigation_terminates_within_the_goal_tolerance():
    """max_i |p_i - g_i| < goal_tolerance ends the episode; goal_tolerance = 0 never does."""
    env = tasks.PointNavigation()
    key = jax.random.PRNGKey(0)
    _, state = env.reset(key, env.default_params)
    action = jnp.array([0.1, 0.0], jnp.float32)  # -> p = (0.1, 0)
    near = tasks.PointNavParams(goal=jnp.array([0.105, -0.008], jnp.float32), goal_tolerance=0.01)
    obs, _, reward, term, trunc, _ = env.step(key, state, action, near)
    assert bool(term) and not bool(trunc)
    np.testing.assert_array_equal(obs, [0.0, 0.0])  # auto-reset to the origin
    np.testing.assert_allclose(reward, -math.hypot(0.005, 0.008), rtol=1e-5)
    off_axis = near.replace(goal=jnp.array([0.105, -0.011], jnp.float32))  # y is 0.011 away
    assert not bool(env.step(key, state, action, off_axis)[3])
    assert not bool(env.step(key, state, action, near.replace(goal_tolerance=0.0))[3])
    assert float(tasks.make_family("point-nav-uniform").base_params.goal_tolerance) == np.float32(0.01)
    assert float(tasks.make_family("point-nav-sparse").base_params.goal_tolerance) == 0.0


def test_oracle_return_matches_a_rollout_and_standing_still_matches_maml():
    """The oracle policy in the environment earns `oracle_return`; standing still on the uniform family
    earns -100 E||g|| = -38.3, MAML's "standing still" reference (docs/architecture.md)."""
    nav = tasks.make_family("point-nav-uniform")
    batch = nav.sample(jax.random.PRNGKey(6), 512)
    oracle = lambda obs, goal: jnp.clip(goal - obs, -0.1, 0.1)
    _, rewards, done = _play_point_nav(batch, oracle, 100)
    returns = _first_episode_return(rewards, done)
    assert np.all(done.any(axis=1))  # the oracle reaches every goal within the horizon
    for i in range(4):
        assert returns[i] == pytest.approx(nav.oracle_return(_index(batch, i)), abs=1e-4)
    _, still, done = _play_point_nav(batch, lambda obs, goal: jnp.zeros(2), 100)
    goal = np.asarray(batch.goal)
    at_goal = np.max(np.abs(goal), axis=1) < 0.01  # the origin is within the tolerance: one step
    expected = -np.linalg.norm(goal, axis=1) * np.where(at_goal, 1, 100)
    np.testing.assert_allclose(_first_episode_return(still, done), expected, rtol=1e-5)
    assert expected.mean() == pytest.approx(-38.3, abs=1.5)
    assert -1.0 < returns.mean() < 0.0  # the oracle is far better than standing still


# ----------------------------------------------------------------------------------------------
# The task persists across auto-resets
# ----------------------------------------------------------------------------------------------
def test_point_nav_goal_persists_across_episodes():
    toward = lambda obs, goal: jnp.clip(goal - obs, -0.1, 0.1)
    # Sparse family (no termination): 100-step episodes, the second replays the first.
    sparse = tasks.make_family("point-nav-sparse").sample(jax.random.PRNGKey(7), 3)
    obs, rewards, done = _play_point_nav(sparse, toward, 130)
    assert np.all(np.flatnonzero(done[0]) == [99])
    np.testing.assert_array_equal(obs[:, 100], 0.0)  # reset to the origin
    np.testing.assert_allclose(rewards[:, 100:130], rewards[:, :30], rtol=1e-6)
    # Dense circle family: the episode ends on reaching the goal (within 5 steps at radius 0.5), the
    # point restarts at the origin and the next episode replays the first toward the same goal.
    circle = tasks.make_family("point-nav-circle").sample(jax.random.PRNGKey(7), 3)
    obs, rewards, done = _play_point_nav(circle, toward, 30)
    goal = np.asarray(circle.goal)
    steps = np.ceil(np.max(np.abs(goal), axis=1) / 0.1 - 1e-6).astype(int)  # the oracle's episode length
    for i in range(3):
        ends = np.flatnonzero(done[i])
        np.testing.assert_array_equal(ends[:3], [steps[i] - 1, 2 * steps[i] - 1, 3 * steps[i] - 1])
        np.testing.assert_array_equal(obs[i, steps[i]], 0.0)
        np.testing.assert_allclose(rewards[i, steps[i] : 2 * steps[i]], rewards[i, : steps[i]], rtol=1e-6)
    step1 = np.clip(goal, -0.1, 0.1)
    np.testing.assert_allclose(rewards[:, 0], -np.linalg.norm(step1 - goal, axis=1), rtol=1e-5)


def _scan_env(env, batch, num_steps, action_fn):
    """vmap over tasks of `num_steps` auto-resetting steps; returns per-step (state, reward, truncated)."""

    def run(task, key):
        _, state = env.reset(key, task)

        def body(state, k):
            k_act, k_step = jax.random.split(k)
            _, state, reward, _, trunc, _ = env.step(k_step, state, action_fn(k_act), task)
            return state, (state, reward, trunc)

        return jax.lax.scan(body, state, jax.random.split(key, num_steps))[1]

    n = jax.tree.leaves(batch)[0].shape[0]
    return jax.jit(jax.vmap(run))(batch, jax.random.split(jax.random.PRNGKey(1), n))


def test_bandit_arms_persist_across_episodes():
    family = tasks.make_family("bandit")
    batch = jax.tree.map(lambda a, b: jnp.stack([a, b]), family.task(arm_prob=0.1), family.task(arm_prob=0.9))
    states, rewards, trunc = _scan_env(family.env, batch, 400, lambda k: jnp.int32(0))  # always pull arm 0
    trunc = np.asarray(trunc)
    assert np.flatnonzero(trunc[0]).tolist() == [99, 199, 299, 399]
    probs = np.asarray(states.reward_probs)
    np.testing.assert_allclose(probs[0], np.broadcast_to([0.1, 0.9], probs[0].shape), rtol=1e-6)
    np.testing.assert_allclose(probs[1], np.broadcast_to([0.9, 0.1], probs[1].shape), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(states.time)[:, 99], 0.0)  # the state after the auto-reset
    mean = np.asarray(rewards, np.float64).mean(axis=1)  # arm 0 over 4 episodes: its probability
    assert abs(mean[0] - 0.1) < 0.06 and abs(mean[1] - 0.9) < 0.06


def test_maze_goal_persists_across_episodes():
    family = tasks.make_family("meta-maze")
    # Three sampled goals, and one next to the start (the centre, (5, 5)) that a random walk finds.
    batch = jax.tree.map(
        lambda a, b: jnp.concatenate([a, b[None]]),
        family.sample(jax.random.PRNGKey(8), 3),
        family.task(goal_row=5, goal_col=6),
    )
    states, rewards, trunc = _scan_env(family.env, batch, 420, lambda k: jax.random.randint(k, (), 0, 4))
    trunc = np.asarray(trunc)
    assert np.all(trunc[:, 199]) and np.all(trunc[:, 399])
    goals = np.asarray(states.goal)
    np.testing.assert_array_equal(goals, np.broadcast_to(np.asarray(batch.goal)[:, None, :], goals.shape))
    center = np.asarray(family.env.center_position)
    np.testing.assert_array_equal(np.asarray(states.pos)[:, 199], np.broadcast_to(center, (4, 2)))  # reset state
    # Rewards (10 per goal reached) only ever come from a move into the task's goal cell.
    pos, rewards = np.asarray(states.pos), np.asarray(rewards)
    hits = np.argwhere(rewards[:, 1:] > 0) + [0, 1]
    assert len(hits) >= 2 and np.all(rewards[rewards > 0] == 10.0)
    for i, t in hits:
        assert np.abs(pos[i, t - 1] - goals[i, t]).sum() == 1, (i, t)


# ----------------------------------------------------------------------------------------------
# vmap over tasks, and seeds x tasks
# ----------------------------------------------------------------------------------------------
# One family per environment class (the circle and flip families share the classes of these two).
@pytest.mark.parametrize("name", ["point-nav-sparse", "cartpole", "pendulum", "acrobot", "bandit", "meta-maze"])
def test_nested_vmap_seeds_by_tasks(name):
    """Reset and one step, vmapped over seeds x tasks under one jit."""
    family = tasks.make_family(name)
    env = family.env

    def reset_step(key, task):
        k_reset, k_act, k_step = jax.random.split(key, 3)
        _, state = env.reset(k_reset, task)
        action = family.action_space.sample(k_act)
        obs, _, reward, _, _, _ = env.step(k_step, state, action, task)
        return obs, reward

    run = jax.jit(jax.vmap(jax.vmap(reset_step), in_axes=(0, None)))  # seeds x tasks
    batch = family.sample(jax.random.PRNGKey(10), 3)
    keys = jax.random.split(jax.random.PRNGKey(11), 6).reshape(2, 3, -1)
    obs, reward = run(keys, batch)
    assert obs.shape == (2, 3, *family.obs_shape) and reward.shape == (2, 3)
    assert family.discrete == (name in ("cartpole", "cartpole-flip", "acrobot", "bandit", "meta-maze"))
    # Entry [s, i] is seed s on task i: rolling keys and tasks together along the tasks axis rolls the
    # results, and a seed repeated along the seeds axis repeats the row.
    roll = lambda tree: jax.tree.map(lambda x: jnp.roll(x, 1, axis=0), tree)
    obs_r, reward_r = run(jnp.roll(keys, 1, axis=1), roll(batch))
    np.testing.assert_array_equal(obs_r, jnp.roll(obs, 1, axis=1))
    np.testing.assert_array_equal(reward_r, jnp.roll(reward, 1, axis=1))
    obs_s, reward_s = run(jnp.stack([keys[1], keys[1]]), batch)
    np.testing.assert_array_equal(obs_s[0], obs[1])
    np.testing.assert_array_equal(obs_s[1], obs[1])
    np.testing.assert_array_equal(reward_s[0], reward[1])


def test_cartpole_tasks_axis_changes_the_dynamics():
    family = tasks.make_family("cartpole")
    batch = family.sample(jax.random.PRNGKey(12), 4)
    state = family.env.reset(jax.random.PRNGKey(0), family.task())[1].replace(
        x=0.0, x_dot=0.0, theta=0.0, theta_dot=0.0
    )
    step = jax.jit(jax.vmap(family.env.step_env, in_axes=(None, None, None, 0)))
    next_state = step(jax.random.PRNGKey(0), state, 1, batch)[1]
    # From rest, pushing right gives xacc = force_mag / total_mass * (1 + small pole term) > 0, and theta_dot < 0.
    x_dot = np.asarray(next_state.x_dot)
    assert np.unique(x_dot).size == 4 and np.all(x_dot > 0)
    tau = 0.02
    ml, total, length, masspole = (
        np.asarray(x) for x in (batch.polemass_length, batch.total_mass, batch.length, batch.masspole)
    )
    temp = np.asarray(batch.force_mag) / total
    thetaacc = -temp / (length * (4.0 / 3.0 - masspole / total))
    np.testing.assert_allclose(x_dot, tau * (temp - ml * thetaacc / total), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# PointNavigation-v0 in training
# ----------------------------------------------------------------------------------------------
def test_point_navigation_id_with_training_env_and_rollout():
    assert "PointNavigation-v0" in envs.list_envs() and not envs.has_discrete_actions("PointNavigation-v0")
    env, params = envs.make_training_env("PointNavigation-v0")
    np.testing.assert_allclose(params.goal, [0.3, -0.4])
    assert params.max_steps_in_episode == 100 and env.observation_space(params).shape == (2,)

    def policy_fn(key, obs):
        return jnp.zeros((obs.shape[0], 2)), None  # stand still: reward -||g|| = -0.5 every step

    @jax.jit
    def run(key):
        runner = rollout.reset(env, params, key, 2)
        return rollout.collect(env, params, policy_fn, runner, key, 110)

    _, traj = run(jax.random.PRNGKey(0))
    np.testing.assert_allclose(traj.reward, -0.5, rtol=1e-6)
    done = np.asarray(traj.episode.done)
    assert np.flatnonzero(done[:, 0]).tolist() == [99]
    np.testing.assert_allclose(np.asarray(traj.episode.episode_return)[99], -50.0, rtol=1e-5)
    assert np.all(np.asarray(traj.truncated)[99]) and not np.any(np.asarray(traj.terminated))

    # A family's training env, with one vmap of the same rollout over a batch of tasks.
    family = tasks.make_family("point-nav-uniform")
    fenv = family.training_env()
    batch = family.sample(jax.random.PRNGKey(1), 3)

    def per_task(task, key):
        runner = rollout.reset(fenv, task, key, 2)
        return rollout.collect(fenv, task, policy_fn, runner, key, 100)[1].episode.episode_return[-1]

    returns = jax.jit(jax.vmap(per_task))(batch, jax.random.split(jax.random.PRNGKey(2), 3))
    expected = -100 * np.linalg.norm(np.asarray(batch.goal), axis=1)
    np.testing.assert_allclose(returns, np.broadcast_to(expected[:, None], (3, 2)), rtol=1e-5)
