"""Networks built from a static config through registries of torsos and heads (docs/architecture.md).

* A **torso** turns observations into features: a Flax module `Torso(config, obs_ndim)` whose
  `__call__(obs)` maps `(*batch, *obs_shape)` to `(*batch, features)`. Register one with
  `@register_torso("name")` and choose it with `NetConfig(torso="name")`.
* A **head** is the whole network an algorithm trains (actor-critic, Q-network): it builds torsos from
  the registry, has a `policy(obs)` method whose output gives the greedy action (`rl.policy`), and
  describes its own parameter layout (`layout(config)`: which top-level parameter groups are torso,
  actor head, critic, Q head), so compression, shrink, export and size accounting select by role
  instead of by hard-coded names.
* An optional task input threads through every head: `apply(params, obs, task=t)` concatenates the
  task vector `t` (float features, e.g. an embedding or a one-hot task id) to the torso features
  before the output layers (task-conditioned heads). A network initialised with a task input must
  always get one.
* Multi-task networks (`NetConfig(num_tasks=T)`): flat observations end with a one-hot task id of
  length T. The torso reads the observation without it; with `task_mode="heads"` every output layer
  is a `TaskDense` (one kernel and bias per task, the task's own chosen by the one-hot), with
  "embedding" the one-hot joins the torso features, with "shared" it is not used.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlcx_jax import prng
from rlcx_jax.configs.nets import DENSE_GRADS, NetConfig, add_torso_name, unknown_name

__all__ = [
    "NetConfig",
    "ActionSpec",
    "Layout",
    "make",
    "layout",
    "init_params",
    "init_variables",
    "register_torso",
    "register_head",
    "orthogonal_init",
    "dense",
    "action_spec",
    "TaskDense",
    "ActorCritic",
    "QNetwork",
    "PolicyNetwork",
    "MLPTorso",
    "CNNTorso",
    "TORSOS",
    "HEADS",
]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": nn.tanh,
    "relu": nn.relu,
    "gelu": nn.gelu,
    "elu": nn.elu,
    "silu": nn.silu,
}
TORSOS: dict[str, type[nn.Module]] = {}
HEADS: dict[str, type[nn.Module]] = {}


def _register(table: dict[str, type[nn.Module]], what: str, name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    if not name or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"A {what} name must be letters, digits, '_' or '-', got {name!r}")

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        known = table.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"Another {what} ({known.__qualname__}) is registered as {name!r}")
        table[name] = cls
        return cls

    return decorator


def register_torso(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: `NetConfig(torso=name)` builds this module as every torso of a network.
    The module takes the fields `config: NetConfig` and `obs_ndim: int`."""
    decorator = _register(TORSOS, "torso", name)
    add_torso_name(name)
    return decorator


