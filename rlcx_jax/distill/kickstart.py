"""Kickstarting (Schmitt et al. 2018, "Kickstarting deep reinforcement learning"): an RL algorithm
trains the student with its own loss plus a distillation term towards a teacher, through the loss seam.

    ext = kickstart.DistillTerm(teacher_algorithm="ppo", teacher_net=teacher_config.net, loss="kl")
    trainer = ppo.make(dataclasses.replace(student_config, extensions=(ext,)))
    state = kickstart.with_teacher(trainer.init(key, hparams), teacher_params)
    state, metrics = trainer.learn(state, n)          # PPO loss + coef * distillation loss

The term is `coef * mean_i loss(z_S(s_i), z_T(s_i); tau)` over the algorithm's own (minibatch of)
observations, with `loss` one of `distill.losses.LOSSES`; the teacher's outputs are computed once per
update on the whole batch (`extras`), before minibatching. `coef` and `tau` are traced
hyperparameters (`hparams.ext["distill"]`), so a sweep over how much the teacher counts, or a decay
run against it, is a `vmap`. The teacher's parameters live in the extension state
(`state.ext["distill"]`), installed by `with_teacher` after `init` (learning without them is a
one-line error while tracing), so the chunked `init` / `learn` mode is the one to use. The
student sees the observations as its algorithm prepares them: give it the teacher's observation
normalisation, or none on either side.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from rlcx_jax import nets
from rlcx_jax.distill import losses
from rlcx_jax.seams import BuildContext, Extension, ExtrasFn, LossTerm, Params, register_extension

__all__ = ["DistillTerm", "DistillTermHParams", "with_teacher"]


@struct.dataclass
class DistillTermHParams:
    """Traced hyperparameters of the distillation term."""

    coef: float = 1.0
    """Weight of the distillation term in the algorithm's loss."""
    temperature: float = 1.0
    """Temperature of the kl loss."""


@register_extension
@dataclasses.dataclass(frozen=True)
class DistillTerm(Extension):
    """A distillation term towards a fixed teacher, added to any algorithm's loss."""

    name = "distill"
    TAKES_TEACHER: ClassVar[bool] = True  # policy distillation installs its teacher here

    teacher_algorithm: str = "ppo"
    """Algorithm that trained the teacher (its head: actor-critic or Q)."""
    teacher_net: nets.NetConfig = nets.NetConfig()
    """The teacher's network."""
    loss: str = "kl"
    """kl, nll or mse (see distill.losses)."""

    def teacher_head(self) -> str:
        from rlcx_jax import rl

        return rl.head(self.teacher_algorithm)

    def validate(self) -> None:
        self.teacher_head()  # unknown algorithm: one-line error
        self.teacher_net.validate()
        if self.loss not in losses.LOSSES:
            raise ValueError(f"Unknown distillation loss {self.loss!r}; expected one of {losses.LOSSES}")

    def default_hparams(self) -> DistillTermHParams:
        return DistillTermHParams()

    def validate_hparams(self, hparams: DistillTermHParams) -> None:
        if not float(hparams.coef) >= 0:
            raise ValueError(f"distill coef must be >= 0, got {hparams.coef}")
        if not float(hparams.temperature) > 0:
            raise ValueError(f"distill temperature must be > 0, got {hparams.temperature}")

    def _teacher_network(self, ctx: BuildContext) -> Any:
        return nets.make(self.teacher_net, ctx.obs_shape, ctx.action_spec, head=self.teacher_head())

    def init_state(self, key: jax.Array, params: Params, hparams: DistillTermHParams) -> Params:
        """No teacher yet: `with_teacher` installs its parameters before `learn`."""
        return {}

    def extras(self, ctx: BuildContext) -> ExtrasFn:
        teacher = self._teacher_network(ctx)

        def teacher_outputs(teacher_params: Params, hparams: DistillTermHParams, batch: Any) -> jax.Array:
            if not teacher_params:
                raise ValueError(
                    "DistillTerm: no teacher in state.ext['distill']; install one with "
                    "kickstart.with_teacher(state, teacher_params) before learn"
                )
            return teacher.apply({"params": teacher_params}, batch.obs, method="policy")

        return teacher_outputs

    def loss_term(self, ctx: BuildContext) -> LossTerm:
        apply, q_teacher, discrete = ctx.apply, self.teacher_head() == "q", ctx.action_spec.discrete
        assert apply is not None
        loss = self.loss

        def term(params: Params, batch: Any, teacher_params: Params, hparams: DistillTermHParams):
            del teacher_params  # the teacher's outputs arrive with the batch
            student = apply(params, batch.obs, method="policy")
            teacher = batch.extras[self.name]
            per_sample = losses.policy_distillation_loss(
                loss, q_teacher, discrete, student, teacher, jnp.asarray(hparams.temperature)
            )
            agreement = losses.greedy_agreement(student, teacher, ctx.action_spec)
            aux = {"loss": jnp.mean(per_sample), "agreement": agreement}
            return hparams.coef * aux["loss"], aux

        return term


def with_teacher(state: Any, teacher_params: Params) -> Any:
    """`state` (one seed, or a seed batch with `teacher_params` batched alike) with the teacher installed."""
    return state.replace(ext={**state.ext, DistillTerm.name: teacher_params})
