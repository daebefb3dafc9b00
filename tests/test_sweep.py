"""Sweeps: settings from grids and random draws, rows that reproduce plain training runs, chunking,
resuming, parts merged (also as Ray tasks), sharded runs, the CLI and its one-line errors."""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rlcx_jax.configs.algorithms import A2CConfig, DQNConfig, PPOConfig, PPOHParams, ReinforceConfig
from rlcx_jax.configs.compress import CompressConfig
from rlcx_jax.configs.nets import NetConfig
from rlcx_jax.configs.sweep import Axis, SweepSpec, parse_chunk_size, parse_grid, parse_part, parse_random

TINY = PPOConfig(num_envs=4, num_steps=32, total_timesteps=4 * 32 * 6, net=NetConfig(hidden=(16, 16)))


def tiny_spec(**changes) -> SweepSpec:
    base = SweepSpec("ppo", TINY, PPOHParams(), grid=(parse_grid("lr=1e-4,1e-3,3e-3"),), seeds=2, eval_episodes=4)
    return SweepSpec(**{**base.__dict__, **changes})


# ----------------------------------------------------------------------------------------------
# Specs (no jax)
# ----------------------------------------------------------------------------------------------
def test_grid_settings_are_the_product_in_row_order() -> None:
    spec = tiny_spec(grid=(parse_grid("lr=1e-4,1e-3"), parse_grid("ent_coef=0,0.01,0.02")))
    values = spec.setting_values()
    assert spec.num_settings == 6 and spec.num_rows == 12
    assert values == [{"lr": a, "ent_coef": b} for a in (1e-4, 1e-3) for b in (0.0, 0.01, 0.02)]
    setting = spec.setting(values[4])
    assert (setting.lr, setting.ent_coef, setting.gamma) == (1e-3, 0.01, PPOHParams().gamma)


def test_random_settings_are_deterministic_in_range_and_log_uniform() -> None:
    axes = (parse_random("lr=loguniform:1e-5:1e-1"), parse_random("gae_lambda=uniform:0.8:1.0"))
    spec = tiny_spec(grid=(), random=axes, samples=4000, seed=3)
    values = spec.setting_values()
    assert values == tiny_spec(grid=(), random=axes, samples=4000, seed=3).setting_values()
    assert values != tiny_spec(grid=(), random=axes, samples=4000, seed=4).setting_values()
    lr = np.array([v["lr"] for v in values])
    lam = np.array([v["gae_lambda"] for v in values])
    assert lr.min() >= 1e-5 and lr.max() <= 1e-1 and lam.min() >= 0.8 and lam.max() <= 1.0
    # log-uniform over 4 decades: each decade holds about a quarter of the draws
    per_decade = np.histogram(np.log10(lr), bins=[-5, -4, -3, -2, -1])[0] / lr.size
    assert np.all(np.abs(per_decade - 0.25) < 0.04), per_decade
    assert abs(np.mean(lam) - 0.9) < 0.01


def test_random_draws_are_combined_with_every_grid_point() -> None:
    spec = tiny_spec(grid=(parse_grid("clip_eps=0.1,0.2"),), random=(parse_random("lr=uniform:1e-4:1e-3"),), samples=3)
    values = spec.setting_values()
    assert spec.num_settings == len(values) == 6
    assert [v["clip_eps"] for v in values] == [0.1, 0.2] * 3
    assert values[0]["lr"] == values[1]["lr"] != values[2]["lr"]