def register_head(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: `nets.make(..., head=name)` builds this module. It takes the fields
    `config`, `spec`, `obs_ndim`, has `policy(obs, task=None)` and a classmethod `layout(config)`."""
    return _register(HEADS, "head", name)


_unknown = unknown_name


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which top-level parameter groups of a network play which role.

    roles: (role, names) pairs; the roles every head declares are
      "torso"        every feature extractor,
      "actor_head"   output layers of the policy (actor-critic),
      "critic_head"  the value output layer (actor-critic),
      "q_head"       the Q-value output layer (Q-network),
      "head"         every output layer,
      "policy"       everything a greedy action needs (actor torso + actor head, or the Q-network),
      "critic"       what only the value estimate needs (critic torso and value head).
    feeds: (torso, output layers that read its features): what structured shrinking must resize.
    attention: '/'-joined paths of the attention layers inside the torsos (modules holding `query`,
      `key`, `value` and `out`, e.g. "actor_torso/block_0/attention"), declared by torsos with a
      classmethod `attention_paths(config)`: what head pruning selects.
    """

    roles: tuple[tuple[str, tuple[str, ...]], ...]
    feeds: tuple[tuple[str, tuple[str, ...]], ...] = ()
    attention: tuple[str, ...] = ()

    def groups(self, *roles: str) -> tuple[str, ...]:
        """Top-level parameter names in any of `roles` (unknown roles are an error)."""
        table = dict(self.roles)
        unknown = [r for r in roles if r not in table]
        if unknown:
            raise ValueError(f"Unknown role(s) {unknown}; this network has {sorted(table)}")
        out: list[str] = []
        for role in roles:
            out += [n for n in table[role] if n not in out]
        return tuple(out)

    def prefixes(self, *roles: str) -> tuple[str, ...]:
        """Path prefixes of `roles` for `compress.size` (a group or a group's sub-paths)."""
        return self.groups(*roles)

    def patterns(self, roles: Sequence[str], include: Sequence[str] = (r".*",)) -> tuple[str, ...]:
        """Regexes (for `nets.paths.select`) selecting the paths that lie in `roles` and match an
        `include` regex: one regex per include, e.g. `(?=(?:actor_torso|critic_torso)(?:/|$)).*kernel`."""
        names = self.groups(*roles)
        if not names:
            raise ValueError(f"The role(s) {list(roles)} hold no parameters in this network")
        group = "|".join(re.escape(n) for n in names)
        return tuple(f"(?=(?:{group})(?:/|$))(?:{inc})" for inc in include)


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
    """The Q factors (positive-diagonal R convention) of a stack of tall matrices `a` [k, m, n]
    (m >= n), in plain jnp; zero rows and trailing zero columns give zero rows and columns of Q.

    Gram-Schmidt with one re-orthogonalisation pass ("twice is enough", Giraud et al. 2005),
    column by column under one `lax.fori_loop` for the whole stack. It stands in for
    `jnp.linalg.qr` because on CPU that is a LAPACK custom call whose batched form (one QR per
    vmapped seed) schedules work on XLA's intra-op thread pool from inside that pool and can
    deadlock: a vmapped `train` then waits forever in `block_until_ready` with every thread idle.
    """

    def project_out(q: jax.Array, v: jax.Array) -> jax.Array:  # v - Q (Q^T v), per matrix of the stack
        coefficients = jax.lax.dot_general(q, v, (((1,), (1,)), ((0,), (0,))))  # [k, n]
        return v - jax.lax.dot_general(q, coefficients, (((2,), (1,)), ((0,), (0,))))  # [k, m]

    def column(j: jax.Array, q: jax.Array) -> jax.Array:
        v = jax.lax.dynamic_index_in_dim(a, j, axis=-1, keepdims=False)  # [k, m]; columns >= j of q are 0
        v = project_out(q, project_out(q, v))
        norm = jnp.linalg.norm(v, axis=-1, keepdims=True)
        return jax.lax.dynamic_update_index_in_dim(q, v / jnp.where(norm > 0, norm, 1.0), j, axis=-1)

    return jax.lax.fori_loop(0, a.shape[-1], column, jnp.zeros_like(a))


def _tall_shape(shape: Sequence[int]) -> tuple[tuple[int, int], bool]:
    """The tall matrix behind an orthogonal kernel of `shape` (rows = all axes but the last), and
    whether the kernel is its transpose (a wide kernel)."""
    n_rows, n_cols = int(np.prod(shape[:-1])), int(shape[-1])
    return (max(n_rows, n_cols), min(n_rows, n_cols)), n_rows < n_cols


def _orthogonal_kernels(
    keys: Sequence[jax.Array], shapes: Sequence[tuple[int, ...]], scales: Sequence[float], dtypes: Sequence[Any]
) -> list[jax.Array]:
    """Orthogonal kernels (`orthogonal_init`) for each key, shape, gain and dtype: the normal draws
    as one (`prng.normals`) and one Gram-Schmidt loop over all of them, each zero-padded to the
    largest rows and columns. XLA compiles a draw and a loop once instead of once per kernel."""
    talls = [_tall_shape(shape)[0] for shape in shapes]
    draws = prng.normals(keys, talls)
    rows, cols = max(m for m, _ in talls), max(n for _, n in talls)
    qs = _gram_schmidt_q(jnp.stack([jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1]))) for a in draws]))
    kernels = []
    for q, (m, n), shape, scale, dtype in zip(qs, talls, shapes, scales, dtypes):
        q = q[:m, :n].T if _tall_shape(shape)[1] else q[:m, :n]
        kernels.append((scale * q.reshape(shape)).astype(dtype))
    return kernels


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _orthogonal_kernel(key: jax.Array, shape: tuple[int, ...], scale: float, dtype: Any) -> jax.Array:
    """One orthogonal kernel, jitted like jax.random's samplers: flax checks every parameter's shape
    on each `apply` by tracing its initializer under `jax.eval_shape`, and a jitted initializer is
    traced once per (key type, shape, gain, dtype) instead of on every check (PPO's CartPole
    program checks 18 kernels of 4 shapes: about 0.15 s less tracing on a 2-core CPU)."""
    return _orthogonal_kernels([key], [shape], [scale], [dtype])[0]


