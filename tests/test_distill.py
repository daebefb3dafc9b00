"""Distillation losses against hand-computed values and gradients; the distillation loop on CartPole."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from conftest import f32

from rlcx_jax import nets
from rlcx_jax.compress import size
from rlcx_jax.distill import losses
from rlcx_jax.distill import policy_distillation as pd
from rlcx_jax.envs.normalize import init_stats
from rlcx_jax.rl.evaluate import make_evaluator

LN3 = float(np.log(3.0))


def _a(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


# ----------------------------------------------------------------------------------------------
# Losses: hand-computed values
# ----------------------------------------------------------------------------------------------
def test_softened_kl_hand_computed():
    # teacher logits (0, ln 3): p = (1/4, 3/4); student uniform.
    teacher, student = _a([[0.0, LN3]]), _a([[0.0, 0.0]])
    expected_t1 = 0.25 * np.log(0.25 / 0.5) + 0.75 * np.log(0.75 / 0.5)
    np.testing.assert_allclose(losses.softened_kl(student, teacher, _a(1.0)), [expected_t1], rtol=1e-6)
    # tau = 2: p = (1, sqrt 3) / (1 + sqrt 3); times tau^2 = 4
    p = np.array([1.0, np.sqrt(3.0)]) / (1.0 + np.sqrt(3.0))
    expected_t2 = 4.0 * np.sum(p * np.log(p / 0.5))
    np.testing.assert_allclose(losses.softened_kl(student, teacher, _a(2.0)), [expected_t2], rtol=1e-6)
    # equal policies: zero at any temperature
    np.testing.assert_allclose(losses.softened_kl(teacher + 5.0, teacher, _a(0.3)), [0.0], atol=1e-6)


def test_q_value_kl_sharpens_the_teacher_only():
    # Rusu et al.: softmax(q_T / tau) against softmax(q_S) (the student is not divided by tau)
    q_teacher, student = _a([[1.0, 1.02]]), _a([[0.0, 0.0]])
    p = np.exp([0.0, 2.0]) / np.exp([0.0, 2.0]).sum()  # (1.0, 1.02) / 0.01 = (100, 102)
    expected = np.sum(p * np.log(p / 0.5))
    np.testing.assert_allclose(losses.q_value_kl(student, q_teacher, _a(0.01)), [expected], rtol=1e-5)
    # the student matching the sharpened policy has zero loss
    np.testing.assert_allclose(losses.q_value_kl(_a([[0.0, 2.0]]), q_teacher, _a(0.01)), [0.0], atol=1e-6)


def test_greedy_nll_and_mse_hand_computed():
    student = _a([[0.0, LN3], [LN3, 0.0]])
    teacher = _a([[5.0, -1.0], [5.0, -1.0]])  # greedy action 0 in both rows
    np.testing.assert_allclose(losses.greedy_nll(student, teacher), [np.log(4.0), np.log(4.0 / 3.0)], rtol=1e-6)
    np.testing.assert_allclose(losses.output_mse(_a([[1.0, 2.0]]), _a([[0.0, 4.0]])), [(1.0 + 4.0) / 2], rtol=1e-6)
    np.testing.assert_allclose(losses.value_mse(_a([3.0, -1.0]), _a([1.0, -1.0])), [2.0, 0.0], rtol=1e-6)


def test_gaussian_kl_against_numerical_integration():
    mu_t, s_t, mu_s, s_s = 0.3, 0.5, -0.2, 0.8
    x = np.linspace(-8, 8, 200_001)
    p, q = scipy.stats.norm.pdf(x, mu_t, s_t), scipy.stats.norm.pdf(x, mu_s, s_s)
    integral = np.trapezoid(p * (np.log(p) - np.log(q)), x)
    out = lambda mu, s: _a([[mu, mu, np.log(s), np.log(s)]])  # noqa: E731  two identical dimensions
    got = losses.gaussian_kl(out(mu_s, s_s), out(mu_t, s_t))
    np.testing.assert_allclose(got, [2 * integral], rtol=1e-5)
    nll = losses.gaussian_nll(out(mu_s, s_s), out(mu_t, s_t))
    np.testing.assert_allclose(nll, [-2 * scipy.stats.norm.logpdf(mu_t, mu_s, s_s)], rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Losses: gradients (derived by hand) and transformations
# ----------------------------------------------------------------------------------------------
def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_gradients_move_the_student_towards_the_teacher():
    rng = np.random.default_rng(0)
    student, teacher = _a(rng.normal(size=(5, 4))), _a(rng.normal(size=(5, 4)))
    s, t = np.asarray(student), np.asarray(teacher)
    tau = 2.0
    # d/dz_S of tau^2 KL(softmax(t/tau) || softmax(s/tau)) = tau (softmax(s/tau) - softmax(t/tau))
    grad = jax.grad(lambda z: losses.softened_kl(z, teacher, _a(tau)).sum())(student)
    np.testing.assert_allclose(grad, tau * (_softmax(s / tau) - _softmax(t / tau)), atol=1e-6)
    # Rusu's KL: softmax(s) - softmax(t / tau)
    grad = jax.grad(lambda z: losses.q_value_kl(z, teacher, _a(0.5)).sum())(student)
    np.testing.assert_allclose(grad, _softmax(s) - _softmax(t / 0.5), atol=1e-6)
    # NLL: softmax(s) - onehot(argmax t): the teacher's action gains, every other action loses
    grad = np.asarray(jax.grad(lambda z: losses.greedy_nll(z, teacher).sum())(student))
    np.testing.assert_allclose(grad, _softmax(s) - np.eye(4)[t.argmax(axis=1)], atol=1e-6)
    assert np.all(grad[np.arange(5), t.argmax(axis=1)] < 0)
    # MSE: 2 (s - t) / K
    grad = jax.grad(lambda z: losses.output_mse(z, teacher).sum())(student)
    np.testing.assert_allclose(grad, 2 * (s - t) / 4, atol=1e-6)
    # a small step along -grad lowers every loss
    for fn in (
        lambda z: losses.softened_kl(z, teacher, _a(tau)),
        lambda z: losses.greedy_nll(z, teacher),
        lambda z: losses.output_mse(z, teacher),
    ):
        g = jax.grad(lambda z: fn(z).sum())(student)  # noqa: B023
        assert float(fn(student - 0.05 * g).sum()) < float(fn(student).sum())


def test_losses_same_under_jit_and_vmap():
    rng = np.random.default_rng(1)
    student, teacher = _a(rng.normal(size=(3, 6, 4))), _a(rng.normal(size=(3, 6, 4)))
    for name in losses.LOSSES:
        for q_teacher in (False, True):
            fn = lambda s, t: losses.policy_distillation_loss(name, q_teacher, True, s, t, _a(0.7))  # noqa: B023, E731
            plain = np.stack([fn(student[i], teacher[i]) for i in range(3)])
            np.testing.assert_allclose(jax.jit(jax.vmap(fn))(student, teacher), plain, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="Unknown distillation loss 'kll'"):
        losses.policy_distillation_loss("kll", False, True, student[0], teacher[0], _a(1.0))


# ----------------------------------------------------------------------------------------------
# The distillation loop
# ----------------------------------------------------------------------------------------------
STUDENT = nets.NetConfig(hidden=(24, 24))


def _distill_config(teacher_run, **changes) -> pd.DistillConfig:
    base = pd.DistillConfig(
        teacher_net=teacher_run.config.net, net=STUDENT, num_envs=8, num_steps=64, total_timesteps=30_720, log_every=5
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def distilled(runs):
    """One PPO teacher (the suite's CartPole run) and one compiled distillation program."""
    teacher_run = runs.get("ppo-cartpole")
    trainer = pd.make(_distill_config(teacher_run))
    teacher = pd.Teacher(teacher_run.out.state.params, teacher_run.out.state.obs_stats)
    hparams = f32(pd.DistillHParams())
    train = jax.jit(trainer.train)
    out = jax.block_until_ready(train(jax.random.PRNGKey(3), hparams, teacher))
    return teacher_run, trainer, teacher, hparams, train, out


class TestDistillationLoop:
    def test_four_times_smaller_student_keeps_ninety_percent_of_the_return(self, distilled):
        teacher_run, trainer, teacher, _, _, out = distilled
        policy = nets.layout(STUDENT).prefixes("policy")
        ratio = size.count(teacher.params, 32, policy).params / size.count(out.state.params, 32, policy).params
        assert ratio >= 4.0
        key = jax.random.PRNGKey(11)
        teacher_eval = jax.jit(make_evaluator(teacher_run.trainer, 64, greedy=False))
        student_eval = jax.jit(make_evaluator(trainer, 64, greedy=False))
        teacher_return = float(teacher_eval(teacher.params, teacher.obs_stats, key).mean())
        student_return = float(student_eval(out.state.params, out.state.obs_stats, key).mean())
        assert teacher_return > 100  # a teacher worth distilling
        assert student_return >= 0.9 * teacher_return, (student_return, teacher_return)
        # the student learned to act like the teacher (training-batch agreement rises)
        agreement = np.asarray(out.metrics.aux.agreement)
        assert agreement[-1] > 0.85 and agreement[-1] > agreement[0]
        # beta went linearly from 1 (teacher acts) to 0 (student acts)
        beta = np.asarray(out.metrics.teacher_fraction)
        assert beta[0] > 0.8 and beta[-1] < 0.2 and np.all(np.diff(beta) < 0)

    def test_vmap_over_seeds_and_temperatures_matches_single_runs(self, distilled):
        _, trainer, teacher, hparams, train, out = distilled
        keys = jnp.stack([jax.random.PRNGKey(3), jax.random.PRNGKey(4)])
        temps = hparams.replace(temperature=jnp.asarray([1.0, 3.0], jnp.float32))
        axes = (0, jax.tree.map(lambda _: None, hparams).replace(temperature=0), None)
        swept = jax.jit(jax.vmap(trainer.train, in_axes=axes))(keys, temps, teacher)
        lane0 = jax.tree.map(lambda x: x[0], swept.state.params)
        for a, b in zip(jax.tree.leaves(lane0), jax.tree.leaves(out.state.params)):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
        single = train(keys[1], hparams.replace(temperature=jnp.float32(3.0)), teacher)
        for a, b in zip(
            jax.tree.leaves(jax.tree.map(lambda x: x[1], swept.state.params)), jax.tree.leaves(single.state.params)
        ):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)

    def test_determinism(self, distilled):
        _, _, teacher, hparams, train, out = distilled
        again = train(jax.random.PRNGKey(3), hparams, teacher)
        for a, b in zip(jax.tree.leaves(again.state.params), jax.tree.leaves(out.state.params)):
            assert np.array_equal(np.asarray(a), np.asarray(b))

    def test_teacher_of_another_shape_is_refused_before_compiling(self, distilled):
        teacher_run, trainer, teacher, hparams, _, _ = distilled
        other = pd.Teacher(jax.tree.map(lambda x: x[..., :1], teacher.params), teacher.obs_stats)
        with pytest.raises(ValueError, match="do not fit teacher_net"):
            jax.eval_shape(trainer.init, jax.random.PRNGKey(0), hparams, other)


