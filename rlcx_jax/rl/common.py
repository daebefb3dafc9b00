"""Pieces every algorithm shares: config and hyperparameter bases, the training state, the static
build (env, network, hooks from extensions, forward pass), the optimizer chain, the trainer
(init / learn / train / act) and chunked scanning of updates with fixed-shape metrics.

The seams themselves (`Hooks`, `Extension`, loss terms) live in `rlcx_jax.seams`, below this package.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, Self, TypeVar

import jax
import jax.numpy as jnp
import optax
from flax import struct

from rlcx_jax import envs, nets, prng, xla
from rlcx_jax.configs.algorithms import HParams as HParams
from rlcx_jax.configs.algorithms import TrainConfig as TrainConfig
from rlcx_jax.envs.normalize import RunningStats, init_stats, normalize_observation
from rlcx_jax.rl import rollout
from rlcx_jax.seams import (
    ApplyFn,
    BuildContext,
    ExtensionTerms,
    Hooks,
    Params,
    combine_hooks,
    complete_ext_hparams,
    make_apply,
)


class Reducible(Protocol):
    """Metrics that combine a stacked block (leading axis) into one value."""

    def reduce(self) -> Any: ...


class BlockMetrics:
    """Base of an algorithm's per-update metrics (a `struct.dataclass`): `reduce` combines a stacked
    block of them (leading axis) into one. Fields named in `LAST` keep their last value (counters),
    fields with their own `reduce` (episode statistics) use it, every other leaf is averaged."""

    LAST: ClassVar[tuple[str, ...]] = ("env_steps",)

    def reduce(self) -> Self:
        def one(name: str, value: Any) -> Any:
            if name in self.LAST:
                return jax.tree.map(lambda x: x[-1], value)
            if isinstance(value, BlockMetrics | rollout.EpisodeMetrics):
                return value.reduce()
            return jax.tree.map(lambda x: jnp.mean(x, axis=0), value)

        fields = {f.name: one(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return self.replace(**fields)  # type: ignore[attr-defined]


S = TypeVar("S")
M = TypeVar("M", bound=Reducible)


@struct.dataclass
class TrainOutput(Generic[S, M]):
    """What `train(key, hparams)` returns: the final state and per-log-point metrics."""

    state: S
    metrics: M


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The functions an algorithm module builds from its static config (docs/architecture.md).

    init(key, hparams, env_params=None) -> state
    learn(state, n_updates) -> (state, metrics)      # n_updates static; chunked mode
    train(key, hparams, env_params=None) -> TrainOutput(state, metrics)   # init + learn, one scan
    act(params, obs_stats, obs, key, greedy) -> action  # the trained policy, for evaluation
    num_updates: updates in a full run; log_every: updates per metrics row.
    agent: the static build (env, network and its layout, action spec, forward pass).
    """

    config: Any
    init: Callable[..., Any]
    learn: Callable[..., Any]
    train: Callable[..., Any]
    act: Callable[..., Any]
    num_updates: int
    log_every: int
    agent: Agent


# ----------------------------------------------------------------------------------------------
# Training state and the static build shared by all algorithms
# ----------------------------------------------------------------------------------------------
@struct.dataclass
class TrainState:
    """What every algorithm's training state holds; `hparams` travel with it so `learn` is
    self-contained. `ext` holds each extension's own state. Implements `seams.HasParams`."""

    params: Params
    opt_state: optax.OptState
    runner: rollout.EnvRunner
    obs_stats: RunningStats
    key: jax.Array
    update_step: jax.Array
    hparams: Any
    env_params: Any
    ext: dict[str, Any]

    if TYPE_CHECKING:  # added by flax.struct.dataclass

        def replace(self, **changes: Any) -> Self: ...

    def with_params(self, params: Params) -> Self:
        return self.replace(params=params)