def orthogonal_init(scale: float = 1.0) -> Callable[..., jax.Array]:
    """Orthogonal initializer (Saxe et al. 2014), as `flax.linen.initializers.orthogonal` defines it
    (rows = all axes but the last; the same normal draw), computed without LAPACK (see
    `_gram_schmidt_q`). Inside `init_variables` the kernel is made after the init pass, together
    with every other one."""

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        if _DEFERRED.passes:
            return _DEFERRED.passes[-1].add(key, tuple(shape), scale, dtype)
        return _orthogonal_kernel(key, tuple(shape), float(scale), dtype)

    return init


@dataclasses.dataclass
class _Deferred:
    """The orthogonal kernels asked for during one `init_variables` pass, as placeholders."""

    placeholders: list[jax.Array] = dataclasses.field(default_factory=list)
    requests: list[tuple[jax.Array, tuple[int, ...], float]] = dataclasses.field(default_factory=list)

    def add(self, key: jax.Array, shape: tuple[int, ...], scale: float, dtype: Any) -> jax.Array:
        self.placeholders.append(jnp.zeros(shape, dtype))
        self.requests.append((key, shape, scale))
        return self.placeholders[-1]

    def kernels(self) -> dict[int, jax.Array]:
        """id(placeholder) -> its orthogonal kernel."""
        keys, shapes, scales = zip(*self.requests)
        made = _orthogonal_kernels(keys, shapes, scales, [p.dtype for p in self.placeholders])
        return {id(p): k for p, k in zip(self.placeholders, made)}


class _DeferredPasses(threading.local):
    """The `init_variables` passes in progress in this thread (trace time only): per thread, so
    networks initialised in two threads at once never collect each other's kernels."""

    def __init__(self) -> None:
        self.passes: list[_Deferred] = []


_DEFERRED = _DeferredPasses()


def init_variables(module: nn.Module, key: jax.Array, *args: Any, **kwargs: Any) -> Any:
    """`module.init(key, *args, **kwargs)` with every `orthogonal_init` kernel made after the init
    pass, all in one normal draw and one Gram-Schmidt loop (`_orthogonal_kernels`) instead of one
    of each per layer: the same values up to float rounding (the padded loop rounds some entries
    differently, by about 1e-8), and PPO's CartPole training program compiles about 0.45 s (11%)
    faster on a 2-core CPU. Training initialises its networks through this."""
    deferred = _Deferred()
    _DEFERRED.passes.append(deferred)
    try:
        variables = module.init(key, *args, **kwargs)
    finally:
        _DEFERRED.passes.pop()
    if not deferred.placeholders:
        return variables
    kernels = deferred.kernels()
    placed: list[int] = []

    def place(x: Any) -> Any:
        if id(x) in kernels:
            placed.append(id(x))
            return kernels[id(x)]
        return x

    variables = jax.tree.map(place, variables)
    if sorted(placed) != sorted(kernels):
        raise RuntimeError(
            f"{type(module).__name__}.init did not return every orthogonal_init kernel as drawn"
            f" ({len(placed)} of {len(kernels)}); initialise it with its own .init instead"
        )
    return variables


def _dot_last_first(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., in] @ kernel [in, out]."""
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def transposed_grad_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`x @ kernel` whose kernel gradient is a standard matrix product on a transposed copy.

    Forward: y = x W. Backward: dx = dy W^T and dW = (x^T) dy, with x^T materialised first (or
    dW = ((dy^T) x)^T when the layer has fewer outputs than inputs, transposing the smaller operand).
    The values are those of autodiff; what changes is the form XLA:CPU sees: autodiff's dW is a
    product that contracts both operands' leading (batch) axis, which XLA:CPU hands to Eigen, while a
    product contracting lhs-last with rhs-first goes to its faster YNNPACK kernels (with the
    transpose, about 1.1x faster PPO training on CartPole at 1 and 32 seeds; README, "Throughput").
    Reverse mode only (grad, vjp, grad of grad); forward mode (jvp, jacfwd, hessian) needs
    `NetConfig(dense_grad="autodiff")`.
    """
    return _dot_last_first(x, kernel)