def test_q_value_teacher_distils_with_rusus_kl(runs):
    """A DQN teacher, Rusu's KL with tau = 0.01, a 16x16 student: greedy returns close to the teacher's."""
    teacher_run = runs.get("dqn-cartpole")
    config = pd.DistillConfig(
        teacher_algorithm="dqn",
        teacher_net=teacher_run.config.net,
        net=nets.NetConfig(hidden=(16, 16)),
        total_timesteps=20_480,
        log_every=5,
    )
    trainer = pd.make(config)
    assert trainer.agent.network.layout(config.net).groups("q_head") == ("q_head",)  # the teacher's head
    teacher = pd.Teacher(teacher_run.out.state.params, teacher_run.out.state.obs_stats)
    out = jax.jit(trainer.train)(jax.random.PRNGKey(2), f32(pd.DistillHParams(temperature=0.01)), teacher)
    key = jax.random.PRNGKey(11)
    teacher_return = float(
        jax.jit(make_evaluator(teacher_run.trainer, 32, greedy=True))(teacher.params, teacher.obs_stats, key).mean()
    )
    student_return = float(
        jax.jit(make_evaluator(trainer, 32, greedy=True))(out.state.params, teacher.obs_stats, key).mean()
    )
    assert teacher_return > 100 and student_return >= 0.8 * teacher_return, (student_return, teacher_return)
    assert float(out.metrics.aux.agreement[-1]) > 0.8


