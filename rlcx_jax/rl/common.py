"""Pieces every algorithm shares: the forward-pass wrapper, the optimizer chain, the output type,
hooks for later capabilities, and chunked scanning of updates with fixed-shape metrics.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Generic, Protocol, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

Params = Any
ApplyFn = Callable[..., Any]
S = TypeVar("S")
M = TypeVar("M")


@struct.dataclass
class TrainOutput(Generic[S, M]):
    """What `train(key, hparams)` returns: the final state and per-log-point metrics."""

    state: S
    metrics: M


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The functions an algorithm module builds from its static config (DESIGN.md section 3).

    init(key, hparams, env_params=None) -> state
    learn(state, n_updates) -> (state, metrics)      # n_updates static; chunked mode
    train(key, hparams, env_params=None) -> TrainOutput(state, metrics)   # init + learn, one scan
    act(state_or_params..., obs, key, greedy) -> action  # the trained policy, for evaluation
    num_updates: updates in a full run; log_every: updates per metrics row.
    """

    config: Any
    init: Callable[..., Any]
    learn: Callable[..., Any]
    train: Callable[..., Any]
    act: Callable[..., Any]
    num_updates: int
    log_every: int


# ----------------------------------------------------------------------------------------------
# Seams (DESIGN.md section 6)
# ----------------------------------------------------------------------------------------------
class ParamTransform(Protocol):
    def __call__(self, params: Params) -> Params: ...


@dataclasses.dataclass(frozen=True)
class Hooks:
    """Static extension points, so compression and expansion plug in without editing algorithms.

    param_transform: maps parameters on their way into every forward pass (a mask, fake
        quantization); identity when None. Gradients flow through it (e.g. a straight-through
        estimator).
    interceptor: a `flax.linen.intercept_methods` interceptor active during every forward pass,
        to transform activations (e.g. fake-quantize layer inputs/outputs).
    extra_grad_transforms: optax transformations applied to the gradient tree before the
        optimizer (e.g. gradient surgery across tasks).
    post_update: `hparams -> optax transformation` applied to the optimizer's final updates
        (with the parameters), built from the traced hyperparameters (e.g. keep pruned weights at
        exactly zero, with the target sparsity a hyperparameter).
    """

    param_transform: Callable[[Params], Params] | None = None
    interceptor: Callable[..., Any] | None = None
    extra_grad_transforms: tuple[optax.GradientTransformation, ...] = ()
    post_update: Callable[[Any], optax.GradientTransformation] | None = None

    def merge(self, other: "Hooks") -> "Hooks":
        """Both sets of hooks: `self`'s parameter transform and interceptor run first (outermost)."""
        return Hooks(
            param_transform=_compose(other.param_transform, self.param_transform),
            interceptor=_nest_interceptors(self.interceptor, other.interceptor),
            extra_grad_transforms=self.extra_grad_transforms + other.extra_grad_transforms,
            post_update=_chain_post_updates(self.post_update, other.post_update),
        )


def _compose(outer: Callable | None, inner: Callable | None) -> Callable | None:
    if outer is None or inner is None:
        return outer or inner
    return lambda params: outer(inner(params))


def _nest_interceptors(first: Callable | None, second: Callable | None) -> Callable | None:
    if first is None or second is None:
        return first or second

    def interceptor(next_fun: Callable, args: Any, kwargs: Any, context: Any) -> Any:
        inner = lambda *a, **k: second(next_fun, a, k, context)  # noqa: E731
        return first(inner, args, kwargs, context)

    return interceptor


def _chain_post_updates(a: Callable | None, b: Callable | None) -> Callable | None:
    if a is None or b is None:
        return a or b
    return lambda hparams: optax.chain(a(hparams), b(hparams))


def make_apply(network: nn.Module, hooks: Hooks = Hooks()) -> ApplyFn:
    """The one forward-pass wrapper: `apply(params, *inputs)` through the hooks."""
    param_transform = hooks.param_transform
    interceptor = hooks.interceptor

    def apply(params: Params, *inputs: Any, **kwargs: Any) -> Any:
        if param_transform is not None:
            params = param_transform(params)
        if interceptor is None:
            return network.apply({"params": params}, *inputs, **kwargs)
        with nn.intercept_methods(interceptor):
            return network.apply({"params": params}, *inputs, **kwargs)

    return apply


