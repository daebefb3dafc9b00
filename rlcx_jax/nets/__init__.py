"""Networks built from a static config through one factory (DESIGN.md section 6).

Every algorithm calls `make(net_config, obs_shape, action_space, head=...)`; a new architecture
(attention policy, multi-task heads, a physically shrunk MLP) is then a config value, not an edit of
an algorithm file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["NetConfig", "ActionSpec", "make", "orthogonal_init", "action_spec", "ActorCritic", "QNetwork", "Torso"]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": nn.tanh,
    "relu": nn.relu,
    "gelu": nn.gelu,
    "elu": nn.elu,
    "silu": nn.silu,
}
TORSOS = ("mlp", "cnn")
HEADS = ("actor_critic", "q")


@dataclasses.dataclass(frozen=True)
class NetConfig:
    """Static network description (hashable; part of an algorithm's config).

    kind: "mlp" (flattens any observation) or "cnn" (MinAtar-style conv torso, then `hidden`).
    hidden: widths of the dense layers.
    activation: one of ACTIVATIONS.
    separate_critic: actor and critic get their own torsos (PureJaxRL default) or share one.
    conv_features / conv_kernel: the CNN's single conv layer (Young & Tian 2019, MinAtar).
    """

    kind: str = "mlp"
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "tanh"
    separate_critic: bool = True
    conv_features: int = 16
    conv_kernel: int = 3

    def validate(self) -> None:
        if self.kind not in TORSOS:
            raise ValueError(f"Unknown network kind {self.kind!r}; expected one of {TORSOS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"Unknown activation {self.activation!r}; expected one of {sorted(ACTIVATIONS)}"
            )
        if any(int(h) <= 0 for h in self.hidden):
            raise ValueError(f"Hidden widths must be positive, got {self.hidden}")


@dataclasses.dataclass(frozen=True)
class ActionSpec:
    """What the policy head must produce: `num_actions` logits, or a `shape`-d Gaussian in [low, high]."""

    discrete: bool
    num_actions: int = 0
    shape: tuple[int, ...] = ()
    low: float = -1.0
    high: float = 1.0

    @property
    def dim(self) -> int:
        return self.num_actions if self.discrete else int(np.prod(self.shape))


def action_spec(space: Any) -> ActionSpec:
    """Convert a gymnax action space into an ActionSpec."""
    if hasattr(space, "n"):
        return ActionSpec(discrete=True, num_actions=int(space.n))
    low = float(np.min(np.asarray(space.low)))
    high = float(np.max(np.asarray(space.high)))
    return ActionSpec(discrete=False, shape=tuple(space.shape), low=low, high=high)


def _gram_schmidt_q(a: jax.Array) -> jax.Array:
    """The Q factor (positive-diagonal R convention) of a tall matrix `a` (m >= n), in plain jnp.

    Gram-Schmidt with one re-orthogonalisation pass ("twice is enough", Giraud et al. 2005),
    column by column under `lax.fori_loop`. It stands in for `jnp.linalg.qr` because on CPU that is a
    LAPACK custom call whose batched form (one QR per vmapped seed) schedules work on XLA's intra-op
    thread pool from inside that pool and can deadlock: a vmapped `train` then waits forever in
    `block_until_ready` with every thread idle.
    """
    _, n = a.shape

    def column(j: jax.Array, q: jax.Array) -> jax.Array:
        v = a[:, j]
        v = v - q @ (q.T @ v)  # columns >= j of q are still zero
        v = v - q @ (q.T @ v)
        return q.at[:, j].set(v / jnp.linalg.norm(v))

    return jax.lax.fori_loop(0, n, column, jnp.zeros_like(a))


def orthogonal_init(scale: float = 1.0) -> Callable[..., jax.Array]:
    """Orthogonal initializer (Saxe et al. 2014), as `flax.linen.initializers.orthogonal` defines it
    (rows = all axes but the last), computed without LAPACK (see `_gram_schmidt_q`)."""

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        n_rows, n_cols = int(np.prod(shape[:-1])), int(shape[-1])
        tall = (max(n_rows, n_cols), min(n_rows, n_cols))
        q = _gram_schmidt_q(jax.random.normal(key, tall, jnp.float32))
        if n_rows < n_cols:
            q = q.T
        return (scale * q.reshape(shape)).astype(dtype)

    return init


def _dense(features: int, scale: float) -> nn.Dense:
    return nn.Dense(features, kernel_init=orthogonal_init(scale), bias_init=nn.initializers.zeros)


class Torso(nn.Module):
    """MLP (or conv + MLP) feature extractor."""

    config: NetConfig
    obs_ndim: int

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.config.activation]
        batch_shape = obs.shape[: obs.ndim - self.obs_ndim]
        x = obs.astype(jnp.float32)
        if self.config.kind == "cnn":
            if self.obs_ndim != 3:
                raise ValueError(f"The cnn torso needs (H, W, C) observations, got ndim {self.obs_ndim}")
            x = jnp.reshape(x, (-1,) + x.shape[-3:])
            k = self.config.conv_kernel
            x = act(nn.Conv(self.config.conv_features, (k, k), padding="VALID")(x))
            x = jnp.reshape(x, batch_shape + (-1,))
        else:
            x = jnp.reshape(x, batch_shape + (-1,))
        for width in self.config.hidden:
            x = act(_dense(width, np.sqrt(2.0))(x))
        return x


class ActorCritic(nn.Module):
    """Policy and value heads. `__call__` returns `(policy_params, value)`; `policy` and `value`
    compute one head only (the rollout samples actions with `policy` alone and evaluates the critic
    on the whole trajectory afterwards, in one batched call).

    policy_params are logits for discrete actions, or `concat(mean, log_std)` for a diagonal
    Gaussian with state-independent log standard deviation (Schulman et al. 2017).
    """

    config: NetConfig
    spec: ActionSpec
    obs_ndim: int

    def setup(self) -> None:
        self.actor_torso = Torso(self.config, self.obs_ndim)
        if self.config.separate_critic:
            self.critic_torso = Torso(self.config, self.obs_ndim)
        self.policy_head = _dense(self.spec.dim, 0.01)
        self.value_head = _dense(1, 1.0)
        if not self.spec.discrete:
            self.log_std = self.param("log_std", nn.initializers.zeros, (self.spec.dim,))

    def _policy_from_features(self, features: jax.Array) -> jax.Array:
        out = self.policy_head(features)
        if not self.spec.discrete:
            out = jnp.concatenate([out, jnp.broadcast_to(self.log_std, out.shape)], axis=-1)
        return out

    def policy(self, obs: jax.Array) -> jax.Array:
        return self._policy_from_features(self.actor_torso(obs))

    def value(self, obs: jax.Array) -> jax.Array:
        torso = self.critic_torso if self.config.separate_critic else self.actor_torso
        return self.value_head(torso(obs))[..., 0]

    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        actor_features = self.actor_torso(obs)
        critic_features = self.critic_torso(obs) if self.config.separate_critic else actor_features
        return self._policy_from_features(actor_features), self.value_head(critic_features)[..., 0]


class QNetwork(nn.Module):
    """Action values Q(s, .) for discrete actions."""

    config: NetConfig
    spec: ActionSpec
    obs_ndim: int

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        x = Torso(self.config, self.obs_ndim, name="torso")(obs)
        return _dense(self.spec.num_actions, 1.0)(x)


def make(
    net_config: NetConfig, obs_shape: Sequence[int], spec: ActionSpec, head: str = "actor_critic"
) -> nn.Module:
    """The one network factory. `head` is "actor_critic" (policy + value) or "q"."""
    net_config.validate()
    if head not in HEADS:
        raise ValueError(f"Unknown head {head!r}; expected one of {HEADS}")
    if head == "q":
        if not spec.discrete:
            raise ValueError("A Q-network needs a discrete action space")
        return QNetwork(net_config, spec, len(obs_shape))
    return ActorCritic(net_config, spec, len(obs_shape))