def _tgm_fwd(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _dot_last_first(x, kernel), (x, kernel)


def _tgm_bwd(residuals: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    dx = jax.lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())))
    rows, d_rows = jnp.reshape(x, (-1, x.shape[-1])), jnp.reshape(dy, (-1, dy.shape[-1]))
    # The barrier keeps XLA from folding the transpose back into the product's dimension numbers.
    if d_rows.shape[1] < rows.shape[1]:
        return dx, jnp.dot(jax.lax.optimization_barrier(d_rows.T), rows).T
    return dx, jnp.dot(jax.lax.optimization_barrier(rows.T), d_rows)


transposed_grad_matmul.defvjp(_tgm_fwd, _tgm_bwd)


def _transposed_grad_dot(
    lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None, **kwargs: Any
) -> jax.Array:
    """`lax.dot_general` for `nn.Dense`: its product (last axis of lhs with the kernel's first) goes through
    `transposed_grad_matmul`; anything else (a precision, another contraction) to `lax.dot_general`."""
    if precision is None and not kwargs and rhs.ndim == 2 and dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())):
        return transposed_grad_matmul(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)


def dense(features: int, scale: float, name: str | None = None, grad: str = "transposed") -> nn.Dense:
    """A Dense layer with orthogonal kernel init of gain `scale` and zero bias (PPO's init).

    `grad`: "transposed" takes the kernel gradient with `transposed_grad_matmul` (faster on XLA:CPU,
    reverse mode only), "autodiff" leaves it to JAX (`NetConfig.dense_grad`)."""
    if grad not in DENSE_GRADS:
        raise ValueError(f"dense grad must be one of {DENSE_GRADS}, got {grad!r}")
    dot = _transposed_grad_dot if grad == "transposed" else None
    return nn.Dense(
        features, kernel_init=orthogonal_init(scale), bias_init=nn.initializers.zeros, name=name, dot_general=dot
    )


def _flatten_obs(obs: jax.Array, obs_ndim: int) -> jax.Array:
    batch_shape = obs.shape[: obs.ndim - obs_ndim]
    return jnp.reshape(obs.astype(jnp.float32), batch_shape + (-1,))


def _mlp(x: jax.Array, config: NetConfig) -> jax.Array:
    act = ACTIVATIONS[config.activation]
    for width in config.hidden:
        x = act(dense(width, np.sqrt(2.0), grad=config.dense_grad)(x))
    return x


@register_torso("mlp")
class MLPTorso(nn.Module):
    """Flatten the observation, then `hidden` dense layers (Dense_0, Dense_1, ...)."""

    config: NetConfig
    obs_ndim: int

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        return _mlp(_flatten_obs(obs, self.obs_ndim), self.config)


