"""A fixed set of tasks as one environment, for multi-task learning: `TaskSetEnv`.

`TaskSetEnv(env)` with `TaskSetParams(tasks=...)` (the inner environment's `EnvParams`, every leaf
with a leading task axis T, e.g. `TaskFamily.sample(key, T)`) draws a task uniformly on every reset,
t ~ U{0..T-1}, and plays one episode of it; auto-reset draws the next task. The observation is the
inner observation, flattened, followed by the one-hot of t:

    obs = concat(flatten(inner_obs), onehot(t, T))

so any algorithm trains on the task set unchanged, and a multi-task network
(`NetConfig(num_tasks=T)`) reads the task from the observation's last T entries. The task of a
transition is therefore in the transition itself (`task_ids(obs, T)`), which is what the multi-task
gradient (`rlcx_jax.multitask`) groups samples by. The task parameters are an ordinary pytree, so a
different task set is a different `env_params`, not a new program.

Registered ids (jax-free names in `rlcx_jax.configs.envs`):
  MultiTaskCartPole-v0   10 CartPole tasks from the "cartpole" family (pole length, masses and force
                         magnitude varied, 200 steps; key 0), the force's sign flipped in tasks
                         1, 3, 5, 7, 9, so the same action pushes the cart the other way there: a
                         policy that ignores the task cannot solve half of them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from gymnax.environments import environment, spaces

__all__ = ["MULTITASK_CARTPOLE_ID", "TaskSetState", "TaskSetParams", "TaskSetEnv", "task_ids", "task_count"]

MULTITASK_CARTPOLE_ID = "MultiTaskCartPole-v0"


def task_count(tasks: Any) -> int:
    """T, the common leading axis of every leaf of a stacked `EnvParams`."""
    sizes = {jnp.shape(leaf)[0] for leaf in jax.tree.leaves(tasks) if jnp.ndim(leaf) > 0}
    if len(sizes) != 1:
        raise ValueError(f"tasks must have one leading task axis on every leaf, got sizes {sorted(sizes)}")
    return int(sizes.pop())


def task_ids(obs: jax.Array, num_tasks: int) -> jax.Array:
    """The task of each observation [..., D + T] of a `TaskSetEnv`: argmax of its last T entries, int32 [...]."""
    return jnp.argmax(obs[..., -num_tasks:], axis=-1).astype(jnp.int32)


@struct.dataclass
class TaskSetState(environment.EnvState):
    """inner: the inner environment's state; task: the current episode's task, int32."""

    inner: Any
    task: jax.Array


@struct.dataclass
class TaskSetParams(environment.EnvParams):
    """tasks: the inner `EnvParams` with a leading task axis T on every leaf. max_steps_in_episode: the
    longest time limit of the tasks (what an evaluator waits for; each task truncates at its own)."""

    tasks: Any = None
    max_steps_in_episode: int = 1000
    task: int = -1
    """-1: a task drawn uniformly on every reset; t in [0, T): always task t (to evaluate one task)."""


class TaskSetEnv(environment.Environment[TaskSetState, TaskSetParams]):
    """T tasks of one environment, one drawn per episode; the observation ends with the task's one-hot."""

    def __init__(self, env: Any, tasks: Any) -> None:
        super().__init__()
        self.inner = env
        self.num_tasks = task_count(tasks)
        if self.num_tasks < 2:
            raise ValueError(f"A task set needs at least 2 tasks, got {self.num_tasks}")
        self._default_tasks = tasks

    @property
    def default_params(self) -> TaskSetParams:
        horizon = getattr(self._default_tasks, "max_steps_in_episode", 1000)
        return TaskSetParams(tasks=self._default_tasks, max_steps_in_episode=int(jnp.max(jnp.asarray(horizon))))

    def check_params(self, params: TaskSetParams) -> None:
        """One-line ValueError for concrete params that do not fit this task set (called by `envs.make`)."""
        if task_count(params.tasks) != self.num_tasks:
            raise ValueError(f"This task set has {self.num_tasks} tasks, got params with {task_count(params.tasks)}")
        if not -1 <= int(params.task) < self.num_tasks:
            raise ValueError(f"task {int(params.task)} is out of range: the task set has tasks 0..{self.num_tasks - 1}")

    def task_params(self, params: TaskSetParams, task: jax.Array | int) -> Any:
        """The inner `EnvParams` of task `task`."""
        return jax.tree.map(lambda leaf: leaf[task], params.tasks)

    def _obs(self, inner_obs: jax.Array, task: jax.Array) -> jax.Array:
        flat = jnp.reshape(inner_obs.astype(jnp.float32), (-1,))
        return jnp.concatenate([flat, jax.nn.one_hot(task, self.num_tasks, dtype=jnp.float32)])

    def reset_env(self, key: jax.Array, params: TaskSetParams) -> tuple[jax.Array, TaskSetState]:
        key_task, key_reset = jax.random.split(key)
        drawn = jax.random.randint(key_task, (), 0, self.num_tasks, dtype=jnp.int32)
        task = jnp.where(jnp.asarray(params.task) >= 0, jnp.asarray(params.task, jnp.int32), drawn)
        inner_obs, inner = self.inner.reset_env(key_reset, self.task_params(params, task))
        return self._obs(inner_obs, task), TaskSetState(time=inner.time, inner=inner, task=task)

    def step_env(
        self, key: jax.Array, state: TaskSetState, action: Any, params: TaskSetParams
    ) -> tuple[jax.Array, TaskSetState, jax.Array, jax.Array, dict[Any, Any]]:
        inner_obs, inner, reward, terminated, info = self.inner.step_env(
            key, state.inner, action, self.task_params(params, state.task)
        )
        new_state = TaskSetState(time=inner.time, inner=inner, task=state.task)
        return self._obs(inner_obs, state.task), new_state, reward, terminated, info

    def is_truncated(self, state: TaskSetState, params: TaskSetParams) -> jax.Array:
        return self.inner.is_truncated(state.inner, self.task_params(params, state.task))

    @property
    def name(self) -> str:
        return f"TaskSet[{self.inner.name}]"

    @property
    def num_actions(self) -> int:
        return int(self.inner.num_actions)

    def action_space(self, params: TaskSetParams | None = None) -> Any:
        params = self.default_params if params is None else params
        return self.inner.action_space(self.task_params(params, 0))

    def observation_space(self, params: TaskSetParams) -> spaces.Box:
        inner = self.inner.observation_space(self.task_params(params, 0))
        size = 1
        for dim in inner.shape:
            size *= int(dim)
        return spaces.Box(-jnp.inf, jnp.inf, (size + self.num_tasks,), jnp.float32)


def _multitask_cartpole() -> tuple[TaskSetEnv, TaskSetParams]:
    from rlcx_jax.envs.tasks import make_family

    family = make_family("cartpole")
    tasks = family.sample(jax.random.PRNGKey(0), 10)
    sign = jnp.where(jnp.arange(10) % 2 == 1, -1.0, 1.0)
    tasks = tasks.replace(force_mag=tasks.force_mag * sign)
    env = TaskSetEnv(family.env, tasks)
    return env, env.default_params


def _register() -> None:
    from rlcx_jax.envs import register

    register(MULTITASK_CARTPOLE_ID, _multitask_cartpole, discrete=True)


_register()
