"""The `rlcx` command line: training run directories, eval, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from rlcx_jax import checkpoint
from rlcx_jax.checkpoint import restore_run
from rlcx_jax.cli import main

# 2 seeds x 100 PPO updates of 4 envs x 32 steps, 20 chunks: a few seconds once compiled.
RUN_FLAGS = ["--seeds", "2", "--total-steps", "12800", "--num-steps", "32", "--chunks", "20", "--eval-episodes", "2"]


def _rlcx(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rlcx_jax.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("runs") / "full"
    proc = _rlcx("train", "ppo", *RUN_FLAGS, "--out", str(out))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    return out


def test_run_directory_contents(full_run: pathlib.Path) -> None:
    for name in ("config.json", "metrics.jsonl", "learning_curve.png", "summary.json"):
        assert (full_run / name).is_file(), name
    spec = checkpoint.read_run_spec(full_run)
    assert spec.algorithm == "ppo" and spec.num_seeds == 2
    rows = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 100  # one row per update per seed
    assert {r["seed"] for r in rows} == {0, 1}
    summary = json.loads((full_run / "summary.json").read_text())
    assert len(summary["eval_return_per_seed"]) == 2
    assert summary["env_steps_per_second"] > 0 and summary["compile_seconds"] > 0
    assert checkpoint.latest_step(full_run) == 100


def test_eval_restores_checkpoint(full_run: pathlib.Path, capsys) -> None:
    assert main(["eval", str(full_run), "--episodes", "2"]) == 0
    assert "IQM" in capsys.readouterr().out


def test_sigkill_then_resume_matches_uninterrupted(full_run: pathlib.Path, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "killed"
    proc = _rlcx("train", "ppo", *RUN_FLAGS, "--out", str(out), start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (checkpoint.latest_step(out) or 0) > 0 if (out / "checkpoints").is_dir() else False:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    killed_at = checkpoint.latest_step(out)
    assert killed_at is not None and 0 < killed_at < 100, killed_at

    resumed = _rlcx("train", "ppo", *RUN_FLAGS, "--out", str(out), "--resume")
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr

    _assert_matches_uninterrupted(out, full_run)


def _assert_matches_uninterrupted(resumed: pathlib.Path, full_run: pathlib.Path) -> None:
    """A resumed run ends at update 100 with the uninterrupted run's state, bit for bit, and its
    metrics.jsonl holds each update exactly once."""
    _, _, step_a, state_a = restore_run(full_run)
    _, _, step_b, state_b = restore_run(resumed)
    assert step_a == step_b == 100
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["update"], r["seed"]) for r in rows) == [(u, s) for u in range(1, 101) for s in (0, 1)]


def _damage_newest(run: pathlib.Path, how: str) -> str:
    """Damage the largest data file of checkpoint 100 as a full disk or a killed copy would; its name."""
    files = [p for p in (run / "checkpoints" / "100").rglob("*") if p.is_file() and p.stat().st_size > 0]
    victim = max(files, key=lambda p: p.stat().st_size)
    if how == "truncate":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    else:
        victim.unlink()
    return victim.name


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_eval_falls_back_to_the_newest_intact_checkpoint(how: str, full_run, tmp_path, capsys) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    name = _damage_newest(run, how)
    assert main(["eval", str(run), "--episodes", "2"]) == 0
    captured = capsys.readouterr()
    warning = captured.err.strip()
    assert len(warning.splitlines()) == 1 and "Traceback" not in warning, warning
    assert warning.startswith("rlcx: warning: Checkpoint 100 in") and name in warning, warning
    assert "falling back to checkpoint 95" in warning
    assert "checkpoint at update 95" in " ".join(captured.out.split())  # rich wraps the title
    # Asked for that step explicitly, the broken checkpoint is a one-line error naming it.
    _, _, abstract = checkpoint.abstract_state(*_trainer_and_spec(run))
    with pytest.raises(checkpoint.CheckpointError, match=f"^Checkpoint 100 in .* is broken: .*{name}"):
        checkpoint.restore_state(run, abstract, 100)


def _trainer_and_spec(run: pathlib.Path):
    from rlcx_jax import rl

    spec = checkpoint.read_run_spec(run)
    return rl.make(spec.algorithm, spec.config), spec


def test_resume_after_a_broken_newest_checkpoint_moves_it_aside_and_matches(full_run, tmp_path, capsys) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    _damage_newest(run, "truncate")
    assert main(["train", "ppo", *RUN_FLAGS, "--out", str(run), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "checkpoint 100 in" in err and "moved to broken_checkpoints/100" in err, err
    assert (run / "broken_checkpoints" / "100").is_dir()
    _assert_matches_uninterrupted(run, full_run)


def test_every_checkpoint_has_a_manifest_of_its_files(full_run) -> None:
    manifests = sorted((full_run / checkpoint.MANIFEST_DIR).glob("*.json"))
    assert [m.stem for m in manifests] == ["100", "95"]  # those of deleted checkpoints (max_to_keep) go too
    for step in (95, 100):
        assert checkpoint.checkpoint_problem(full_run, step) is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "ppx"], "Unknown algorithm 'ppx'"),
        (["train", "ppo", "--env", "CartPol-v1"], "Did you mean 'CartPole-v1'"),
        (["train", "ppo", "--total-steps", "-5"], "total_timesteps must be positive"),
        (["train", "ppo", "--num-minibatches", "3"], "must be divisible by num_minibatches"),
        (["train", "dqn", "--buffer-size", "1234"], "buffer_size (1234) must be a multiple"),
        (["train", "ppo", "--env-param", "gravityy=3"], "Unknown parameter(s) ['gravityy']"),
        (["train", "ppo", "--lr", "-1"], "lr must be positive"),
        (["train", "ppo", "--gamma", "1.5"], "gamma must be in [0.0, 1.0]"),
        (["train", "ppo", "--seeds", "0"], "--seeds must be >= 1"),
        (["train", "ppo", "--net-activation", "sigmoidd"], "Unknown activation"),
        (["eval", "/nonexistent/run"], "No run directory"),
        (["frobnicate"], "unknown command"),
        (["train", "ppo", "--prune-schedule", "gradual", "--sparsity", "1.0"], "Sparsity must be in [0, 1)"),
        (["train", "ppo", "--sparsity", "0.5"], "needs prune_schedule"),
        (["train", "ppo", "--prune-schedule", "sometimes"], "Unknown prune_schedule"),
        (["train", "ppo", "--qat-bits", "17"], "bits"),
        (["compress", "/nonexistent/run", "--prune", "0.5"], "No run directory"),
        (["compress", "/nonexistent/run", "--prune", "1.2"], "must be in [0, 1)"),
        (["compress", "/nonexistent/run", "--quant", "int1"], "bits"),
        (["compress", "/nonexistent/run", "--quant", "float8"], "--quant must be"),
        (["compress", "/nonexistent/run", "--nm", "2-4"], "--nm must look like"),
    ],
)
def test_bad_input_is_one_line_error(argv: list[str], message: str, capsys, tmp_path) -> None:
    argv = [a.replace("/nonexistent", str(tmp_path / "nonexistent")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("rlcx: error:") and message in err, err


@pytest.mark.parametrize("command", ["train", "compress", "pipeline"])
@pytest.mark.parametrize("under_file", [False, True])
def test_out_that_is_a_file_is_one_line_error(
    command: str, under_file: bool, full_run: pathlib.Path, tmp_path: pathlib.Path, capsys
) -> None:
    """--out naming an existing file (or a path below one) was a NotADirectoryError traceback."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    out = a_file / "run" if under_file else a_file
    argv = {
        "train": ["train", "ppo", *RUN_FLAGS],
        "compress": ["compress", str(full_run), "--prune", "0.5"],
        "pipeline": ["pipeline", "--teacher-steps", "2048"],
    }[command]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"--out {out}: not a directory" in err, err
    assert a_file.read_text() == "keep me"


