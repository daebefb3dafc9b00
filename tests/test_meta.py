"""Meta-learning end to end on small budgets: the inner learner's trajectories against a NumPy replay of
point navigation, every method under jit and vmap (tasks inside, seeds outside), determinism, chunked =
whole training, the compressed initialisation, and `rlcx meta` (run directory, resume).

Learning quality (MAML's returns after adaptation against the paper's) lives in benchmarks/meta.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlcx_jax import cli
from rlcx_jax.configs.meta import MetaConfig, MetaHParams
from rlcx_jax.configs.nets import NetConfig
from rlcx_jax.meta import MAML, make_trainer
from rlcx_jax.meta.compressed import compressed_adaptation, compression_transform
from rlcx_jax.meta.policy_gradient import baseline_features
from tests.conftest import assert_trees_equal

SMALL = dict(
    meta_batch=3,
    num_trajectories=4,
    horizon=20,
    iterations=4,
    log_every=2,
    eval_tasks=3,
    eval_steps=2,
    net=NetConfig(hidden=(16, 16), activation="relu"),
)
HP = MetaHParams()


def _plain(state):
    """The state with its typed PRNG key as key data (comparable with NumPy)."""
    return state.replace(key=jax.random.key_data(state.key))


def _trainer(method: str = "maml", **changes):
    return make_trainer(MetaConfig(method=method, **{**SMALL, **changes}))


# ----------------------------------------------------------------------------------------------
# The inner learner
# ----------------------------------------------------------------------------------------------
def test_point_nav_trajectories_match_a_numpy_replay() -> None:
    trainer = _trainer(horizon=120)
    learner, family = trainer.learner, trainer.family
    task = family.task(goal_x=0.3, goal_y=-0.2)
    params = trainer.policy_params(jax.random.key(0))
    batch = jax.jit(learner.sample)(params, task, jax.random.key(1), HP)
    actions = np.asarray(batch.action, np.float64)  # [T, N, 2], unclipped samples
    positions = np.cumsum(0.1 * np.clip(actions, -1.0, 1.0), axis=0)  # actions in [-1, 1] scaled to +-0.1
    distance = np.linalg.norm(positions - np.array([0.3, -0.2]), axis=-1)
    # The episode is 100 steps; the trajectory's steps after it (a new episode) are not counted.
    np.testing.assert_allclose(np.asarray(batch.reward)[:100], -distance[:100], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(batch.valid), np.repeat([1.0, 0.0], [100, 20])[:, None] * np.ones((1, 4)))
    np.testing.assert_allclose(np.asarray(batch.episode_return), -distance[:100].sum(axis=0), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(batch.end_obs), positions[99], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(batch.obs)[1:100], positions[:99], rtol=1e-4, atol=1e-5)


def test_advantages_are_standardized_returns_minus_the_refit_baseline() -> None:
    trainer = _trainer(horizon=30)
    task = trainer.family.task(goal_x=-0.4, goal_y=0.1)
    batch = jax.jit(trainer.learner.sample)(trainer.policy_params(jax.random.key(0)), task, jax.random.key(2), HP)
    r = np.asarray(batch.reward, np.float64)
    g = np.zeros_like(r)
    running = np.zeros(r.shape[1])
    for t in reversed(range(len(r))):  # the trajectory is cut at 30 steps: no bootstrap
        running = r[t] + HP.gamma * running
        g[t] = running
    feats = np.asarray(baseline_features(batch.obs), np.float64).reshape(-1, 8)
    coef, *_ = np.linalg.lstsq(feats, g.reshape(-1), rcond=None)
    adv = g.reshape(-1) - feats @ coef
    adv = (adv - adv.mean()) / adv.std()
    np.testing.assert_allclose(np.asarray(batch.advantage).reshape(-1), adv, atol=2e-2)
    assert abs(float(jnp.mean(batch.advantage))) < 1e-5 and abs(float(jnp.std(batch.advantage)) - 1) < 1e-3


def test_discrete_family_trajectories_stop_at_the_first_termination() -> None:
    trainer = _trainer(family="cartpole-flip", horizon=60)
    task = trainer.family.task(force_sign=-1.0)
    batch = jax.jit(trainer.learner.sample)(trainer.policy_params(jax.random.key(0)), task, jax.random.key(3), HP)
    valid = np.asarray(batch.valid)
    lengths = valid.sum(axis=0)
    assert np.all(lengths < 60) and np.all(lengths > 5)  # a random policy falls within 60 steps
    np.testing.assert_array_equal(np.asarray(batch.episode_return), lengths)  # reward 1 per step
    assert np.all(np.diff(valid, axis=0) <= 0)  # once invalid, stays invalid


# ----------------------------------------------------------------------------------------------
# Every method: jit, vmap over seeds, determinism
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["maml", "fomaml", "reptile", "platipus"])
def test_every_method_trains_vmapped_over_seeds_deterministically(method: str) -> None:
    trainer = _trainer(method, inner_steps=2 if method == "reptile" else 1)
    keys = jax.random.split(jax.random.key(0), 2)
    train = jax.jit(jax.vmap(trainer.train, in_axes=(0, None)))
    out = train(keys, HP)
    again = train(keys, HP)
    assert_trees_equal((_plain(out.state), out.metrics), (_plain(again.state), again.metrics))
    m = out.metrics
    assert m.return_after.shape == (2, 2)  # seeds x rows
    for leaf in jax.tree.leaves(m):
        assert np.all(np.isfinite(np.asarray(leaf)))
    steps = np.array([2, 4], np.float32) * trainer.config.env_steps_per_iteration
    np.testing.assert_array_equal(np.asarray(m.env_steps)[0], steps)
    kl = float(jnp.max(jnp.abs(m.kl)))
    assert kl > 0 if method == "platipus" else kl == 0
    params = [np.asarray(x) for x in jax.tree.leaves(out.state.meta_params)]
    assert any(np.any(p[0] != p[1]) for p in params)  # the seeds differ
    if method == "maml":  # vmapped seeds = one seed at a time
        single = jax.jit(trainer.train)(keys[1], HP)
        for a, b in zip(params, jax.tree.leaves(single.state.meta_params)):
            np.testing.assert_allclose(a[1], np.asarray(b), rtol=1e-4, atol=1e-5)
    if method in ("maml", "platipus"):  # the evaluation table, from each method's initial_params
        seed_1 = jax.tree.map(lambda x: x[1], out.state.meta_params)
        table = jax.jit(trainer.evaluate)(seed_1, HP, jax.random.key(9))
        assert table.returns.shape == (3, 3) and table.end_obs.shape == (3, 3, 4, 2)
        assert np.all(np.isfinite(np.asarray(table.returns)))


def test_chunked_learning_is_bit_identical_to_one_train_call() -> None:
    trainer = _trainer("fomaml")
    key = jax.random.key(4)
    whole = jax.jit(trainer.train)(key, HP)
    learn = jax.jit(trainer.learn, static_argnums=1)
    state, first = learn(jax.jit(trainer.init)(key, HP), 2)
    state, second = learn(state, 2)
    assert_trees_equal(_plain(whole.state), _plain(state))
    assert_trees_equal(whole.metrics, jax.tree.map(lambda a, b: jnp.concatenate([a, b]), first, second))


def test_a_non_finite_meta_update_is_skipped_and_counted() -> None:
    class Broken(MAML):
        def meta_gradient(self, meta_params, tasks, key, ctx, hparams):
            direction, aux = super().meta_gradient(meta_params, tasks, key, ctx, hparams)
            return jax.tree.map(lambda g: g * jnp.nan, direction), aux

    config = MetaConfig(method="fomaml", **SMALL)
    trainer = make_trainer(config, method=Broken(first_order=True))
    out = jax.jit(trainer.train)(jax.random.key(0), HP)
    np.testing.assert_array_equal(np.asarray(out.metrics.skipped), [1.0, 1.0])
    assert_trees_equal(out.state.meta_params, trainer.policy_params(jax.random.split(jax.random.key(0))[0]))


def test_meta_training_improves_the_return_after_adaptation() -> None:
    """A short MAML run on point navigation: the post-adaptation return rises (a real signal; the
    benchmark holds the paper's numbers)."""
    trainer = _trainer("maml", iterations=40, log_every=10, horizon=100, num_trajectories=10, meta_batch=10)
    out = jax.jit(trainer.train)(jax.random.key(0), HP.replace(outer_lr=3e-3))
    after = np.asarray(out.metrics.return_after)
    assert after[-1] > after[0] + 5, after


# ----------------------------------------------------------------------------------------------
# Compressed initialisation
# ----------------------------------------------------------------------------------------------
def test_compressed_init_keeps_its_masks_and_codes_during_adaptation() -> None:
    trainer = _trainer()
    params = trainer.policy_params(jax.random.key(0))
    pruned = compression_transform(params, "pruned", sparsity=0.9)
    both = compression_transform(params, "pruned+int8", sparsity=0.9)
    learner = dataclasses.replace(trainer.learner, param_transform=both)
    from rlcx_jax.meta.adapt import adapt

    adapted = jax.jit(
        lambda p: adapt(learner, p, trainer.family.task(goal_x=0.2, goal_y=0.2), jax.random.key(1), 2, 0.1, HP).params
    )(params)
    seen = both(adapted)
    for path, kernel in jax.tree_util.tree_flatten_with_path(seen)[0]:
        if "kernel" in jax.tree_util.keystr(path):
            k = np.asarray(kernel)
            assert abs(np.mean(k == 0) - 0.9) < 0.02, path
            assert len(np.unique(k)) <= 256

    def kernels(tree):
        return [
            np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if "kernel" in jax.tree_util.keystr(p)
        ]

    for before, after in zip(kernels(pruned(params)), kernels(both(adapted))):
        assert np.all(after[before == 0] == 0)  # a pruned weight stays pruned
    moved = [np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(adapted))]
    assert any(moved)  # the latent weights did adapt (straight-through gradients)
    tables = compressed_adaptation(trainer, params, HP, jax.random.key(2), variants=("dense", "pruned"))
    assert set(tables) == {"dense", "pruned"} and tables["dense"].shape == (3, 3)


