"""Network factory, the forward-pass wrapper (hooks) and the optimizer chain."""

from __future__ import annotations

import dataclasses
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlcx_jax import envs, nets, prng
from rlcx_jax.envs.normalize import init_stats
from rlcx_jax.nets.policy import distribution, sample_action
from rlcx_jax.rl import dqn
from rlcx_jax.rl.common import Hooks, make_apply, make_optimizer


def _init(net, obs_shape, key=0):
    return net.init(jax.random.PRNGKey(key), jnp.zeros((1,) + tuple(obs_shape)))["params"]


def _paths(params):
    return {"/".join(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}


def test_action_spec_from_spaces():
    env, params = envs.make("CartPole-v1")
    spec = nets.action_spec(env.action_space(params))
    assert spec == nets.ActionSpec(discrete=True, num_actions=2) and spec.dim == 2
    env, params = envs.make("Pendulum-v1")
    spec = nets.action_spec(env.action_space(params))
    assert not spec.discrete and spec.shape == (1,) and spec.dim == 1
    assert spec.low == -2.0 and spec.high == 2.0


def test_actor_critic_discrete_shapes_and_initial_policy():
    spec = nets.ActionSpec(discrete=True, num_actions=3)
    net = nets.make(nets.NetConfig(hidden=(16, 8)), (4,), spec)
    params = _init(net, (4,))
    obs = jax.random.normal(jax.random.PRNGKey(1), (5, 7, 4))  # extra leading axes are batch axes
    logits, value = net.apply({"params": params}, obs)
    assert logits.shape == (5, 7, 3) and value.shape == (5, 7)
    # Orthogonal init with scale 0.01 on the policy head: an almost uniform initial policy.
    assert float(jnp.max(jnp.abs(logits))) < 0.1
    assert {"actor_torso", "critic_torso"} <= {p.split("/")[0] for p in _paths(params)}
    shared = _init(nets.make(nets.NetConfig(hidden=(16,), separate_critic=False), (4,), spec), (4,))
    assert "critic_torso" not in {p.split("/")[0] for p in _paths(shared)}


def test_actor_critic_continuous_head():
    spec = nets.ActionSpec(discrete=False, shape=(2,), low=-1.0, high=1.0)
    net = nets.make(nets.NetConfig(hidden=(8,)), (3,), spec)
    params = _init(net, (3,))
    out, value = net.apply({"params": params}, jnp.ones((6, 3)))
    assert out.shape == (6, 4) and value.shape == (6,)
    np.testing.assert_array_equal(out[:, 2:], 0.0)  # log_std starts at zero (std 1), state independent
    assert "log_std" in _paths(params)


def test_q_network_shapes():
    spec = nets.ActionSpec(discrete=True, num_actions=4)
    net = nets.make(nets.NetConfig(hidden=(8,), activation="relu"), (2,), spec, head="q")
    q = net.apply({"params": _init(net, (2,))}, jnp.ones((3, 2)))
    assert q.shape == (3, 4)


def test_mlp_flattens_image_observations():
    spec = nets.ActionSpec(discrete=True, num_actions=3)
    net = nets.make(nets.NetConfig(hidden=(8,)), (10, 5), spec)  # Catch-bsuite shape
    params = _init(net, (10, 5))
    assert params["actor_torso"]["Dense_0"]["kernel"].shape == (50, 8)
    logits, value = net.apply({"params": params}, jnp.ones((2, 3, 10, 5)))
    assert logits.shape == (2, 3, 3) and value.shape == (2, 3)


def test_cnn_torso_on_breakout_minatar_under_jit_and_vmap():
    env, env_params = envs.make("Breakout-MinAtar")
    obs_shape = env.observation_space(env_params).shape
    assert obs_shape == (10, 10, 4)
    spec = nets.action_spec(env.action_space(env_params))
    net = nets.make(nets.NetConfig(torso="cnn", hidden=(32,), activation="relu"), obs_shape, spec)
    params = _init(net, obs_shape)
    assert params["actor_torso"]["Conv_0"]["kernel"].shape == (3, 3, 4, 16)
    # VALID 3x3 conv: 8 x 8 x 16 features into the dense layer.
    assert params["actor_torso"]["Dense_0"]["kernel"].shape == (8 * 8 * 16, 32)
    obs, _ = env.reset(jax.random.PRNGKey(0), env_params)
    batch = jnp.stack([obs, obs * 0.0, obs])
    logits, value = jax.jit(net.apply)({"params": params}, batch)
    assert logits.shape == (3, spec.num_actions) and value.shape == (3,)
    single = jax.vmap(lambda o: net.apply({"params": params}, o[None]))(batch)
    np.testing.assert_allclose(single[0][:, 0], logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(single[1][:, 0], value, rtol=1e-5, atol=1e-6)
    # (T, N, H, W, C) batches keep their leading axes.
    out, v = net.apply({"params": params}, jnp.stack([batch, batch]))
    assert out.shape == (2, 3, spec.num_actions) and v.shape == (2, 3)


@pytest.mark.parametrize("kernel, channels, features", [(3, 4, 16), (2, 6, 5), (1, 3, 2)])
def test_patch_conv_matches_lax_convolution(kernel: int, channels: int, features: int) -> None:
    """PatchConv against XLA's own VALID convolution and flax's nn.Conv (same parameter tree and
    initial values from the same key), forward and weight gradient, under jit and vmap."""
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 7, 6, channels))
    conv = nn.Conv(features, (kernel, kernel), padding="VALID")
    patch = nets.PatchConv(features, (kernel, kernel))
    flax_params = conv.init(jax.random.PRNGKey(1), x)["params"]
    params = patch.init(jax.random.PRNGKey(1), x)["params"]
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, flax_params)
    np.testing.assert_array_equal(params["kernel"], flax_params["kernel"])
    params = {"kernel": params["kernel"], "bias": jnp.linspace(-1.0, 1.0, features)}

    def reference(p, x):
        y = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + p["bias"]

    want = reference(params, x)
    assert want.shape == (5, 7 - kernel + 1, 6 - kernel + 1, features)
    got = jax.jit(patch.apply)({"params": params}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    batched = jax.vmap(lambda xi: patch.apply({"params": params}, xi))(x[:, None])
    np.testing.assert_allclose(batched[:, 0], want, rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda p: jnp.sum(jnp.tanh(fn(p, x)) ** 2)

    g_ref = jax.grad(loss(reference))(params)
    g = jax.jit(jax.grad(loss(lambda p, x: patch.apply({"params": p}, x))))(params)
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(g[name], g_ref[name], rtol=1e-4, atol=1e-5)


def test_patch_conv_refuses_a_kernel_larger_than_the_input() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        nets.PatchConv(4, (5, 5)).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 2)))


