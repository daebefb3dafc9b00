"""A jittable entity environment whose observation is a set of tokens: EntityNavigation.

An agent in the plane must reach the one *goal* among `num_entities` entities; the others are
distractors. The observation is one token per entity slot, so it suits attention / set policies: the
goal is marked by a feature, while the slot it sits in is random (a random permutation of the
`max_entities` slots on every reset), so the slot index carries no information. A flat MLP must learn
to find the marked token among the slots; an attention policy just attends to it.

Observation: float32 [max_entities, 4], per slot (present, is_goal, dx, dy) with (dx, dy) = entity
position - agent position. Padding slots (no entity) are all zeros.

MASK CONVENTION (other code relies on it): feature 0 of every entity token is 1.0 for a present
entity and 0.0 for padding, so `entity_mask(obs) = obs[..., 0] > 0.5` is the [..., max_entities]
boolean mask of present entities (True = attend to this token).

`max_entities` is a constructor argument (static: it fixes the observation shape); `num_entities` is an
`EnvParams` field (traced), so one `jax.vmap` over params runs environments with different numbers of
entities side by side. Everything is jittable and vmappable over keys and params.

This module registers the environment id `EntityNavigation-v0` = `EntityNavigation(max_entities=8)`
with default params (4 entities), so `envs.make("EntityNavigation-v0", num_entities=6)` and
`rlcx train ... --env EntityNavigation-v0` work.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from gymnax.environments import environment, spaces
from jax.typing import ArrayLike

__all__ = [
    "ENTITY_NAV_ID",
    "ENTITY_FEATURES",
    "ACTION_MOVES",
    "EntityNavState",
    "EntityNavParams",
    "EntityNavigation",
    "entity_mask",
]

ENTITY_NAV_ID = "EntityNavigation-v0"
ENTITY_FEATURES = 4
"""Features per entity token: (present, is_goal, dx, dy)."""
ACTION_MOVES = ((0.0, 0.0), (0.0, 1.0), (0.0, -1.0), (-1.0, 0.0), (1.0, 0.0))
"""Unit moves of the Discrete(5) actions: stay, +y, -y, -x, +x (scaled by `step_size`)."""
_GOAL_TRIES = 16  # rejection-sampling candidates for the goal position on reset


def entity_mask(obs: ArrayLike) -> jax.Array:
    """The mask of present entities, bool [..., N], from observations [..., N, F]: obs[..., 0] > 0.5.

    The convention: feature 0 of every entity token is 1.0 for a present entity and 0.0 for a
    padding slot (True = a real entity, attend to it; False = padding, mask it out).
    """
    return jnp.asarray(obs)[..., 0] > 0.5


@struct.dataclass
class EntityNavState(environment.EnvState):
    """agent: the agent's (x, y), float32 [2]; entities: every slot's (x, y), float32 [max_entities, 2]
    (meaningless for absent slots); present: which slots hold an entity, bool [max_entities];
    goal_index: the goal's slot, int32 (always a present slot); time: steps taken in this episode."""

    agent: jax.Array
    entities: jax.Array
    present: jax.Array
    goal_index: jax.Array
    time: jax.Array


@struct.dataclass
class EntityNavParams(environment.EnvParams):
    """num_entities: entities present, 1 <= num_entities <= max_entities (traced; clipped to that
    range). step_size: the distance an action moves the agent. goal_radius: the goal is reached, and a
    distractor touched, within this distance. goal_reward: paid on reaching the goal.
    shaping_scale: the scale c of the shaping term c (d_prev - d_new). distractor_penalty: subtracted
    per touched distractor and step. max_steps_in_episode: the time limit (truncation)."""

    num_entities: int = 4
    step_size: float = 0.1
    goal_radius: float = 0.1
    goal_reward: float = 1.0
    shaping_scale: float = 1.0
    distractor_penalty: float = 0.0
    max_steps_in_episode: int = 50


