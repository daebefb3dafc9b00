"""Jittable task families for meta-learning (MAML, Reptile, RL^2 style).

A *task* is an environment's `EnvParams` value, an ordinary pytree: the goal of a point robot, the
pole length and masses of a CartPole, the arm probabilities of a bandit. A *family* is a sampler of
tasks: `family.sample(key, n)` returns one `EnvParams` whose every leaf has a leading axis `n`,
deterministic per key, so `n` tasks run at once with one `jax.vmap` over the parameters
(`in_axes=0` for the tasks, next to the keys and states). The task stays fixed across the episodes
of a task: gymnax's auto-reset calls `reset_env(key, params)` with the same params, and every
environment here reads its task from the params on reset, never resampling it.

Families (`rlcx_jax.configs.tasks` holds their names, sampled fields and default ranges, jax-free):

  point-nav-uniform  PointNavigation, goal ~ U([-0.5, 0.5]^2), dense reward, the episode ends within
                     0.01 of the goal on both axes (Finn et al. 2017, MAML)
  point-nav-circle   PointNavigation, goal = 0.5 (cos a, sin a), a ~ U(0, 2 pi), dense reward, ends
                     within 0.01 of the goal
  point-nav-sparse   as point-nav-circle with the sparse reward max(0.2 - d, 0)  (after Rakelly et al.
                     2019, PEARL's sparse point robot)
  cartpole           CartPole, length ~ U(0.25, 1), masspole ~ U(0.05, 0.5), masscart ~ U(0.5, 2),
                     force_mag ~ U(5, 15); total_mass and polemass_length recomputed; 200 steps
  cartpole-flip      CartPole, force_mag = 10 s with s = +-1 (probability 1/2 each): the actions' effect
                     is sign-flipped in half the tasks; 200 steps
  pendulum           Pendulum, m ~ U(0.5, 1.5), l ~ U(0.5, 1.5); 200 steps
  acrobot            Acrobot, link_mass_1, link_mass_2 ~ U(0.5, 1.5); 200 steps
  bandit             two-armed Bernoulli bandit, success probabilities (p, 1 - p), p ~ U(0, 1); 100 pulls
  meta-maze          MetaMaze (Miconi et al. 2019), goal cell uniform over the open cells, start at the
                     centre; 200 steps

Usage::

    family = make_family("cartpole", ("length=0.5:1.5",))
    tasks = family.sample(jax.random.PRNGKey(0), 8)        # CartPole EnvParams, leaves [8, ...]
    obs, state = jax.vmap(family.env.reset)(keys, tasks)  # one environment per task
    one = family.task(length=0.8, masspole=0.2)           # a concrete task from Python values

This module also defines and registers the environment id `PointNavigation-v0` (a dense task with
goal (0.3, -0.4)), so `envs.make("PointNavigation-v0")` and `rlcx train ... --env PointNavigation-v0`
work.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import environment, spaces
from gymnax.environments.classic_control import acrobot, cartpole, pendulum
from gymnax.environments.misc import bernoulli_bandit, meta_maze

from rlcx_jax.configs import tasks as task_table

__all__ = [
    "POINT_NAV_ID",
    "POINT_NAV_MAX_STEP",
    "PointNavState",
    "PointNavParams",
    "PointNavigation",
    "point_nav_reward",
    "BanditTaskParams",
    "BernoulliBanditTask",
    "MazeTaskParams",
    "MetaMazeTask",
    "TaskFamily",
    "make_family",
]

POINT_NAV_ID = "PointNavigation-v0"
POINT_NAV_MAX_STEP = 0.1
"""The largest move per axis and step: actions are clipped to [-0.1, 0.1]^2."""
_DEFAULT_GOAL = (0.3, -0.4)  # on the circle of radius 0.5, so also a valid circle-family default


# ----------------------------------------------------------------------------------------------
# Point navigation
# ----------------------------------------------------------------------------------------------
@struct.dataclass
class PointNavState(environment.EnvState):
    """position: the point's (x, y), float32 [2]; time: steps taken in this episode."""

    position: jax.Array
    time: jax.Array


