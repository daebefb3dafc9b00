"""rlcx_jax.shard across processes: `jax.distributed.initialize` on one machine, CPU devices.

Two Python processes on 127.0.0.1, two forced CPU devices each, form one mesh of four devices (the
CPU cross-process collectives are gloo, JAX's default; nothing else is configured). Each process runs
`shard.sharded(jax.vmap(fn))` on the same uneven number of rows; every process must get back all
rows, in input order, equal to `jax.vmap(fn)` computed here in the test process on one device,
without `shard`. The workloads are a small scan (float, integer and typed-key outputs) and PPO
training itself. Padding: 11 rows become 12 and 7 PPO rows become 8; with 2 rows (fewer than
devices) the second process holds padding alone.

This file is also the worker: `python tests/test_multihost.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR`.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np
import pytest

NUM_PROCESSES = 2
LOCAL_DEVICES = 2
SCAN_ROWS = (11, 2)  # uneven above the device count, and fewer rows than devices
PPO_ROWS = 7
TIMEOUT_S = 300  # generous: a 2-core CI machine also runs the other xdist worker meanwhile


# ----------------------------------------------------------------------------------------------
# The workloads (shared by the worker processes and the in-process reference)
# ----------------------------------------------------------------------------------------------
def scan_fn(key: jax.Array, x: jax.Array) -> dict[str, jax.Array]:
    """One row: a short scan with noise, an integer and a typed PRNG key among the outputs."""
    import jax.numpy as jnp

    def step(carry: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        carry = 0.9 * carry + x * jax.random.normal(k, ())
        return carry, carry

    final, path = jax.lax.scan(step, x, jax.random.split(key, 6))
    return {
        "final": final,
        "path": path,
        "count": jnp.sum(path > 0).astype(jnp.int32),
        "key": jax.random.fold_in(key, 1),
    }


def scan_inputs(n: int) -> tuple[jax.Array, np.ndarray]:
    return jax.random.split(jax.random.key(3), n), np.linspace(0.5, 2.0, n).astype(np.float32)


def ppo_train() -> Any:
    from rlcx_jax import nets, rl
    from rlcx_jax.rl import ppo

    config = ppo.PPOConfig(num_envs=4, num_steps=32, total_timesteps=4 * 32 * 6, net=nets.NetConfig(hidden=(8, 8)))
    return jax.vmap(rl.make("ppo", config).train)


def ppo_inputs(n: int) -> tuple[jax.Array, Any]:
    from rlcx_jax.rl import ppo
    from rlcx_jax.rl.common import broadcast_tree

    hparams = broadcast_tree(ppo.PPOHParams(), n).replace(lr=np.linspace(1e-4, 1e-3, n).astype(np.float32))
    return jax.random.split(jax.random.key(7), n), jax.tree.map(np.asarray, hparams)


def host_leaves(tree: Any) -> list[np.ndarray]:
    """Every leaf as a NumPy array, typed keys as their key data (uint32)."""
    is_key = lambda x: hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    return [np.asarray(jax.random.key_data(x) if is_key(x) else x) for x in jax.tree.leaves(tree)]


# ----------------------------------------------------------------------------------------------
# Worker
# ----------------------------------------------------------------------------------------------
def worker(process_id: int, num_processes: int, port: int, out_dir: pathlib.Path) -> None:
    t = time.perf_counter()
    # Before anything that initialises a backend (importing rlcx_jax.rl imports gymnax, which does).
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=120,
    )
    from rlcx_jax import shard

    mesh = shard.run_mesh()
    print(f"initialized {time.perf_counter() - t:.1f}s", flush=True)
    keys, _ = scan_inputs(SCAN_ROWS[0])
    placed = shard.place(shard.pad_rows(keys, shard.padded_size(SCAN_ROWS[0], mesh.size)), mesh)
    info = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "mesh_size": mesh.size,
        "placed_fully_addressable": placed.is_fully_addressable,
        "placed_local_shards": len(placed.addressable_shards),
        "placed_devices": len(placed.sharding.device_set),
    }
    results: dict[str, list[np.ndarray]] = {}
    scan_many = shard.sharded(jax.vmap(scan_fn), mesh)
    for n in SCAN_ROWS:
        results[f"scan{n}"] = host_leaves(scan_many(*scan_inputs(n)))
        print(f"scan{n} {time.perf_counter() - t:.1f}s", flush=True)
    results["ppo"] = host_leaves(shard.sharded(ppo_train(), mesh)(*ppo_inputs(PPO_ROWS)))
    print(f"ppo {time.perf_counter() - t:.1f}s", flush=True)
    for name, leaves in results.items():
        np.savez(out_dir / f"{name}-{process_id}.npz", *leaves)
    (out_dir / f"info-{process_id}.json").write_text(json.dumps(info))


# ----------------------------------------------------------------------------------------------
# Launch and reference
# ----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(out_dir: pathlib.Path) -> list[subprocess.Popen]:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
    }
    port = free_port()
    procs = []
    for i in range(NUM_PROCESSES):
        with open(out_dir / f"log-{i}.txt", "w") as log:
            cmd = [sys.executable, __file__, str(i), str(NUM_PROCESSES), str(port), str(out_dir)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_all(procs: list[subprocess.Popen], out_dir: pathlib.Path, deadline: float) -> None:
    """Wait for every worker; a failure or the deadline kills the rest (a peer would otherwise wait
    for the dead one until the distributed heartbeat timeout) and fails with every worker's log."""
    failed = ""
    while any(p.poll() is None for p in procs) and not failed:
        if time.monotonic() > deadline:
            failed = f"timed out after {TIMEOUT_S} s"
        elif any(p.returncode not in (None, 0) for p in procs):
            failed = "a worker failed"
        else:
            time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    if failed or any(p.returncode != 0 for p in procs):
        logs = "\n".join(
            f"--- process {i} (exit {p.returncode}):\n{(out_dir / f'log-{i}.txt').read_text()[-3000:]}"
            for i, p in enumerate(procs)
        )
        pytest.fail(f"multi-process run failed ({failed or 'nonzero exit'}):\n{logs}", pytrace=False)