def test_extension_hyperparameters_are_sweepable_by_bare_or_qualified_name() -> None:
    config = PPOConfig(extensions=(CompressConfig(prune_schedule="gradual"),))
    for name in ("sparsity", "compress.sparsity"):
        spec = SweepSpec("ppo", config, PPOHParams(), grid=(parse_grid(f"{name}=0,0.5"),))
        spec.validate()
        assert [float(spec.setting(v).ext["compress"].sparsity) for v in spec.setting_values()] == [0.0, 0.5]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: tiny_spec(grid=()), "at least one --grid or --random"),
        (lambda: tiny_spec(grid=(Axis("lr"),)), "the grid is empty"),
        (lambda: tiny_spec(grid=(parse_grid("lrr=1,2"),)), "ppo has no hyperparameter 'lrr'. Did you mean 'lr'?"),
        (lambda: tiny_spec(grid=(parse_grid("num_envs=4,8"),)), "num_envs is a static setting of PPOConfig"),
        (lambda: tiny_spec(grid=(parse_grid("hidden=4,8"),)), "hidden is a static setting"),
        (lambda: tiny_spec(grid=(parse_grid("sparsity=0.5"),)), "belongs to the compress extension"),
        (lambda: tiny_spec(grid=(parse_grid("gamma=0.9,1.5"),)), "setting 1 (gamma=1.5): gamma must be in [0.0, 1.0]"),
        (lambda: tiny_spec(grid=(parse_grid("lr=1e-3,-1"),)), "setting 1 (lr=-1): lr must be positive"),
        (lambda: tiny_spec(grid=(parse_grid("lr=1e-3"), parse_grid("lr=1e-4"))), "swept more than once: lr"),
        (lambda: tiny_spec(random=(parse_random("clip_eps=uniform:0.1:0.3"),)), "--random needs --samples >= 1"),
        (lambda: tiny_spec(samples=3), "--samples draws random settings"),
        (lambda: tiny_spec(seeds=0), "seeds must be positive"),
        (lambda: parse_grid("lr="), "the grid is empty"),
        (lambda: parse_grid("lr=1e-3,,1e-4"), "empty value"),
        (lambda: parse_grid("lr=1,x"), "'x' is not a number"),
        (lambda: parse_grid("lr=nan"), "not finite"),
        (lambda: parse_grid("lr=1,1"), "repeated values"),
        (lambda: parse_grid("lr"), "expects NAME=V1,V2"),
        (lambda: parse_random("lr=normal:0:1"), "DIST one of uniform, loguniform"),
        (lambda: parse_random("lr=uniform:1:1"), "must be below HIGH"),
        (lambda: parse_random("lr=loguniform:0:1"), "loguniform needs LOW > 0"),
        (lambda: parse_chunk_size("0"), "--chunk-size must be >= 1"),
        (lambda: parse_chunk_size("many"), "positive integer or auto"),
        (lambda: parse_part("2/2"), "0 <= I < N"),
        (lambda: parse_part("1"), "expects I/N"),
    ],
)
def test_bad_sweep_input_is_a_one_line_error(make, message: str) -> None:
    with pytest.raises(ValueError) as info:
        spec = make()
        spec.validate()
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_parsers_accept_good_input() -> None:
    assert parse_chunk_size("auto") is None and parse_chunk_size("16") == 16
    assert parse_part("1/4") == (1, 4)
    assert parse_random("lr=loguniform:1e-4:1e-2").describe() == "lr=loguniform:0.0001:0.01"


# ----------------------------------------------------------------------------------------------
# Running (one compiled program shape shared by most tests: chunks of 2 rows)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    from rlcx_jax import sweep

    out = tmp_path_factory.mktemp("sweep") / "full"
    return sweep.run(tiny_spec(), out, chunk_size=2, progress=False)