@struct.dataclass
class PointNavParams(environment.EnvParams):
    """One point-navigation task.

    goal: the goal (x, y), float32 [2]. sparse_radius: 0 for the dense reward, r > 0 for the sparse
    reward max(r - d, 0). goal_tolerance: tol > 0 ends the episode (terminated) once the point is
    within tol of the goal on both axes, max_i |p_i - g_i| < tol; 0 never terminates.
    max_steps_in_episode: the time limit (truncation).
    """

    goal: jax.Array = dataclasses.field(default_factory=lambda: jnp.array(_DEFAULT_GOAL, jnp.float32))
    sparse_radius: float = 0.0
    goal_tolerance: float = 0.0
    max_steps_in_episode: int = 100


def point_nav_reward(distance: jax.Array, sparse_radius: jax.Array | float) -> jax.Array:
    """r = -d (dense, sparse_radius = 0), or r = max(sparse_radius - d, 0) (sparse, sparse_radius > 0)."""
    sparse_radius = jnp.asarray(sparse_radius, jnp.float32)
    sparse = jnp.maximum(sparse_radius - distance, 0.0)
    return jnp.where(sparse_radius > 0.0, sparse, -distance).astype(jnp.float32)


class PointNavigation(environment.Environment[PointNavState, PointNavParams]):
    """A point in the plane moves to a goal: the 2D navigation task of Finn et al. 2017 (MAML, Sec. 5.3).

    Reset puts the point at the origin, p_0 = (0, 0) (deterministic). A step moves it by the action
    clipped per axis, p_{t+1} = p_t + clip(a_t, -0.1, 0.1), and pays, with d = ||p_{t+1} - g||_2 the
    distance to the goal g after the move:

      dense  (sparse_radius = 0):  r_t = -d                      (MAML's point robot; its reference
                                                                   code pays -d, the paper says the
                                                                   squared distance)
      sparse (sparse_radius = R):  r_t = max(R - d, 0)           (reward only within R of the goal,
                                                                   after the sparse point robot of
                                                                   Rakelly et al. 2019, PEARL, which
                                                                   pays 1 - d there instead)

    With `goal_tolerance` tol > 0 the episode terminates once max_i |p_i - g_i| < tol (MAML's reference
    point robot ends within 0.01 of the goal on both axes; the dense families use that), with tol = 0
    it never terminates; gymnax's base class truncates it at `max_steps_in_episode` (100).
    Observation: the position, float32 (2,).
    Actions: Box(-0.1, 0.1, (2,)).
    """

    @property
    def default_params(self) -> PointNavParams:
        return PointNavParams()

    def step_env(
        self, key: jax.Array, state: PointNavState, action: Any, params: PointNavParams
    ) -> tuple[jax.Array, PointNavState, jax.Array, jax.Array, dict[str, Any]]:
        move = jnp.clip(jnp.asarray(action, jnp.float32), -POINT_NAV_MAX_STEP, POINT_NAV_MAX_STEP)
        position = state.position + jnp.reshape(move, (2,))
        distance = jnp.linalg.norm(position - jnp.asarray(params.goal, jnp.float32))
        new_state = PointNavState(position=position, time=state.time + 1)
        terminated = self.is_terminated(new_state, params)
        return (
            jax.lax.stop_gradient(self.get_obs(new_state)),
            jax.lax.stop_gradient(new_state),
            point_nav_reward(distance, params.sparse_radius),
            terminated,
            {"discount": jnp.ones((), jnp.float32)},
        )

    def reset_env(self, key: jax.Array, params: PointNavParams) -> tuple[jax.Array, PointNavState]:
        state = PointNavState(position=jnp.zeros((2,), jnp.float32), time=jnp.zeros((), jnp.int32))
        return self.get_obs(state), state

    def get_obs(self, state: PointNavState, params: Any = None, key: Any = None) -> jax.Array:
        return state.position.astype(jnp.float32)

    def is_terminated(self, state: PointNavState, params: PointNavParams) -> jax.Array:
        """max_i |p_i - g_i| < goal_tolerance (never when goal_tolerance = 0)."""
        gap = jnp.max(jnp.abs(state.position - jnp.asarray(params.goal, jnp.float32)))
        return gap < jnp.asarray(params.goal_tolerance, jnp.float32)

    @property
    def name(self) -> str:
        return POINT_NAV_ID

    @property
    def num_actions(self) -> int:
        return 2

    def action_space(self, params: PointNavParams | None = None) -> spaces.Box:
        return spaces.Box(-POINT_NAV_MAX_STEP, POINT_NAV_MAX_STEP, (2,), jnp.float32)

    def observation_space(self, params: PointNavParams) -> spaces.Box:
        # From the origin, |p_i| <= 0.1 t <= 0.1 max_steps_in_episode within an episode.
        bound = POINT_NAV_MAX_STEP * jnp.asarray(params.max_steps_in_episode, jnp.float32)
        return spaces.Box(-bound, bound, (2,), jnp.float32)

    def state_space(self, params: PointNavParams) -> spaces.Dict:
        bound = POINT_NAV_MAX_STEP * jnp.asarray(params.max_steps_in_episode, jnp.float32)
        return spaces.Dict(
            {
                "position": spaces.Box(-bound, bound, (2,), jnp.float32),
                "time": spaces.Discrete(int(params.max_steps_in_episode)),
            }
        )