def load_leaves(path: pathlib.Path) -> list[np.ndarray]:
    with np.load(path) as saved:
        return [saved[f"arr_{k}"] for k in range(len(saved.files))]


@pytest.fixture(scope="module")
def multihost(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from rlcx_jax import xla

    out_dir = tmp_path_factory.mktemp("multihost")
    start = time.monotonic()
    procs = launch(out_dir)
    try:
        # The reference: the unsharded program on this process's default device, without `shard`,
        # computed while the workers start.
        reference = {f"scan{n}": host_leaves(jax.jit(jax.vmap(scan_fn))(*scan_inputs(n))) for n in SCAN_ROWS}
        reference["ppo"] = host_leaves(xla.jit(ppo_train())(*ppo_inputs(PPO_ROWS)))
    finally:
        wait_all(procs, out_dir, start + TIMEOUT_S)
    workers = [{name: load_leaves(out_dir / f"{name}-{i}.npz") for name in reference} for i in range(NUM_PROCESSES)]
    infos = [json.loads((out_dir / f"info-{i}.json").read_text()) for i in range(NUM_PROCESSES)]
    return {"reference": reference, "workers": workers, "infos": infos}


def test_processes_form_one_mesh_and_each_holds_only_its_shards(multihost):
    for i, info in enumerate(multihost["infos"]):
        assert info == {
            "process_index": i,
            "process_count": NUM_PROCESSES,
            "device_count": NUM_PROCESSES * LOCAL_DEVICES,
            "local_device_count": LOCAL_DEVICES,
            "mesh_size": NUM_PROCESSES * LOCAL_DEVICES,
            "placed_fully_addressable": False,
            "placed_local_shards": LOCAL_DEVICES,
            "placed_devices": NUM_PROCESSES * LOCAL_DEVICES,
        }


@pytest.mark.parametrize("name", [f"scan{n}" for n in SCAN_ROWS] + ["ppo"])
def test_every_process_gets_all_rows_in_order_equal_to_one_process(multihost, name):
    reference = multihost["reference"][name]
    rows = reference[0].shape[0]
    assert rows == (PPO_ROWS if name == "ppo" else int(name[4:]))
    # each row is its own run (distinct keys, and for PPO distinct learning rates), so a row out of
    # order or a padding row in place of a real one cannot pass
    assert any(
        np.unique(leaf.reshape(rows, -1), axis=0).shape[0] == rows for leaf in reference if leaf.dtype.kind == "f"
    )
    assert all(
        np.unique(leaf.reshape(rows, -1), axis=0).shape[0] == rows for leaf in reference if leaf.dtype == np.uint32
    )
    for i, results in enumerate(multihost["workers"]):
        leaves = results[name]
        assert len(leaves) == len(reference)
        for j, (got, want) in enumerate(zip(leaves, reference)):
            where = f"process {i}, {name} leaf {j}"
            assert got.shape == want.shape and got.dtype == want.dtype, (
                f"{where}: {got.shape} {got.dtype} != {want.shape} {want.dtype}"
            )
            if got.dtype.kind == "f":
                # partitioning changes how many rows a batched matrix product sees, which may change
                # the last bit (test_shard.py measured at most 6e-7 relative)
                diff = float(np.max(np.abs(got - want) / (1.0 + np.abs(want)), initial=0.0))
                assert diff <= 1e-4, f"{where}: max relative difference {diff}"
            else:
                np.testing.assert_array_equal(got, want, err_msg=where)  # keys, counters, episode counts
        # and all processes hold the same bits
        for got, first in zip(leaves, multihost["workers"][0][name]):
            np.testing.assert_array_equal(got, first, err_msg=f"process {i} differs from process 0 ({name})")


# ----------------------------------------------------------------------------------------------
# `rlcx sweep` as two processes of one run (--coordinator), against the same sweep in this process
# ----------------------------------------------------------------------------------------------
SWEEP_FLAGS = ["--grid", "lr=1e-4,1e-3,3e-3", "--seeds", "2", "--total-steps", "768", "--num-steps", "32"]
SWEEP_FLAGS += ["--net-hidden", "16", "16", "--eval-episodes", "4", "--compile-cache", "off"]


def test_cli_sweep_over_two_processes_equals_the_one_process_sweep(tmp_path: pathlib.Path) -> None:
    """6 runs over 2 processes x 1 CPU device: each device runs 3 rows, so the reference is the same
    sweep here on one device in chunks of 3 (the same program shape per device); process 0 alone
    writes the run directory."""
    from rlcx_jax import sweep

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    port = free_port()
    procs = []
    for i in range(2):
        out = tmp_path / f"sweep-{i}"  # process 1 is given its own directory: it must write nothing there
        cmd = [sys.executable, "-m", "rlcx_jax.cli", "sweep", "ppo", *SWEEP_FLAGS, "--out", str(out)]
        cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
        with open(tmp_path / f"log-{i}.txt", "w") as log:
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    start = time.monotonic()
    try:
        spec = None
        while not (tmp_path / "sweep-0" / "sweep.json").is_file() and time.monotonic() < start + TIMEOUT_S:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.5)
        if (tmp_path / "sweep-0" / "sweep.json").is_file():
            spec, _ = sweep.spec_from_json(json.loads((tmp_path / "sweep-0" / "sweep.json").read_text()))
            reference = sweep.run(spec, None, chunk_size=3, progress=False)
    finally:
        wait_all(procs, tmp_path, start + TIMEOUT_S)
    assert spec is not None
    written = json.loads((tmp_path / "sweep-0" / "results.json").read_text())
    assert written["timing"]["devices"] == 2 and written["timing"]["chunk_rows"] == 6
    assert written["rows"] == reference.rows
    assert not (tmp_path / "sweep-1").exists()


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4]))
