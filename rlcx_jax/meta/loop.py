"""The meta-training loop and the adaptation table, as pure functions of (key, hyperparameters).

One meta-iteration: sample `meta_batch` tasks from the family, compute the method's meta-update
direction over them (tasks vmapped, each task's trajectories vmapped inside), take an optax step.
`train(key, hparams)` is a `lax.scan` over all iterations (vmap it over seeds or hyperparameters);
`init` + `learn(state, n)` run the same scan in chunks, for progress, logging and checkpoints.

Evaluation follows Finn et al. (2017): `eval_tasks` test tasks from a fixed key, the mean return
after 0, 1, ..., `eval_steps` policy-gradient steps, each on fresh trajectories.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Self

import jax
import jax.numpy as jnp
import optax
from flax import struct

from rlcx_jax import nets
from rlcx_jax.configs.meta import MetaConfig, MetaHParams
from rlcx_jax.envs import tasks as task_families
from rlcx_jax.meta.adapt import Adaptation, MetaAux, MetaContext, MetaMethod, adaptation_curve
from rlcx_jax.meta.maml import MAML
from rlcx_jax.meta.platipus import Platipus
from rlcx_jax.meta.policy_gradient import PolicyGradientLearner, PolicyLoss, vanilla_pg_loss
from rlcx_jax.meta.reptile import Reptile
from rlcx_jax.rl.common import BlockMetrics, TrainOutput, scan_updates

__all__ = [
    "METHOD_IMPLS",
    "EVAL_TASK_SEED",
    "MetaState",
    "MetaMetrics",
    "MetaTrainer",
    "AdaptationTable",
    "make_learner",
    "make_trainer",
    "eval_tasks",
]

METHOD_IMPLS: dict[str, MetaMethod] = {
    "maml": MAML(first_order=False),
    "fomaml": MAML(first_order=True),
    "reptile": Reptile(),
    "platipus": Platipus(),
    "pretrain": MAML(first_order=False),  # with no inner step (MetaConfig.train_inner_steps)
}
EVAL_TASK_SEED = 20_171_703
"""The fixed key of the test tasks (the same 40 tasks for every method and seed)."""

Params = Any


@struct.dataclass
class MetaState:
    """Meta-training state; `hparams` travel with it so `learn` is self-contained."""

    meta_params: Any
    opt_state: optax.OptState
    key: jax.Array
    iteration: jax.Array
    hparams: MetaHParams

    if TYPE_CHECKING:  # added by flax.struct.dataclass

        def replace(self, **changes: Any) -> Self: ...


@struct.dataclass
class MetaMetrics(BlockMetrics):
    """Per-iteration metrics (means over a row's iterations; `env_steps` is the running count).
    `skipped`: the fraction of iterations whose update was skipped because its direction was not finite."""

    return_before: jax.Array
    return_after: jax.Array
    loss: jax.Array
    kl: jax.Array
    grad_norm: jax.Array
    skipped: jax.Array
    env_steps: jax.Array

    LAST: ClassVar[tuple[str, ...]] = ("env_steps",)


@struct.dataclass
class AdaptationTable:
    """Returns after 0..k adaptation steps: `returns` [tasks, k + 1]; `end_obs` [tasks, k + 1, N, ...]
    where each step's first episodes ended."""

    returns: jax.Array
    end_obs: jax.Array


@dataclasses.dataclass(frozen=True)
class MetaTrainer:
    """What `make_trainer` builds from a static config.

    init(key, hparams) -> MetaState;  learn(state, n) -> (state, MetaMetrics [n // rows_every]);
    train(key, hparams) -> TrainOutput(state, metrics);
    evaluate(meta_params, hparams, key, num_tasks, steps, starts_from=None) -> AdaptationTable, where
        `starts_from` is the method whose `initial_params` reads `meta_params` (default: this one;
        `MAML()` for plain policy parameters, e.g. the random-init baseline);
    policy_params(key) -> freshly initialised policy parameters (the random-init baseline).
    """

    config: MetaConfig
    family: Any
    learner: PolicyGradientLearner
    method: MetaMethod
    context: MetaContext
    init: Callable[..., MetaState]
    learn: Callable[..., tuple[MetaState, MetaMetrics]]
    train: Callable[..., TrainOutput]
    evaluate: Callable[..., AdaptationTable]
    policy_params: Callable[[jax.Array], Params]


def make_learner(
    family: Any,
    config: MetaConfig,
    policy_loss: PolicyLoss = vanilla_pg_loss,
    param_transform: Callable[[Params], Params] | None = None,
) -> PolicyGradientLearner:
    """The policy-gradient learner for `family`'s tasks: a policy-only network over `config.net`;
    continuous actions are taken in [-1, 1] and scaled to the environment's bounds (as Finn et al.
    2017 did through rllab's `normalize`: a unit-variance Gaussian then explores the whole range)."""
    env = family.training_env(rescale_actions=True)  # a Gaussian policy acts in [-1, 1] (rllab's normalize)
    spec = nets.action_spec(env.action_space(family.base_params))
    network = nets.make(config.net, family.obs_shape, spec, head="policy")
    return PolicyGradientLearner(
        env=env,
        network=network,
        spec=spec,
        num_trajectories=config.num_trajectories,
        horizon=config.horizon,
        policy_loss=policy_loss,
        param_transform=param_transform,
    )


def eval_tasks(family: Any, num_tasks: int) -> Any:
    """The test tasks: `num_tasks` tasks of `family` from the fixed key `EVAL_TASK_SEED`."""
    return family.sample(jax.random.key(EVAL_TASK_SEED), num_tasks)


def make_trainer(
    config: MetaConfig,
    learner: PolicyGradientLearner | None = None,
    method: MetaMethod | None = None,
    family: Any = None,
) -> MetaTrainer:
    """Build the meta-trainer of `config` (the learner, method and family can be replaced: a notebook
    passes its own inner loss, method or task family)."""
    config.validate()
    family = family if family is not None else task_families.make_family(config.family, config.family_ranges)
    learner = learner if learner is not None else make_learner(family, config)
    method = method if method is not None else METHOD_IMPLS[config.method]
    ctx = MetaContext(learner=learner, inner_steps=config.train_inner_steps, iterations=config.iterations)
    steps_per_iteration = config.env_steps_per_iteration

    def policy_params(key: jax.Array) -> Params:
        return nets.init_params(learner.network, key, family.obs_shape)

    def init(key: jax.Array, hparams: MetaHParams) -> MetaState:
        init_key, run_key = jax.random.split(key)
        meta_params = method.init(policy_params(init_key), hparams)
        opt_state = _guarded(method.optimizer(hparams, config.iterations)).init(meta_params)
        return MetaState(meta_params, opt_state, run_key, jnp.zeros((), jnp.int32), hparams)

    def update(state: MetaState) -> tuple[MetaState, MetaMetrics]:
        key, task_key, method_key = jax.random.split(state.key, 3)
        tasks = family.sample(task_key, config.meta_batch)
        direction, aux = method.meta_gradient(state.meta_params, tasks, method_key, ctx, state.hparams)
        optimizer = _guarded(method.optimizer(state.hparams, config.iterations))
        updates, opt_state = optimizer.update(direction, state.opt_state, state.meta_params)
        meta_params = optax.apply_updates(state.meta_params, updates)
        iteration = state.iteration + 1
        metrics = _metrics(aux, optax.tree.norm(direction), iteration * steps_per_iteration)
        return state.replace(meta_params=meta_params, opt_state=opt_state, key=key, iteration=iteration), metrics

    def learn(state: MetaState, n_iterations: int) -> tuple[MetaState, MetaMetrics]:
        return scan_updates(update, state, n_iterations, config.rows_every)

    def train(key: jax.Array, hparams: MetaHParams) -> TrainOutput:
        state, metrics = learn(init(key, hparams), config.iterations)
        return TrainOutput(state=state, metrics=metrics)

    def evaluate(
        meta_params: Any,
        hparams: MetaHParams,
        key: jax.Array,
        num_tasks: int = config.eval_tasks,
        steps: int = config.eval_steps,
        starts_from: MetaMethod | None = None,
    ) -> AdaptationTable:
        tasks = eval_tasks(family, num_tasks)
        how = starts_from if starts_from is not None else method

        def one(task: Any, k: jax.Array) -> Adaptation:
            init_key, adapt_key = jax.random.split(k)
            start = how.initial_params(meta_params, task, init_key, ctx, hparams)
            return adaptation_curve(learner, start, task, adapt_key, steps, hparams.inner_lr, hparams)

        curves = jax.vmap(one)(tasks, jax.random.split(key, num_tasks))
        return AdaptationTable(returns=curves.returns, end_obs=curves.end_obs)

    return MetaTrainer(config, family, learner, method, ctx, init, learn, train, evaluate, policy_params)


def _guarded(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """The outer optimizer, skipping any update whose direction is not finite (the parameters and the
    optimizer state stay as they were; `MetaMetrics.skipped` counts it), so one bad meta-batch never
    turns the meta-parameters into NaN."""
    return optax.apply_if_finite(optimizer, max_consecutive_errors=2**30)


def _metrics(aux: MetaAux, grad_norm: jax.Array, env_steps: jax.Array) -> MetaMetrics:
    return MetaMetrics(
        return_before=aux.return_before,
        return_after=aux.return_after,
        loss=aux.loss,
        kl=aux.kl,
        grad_norm=grad_norm,
        skipped=jnp.logical_not(jnp.isfinite(grad_norm)).astype(jnp.float32),
        env_steps=env_steps.astype(jnp.float32),
    )