# ----------------------------------------------------------------------------------------------
# Bandit and maze whose task comes from the params
# ----------------------------------------------------------------------------------------------
@struct.dataclass
class BanditTaskParams(bernoulli_bandit.EnvParams):
    """gymnax's bandit params plus the task: arm 0 pays 1 with probability `arm_prob`, arm 1 with
    1 - arm_prob (gymnax's `reward_prob` is unused)."""

    arm_prob: float = 0.1


class BernoulliBanditTask(bernoulli_bandit.BernoulliBandit):
    """gymnax's two-armed Bernoulli bandit (Wang et al. 2017) with the arm probabilities taken from
    the params on every reset: reward_probs = (arm_prob, 1 - arm_prob), instead of a random order."""

    @property
    def default_params(self) -> BanditTaskParams:
        return BanditTaskParams()

    def reset_env(self, key: jax.Array, params: Any) -> tuple[jax.Array, Any]:
        p = jnp.asarray(params.arm_prob, jnp.float32)
        state = bernoulli_bandit.EnvState(
            last_action=jnp.array(0),
            last_reward=jnp.array(0),
            exp_reward_best=jnp.maximum(p, 1.0 - p),
            reward_probs=jnp.stack([p, 1.0 - p]),
            time=0.0,
        )
        return self.get_obs(state, params), state


@struct.dataclass
class MazeTaskParams(meta_maze.EnvParams):
    """gymnax's MetaMaze params plus the task: the goal cell (row, col), int32 [2]."""

    goal: jax.Array = dataclasses.field(default_factory=lambda: jnp.array([1, 1], jnp.int32))


class MetaMazeTask(meta_maze.MetaMaze):
    """gymnax's MetaMaze (Miconi et al. 2019) with the goal taken from the params on every reset; the
    agent starts at the centre. Within an episode, reaching the goal pays `reward` and moves the agent
    to a random open cell (gymnax's behaviour); the goal stays."""

    @property
    def default_params(self) -> MazeTaskParams:
        return MazeTaskParams()

    def reset_env(self, key: jax.Array, params: Any) -> tuple[jax.Array, Any]:
        state = meta_maze.EnvState(
            last_action=jnp.int32(0),
            last_reward=jnp.array(0.0),
            pos=self.center_position,
            goal=jnp.asarray(params.goal, jnp.int32),
            time=0.0,
        )
        return self.get_obs(state, params), state


# ----------------------------------------------------------------------------------------------
# Families
# ----------------------------------------------------------------------------------------------
Ranges = tuple[tuple[str, float, float], ...]
Values = dict[str, jax.Array]