def test_bad_net_configs():
    spec = nets.ActionSpec(discrete=True, num_actions=2)
    with pytest.raises(ValueError, match="Unknown torso 'transformer'"):
        nets.make(nets.NetConfig(torso="transformer"), (4,), spec)
    with pytest.raises(ValueError, match="Unknown activation"):
        nets.make(nets.NetConfig(activation="sigmoidish"), (4,), spec)
    with pytest.raises(ValueError, match="Hidden widths must be positive"):
        nets.make(nets.NetConfig(hidden=(64, 0)), (4,), spec)
    with pytest.raises(ValueError, match="Unknown head"):
        nets.make(nets.NetConfig(), (4,), spec, head="dueling")
    with pytest.raises(ValueError, match="discrete action space"):
        nets.make(nets.NetConfig(), (4,), nets.ActionSpec(discrete=False, shape=(1,)), head="q")
    with pytest.raises(ValueError, match=r"cnn torso needs \(H, W, C\)"):
        net = nets.make(nets.NetConfig(torso="cnn"), (4,), spec)
        _init(net, (4,))


# ----------------------------------------------------------------------------------------------
# The forward-pass wrapper and the optimizer chain (the seams of docs/architecture.md)
# ----------------------------------------------------------------------------------------------
def test_make_apply_identity_param_transform_and_interceptor():
    spec = nets.ActionSpec(discrete=True, num_actions=2)
    net = nets.make(nets.NetConfig(hidden=(8,)), (3,), spec)
    params = _init(net, (3,))
    obs = jnp.ones((4, 3))
    logits, value = make_apply(net)(params, obs)
    ref_logits, ref_value = net.apply({"params": params}, obs)
    np.testing.assert_array_equal(logits, ref_logits)
    np.testing.assert_array_equal(value, ref_value)

    # A parameter transform (e.g. a pruning mask) is applied on the way in: all-zero weights give 0.
    zero = make_apply(net, Hooks(param_transform=lambda p: jax.tree.map(jnp.zeros_like, p)))
    logits0, value0 = zero(params, obs)
    np.testing.assert_array_equal(logits0, 0.0)
    np.testing.assert_array_equal(value0, 0.0)

    # An interceptor sees every Dense call and can transform activations.
    seen = []

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            seen.append(context.module.name)
            return next_fun(*args, **kwargs) * 0.0
        return next_fun(*args, **kwargs)

    logits_i, value_i = make_apply(net, Hooks(interceptor=interceptor))(params, obs)
    assert len(seen) == 4  # actor hidden, critic hidden, policy head, value head
    np.testing.assert_array_equal(value_i, 0.0)
    # Gradients flow through a (straight-through style) parameter transform.
    scaled = make_apply(net, Hooks(param_transform=lambda p: jax.tree.map(lambda x: 2.0 * x, p)))
    g = jax.grad(lambda p: jnp.sum(scaled(p, obs)[1]))(params)
    assert sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(g)) > 0


