"""The seams through which capabilities plug into every algorithm (docs/architecture.md, "Seams").

This module sits below both `rl/` (the algorithms) and `compress/` (pure transforms), so a capability
written anywhere can plug into training without the algorithms naming it:

* `Hooks`: static extension points of the forward pass and the optimizer chain.
* `Extension`: a capability with its own static config (the extension object itself, a frozen
  dataclass on the algorithm config's `extensions` tuple), its own traced hyperparameters
  (`hparams.ext[name]`, swept by `vmap` like any other hyperparameter), its own training state
  (`state.ext[name]`), hooks, and an optional loss term.
* `LossTerm`: `term(params, batch, ext_state, ext_hparams) -> (scalar, aux)`, added to the
  algorithm's loss; `batch.extras[name]` carries per-sample data the extension computed for it.
* `HasParams`: the state protocol (`params`, `with_params`) used by recipes, distillation, Reptile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

import flax.linen as nn
import jax
import optax

from rlcx_jax.configs.base import EXTENSION_TYPES as EXTENSION_TYPES
from rlcx_jax.configs.base import Extension as Extension
from rlcx_jax.configs.base import check_extensions as check_extensions
from rlcx_jax.configs.base import complete_ext_hparams as complete_ext_hparams
from rlcx_jax.configs.base import register_extension as register_extension

Params = Any  # a Flax parameter tree
PyTree = Any
# apply(params, *inputs, method=None, task=None) -> network output
ApplyFn = Callable[..., Any]
ParamTransform = Callable[[Params], Params]
# project(params after an optimizer step, optimizer state) -> params
Projection = Callable[[Params, Any], Params]
Interceptor = Callable[..., Any]
# loss(params, batch, hparams, ...) -> (scalar loss, aux pytree)
LossFn = Callable[..., tuple[jax.Array, Any]]
# term(params, batch, ext_state, ext_hparams) -> (scalar, aux pytree)
LossTerm = Callable[[Params, Any, Any, Any], tuple[jax.Array, Any]]
# extras(ext_state, ext_hparams, batch) -> pytree of per-sample arrays (leading batch axis)
ExtrasFn = Callable[[Any, Any, Any], PyTree]
# gradient(loss_fn, params, batch, ext_state, ext_hparams, *args) -> ((loss, aux), grads)
GradientFn = Callable[..., tuple[tuple[jax.Array, Any], Any]]

S = TypeVar("S", bound="HasParams")


@runtime_checkable
class HasParams(Protocol):
    """A training state with trainable parameters: what recipes, distillation and Reptile touch.

    `with_params(params)` returns the state with new parameters, keeping everything that belongs to
    them consistent (e.g. DQN's target network)."""

    params: Params

    def with_params(self: S, params: Params) -> S: ...


# ----------------------------------------------------------------------------------------------
# Hooks
# ----------------------------------------------------------------------------------------------
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
        (with the parameters), built from traced hyperparameters (e.g. keep pruned weights at
        exactly zero, with the target sparsity a hyperparameter). An extension's post_update
        receives that extension's own hyperparameters (`hparams.ext[name]`).
    project_params: `(params, opt_state) -> params`, applied to the parameters after every
        optimizer step (`params + updates`), reading what the post_update keeps in the optimizer
        state: projected gradient descent onto a constraint set, e.g. k-means weight sharing puts
        the weights back onto its codebook exactly, which an additive update cannot do in floating
        point.
    gradient: how a loss becomes a gradient, `gradient(loss_fn, params, batch, ext_state,
        ext_hparams, *args) -> ((loss, aux), grads)` with the arguments of an extended loss
        (`ExtensionTerms.add_to`); None is `jax.value_and_grad(loss_fn, has_aux=True)`. Its grads may
        have another structure than the parameters (e.g. one gradient per task on a leading axis)
        when its own `extra_grad_transforms` map them back, which must then run first: an
        extension that sets `gradient` must come before any extension with gradient transforms.
    """

    param_transform: ParamTransform | None = None
    interceptor: Interceptor | None = None
    extra_grad_transforms: tuple[optax.GradientTransformation, ...] = ()
    post_update: Callable[[Any], optax.GradientTransformation] | None = None
    project_params: Projection | None = None
    gradient: GradientFn | None = None

    def merge(self, other: Hooks) -> Hooks:
        """Both sets of hooks: `self`'s parameter transform and interceptor run first (outermost)."""
        if self.gradient is not None and other.gradient is not None:
            raise ValueError("Two extensions replace the gradient (Hooks.gradient); combine them into one")
        if other.gradient is not None and self.extra_grad_transforms:
            raise ValueError(
                "An extension that replaces the gradient (Hooks.gradient) must come before the extensions "
                "with gradient transforms (its transforms turn its gradients into the parameters' shape)"
            )
        return Hooks(
            param_transform=_compose(other.param_transform, self.param_transform),
            interceptor=_nest_interceptors(self.interceptor, other.interceptor),
            extra_grad_transforms=self.extra_grad_transforms + other.extra_grad_transforms,
            post_update=_chain_post_updates(self.post_update, other.post_update),
            project_params=_chain_projections(self.project_params, other.project_params),
            gradient=self.gradient or other.gradient,
        )


def _compose(outer: ParamTransform | None, inner: ParamTransform | None) -> ParamTransform | None:
    if outer is None or inner is None:
        return outer or inner
    return lambda params: outer(inner(params))


def _nest_interceptors(first: Interceptor | None, second: Interceptor | None) -> Interceptor | None:
    if first is None or second is None:
        return first or second

    def interceptor(next_fun: Callable[..., Any], args: Any, kwargs: Any, context: Any) -> Any:
        inner = lambda *a, **k: second(next_fun, a, k, context)  # noqa: E731
        return first(inner, args, kwargs, context)

    return interceptor


def _chain_post_updates(
    a: Callable[[Any], optax.GradientTransformation] | None,
    b: Callable[[Any], optax.GradientTransformation] | None,
) -> Callable[[Any], optax.GradientTransformation] | None:
    if a is None or b is None:
        return a or b
    return lambda hparams: optax.chain(a(hparams), b(hparams))


def _chain_projections(first: Projection | None, second: Projection | None) -> Projection | None:
    if first is None or second is None:
        return first or second
    return lambda params, opt_state: second(first(params, opt_state), opt_state)


def make_apply(network: nn.Module, hooks: Hooks = Hooks()) -> ApplyFn:
    """The one forward-pass wrapper: `apply(params, *inputs, **kwargs)` through the hooks."""
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


# ----------------------------------------------------------------------------------------------
# Extensions
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BuildContext:
    """What an extension may read when an algorithm is built (all static).

    network: the Flax module (its `layout()` says which parameter paths play which role);
    optimizer_steps: optimizer steps in a full run (for schedules);
    apply: the final forward-pass wrapper (through every extension's hooks); None while the hooks
        themselves are being built.
    """

    network: nn.Module
    obs_shape: tuple[int, ...]
    action_spec: Any
    optimizer_steps: int
    apply: ApplyFn | None = None


def combine_hooks(base: Hooks, extensions: tuple[Extension, ...], ctx: BuildContext) -> Hooks:
    """`base` merged with every extension's hooks, in order; each extension's `post_update` is fed
    its own hyperparameters `hparams.ext[name]`."""
    hooks = base
    for ext in extensions:
        h = ext.hooks(ctx)
        if h.post_update is not None:
            h = dataclasses.replace(h, post_update=_own_hparams(h.post_update, ext.name))
        hooks = hooks.merge(h)
    return hooks


def _own_hparams(
    post_update: Callable[[Any], optax.GradientTransformation], name: str
) -> Callable[[Any], optax.GradientTransformation]:
    return lambda hparams: post_update(hparams.ext[name])


@dataclasses.dataclass(frozen=True)
class ExtensionTerms:
    """The loss terms and extras functions of a run's extensions, bound to its build context."""

    terms: tuple[tuple[str, LossTerm], ...] = ()
    extras: tuple[tuple[str, ExtrasFn], ...] = ()

    @staticmethod
    def build(extensions: tuple[Extension, ...], ctx: BuildContext) -> ExtensionTerms:
        terms = tuple((e.name, t) for e in extensions if (t := e.loss_term(ctx)) is not None)
        extras = tuple((e.name, f) for e in extensions if (f := e.extras(ctx)) is not None)
        return ExtensionTerms(terms, extras)

    def batch_extras(self, ext_state: Mapping[str, Any], ext_hparams: Mapping[str, Any], batch: Any) -> dict[str, Any]:
        """{name: extras} for a flat batch (computed before minibatching)."""
        return {name: fn(ext_state[name], ext_hparams[name], batch) for name, fn in self.extras}

    def add_to(self, loss_fn: LossFn) -> Callable[..., tuple[jax.Array, tuple[Any, dict[str, Any]]]]:
        """`loss_fn` plus every term: `(params, batch, ext_state, ext_hparams, *args) ->
        (loss + sum of terms, (aux, {name: {"value": term, "aux": term_aux}}))`."""
        terms = self.terms

        def total(
            params: Params, batch: Any, ext_state: Mapping[str, Any], ext_hparams: Mapping[str, Any], *args: Any
        ) -> tuple[jax.Array, tuple[Any, dict[str, Any]]]:
            loss, aux = loss_fn(params, batch, *args)
            ext_aux: dict[str, Any] = {}
            for name, term in terms:
                value, term_aux = term(params, batch, ext_state[name], ext_hparams[name])
                loss = loss + value
                ext_aux[name] = {"value": value, "aux": term_aux}
            return loss, (aux, ext_aux)

        return total