class EntityNavigation(environment.Environment[EntityNavState, EntityNavParams]):
    """Reach the marked goal among distractor entities; the observation is a set of entity tokens.

    Reset (deterministic per key): the agent p_0 ~ U([-1, 1]^2); every slot's position ~ U([-1, 1]^2);
    a random permutation (the ranks of iid uniform scores) ranks the `max_entities` slots, the
    `num_entities` slots of lowest rank hold the entities and the slot of rank 0 is the goal, so the
    goal is a uniformly random present entity in a uniformly random slot. The goal's position g is
    the first of 16 candidates ~ U([-1, 1]^2) with ||g - p_0|| >= goal_radius (the farthest candidate
    if none is: practically never for small radii), so an episode never starts at the goal.
    Distractors may overlap anything.

    Step: action a in Discrete(5) = (stay, +y, -y, -x, +x) moves the agent,
    p_{t+1} = clip(p_t + step_size * u_a, -1, 1) (per axis), and pays, with d_t = ||g - p_t||_2,

      r_t = shaping_scale * (d_t - d_{t+1})                        (potential-based shaping with the
                                                                    potential Phi(p) = -||g - p||,
                                                                    Ng et al. 1999, for gamma = 1)
            + goal_reward * [d_{t+1} < goal_radius]                 (reaching the goal; terminates)
            - distractor_penalty * #{present distractors e : ||e - p_{t+1}|| < goal_radius}

    The episode terminates when d_{t+1} < goal_radius; gymnax's base class truncates it at
    `max_steps_in_episode` (50) and auto-resets.

    Observation: float32 [max_entities, 4], per slot (present, is_goal, dx, dy) with
    (dx, dy) = e - p (entity minus agent), all zeros for padding slots (see `entity_mask`).
    """

    def __init__(self, max_entities: int = 8) -> None:
        super().__init__()
        if int(max_entities) != max_entities or max_entities < 1:
            raise ValueError(f"max_entities must be a positive integer, got {max_entities!r}")
        self.max_entities = int(max_entities)

    @property
    def default_params(self) -> EntityNavParams:
        return EntityNavParams()

    def check_params(self, params: EntityNavParams) -> None:
        """One-line ValueError for concrete parameters out of range (called by `envs.make`)."""
        n = int(params.num_entities)
        if not 1 <= n <= self.max_entities:
            raise ValueError(f"num_entities must be in [1, {self.max_entities}] (max_entities), got {n}")

    def _num_entities(self, params: EntityNavParams) -> jax.Array:
        return jnp.clip(jnp.asarray(params.num_entities, jnp.int32), 1, self.max_entities)

    def step_env(
        self, key: jax.Array, state: EntityNavState, action: Any, params: EntityNavParams
    ) -> tuple[jax.Array, EntityNavState, jax.Array, jax.Array, dict[str, Any]]:
        step_size = jnp.asarray(params.step_size, jnp.float32)
        radius = jnp.asarray(params.goal_radius, jnp.float32)
        move = jnp.asarray(ACTION_MOVES, jnp.float32)[jnp.asarray(action, jnp.int32)]
        agent = jnp.clip(state.agent + step_size * jnp.reshape(move, (2,)), -1.0, 1.0)
        goal = state.entities[state.goal_index]
        d_prev = jnp.linalg.norm(goal - state.agent)
        d_new = jnp.linalg.norm(goal - agent)
        reached = d_new < radius
        distances = jnp.linalg.norm(state.entities - agent, axis=-1)
        is_goal = jnp.arange(self.max_entities) == state.goal_index
        touched = jnp.sum(state.present & ~is_goal & (distances < radius))
        reward = (
            jnp.asarray(params.shaping_scale, jnp.float32) * (d_prev - d_new)
            + jnp.where(reached, jnp.asarray(params.goal_reward, jnp.float32), 0.0)
            - jnp.asarray(params.distractor_penalty, jnp.float32) * touched.astype(jnp.float32)
        )
        new_state = state.replace(agent=agent, time=state.time + 1)
        info = {"discount": jnp.where(reached, 0.0, 1.0).astype(jnp.float32)}
        return (
            jax.lax.stop_gradient(self.get_obs(new_state)),
            jax.lax.stop_gradient(new_state),
            reward.astype(jnp.float32),
            reached,
            info,
        )

    def reset_env(self, key: jax.Array, params: EntityNavParams) -> tuple[jax.Array, EntityNavState]:
        n = self.max_entities
        # One draw for everything (a single threefry call keeps compilation short): the agent, every
        # slot's position, the goal candidates, and a score per slot that ranks the slots.
        u = jax.random.uniform(key, (2 + 2 * n + 2 * _GOAL_TRIES + n,), jnp.float32)
        xy = 2.0 * u[: 2 + 2 * n + 2 * _GOAL_TRIES] - 1.0  # U([-1, 1))
        agent = xy[:2]
        entities = jnp.reshape(xy[2 : 2 + 2 * n], (n, 2))
        candidates = jnp.reshape(xy[2 + 2 * n :], (_GOAL_TRIES, 2))
        score = u[2 + 2 * n + 2 * _GOAL_TRIES :]
        # rank_j = #{i : s_i < s_j} + #{i < j : s_i = s_j}: a uniformly random permutation of the slots for
        # iid scores (ties, of probability ~1e-6, broken by slot index: the ranks are always 0..n-1 once).
        slot = jnp.arange(n)
        before = (score[None, :] < score[:, None]) | (
            (score[None, :] == score[:, None]) & (slot[None, :] < slot[:, None])
        )
        rank = jnp.sum(before, axis=1)
        present = rank < self._num_entities(params)
        goal_index = jnp.argmin(rank).astype(jnp.int32)  # the slot of rank 0: always present
        # The goal: the first candidate at least goal_radius from the agent (else the farthest).
        gaps = jnp.linalg.norm(candidates - agent, axis=-1)
        ok = gaps >= jnp.asarray(params.goal_radius, jnp.float32)
        pick = jnp.where(jnp.any(ok), jnp.argmax(ok), jnp.argmax(gaps))
        entities = entities.at[goal_index].set(candidates[pick])
        state = EntityNavState(
            agent=agent,
            entities=entities,
            present=present,
            goal_index=goal_index,
            time=jnp.zeros((), jnp.int32),
        )
        return self.get_obs(state), state

    def get_obs(self, state: EntityNavState, params: Any = None, key: Any = None) -> jax.Array:
        """Per slot (present, is_goal, dx, dy), (dx, dy) = entity - agent; zeros for padding slots."""
        present = state.present.astype(jnp.float32)
        is_goal = (jnp.arange(self.max_entities) == state.goal_index).astype(jnp.float32) * present
        delta = jnp.where(state.present[:, None], state.entities - state.agent, 0.0)
        return jnp.concatenate([present[:, None], is_goal[:, None], delta], axis=-1).astype(jnp.float32)

    def is_terminated(self, state: EntityNavState, params: EntityNavParams) -> jax.Array:
        """||g - p|| < goal_radius: the agent is at the goal."""
        distance = jnp.linalg.norm(state.entities[state.goal_index] - state.agent)
        return distance < jnp.asarray(params.goal_radius, jnp.float32)

    @property
    def name(self) -> str:
        return ENTITY_NAV_ID

    @property
    def num_actions(self) -> int:
        return len(ACTION_MOVES)

    def action_space(self, params: EntityNavParams | None = None) -> spaces.Discrete:
        return spaces.Discrete(len(ACTION_MOVES))

    def observation_space(self, params: EntityNavParams) -> spaces.Box:
        # present and is_goal in [0, 1]; positions in [-1, 1]^2, so dx, dy in [-2, 2].
        low = jnp.broadcast_to(jnp.array([0.0, 0.0, -2.0, -2.0], jnp.float32), (self.max_entities, ENTITY_FEATURES))
        high = jnp.broadcast_to(jnp.array([1.0, 1.0, 2.0, 2.0], jnp.float32), (self.max_entities, ENTITY_FEATURES))
        return spaces.Box(low, high, (self.max_entities, ENTITY_FEATURES), jnp.float32)

    def state_space(self, params: EntityNavParams) -> spaces.Dict:
        n = self.max_entities
        return spaces.Dict(
            {
                "agent": spaces.Box(-1.0, 1.0, (2,), jnp.float32),
                "entities": spaces.Box(-1.0, 1.0, (n, 2), jnp.float32),
                "present": spaces.Box(0, 1, (n,), jnp.bool_),
                "goal_index": spaces.Discrete(n),
                "time": spaces.Discrete(int(params.max_steps_in_episode)),
            }
        )


# ----------------------------------------------------------------------------------------------
# Registration of EntityNavigation-v0
# ----------------------------------------------------------------------------------------------
def _entity_nav_factory() -> tuple[EntityNavigation, EntityNavParams]:
    env = EntityNavigation(max_entities=8)
    return env, env.default_params


def _register() -> None:
    from rlcx_jax.envs import _EXTRA_ENVS, register

    if ENTITY_NAV_ID not in _EXTRA_ENVS:  # importable twice (e.g. importlib.reload) without error
        register(ENTITY_NAV_ID, _entity_nav_factory, discrete=True)


_register()