def make_optimizer(
    lr: jax.Array | float,
    max_grad_norm: jax.Array | float,
    hooks: Hooks = Hooks(),
    anneal_steps: int | None = None,
    eps: float = 1e-5,
    hparams: Any = None,
) -> optax.GradientTransformation:
    """The optax chain, built in one place from traced hyperparameters.

    hooks.extra_grad_transforms -> [flat: clip by global norm -> Adam -> -lr * schedule]
    -> hooks.post_update(hparams).
    The Adam part runs on one flat vector (`optax.flatten`): on CPU one large fused update beats a
    tree of small leaves. `anneal_steps` decays the learning rate linearly to zero over that many
    optimizer steps (PureJaxRL's CartPole setting).
    """

    def schedule(count: jax.Array) -> jax.Array:
        if anneal_steps is None:
            return -jnp.asarray(lr, jnp.float32)
        frac = 1.0 - jnp.minimum(count, anneal_steps) / anneal_steps
        return -jnp.asarray(lr, jnp.float32) * frac

    core = optax.chain(
        optax.clip_by_global_norm(max_grad_norm),
        optax.scale_by_adam(eps=eps),
        optax.scale_by_schedule(schedule),
    )
    post = () if hooks.post_update is None else (hooks.post_update(hparams),)
    return optax.chain(*hooks.extra_grad_transforms, optax.flatten(core), *post)


# ----------------------------------------------------------------------------------------------
# Scanning updates with fixed-shape metrics
# ----------------------------------------------------------------------------------------------
class Reducible(Protocol):
    def reduce(self) -> Any: ...


def scan_updates(
    update_fn: Callable[[S], tuple[S, M]], state: S, num_updates: int, log_every: int = 1
) -> tuple[S, M]:
    """Run `num_updates` updates in `lax.scan`; metrics are reduced over each block of `log_every`.

    `metrics.reduce()` (a method of the metrics type) turns a stacked block into one value, so the
    returned metrics have leading shape `(num_updates // log_every,)` whatever the step count.
    """
    if num_updates % log_every != 0:
        raise ValueError(f"num_updates ({num_updates}) must be a multiple of log_every ({log_every})")

    def block(s: S, _: None) -> tuple[S, M]:
        s, stacked = jax.lax.scan(lambda c, __: update_fn(c), s, None, length=log_every)
        return s, stacked.reduce()

    return jax.lax.scan(block, state, None, length=num_updates // log_every)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `x` where `mask`; zero when the mask is empty (never NaN)."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def tree_stack(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def broadcast_tree(tree: Any, n: int) -> Any:
    """Give every leaf a leading axis of size n (e.g. one hyperparameter setting per seed)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (n,) + jnp.shape(x)), tree)


# ----------------------------------------------------------------------------------------------
# PRNG keys inside training state
# ----------------------------------------------------------------------------------------------
PRNG_IMPLS = ("threefry2x32", "unsafe_rbg", "rbg")


def check_prng_impl(impl: str) -> None:
    if impl not in PRNG_IMPLS:
        raise ValueError(f"Unknown prng_impl {impl!r}; expected one of {PRNG_IMPLS}")


def seed_key(key: jax.Array, impl: str) -> jax.Array:
    """A typed key of implementation `impl`, derived deterministically from the caller's key.

    The caller passes an ordinary `jax.random.PRNGKey` (threefry). Training may run on another
    implementation: on CPU, XLA's RngBitGenerator ("unsafe_rbg") makes the per-step random numbers
    of a rollout (action sampling, gymnax's auto-reset) about 5x cheaper than threefry hashing,
    and random-number generation dominates a small agent's rollout step.
    """
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    threefry = jax.random.wrap_key_data(key, impl="threefry2x32")
    if impl == "threefry2x32":
        return threefry
    width = jax.random.key_data(jax.random.key(0, impl=impl)).shape[-1]
    return jax.random.wrap_key_data(jax.random.bits(threefry, (width,), jnp.uint32), impl=impl)


def next_keys(state_key: jax.Array, impl: str, n: int) -> tuple[jax.Array, jax.Array]:
    """Split the raw key data kept in a training state: (new raw key data, n typed subkeys).

    States keep raw key data (plain uint32 arrays) so they vmap, checkpoint and compare like any
    other array."""
    keys = jax.random.split(jax.random.wrap_key_data(state_key, impl=impl), n + 1)
    return jax.random.key_data(keys[0]), keys[1:]


def check_sparsity(value: float) -> None:
    """A target sparsity (fraction of pruned weights) must lie in [0, 1)."""
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {value}")


def check_positive(name: str, value: int | float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


def check_range(name: str, value: float, low: float, high: float, high_inclusive: bool = True) -> None:
    ok = low <= value <= high if high_inclusive else low <= value < high
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}")