def test_optimizer_clips_by_global_norm_then_adam_and_anneals():
    params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
    grads = {"a": jnp.full(3, 100.0), "b": jnp.full((2, 2), -100.0)}
    tx = make_optimizer(lr=0.1, max_grad_norm=1.0)
    state = tx.init(params)
    updates, state = tx.update(grads, state)
    # First Adam step is -lr * sign(g) (up to eps), whatever the clipped magnitude.
    np.testing.assert_allclose(updates["a"], -0.1, rtol=1e-3)
    np.testing.assert_allclose(updates["b"], 0.1, rtol=1e-3)
    # Clipping happens before Adam: compare with the optax reference chain.
    ref = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(eps=1e-5), optax.scale(-0.1))
    ref_state = ref.init(params)
    g2 = {"a": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([[0.5, 0.0], [4.0, -1.0]])}
    s = state
    r_updates, ref_state = ref.update(grads, ref_state)
    update, ref_update = jax.jit(tx.update), jax.jit(ref.update)
    for _ in range(3):
        u, s = update(g2, s)
        r_updates, ref_state = ref_update(g2, ref_state)
    np.testing.assert_allclose(u["a"], r_updates["a"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(u["b"], r_updates["b"], rtol=1e-5, atol=1e-7)

    # Linear annealing reaches zero after anneal_steps steps.
    tx = make_optimizer(lr=0.1, max_grad_norm=1.0, anneal_steps=4)
    state = tx.init(params)
    sizes = []
    update = jax.jit(tx.update)
    for _ in range(5):
        u, state = update(grads, state)
        sizes.append(float(jnp.abs(u["a"][0])))
    np.testing.assert_allclose(sizes, [0.1, 0.075, 0.05, 0.025, 0.0], rtol=1e-3, atol=1e-9)

    # Extra gradient transformations run first (e.g. a mask keeping pruned weights at zero).
    mask = {"a": jnp.array([1.0, 0.0, 1.0]), "b": jnp.ones((2, 2))}
    masked = optax.stateless(lambda g, p=None: jax.tree.map(lambda x, m: x * m, g, mask))
    tx = make_optimizer(lr=0.1, max_grad_norm=1.0, hooks=Hooks(extra_grad_transforms=(masked,)))
    u, _ = tx.update(grads, tx.init(params))
    assert float(u["a"][1]) == 0.0 and float(u["a"][0]) != 0.0


def test_optimizer_lr_is_traceable_for_sweeps():
    params = {"w": jnp.ones(2)}
    grads = {"w": jnp.array([1.0, -1.0])}

    def one_step(lr):
        tx = make_optimizer(lr=lr, max_grad_norm=1.0)
        return tx.update(grads, tx.init(params))[0]["w"]

    swept = jax.jit(jax.vmap(one_step))(jnp.array([0.1, 0.2]))
    np.testing.assert_allclose(swept, [[-0.1, 0.1], [-0.2, 0.2]], rtol=1e-3)


@pytest.mark.parametrize("shape", [(4, 64), (64, 64), (64, 2), (3, 3, 4, 16), (1024, 64)])
def test_orthogonal_init_matches_flax_reference(shape: tuple[int, ...]) -> None:
    """Our LAPACK-free orthogonal init gives flax's matrix (same key, same normal draw) to float
    tolerance, with orthonormal rows or columns, and the same values under vmap."""
    key = jax.random.PRNGKey(3)
    ours = nets.orthogonal_init(1.4)(key, shape)
    ref = nn.initializers.orthogonal(1.4)(key, shape)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=2e-5)
    m = np.asarray(ours).reshape(-1, shape[-1]) / 1.4
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    np.testing.assert_allclose(gram, np.eye(gram.shape[0]), atol=2e-5)
    keys = jax.random.split(key, 3)
    batched = jax.jit(jax.vmap(lambda k: nets.orthogonal_init(1.4)(k, shape)))(keys)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(nets.orthogonal_init(1.4)(keys[i], shape)), atol=2e-5)


