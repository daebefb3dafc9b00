"""Policy distillation (Rusu et al. 2016; DAgger-style data, Ross et al. 2011): a student network
learns to reproduce a trained teacher's outputs on the states a behaviour policy visits.

    trainer = policy_distillation.make(DistillConfig(teacher_algorithm="ppo", net=NetConfig(hidden=(16, 16))))
    out = jax.jit(jax.vmap(trainer.train, in_axes=(0, None, 0)))(keys, hparams, teachers)

One update: collect `num_steps` x `num_envs` transitions with the behaviour policy, which takes the
teacher's action with probability beta (per environment and step) and the student's otherwise; beta
goes linearly from `hparams.teacher_fraction_start` to `teacher_fraction_end` over the run (1 -> 1:
teacher-collected data as in Rusu et al.; 0 -> 0: student-collected; 1 -> 0: DAgger's decaying
mixture). The teacher's outputs on the collected observations are computed once; then
`update_epochs` passes of `num_minibatches` minibatch steps minimise

    mean_i loss(z_S(s_i), z_T(s_i); tau) + value_coef * mean_i 0.5 (V_S(s_i) - V_T(s_i))^2
    + every extension's loss term,

with `loss` one of `distill.losses.LOSSES` (the value term for actor-critic networks only). The
student has the teacher's head (actor-critic or Q) with its own `NetConfig`, sees the observations
exactly as the teacher does (the teacher's frozen normalisation statistics), and is therefore a
drop-in parameter tree for the teacher's evaluator, compression and export, and for its algorithm's
fine-tuning (except a Q-value teacher's student trained with kl or nll: its outputs are the logits
of the teacher's sharpened policy, not Q-values). Extensions
(`config.extensions`: gradual pruning, QAT) work here as in any algorithm, so pruning or
quantization can be learned under distillation. Everything runs in one `lax.scan`; `jit` and
`vmap` over seeds, hyperparameters (temperature, learning rate, mixture) and teachers.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Self

import jax
import jax.numpy as jnp
from flax import struct

from rlcx_jax import nets, prng, pytree
from rlcx_jax.configs.base import check_minibatches
from rlcx_jax.distill import losses
from rlcx_jax.envs.normalize import RunningStats
from rlcx_jax.nets.paths import flatten_with_paths
from rlcx_jax.nets.policy import greedy_action, sample_action
from rlcx_jax.rl import common, onpolicy, rollout
from rlcx_jax.rl.common import Agent, Hooks, HParams, Params, TrainConfig, Trainer, TrainOutput, TrainState
from rlcx_jax.rl.evaluate import default_greedy

__all__ = ["DistillConfig", "DistillHParams", "DistillState", "DistillMetrics", "Teacher", "make", "make_train"]


@dataclasses.dataclass(frozen=True)
class DistillConfig(TrainConfig):
    """Static distillation settings; `net` is the student's network."""

    teacher_algorithm: str = "ppo"
    """Algorithm that trained the teacher: its head (actor-critic or Q) is the student's head too."""
    teacher_net: nets.NetConfig = nets.NetConfig()
    """The teacher's network."""
    normalize_obs: bool = False
    """The teacher normalised its observations (the student uses the teacher's frozen statistics)."""
    loss: str = "kl"
    """kl (softened KL; Rusu's KL for Q-value teachers), nll (teacher's greedy action) or mse (outputs)."""
    num_envs: int = 8
    num_steps: int = 64
    """Steps per environment in one rollout."""
    update_epochs: int = 4
    """Passes over each rollout."""
    num_minibatches: int = 4
    """Minibatches per pass; num_envs * num_steps must divide by it."""
    greedy_student: bool = False
    """The student acts greedily while collecting (default: it samples its policy)."""
    total_timesteps: int = 100_000

    POSITIVE = TrainConfig.POSITIVE + ("num_steps", "update_epochs", "num_minibatches")

    @property
    def HEAD(self) -> str:  # type: ignore[override]  # the teacher's head, not a class constant
        from rlcx_jax import rl

        return rl.head(self.teacher_algorithm)

    @property
    def steps_per_update(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def optimizer_steps(self) -> int:
        return self.num_updates * self.update_epochs * self.num_minibatches

    def validate(self) -> None:
        from rlcx_jax import rl

        rl.get(self.teacher_algorithm)  # unknown algorithm: one-line error with the closest name
        super().validate()
        self.teacher_net.validate()
        if not self.net.hidden or min(self.net.hidden) < 1:
            raise ValueError(f"The student needs at least one hidden layer of width >= 1, got hidden={self.net.hidden}")
        if self.loss not in losses.LOSSES:
            raise ValueError(f"Unknown distillation loss {self.loss!r}; expected one of {losses.LOSSES}")
        check_minibatches(self.steps_per_update, self.num_minibatches)


@pytree.dataclass
class DistillHParams(HParams):
    """Traced distillation hyperparameters (vmappable: a sweep over temperatures is one vmap)."""

    lr: float = 1e-3
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    """Softmax temperature tau of the kl loss (Rusu et al. use 0.01 for Q-value teachers)."""
    value_coef: float = 0.5
    """Weight of the value-head distillation term (actor-critic students)."""
    teacher_fraction_start: float = 1.0
    """Probability that the teacher acts, at the first update (1: teacher-collected data)."""
    teacher_fraction_end: float = 0.0
    """Probability that the teacher acts, at the last update (linear in between; 0: the student)."""

    POSITIVE = HParams.POSITIVE + ("temperature",)
    UNIT = HParams.UNIT + ("teacher_fraction_start", "teacher_fraction_end")

    def validate(self, extensions: tuple[Any, ...] = ()) -> None:
        super().validate(extensions)
        if self.value_coef < 0:
            raise ValueError(f"value_coef must be >= 0, got {self.value_coef}")


@struct.dataclass
class Teacher:
    """A trained policy: its parameters and the observation statistics it was trained with."""

    params: Params
    obs_stats: RunningStats


@struct.dataclass
class DistillState(TrainState):
    """The student's training state (`params`, `obs_stats` = the teacher's) plus the teacher's parameters."""

    teacher_params: Params = None


@struct.dataclass
class DistillBatch:
    """A flat batch: observations as both networks see them and the teacher's outputs on them."""

    obs: jax.Array
    teacher_out: jax.Array
    teacher_value: jax.Array | None
    extras: Any = None

    if TYPE_CHECKING:  # added by flax.struct.dataclass

        def replace(self, **changes: Any) -> Self: ...


@struct.dataclass
class DistillAux:
    policy_loss: jax.Array
    value_loss: jax.Array
    agreement: jax.Array
    """`nets.policy.action_agreement` of the student's and the teacher's greedy actions on the batch."""


@struct.dataclass
class DistillMetrics(common.BlockMetrics):
    """Per-update metrics; `episode` are the behaviour policy's episodes (a mix of both networks)."""

    episode: rollout.EpisodeMetrics
    loss: jax.Array
    aux: DistillAux
    teacher_fraction: jax.Array
    env_steps: jax.Array
    ext: dict[str, Any]


def teacher_network(config: DistillConfig, agent: Agent) -> Any:
    return nets.make(config.teacher_net, agent.obs_shape, agent.spec, head=config.HEAD)


def _outputs(apply: Any, params: Params, obs: jax.Array, actor_critic: bool) -> tuple[jax.Array, jax.Array | None]:
    """(policy output, value or None) of a network on a batch of prepared observations."""
    if actor_critic:
        return apply(params, obs)
    return apply(params, obs, method="policy"), None


def distillation_loss(
    params: Params,
    batch: DistillBatch,
    hparams: DistillHParams,
    apply: Any,
    config: DistillConfig,
    spec: nets.ActionSpec,
) -> tuple[jax.Array, DistillAux]:
    """The student's loss on a minibatch (see the module docstring)."""
    actor_critic = batch.teacher_value is not None
    student_out, student_value = _outputs(apply, params, batch.obs, actor_critic)
    per_sample = losses.policy_distillation_loss(
        config.loss, config.HEAD == "q", spec.discrete, student_out, batch.teacher_out, jnp.asarray(hparams.temperature)
    )
    policy_loss = jnp.mean(per_sample)
    value_loss = jnp.zeros(())
    if student_value is not None and batch.teacher_value is not None:
        value_loss = jnp.mean(losses.value_mse(student_value, batch.teacher_value))
    agreement = losses.greedy_agreement(student_out, batch.teacher_out, spec)
    total = policy_loss + hparams.value_coef * value_loss
    return total, DistillAux(policy_loss=policy_loss, value_loss=value_loss, agreement=agreement)


def teacher_fraction(config: DistillConfig, hparams: DistillHParams, update_step: jax.Array) -> jax.Array:
    """beta at this update: linear from start (first update) to end (last update)."""
    frac = jnp.clip(update_step.astype(jnp.float32) / max(config.num_updates - 1, 1), 0.0, 1.0)
    return hparams.teacher_fraction_start + (hparams.teacher_fraction_end - hparams.teacher_fraction_start) * frac


def _update(agent: Agent, teacher_apply: Any, state: DistillState) -> tuple[DistillState, DistillMetrics]:
    config: DistillConfig = agent.config
    hp: DistillHParams = state.hparams
    actor_critic = config.HEAD != "q"
    teacher_greedy = default_greedy(config.teacher_algorithm)
    key, (key_collect, key_epochs) = common.next_keys(state.key, config.prng_impl, 2)
    beta = teacher_fraction(config, hp, state.update_step)

    # COLLECT TRAJECTORIES (each env and step: the teacher acts with probability beta)
    def policy_fn(k: jax.Array, obs: jax.Array) -> tuple[jax.Array, None]:
        k_student, k_teacher, k_mix = jax.random.split(k, 3)
        x = agent.prep_obs(state.obs_stats, obs)
        student = agent.apply(state.params, x, method="policy")
        teacher = teacher_apply(state.teacher_params, x, method="policy")
        a_student = (
            greedy_action(student, agent.spec)
            if config.greedy_student
            else sample_action(student, agent.spec, k_student)
        )
        a_teacher = (
            greedy_action(teacher, agent.spec) if teacher_greedy else sample_action(teacher, agent.spec, k_teacher)
        )
        use_teacher = jax.random.uniform(k_mix, (obs.shape[0],)) < beta
        use_teacher = jnp.reshape(use_teacher, use_teacher.shape + (1,) * (a_student.ndim - 1))
        return jnp.where(use_teacher, a_teacher, a_student), None

    runner, traj = rollout.collect(agent.env, state.env_params, policy_fn, state.runner, key_collect, config.num_steps)

    # TEACHER OUTPUTS on the whole batch, once
    obs = jnp.reshape(agent.prep_obs(state.obs_stats, traj.obs), (-1,) + agent.obs_shape)
    teacher_out, teacher_value = _outputs(teacher_apply, state.teacher_params, obs, actor_critic)
    batch = DistillBatch(obs=obs, teacher_out=teacher_out, teacher_value=teacher_value)
    batch = batch.replace(extras=agent.terms.batch_extras(state.ext, hp.ext, batch))

    # UPDATE THE STUDENT
    grad_fn = agent.value_and_grad(agent.terms.add_to(distillation_loss))

    def minibatch_step(carry: tuple[Any, Any], mb: DistillBatch) -> tuple[tuple[Any, Any], Any]:
        params, opt_state = carry
        (_, aux), grads = grad_fn(params, mb, state.ext, hp.ext, hp, agent.apply, config, agent.spec)
        return agent.gradient_step(params, opt_state, hp, grads), aux

    perms = prng.permutations(key_epochs, config.steps_per_update, config.update_epochs)
    (params, opt_state), (aux, ext_aux) = common.minibatch_epochs(
        minibatch_step, (state.params, state.opt_state), batch, perms, config.num_minibatches
    )
    aux, ext_aux = jax.tree.map(jnp.mean, aux), common.mean_ext_aux(ext_aux)
    loss = aux.policy_loss + hp.value_coef * aux.value_loss
    loss = loss + sum((term["value"] for term in ext_aux.values()), jnp.zeros(()))
    step = state.update_step + 1
    state = state.replace(params=params, opt_state=opt_state, runner=runner, key=key, update_step=step)
    metrics = DistillMetrics(
        episode=rollout.EpisodeMetrics.from_stats(traj.episode),
        loss=loss,
        aux=aux,
        teacher_fraction=beta,
        env_steps=step * config.steps_per_update,
        ext=ext_aux,
    )
    return state, metrics


def check_teacher_params(params: Params, expected: Params) -> None:
    """One-line error when the teacher's parameters are not those of `teacher_net` (checked while
    tracing, before anything compiles)."""
    got = {path: jnp.shape(x) for path, x in flatten_with_paths(params).items()}
    want = {path: x.shape for path, x in flatten_with_paths(expected).items()}
    if set(got) != set(want):
        diff = sorted(set(got) ^ set(want))
        raise ValueError(f"The teacher's parameters do not fit teacher_net (first differing path: {diff[0]})")
    for path, shape in want.items():
        if tuple(got[path]) != tuple(shape):
            raise ValueError(f"The teacher's parameters do not fit teacher_net: {path} is {got[path]}, not {shape}")


def make(config: DistillConfig = DistillConfig(), hooks: Hooks = Hooks()) -> Trainer:
    """Validate `config` and build the distillation trainer:

    init(key, hparams, teacher, env_params=None) -> DistillState
    learn(state, n_updates) -> (state, metrics)
    train(key, hparams, teacher, env_params=None) -> TrainOutput
    act(params, obs_stats, obs, key, greedy) -> action   # the student's policy
    """
    agent = common.build_agent(config, hooks)
    network = teacher_network(config, agent)
    rows = config.updates_per_row

    def teacher_call(params: Params, obs: jax.Array, method: str = "__call__") -> Any:
        return network.apply({"params": params}, obs, method=method)

    expected = jax.eval_shape(
        lambda k: network.init(k, jnp.zeros((1,) + agent.obs_shape, jnp.float32))["params"], jax.random.PRNGKey(0)
    )

    def init(key: jax.Array, hparams: DistillHParams, teacher: Teacher, env_params: Any = None) -> DistillState:
        check_teacher_params(teacher.params, expected)
        base = common.init_train_state(agent, key, hparams, env_params)
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        fields["obs_stats"] = teacher.obs_stats
        # extensions that read a teacher from their state (kickstart.DistillTerm, AttentionTransfer) get this one
        fields["ext"] = {
            e.name: teacher.params if getattr(e, "TAKES_TEACHER", False) else base.ext[e.name]
            for e in config.extensions
        }
        return DistillState(**fields, teacher_params=teacher.params)

    def learn(state: DistillState, n_updates: int) -> tuple[DistillState, DistillMetrics]:
        return common.scan_updates(lambda s: _update(agent, teacher_call, s), state, n_updates, rows)

    def train(key: jax.Array, hparams: DistillHParams, teacher: Teacher, env_params: Any = None) -> TrainOutput:
        state, metrics = learn(init(key, hparams, teacher, env_params), config.num_updates)
        return TrainOutput(state=state, metrics=metrics)

    def act(params: Params, obs_stats: RunningStats, obs: jax.Array, key: jax.Array, greedy: bool = False):
        return onpolicy.act(agent, params, obs_stats, obs, key, greedy)

    return Trainer(config, init, learn, train, act, config.num_updates, rows, agent)


def make_train(config: DistillConfig = DistillConfig(), hooks: Hooks = Hooks()):
    """The pure `train(key, hparams, teacher, env_params=None) -> TrainOutput` for `config`."""
    return make(config, hooks).train
