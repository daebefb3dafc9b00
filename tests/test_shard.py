"""rlcx_jax.shard: the leading run axis split over devices gives the unsharded numbers, in order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from rlcx_jax import shard

# Runs in a fresh interpreter with 8 forced CPU devices (the flag must be set before jax starts).
SCRIPT = textwrap.dedent(
    """
    import json
    import jax, numpy as np
    from rlcx_jax import shard, xla
    from rlcx_jax.nets import NetConfig
    from rlcx_jax.rl import ppo

    assert jax.device_count() == 8, jax.devices()
    config = ppo.PPOConfig(num_envs=4, num_steps=16, total_timesteps=4 * 16 * 4, net=NetConfig(hidden=(8, 8)))
    train = jax.vmap(ppo.make_train(config))
    report = {}
    for n in (3, 11):  # fewer runs than devices, and an uneven count above (both padded)
        keys = jax.random.split(jax.random.key(7), n)
        hparams = jax.tree.map(lambda x: np.full((n,), x), ppo.PPOHParams())
        hparams = hparams.replace(lr=np.linspace(1e-4, 1e-3, n).astype(np.float32))
        plain = jax.device_get(xla.jit(train)(keys, hparams))
        sharded = shard.sharded(train)(keys, hparams)
        pairs = list(zip(jax.tree.leaves(plain), jax.tree.leaves(sharded)))
        report[n] = {
            "shapes_equal": all(a.shape == b.shape for a, b in pairs),
            "exact_equal_non_float": all(np.array_equal(a, b) for a, b in pairs if not np.issubdtype(a.dtype, np.floating)),
            "max_float_diff": max(
                float(np.max(np.abs(a - b) / (1.0 + np.abs(a)))) for a, b in pairs if np.issubdtype(a.dtype, np.floating)
            ),
            "devices_used": len(shard.place(shard.pad_rows(keys, shard.padded_size(n, 8)), shard.run_mesh()).sharding.device_set),
            "rows_distinct": bool(np.unique(np.asarray(plain.metrics.loss), axis=0).shape[0] == n),
        }
    print("REPORT " + json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def eight_device_report() -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT "))
    return {int(k): v for k, v in json.loads(line[len("REPORT ") :]).items()}


@pytest.mark.parametrize("n", [3, 11])
def test_sharded_ppo_sweep_matches_unsharded_in_order(eight_device_report, n):
    r = eight_device_report[n]
    assert r["devices_used"] == 8
    assert r["shapes_equal"]  # padding dropped: n rows back, not a multiple of 8
    assert r["rows_distinct"]  # each row is its own run (distinct key and learning rate)
    # Row i of the sharded result is row i of the unsharded one, up to float rounding: partitioning
    # changes how many rows a batched matrix product sees, which can change the last bit
    # (measured: at most 6e-7 relative).
    assert r["exact_equal_non_float"]  # keys, counters, episode counts
    assert r["max_float_diff"] <= 1e-4


def test_single_device_mesh_is_unsharded_jit():
    fn = jax.vmap(lambda k, x: jax.random.normal(k, (3,)) * x)
    keys, xs = jax.random.split(jax.random.key(0), 5), np.arange(5, dtype=np.float32)
    out = shard.sharded(fn, shard.run_mesh(jax.devices()[:1]))(keys, xs)
    np.testing.assert_array_equal(out, np.asarray(jax.jit(fn)(keys, xs)))


def test_pad_rows_repeats_the_last_row_and_sizes_round_up():
    tree = {"a": np.arange(6).reshape(3, 2), "b": np.array([1.0, 2.0, 3.0])}
    padded = shard.pad_rows(tree, 5)
    np.testing.assert_array_equal(padded["a"], [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]])
    np.testing.assert_array_equal(padded["b"], [1.0, 2.0, 3.0, 3.0, 3.0])
    assert shard.pad_rows(tree, 3)["b"].shape == (3,)
    assert [shard.padded_size(n, 8) for n in (1, 8, 9, 16)] == [8, 8, 16, 16]


def test_inputs_without_one_common_leading_axis_are_refused():
    with pytest.raises(ValueError, match="same leading"):
        shard.leading_size((np.zeros(3), np.zeros(4)))
    with pytest.raises(ValueError, match="same leading"):
        shard.leading_size((np.zeros(3), np.float32(1.0)))
    with pytest.raises(ValueError, match="at least one device"):
        shard.run_mesh([])