def test_each_row_reproduces_a_plain_training_run_of_its_setting(base_run) -> None:
    """Independent reference: vmapped `train` over the 2 seeds of each setting, then the evaluator,
    with the keys `rlcx train --seed 0 --seeds 2` uses."""
    import jax

    from rlcx_jax import rl
    from rlcx_jax.rl.common import broadcast_tree
    from rlcx_jax.rl.evaluate import make_evaluator

    spec = tiny_spec()
    trainer = rl.make("ppo", spec.config)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    eval_keys = jax.random.split(jax.random.PRNGKey(10_000), 2)
    evaluate = jax.jit(jax.vmap(make_evaluator(trainer, spec.eval_episodes, greedy=False)))
    train = jax.jit(jax.vmap(trainer.train))
    assert [(r["setting"], r["seed"]) for r in base_run.rows] == [(s, k) for s in range(3) for k in range(2)]
    for s, values in enumerate(spec.setting_values()):
        out = train(keys, broadcast_tree(spec.setting(values), 2))
        returns = np.asarray(evaluate(out.state.params, out.state.obs_stats, eval_keys))
        for k in range(2):
            row = base_run.rows[2 * s + k]
            assert row["lr"] == values["lr"]
            assert row["return_mean"] == pytest.approx(float(returns[k].mean()), abs=1e-4)
            counts = np.asarray(out.metrics.episode.episode_count[k])
            last = np.asarray(out.metrics.episode.episode_return[k])[np.nonzero(counts)[0][-1]]
            assert row["train_return"] == pytest.approx(float(last), rel=1e-5)
    assert len({r["return_mean"] for r in base_run.rows}) > 1  # settings and seeds really differ


