"""Attention torsos (nets.attention) and attention transfer (distill.attention_transfer), against
NumPy references written here."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlcx_jax import nets
from rlcx_jax.compress import masks as mask_ops
from rlcx_jax.distill import attention_transfer as at
from rlcx_jax.nets import attention

SPEC = nets.ActionSpec(discrete=True, num_actions=5)
CFG = nets.NetConfig(torso="attention", attention_width=16, attention_heads=4, attention_depth=1, hidden=(16,))
ENTITY_SHAPE = (6, 4)


def entity_obs(key: jax.Array, batch: int, present: int, slots: int = ENTITY_SHAPE[0]) -> jax.Array:
    """Random entity observations with `present` present slots (feature 0 = 1) and zeroed padding."""
    x = jax.random.normal(key, (batch, slots, ENTITY_SHAPE[1]))
    flag = (jnp.arange(slots) < present).astype(jnp.float32)
    return x.at[..., 0].set(flag) * jnp.where(flag[:, None] > 0, 1.0, 0.0)


@functools.cache
def build(cfg: nets.NetConfig, shape: tuple[int, ...] = ENTITY_SHAPE, seed: int = 0):
    """The network and its parameters, initialised under jit (eager initialisation of the orthogonal
    kernels costs seconds per network) and built once per test module."""
    net = nets.make(cfg, shape, SPEC)
    return net, jax.jit(lambda key: nets.init_params(net, key, shape))(jax.random.PRNGKey(seed))


_JITTED: dict[int, Any] = {}


def fwd(net: Any) -> Any:
    """`net.apply` under jit, `(params, obs, method=...)` (eager flax applies cost seconds per shape)."""
    if id(net) not in _JITTED:
        _JITTED[id(net)] = jax.jit(
            lambda p, o, method="__call__": net.apply({"params": p}, o, method=method), static_argnames="method"
        )
    return _JITTED[id(net)]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def numpy_mha(p: dict, queries: np.ndarray, inputs: np.ndarray, mask: np.ndarray, heads: int) -> np.ndarray:
    """Multi-head attention of one sample, written out head by head in float64."""
    lin = lambda layer, x: x @ np.asarray(p[layer]["kernel"], np.float64) + np.asarray(p[layer]["bias"])  # noqa: E731
    q, k, v = lin("query", queries), lin("key", inputs), lin("value", inputs)
    d = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        logits = q[:, cols] @ k[:, cols].T / np.sqrt(d)
        logits = np.where(mask[None, :], logits, -np.inf)
        outs.append(softmax(logits) @ v[:, cols])
    return lin("out", np.concatenate(outs, axis=-1))


def test_multi_head_attention_matches_numpy_with_a_mask():
    mha = attention.MultiHeadAttention(width=8, heads=2)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (5, 8)))
    mask = np.array([True, False, True, True, False])
    p = mha.init(jax.random.PRNGKey(0), x, x, mask)["params"]
    got = mha.apply({"params": p}, x, x, mask)
    np.testing.assert_allclose(got, numpy_mha(p, x, x, mask, heads=2), rtol=1e-5, atol=1e-5)


def test_memory_slots_join_the_keys_and_values():
    mha = attention.MultiHeadAttention(width=8, heads=2, memory_slots=3)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (4, 8)))
    mask = np.array([True, True, False, True])
    p = mha.init(jax.random.PRNGKey(0), x, x, mask)["params"]
    got = mha.apply({"params": p}, x, x, mask)
    # reference: keys and values of the slots are the learned vectors themselves (no projection)
    lin = lambda layer, z: z @ np.asarray(p[layer]["kernel"], np.float64) + np.asarray(p[layer]["bias"])  # noqa: E731
    q = lin("query", x)
    k = np.concatenate([lin("key", x), np.asarray(p["memory_key"])])
    v = np.concatenate([lin("value", x), np.asarray(p["memory_value"])])
    m = np.concatenate([mask, np.ones(3, bool)])
    heads = []
    for h in range(2):
        c = slice(4 * h, 4 * h + 4)
        w = softmax(np.where(m[None], q[:, c] @ k[:, c].T / 2.0, -np.inf))
        heads.append(w @ v[:, c])
    want = lin("out", np.concatenate(heads, axis=-1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("torso", ["attention", "memory"])
def test_blocks_are_permutation_equivariant_and_the_torso_invariant(torso):
    cfg = dataclasses.replace(CFG, torso=torso)
    block = attention.AttentionBlock(cfg, memory_slots=cfg.memory_slots if torso == "memory" else 0)
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 6, 16))
    mask = jnp.array([True, True, True, True, False, True])
    p = block.init(jax.random.PRNGKey(0), x, mask)["params"]
    perm = np.array([4, 2, 0, 5, 1, 3])
    out = block.apply({"params": p}, x, mask)
    out_perm = block.apply({"params": p}, x[:, perm], mask[perm])
    np.testing.assert_allclose(out_perm, out[:, perm], rtol=1e-5, atol=1e-5)

    net, params = build(cfg)
    obs = entity_obs(jax.random.PRNGKey(3), 4, present=5)
    logits, value = fwd(net)(params, obs)
    logits_p, value_p = fwd(net)(params, obs[:, perm])
    np.testing.assert_allclose(logits_p, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value_p, value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("torso,pool", [("attention", "attention"), ("memory", "mean"), ("deepsets", "attention")])
def test_masked_entities_are_ignored(torso, pool):
    net, params = build(dataclasses.replace(CFG, torso=torso, attention_pool=pool))
    obs = entity_obs(jax.random.PRNGKey(4), 4, present=3)
    noise = jax.random.normal(jax.random.PRNGKey(5), obs.shape) * 10.0
    changed = obs.at[:, 3:, 1:].set(noise[:, 3:, 1:])  # padding slots get features, flag stays 0
    a = fwd(net)(params, obs)
    b = fwd(net)(params, changed)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # ...and a change to a present entity does change the output (the check above can fail)
    moved = obs.at[:, 0, 2].add(1.0)
    assert not np.allclose(fwd(net)(params, moved)[0], a[0])


def test_without_entity_mask_padding_counts():
    net, params = build(dataclasses.replace(CFG, entity_mask=False))
    obs = entity_obs(jax.random.PRNGKey(4), 2, present=3)
    changed = obs.at[:, 4, 2].set(5.0)
    assert not np.allclose(fwd(net)(params, changed)[0], fwd(net)(params, obs)[0])


def test_attention_maps_are_aux_outputs_with_zero_weight_on_padding():
    net, params = build(CFG)
    obs = entity_obs(jax.random.PRNGKey(6), 3, present=4)
    maps = jax.jit(lambda p, o: attention.attention_maps(net, p, o))(params, obs)
    assert sorted(maps) == [
        "actor_torso/block_0/attention",
        "actor_torso/pool",
    ]
    pool = np.asarray(maps["actor_torso/pool"])
    assert pool.shape == (3, 4, 1, 6)
    np.testing.assert_allclose(pool.sum(-1), 1.0, rtol=1e-6)
    assert np.all(pool[..., 4:] == 0.0) and np.all(pool[..., :4] > 0.0)
    # the maps come from the same forward pass as the policy output
    out, _ = jax.jit(lambda p, o: net.apply({"params": p}, o, method="policy", mutable=["intermediates"]))(params, obs)
    np.testing.assert_allclose(out, fwd(net)(params, obs, method="policy"), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape,torso,tokens", [((4,), "deepsets", 4), ((5, 5, 2), "attention", 25)])
def test_feature_and_cell_tokens(shape, torso, tokens):
    net, params = build(dataclasses.replace(CFG, torso=torso), shape)
    obs = jax.random.normal(jax.random.PRNGKey(7), (3, *shape))
    maps = jax.jit(lambda p, o: attention.attention_maps(net, p, o, method="__call__"))
    logits, value = jax.jit(net.apply)({"params": params}, obs)
    assert logits.shape == (3, 5) and value.shape == (3,)
    assert np.all(np.isfinite(logits))
    assert maps(params, obs)["actor_torso/pool"].shape == (3, CFG.attention_heads, 1, tokens)


def test_jit_and_vmap_agree_with_single_calls():
    net, params = build(CFG)
    obs = entity_obs(jax.random.PRNGKey(8), 4, present=4)
    batched = jax.jit(jax.vmap(lambda o: fwd(net)(params, o[None], method="policy")[0]))(obs)
    singles = np.stack([np.asarray(fwd(net)(params, obs[i : i + 1], method="policy")[0]) for i in range(4)])
    np.testing.assert_allclose(batched, singles, rtol=1e-5, atol=1e-6)


def test_a_policy_trained_on_few_slots_runs_on_more():
    net, params = build(CFG)
    more = entity_obs(jax.random.PRNGKey(9), 2, present=9, slots=12)
    logits = fwd(net)(params, more, method="policy")
    assert logits.shape == (2, 5) and np.all(np.isfinite(logits))


def test_head_masks_remove_the_weakest_heads_exactly():
    mha = attention.MultiHeadAttention(width=8, heads=4)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (5, 8)))
    mask = np.ones(5, bool)
    p = mha.init(jax.random.PRNGKey(0), x, x, mask)["params"]
    p = jax.tree.map(np.array, p)  # writable copies
    p["query"]["kernel"][:, 2:4] *= 0.01  # head 1 is the weakest
    p["key"]["kernel"][:, 2:4] *= 0.01
    p["value"]["kernel"][:, 2:4] *= 0.01
    p["out"]["kernel"][2:4] *= 0.01
    scores = attention.head_scores({"layer": p}, heads=4)["layer"]
    assert int(np.argmin(scores)) == 1
    m = attention.head_masks({"layer": p}, heads=4, prune=1)["layer"]
    pruned = mask_ops.apply_masks({"layer": p}, {"layer": m})["layer"]
    got = mha.apply({"params": pruned}, x, x, mask)
    # reference: heads 0, 2, 3 only (head 1's value columns and output rows removed)
    keep = np.r_[0:2, 4:8]
    ref = {
        name: {"kernel": p[name]["kernel"][:, keep], "bias": p[name]["bias"][keep]}
        for name in ("query", "key", "value")
    }
    ref["out"] = {"kernel": p["out"]["kernel"][keep], "bias": p["out"]["bias"]}
    np.testing.assert_allclose(got, numpy_mha(ref, x, x, mask, heads=3), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prune 0 to 3"):
        attention.head_masks({"layer": p}, heads=4, prune=4)


@pytest.mark.parametrize(
    "torso,pool,head",
    [("memory", "attention", "actor_critic"), ("attention", "mean", "q"), ("deepsets", "attention", "q")],
)
def test_the_layout_declares_every_attention_layer(torso, pool, head):
    cfg = dataclasses.replace(CFG, torso=torso, attention_pool=pool, attention_depth=2)
    net = nets.make(cfg, ENTITY_SHAPE, SPEC, head=head)
    shapes = jax.eval_shape(lambda k: nets.init_params(net, k, ENTITY_SHAPE), jax.random.PRNGKey(0))
    declared = nets.layout(cfg, head).attention
    assert sorted(declared) == sorted("/".join(p) for p in attention.attention_layers(shapes))
    assert declared  # every case has at least one attention layer


def test_head_masks_find_every_attention_layer_of_a_network():
    net, params = build(dataclasses.replace(CFG, torso="memory"))
    layers = attention.attention_layers(params)
    assert len(layers) == 2 * (CFG.attention_depth + 1)  # actor and critic: blocks + pooling
    declared = nets.layout(dataclasses.replace(CFG, torso="memory")).attention
    m = attention.head_masks(params, heads=4, prune=2, layers=declared)
    assert jax.tree.structure(m) == jax.tree.structure(attention.head_masks(params, heads=4, prune=2))
    with pytest.raises(ValueError, match="is not an attention layer"):
        attention.head_masks(params, heads=4, prune=2, layers=("actor_torso/tokens",))
    zeros = sum(int(np.sum(~np.asarray(x))) for x in jax.tree.leaves(m))
    d = CFG.attention_width // 4
    per_layer = 2 * d * (3 * CFG.attention_width + 3) + 2 * d * CFG.attention_width
    assert zeros == len(layers) * per_layer


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"attention_heads": 3}, "must divide"),
        ({"torso": "atention"}, "Did you mean 'attention'"),
        ({"attention_pool": "max"}, "Unknown attention pooling"),
        ({"attention_depth": 0}, "attention_depth must be >= 1"),
    ],
)
def test_bad_configs_fail_in_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        dataclasses.replace(CFG, **kwargs).validate()
    assert "\n" not in str(err.value)


def test_zero_entity_slots_fail_in_one_line():
    net = nets.make(CFG, (0, 4), SPEC)
    with pytest.raises(ValueError, match="at least one entity slot"):
        nets.init_params(net, jax.random.PRNGKey(0), (0, 4))


# ----------------------------------------------------------------------------------------------
# Attention transfer
# ----------------------------------------------------------------------------------------------
def test_attention_transfer_is_zero_for_identical_and_rescaled_maps():
    m = jax.random.uniform(jax.random.PRNGKey(0), (5, 7))
    np.testing.assert_array_equal(at.attention_transfer_loss(m, m), np.zeros(5, np.float32))
    np.testing.assert_allclose(at.attention_transfer_loss(3.0 * m, m), np.zeros(5), atol=1e-6)


def test_attention_transfer_matches_numpy():
    s = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (4, 6)), np.float64)
    t = np.asarray(jax.random.uniform(jax.random.PRNGKey(2), (4, 6)), np.float64)
    want = np.linalg.norm(
        s / np.linalg.norm(s, axis=1, keepdims=True) - t / np.linalg.norm(t, axis=1, keepdims=True), axis=1
    )
    got = at.attention_transfer_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # finite gradient at identical maps (no 0/0 from the norm)
    g = jax.grad(lambda x: jnp.sum(at.attention_transfer_loss(x, jnp.asarray(t, jnp.float32))))(
        jnp.asarray(t, jnp.float32)
    )
    assert np.all(np.isfinite(g))


def test_saliency_of_a_linear_policy_is_its_greedy_row():
    cfg = nets.NetConfig(hidden=())  # policy = flatten(obs) @ W + b
    net, params = build(cfg)
    obs = entity_obs(jax.random.PRNGKey(3), 3, present=4)
    apply = lambda p, *a, **k: net.apply({"params": p}, *a, **k)  # noqa: E731
    got = at.saliency_map(apply, params, obs, obs_ndim=2)
    assert "actor_torso" not in params  # hidden=() leaves the torso empty: the head is the whole linear map
    kernel = np.asarray(params["policy_head"]["kernel"])  # [24, 5]
    logits = np.asarray(obs).reshape(3, -1) @ kernel + np.asarray(params["policy_head"]["bias"])
    want = np.abs(kernel[:, logits.argmax(1)].T).reshape(3, 6, 4).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_pooling_map_and_the_extension_term():
    teacher_cfg = CFG
    teacher, teacher_params = build(teacher_cfg, seed=1)
    student_cfg = nets.NetConfig(hidden=(16,))
    student, student_params = build(student_cfg, seed=2)
    obs = entity_obs(jax.random.PRNGKey(4), 8, present=4)
    apply_t = lambda p, *a, **k: teacher.apply({"params": p}, *a, **k)  # noqa: E731
    t_map = at.pooling_map(apply_t, teacher_params, obs, "actor_torso")
    pool = attention.attention_maps(teacher, teacher_params, obs)["actor_torso/pool"]
    np.testing.assert_allclose(t_map, np.asarray(pool)[:, :, 0].mean(1), rtol=1e-6)

    from rlcx_jax.seams import BuildContext, make_apply

    ext = at.AttentionTransfer(teacher_algorithm="ppo", teacher_net=teacher_cfg, mask_padding=False)
    ext.validate()
    ctx = BuildContext(student, ENTITY_SHAPE, SPEC, optimizer_steps=1, apply=make_apply(student))
    batch = type("Batch", (), {})()
    batch.obs = obs
    batch.extras = {ext.name: ext.extras(ctx)(teacher_params, ext.default_hparams(), batch)}
    np.testing.assert_allclose(batch.extras[ext.name], t_map, rtol=1e-6)
    term = ext.loss_term(ctx)
    hp = at.AttentionTransferHParams(coef=2.0)
    value, aux = jax.jit(lambda p: term(p, batch, {}, hp))(student_params)
    want = at.attention_transfer_loss(at.saliency_map(make_apply(student), student_params, obs, 2), t_map).mean()
    np.testing.assert_allclose(aux["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(value, 2.0 * want, rtol=1e-5)
    # gradient descent on the term brings the student's map towards the teacher's
    loss = lambda p: term(p, batch, {}, hp)[0]  # noqa: E731

    def descend(p, _):
        return jax.tree.map(lambda w, g: w - 0.05 * g, p, jax.grad(loss)(p)), None

    p, _ = jax.jit(lambda p: jax.lax.scan(descend, p, None, length=20))(student_params)
    assert float(jax.jit(loss)(p)) < 0.8 * float(value)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"teacher_map": "gradcam"}, "Unknown teacher map"),
        ({"teacher_net": nets.NetConfig()}, "needs a teacher torso"),
        ({"teacher_net": dataclasses.replace(CFG, attention_pool="mean")}, "needs a teacher torso"),
    ],
)
def test_attention_transfer_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        at.AttentionTransfer(**kwargs).validate()


def test_head_pruned_int8_attention_policy_exports_and_acts_like_the_fake_quantized_one(tmp_path):
    """Compression reaches attention parameters through the ordinary paths: head masks, int8 fake
    quantization and the bit-packed artifact, whose loaded policy equals the fake-quantized network."""
    from rlcx_jax.compress.export import dense_float32_bytes, export, load
    from rlcx_jax.compress.quant import QuantSpec, quantize_tree
    from rlcx_jax.nets.policy import greedy_action

    net, params = build(CFG)
    head_masks = attention.head_masks(params, heads=4, prune=2, layers=nets.layout(CFG).attention)
    qspec = QuantSpec("uniform", 8)
    export(
        params,
        tmp_path / "a.rlcx",
        masks=head_masks,
        qspec=qspec,
        net_config=CFG,
        obs_shape=ENTITY_SHAPE,
        action_spec=SPEC,
    )
    art = load(tmp_path / "a.rlcx")
    assert art.net_config == CFG
    obs = entity_obs(jax.random.PRNGKey(11), 64, present=4)
    fq = quantize_tree(params, qspec, masks=head_masks)
    expected = greedy_action(fwd(net)(fq, obs, method="policy"), SPEC)
    np.testing.assert_array_equal(art.policy(obs), expected)
    assert len(np.unique(np.asarray(expected))) > 1  # several actions occur: the comparison means something
    pruned = np.asarray(art.params["actor_torso"]["block_0"]["attention"]["value"]["kernel"])
    assert np.sum(np.all(pruned == 0.0, axis=0)) == 2 * CFG.attention_width // 4  # two heads' columns are gone
    assert art.nbytes < dense_float32_bytes(params) / 3


def test_attention_transfer_inside_the_distillation_trainers_train():
    """`policy_distillation.make(config).train(key, hparams, teacher)` installs the teacher in the
    extension's state itself, and the term's metric is reported."""
    from rlcx_jax.distill import policy_distillation as pd

    teacher_net, teacher_params = build(CFG, shape=(8, 4), seed=3)
    config = pd.DistillConfig(
        env="EntityNavigation-v0",
        teacher_algorithm="ppo",
        teacher_net=CFG,
        net=nets.NetConfig(hidden=(16,)),
        num_envs=4,
        num_steps=8,
        update_epochs=1,
        num_minibatches=2,
        total_timesteps=2 * 4 * 8,
        extensions=(at.AttentionTransfer(teacher_net=CFG),),
    )
    trainer = pd.make(config)
    from rlcx_jax.envs.normalize import init_stats

    teacher = pd.Teacher(params=teacher_params, obs_stats=init_stats((8, 4)))
    out = jax.jit(trainer.train)(jax.random.PRNGKey(0), pd.DistillHParams(), teacher)
    values = np.asarray(out.metrics.ext["attention_transfer"]["aux"]["loss"])
    assert values.shape[0] >= 1 and np.all(np.isfinite(values)) and np.all(values > 0)


def test_padding_is_left_out_of_the_maps():
    ext = at.AttentionTransfer(teacher_net=CFG)
    obs = entity_obs(jax.random.PRNGKey(12), 2, present=3)
    m = jnp.ones((2, 6))
    np.testing.assert_array_equal(ext._masked(m, obs), np.repeat([[1, 1, 1, 0, 0, 0]], 2, axis=0))
    np.testing.assert_array_equal(dataclasses.replace(ext, mask_padding=False)._masked(m, obs), m)
