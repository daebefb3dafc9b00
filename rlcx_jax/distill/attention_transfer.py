"""Attention transfer (Zagoruyko & Komodakis 2017, "Paying more attention to attention"): the student
learns *where* the teacher looks, besides what it outputs, through the loss seam.

A map gives one non-negative weight per input token ([B, N]: per entity, per flat feature, per grid cell):

* "attention": the weights of the torso's pooling query (`nets.attention`, `attention_pool="attention"`),
  averaged over heads: a_n = mean_h softmax_n(q_h . k_{h,n} / sqrt(d)), masked tokens 0.
* "saliency": gradient-based attention (Z&K Sec. 3.2; Simonyan et al. 2014): the input gradient of the
  greedy output, summed over a token's features, s_n = sum_f |d z_{a*}(x) / d x_{n,f}|, a* = argmax z(x).
  Every network has one, so a flat MLP student can match an attention teacher's map.

The loss between a student's map S and a teacher's map T is Z&K's eq. 2 with p = 2,

    AT(S, T) = || S / ||S||_2 - T / ||T||_2 ||_2      per sample,

zero when the maps agree up to scale. `AttentionTransfer` adds `coef * mean_i AT(S_i, T_i)` to any
loss with extensions: policy distillation (`distill.policy_distillation`, the pipeline's distill
stage) or an RL algorithm (kickstarting). Install the teacher with `with_teacher` as for
`kickstart.DistillTerm`; the teacher's maps are computed once per update on the whole batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import chex
import jax
import jax.numpy as jnp
from flax import struct

from rlcx_jax import nets
from rlcx_jax.seams import BuildContext, Extension, ExtrasFn, LossTerm, Params, make_apply, register_extension

__all__ = [
    "MAP_KINDS",
    "attention_transfer_loss",
    "normalized_map",
    "pooling_map",
    "saliency_map",
    "AttentionTransfer",
    "AttentionTransferHParams",
    "with_teacher",
]

MAP_KINDS = ("attention", "saliency")
_EPS = 1e-12


def normalized_map(m: jax.Array) -> jax.Array:
    """m / ||m||_2 over the last axis (a zero map stays zero)."""
    return m / jnp.maximum(jnp.linalg.norm(m, axis=-1, keepdims=True), _EPS)


def attention_transfer_loss(student_map: jax.Array, teacher_map: jax.Array) -> jax.Array:
    """|| S / ||S|| - T / ||T|| ||_2 per sample: maps [B, N] -> [B]."""
    chex.assert_rank([student_map, teacher_map], 2, custom_message="attention_transfer_loss: maps must be [B, N]")
    chex.assert_equal_shape([student_map, teacher_map], custom_message="attention_transfer_loss: maps differ in shape")
    diff = normalized_map(student_map) - normalized_map(teacher_map)
    # sqrt(sum d^2 + eps) - sqrt(eps): differentiable at d = 0, and exactly 0 for identical maps
    return jnp.sqrt(jnp.sum(jnp.square(diff), axis=-1) + _EPS) - jnp.sqrt(_EPS)


def _flat_tokens(x: jax.Array, obs_ndim: int) -> jax.Array:
    """(B, *obs_shape) -> (B, tokens): entity (N, F) and grid (H, W, C) observations sum features per token."""
    if obs_ndim == 1:
        return x
    if obs_ndim == 2:
        return jnp.sum(x, axis=-1)
    return jnp.reshape(jnp.sum(x, axis=-1), (x.shape[0], -1))


def saliency_map(apply: Any, params: Params, obs: jax.Array, obs_ndim: int) -> jax.Array:
    """sum_f |d z_{a*} / d x_{n,f}| per token, [B, N], with z = apply(params, obs, method="policy")
    and a* the greedy output of each sample (its value is differentiable in `params`)."""

    def greedy_output(x: jax.Array) -> jax.Array:
        z = apply(params, x[None], method="policy")[0]
        return z[jax.lax.stop_gradient(jnp.argmax(z))]

    grads = jax.vmap(jax.grad(greedy_output))(obs.astype(jnp.float32))
    return _flat_tokens(jnp.abs(grads), obs_ndim)


def pooling_map(apply: Any, params: Params, obs: jax.Array, torso: str) -> jax.Array:
    """The pooling query's attention over the tokens of `torso` (e.g. "actor_torso"), mean over heads, [B, N]."""
    _, state = apply(params, obs, method="policy", mutable=["intermediates"])
    try:
        weights = state["intermediates"][torso]["pool"]["attention"][0]
    except KeyError as err:
        raise ValueError(
            f"{torso} has no attention pooling; an 'attention' map needs torso attention/memory/deepsets "
            'with attention_pool="attention"'
        ) from err
    return jnp.mean(weights[..., 0, :], axis=-2)


@struct.dataclass
class AttentionTransferHParams:
    """Traced hyperparameters of the attention-transfer term."""

    coef: float = 1.0
    """Weight beta of the term (Z&K use beta / 2 per map pair; here coef multiplies the mean over samples)."""