def _as_array(x: Any) -> jax.Array:
    """A leaf as a strongly typed array (bool, int32 or float32 for Python scalars), so sampled tasks
    and `task(...)` share one pytree type and one compilation."""
    if isinstance(x, bool):
        return jnp.asarray(x, jnp.bool_)
    if isinstance(x, int):
        return jnp.asarray(x, jnp.int32)
    if isinstance(x, float):
        return jnp.asarray(x, jnp.float32)
    return jnp.asarray(x)


def _goal_xy(family: TaskFamily, v: Values) -> dict[str, jax.Array]:
    return {"goal": jnp.stack([v["goal_x"], v["goal_y"]], axis=-1)}


def _goal_on_circle(family: TaskFamily, v: Values) -> dict[str, jax.Array]:
    radius = jnp.float32(family.spec.setting("radius"))
    return {"goal": radius * jnp.stack([jnp.cos(v["angle"]), jnp.sin(v["angle"])], axis=-1)}


def _cartpole(family: TaskFamily, v: Values) -> dict[str, jax.Array]:
    """Sampled fields, then the derived ones: total_mass = masscart + masspole and
    polemass_length = masspole * length."""
    base = family.base_params
    masscart = v.get("masscart", jnp.float32(base.masscart))
    masspole = v.get("masspole", jnp.float32(base.masspole))
    length = v.get("length", jnp.float32(base.length))
    force_mag = v["force_mag"] if "force_mag" in v else jnp.float32(base.force_mag) * v["force_sign"]
    shape = jnp.shape(force_mag)
    masscart, masspole, length = (jnp.broadcast_to(x, shape) for x in (masscart, masspole, length))
    return {
        "masscart": masscart,
        "masspole": masspole,
        "length": length,
        "force_mag": force_mag,
        "total_mass": masscart + masspole,
        "polemass_length": masspole * length,
    }


def _same_names(family: TaskFamily, v: Values) -> dict[str, jax.Array]:
    return dict(v)


def _maze_goal(family: TaskFamily, v: Values) -> dict[str, jax.Array]:
    return {"goal": jnp.stack([v["goal_row"], v["goal_col"]], axis=-1).astype(jnp.int32)}


# family name -> (task values -> EnvParams fields to replace)
_TO_PARAMS: dict[str, Callable[[TaskFamily, Values], dict[str, jax.Array]]] = {
    "point-nav-uniform": _goal_xy,
    "point-nav-circle": _goal_on_circle,
    "point-nav-sparse": _goal_on_circle,
    "cartpole": _cartpole,
    "cartpole-flip": _cartpole,
    "pendulum": _same_names,
    "acrobot": _same_names,
    "bandit": _same_names,
    "meta-maze": _maze_goal,
}


