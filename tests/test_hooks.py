"""The seams of docs/architecture.md: parameter transforms, activation interceptors and extra
gradient transformations reach every algorithm without editing it."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlcx_jax import nets
from rlcx_jax.rl import a2c, ppo
from rlcx_jax.rl.common import Hooks, make_apply


def _net_and_params():
    spec = nets.ActionSpec(discrete=True, num_actions=2)
    net = nets.make(nets.NetConfig(hidden=(8,)), (4,), spec)
    params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))["params"]
    return net, params


def test_param_transform_is_applied_in_forward() -> None:
    net, params = _net_and_params()
    zero_kernels = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, x: jnp.zeros_like(x) if "kernel" in jax.tree_util.keystr(path) else x, p
    )
    apply = make_apply(net, Hooks(param_transform=zero_kernels))
    obs = jax.random.normal(jax.random.PRNGKey(1), (5, 4))
    logits, value = apply(params, obs)
    # With every kernel zero, outputs are the (zero-initialised) output biases for every input.
    np.testing.assert_allclose(np.asarray(logits), 0.0)
    np.testing.assert_allclose(np.asarray(value), 0.0)
    plain_logits, _ = make_apply(net)(params, obs)
    assert not np.allclose(np.asarray(plain_logits), 0.0)


def test_interceptor_sees_every_dense_call() -> None:
    net, params = _net_and_params()
    calls = []

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            calls.append(context.module.name)
            return next_fun(*args, **kwargs) * 0.0  # e.g. a quantizer would transform outputs here
        return next_fun(*args, **kwargs)

    apply = make_apply(net, Hooks(interceptor=interceptor))
    logits, value = jax.jit(apply)(params, jnp.ones((3, 4)))
    assert len(calls) >= 4  # actor torso, critic torso, policy head, value head
    np.testing.assert_allclose(np.asarray(logits), 0.0)


def _frozen_first_layer() -> optax.GradientTransformation:
    """Zero the gradient of the actor's first kernel, like a pruning mask would for pruned weights."""

    def zero_first(path, g):
        return jnp.zeros_like(g) if "actor_torso" in jax.tree_util.keystr(path) and "Dense_0" in jax.tree_util.keystr(path) else g

    return optax.stateless(lambda updates, params=None: jax.tree_util.tree_map_with_path(zero_first, updates))


def test_extra_grad_transform_reaches_ppo_and_a2c() -> None:
    hooks = Hooks(extra_grad_transforms=(_frozen_first_layer(),))
    for module, cfg, hp in (
        (ppo, ppo.PPOConfig(total_timesteps=2048, num_steps=64), ppo.PPOHParams()),
        (a2c, a2c.A2CConfig(total_timesteps=1024), a2c.A2CHParams()),
    ):
        trainer = module.make(cfg, hooks)
        key = jax.random.PRNGKey(0)
        start = trainer.init(key, hp)
        out = jax.jit(trainer.train)(key, hp)
        before = start.params["actor_torso"]["Dense_0"]["kernel"]
        after = out.state.params["actor_torso"]["Dense_0"]["kernel"]
        np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
        # ...while the rest of the network did learn
        assert not np.array_equal(
            np.asarray(start.params["actor_torso"]["Dense_1"]["kernel"]),
            np.asarray(out.state.params["actor_torso"]["Dense_1"]["kernel"]),
        )


def test_parameter_projections_run_after_every_optimizer_step_in_order() -> None:
    """`project_params` sees the parameters after `params + updates` and the optimizer state;
    merged hooks project first with the first hook's projection."""
    halve = lambda p, s: jax.tree.map(lambda x: x * 0.5, p)  # noqa: E731
    shift = lambda p, s: jax.tree.map(lambda x: x + 1.0, p)  # noqa: E731
    merged = Hooks(project_params=halve).merge(Hooks(project_params=shift))
    params = {"w": jnp.arange(3.0)}
    np.testing.assert_array_equal(np.asarray(merged.project_params(params, None)["w"]), [1.0, 1.5, 2.0])
    clip = lambda p, s: jax.tree.map(lambda x: jnp.clip(x, -0.01, 0.01), p)  # noqa: E731
    trainer = ppo.make(ppo.PPOConfig(num_envs=2, num_steps=8, total_timesteps=2 * 8 * 3, update_epochs=1,
                                     num_minibatches=1))
    agent = trainer.agent.__class__(**{**trainer.agent.__dict__, "hooks": Hooks(project_params=clip)})
    state = trainer.init(jax.random.PRNGKey(0), ppo.PPOHParams())
    grads = jax.tree.map(jnp.ones_like, state.params)
    params, _ = agent.gradient_step(state.params, state.opt_state, state.hparams, grads)
    leaves = jax.tree.leaves(params)
    assert max(float(jnp.max(jnp.abs(x))) for x in leaves) <= 0.01
    assert any(float(jnp.max(jnp.abs(x))) == np.float32(0.01) for x in leaves)  # the clip was active