def test_tables_summary_and_plot_are_written(base_run) -> None:
    out = base_run.out_dir
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    assert {"setting", "seed", "lr", "return_mean", "return_iqm", "train_return", "zero_fraction"} <= set(rows[0])
    with open(out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert [float(s["lr"]) for s in summary] == [1e-4, 1e-3, 3e-3]
    for row in base_run.summary:
        seeds = [r["return_mean"] for r in base_run.rows if r["setting"] == row["setting"]]
        assert row["return_iqm"] == pytest.approx(np.mean(seeds))  # IQM of two values is their mean
        assert row["ci_low"] <= row["return_iqm"] <= row["ci_high"]
    data = json.loads((out / "results.json").read_text())
    assert data["timing"]["chunks"] == 3 and data["timing"]["chunk_rows"] == 2
    assert data["timing"]["env_steps"] == 6 * TINY.num_updates * TINY.steps_per_update
    assert (out / "sweep.png").stat().st_size > 10_000


def test_resume_runs_only_the_missing_rows_and_ends_identical(base_run, tmp_path) -> None:
    from rlcx_jax import sweep

    out = tmp_path / "resumed"
    shutil.copytree(base_run.out_dir, out)
    chunk_files = sorted((out / "chunks").glob("*.json"))
    chunk_files[1].unlink()
    for name in ("results.csv", "results.json"):
        (out / name).unlink()
    progress: list[tuple[int, int]] = []
    resumed = sweep.run(
        tiny_spec(), out, chunk_size=2, resume=True, progress=False, on_chunk=lambda *a: progress.append(a)
    )
    assert progress == [(2, 2)]
    assert resumed.rows == base_run.rows
    with pytest.raises(ValueError, match="settings differ from the sweep"):
        sweep.run(tiny_spec(seeds=3), out, chunk_size=2, resume=True, progress=False)
    with pytest.raises(ValueError, match="already holds files"):
        sweep.run(tiny_spec(), out, chunk_size=2, progress=False)


def test_parts_merge_into_the_full_sweep(base_run, tmp_path) -> None:
    from rlcx_jax import sweep

    parts = [tmp_path / f"part-{i}" for i in range(2)]
    for i, where in enumerate(parts):
        part = sweep.run(tiny_spec(), where, chunk_size=2, part=(i, 2), progress=False)
        assert {r["setting"] % 2 for r in part.rows} == {i}
    merged = sweep.merge(parts, tmp_path / "merged")
    assert merged.rows == base_run.rows
    assert merged.summary == base_run.summary
    with pytest.raises(ValueError, match="2 of 6 runs are missing"):
        sweep.merge(parts[:1], tmp_path / "m1")
    with pytest.raises(ValueError, match="in more than one part"):
        sweep.merge([parts[0], parts[0], parts[1]], tmp_path / "m2")
    other = sweep.run(tiny_spec(seed=1), tmp_path / "other", chunk_size=2, part=(1, 2), progress=False)
    with pytest.raises(ValueError, match="holds a different sweep"):
        sweep.merge([parts[0], other.out_dir], tmp_path / "m3")


def test_automatic_chunks_follow_the_memory_estimate(base_run, monkeypatch) -> None:
    """All 6 rows in one chunk when they fit; with a budget of 2.5 rows' worth of memory, chunks of 2
    (the program of `base_run`: the same rows, the same numbers)."""
    from rlcx_jax import sweep

    full = sweep.run(tiny_spec(), None, progress=False)
    assert full.timing["chunks"] == 1 and full.timing["chunk_rows"] == 6
    per_row = full.timing["bytes_per_device"] / 6
    monkeypatch.setattr(sweep, "memory_budget", lambda mesh: int(2.5 * per_row))
    chunked = sweep.run(tiny_spec(), None, progress=False)
    assert chunked.timing["chunk_rows"] == 2 and chunked.timing["chunks"] == 3
    assert chunked.timing["bytes_per_device"] <= 2.5 * per_row
    assert chunked.rows == base_run.rows


def test_a_pruning_sweep_prunes_as_much_as_each_setting_asks() -> None:
    from rlcx_jax import sweep

    config = PPOConfig(
        num_envs=4,
        num_steps=32,
        total_timesteps=4 * 32 * 8,
        extensions=(CompressConfig(prune_schedule="gradual", prune_every=1),),
    )
    spec = SweepSpec("ppo", config, PPOHParams(), grid=(parse_grid("sparsity=0,0.5,0.8"),), seeds=1, eval_episodes=2)
    rows = sweep.run(spec, None, progress=False).rows
    zeros = [r["zero_fraction"] for r in rows]
    assert zeros[0] == 0.0
    assert 0.4 < zeros[1] < 0.5 < 0.7 < zeros[2] < 0.8, zeros  # biases and small layers stay dense


@pytest.mark.parametrize(
    ("algorithm", "config", "axis"),
    [
        ("dqn", DQNConfig(total_timesteps=2000, learning_starts=500, buffer_size=1000, log_every=10), "tau=0.5,1"),
        ("a2c", A2CConfig(total_timesteps=16 * 8 * 4, net=NetConfig(hidden=(16,))), "gae_lambda=0.9,1"),
        ("reinforce", ReinforceConfig(num_envs=4, num_steps=64, total_timesteps=4 * 64 * 2), "vf_coef=0.25,0.5"),
    ],
)
def test_every_algorithm_sweeps(algorithm: str, config, axis: str) -> None:
    from rlcx_jax import sweep
    from rlcx_jax.configs.algorithms import config_classes

    spec = SweepSpec(
        algorithm, config, config_classes(algorithm)[1](), grid=(parse_grid(axis),), seeds=1, eval_episodes=2
    )
    rows = sweep.run(spec, None, progress=False).rows
    name, values = axis.split("=")
    assert [r[name] for r in rows] == [float(v) for v in values.split(",")]
    assert all(math.isfinite(r["return_mean"]) and r["return_mean"] > 0 for r in rows)


# ----------------------------------------------------------------------------------------------
# Devices, Ray, the command line
# ----------------------------------------------------------------------------------------------
SHARDED = textwrap.dedent(
    """
    import json, jax
    from rlcx_jax import shard, sweep
    from rlcx_jax.configs.algorithms import PPOConfig, PPOHParams
    from rlcx_jax.configs.nets import NetConfig
    from rlcx_jax.configs.sweep import SweepSpec, parse_grid

    assert jax.device_count() == 8
    config = PPOConfig(num_envs=4, num_steps=32, total_timesteps=4 * 32 * 6, net=NetConfig(hidden=(16, 16)))
    spec = SweepSpec("ppo", config, PPOHParams(), grid=(parse_grid("lr=1e-4,1e-3,3e-3"),), seeds=2, eval_episodes=4)
    runs = {
        "one device": sweep.run(spec, None, chunk_size=1, mesh=shard.run_mesh(jax.devices()[:1]), progress=False),
        "8 devices": sweep.run(spec, None, progress=False),  # 6 runs padded to 8
        "4 devices, chunks of 4": sweep.run(spec, None, chunk_size=4, mesh=shard.run_mesh(jax.devices()[:4]), progress=False),
    }
    print("REPORT " + json.dumps({k: {"rows": r.rows, "timing": r.timing} for k, r in runs.items()}))
    """
)


def test_sharded_sweeps_agree_with_the_one_device_sweep_rows_in_order() -> None:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("REPORT "))[len("REPORT ") :])
    reference = report.pop("one device")["rows"]
    assert report["8 devices"]["timing"]["devices"] == 8 and report["8 devices"]["timing"]["chunk_rows"] == 8
    assert report["4 devices, chunks of 4"]["timing"]["chunks"] == 2
    for name, run in report.items():
        assert [(r["setting"], r["seed"]) for r in run["rows"]] == [(r["setting"], r["seed"]) for r in reference], name
        for row, ref in zip(run["rows"], reference):
            for column in ("return_mean", "train_return", "zero_fraction"):
                assert row[column] == pytest.approx(ref[column], rel=1e-4, abs=1e-4), (name, row, ref)