@dataclasses.dataclass(frozen=True, eq=False)
class TaskFamily:
    """A distribution over one environment's `EnvParams` (build it with `make_family`).

    Attributes:
      name: the family's name (`rlcx_jax.configs.tasks.FAMILY_NAMES`).
      env: the raw gymnax environment (unwrapped; `training_env()` adds the training wrappers).
      base_params: the environment's params with the family's non-sampled settings (horizon, sparse
        radius); the values a task takes for fields it does not set.
      ranges: the sampled fields, `(field, low, high)` with field ~ U(low, high), validated.

    Compared and hashed by identity (`eq=False`), so a family can be a static argument under `jit`.
    """

    name: str
    env: Any
    base_params: Any
    ranges: Ranges

    @property
    def spec(self) -> task_table.FamilySpec:
        return task_table.FAMILIES[self.name]

    # -- sampling ------------------------------------------------------------------------------
    def sample(self, key: jax.Array, n: int) -> Any:
        """`n` tasks drawn from the family: an `EnvParams` with a leading axis `n` on every leaf.

        Deterministic per key; jittable (with `n` static) and vmappable over keys. Each range field
        is drawn as U(low, high) in float32; cartpole-flip draws s = +-1 with probability 1/2; meta-maze
        draws the goal uniformly over the open cells. Derived fields are recomputed.
        """
        fields = self.spec.fields
        keys = jax.random.split(key, max(len(fields), 1))
        ranges = {field: (low, high) for field, low, high in self.ranges}
        values: Values = {}
        if self.name == "meta-maze":
            coords = jnp.asarray(self.env.coords, jnp.int32)
            cells = coords[jax.random.randint(keys[0], (n,), 0, coords.shape[0])]
            values = {"goal_row": cells[:, 0], "goal_col": cells[:, 1]}
        elif self.name == "cartpole-flip":
            values = {"force_sign": jnp.where(jax.random.bernoulli(keys[0], 0.5, (n,)), 1.0, -1.0).astype(jnp.float32)}
        else:
            for k, field in zip(keys, fields):
                low, high = ranges[field]
                values[field] = jax.random.uniform(k, (n,), jnp.float32, low, high)
        return self._assemble(values, n)

    def task(self, **values: float) -> Any:
        """One concrete task from Python values, e.g. `task(length=0.8, masspole=0.2)` or
        `task(goal_x=0.1, goal_y=-0.2)`; fields not given take the base task's value.

        The values are checked (`configs.tasks.check_task_values`: positive masses and lengths,
        probabilities in [0, 1], a force sign of +-1, an open maze cell) with a one-line ValueError;
        they may lie outside the sampling ranges. Derived fields are recomputed. Every leaf is an
        array of the same dtype and shape as one task of `sample(...)`.
        """
        task_table.check_task_values(self.name, values)
        full = {**self._base_values(), **{k: float(v) for k, v in values.items()}}
        if self.name == "meta-maze":
            cell = (int(full["goal_row"]), int(full["goal_col"]))
            open_cells = {tuple(c) for c in np.asarray(self.env.coords).tolist()}
            if cell not in open_cells:
                raise ValueError(f"goal (goal_row, goal_col) = {cell} is a wall, not an open maze cell")
        integer = self.spec.integer
        arrays = {k: jnp.asarray(v, jnp.int32 if k in integer else jnp.float32) for k, v in full.items()}
        return self._assemble(arrays, None)

    def _base_values(self) -> dict[str, float]:
        """The family's fields as set by `base_params`."""
        base = self.base_params
        if self.name == "point-nav-uniform":
            gx, gy = np.asarray(base.goal, np.float64).tolist()
            return {"goal_x": gx, "goal_y": gy}
        if self.name in ("point-nav-circle", "point-nav-sparse"):
            gx, gy = np.asarray(base.goal, np.float64).tolist()
            return {"angle": math.atan2(gy, gx) % (2.0 * math.pi)}
        if self.name == "cartpole-flip":
            return {"force_sign": 1.0 if float(base.force_mag) > 0 else -1.0}
        if self.name == "meta-maze":
            row, col = np.asarray(base.goal).tolist()
            return {"goal_row": float(row), "goal_col": float(col)}
        return {field: float(getattr(base, field)) for field in self.spec.fields}

    def _assemble(self, values: Values, n: int | None) -> Any:
        """Base params as arrays (broadcast to a leading axis n when given) with the task's fields."""
        base = jax.tree.map(_as_array, self.base_params)
        if n is not None:
            base = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), base)
        updates = _TO_PARAMS[self.name](self, values)
        return base.replace(**{k: jnp.asarray(v).astype(getattr(base, k).dtype) for k, v in updates.items()})

    # -- description ---------------------------------------------------------------------------
    @property
    def action_space(self) -> Any:
        """The gymnax action space (for `base_params`)."""
        return self.env.action_space(self.base_params)

    @property
    def discrete(self) -> bool:
        """Whether the actions are discrete (a gymnax `Discrete` space)."""
        return hasattr(self.action_space, "n")

    @property
    def obs_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.env.observation_space(self.base_params).shape)

    def training_env(self, rescale_actions: bool = False) -> Any:
        """The environment with the wrappers every rollout reads (`envs.wrap_for_training`): episode
        statistics, action clipping for continuous actions, and with `rescale_actions` actions in
        [-1, 1] scaled to the space's bounds."""
        from rlcx_jax.envs import wrap_for_training

        return wrap_for_training(self.env, self.base_params, rescale_actions)

    def oracle_return(self, task: Any) -> float | None:
        """The return of the analytic oracle on one point-navigation task; None for other families.

        The oracle moves toward the goal as far as allowed, a_t = clip(g - p_t, -0.1, 0.1) per axis,
        for `max_steps_in_episode` steps or until the episode terminates (within `goal_tolerance` of the
        goal), so p_t = clip(g, -0.1 t, 0.1 t): the point of the box reachable in t steps nearest the
        goal. Every reward is a decreasing function of the distance, so this is the optimal return:
        sum_t -||p_t - g|| (dense) or sum_t max(R - ||p_t - g||, 0) (sparse).
        E.g. g = (0.5, 0) gives -0.4 - 0.3 - 0.2 - 0.1 - 0 = -1.0.
        """
        if not self.name.startswith("point-nav"):
            return None
        goal = np.asarray(task.goal, np.float64)
        if goal.shape != (2,):
            raise ValueError(f"oracle_return takes one task (goal of shape (2,)), got goal shape {goal.shape}")
        radius = float(task.sparse_radius)
        tolerance = float(task.goal_tolerance)
        position = np.zeros(2)
        total = 0.0
        for _ in range(int(task.max_steps_in_episode)):
            position = position + np.clip(goal - position, -POINT_NAV_MAX_STEP, POINT_NAV_MAX_STEP)
            distance = float(np.linalg.norm(position - goal))
            total += max(radius - distance, 0.0) if radius > 0.0 else -distance
            if np.max(np.abs(position - goal)) < tolerance:
                break
        return total


