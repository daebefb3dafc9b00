"""Proximal Policy Optimization (Schulman et al. 2017), clipped objective, GAE advantages.

`make(config)` builds a `Trainer`; `make_train(config)` returns the pure `train(key, hparams)`:
    train = ppo.make_train(ppo.PPOConfig())
    out = xla.jit(jax.vmap(train))(keys, hparams)      # many seeds / settings in one call
(`rlcx_jax.xla.jit` is `jax.jit` with the XLA options rlcx_jax compiles with; same results.)
Defaults are PureJaxRL's CartPole settings.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rlcx_jax import prng
from rlcx_jax.configs.algorithms import PPOConfig, PPOHParams
from rlcx_jax.rl import onpolicy
from rlcx_jax.rl.common import Hooks, Trainer, TrainState, mean_ext_aux, minibatch_epochs, next_keys
from rlcx_jax.rl.losses import PolicyBatch, ppo_loss
from rlcx_jax.rl.onpolicy import OnPolicyMetrics

PPOState = TrainState


def _epoch_permutations(key: jax.Array, config: PPOConfig) -> jax.Array:
    """One shuffle of the batch per epoch, all drawn before the epoch loop in one batched sort."""
    return prng.permutations(key, config.steps_per_update, config.update_epochs)


def _update(agent: onpolicy.Agent, state: PPOState) -> tuple[PPOState, OnPolicyMetrics]:
    config: PPOConfig = agent.config
    hp: PPOHParams = state.hparams
    key, (key_collect, key_epochs) = next_keys(state.key, config.prng_impl, 2)
    state = state.replace(key=key)

    # COLLECT TRAJECTORIES
    state, col = onpolicy.collect(agent, state, key_collect)

    # CALCULATE ADVANTAGE
    advantage, target, _ = onpolicy.gae_estimate(col, hp)
    batch = onpolicy.policy_batch(agent, state, col, advantage, target, behaviour=True)

    # UPDATE NETWORK
    grad_fn = agent.value_and_grad(agent.terms.add_to(ppo_loss))

    def minibatch_step(carry: tuple[Any, Any], mb: PolicyBatch) -> tuple[tuple[Any, Any], Any]:
        params, opt_state = carry
        (_, aux), grads = grad_fn(params, mb, state.ext, hp.ext, hp, agent.apply, agent.spec, config.clip_value_loss)
        return agent.gradient_step(params, opt_state, hp, grads), aux

    perms = _epoch_permutations(key_epochs, config)
    (params, opt_state), (aux, ext_aux) = minibatch_epochs(
        minibatch_step, (state.params, state.opt_state), batch, perms, config.num_minibatches
    )
    aux, ext_aux = jax.tree.map(jnp.mean, aux), mean_ext_aux(ext_aux)
    loss = aux.policy_loss + hp.vf_coef * aux.value_loss - hp.ent_coef * aux.entropy
    loss = loss + sum((term["value"] for term in ext_aux.values()), jnp.zeros(()))
    state = state.replace(params=params, opt_state=opt_state)
    return onpolicy.finish_update(agent, state, col, loss, aux, ext_aux)


def make(config: PPOConfig = PPOConfig(), hooks: Hooks = Hooks()) -> Trainer:
    """Validate `config` and build init / learn / train / act for it."""
    return onpolicy.make_trainer(config, hooks, _update)


def make_train(config: PPOConfig = PPOConfig(), hooks: Hooks = Hooks()):
    """The pure `train(key, hparams, env_params=None) -> TrainOutput` for `config`."""
    return make(config, hooks).train
