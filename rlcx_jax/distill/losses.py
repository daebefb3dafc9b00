"""Policy-distillation losses: pure functions of the student's and the teacher's network outputs.

Every loss maps per-sample outputs `[B, ...]` to a per-sample loss `[B]`; the caller averages (so
a mask or a weighting can be applied first). Outputs are what a head's `policy` method returns:
logits (actor-critic heads, discrete actions), Q-values (Q heads) or `concat(mean, log_std)`
(Gaussian policies).

* `softened_kl`: Hinton et al. 2015, "Distilling the knowledge in a neural network":
  tau^2 * KL(softmax(z_T / tau) || softmax(z_S / tau)). Both sides are softened, so the student's
  optimum is the teacher's policy itself at any tau; tau^2 keeps the gradient scale independent of tau.
* `q_value_kl`: Rusu et al. 2016, "Policy distillation", eq. 3: KL(softmax(q_T / tau) || softmax(q_S)).
  The teacher's Q-values are sharpened by a small tau (0.01 in the paper); the student's outputs
  become the logits of that sharpened policy.
* `greedy_nll`: -log softmax(z_S)[argmax z_T], the negative log-likelihood of the teacher's greedy
  action (Rusu et al.'s NLL baseline); for a Gaussian, -log pi_S(mean_T).
* `output_mse`: mean over outputs of (z_S - z_T)^2 (Rusu et al.'s MSE baseline on Q-values).
* `gaussian_kl`: KL(N(mu_T, sigma_T^2) || N(mu_S, sigma_S^2)) summed over action dimensions.
* `value_mse`: 0.5 * (v_S - v_T)^2, distilling the critic (the student can be fine-tuned by RL).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rlcx_jax.configs.pipeline import DISTILL_LOSSES
from rlcx_jax.nets import ActionSpec
from rlcx_jax.nets.policy import action_agreement, greedy_action

__all__ = [
    "LOSSES",
    "softened_kl",
    "q_value_kl",
    "greedy_nll",
    "output_mse",
    "gaussian_kl",
    "gaussian_nll",
    "value_mse",
    "greedy_agreement",
    "policy_distillation_loss",
]

LOSSES = DISTILL_LOSSES


def _check(fn: str, student: jax.Array, teacher: jax.Array) -> None:
    chex.assert_rank([student, teacher], 2, custom_message=f"{fn}: outputs must be [B, K]")
    chex.assert_equal_shape([student, teacher], custom_message=f"{fn}: student and teacher outputs must have one shape")
    chex.assert_type([student, teacher], float, custom_message=f"{fn}: outputs must be floating point")


def _kl_categorical(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
    """KL(softmax(t) || softmax(s)) per row; terms where the teacher's probability is 0 count 0."""
    log_p = jax.nn.log_softmax(teacher_logits, axis=-1)
    log_q = jax.nn.log_softmax(student_logits, axis=-1)
    p = jnp.exp(log_p)
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def softened_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: jax.Array) -> jax.Array:
    """tau^2 * KL(softmax(z_T / tau) || softmax(z_S / tau)), per sample [B]."""
    _check("softened_kl", student_logits, teacher_logits)
    chex.assert_rank(temperature, 0, custom_message="softened_kl: temperature must be a scalar")
    kl = _kl_categorical(teacher_logits / temperature, student_logits / temperature)
    return temperature**2 * kl


def q_value_kl(student_out: jax.Array, teacher_q: jax.Array, temperature: jax.Array) -> jax.Array:
    """KL(softmax(q_T / tau) || softmax(z_S)), per sample [B] (Rusu et al. 2016, eq. 3)."""
    _check("q_value_kl", student_out, teacher_q)
    chex.assert_rank(temperature, 0, custom_message="q_value_kl: temperature must be a scalar")
    return _kl_categorical(teacher_q / temperature, student_out)


def greedy_nll(student_logits: jax.Array, teacher_out: jax.Array) -> jax.Array:
    """-log softmax(z_S)[argmax z_T], per sample [B] (the teacher's output is only used for its argmax)."""
    _check("greedy_nll", student_logits, teacher_out)
    action = jnp.argmax(teacher_out, axis=-1)
    log_q = jax.nn.log_softmax(student_logits, axis=-1)
    return -jnp.take_along_axis(log_q, action[:, None], axis=-1)[:, 0]