def _build_env(spec: task_table.FamilySpec) -> tuple[Any, Any]:
    """The raw environment and its base params (horizon and fixed settings set) for a family."""
    env: Any
    params: Any
    if spec.env_id == POINT_NAV_ID:
        env = PointNavigation()
        settings = dict(spec.settings)
        params = PointNavParams(
            sparse_radius=settings.get("sparse_radius", 0.0), goal_tolerance=settings.get("goal_tolerance", 0.0)
        )
    elif spec.env_id == "CartPole-v1":
        env, params = cartpole.CartPole(), cartpole.EnvParams()
    elif spec.env_id == "Pendulum-v1":
        env, params = pendulum.Pendulum(), pendulum.EnvParams()
    elif spec.env_id == "Acrobot-v1":
        env = acrobot.Acrobot()
        params = env.default_params
    elif spec.env_id == "BernoulliBandit-misc":
        env, params = BernoulliBanditTask(), BanditTaskParams()
    elif spec.env_id == "MetaMaze-misc":
        env, params = MetaMazeTask(), MazeTaskParams()
    else:  # pragma: no cover - the table and this function are edited together
        raise AssertionError(f"no builder for {spec.env_id!r}")
    horizon = type(params.max_steps_in_episode)(spec.max_steps_in_episode)  # the bandit's is a float
    return env, params.replace(max_steps_in_episode=horizon)


def make_family(name: str, ranges: tuple[str, ...] = ()) -> TaskFamily:
    """The task family `name` with range overrides `ranges` (`"field=low:high"`, e.g. `"length=0.5:1.5"`).

    Raises a one-line ValueError for an unknown family (naming close matches) or a bad range.
    """
    spec = task_table.check_family(name)
    parsed = task_table.parse_ranges(name, tuple(ranges))
    env, base_params = _build_env(spec)
    return TaskFamily(name=name, env=env, base_params=base_params, ranges=parsed)


# ----------------------------------------------------------------------------------------------
# Registration of PointNavigation-v0
# ----------------------------------------------------------------------------------------------
def _point_nav_factory() -> tuple[PointNavigation, PointNavParams]:
    env = PointNavigation()
    return env, env.default_params


def _register() -> None:
    from rlcx_jax.envs import _EXTRA_ENVS, register

    if POINT_NAV_ID not in _EXTRA_ENVS:  # importable twice (e.g. importlib.reload) without error
        register(POINT_NAV_ID, _point_nav_factory, discrete=False)


_register()