@dataclasses.dataclass(frozen=True)
class Agent:
    """Everything static an algorithm builds once from its config: env, network, forward pass
    (through every extension's hooks) and the extensions' loss terms."""

    config: Any
    env: Any
    env_params: Any
    spec: nets.ActionSpec
    obs_shape: tuple[int, ...]
    network: Any
    apply: ApplyFn
    hooks: Hooks
    terms: ExtensionTerms

    def prep_obs(self, stats: RunningStats, obs: jax.Array) -> jax.Array:
        """Observations as the network sees them (normalised when `config.normalize_obs`)."""
        if getattr(self.config, "normalize_obs", False):
            return normalize_observation(stats, obs)
        return obs

    def optimizer(self, hparams: Any) -> optax.GradientTransformation:
        anneal = self.config.optimizer_steps if self.config.anneal_lr else None
        return make_optimizer(hparams.lr, hparams.max_grad_norm, self.hooks, anneal, hparams.adam_eps, hparams)

    def value_and_grad(self, loss_fn: Callable[..., tuple[jax.Array, Any]]) -> Callable[..., Any]:
        """`(params, batch, ext_state, ext_hparams, *args) -> ((loss, aux), grads)` of an extended loss
        (`terms.add_to(loss)`): `jax.value_and_grad`, or the extensions' `Hooks.gradient`."""
        if self.hooks.gradient is None:
            return jax.value_and_grad(loss_fn, has_aux=True)
        return functools.partial(self.hooks.gradient, loss_fn)

    def gradient_step(
        self, params: Params, opt_state: optax.OptState, hparams: Any, grads: Params
    ) -> tuple[Params, optax.OptState]:
        """One optimizer step of the optax chain (with every hook), then `hooks.project_params`."""
        updates, opt_state = self.optimizer(hparams).update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if self.hooks.project_params is not None:
            params = self.hooks.project_params(params, opt_state)
        return params, opt_state


def build_agent(config: TrainConfig, hooks: Hooks = Hooks()) -> Agent:
    """Validate the config (before anything compiles) and build env, network, hooks and apply."""
    config.validate()
    env, env_params = envs.make_training_env(config.env, config.env_kwargs)
    spec = nets.action_spec(env.action_space(env_params))
    obs_shape = tuple(env.observation_space(env_params).shape)
    network = nets.make(config.net, obs_shape, spec, head=config.HEAD)
    ctx = BuildContext(network, obs_shape, spec, config.optimizer_steps)
    hooks = combine_hooks(hooks, config.extensions, ctx)
    apply = make_apply(network, hooks)
    terms = ExtensionTerms.build(config.extensions, dataclasses.replace(ctx, apply=apply))
    return Agent(config, env, env_params, spec, obs_shape, network, apply, hooks, terms)


def init_train_state(agent: Agent, key: jax.Array, hparams: Any, env_params: Any = None) -> TrainState:
    """Initial parameters, optimizer state, reset environments and extension states."""
    config = agent.config
    env_params = agent.env_params if env_params is None else env_params
    hparams = hparams.replace(ext=complete_ext_hparams(config.extensions, hparams.ext))
    key, (key_net, key_env) = next_keys(jax.random.key_data(seed_key(key, config.prng_impl)), config.prng_impl, 2)
    params = nets.init_variables(agent.network, key_net, jnp.zeros((1,) + agent.obs_shape, jnp.float32))["params"]
    key_ext = jax.random.fold_in(key_net, 1)
    ext_state = {
        e.name: e.init_state(jax.random.fold_in(key_ext, i), params, hparams.ext[e.name])
        for i, e in enumerate(config.extensions)
    }
    return TrainState(
        params=params,
        opt_state=agent.optimizer(hparams).init(params),
        runner=rollout.reset(agent.env, env_params, key_env, config.num_envs),
        obs_stats=init_stats(agent.obs_shape),
        key=key,
        update_step=jnp.zeros((), jnp.int32),
        hparams=hparams,
        env_params=env_params,
        ext=ext_state,
    )