class PatchConv(nn.Module):
    """A VALID, stride-1 2-D convolution computed as one matrix product over extracted patches:
    y[..., h, w, f] = b[f] + sum_{i, j, c} x[..., h + i, w + j, c] K[i, j, c, f]
    (patches flattened in (i, j, c) order, so K is flax's (kh, kw, C, F) kernel reshaped).

    Same parameters, initializers and outputs as `nn.Conv(F, (kh, kw), padding="VALID")` (tested
    against `lax.conv_general_dilated`). On XLA:CPU the convolution's weight gradient is the slow
    part of a PPO update on MinAtar-sized inputs (10x10x4), and `vmap` over seeds turns it into a
    grouped convolution that is slower still; the patch matrix product trains about 6x faster there."""

    features: int
    kernel_size: tuple[int, int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        channels = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, channels, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        height, width = x.shape[-3] - kh + 1, x.shape[-2] - kw + 1
        if height < 1 or width < 1:
            raise ValueError(f"A {kh}x{kw} kernel does not fit a {x.shape[-3]}x{x.shape[-2]} observation")
        patches = jnp.concatenate(
            [x[..., i : i + height, j : j + width, :] for i in range(kh) for j in range(kw)], axis=-1
        )
        return patches @ jnp.reshape(kernel, (kh * kw * channels, self.features)) + bias


@register_torso("cnn")
class CNNTorso(nn.Module):
    """One VALID conv layer (Conv_0) over (H, W, C) observations, flattened, then `hidden` dense
    layers (the MinAtar network of Young & Tian 2019)."""

    config: NetConfig
    obs_ndim: int

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        if self.obs_ndim != 3:
            raise ValueError(f"The cnn torso needs (H, W, C) observations, got ndim {self.obs_ndim}")
        act = ACTIVATIONS[self.config.activation]
        batch_shape = obs.shape[: obs.ndim - 3]
        x = jnp.reshape(obs.astype(jnp.float32), (-1,) + obs.shape[-3:])
        k = self.config.conv_kernel
        x = act(PatchConv(self.config.conv_features, (k, k), name="Conv_0")(x))
        return _mlp(jnp.reshape(x, batch_shape + (-1,)), self.config)


class TaskDense(nn.Module):
    """One Dense layer per task: y = x W_t + b_t for the task t whose one-hot is `task` [..., T].

    kernel [T, in, out] (each task's slice initialised like `dense`: orthogonal of gain `scale`), bias
    [T, out]. Every task's output is computed and the one-hot picks one by multiplication, so task t's
    output, and its gradient, involve only W_t and b_t exactly (the others are multiplied by 0)."""

    features: int
    num_tasks: int
    scale: float

    @nn.compact
    def __call__(self, x: jax.Array, task: jax.Array) -> jax.Array:
        def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
            one = lambda k: _orthogonal_kernel(k, tuple(shape[1:]), float(self.scale), dtype)  # noqa: E731
            return jax.vmap(one)(jax.random.split(key, shape[0]))  # each task's kernel made now, not deferred

        kernel = self.param("kernel", init, (self.num_tasks, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.num_tasks, self.features))
        every_task = jnp.einsum("...i,tio->...to", x, kernel) + bias
        return jnp.einsum("...t,...to->...o", task.astype(every_task.dtype), every_task)


def _output_layer(config: NetConfig, features: int, scale: float, name: str | None = None) -> nn.Module:
    """An output layer: a `TaskDense` in a multi-task network with per-task heads, else `dense`."""
    if config.num_tasks and config.task_mode == "heads":
        return TaskDense(features, config.num_tasks, scale, name=name)
    return dense(features, scale, name=name, grad=config.dense_grad)


def _head(layer: nn.Module, features: jax.Array, task_id: jax.Array | None) -> jax.Array:
    """Apply an output layer (per-task layers get the task one-hot)."""
    if isinstance(layer, TaskDense):
        assert task_id is not None
        return layer(features, task_id)
    return layer(features)


def _split_task(config: NetConfig, obs: jax.Array, obs_ndim: int) -> tuple[jax.Array, jax.Array | None]:
    """(observation, task one-hot or None): a multi-task network's flat observations end with the one-hot."""
    if not config.num_tasks:
        return obs, None
    if obs_ndim != 1:
        raise ValueError(f"Multi-task networks (num_tasks > 0) take flat observations, got ndim {obs_ndim}")
    if obs.shape[-1] <= config.num_tasks:
        raise ValueError(
            f"A num_tasks={config.num_tasks} network needs observations longer than the task one-hot, "
            f"got {obs.shape[-1]} features"
        )
    # re-made from the argmax, so it stays an exact one-hot after observation normalisation (which
    # keeps the task's entry the only positive one)
    task_id = jax.nn.one_hot(jnp.argmax(obs[..., -config.num_tasks :], axis=-1), config.num_tasks)
    return obs[..., : -config.num_tasks], task_id


def _task_features(config: NetConfig, features: jax.Array, task_id: jax.Array | None) -> jax.Array:
    """The one-hot joins the features in "embedding" mode; otherwise the features as they are."""
    if task_id is not None and config.task_mode == "embedding":
        return jnp.concatenate([features, task_id], axis=-1)
    return features


def _torso(config: NetConfig, obs_ndim: int, name: str) -> nn.Module:
    if config.torso not in TORSOS:
        raise _unknown("torso", config.torso, TORSOS)
    return TORSOS[config.torso](config, obs_ndim, name=name)


def _attention_paths(config: NetConfig, torsos: Sequence[str]) -> tuple[str, ...]:
    """The attention layers of `torsos`, as the registered torso declares them (`attention_paths`)."""
    declare = getattr(TORSOS.get(config.torso), "attention_paths", None)
    if declare is None:
        return ()
    return tuple(f"{torso}/{path}" for torso in torsos for path in declare(config))


def _policy_output(head_out: jax.Array, log_std: jax.Array | None) -> jax.Array:
    """The policy head's output: logits as they are (`log_std` None), or concat(mean, log_std) for a
    diagonal Gaussian with a state-independent log standard deviation."""
    if log_std is None:
        return head_out
    return jnp.concatenate([head_out, jnp.broadcast_to(log_std, head_out.shape)], axis=-1)


def _with_task(features: jax.Array, task: jax.Array | None) -> jax.Array:
    """Task-conditioned heads: the task vector joins the torso features (broadcast over the batch)."""
    if task is None:
        return features
    task = jnp.asarray(task, jnp.float32)
    task = jnp.broadcast_to(task, features.shape[:-1] + task.shape[-1:])
    return jnp.concatenate([features, task], axis=-1)


@register_head("actor_critic")
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

    @classmethod
    def layout(cls, config: NetConfig) -> Layout:
        actor_head = ("policy_head", "log_std")
        torsos: tuple[str, ...]
        critic: tuple[str, ...]
        feeds: tuple[tuple[str, tuple[str, ...]], ...]
        if config.separate_critic:
            torsos, critic = ("actor_torso", "critic_torso"), ("critic_torso", "value_head")
            feeds = (("actor_torso", ("policy_head",)), ("critic_torso", ("value_head",)))
        else:
            torsos, critic = ("actor_torso",), ("value_head",)
            feeds = (("actor_torso", ("policy_head", "value_head")),)
        roles = (
            ("torso", torsos),
            ("actor_head", actor_head),
            ("critic_head", ("value_head",)),
            ("q_head", ()),
            ("head", actor_head + ("value_head",)),
            ("policy", ("actor_torso",) + actor_head),
            ("critic", critic),
        )
        return Layout(roles=roles, feeds=feeds, attention=_attention_paths(config, torsos))

    def setup(self) -> None:
        self.actor_torso = _torso(self.config, self.obs_ndim, "actor_torso")
        if self.config.separate_critic:
            self.critic_torso = _torso(self.config, self.obs_ndim, "critic_torso")
        self.policy_head = _output_layer(self.config, self.spec.dim, 0.01)
        self.value_head = _output_layer(self.config, 1, 1.0)
        if not self.spec.discrete:
            self.log_std = self.param("log_std", nn.initializers.zeros, (self.spec.dim,))

    def _features(self, torso: nn.Module, obs: jax.Array, task: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        obs, task_id = _split_task(self.config, obs, self.obs_ndim)
        return _with_task(_task_features(self.config, torso(obs), task_id), task), task_id

    def _policy_from_features(self, features: jax.Array, task_id: jax.Array | None) -> jax.Array:
        out = _head(self.policy_head, features, task_id)
        return _policy_output(out, None if self.spec.discrete else self.log_std)

    def policy(self, obs: jax.Array, task: jax.Array | None = None) -> jax.Array:
        return self._policy_from_features(*self._features(self.actor_torso, obs, task))

    def value(self, obs: jax.Array, task: jax.Array | None = None) -> jax.Array:
        torso = self.critic_torso if self.config.separate_critic else self.actor_torso
        return _head(self.value_head, *self._features(torso, obs, task))[..., 0]

    def __call__(self, obs: jax.Array, task: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        actor_features, task_id = self._features(self.actor_torso, obs, task)
        if self.config.separate_critic:
            critic_features = self._features(self.critic_torso, obs, task)[0]
        else:
            critic_features = actor_features
        policy = self._policy_from_features(actor_features, task_id)
        return policy, _head(self.value_head, critic_features, task_id)[..., 0]


@register_head("policy")
class PolicyNetwork(nn.Module):
    """A policy alone, no critic (meta-learning's policies, whose baseline is fitted per task): one
    torso and `policy_head` (+ `log_std` for a diagonal Gaussian), outputs as `ActorCritic.policy`."""

    config: NetConfig
    spec: ActionSpec
    obs_ndim: int

    @classmethod
    def layout(cls, config: NetConfig) -> Layout:
        actor_head = ("policy_head", "log_std")
        roles = (
            ("torso", ("torso",)),
            ("actor_head", actor_head),
            ("critic_head", ()),
            ("q_head", ()),
            ("head", actor_head),
            ("policy", ("torso",) + actor_head),
            ("critic", ()),
        )
        return Layout(roles=roles, feeds=(("torso", ("policy_head",)),), attention=_attention_paths(config, ("torso",)))

    def setup(self) -> None:
        self.torso = _torso(self.config, self.obs_ndim, "torso")
        self.policy_head = _output_layer(self.config, self.spec.dim, 0.01)
        if not self.spec.discrete:
            self.log_std = self.param("log_std", nn.initializers.zeros, (self.spec.dim,))

    def policy(self, obs: jax.Array, task: jax.Array | None = None) -> jax.Array:
        obs, task_id = _split_task(self.config, obs, self.obs_ndim)
        features = _with_task(_task_features(self.config, self.torso(obs), task_id), task)
        out = _head(self.policy_head, features, task_id)
        return _policy_output(out, None if self.spec.discrete else self.log_std)

    def __call__(self, obs: jax.Array, task: jax.Array | None = None) -> jax.Array:
        return self.policy(obs, task)


@register_head("q")
class QNetwork(nn.Module):
    """Action values Q(s, .) for discrete actions; `policy` is the same (its argmax is greedy).

    With `config.dueling` (Wang et al. 2016) the torso feeds two streams, a state value V(s)
    (`q_value`) and advantages A(s, .) (`q_head`): Q(s, a) = V(s) + A(s, a) - mean_a' A(s, a').
    """

    config: NetConfig
    spec: ActionSpec
    obs_ndim: int

    @classmethod
    def layout(cls, config: NetConfig) -> Layout:
        heads = ("q_head", "q_value") if config.dueling else ("q_head",)
        roles = (
            ("torso", ("torso",)),
            ("actor_head", ()),
            ("critic_head", ()),
            ("q_head", heads),
            ("head", heads),
            ("policy", ("torso",) + heads),
            ("critic", ()),
        )
        return Layout(roles=roles, feeds=(("torso", heads),), attention=_attention_paths(config, ("torso",)))

    def setup(self) -> None:
        self.torso = _torso(self.config, self.obs_ndim, "torso")
        self.q_head = _output_layer(self.config, self.spec.num_actions, 1.0)
        if self.config.dueling:
            self.q_value = _output_layer(self.config, 1, 1.0)

    def __call__(self, obs: jax.Array, task: jax.Array | None = None) -> jax.Array:
        obs, task_id = _split_task(self.config, obs, self.obs_ndim)
        features = _with_task(_task_features(self.config, self.torso(obs), task_id), task)
        q = _head(self.q_head, features, task_id)
        if self.config.dueling:
            q = _head(self.q_value, features, task_id) + q - jnp.mean(q, axis=-1, keepdims=True)
        return q

    def policy(self, obs: jax.Array, task: jax.Array | None = None) -> jax.Array:
        return self(obs, task)


def make(net_config: NetConfig, obs_shape: Sequence[int], spec: ActionSpec, head: str = "actor_critic") -> nn.Module:
    """The one network factory: the registered `head` ("actor_critic", "q", ...) over the registered
    torso `net_config.torso`."""
    net_config.validate()
    if head not in HEADS:
        raise _unknown("head", head, HEADS)
    if head == "q" and not spec.discrete:
        raise ValueError("A Q-network needs a discrete action space")
    return HEADS[head](net_config, spec, len(obs_shape))


def layout(net_config: NetConfig, head: str = "actor_critic") -> Layout:
    """The parameter layout of the network `make(net_config, ..., head=head)` builds."""
    if head not in HEADS:
        raise _unknown("head", head, HEADS)
    return HEADS[head].layout(net_config)  # type: ignore[attr-defined]


def layout_of(network: nn.Module) -> Layout:
    """The parameter layout of a built network."""
    return type(network).layout(network.config)  # type: ignore[attr-defined]


def init_params(network: nn.Module, key: jax.Array, obs_shape: Sequence[int], task_dim: int = 0) -> Any:
    """Parameters for a batch of one observation (and a task vector of `task_dim` when > 0)."""
    obs = jnp.zeros((1, *obs_shape), jnp.float32)
    if task_dim:
        return init_variables(network, key, obs, task=jnp.zeros((1, task_dim), jnp.float32))["params"]
    return init_variables(network, key, obs)["params"]


# The attention, memory and deepsets torsos register themselves on import (kept last: they use the helpers above).
from rlcx_jax.nets import attention as attention  # noqa: E402,F401
