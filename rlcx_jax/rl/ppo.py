"""Proximal Policy Optimization (Schulman et al. 2017), clipped objective, GAE advantages.

`make(config)` builds a `Trainer`; `make_train(config)` returns the pure `train(key, hparams)`:
    train = ppo.make_train(ppo.PPOConfig())
    out = jax.jit(jax.vmap(train))(keys, hparams)      # many seeds / settings in one call
Defaults are PureJaxRL's CartPole settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from rlcx_jax.rl import onpolicy
from rlcx_jax.rl.common import Hooks, Trainer, check_positive, check_range, check_sparsity, next_keys
from rlcx_jax.rl.losses import PolicyBatch, ppo_loss
from rlcx_jax.rl.onpolicy import ActorCriticState, OnPolicyMetrics
from rlcx_jax.rl.returns import gae

PPOState = ActorCriticState


@dataclasses.dataclass(frozen=True)
class PPOConfig(onpolicy.OnPolicyConfig):
    """Static PPO settings. `num_envs * num_steps` must divide into `num_minibatches`."""

    update_epochs: int = 4
    num_minibatches: int = 4
    clip_value_loss: bool = True

    @property
    def optimizer_steps_per_update(self) -> int:
        return self.update_epochs * self.num_minibatches

    def validate(self) -> None:
        super().validate()
        check_positive("update_epochs", self.update_epochs)
        check_positive("num_minibatches", self.num_minibatches)
        if self.steps_per_update % self.num_minibatches != 0:
            raise ValueError(
                f"num_envs * num_steps ({self.steps_per_update}) must be divisible by "
                f"num_minibatches ({self.num_minibatches})"
            )


@struct.dataclass
class PPOHParams:
    """Traced PPO hyperparameters (vmappable for sweeps)."""

    lr: float = 2.5e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    sparsity: float = 0.0  # target of CompressConfig.prune_schedule (traced: one vmap sweeps it)

    def validate(self) -> None:
        """Check concrete (non-traced) values; called by the CLI before compiling."""
        check_positive("lr", self.lr)
        check_range("gamma", self.gamma, 0.0, 1.0)
        check_range("gae_lambda", self.gae_lambda, 0.0, 1.0)
        check_positive("clip_eps", self.clip_eps)
        check_positive("max_grad_norm", self.max_grad_norm)
        check_sparsity(self.sparsity)


def _epoch_permutations(key: jax.Array, config: PPOConfig) -> jax.Array:
    """One shuffle of the batch per epoch, all drawn before the epoch loop in one batched call.

    The shuffles use threefry keys whatever `prng_impl` is: XLA:CPU runs `permutation` with
    RngBitGenerator keys several times slower (measured), while threefry costs nothing here."""
    threefry = jax.random.wrap_key_data(jax.random.bits(key, (2,), jnp.uint32), impl="threefry2x32")
    keys = jax.random.split(threefry, config.update_epochs)
    return jax.vmap(lambda k: jax.random.permutation(k, config.steps_per_update))(keys)


def _update(agent: onpolicy.Agent, state: PPOState) -> tuple[PPOState, OnPolicyMetrics]:
    config: PPOConfig = agent.config  # type: ignore[assignment]
    hp: PPOHParams = state.hparams
    key, (key_collect, key_epochs) = next_keys(state.key, config.prng_impl, 2)
    state = state.replace(key=key)

    # COLLECT TRAJECTORIES
    state, col = onpolicy.collect(agent, state, key_collect)
    traj = col.traj

    # CALCULATE ADVANTAGE
    advantage = gae(traj.reward, col.discount_t, col.v_tm1, col.v_t, hp.gae_lambda, traj.truncated)
    target = advantage + col.v_tm1
    if config.normalize_advantages:  # once over the whole batch, before the minibatch loop
        advantage = onpolicy.normalize(advantage)
    batch = jax.tree.map(
        onpolicy.flatten_time,
        PolicyBatch(
            obs=agent.prep_obs(state.obs_stats, traj.obs),
            action=traj.action,
            advantage=advantage,
            target=target,
            log_prob=col.log_prob,
            value=col.v_tm1,
        ),
    )

    # UPDATE NETWORK
    tx = agent.optimizer(hp)
    grad_fn = jax.grad(ppo_loss, has_aux=True)

    def minibatch_step(carry: tuple[Any, Any], mb: PolicyBatch) -> tuple[tuple[Any, Any], Any]:
        params, opt_state = carry
        grads, aux = grad_fn(params, mb, hp, agent.apply, agent.spec, config.clip_value_loss)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), aux

    def epoch(carry: tuple[Any, Any], perm: jax.Array) -> tuple[tuple[Any, Any], Any]:
        minibatches = jax.tree.map(
            lambda x: jnp.reshape(x[perm], (config.num_minibatches, -1) + x.shape[1:]), batch
        )
        return jax.lax.scan(minibatch_step, carry, minibatches)

    (params, opt_state), aux = jax.lax.scan(
        epoch, (state.params, state.opt_state), _epoch_permutations(key_epochs, config)
    )
    aux = jax.tree.map(jnp.mean, aux)
    loss = aux.policy_loss + hp.vf_coef * aux.value_loss - hp.ent_coef * aux.entropy
    state = state.replace(params=params, opt_state=opt_state)
    return onpolicy.finish_update(agent, state, col, loss, aux)


def make(config: PPOConfig = PPOConfig(), hooks: Hooks = Hooks()) -> Trainer:
    """Validate `config` and build init / learn / train / act for it."""
    return onpolicy.make_trainer(config, hooks, _update)


def make_train(config: PPOConfig = PPOConfig(), hooks: Hooks = Hooks()):
    """The pure `train(key, hparams, env_params=None) -> TrainOutput` for `config`."""
    return make(config, hooks).train