def _policy_torso(head: str) -> str:
    return "actor_torso" if head == "actor_critic" else "torso"


@register_extension
@dataclasses.dataclass(frozen=True)
class AttentionTransfer(Extension):
    """coef * mean_i AT(student map_i, teacher map_i), added to the loss of any trainer with extensions."""

    name = "attention_transfer"
    TAKES_TEACHER: ClassVar[bool] = True  # policy distillation installs its teacher here

    teacher_algorithm: str = "ppo"
    """Algorithm that trained the teacher (its head: actor-critic or Q)."""
    teacher_net: nets.NetConfig = nets.NetConfig(torso="attention")
    """The teacher's network."""
    teacher_map: str = "attention"
    """How the teacher's map is read: attention (its pooling weights) or saliency (input gradients)."""
    student_map: str = "saliency"
    """How the student's map is read: saliency (any network) or attention (an attention student)."""
    mask_padding: bool = True
    """Entity observations (N, F): compare the maps over present entities only (feature 0 = 1), both
    normalised there; padding slots, where an attention map is 0 by construction, are left out."""

    def teacher_head(self) -> str:
        from rlcx_jax import rl

        return rl.head(self.teacher_algorithm)

    def validate(self) -> None:
        self.teacher_head()
        self.teacher_net.validate()
        for side in ("teacher_map", "student_map"):
            if getattr(self, side) not in MAP_KINDS:
                raise ValueError(
                    f"Unknown {side.replace('_', ' ')} {getattr(self, side)!r}; expected one of {MAP_KINDS}"
                )
        if self.teacher_map == "attention" and not _pools_by_attention(self.teacher_net):
            raise ValueError(
                "teacher_map='attention' needs a teacher torso attention, memory or deepsets with "
                f"attention_pool='attention' (got torso={self.teacher_net.torso!r}, "
                f"pool={self.teacher_net.attention_pool!r})"
            )

    def default_hparams(self) -> AttentionTransferHParams:
        return AttentionTransferHParams()

    def validate_hparams(self, hparams: AttentionTransferHParams) -> None:
        if not float(hparams.coef) >= 0:
            raise ValueError(f"attention transfer coef must be >= 0, got {hparams.coef}")

    def init_state(self, key: jax.Array, params: Params, hparams: AttentionTransferHParams) -> Params:
        """No teacher yet: `with_teacher` installs its parameters before `learn`."""
        return {}

    def _map(self, kind: str, network: Any, apply: Any, params: Params, obs: jax.Array, head: str) -> jax.Array:
        if kind == "attention":
            return pooling_map(apply, params, obs, _policy_torso(head))
        return saliency_map(apply, params, obs, network.obs_ndim)

    def _masked(self, token_map: jax.Array, obs: jax.Array) -> jax.Array:
        """The map with padding slots of entity observations set to 0 (`mask_padding`)."""
        if self.mask_padding and obs.ndim == 3:
            return jnp.where(obs[..., 0] > 0.5, token_map, 0.0)
        return token_map

    def extras(self, ctx: BuildContext) -> ExtrasFn:
        head = self.teacher_head()
        teacher = nets.make(self.teacher_net, ctx.obs_shape, ctx.action_spec, head=head)
        teacher_apply = make_apply(teacher)  # no hooks: the teacher's own forward pass

        def teacher_maps(teacher_params: Params, hparams: AttentionTransferHParams, batch: Any) -> jax.Array:
            if not teacher_params:
                raise ValueError(
                    "AttentionTransfer: no teacher in state.ext['attention_transfer']; install one with "
                    "attention_transfer.with_teacher(state, teacher_params) before learn"
                )
            return self._masked(
                self._map(self.teacher_map, teacher, teacher_apply, teacher_params, batch.obs, head), batch.obs
            )

        return teacher_maps

    def loss_term(self, ctx: BuildContext) -> LossTerm:
        apply = ctx.apply
        assert apply is not None
        network, head = ctx.network, _head_of(ctx.network)
        if self.student_map == "attention" and not _pools_by_attention(network.config):
            raise ValueError("student_map='attention' needs a student torso with attention_pool='attention'")

        def term(params: Params, batch: Any, teacher_params: Params, hparams: AttentionTransferHParams):
            del teacher_params  # the teacher's maps arrive with the batch
            student = self._masked(self._map(self.student_map, network, apply, params, batch.obs, head), batch.obs)
            loss = jnp.mean(attention_transfer_loss(student, batch.extras[self.name]))
            return hparams.coef * loss, {"loss": loss}

        return term


def _pools_by_attention(cfg: nets.NetConfig) -> bool:
    return cfg.torso in ("attention", "memory", "deepsets") and cfg.attention_pool == "attention"


def _head_of(network: Any) -> str:
    return next(name for name, cls in nets.HEADS.items() if isinstance(network, cls))


def with_teacher(state: Any, teacher_params: Params) -> Any:
    """`state` (one seed, or a seed batch with `teacher_params` batched alike) with the teacher installed."""
    return state.replace(ext={**state.ext, AttentionTransfer.name: teacher_params})
