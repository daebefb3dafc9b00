"""Metric sinks: the rows read back from TensorBoard event files (tensorboard's own reader) and from
W&B's offline run files hold exactly the metrics written, at the right steps, None values skipped."""

from __future__ import annotations

import pathlib
import struct
import subprocess
import sys
import time

import pytest

from rlcx_jax import loggers

RET = "episode/episode_return"
_SKIP = 'optional logger packages not installed: pip install -e ".[log,test]"'


def _rows(seeds: int, updates: list[int], env_steps: bool = True) -> list[dict]:
    """metrics_rows-shaped rows; seed s finishes no episode (None return) at its (s+1)-th log point."""
    rows = []
    for p, update in enumerate(updates):
        for s in range(seeds):
            row = {"seed": s, "update": update, RET: None if p == s else 0.25 * p + s, "loss": 0.5 + p}
            if env_steps:
                row["env_steps"] = float(update * 8)
            rows.append(row)
    return rows


def _scalars(run_dir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_one_event_directory_per_seed_at_env_steps(tmp_path) -> None:
    pytest.importorskip("tensorboardX", reason=_SKIP)
    pytest.importorskip("tensorboard", reason=_SKIP)
    rows = _rows(seeds=2, updates=[5, 10, 15])
    sink = loggers.TensorBoardSink(tmp_path)
    sink.write(rows[:2])
    # Readable before close: tensorboardX hands events to a background thread and every write
    # flushes what it has written, so they appear within a moment (under load, not at once).
    expected = {RET: [(40, 1.0)], "loss": [(40, 0.5)], "update": [(40, 5.0)]}
    deadline = time.monotonic() + 30.0
    while (seen := _scalars(tmp_path / "tensorboard" / "seed_1")) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
        sink.write([])  # flush again
    assert seen == expected
    sink.write(rows[2:])
    sink.close()
    assert sorted(p.name for p in (tmp_path / "tensorboard").iterdir()) == ["seed_0", "seed_1"]
    assert _scalars(tmp_path / "tensorboard" / "seed_0") == {
        RET: [(80, 0.25), (120, 0.5)],  # None at update 5: skipped
        "loss": [(40, 0.5), (80, 1.5), (120, 2.5)],
        "update": [(40, 5.0), (80, 10.0), (120, 15.0)],
    }
    assert _scalars(tmp_path / "tensorboard" / "seed_1")[RET] == [(40, 1.0), (120, 1.5)]


def test_tensorboard_steps_are_updates_without_env_steps(tmp_path) -> None:
    pytest.importorskip("tensorboardX", reason=_SKIP)
    pytest.importorskip("tensorboard", reason=_SKIP)
    sink = loggers.TensorBoardSink(tmp_path, subdir="tb")
    sink.write(_rows(seeds=1, updates=[3, 6], env_steps=False))
    sink.close()
    assert _scalars(tmp_path / "tb" / "seed_0") == {RET: [(6, 0.25)], "loss": [(3, 0.5), (6, 1.5)]}


def test_tensorboard_after_resume_drops_what_the_killed_run_logged_past_the_checkpoint(tmp_path) -> None:
    """A run killed after logging updates 5..20 but checkpointed at 10 logs 15 and 20 again on --resume;
    TensorBoard must show each step once, with the resumed run's values."""
    pytest.importorskip("tensorboardX", reason=_SKIP)
    pytest.importorskip("tensorboard", reason=_SKIP)
    killed = loggers.TensorBoardSink(tmp_path)
    killed.write([{"seed": 0, "update": u, "loss": float(u)} for u in (5, 10, 15, 20)])
    killed.close()
    time.sleep(1.1)  # tensorboardX names event files by the second: the resumed writer gets a new file
    resumed = loggers.TensorBoardSink(tmp_path, resumed=True)
    resumed.write([{"seed": 0, "update": u, "loss": u + 0.5} for u in (15, 20)])
    resumed.close()
    assert _scalars(tmp_path / "tensorboard" / "seed_0")["loss"] == [(5, 5.0), (10, 10.0), (15, 15.5), (20, 20.5)]


def _wandb_records(path: pathlib.Path) -> list:
    """The protobuf records of a .wandb file: a 7-byte header (":W&B", 0xBEE1, version 0), then
    LevelDB-log records (crc32 4, length 2, type 1: full/first/middle/last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00"
    records, pos, payload = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if pos + 7 + length > len(data):  # still being written
            break
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            records.append(wandb_internal_pb2.Record.FromString(payload))
            payload = b""
    return records


def _finished_run_records(path: pathlib.Path) -> list:
    """The records once the run's exit record is on disk: W&B's service closes the file a few tens of
    milliseconds after `finish` returns (and before the process exits)."""
    deadline = time.monotonic() + 10.0
    while True:
        records = _wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{path}: no exit record after 10 s"
        time.sleep(0.02)


def test_wandb_one_offline_run_per_seed_in_one_group(tmp_path, monkeypatch) -> None:
    pytest.importorskip("wandb", reason=_SKIP)
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no netrc entry, no cache or settings outside tmp_path
    run_dir = tmp_path / "ppo_run"
    (sink,) = loggers.make_sinks(["wandb"], run_dir, {"algorithm": "ppo", "num_seeds": 2})
    assert isinstance(sink, loggers.WandbSink) and sink.mode == "offline" and sink.project == "rlcx_jax"
    rows = _rows(seeds=2, updates=[5, 10])
    sink.write(rows[:2])
    sink.write(rows[2:])
    sink.close()
    runs = {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/*.wandb")):
        records = _finished_run_records(path)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        config = {u.key: u.value_json for u in run.config.update if u.key != "_wandb"}
        history = [
            {
                i.key or "/".join(i.nested_key): i.value_json
                for i in r.history.item
                if not i.nested_key[0].startswith("_")
            }
            for r in records
            if r.WhichOneof("record_type") == "history"
        ]
        step_metric = {
            m.metric.name or m.metric.glob_name: m.metric.step_metric
            for m in records
            if m.WhichOneof("record_type") == "metric"
        }
        runs[run.display_name] = (run.run_group, run.project, config, history, step_metric)
    assert sorted(runs) == ["ppo_run-seed0", "ppo_run-seed1"]
    group, project, config, history, step_metric = runs["ppo_run-seed0"]
    assert (group, project, step_metric) == ("ppo_run", "rlcx_jax", {"env_steps": "", "*": "env_steps"})
    assert config == {"algorithm": '"ppo"', "num_seeds": "2", "seed_index": "0"}
    assert history == [
        {"update": "5", "env_steps": "40", "loss": "0.5"},  # None return: not logged
        {"update": "10", "env_steps": "80", RET: "0.25", "loss": "1.5"},
    ]
    assert runs["ppo_run-seed1"][2]["seed_index"] == "1"
    assert runs["ppo_run-seed1"][3] == [
        {"update": "5", "env_steps": "40", RET: "1", "loss": "0.5"},
        {"update": "10", "env_steps": "80", "loss": "1.5"},
    ]


def test_wandb_mode_from_environment_then_api_key_else_offline(tmp_path, monkeypatch) -> None:
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert loggers.wandb_mode() == "offline"
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    netrc.chmod(0o600)
    assert loggers.wandb_mode() == "online"  # what `wandb login` leaves
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert loggers.wandb_mode() == "offline"  # a key for another host
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert loggers.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert loggers.wandb_mode() == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offlne")
    with pytest.raises(ValueError, match=r"^WANDB_MODE='offlne': expected one of online, offline, disabled, shared$"):
        loggers.wandb_mode()


def test_make_sinks_builds_each_kind_once_and_rejects_unknown_or_missing_packages(tmp_path, monkeypatch) -> None:
    pytest.importorskip("tensorboardX", reason=_SKIP)
    sinks = loggers.make_sinks(["tensorboard", "tensorboard"], tmp_path, {})
    assert [type(s) for s in sinks] == [loggers.TensorBoardSink]
    assert loggers.make_sinks([], tmp_path, {}) == []
    with pytest.raises(ValueError, match=r"^unknown logger 'mlflow'; known: tensorboard, wandb$"):
        loggers.check_kinds(["tensorboard", "mlflow"])
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if not installed: find_spec None, import fails
    with pytest.raises(ValueError) as e:
        loggers.make_sinks(["tensorboard"], tmp_path / "run", {})
    assert str(e.value) == 'the tensorboard logger needs the tensorboardX package: pip install -e ".[log]"'
    assert not (tmp_path / "run").exists()


def test_loggers_import_and_check_kinds_without_jax_or_the_optional_packages() -> None:
    code = (
        "import sys, rlcx_jax.loggers as L\n"
        "for kind in L.KNOWN:\n"
        "    try:\n        L.check_kinds([kind])\n"
        "    except ValueError:\n        pass  # not installed: still checked without importing anything\n"
        "bad = [m for m in ('jax', 'tensorboardX', 'tensorboard', 'wandb') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