def _while_loops(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().as_text().count(" while(")


def test_init_variables_makes_the_orthogonal_kernels_together() -> None:
    """`init_variables` gives `module.init`'s parameters to float rounding (the same keys and normal
    draws), biases and shapes exactly, with one Gram-Schmidt loop for the whole network where
    `module.init` compiles one per kernel; it also works under vmap over keys."""
    net = nets.make(nets.NetConfig(hidden=(64, 64)), (4,), nets.ActionSpec(discrete=True, num_actions=2))
    obs = jnp.zeros((1, 4))
    key = jax.random.PRNGKey(5)
    ref = net.init(key, obs)["params"]
    ours = nets.init_variables(net, key, obs)["params"]
    assert jax.tree.structure(ours) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
        assert np.any(np.asarray(b) != 0) == np.any(np.asarray(a) != 0)  # kernels set, biases zero
    kernels = len([p for p in jax.tree.leaves(ref) if p.ndim == 2])
    assert kernels == 6
    loop_free = prng.loop_free(key)  # training's keys: random draws without loops, only Gram-Schmidt loops left
    # one loop per kernel, except the critic's one-column kernel, whose 1-trip loop XLA removes
    assert _while_loops(lambda k: net.init(k, obs), loop_free) == kernels - 1
    assert _while_loops(lambda k: nets.init_variables(net, k, obs), loop_free) == 1
    keys = jax.random.split(key, 3)
    batched = jax.vmap(lambda k: nets.init_variables(net, k, obs)["params"])(keys)
    for i in range(3):
        one = nets.init_variables(net, keys[i], obs)["params"]
        for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(one)):
            np.testing.assert_allclose(np.asarray(a[i]), np.asarray(b), rtol=0, atol=1e-6)


def test_init_variables_with_per_task_kernels_and_a_changed_kernel() -> None:
    """Multi-task heads (`TaskDense`, kernels made inside their own vmap) initialise as with
    `module.init`; a module that stores something other than the drawn kernel is a one-line error."""
    config = nets.NetConfig(hidden=(16,), num_tasks=3)
    net = nets.make(config, (7,), nets.ActionSpec(discrete=True, num_actions=2))
    obs = jnp.zeros((1, 7))
    for a, b in zip(
        jax.tree.leaves(nets.init_variables(net, jax.random.PRNGKey(1), obs)),
        jax.tree.leaves(net.init(jax.random.PRNGKey(1), obs)),
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)

    class Doubled(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("w", lambda k, s: 2.0 * nets.orthogonal_init()(k, s), (x.shape[-1], 3))
            return x @ w

    with pytest.raises(RuntimeError, match="did not return every orthogonal_init kernel"):
        nets.init_variables(Doubled(), jax.random.PRNGKey(0), jnp.zeros((1, 4)))
    assert Doubled().init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))["params"]["w"].shape == (4, 3)


