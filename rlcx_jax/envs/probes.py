"""Probe environments with known answers, for debugging RL code (after Andy Jones, "Debugging RL,
without the agonizing pain", 2021).

Each probe isolates one part of an agent. If an algorithm fails a probe, the bug is in the part the
probe exercises, not in the task being hard:

  Probe-ConstantReward-v0    one action, constant obs, reward +1, one step.      V = 1
                             (value loss / optimizer wiring)
  Probe-ObsReward-v0         one action, obs in {-1, +1}, reward = obs, one step. V(obs) = obs
                             (the critic can read the observation)
  Probe-TwoStep-v0           one action, obs -1 then +1, reward 1 only at the end of the second step.
                             V(-1) = gamma, V(+1) = 1   (discounting, bootstrapping across steps)
  Probe-ActionReward-v0      two actions, constant obs, reward +1 for action 1 else -1, one step.
                             The policy must pick action 1; Q(., 0) = -1, Q(., 1) = +1
                             (policy gradient / Q-learning sign and action indexing)
  Probe-ObsActionReward-v0   two actions, obs in {-1, +1}, reward +1 if the action matches the sign of
                             the obs (action 1 for +1, action 0 for -1) else -1, one step.
                             The policy must condition on the obs (batching of obs with actions)
  Probe-Truncation-v0        one action, reward +1 every step, never terminates, time limit T
                             (`max_steps_in_episode`, default 5). The obs is the phase of a clock,
                             2 * (t mod T) / T - 1, so the pre-reset observation at the time limit
                             equals the first one. With bootstrapping on truncation every state is
                             worth 1 / (1 - gamma); an agent that treats truncation as termination
                             learns the remaining steps' return (1 - gamma^(T - t)) / (1 - gamma)
                             instead.
  Probe-TruncationReset-v0   one action; the obs alternates A = -1, B = +1, A, ... from A; reward +1
                             for leaving A, 0 for leaving B; time limit 3, so an episode is truncated
                             on arriving at B and restarts at A: the pre-reset observation (B) is NOT
                             the reset one (A). Correct: V(A) = 1 / (1 - gamma^2), V(B) = gamma V(A).
                             Bootstrapping from the reset observation instead gives
                             V(A) = 1 / (1 - gamma (1 + gamma) / 2); truncation as termination
                             V(A) = 1 / (1 - gamma^2 / 2)   (which observation a bootstrap uses)

All probes follow gymnax 1.x (`step_env` returns `(obs, state, reward, terminated, info)`; the base
class adds truncation at `max_steps_in_episode` and auto-resets). Observations have shape (1,), float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from gymnax.environments import environment, spaces

__all__ = [
    "ProbeState",
    "ProbeParams",
    "ConstantReward",
    "ObsReward",
    "TwoStep",
    "ActionReward",
    "ObsActionReward",
    "Truncation",
    "TruncationReset",
    "PROBES",
]


@struct.dataclass
class ProbeState(environment.EnvState):
    """time: steps taken in this episode; value: the scalar the observation shows."""

    time: jax.Array
    value: jax.Array


@struct.dataclass
class ProbeParams(environment.EnvParams):
    max_steps_in_episode: int = 100


class _Probe(environment.Environment[ProbeState, ProbeParams]):
    """Shared plumbing: a scalar observation `value`, shape (1,) float32.

    Subclasses define `n_actions`, `time_limit`, `_first_value(key, params)` and
    `_transition(key, state, action, params) -> (next_value, reward, terminated)`.
    """

    n_actions: int = 1
    time_limit: int = 100
    probe_name: str = "Probe"

    @property
    def default_params(self) -> ProbeParams:
        return ProbeParams(max_steps_in_episode=self.time_limit)

    def _first_value(self, key: jax.Array, params: ProbeParams) -> jax.Array:
        raise NotImplementedError

    def _transition(
        self, key: jax.Array, state: ProbeState, action: jax.Array, params: ProbeParams
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        raise NotImplementedError

    def step_env(
        self, key: jax.Array, state: ProbeState, action: Any, params: ProbeParams
    ) -> tuple[jax.Array, ProbeState, jax.Array, jax.Array, dict[str, Any]]:
        action = jnp.asarray(action, jnp.int32)
        next_value, reward, terminated = self._transition(key, state, action, params)
        terminated = jnp.asarray(terminated, bool)
        new_state = ProbeState(
            time=state.time + 1,
            value=jnp.asarray(next_value, jnp.float32),
        )
        info = {"discount": jnp.where(terminated, 0.0, 1.0).astype(jnp.float32)}
        return (
            jax.lax.stop_gradient(self.get_obs(new_state)),
            jax.lax.stop_gradient(new_state),
            jnp.asarray(reward, jnp.float32),
            terminated,
            info,
        )

    def reset_env(self, key: jax.Array, params: ProbeParams) -> tuple[jax.Array, ProbeState]:
        state = ProbeState(
            time=jnp.zeros((), jnp.int32),
            value=jnp.asarray(self._first_value(key, params), jnp.float32),
        )
        return self.get_obs(state), state

    def get_obs(self, state: ProbeState, params: Any = None, key: Any = None) -> jax.Array:
        return jnp.reshape(state.value, (1,)).astype(jnp.float32)

    def is_terminated(self, state: ProbeState, params: ProbeParams) -> jax.Array:
        # Every probe that terminates does so in `_transition`; the state alone never is terminal.
        return jnp.zeros((), bool)

    @property
    def name(self) -> str:
        return self.probe_name

    @property
    def num_actions(self) -> int:
        return self.n_actions

    def action_space(self, params: ProbeParams | None = None) -> spaces.Discrete:
        return spaces.Discrete(self.n_actions)

    def observation_space(self, params: ProbeParams) -> spaces.Box:
        return spaces.Box(-1.0, 1.0, (1,), jnp.float32)

    def state_space(self, params: ProbeParams) -> spaces.Dict:
        return spaces.Dict(
            {
                "time": spaces.Discrete(params.max_steps_in_episode),
                "value": spaces.Box(-1.0, 1.0, (), jnp.float32),
            }
        )


def _random_sign(key: jax.Array) -> jax.Array:
    return jnp.where(jax.random.bernoulli(key), 1.0, -1.0).astype(jnp.float32)


class ConstantReward(_Probe):
    """(a) One action, obs 0, reward +1, terminates after one step. V = 1."""

    probe_name = "Probe-ConstantReward-v0"

    def _first_value(self, key, params):
        return jnp.zeros((), jnp.float32)

    def _transition(self, key, state, action, params):
        return state.value, jnp.float32(1.0), jnp.array(True)


class ObsReward(_Probe):
    """(b) One action, obs in {-1, +1} at random, reward = obs, one step. V(obs) = obs."""

    probe_name = "Probe-ObsReward-v0"

    def _first_value(self, key, params):
        return _random_sign(key)

    def _transition(self, key, state, action, params):
        return state.value, state.value, jnp.array(True)


class TwoStep(_Probe):
    """(c) One action, obs -1 then +1; reward 0 then 1; terminates after the second step.

    V(-1) = gamma, V(+1) = 1.
    """

    probe_name = "Probe-TwoStep-v0"

    def _first_value(self, key, params):
        return jnp.float32(-1.0)

    def _transition(self, key, state, action, params):
        second = state.value > 0.0
        reward = jnp.where(second, 1.0, 0.0)
        # The observation after the second step is never acted on (the episode ends).
        return jnp.float32(1.0), reward, second


class ActionReward(_Probe):
    """(d) Two actions, obs 0, reward +1 for action 1 and -1 for action 0, one step."""

    n_actions = 2
    probe_name = "Probe-ActionReward-v0"

    def _first_value(self, key, params):
        return jnp.zeros((), jnp.float32)

    def _transition(self, key, state, action, params):
        reward = jnp.where(action == 1, 1.0, -1.0)
        return state.value, reward, jnp.array(True)


class ObsActionReward(_Probe):
    """(e) Two actions, obs in {-1, +1} at random; reward +1 when the action matches the sign of the
    obs (action 1 for obs +1, action 0 for obs -1), else -1; one step."""

    n_actions = 2
    probe_name = "Probe-ObsActionReward-v0"

    def _first_value(self, key, params):
        return _random_sign(key)

    def _transition(self, key, state, action, params):
        match = (action == 1) == (state.value > 0.0)
        return state.value, jnp.where(match, 1.0, -1.0), jnp.array(True)


class Truncation(_Probe):
    """(f) One action, reward +1 every step, never terminates; the time limit T truncates.

    The obs is the clock phase 2 * (t mod T) / T - 1, so the final (pre-reset) observation at the
    limit equals the first observation of an episode. With correct bootstrapping on truncation
    V(s) = 1 / (1 - gamma) for every state; treating truncation as termination gives
    V(phase t) = (1 - gamma^(T - t)) / (1 - gamma).
    """

    time_limit = 5
    probe_name = "Probe-Truncation-v0"

    @staticmethod
    def phase(time: jax.Array, params: ProbeParams) -> jax.Array:
        limit = jnp.asarray(params.max_steps_in_episode, jnp.int32)
        return (2.0 * jnp.mod(time, limit) / limit - 1.0).astype(jnp.float32)

    def _first_value(self, key, params):
        return self.phase(jnp.zeros((), jnp.int32), params)

    def _transition(self, key, state, action, params):
        return self.phase(state.time + 1, params), jnp.float32(1.0), jnp.array(False)


class TruncationReset(_Probe):
    """(g) One action; observations alternate A = -1, B = +1 starting at A; leaving A pays +1,
    leaving B pays 0; never terminates; the time limit (3) truncates on arriving at B, and the
    episode restarts at A. So the final pre-reset observation (B) differs from the reset one (A),
    and which one a bootstrap uses changes the answer (see the module docstring):
    V(A) = 1 / (1 - gamma^2) and V(B) = gamma V(A) only when bootstrapping from B.
    """

    time_limit = 3
    probe_name = "Probe-TruncationReset-v0"

    def _first_value(self, key, params):
        return jnp.float32(-1.0)

    def _transition(self, key, state, action, params):
        leaving_a = state.value < 0.0
        return jnp.where(leaving_a, 1.0, -1.0), jnp.where(leaving_a, 1.0, 0.0), jnp.array(False)


PROBES: dict[str, type[_Probe]] = {
    cls.probe_name: cls
    for cls in (ConstantReward, ObsReward, TwoStep, ActionReward, ObsActionReward, Truncation, TruncationReset)
}


def _factory(cls: type[_Probe]):
    def make() -> tuple[_Probe, ProbeParams]:
        env = cls()
        return env, env.default_params

    return make


def _register_all() -> None:
    from rlcx_jax.envs import _EXTRA_ENVS, register

    for name, cls in PROBES.items():
        if name not in _EXTRA_ENVS:  # importable twice (e.g. importlib.reload) without error
            register(name, _factory(cls))


_register_all()