# ----------------------------------------------------------------------------------------------
# rlcx meta
# ----------------------------------------------------------------------------------------------
FLAGS = [
    "--iterations", "4", "--log-every", "2", "--meta-batch", "3", "--num-trajectories", "4", "--horizon", "20",
    "--eval-tasks", "3", "--eval-steps", "2", "--net-hidden", "16", "16", "--seeds", "2", "--chunks", "2",
]  # fmt: skip


def test_cli_meta_writes_a_run_directory_and_resumes_bit_identically(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("RLCX_COMPILE_CACHE", str(tmp_path / "cache"))  # the resumed run loads the programs
    out = tmp_path / "run"
    assert cli.main(["meta", "pretrain", *FLAGS, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "random init" in printed and "pretrain" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert [row["step"] for row in summary["adaptation"]] == [0, 1, 2] and summary["oracle"] < 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["seed"] for r in rows} == {0, 1}
    assert cli.main(["meta", "pretrain", *FLAGS, "--out", str(out)]) == 2
    assert "already holds files" in capsys.readouterr().err
    # Lose the last chunk: --resume retrains it from the first checkpoint, to the same bits.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    assert cli.main(["meta", "pretrain", *FLAGS, "--out", str(resumed), "--resume"]) == 0
    assert (resumed / "adaptation.json").read_text() == (out / "adaptation.json").read_text()
    assert (resumed / "metrics.jsonl").read_text() == (out / "metrics.jsonl").read_text()
    assert cli.main(["meta", "pretrain", *FLAGS, "--inner-lr", "0.2", "--out", str(resumed), "--resume"]) == 2
    assert "settings differ" in capsys.readouterr().err