def test_init_variables_in_two_threads_at_once() -> None:
    """Two `init_variables` passes in progress at the same time in two threads (both wait inside
    their init pass until the other arrives) each get their own kernels."""
    barrier = threading.Barrier(2, timeout=60)

    class Meeting(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(5, kernel_init=nets.orthogonal_init(1.0))(x)
            barrier.wait()  # the other thread is now inside its own pass
            return nn.Dense(3, kernel_init=nets.orthogonal_init(2.0))(x)

    obs = jnp.zeros((1, 4))
    results: dict[int, object] = {}

    def run(seed: int) -> None:
        results[seed] = nets.init_variables(Meeting(), jax.random.PRNGKey(seed), obs)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [1, 2]
    barrier = threading.Barrier(1)  # alone from here on
    for seed, variables in results.items():
        ref = Meeting().init(jax.random.PRNGKey(seed), obs)
        for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_applying_a_network_traces_each_kernel_shape_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """flax checks each parameter's shape on every `apply` by tracing its initializer under
    `jax.eval_shape`; `orthogonal_init` is jitted, so those checks trace the kernel computation
    once per (shape, gain), not once per layer and apply."""
    traced: list[tuple[int, ...]] = []
    inner = nets._orthogonal_kernels

    def counting(keys, shapes, scales, dtypes):
        traced.extend(tuple(s) for s in shapes)
        return inner(keys, shapes, scales, dtypes)

    monkeypatch.setattr(nets, "_orthogonal_kernels", counting)
    nets._orthogonal_kernel.clear_cache()
    net = nets.make(nets.NetConfig(hidden=(64, 64)), (4,), nets.ActionSpec(discrete=True, num_actions=2))
    obs = jnp.zeros((1, 4))
    params = nets.init_variables(net, jax.random.PRNGKey(0), obs)
    assert len(traced) == 6  # the deferred draw: all six kernels in one call
    traced.clear()
    for _ in range(3):  # every apply checks every layer's kernel
        jax.make_jaxpr(lambda p, o: net.apply(p, o))(params, obs)
    # torso (4, 64) and (64, 64) at gain sqrt 2, policy head (64, 2) at 0.01, value head (64, 1) at 1
    assert sorted(traced) == [(4, 64), (64, 1), (64, 2), (64, 64)]
    nets._orthogonal_kernel.clear_cache()


# ----------------------------------------------------------------------------------------------
# The dueling Q-network (NetConfig.dueling): Q = V + A - mean_a A
# ----------------------------------------------------------------------------------------------
def _random_params(net, obs_shape, seed):
    """The network's parameter tree with random normal leaves (biases too: a dropped bias shows)."""
    shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(obs_shape)))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), shapes)


def _np_dense(layer, x):
    return x @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)


def _np_dueling(params, obs):
    """Independent float64 NumPy forward of a 2-layer tanh dueling Q-network: (Q, A, V)."""
    h = np.asarray(obs, np.float64)
    for name in ("Dense_0", "Dense_1"):
        h = np.tanh(_np_dense(params["torso"][name], h))
    advantage = _np_dense(params["q_head"], h)
    value = _np_dense(params["q_value"], h)
    assert value.shape[-1] == 1
    return value + advantage - advantage.mean(axis=-1, keepdims=True), advantage, value[..., 0]


DUELING = nets.NetConfig(hidden=(16, 8), activation="tanh", dueling=True)