def test_second_identical_run_loads_its_programs_from_the_compilation_cache(tmp_path: pathlib.Path) -> None:
    cache = tmp_path / "cache"
    flags = ["train", "ppo", "--seeds", "1", "--total-steps", "8192", "--chunks", "2", "--eval-episodes", "1",
             "--compile-cache", str(cache)]
    summaries = []
    for i in range(2):
        proc = _rlcx(*flags, "--out", str(tmp_path / f"run{i}"))
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
        summaries.append(json.loads((tmp_path / f"run{i}" / "summary.json").read_text()))
        if i == 0:
            assert any(cache.iterdir()), "nothing was cached"
    first, second = (s["compile_seconds"] for s in summaries)  # XLA compilation (tracing is timed apart)
    assert second * 5 <= first, f"compile {first:.2f} s, then {second:.2f} s with the cache"
    assert all(s["compile_cache"] == str(cache) for s in summaries)
    assert summaries[1]["first_chunk_seconds"] < summaries[0]["first_chunk_seconds"]
    assert summaries[0]["eval_return_per_seed"] == summaries[1]["eval_return_per_seed"]  # same programs, same run


def test_compile_cache_directory_resolution(monkeypatch, tmp_path: pathlib.Path) -> None:
    from rlcx_jax.cli import compile_cache_dir

    monkeypatch.delenv("RLCX_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache_dir() == tmp_path / "xdg" / "rlcx_jax" / "jax"
    monkeypatch.setenv("RLCX_COMPILE_CACHE", "OFF")
    assert compile_cache_dir() is None
    assert compile_cache_dir(str(tmp_path / "mine")) == tmp_path / "mine"  # the flag wins
    monkeypatch.setenv("RLCX_COMPILE_CACHE", str(tmp_path / "env"))
    assert compile_cache_dir() == tmp_path / "env" and compile_cache_dir("off") is None


def test_existing_run_needs_resume_or_overwrite(full_run: pathlib.Path, capsys) -> None:
    assert main(["train", "ppo", *RUN_FLAGS, "--out", str(full_run)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_with_other_settings_is_refused(full_run: pathlib.Path, capsys) -> None:
    flags = [f if f != "12800" else "25600" for f in RUN_FLAGS]
    assert main(["train", "ppo", *flags, "--out", str(full_run), "--resume"]) == 2
    assert "settings differ" in capsys.readouterr().err


def test_resume_fills_settings_added_since_the_run_was_written(tmp_path: pathlib.Path) -> None:
    """A run directory written before a setting existed resumes with that setting's default, and its
    config.json is rewritten in full; a real difference is refused, naming the setting."""
    from rlcx_jax import checkpoint
    from rlcx_jax.rl import ppo
    from rlcx_jax.runs import _stored_spec_now

    spec = checkpoint.RunSpec("ppo", ppo.PPOConfig(), ppo.PPOHParams(), 2, 0, 10).to_json()
    run_dir = tmp_path / "run"
    assert checkpoint.prepare_run_dir(run_dir, spec, False, False, "run", normalize=_stored_spec_now) == 0
    path = run_dir / checkpoint.CONFIG_FILE
    older = json.loads(path.read_text())
    del older["config"]["net"]["dueling"]  # as a version before NetConfig.dueling wrote it
    path.write_text(json.dumps(older))
    with pytest.raises(checkpoint.CheckpointError, match=r"\(config\.net\.dueling: \(absent\) -> false\)"):
        checkpoint.prepare_run_dir(run_dir, spec, True, False, "run")  # compared as stored
    assert checkpoint.prepare_run_dir(run_dir, spec, True, False, "run", normalize=_stored_spec_now) == 0
    assert json.loads(path.read_text()) == json.loads(json.dumps(spec))
    with pytest.raises(checkpoint.CheckpointError, match=r"\(num_seeds: 2 -> 3; seed: 0 -> 1\)"):
        checkpoint.prepare_run_dir(run_dir, {**spec, "seed": 1, "num_seeds": 3}, True, False, "run")
    broken = {**older, "config": {**older["config"], "no_such_setting": 1}}
    path.write_text(json.dumps(broken))  # unreadable by this version: compared as stored
    with pytest.raises(checkpoint.CheckpointError, match=r"config\.no_such_setting: 1 -> \(absent\)"):
        checkpoint.prepare_run_dir(run_dir, spec, True, False, "run", normalize=_stored_spec_now)


def test_eval_of_mismatched_checkpoint_is_clear(full_run: pathlib.Path, tmp_path: pathlib.Path, capsys) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(full_run, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["config"]["net"]["hidden"] = [32, 32]
    (copy / "config.json").write_text(json.dumps(cfg))
    assert main(["eval", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "does not match the config" in err and "expected" in err
    shutil.rmtree(copy / "checkpoints")
    assert main(["eval", str(copy)]) == 2
    assert "No checkpoint" in capsys.readouterr().err


def test_compress_prunes_quantizes_exports_and_reports(full_run: pathlib.Path, capsys, tmp_path) -> None:
    out = tmp_path / "artifacts"
    argv = ["compress", str(full_run), "--prune", "0.8", "--quant", "int8", "--episodes", "2", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "greedy agreement" in printed and "smaller" in printed
    summary = json.loads((out / "summary.json").read_text())
    original, compressed = summary["rows"]
    assert compressed["export_exact"] is True
    assert compressed["nonzeros"] < original["nonzeros"] and compressed["flops"] < original["flops"]
    assert compressed["artifact_bytes"] * 5 < original["artifact_bytes"]
    assert summary["agreement_measure"] == "greedy agreement"
    assert all(0.0 <= a <= 1.0 for a in compressed["agreement_per_seed"])
    assert sorted(p.name for p in out.glob("*.rlcx")) == ["seed_0.rlcx", "seed_1.rlcx"]


def test_compress_folds_dead_units_by_default_into_a_smaller_exact_artifact(full_run, tmp_path) -> None:
    """At 95% sparsity some hidden units keep no incoming weight; folding them (the default) ships a
    smaller file of the policy it evaluated, and `--no-fold-dead-units` keeps the plain pruned one."""
    rows = {}
    for flag in ("--fold-dead-units", "--no-fold-dead-units"):
        out = tmp_path / flag.strip("-")
        argv = ["compress", str(full_run), "--prune", "0.95", "--quant", "int8", "--episodes", "1", flag,
                "--out", str(out)]
        assert main(argv) == 0
        rows[flag] = json.loads((out / "summary.json").read_text())["rows"][1]
    folded, plain = rows["--fold-dead-units"], rows["--no-fold-dead-units"]
    assert folded["export_exact"] is True and plain["export_exact"] is True
    assert folded["artifact_bytes"] < plain["artifact_bytes"]
    assert folded["nonzeros"] < plain["nonzeros"]


def test_compress_of_a_continuous_policy_reports_action_agreement(tmp_path, capsys) -> None:
    """Pendulum (Gaussian policy): the table names the continuous measure and its figure is not the
    0% that exact float equality gave; the int8 artifact of the shrunk policy reloads exactly."""
    run = tmp_path / "pendulum"
    train = ["train", "ppo", "--env", "Pendulum-v1", "--seeds", "1", "--total-steps", "2048", "--num-steps", "32",
             "--chunks", "1", "--eval-episodes", "1", "--out", str(run)]
    assert main(train) == 0
    capsys.readouterr()
    out = tmp_path / "int8"
    argv = ["compress", str(run), "--structured", "0.25", "--quant", "int8", "--episodes", "1", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "within 1% of the action range" in " ".join(printed.split())  # the footnote that defines it
    assert "warning" not in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["agreement_measure"] == "action agreement (within 1% of range)"
    compressed = summary["rows"][1]
    assert compressed["export_exact"] is True
    assert 0.0 < compressed["agreement_per_seed"][0] <= 1.0 and 0.0 < compressed["action_gap_per_seed"][0] < 0.5


def test_compressed_file_holds_exactly_the_evaluated_weights(full_run, tmp_path) -> None:
    """The artifact is encoded once from the float weights: quantizing the already fake-quantized
    weights a second time moved k-means centroids and uniform ranges (export_exact compares every
    loaded weight with the evaluated one, bit for bit)."""
    out = tmp_path / "kmeans4"
    argv = ["compress", str(full_run), "--prune", "0.5", "--quant", "kmeans4", "--episodes", "2", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"][1]["export_exact"] is True
