"""The seams, exercised the way a new capability would use them: everything an extension or a
torso needs is defined in this file, and nothing under rlcx_jax/ names it.

* An extension with its own traced hyperparameter, its own state, per-sample batch extras and a
  loss term trains with all four algorithms; a vmap over its coefficient is one compiled call.
* A torso registered here trains with PPO and DQN, and masks, export and size accounting find its
  parameters through the network's declared layout.
* The layers: `compress/` imports nothing from `rl/`; `rl/` names no compression type.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from rlcx_jax import checkpoint, nets
from rlcx_jax.compress import export, masks, size
from rlcx_jax.compress.training import CompressConfig, CompressHParams, prune_selection
from rlcx_jax.rl import a2c, dqn, ppo, reinforce
from rlcx_jax.seams import BuildContext, Extension, register_extension

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "rlcx_jax"


# ----------------------------------------------------------------------------------------------
# An extension written by a user: L2 penalty toward the initial parameters
# ----------------------------------------------------------------------------------------------
@struct.dataclass
class AnchorHParams:
    coef: float = 0.0


@register_extension
@dataclasses.dataclass(frozen=True)
class AnchorToInit(Extension):
    """loss += coef * ||params - params_0||^2 (its state: params_0). Its extras are every sample's
    observation sum; the term reports their mean, so the test can see the extras reach the loss."""

    name = "anchor"

    def default_hparams(self) -> AnchorHParams:
        return AnchorHParams()

    def init_state(self, key: jax.Array, params: Any, hparams: AnchorHParams) -> Any:
        return params

    def extras(self, ctx: BuildContext):
        def per_sample(state: Any, hparams: AnchorHParams, batch: Any) -> jax.Array:
            return jnp.sum(jnp.reshape(batch.obs, (batch.obs.shape[0], -1)), axis=-1)

        return per_sample

    def loss_term(self, ctx: BuildContext):
        assert ctx.apply is not None  # the term may call the network through every hook

        def term(params: Any, batch: Any, state: Any, hparams: AnchorHParams) -> tuple[jax.Array, Any]:
            assert batch.extras["anchor"].shape == batch.obs.shape[:1]  # one value per sample
            sq = sum(jnp.sum(jnp.square(p - p0)) for p, p0 in zip(jax.tree.leaves(params), jax.tree.leaves(state)))
            return hparams.coef * sq, {"sq_distance": sq, "extras_mean": jnp.mean(batch.extras["anchor"])}

        return term


COEFS = jnp.array([0.0, 1.0, 100.0], jnp.float32)
TINY_NET = nets.NetConfig(hidden=(16,))
ALGORITHMS = {
    "ppo": (ppo, ppo.PPOConfig(num_envs=4, num_steps=16, total_timesteps=4 * 16 * 12, update_epochs=2,
                               num_minibatches=2, net=TINY_NET), ppo.PPOHParams(lr=3e-3)),
    "a2c": (a2c, a2c.A2CConfig(num_envs=4, num_steps=8, total_timesteps=4 * 8 * 30, net=TINY_NET), a2c.A2CHParams()),
    "reinforce": (reinforce, reinforce.ReinforceConfig(num_envs=4, num_steps=16, total_timesteps=4 * 16 * 20,
                                                       net=TINY_NET), reinforce.ReinforceHParams(lr=3e-3)),
    "dqn": (dqn, dqn.DQNConfig(num_envs=4, train_frequency=4, buffer_size=256, batch_size=16, learning_starts=32,
                               target_update_period=16, total_timesteps=4 * 100, log_every=10, net=TINY_NET),
            dqn.DQNHParams(lr=3e-3)),
}


def _distance_from_init(params: Any, init: Any) -> np.ndarray:
    """Per-lane Euclidean distance between two stacked parameter trees."""
    sq = sum(np.sum(np.square(np.asarray(a) - np.asarray(b)), axis=tuple(range(1, np.ndim(a))))
             for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(init)))
    return np.sqrt(sq)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_user_extension_trains_every_algorithm_and_vmaps_over_its_coefficient(algorithm: str) -> None:
    module, config, hparams = ALGORITHMS[algorithm]
    trainer = module.make(dataclasses.replace(config, extensions=(AnchorToInit(),)))
    sweep = jax.vmap(lambda c: hparams.with_ext("anchor", AnchorHParams(coef=c)))(COEFS)
    out = jax.jit(jax.vmap(trainer.train, in_axes=(None, 0)))(jax.random.PRNGKey(0), sweep)

    # Its state is the initial parameters, kept unchanged; every lane starts from the same ones.
    init = out.state.ext["anchor"]
    first = trainer.init(jax.random.PRNGKey(0), hparams)
    for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(first.params)):
        np.testing.assert_array_equal(np.asarray(a)[2], np.asarray(b))

    # A stronger pull keeps the parameters closer to where they started: three distinct, ordered.
    dist = _distance_from_init(out.state.params, init)
    assert dist[0] > dist[1] > dist[2] > 0.0, dist

    # The term's value and aux reach the metrics: zero without a coefficient, coef * distance^2 otherwise.
    ext = out.metrics.ext["anchor"]
    value, sq = np.asarray(ext["value"]), np.asarray(ext["aux"]["sq_distance"])
    assert value.shape == sq.shape == out.metrics.loss.shape
    np.testing.assert_array_equal(value[0], 0.0)
    np.testing.assert_allclose(value[2], 100.0 * sq[2], rtol=1e-5)
    assert np.all(np.asarray(ext["aux"]["extras_mean"]) != 0.0)  # extras were computed from observations


def test_extension_hparams_default_and_unknown_names() -> None:
    _, config, hparams = ALGORITHMS["a2c"]
    trainer = a2c.make(dataclasses.replace(config, extensions=(AnchorToInit(),)))
    state = jax.eval_shape(trainer.init, jax.random.PRNGKey(0), hparams)  # missing ext hparams: defaults
    assert set(state.hparams.ext) == {"anchor"}
    with pytest.raises(ValueError, match="no configured extension"):
        a2c.make(config).init(jax.random.PRNGKey(0), hparams.with_ext("anchor", AnchorHParams()))
    with pytest.raises(ValueError, match="Two extensions"):
        a2c.make(dataclasses.replace(config, extensions=(AnchorToInit(), AnchorToInit())))


def test_run_spec_round_trips_extensions_through_json() -> None:
    config = ppo.PPOConfig(extensions=(CompressConfig(prune_schedule="gradual", prune_every=8), AnchorToInit()))
    hparams = ppo.PPOHParams(lr=1e-3).with_ext("compress", CompressHParams(0.75)).with_ext("anchor", AnchorHParams(0.5))
    spec = checkpoint.RunSpec("ppo", config, hparams, 2, 0, 10)
    back = checkpoint.RunSpec.from_json(spec.to_json())
    assert back.config == config
    assert back.hparams.ext["compress"] == CompressHParams(0.75) and back.hparams.ext["anchor"] == AnchorHParams(0.5)
    assert back.hparams.replace(ext={}) == hparams.replace(ext={})
    old = spec.to_json()
    del old["format"]
    with pytest.raises(checkpoint.CheckpointError, match="format 1"):
        checkpoint.RunSpec.from_json(old)


# ----------------------------------------------------------------------------------------------
# A torso registered by a user
# ----------------------------------------------------------------------------------------------
@nets.register_torso("test-gated")
class GatedTorso(nn.Module):
    """features = tanh(W x) * sigmoid(G x), layer-normalised: kernels, biases and a norm scale."""

    config: nets.NetConfig
    obs_ndim: int

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        x = jnp.reshape(obs, obs.shape[: obs.ndim - self.obs_ndim] + (-1,)).astype(jnp.float32)
        width = self.config.hidden[0]
        h = jnp.tanh(nn.Dense(width, name="value")(x)) * nn.sigmoid(nn.Dense(width, name="gate")(x))
        return nn.LayerNorm(name="norm")(h)


GATED = nets.NetConfig(torso="test-gated", hidden=(24,))


@pytest.mark.parametrize("algorithm", ["ppo", "dqn"])
def test_registered_torso_trains_and_compresses_through_its_layout(algorithm: str, tmp_path: pathlib.Path) -> None:
    module, config, hparams = ALGORITHMS[algorithm]
    compress = CompressConfig(prune_schedule="oneshot", prune_distribution="uniform")  # 50% in every layer
    config = dataclasses.replace(config, net=GATED, extensions=(compress,))
    trainer = module.make(config)
    out = jax.jit(trainer.train)(jax.random.PRNGKey(1), hparams.with_ext("compress", CompressHParams(0.5)))
    params = out.state.params
    assert np.isfinite(np.asarray(out.metrics.loss)).all()

    # Pruning during training found the torso kernels through the layout; heads and norms stay dense.
    layout = nets.layout(GATED, config.HEAD)
    torso_kernels = masks.select(params, prune_selection(compress, layout))
    for path, chosen in zip(masks.param_paths(params), jax.tree.leaves(torso_kernels)):
        zeros = float(np.mean(np.asarray(jax.tree.leaves(params)[masks.param_paths(params).index(path)]) == 0))
        if chosen:
            assert path.split("/")[0] in layout.groups("torso") and path.endswith("kernel")
            assert abs(zeros - 0.5) < 0.02, path
        else:
            assert zeros < 0.5, path

    # Post-training masks over the same role; export without shrinking; the artifact reloads exactly.
    include = layout.patterns(["torso"], [r".*kernel"])
    m = masks.magnitude_masks(params, 0.8, include=include)
    pruned = masks.apply_masks(params, m)
    obs_shape = trainer.agent.obs_shape
    path = tmp_path / "policy.rlcx"
    export.export(pruned, path, masks=m, net_config=GATED, obs_shape=obs_shape, action_spec=trainer.agent.spec,
                  head=config.HEAD)
    obs = jax.random.normal(jax.random.PRNGKey(2), (32, *obs_shape))
    loaded = export.load(path)
    greedy = np.asarray(trainer.act(pruned, out.state.obs_stats, obs, jax.random.PRNGKey(0), True))
    np.testing.assert_array_equal(np.asarray(loaded.policy(obs)), greedy)

    # Size accounting of the policy's own parameters, found through the layout.
    policy = layout.prefixes("policy")
    report = size.count(pruned, paths=policy)
    flat = {p: np.asarray(x) for p, x in zip(masks.param_paths(pruned), jax.tree.leaves(pruned))}
    in_policy = [v for p, v in flat.items() if p.split("/")[0] in policy]
    assert report.params == sum(v.size for v in in_policy)
    assert report.nonzeros == sum(int(np.count_nonzero(v)) for v in in_policy)
    assert size.flops_per_forward(pruned, obs_shape, policy) == 2 * sum(
        int(np.count_nonzero(v)) for p, v in flat.items() if p.split("/")[0] in policy and p.endswith("kernel"))


def test_unknown_torso_and_head_fail_with_a_hint() -> None:
    with pytest.raises(ValueError, match="Did you mean 'test-gated'"):
        nets.NetConfig(torso="test-gatd").validate()
    with pytest.raises(ValueError, match="Unknown head"):
        nets.make(nets.NetConfig(), (4,), nets.ActionSpec(True, 2), head="dueling")


def test_task_input_threads_through_apply() -> None:
    spec = nets.ActionSpec(True, 3)
    for head in ("actor_critic", "q"):
        net = nets.make(TINY_NET, (4,), spec, head=head)
        params = nets.init_params(net, jax.random.PRNGKey(0), (4,), task_dim=2)
        obs = jnp.ones((5, 4))
        a = net.apply({"params": params}, obs, task=jnp.array([1.0, 0.0]), method="policy")
        b = net.apply({"params": params}, obs, task=jnp.array([0.0, 1.0]), method="policy")
        assert a.shape == b.shape == (5, 3)
        assert not np.allclose(np.asarray(a), np.asarray(b))  # the task changes the output


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------
def _imports(path: pathlib.Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_compress_imports_nothing_from_rl() -> None:
    for path in sorted((PACKAGE / "compress").glob("*.py")):
        bad = [n for n in _imports(path) if n == "rlcx_jax.rl" or n.startswith("rlcx_jax.rl.")]
        assert not bad, f"{path.name} imports {bad}"


def test_rl_names_no_compression_type() -> None:
    for path in sorted((PACKAGE / "rl").glob("*.py")):
        text = path.read_text()
        assert "compress" not in text.lower(), f"{path.name} names compression"