def make_trainer(
    agent: Agent,
    init: Callable[[Agent, jax.Array, Any, Any], Any],
    update: Callable[[Agent, Any], tuple[Any, Any]],
    act: Callable[[Agent, Params, RunningStats, jax.Array, jax.Array, bool], jax.Array],
    greedy_default: bool,
) -> Trainer:
    """init / learn / train / act of an algorithm, given its init, its one update and its policy."""
    config = agent.config
    rows = config.updates_per_row

    def init_fn(key: jax.Array, hparams: Any, env_params: Any = None) -> Any:
        return init(agent, key, hparams, env_params)

    def learn(state: Any, n_updates: int) -> tuple[Any, Any]:
        return scan_updates(lambda s: update(agent, s), state, n_updates, rows)

    def train(key: jax.Array, hparams: Any, env_params: Any = None) -> TrainOutput:
        state, metrics = learn(init_fn(key, hparams, env_params), config.num_updates)
        return TrainOutput(state=state, metrics=metrics)

    def policy(
        params: Params, obs_stats: RunningStats, obs: jax.Array, key: jax.Array, greedy: bool = greedy_default
    ) -> jax.Array:
        return act(agent, params, obs_stats, obs, key, greedy)

    return Trainer(config, init_fn, learn, train, policy, config.num_updates, rows, agent)


# Parts of a training state that may hold per-seed integers (swept hyperparameters or environment
# parameters, extension state, environment state): never treated as shared counters.
PER_SEED_FIELDS = ("params", "runner", "obs_stats", "key", "hparams", "env_params", "ext")


def lockstep_counters(batched_state: Any) -> Any:
    """Tree of bools over a seed-batched training state: True for the step counters all seeds share.

    They are the integer leaves of shape (num_seeds,) outside PER_SEED_FIELDS: the update count,
    optimizer step counts (Adam, schedules, pruning) and replay positions. Seeds of one vmapped run
    start together and take the same number of steps, so these are equal across seeds."""
    counters = jax.tree.map(lambda x: bool(jnp.issubdtype(x.dtype, jnp.integer) and len(x.shape) == 1), batched_state)
    if not isinstance(batched_state, TrainState):
        return jax.tree.map(lambda _: False, counters)
    never = {name: jax.tree.map(lambda _: False, getattr(counters, name)) for name in PER_SEED_FIELDS}
    return counters.replace(**never)


def vmap_learn(trainer: Trainer, n_updates: int, batched_state: Any) -> Callable[[Any], tuple[Any, Any]]:
    """`learn(state, n_updates)` over a seed-batched state, with the lockstep step counters unbatched.

    A plain `vmap(learn)` batches every leaf of the state, so a `lax.cond` whose predicate comes from
    a step counter (a pruning schedule, DQN's learning start) sees a batched predicate and becomes a
    `select` that runs both branches at every step. Here the counters enter the vmap unbatched
    (`in_axes=None`, the first seed's value) and leave it unbatched, so such branches stay real
    branches; they are broadcast back to (num_seeds,) so the state keeps its layout (checkpoints).
    If some integer scalar is not a lockstep counter (its output depends on per-seed data), tracing
    fails and a plain `vmap` is returned instead. `batched_state` may be abstract (shapes only).
    """
    shared = lockstep_counters(batched_state)
    axes = jax.tree.map(lambda s: None if s else 0, shared)

    def learn(state: Any) -> tuple[Any, Any]:
        num_seeds = jax.tree.leaves(state)[0].shape[0]
        squeezed = jax.tree.map(lambda x, s: x[0] if s else x, state, shared)
        new, metrics = jax.vmap(lambda st: trainer.learn(st, n_updates), in_axes=(axes,), out_axes=(axes, 0))(squeezed)
        widen = lambda x, s: jnp.broadcast_to(x, (num_seeds, *jnp.shape(x))) if s else x  # noqa: E731
        return jax.tree.map(widen, new, shared), metrics

    try:
        jax.eval_shape(learn, batched_state)
    except ValueError:  # a shared integer leaf became per-seed: batch everything
        return jax.vmap(lambda st: trainer.learn(st, n_updates))
    return learn