def test_cli_cpu_devices_shards_a_sweep_over_that_many_cpu_devices(tmp_path: pathlib.Path) -> None:
    """`rlcx sweep --cpu-devices 2` in a fresh process: XLA gets two CPU devices and the runs are split
    over both (the row count and the devices are what results.json records)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    args = ["sweep", "ppo", "--grid", "lr=1e-3", "--seeds", "3", "--total-steps", "256", "--num-steps", "32", "--net-hidden", "8"]
    args += ["--eval-episodes", "2", "--cpu-devices", "2", "--compile-cache", "off", "--out", str(tmp_path / "s")]
    proc = subprocess.run([sys.executable, "-m", "rlcx_jax.cli", *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 cpu device(s)" in proc.stdout + proc.stderr
    result = json.loads((tmp_path / "s" / "results.json").read_text())
    assert result["timing"]["devices"] == 2 and len(result["rows"]) == 3  # 3 runs padded to 4, 3 kept


def test_parts_as_ray_tasks_on_a_local_cluster_merge_into_the_full_sweep(base_run, tmp_path) -> None:
    ray = pytest.importorskip("ray")
    from rlcx_jax import sweep

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        merged = sweep.run_with_ray(tiny_spec(), tmp_path / "ray", num_parts=2, chunk_size=2)
    finally:
        ray.shutdown()
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == ["merged", "part-0", "part-1"]
    assert merged.rows == base_run.rows


def test_cli_sweep_merge_and_info(tmp_path: pathlib.Path, capsys) -> None:
    from rlcx_jax import cli

    common = ["ppo", "--grid", "lr=1e-3,3e-3", "--seeds", "2", "--total-steps", "768", "--num-steps", "32"]
    common += ["--net-hidden", "16", "16", "--eval-episodes", "4", "--chunk-size", "2", "--compile-cache", "off"]
    for i in range(2):
        assert cli.main(["sweep", *common, "--part", f"{i}/2", "--out", str(tmp_path / f"p{i}")]) == 0
    assert cli.main(["sweep-merge", str(tmp_path / "p0"), str(tmp_path / "p1"), "--out", str(tmp_path / "all")]) == 0
    with open(tmp_path / "all" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["setting"], r["seed"], float(r["lr"])) for r in rows] == [
        ("0", "0", 1e-3),
        ("0", "1", 1e-3),
        ("1", "0", 3e-3),
        ("1", "1", 3e-3),
    ]
    assert (tmp_path / "all" / "sweep.png").is_file()
    assert cli.main(["sweep", *common, "--part", "0/2", "--out", str(tmp_path / "p0")]) == 2  # exists: one-line error
    capsys.readouterr()
    assert cli.main(["info"]) == 0
    report = capsys.readouterr().out.splitlines()
    assert report[0].startswith("jax 0.10.2, jaxlib 0.10.2, backend cpu") and "device(s) in all" in report[0]
    assert len(report) >= 2 and "cpu" in report[1]
