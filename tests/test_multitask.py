"""Multi-task learning: per-task heads, sample-weighted losses, per-task gradients, the task-set
environment, head decay, and PPO / DQN training with PCGrad; references computed here independently."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlcx_jax import envs, nets
from rlcx_jax.envs.task_set import TaskSetEnv, TaskSetParams, task_ids
from rlcx_jax.multitask import MultiTask, MultiTaskHParams
from rlcx_jax.multitask.extension import head_decay_term, per_task_gradient, task_weights
from rlcx_jax.rl import dqn, ppo
from rlcx_jax.rl.losses import QBatch, q_learning_loss, sample_mean
from rlcx_jax.seams import BuildContext, Hooks, make_apply

T = 3
SPEC = nets.ActionSpec(discrete=True, num_actions=2)
OBS = (4 + T,)


def task_obs(key: jax.Array, n: int, tasks: np.ndarray) -> jax.Array:
    x = jax.random.normal(key, (n, 4))
    return jnp.concatenate([x, jax.nn.one_hot(jnp.asarray(tasks), T)], axis=-1)


@pytest.fixture(scope="module")
def q_net():
    cfg = nets.NetConfig(hidden=(8,), num_tasks=T)
    net = nets.make(cfg, OBS, SPEC, head="q")
    return net, jax.jit(lambda k: nets.init_params(net, k, OBS))(jax.random.PRNGKey(0))


def test_task_head_i_depends_only_on_head_i(q_net):
    net, params = q_net
    obs = task_obs(jax.random.PRNGKey(1), 6, np.array([0, 1, 2, 0, 1, 2]))
    base = np.asarray(net.apply({"params": params}, obs))
    bumped = jax.tree.map(lambda x: x, params)
    bumped["q_head"] = {k: v.at[1].add(3.0) for k, v in params["q_head"].items()}  # head 1 only
    out = np.asarray(net.apply({"params": bumped}, obs))
    np.testing.assert_array_equal(out[[0, 2, 3, 5]], base[[0, 2, 3, 5]])  # tasks 0 and 2: bit for bit
    assert not np.allclose(out[[1, 4]], base[[1, 4]])
    # the gradient of task 0's outputs reaches head 0 only, exactly
    grads = jax.grad(lambda p: jnp.sum(net.apply({"params": p}, obs[:1])))(params)
    np.testing.assert_array_equal(np.asarray(grads["q_head"]["kernel"][1:]), 0.0)
    assert np.any(np.asarray(grads["q_head"]["kernel"][0]) != 0.0)


def test_task_modes_read_the_task_as_documented():
    obs = task_obs(jax.random.PRNGKey(2), 4, np.array([0, 1, 2, 0]))
    for mode, task_matters in (("shared", False), ("embedding", True), ("heads", True)):
        cfg = nets.NetConfig(hidden=(8,), num_tasks=T, task_mode=mode)
        net = nets.make(cfg, OBS, SPEC)
        params = nets.init_params(net, jax.random.PRNGKey(0), OBS)
        swapped = obs.at[:, 4:].set(jax.nn.one_hot(jnp.array([1, 2, 0, 1]), T))
        if mode == "heads":  # make the heads differ (zero-initialised biases would hide the task)
            params["policy_head"]["bias"] = jnp.arange(T * 2, dtype=jnp.float32).reshape(T, 2)
        a, b = (
            net.apply({"params": params}, obs, method="policy"),
            net.apply({"params": params}, swapped, method="policy"),
        )
        assert (not np.allclose(a, b)) == task_matters, mode
    # a normalised one-hot (its own entry the only positive one) still selects the task exactly
    cfg = nets.NetConfig(hidden=(8,), num_tasks=T)
    net = nets.make(cfg, OBS, SPEC)
    params = nets.init_params(net, jax.random.PRNGKey(0), OBS)
    scaled = obs.at[:, 4:].set(obs[:, 4:] * 2.5 - 0.3)
    np.testing.assert_array_equal(net.apply({"params": params}, obs)[0], net.apply({"params": params}, scaled)[0])


def test_bad_multitask_configs_fail_in_one_line():
    with pytest.raises(ValueError, match="num_tasks must be 0"):
        nets.NetConfig(num_tasks=1).validate()
    with pytest.raises(ValueError, match="Unknown task mode"):
        nets.NetConfig(num_tasks=2, task_mode="head").validate()
    with pytest.raises(ValueError, match="Unknown task gradient"):
        MultiTask(task_gradient="pcgard").validate()
    net = nets.make(nets.NetConfig(num_tasks=3), (2, 3), SPEC)
    with pytest.raises(ValueError, match="flat observations"):
        nets.init_params(net, jax.random.PRNGKey(0), (2, 3))


def test_sample_mean_weights_and_the_unweighted_path():
    x = jax.random.normal(jax.random.PRNGKey(3), (5,))
    w = jnp.array([0.1, 0.2, 0.3, 0.4, 0.0])
    np.testing.assert_allclose(sample_mean(x, w), np.sum(np.asarray(w) * np.asarray(x)), rtol=1e-6)
    np.testing.assert_array_equal(sample_mean(x, None), jnp.mean(x))
    xx = jax.random.normal(jax.random.PRNGKey(4), (5, 3))
    np.testing.assert_allclose(sample_mean(xx, w), np.sum(np.asarray(w) * np.asarray(xx).mean(1)), rtol=1e-6)


def test_task_weights_are_normalised_over_present_tasks():
    lam = task_weights(MultiTaskHParams(task_weights=(1.0, 2.0, 3.0)), jnp.array([True, False, True]))
    np.testing.assert_allclose(lam, [0.25, 0.0, 0.75])
    np.testing.assert_allclose(task_weights(MultiTaskHParams(), jnp.array([True, True, True])), [1 / 3] * 3)
    with pytest.raises(ValueError, match="2 entries for 3 tasks"):
        task_weights(MultiTaskHParams(task_weights=(1.0, 2.0)), jnp.ones(3, bool))


def test_per_task_gradients_equal_gradients_on_each_tasks_own_samples(q_net):
    """g_t from the weighted loss equals the plain gradient of the loss on task t's samples alone,
    scaled by lambda_t; an absent task gets lambda 0 and a zero gradient."""
    net, params = q_net
    apply = make_apply(net)
    tasks = np.array([0, 0, 1, 0, 1, 1, 0, 1])  # task 2 absent
    key = jax.random.PRNGKey(5)
    obs, next_obs = task_obs(key, 8, tasks), task_obs(jax.random.fold_in(key, 1), 8, tasks)
    batch = QBatch(
        obs=obs,
        action=jnp.array([0, 1, 1, 0, 0, 1, 1, 0]),
        reward=jnp.linspace(-1.0, 1.0, 8),
        discount=jnp.full(8, 0.9),
        next_obs=next_obs,
        extras={"multitask": task_ids(obs, T)},
    )
    hp = MultiTaskHParams(task_weights=(1.0, 3.0, 5.0))

    def loss_fn(p, b, ext_state, ext_hparams, target):
        loss, aux = q_learning_loss(p, target, b, apply)
        return loss, (aux, {})

    (loss, (aux, _)), grads = per_task_gradient("multitask", T)(loss_fn, params, batch, {}, {"multitask": hp}, params)
    lam = np.array([0.25, 0.75, 0.0])
    for t in range(T):
        rows = np.flatnonzero(tasks == t)
        g_t = jax.tree.map(lambda x: x[t], grads)
        if rows.size == 0:
            assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g_t))
            continue
        sub = jax.tree.map(lambda x: x[rows] if hasattr(x, "shape") and x.shape[:1] == (8,) else x, batch)
        want = jax.grad(lambda p: q_learning_loss(p, params, sub.replace(extras=None), apply)[0])(params)
        for a, b in zip(jax.tree.leaves(g_t), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, lam[t] * np.asarray(b), rtol=2e-5, atol=1e-7)
    per_task_loss = [
        q_learning_loss(
            params,
            params,
            jax.tree.map(
                lambda x: x,
                batch.replace(
                    obs=obs[tasks == t],
                    action=batch.action[tasks == t],
                    reward=batch.reward[tasks == t],
                    discount=batch.discount[tasks == t],
                    next_obs=next_obs[tasks == t],
                    extras=None,
                ),
            ),
            apply,
        )[0]
        for t in (0, 1)
    ]
    np.testing.assert_allclose(loss, 0.25 * per_task_loss[0] + 0.75 * per_task_loss[1], rtol=1e-5)


def test_head_decay_is_half_the_squared_spread_of_the_heads(q_net):
    net, params = q_net
    ctx = BuildContext(net, OBS, SPEC, optimizer_steps=1, apply=make_apply(net))
    term = head_decay_term(MultiTask(), ctx)
    value, aux = term(params, None, None, MultiTaskHParams(head_decay=0.2))
    k, b = np.asarray(params["q_head"]["kernel"], np.float64), np.asarray(params["q_head"]["bias"], np.float64)
    spread = np.sum((k - k.mean(0)) ** 2) + np.sum((b - b.mean(0)) ** 2)
    np.testing.assert_allclose(aux["head_spread"], spread, rtol=1e-5)
    np.testing.assert_allclose(value, 0.1 * spread, rtol=1e-5)
    same = dict(params, q_head={name: jnp.broadcast_to(v[:1], v.shape) for name, v in params["q_head"].items()})
    assert float(term(same, None, None, MultiTaskHParams(head_decay=0.2))[0]) < 1e-12  # mean rounding only


def test_a_gradient_replacing_extension_must_come_first():
    g = lambda *a: None  # noqa: E731
    with pytest.raises(ValueError, match="Two extensions replace the gradient"):
        Hooks(gradient=g).merge(Hooks(gradient=g))
    with pytest.raises(ValueError, match="must come before"):
        Hooks(extra_grad_transforms=(object(),)).merge(Hooks(gradient=g))  # type: ignore[arg-type]


def test_task_set_env_plays_its_tasks_and_marks_them():
    env, params = envs.make("MultiTaskCartPole-v0")
    assert env.num_tasks == 10 and params.max_steps_in_episode == 200
    keys = jax.random.split(jax.random.PRNGKey(0), 64)
    obs, state = jax.jit(jax.vmap(env.reset, in_axes=(0, None)))(keys, params)
    assert obs.shape == (64, 14)
    np.testing.assert_array_equal(task_ids(obs, 10), state.task)
    assert len(np.unique(np.asarray(state.task))) > 5  # tasks are drawn, not fixed
    # one step of task t is CartPole's step with task t's parameters (the flipped force moves the cart the other way)
    inner = env.inner
    for t in (0, 1):
        fixed = params.replace(task=t)
        o, s = env.reset(jax.random.PRNGKey(1), fixed)
        o2, s2, r, term, trunc, _ = env.step(jax.random.PRNGKey(2), s, 1, fixed)
        want_obs, want_state, *_ = inner.step(jax.random.PRNGKey(2), s.inner, 1, env.task_params(params, t))
        np.testing.assert_allclose(o2[:4], want_obs, rtol=1e-6)
        assert int(task_ids(o2, 10)) == t
    pushes = [float(env.task_params(params, t).force_mag) for t in (0, 1)]
    assert pushes[0] > 0 > pushes[1]
    with pytest.raises(ValueError, match="task 10 is out of range"):
        envs.make("MultiTaskCartPole-v0", task=10)
    with pytest.raises(ValueError, match="at least 2 tasks"):
        TaskSetEnv(inner, jax.tree.map(lambda x: x[:1], params.tasks))
    assert isinstance(params, TaskSetParams)


TINY_PPO = ppo.PPOConfig(
    env="MultiTaskCartPole-v0",
    total_timesteps=2 * 8 * 16,
    num_envs=8,
    num_steps=16,
    num_minibatches=2,
    update_epochs=1,
    net=nets.NetConfig(hidden=(16,), num_tasks=10),
)


@pytest.mark.parametrize("gradient", ["weighted", "pcgrad"])
def test_ppo_and_dqn_train_with_per_task_gradients(gradient):
    ext = MultiTask(task_gradient=gradient)
    hp = ppo.PPOHParams(ext={"multitask": MultiTaskHParams(head_decay=0.01)})
    train = ppo.make(dataclasses.replace(TINY_PPO, extensions=(ext,))).train
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    out = jax.jit(jax.vmap(train, in_axes=(0, None)))(keys, hp)  # seeds vmapped around the task vmap
    assert out.metrics.loss.shape[0] == 2 and np.all(np.isfinite(np.asarray(out.metrics.loss)))
    assert np.all(np.isfinite(np.asarray(out.metrics.ext["multitask"]["aux"]["head_spread"])))
    one = jax.jit(train)(keys[1], hp)  # row 1 of the vmapped run is the single run of seed 1
    np.testing.assert_allclose(np.asarray(out.metrics.loss)[1], np.asarray(one.metrics.loss), rtol=1e-4, atol=1e-6)
    if gradient == "pcgrad":
        cfg = dqn.DQNConfig(
            env="MultiTaskCartPole-v0",
            total_timesteps=600,
            learning_starts=200,
            batch_size=32,
            buffer_size=1000,
            net=nets.NetConfig(hidden=(16,), num_tasks=10),
            extensions=(ext,),
        )
        out = jax.jit(dqn.make(cfg).train)(jax.random.PRNGKey(0), dqn.DQNHParams())
        assert np.all(np.isfinite(np.asarray(out.metrics.loss)))


def test_the_extension_refuses_a_network_without_tasks():
    cfg = dataclasses.replace(TINY_PPO, net=nets.NetConfig(hidden=(16,)), extensions=(MultiTask("pcgrad"),))
    with pytest.raises(ValueError, match="needs a multi-task network"):
        ppo.make(cfg)
