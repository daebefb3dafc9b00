"""The shipped artifact (rlcx_jax.compress.export): bit packing, sparse index encodings, exact
export/load round trips, the loaded policy's actions and the measured compression ratio."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlcx_jax import nets
from rlcx_jax.compress import export as ex
from rlcx_jax.compress import structured
from rlcx_jax.compress.export import dense_float32_bytes, export, load, pack_bits, unpack_bits
from rlcx_jax.compress.quant import QuantSpec, quantize_tree
from rlcx_jax.nets.policy import greedy_action

F32 = np.float32


def assert_trees_bitwise_equal(a, b) -> None:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype == np.float32
        assert np.array_equal(x.view(np.uint32), y.view(np.uint32)), f"max abs diff {np.max(np.abs(x - y))}"


def random_masks(params, density: float, seed: int = 0, pattern: str = "kernel"):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: rng.random(x.shape) < density if pattern in jax.tree_util.keystr(p) else None, params)


@pytest.fixture(scope="module")
def agent():
    """A small CartPole-shaped actor-critic with non-trivial biases."""
    spec = nets.ActionSpec(discrete=True, num_actions=2)
    config = nets.NetConfig(hidden=(32, 32))
    net = nets.make(config, (4,), spec)
    params = jax.jit(net.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4)))["params"]
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda p: np.asarray(p + 0.05 * rng.normal(size=p.shape), F32), params)
    obs = rng.normal(size=(256, 4)).astype(F32) * 2.0
    return config, spec, net, params, obs


# ----------------------------------------------------------------------------------------------
# Bit packing and index encodings
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", list(range(1, 17)) + [32])
def test_pack_bits_round_trip(bits: int) -> None:
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 2**bits, size=1001, dtype=np.uint64)
    values[:2] = [0, 2**bits - 1]
    data = pack_bits(values, bits)
    assert len(data) == -(-1001 * bits // 8)
    np.testing.assert_array_equal(unpack_bits(data, bits, 1001), values)


def test_pack_bits_layout_and_errors() -> None:
    assert pack_bits(np.array([1, 2]), 4) == bytes([0x21])  # two 4-bit codes per byte, LSB first
    assert pack_bits(np.array([3, 0, 1, 2]), 2) == bytes([0b10010011])  # four 2-bit codes per byte
    assert pack_bits(np.array([], np.uint32), 3) == b""
    with pytest.raises(ValueError, match="values must lie"):
        pack_bits(np.array([8]), 3)
    with pytest.raises(ValueError, match="bits must be"):
        pack_bits(np.array([0]), 0)


@pytest.mark.parametrize("r", [1, 2, 4, 8])
def test_gap_stream_round_trip(r: int) -> None:
    rng = np.random.default_rng(r)
    positions = np.flatnonzero(rng.random(5000) < 0.07)
    positions = np.concatenate([[0, 1], positions[positions > 1], [9000]])
    stream = ex._gap_stream(positions, r)
    assert stream.max() <= 2**r - 1
    np.testing.assert_array_equal(ex._gap_positions(stream, r), positions)


# ----------------------------------------------------------------------------------------------
# Exact round trips
# ----------------------------------------------------------------------------------------------
ROUND_TRIPS = [  # (spec, with masks too): every scheme, signed and unsigned codes, 3 to 16 bits
    (QuantSpec("uniform", 8), True),
    (QuantSpec("uniform", 3, symmetric=False, per_channel=True), False),
    (QuantSpec("uniform", 16, symmetric=False), False),
    (QuantSpec("log", 4, per_channel=True), False),
    (QuantSpec("kmeans", 3), True),
]
INCLUDE = (r".*kernel", r"critic_torso/.*bias")


def _round_trip_id(value) -> str:
    if isinstance(value, QuantSpec):
        return f"{value.scheme}{value.bits}"
    return "masked+unmasked" if value else "masked"


@pytest.mark.parametrize("spec, unmasked_too", ROUND_TRIPS, ids=_round_trip_id)
def test_export_load_reproduces_fake_quant_bitwise(agent, spec: QuantSpec, unmasked_too: bool, tmp_path) -> None:
    _, _, _, params, _ = agent
    masks = random_masks(params, 0.2, seed=spec.bits)
    for m in (masks, None) if unmasked_too else (masks,):
        path = tmp_path / "policy.rlcx"
        size = export(params, path, masks=m, qspec=spec, include=INCLUDE)
        assert size == os.path.getsize(path)
        art = load(path)
        # The reference: the parameter transform as training uses it, under jit.
        expected = jax.jit(lambda p, mm: quantize_tree(p, spec, INCLUDE, (), mm))(params, m)
        assert_trees_bitwise_equal(art.params, expected)
        assert art.qspec == spec and art.include == INCLUDE


def test_masks_without_quantization_and_float16(agent, tmp_path) -> None:
    _, _, _, params, _ = agent
    masks = random_masks(params, 0.3)
    export(params, tmp_path / "a.rlcx", masks=masks)
    pruned = jax.tree.map(lambda x, m: x if m is None else np.where(m, x, F32(0)), params, masks,
                          is_leaf=lambda v: v is None)
    assert_trees_bitwise_equal(load(tmp_path / "a.rlcx").params, pruned)

    n16 = export(params, tmp_path / "b.rlcx", float_dtype="float16")
    loaded = load(tmp_path / "b.rlcx").params
    assert_trees_bitwise_equal(loaded, jax.tree.map(lambda x: x.astype(np.float16).astype(F32), params))
    assert n16 < dense_float32_bytes(params) * 0.55
    with pytest.raises(ValueError, match="float_dtype"):
        export(params, tmp_path / "c.rlcx", float_dtype="bfloat16")


def test_loaded_policy_acts_like_the_fake_quantized_policy(agent, tmp_path) -> None:
    config, spec, net, params, obs = agent
    qspec = QuantSpec("uniform", 4, per_channel=True)
    masks = random_masks(params, 0.5, seed=3)
    export(params, tmp_path / "p.rlcx", masks=masks, qspec=qspec, net_config=config, obs_shape=(4,),
           action_spec=spec, meta={"env": "CartPole-v1", "return": 500.0})
    art = load(tmp_path / "p.rlcx")
    assert art.net_config == config and art.action_spec == spec and art.obs_shape == (4,)
    assert art.meta == {"env": "CartPole-v1", "return": 500.0}
    fq = quantize_tree(params, qspec, masks=masks)
    expected = greedy_action(net.apply({"params": fq}, obs, method=net.policy), spec)
    np.testing.assert_array_equal(art.policy(obs), expected)
    assert 0 < np.mean(np.asarray(expected)) < 1  # both actions occur: the comparison means something


def test_q_network_artifact(tmp_path) -> None:
    spec = nets.ActionSpec(discrete=True, num_actions=3)
    config = nets.NetConfig(hidden=(16,))
    net = nets.make(config, (5,), spec, head="q")
    params = jax.jit(net.init)(jax.random.PRNGKey(0), jnp.zeros((1, 5)))["params"]
    qspec = QuantSpec("log", 5)
    export(params, tmp_path / "q.rlcx", qspec=qspec, net_config=config, obs_shape=(5,), action_spec=spec, head="q")
    obs = np.random.default_rng(0).normal(size=(64, 5)).astype(F32)
    expected = jnp.argmax(net.apply({"params": quantize_tree(params, qspec)}, obs), axis=-1)
    np.testing.assert_array_equal(load(tmp_path / "q.rlcx").policy(obs), expected)


# ----------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------
def test_sparse_int8_mlp_is_much_smaller_than_dense_float32(tmp_path) -> None:
    """A 4-256-256-2 MLP, every kernel 90% pruned, int8 everywhere: measured file-to-file ratio.

    Dense float32 stores 4 bytes per weight; here a kept weight costs 8 bits of code plus ~5 bits
    of run-length index (the "gaps" encoding), i.e. 32 / (0.1 * 13) ~ 25x on the big kernel.
    """
    rng = np.random.default_rng(0)
    shapes = {"Dense_0": (4, 256), "Dense_1": (256, 256), "Dense_2": (256, 2)}
    params = {name: {"kernel": rng.normal(size=s).astype(F32) / np.sqrt(s[0]),
                     "bias": 0.1 * rng.normal(size=s[1:]).astype(F32)} for name, s in shapes.items()}
    masks = random_masks(params, 0.1)
    qspec = QuantSpec("uniform", 8)
    size = export(params, tmp_path / "s.rlcx", masks=masks, qspec=qspec, include=(r".*",))
    dense = dense_float32_bytes(params)
    assert dense >= 4 * sum(x.size for x in jax.tree.leaves(params))
    ratio = dense / size
    print(f"\n90%-sparse int8 MLP: {size} B vs dense float32 {dense} B: {ratio:.1f}x")
    assert ratio >= 20.0
    # The index of the big kernel is run-length coded, not a bitmap or dense.
    header, _, _ = ex._read(str(tmp_path / "s.rlcx"))
    big = next(r for r in header["leaves"] if r["path"] == "Dense_1/kernel")
    # (kept weights that round to code 0 need no entry either).
    kept = int(masks["Dense_1"]["kernel"].sum())
    assert big["index"] == "gaps" and 0.95 * kept <= big["nnz"] <= kept
    # Sub-byte codes pack several per byte: 4-bit dense is about half of 8-bit dense.
    n8 = export(params, tmp_path / "d8.rlcx", qspec=qspec, include=(r".*",))
    n4 = export(params, tmp_path / "d4.rlcx", qspec=QuantSpec("uniform", 4), include=(r".*",))
    assert n4 < 0.55 * n8 and n8 < 0.3 * dense


def test_small_actor_90pct_int8_is_20x_smaller_with_folded_dead_units(tmp_path) -> None:
    """The 64x64 CartPole actor, 90% of its torso kernels pruned: the fixed costs are a few dozen bytes,
    and with its dead units folded (`structured.fold_dead_units`) and every leaf int8 the file is
    >= 20x smaller than the same actor as a dense float32 file; it loads as the evaluated policy."""
    spec, config = nets.ActionSpec(discrete=True, num_actions=2), nets.NetConfig(hidden=(64, 64))
    net = nets.make(config, (4,), spec)
    params = jax.jit(net.init)(jax.random.PRNGKey(3), jnp.zeros((1, 4)))["params"]
    rng = np.random.default_rng(5)
    params = jax.tree.map(lambda x: np.asarray(x + 0.05 * rng.normal(size=x.shape), F32), params)
    masks = jax.tree_util.tree_map_with_path(
        lambda p, x: rng.random(x.shape) < 0.1 if "torso" in jax.tree_util.keystr(p) and x.ndim == 2 else np.ones(x.shape, bool),
        params)
    pruned = jax.tree.map(lambda x, m: np.where(m, x, F32(0)), params, masks)
    folded = jax.tree.map(np.asarray, structured.fold_dead_units(pruned, config))
    actor = {k: folded[k] for k in ("actor_torso", "policy_head")}
    meta = dict(net_config=config, obs_shape=(4,), action_spec=spec)
    dense = dense_float32_bytes({k: params[k] for k in actor}, **meta)
    n_floats = sum(x.size for x in jax.tree.leaves(actor))
    assert 4 * n_floats < dense <= 4 * n_floats + 80  # magic, version, lengths, metadata, records
    qspec = QuantSpec("uniform", 8)
    size = export(actor, tmp_path / "a.rlcx", qspec=qspec, include=(r".*",), **meta)
    unfolded = export({k: pruned[k] for k in actor}, tmp_path / "u.rlcx", qspec=qspec, include=(r".*",), **meta)
    print(f"\n64x64 actor, 90% + int8: {size} B folded, {unfolded} B not, dense float32 {dense} B: x{dense / size:.1f}")
    assert dense / size >= 20.0 and size < 0.85 * unfolded
    assert_trees_bitwise_equal(load(tmp_path / "a.rlcx").params, quantize_tree(actor, qspec, include=(r".*",)))
    parts = ex.breakdown(tmp_path / "a.rlcx")
    assert parts["fixed"] + parts["metadata"] + parts["leaf_records"] + parts["payload"] == parts["total"] == size
    assert sum(v["bytes"] for v in parts["leaves"].values()) == parts["payload"]
    assert parts["metadata"] + parts["leaf_records"] + parts["fixed"] < 80


def _v2_file(params: dict, path) -> None:
    """A format-2 artifact written by hand (8-byte magic, uint32 length, zlib JSON header with
    per-leaf blob offsets, dense float32 payload), as files exported before format 3 look."""
    import json
    import struct
    import zlib

    leaves, payload = [], b""
    for name in ("Dense_0/bias", "Dense_0/kernel"):
        value = np.asarray(params[name.split("/")[0]][name.split("/")[1]], F32)
        leaves.append({"path": name, "shape": list(value.shape), "storage": "float32", "index": "dense",
                       "nnz": value.size, "blobs": {"index": [len(payload), 0], "values": [len(payload), value.nbytes]}})
        payload += value.tobytes()
    header = {"format": 2, "net_config": None, "obs_shape": None, "action_spec": None, "head": "actor_critic",
              "qspec": None, "include": [], "exclude": [], "meta": {"old": True}, "leaves": leaves}
    blob = zlib.compress(json.dumps(header).encode())
    path.write_bytes(b"RLCXQNT1" + struct.pack("<I", len(blob)) + blob + payload)


def test_format_2_files_still_load_and_unknown_versions_fail_clearly(tmp_path) -> None:
    rng = np.random.default_rng(0)
    params = {"Dense_0": {"kernel": rng.normal(size=(3, 5)).astype(F32), "bias": rng.normal(size=5).astype(F32)}}
    _v2_file(params, tmp_path / "old.rlcx")
    art = load(tmp_path / "old.rlcx")
    assert art.meta == {"old": True}
    assert_trees_bitwise_equal(art.params, params)
    export(params, tmp_path / "new.rlcx")
    data = bytearray((tmp_path / "new.rlcx").read_bytes())
    assert data[:5] == b"RLCX\x03"
    data[4] = 9
    (tmp_path / "future.rlcx").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="artifact format 9"):
        load(tmp_path / "future.rlcx")
    (tmp_path / "long.rlcx").write_bytes((tmp_path / "new.rlcx").read_bytes() + b"\0")
    with pytest.raises(ValueError, match="trailing bytes"):
        load(tmp_path / "long.rlcx")


def test_lzma_payload_is_lossless_and_smaller(tmp_path) -> None:
    """The entropy-coding stage: same parameters bit for bit, fewer bytes on a pruned int8 policy."""
    rng = np.random.default_rng(4)
    params = {name: {"kernel": rng.normal(size=s).astype(F32) / np.sqrt(s[0]), "bias": 0.1 * rng.normal(size=s[1:]).astype(F32)}
              for name, s in {"Dense_0": (4, 256), "Dense_1": (256, 256)}.items()}
    masks = random_masks(params, 0.1, seed=3)
    qspec = QuantSpec("uniform", 8)
    plain = export(params, tmp_path / "plain.rlcx", masks=masks, qspec=qspec)
    packed = export(params, tmp_path / "lzma.rlcx", masks=masks, qspec=qspec, payload_codec="lzma")
    assert packed < plain
    assert packed == os.path.getsize(tmp_path / "lzma.rlcx") == load(tmp_path / "lzma.rlcx").nbytes
    assert_trees_bitwise_equal(load(tmp_path / "lzma.rlcx").params, load(tmp_path / "plain.rlcx").params)
    assert_trees_bitwise_equal(load(tmp_path / "lzma.rlcx").params, quantize_tree(params, qspec, masks=masks))
    with pytest.raises(ValueError, match="payload_codec must be one of"):
        export(params, tmp_path / "x.rlcx", payload_codec="zip")
    data = (tmp_path / "lzma.rlcx").read_bytes()
    (tmp_path / "bad.rlcx").write_bytes(data[:-40] + bytes(40))
    with pytest.raises(ValueError, match="corrupt artifact payload|Truncated"):
        load(tmp_path / "bad.rlcx")


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def test_write_is_atomic_and_bad_files_fail_clearly(agent, tmp_path) -> None:
    _, _, _, params, _ = agent
    path = tmp_path / "sub" / "policy.rlcx"
    first = export(params, path)
    second = export(params, path, qspec=QuantSpec("uniform", 4))  # overwrite in place
    assert second == os.path.getsize(path) < first
    assert sorted(os.listdir(tmp_path / "sub")) == ["policy.rlcx"]  # no temporary files left

    (tmp_path / "bad.rlcx").write_bytes(b"not an artifact")
    with pytest.raises(ValueError, match="not an rlcx artifact"):
        load(tmp_path / "bad.rlcx")
    data = path.read_bytes()
    (tmp_path / "trunc.rlcx").write_bytes(data[: len(data) - 10])
    with pytest.raises(ValueError, match="Truncated"):
        load(tmp_path / "trunc.rlcx")
    with pytest.raises(ValueError, match="matches no parameter"):
        export(params, tmp_path / "x.rlcx", qspec=QuantSpec(), include=(r".*kernal",))
    with pytest.raises(ValueError, match="bits must be"):
        export(params, tmp_path / "x.rlcx", qspec=QuantSpec(bits=17))
    with pytest.raises(ValueError, match="exported without net_config"):
        load(path).policy(np.zeros((1, 4), F32))


def test_later_net_config_fields_are_written_only_when_set(tmp_path) -> None:
    """Fields added to NetConfig after format 3 leave a plain network's header as it was, and round-trip
    when set (a missing field loads as its default)."""
    from rlcx_jax.compress.export import _read

    spec = nets.ActionSpec(discrete=True, num_actions=2)
    params = {"w": np.ones((2, 2), F32)}
    for config in (nets.NetConfig(), nets.NetConfig(num_tasks=3, task_mode="embedding", dueling=True)):
        export(params, tmp_path / "a.rlcx", net_config=config, obs_shape=(4,), action_spec=spec)
        assert load(tmp_path / "a.rlcx").net_config == config
    export(params, tmp_path / "b.rlcx", net_config=nets.NetConfig(), obs_shape=(4,), action_spec=spec)
    header = _read(str(tmp_path / "b.rlcx"))[0]["net_config"]
    assert sorted(header) == sorted(("torso", "hidden", "activation", "separate_critic", "conv_features", "conv_kernel"))