def test_gaussian_teacher_distils_without_nan():
    """Continuous actions: Gaussian KL and the value term train; agreement is the fraction of states
    whose mean actions lie within 1% of the action range of the teacher's.
    (An untrained teacher is enough here: its Gaussian policy is a target like any other.)"""
    config = pd.DistillConfig(
        env="Pendulum-v1",
        teacher_net=nets.NetConfig(hidden=(16,)),
        net=nets.NetConfig(hidden=(8, 8)),
        num_envs=4,
        num_steps=32,
        total_timesteps=256,
        log_every=1,
    )
    trainer = pd.make(config)
    network = pd.teacher_network(config, trainer.agent)
    params = network.init(jax.random.PRNGKey(7), jnp.zeros((1, 3)))["params"]
    params["log_std"] = jnp.full((1,), -0.5)  # a teacher more certain than the student's initial policy
    teacher = pd.Teacher(params, init_stats((3,)))
    out = jax.jit(trainer.train)(jax.random.PRNGKey(0), f32(pd.DistillHParams()), teacher)
    loss = np.asarray(out.metrics.loss)
    assert np.all(np.isfinite(loss)) and loss[-1] < loss[0]
    agreement = np.asarray(out.metrics.aux.agreement)
    assert np.all(np.isfinite(agreement)) and np.all((agreement >= 0) & (agreement <= 1))
    assert out.state.params["log_std"].shape == (1,)