def output_mse(student_out: jax.Array, teacher_out: jax.Array) -> jax.Array:
    """mean_k (z_S - z_T)^2, per sample [B]."""
    _check("output_mse", student_out, teacher_out)
    return jnp.mean(jnp.square(student_out - teacher_out), axis=-1)


def _mean_log_std(out: jax.Array) -> tuple[jax.Array, jax.Array]:
    mean, log_std = jnp.split(out, 2, axis=-1)
    return mean, log_std


def gaussian_kl(student_out: jax.Array, teacher_out: jax.Array) -> jax.Array:
    """KL(N_T || N_S) of diagonal Gaussians given as concat(mean, log_std), summed over dimensions [B]:
    log(sigma_S / sigma_T) + (sigma_T^2 + (mu_T - mu_S)^2) / (2 sigma_S^2) - 1/2."""
    _check("gaussian_kl", student_out, teacher_out)
    mu_s, log_s = _mean_log_std(student_out)
    mu_t, log_t = _mean_log_std(teacher_out)
    var_s = jnp.exp(2 * log_s)
    kl = log_s - log_t + (jnp.exp(2 * log_t) + jnp.square(mu_t - mu_s)) / (2 * var_s) - 0.5
    return jnp.sum(kl, axis=-1)


def gaussian_nll(student_out: jax.Array, teacher_out: jax.Array) -> jax.Array:
    """-log N(mu_T; mu_S, sigma_S^2), summed over dimensions [B] (the teacher's greedy action)."""
    _check("gaussian_nll", student_out, teacher_out)
    mu_s, log_s = _mean_log_std(student_out)
    mu_t, _ = _mean_log_std(teacher_out)
    z = (mu_t - mu_s) * jnp.exp(-log_s)
    return jnp.sum(0.5 * jnp.square(z) + log_s + 0.5 * jnp.log(2 * jnp.pi), axis=-1)


def value_mse(student_value: jax.Array, teacher_value: jax.Array) -> jax.Array:
    """0.5 * (v_S - v_T)^2 per sample [B]."""
    chex.assert_rank([student_value, teacher_value], 1, custom_message="value_mse: values must be [B]")
    chex.assert_equal_shape([student_value, teacher_value], custom_message="value_mse: values must have one shape")
    return 0.5 * jnp.square(student_value - teacher_value)


def greedy_agreement(student_out: jax.Array, teacher_out: jax.Array, spec: ActionSpec) -> jax.Array:
    """`nets.policy.action_agreement` of the two greedy actions: the fraction of the batch where the
    student's argmax is the teacher's, or (continuous actions) where its clipped mean lies within
    `AGREEMENT_TOLERANCE` of the action range of the teacher's."""
    return action_agreement(greedy_action(student_out, spec), greedy_action(teacher_out, spec), spec)


def policy_distillation_loss(
    loss: str, q_teacher: bool, discrete: bool, student_out: jax.Array, teacher_out: jax.Array, temperature: jax.Array
) -> jax.Array:
    """The per-sample loss named `loss` ("kl", "nll" or "mse") for a teacher of this kind.

    kl: Rusu's `q_value_kl` for a Q-value teacher, Hinton's `softened_kl` for a policy teacher,
    `gaussian_kl` for continuous actions (the temperature applies to discrete actions only)."""
    if loss == "mse":
        return output_mse(student_out, teacher_out)
    if loss == "nll":
        return greedy_nll(student_out, teacher_out) if discrete else gaussian_nll(student_out, teacher_out)
    if loss == "kl":
        if not discrete:
            return gaussian_kl(student_out, teacher_out)
        return (
            q_value_kl(student_out, teacher_out, temperature)
            if q_teacher
            else softened_kl(student_out, teacher_out, temperature)
        )
    raise ValueError(f"Unknown distillation loss {loss!r}; expected one of {LOSSES}")