def fused_products(trainer: Trainer, batched_state: Any) -> bool:
    """Whether `vmap_learn` over `batched_state` compiles with `xla.FUSED_DOT_OPTIONS`: what the
    trainer's config says for that many seeds (`TrainConfig.fused_products`; False for configs
    without the method)."""
    decide = getattr(trainer.config, "fused_products", None)
    return bool(decide(int(jax.tree.leaves(batched_state)[0].shape[0]))) if callable(decide) else False


def batched_learner(trainer: Trainer) -> Callable[[Any, int], tuple[Any, Any]]:
    """`learn(batched_state, n_updates)`: `vmap_learn`, jitted once per `n_updates`."""
    compiled: dict[int, Callable[[Any], tuple[Any, Any]]] = {}

    def learn(state: Any, n_updates: int) -> tuple[Any, Any]:
        if n_updates not in compiled:
            compiled[n_updates] = xla.jit(
                vmap_learn(trainer, n_updates, state), fused_products=fused_products(trainer, state)
            )
        return compiled[n_updates](state)

    return learn


def mean_ext_aux(ext_aux: dict[str, Any]) -> dict[str, Any]:
    """Extension loss-term values and aux averaged over minibatches / epochs (any leading axes)."""
    return jax.tree.map(jnp.mean, ext_aux)


def make_optimizer(
    lr: jax.Array | float,
    max_grad_norm: jax.Array | float,
    hooks: Hooks = Hooks(),
    anneal_steps: int | None = None,
    eps: jax.Array | float = 1e-5,
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
def scan_updates(update_fn: Callable[[S], tuple[S, M]], state: S, num_updates: int, log_every: int = 1) -> tuple[S, M]:
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


def minibatch_epochs(
    step: Callable[[Any, Any], tuple[Any, Any]], carry: Any, batch: Any, perms: jax.Array, num_minibatches: int
) -> tuple[Any, Any]:
    """One pass over a flat batch per row of `perms` (a permutation each), in `num_minibatches`
    minibatches: `step(carry, minibatch) -> (carry, aux)` scanned over minibatches, then over epochs.
    Every leaf of `batch` (extras included) is shuffled and split along its leading axis."""

    def epoch(c: Any, perm: jax.Array) -> tuple[Any, Any]:
        minibatches = jax.tree.map(lambda x: jnp.reshape(x[perm], (num_minibatches, -1) + x.shape[1:]), batch)
        return jax.lax.scan(step, c, minibatches)

    return jax.lax.scan(epoch, carry, perms)


def tree_stack(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def broadcast_tree(tree: Any, n: int) -> Any:
    """Give every leaf a leading axis of size n (e.g. one hyperparameter setting per seed)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (n,) + jnp.shape(x)), tree)


# ----------------------------------------------------------------------------------------------
# PRNG keys inside training state
# ----------------------------------------------------------------------------------------------
PRNG_IMPLS = prng.IMPLS


def seed_key(key: jax.Array, impl: str) -> jax.Array:
    """A typed key of implementation `impl`, derived deterministically from the caller's key.

    The caller passes an ordinary `jax.random.PRNGKey` (threefry). "threefry2x32" keys run on
    `prng.THREEFRY` (JAX's bits, lowered without loops); training may also run on XLA's
    RngBitGenerator ("unsafe_rbg", "rbg"), whose bits differ.
    """
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    threefry = jax.random.wrap_key_data(key, impl=prng.THREEFRY)
    if impl == "threefry2x32":
        return threefry
    width = jax.random.key_data(jax.random.key(0, impl=impl)).shape[-1]
    return jax.random.wrap_key_data(jax.random.bits(threefry, (width,), jnp.uint32), impl=impl)


def next_keys(state_key: jax.Array, impl: str, n: int) -> tuple[jax.Array, jax.Array]:
    """Split the raw key data kept in a training state: (new raw key data, n typed subkeys).

    States keep raw key data (plain uint32 arrays) so they vmap, checkpoint and compare like any
    other array."""
    keys = jax.random.split(jax.random.wrap_key_data(state_key, impl=prng.jax_impl(impl)), n + 1)
    return jax.random.key_data(keys[0]), keys[1:]