BAD_DISTILL = [
    (dict(teacher_algorithm="ppo2"), "Unknown algorithm 'ppo2'. Did you mean 'ppo'"),
    (dict(loss="kll"), "Unknown distillation loss 'kll'"),
    (dict(net=nets.NetConfig(hidden=())), "at least one hidden layer"),
    (dict(net=nets.NetConfig(hidden=(0,))), "Hidden widths must be positive"),
    (dict(num_minibatches=3), "divisible by num_minibatches"),
]


@pytest.mark.parametrize("changes,message", BAD_DISTILL)
def test_bad_distill_config_fails_in_one_line(changes, message):
    config = dataclasses.replace(pd.DistillConfig(), **changes)
    with pytest.raises(ValueError, match=message):
        pd.make(config)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError, match="temperature must be positive"):
        pd.DistillHParams(temperature=temperature).validate()


# ----------------------------------------------------------------------------------------------
# Kickstarting: the algorithm's own loss plus a distillation term (the loss seam)
# ----------------------------------------------------------------------------------------------
class TestKickstart:
    def test_distillation_term_pulls_a_ppo_student_towards_its_teacher(self, runs):
        from rlcx_jax.distill import kickstart
        from rlcx_jax.rl import ppo
        from rlcx_jax.rl.common import broadcast_tree

        teacher_run = runs.get("ppo-cartpole")
        ext = kickstart.DistillTerm(teacher_net=teacher_run.config.net)
        config = ppo.PPOConfig(
            num_envs=4, num_steps=128, total_timesteps=4 * 128 * 16, log_every=4, net=STUDENT, extensions=(ext,)
        )
        trainer = ppo.make(config)
        hparams = f32(ppo.PPOHParams(lr=1e-3)).with_ext("distill", f32(kickstart.DistillTermHParams()))
        sweep = broadcast_tree(hparams, 2)
        sweep = sweep.with_ext("distill", sweep.ext["distill"].replace(coef=jnp.asarray([0.0, 10.0], jnp.float32)))
        state = jax.vmap(trainer.init)(jnp.stack([jax.random.PRNGKey(5)] * 2), sweep)
        learn = jax.vmap(lambda s: trainer.learn(s, trainer.num_updates))
        with pytest.raises(ValueError, match="no teacher in state.ext"):
            jax.eval_shape(learn, state)
        teacher = jax.tree.map(lambda x: jnp.stack([x, x]), teacher_run.out.state.params)
        _, metrics = jax.jit(learn)(kickstart.with_teacher(state, teacher))
        value, kl = np.asarray(metrics.ext["distill"]["value"]), np.asarray(metrics.ext["distill"]["aux"]["loss"])
        assert np.all(value[0] == 0.0)  # coef 0: the term adds nothing (its KL is still measured)
        np.testing.assert_allclose(value[1], 10.0 * kl[1], rtol=1e-5)
        assert kl[1, -1] < 0.5 * kl[0, -1], kl  # the teacher's pull: half the KL of plain PPO at the end

    def test_bad_term_settings(self):
        from rlcx_jax.distill import kickstart

        with pytest.raises(ValueError, match="Unknown distillation loss"):
            kickstart.DistillTerm(loss="l2").validate()
        with pytest.raises(ValueError, match="distill temperature must be > 0"):
            kickstart.DistillTerm().validate_hparams(kickstart.DistillTermHParams(temperature=0.0))