def test_dueling_q_network_is_value_plus_centred_advantage():
    spec = nets.ActionSpec(discrete=True, num_actions=4)
    net = nets.make(DUELING, (3,), spec, head="q")
    params = _random_params(net, (3,), seed=1)
    assert params["q_head"]["kernel"].shape == (8, 4) and params["q_value"]["kernel"].shape == (8, 1)
    obs = np.random.default_rng(2).normal(size=(2, 5, 3)).astype(np.float32)
    want, advantage, value = _np_dueling(params, obs)
    q = net.apply({"params": params}, jnp.asarray(obs))
    assert q.shape == (2, 5, 4)
    np.testing.assert_allclose(q, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(net.apply({"params": params}, jnp.asarray(obs), method="policy"), want, rtol=1e-5, atol=1e-5)
    # Both streams matter: Q is neither A alone nor A shifted by its mean; mean_a Q = V.
    assert np.max(np.abs(want - advantage)) > 0.1
    assert np.max(np.abs(want - (advantage - advantage.mean(-1, keepdims=True)))) > 0.1
    np.testing.assert_allclose(np.asarray(q).mean(-1), value, rtol=1e-5, atol=1e-5)


def test_dueling_greedy_action_is_the_argmax_of_the_advantages():
    """Neither V nor the mean subtraction moves the argmax: the greedy action of the network and of
    DQN's `act` is argmax_a A(s, a), whatever V(s) is."""
    spec = nets.ActionSpec(discrete=True, num_actions=2)  # CartPole: obs (4,), 2 actions
    net = nets.make(DUELING, (4,), spec, head="q")
    params = _random_params(net, (4,), seed=3)
    params = {**params, "q_value": {**params["q_value"], "bias": jnp.asarray([50.0])}}  # V dwarfs A
    obs = jnp.asarray(np.random.default_rng(4).normal(size=(64, 4)), jnp.float32)
    _, advantage, value = _np_dueling(params, np.asarray(obs))
    greedy = np.argmax(advantage, axis=-1)
    assert 0 < greedy.sum() < len(greedy) and np.all(value > 40.0)  # both actions are greedy somewhere
    np.testing.assert_array_equal(np.argmax(net.apply({"params": params}, obs), axis=-1), greedy)
    trainer = dqn.make(dqn.DQNConfig(net=DUELING))
    actions = trainer.act(params, init_stats((4,)), obs, jax.random.PRNGKey(0), True)
    np.testing.assert_array_equal(np.asarray(actions), greedy)


def test_dueling_layout_lists_the_value_stream_under_the_q_head_role():
    spec = nets.ActionSpec(discrete=True, num_actions=3)
    duel_roles = dict(nets.layout(DUELING, "q").roles)
    assert duel_roles["q_head"] == duel_roles["head"] == ("q_head", "q_value")
    assert set(duel_roles["policy"]) == {"torso", "q_head", "q_value"}
    assert nets.layout(DUELING, "q").feeds == (("torso", ("q_head", "q_value")),)
    duel_params = _init(nets.make(DUELING, (4,), spec, head="q"), (4,))
    # Every module a role names exists, and every top-level module belongs to the policy role.
    assert set(duel_params) == set(duel_roles["policy"])

    plain = dataclasses.replace(DUELING, dueling=False)
    plain_roles = dict(nets.layout(plain, "q").roles)
    assert plain_roles["q_head"] == plain_roles["head"] == ("q_head",)
    assert nets.layout(plain, "q").feeds == (("torso", ("q_head",)),)
    plain_params = _init(nets.make(plain, (4,), spec, head="q"), (4,))
    assert set(plain_params) == {"torso", "q_head"} and "q_value" not in plain_params
    assert plain_params["q_head"]["kernel"].shape == duel_params["q_head"]["kernel"].shape == (8, 3)


# ----------------------------------------------------------------------------------------------
# Dense layers' transposed kernel gradient (NetConfig.dense_grad)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch, n_in, n_out", [((7,), 4, 6), ((3, 5), 6, 2), ((9,), 5, 5)])
def test_transposed_grad_matmul_gradients_match_numpy(batch: tuple[int, ...], n_in: int, n_out: int) -> None:
    """y = x W; for the loss sum(y * c): dL/dx = c W^T and dL/dW = x^T c (rows of every batch axis),
    computed in NumPy; the same under jit and under vmap over a leading axis (as over seeds). Both
    branches: fewer outputs than inputs (dW from a transposed cotangent), otherwise (from transposed x)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=batch + (n_in,)).astype(np.float32)
    w = rng.normal(size=(n_in, n_out)).astype(np.float32)
    c = rng.normal(size=batch + (n_out,)).astype(np.float32)

    def loss(x, w, c):
        return jnp.sum(nets.transposed_grad_matmul(x, w) * c)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    dx, dw = grad(x, w, c)
    rows_x, rows_c = x.reshape(-1, n_in).astype(np.float64), c.reshape(-1, n_out).astype(np.float64)
    np.testing.assert_allclose(np.asarray(nets.transposed_grad_matmul(x, w)), x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), c @ w.T.astype(np.float64), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), rows_x.T @ rows_c, rtol=1e-5, atol=1e-5)

    xs, ws, cs = np.stack([x, -2 * x]), np.stack([w, w + 1]), np.stack([c, c])
    dxs, dws = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))(xs, ws, cs)
    for i in range(2):
        dxi, dwi = grad(xs[i], ws[i], cs[i])
        np.testing.assert_allclose(np.asarray(dxs[i]), np.asarray(dxi), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(dws[i]), np.asarray(dwi), rtol=1e-6, atol=1e-6)


def test_dense_grad_modes_agree_and_autodiff_keeps_forward_mode() -> None:
    """An actor-critic with dense_grad="transposed" (default) and "autodiff": same outputs, gradients
    and gradients of gradients (as MAML takes them); forward mode (jax.jvp) needs "autodiff" and is
    refused, not silently wrong, by the transposed rule. An unknown mode is a one-line error."""
    spec = nets.ActionSpec(discrete=True, num_actions=3)
    fast = nets.make(nets.NetConfig(hidden=(16, 16)), (4,), spec)
    plain = nets.make(nets.NetConfig(hidden=(16, 16), dense_grad="autodiff"), (4,), spec)
    obs = jax.random.normal(jax.random.PRNGKey(1), (32, 4))
    params = fast.init(jax.random.PRNGKey(0), obs)["params"]

    def loss(net, p):
        logits, value = net.apply({"params": p}, obs)
        return jnp.sum(jax.nn.log_softmax(logits)[:, 0]) + jnp.sum(value**2)

    def meta(net, p):  # one inner SGD step, then the loss: a gradient of a gradient
        inner = jax.tree.map(lambda a, g: a - 0.1 * g, p, jax.grad(lambda q: loss(net, q))(p))
        return loss(net, inner)

    for fn in (loss, meta):
        got, want = jax.grad(lambda p: fn(fast, p))(params), jax.grad(lambda p: fn(plain, p))(params)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)
    tangent = jax.tree.map(jnp.ones_like, params)
    _, jvp = jax.jvp(lambda p: loss(plain, p), (params,), (tangent,))
    assert np.isfinite(float(jvp))
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda p: loss(fast, p), (params,), (tangent,))
    with pytest.raises(ValueError, match="Unknown dense gradient 'fwd'"):
        nets.NetConfig(dense_grad="fwd").validate()


def test_sample_action_draws_the_softmax_distribution_from_raw_logits() -> None:
    """Discrete: frequencies of 40k draws within 0.01 of NumPy's softmax; the same draws from logits
    shifted by a constant (no normalisation is needed); the same under vmap as one call. Continuous:
    distrax's Gaussian sample for the same key."""
    logits = jnp.asarray([0.3, -1.0, 2.0, 0.5])
    probs = np.exp(np.asarray(logits, np.float64)) / np.exp(np.asarray(logits, np.float64)).sum()
    spec = nets.ActionSpec(discrete=True, num_actions=4)
    batch = jnp.broadcast_to(logits, (40_000, 4))
    draws = np.asarray(jax.jit(lambda k, lg: sample_action(lg, spec, k))(jax.random.PRNGKey(0), batch))
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / draws.size, probs, atol=0.01)
    shifted = np.asarray(sample_action(batch + 3.0, spec, jax.random.PRNGKey(0)))
    assert np.mean(shifted == draws) > 0.999
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    one_by_one = [sample_action(batch[:5], spec, k) for k in keys]
    vmapped = jax.vmap(lambda k: sample_action(batch[:5], spec, k))(keys)
    np.testing.assert_array_equal(np.asarray(vmapped), np.stack(one_by_one))

    cont = nets.ActionSpec(discrete=False, shape=(2,))
    out = jnp.asarray([[0.5, -0.5, -1.0, 0.0]])
    want = distribution(out, cont).sample(seed=jax.random.PRNGKey(2))
    np.testing.assert_array_equal(np.asarray(sample_action(out, cont, jax.random.PRNGKey(2))), np.asarray(want))
