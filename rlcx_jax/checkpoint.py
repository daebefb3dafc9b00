"""Run directories: `config.json` + orbax checkpoints of the full (vmapped) training state.

A run directory is self-describing: `config.json` names the algorithm and holds its config and
hyperparameters, so `rlcx eval DIR` or a notebook can rebuild the abstract state and restore it
without the Python objects that made it. Orbax writes each checkpoint to a temporary directory and
renames it when complete, so a crash never leaves a half-written checkpoint that looks valid;
`config.json` is written to a temporary name and renamed.

Every checkpoint also gets a manifest (`checkpoint_manifests/<step>.json`: size and SHA-256 of each
of its files), so damage done after the save (a truncated copy, a full disk, a deleted file) is
found before orbax reads anything: `restore_state` names the broken step in one line, and with
`fallback=True` (eval, resume) restores the newest intact checkpoint instead, with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from rlcx_jax.configs.base import RUN_CONFIG_FILE
from rlcx_jax.configs.base import check_directory_path as check_directory_path
from rlcx_jax.configs.base import from_jsonable as from_jsonable
from rlcx_jax.configs.base import to_jsonable as to_jsonable
from rlcx_jax.nets.paths import flatten_with_paths

CONFIG_FILE = RUN_CONFIG_FILE
CHECKPOINT_DIR = "checkpoints"
MANIFEST_DIR = "checkpoint_manifests"
BROKEN_DIR = "broken_checkpoints"
"""Where `--resume` moves checkpoints that failed verification (kept for inspection, out of orbax's way)."""
# 2: extensions (config.extensions, hparams.ext) instead of compression fields in every config
CONFIG_FORMAT = 2


class CheckpointError(ValueError):
    """A run directory or checkpoint is missing, or does not match its config."""


class BrokenCheckpoint(CheckpointError):
    """A checkpoint's files are damaged (failed its manifest, or orbax cannot read it)."""


def warn(message: str) -> None:
    print(f"rlcx: warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Config <-> JSON
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything needed to rebuild a run: algorithm, static config, hyperparameters, seeds."""

    algorithm: str
    config: Any
    hparams: Any
    num_seeds: int
    seed: int
    chunk_updates: int

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CONFIG_FORMAT,
            "algorithm": self.algorithm,
            "config": to_jsonable(self.config),
            "hparams": to_jsonable(self.hparams),
            "num_seeds": self.num_seeds,
            "seed": self.seed,
            "chunk_updates": self.chunk_updates,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> RunSpec:
        from rlcx_jax import rl

        if data.get("format") != CONFIG_FORMAT:
            raise CheckpointError(
                f"config.json has format {data.get('format', 1)}; this version reads format {CONFIG_FORMAT} "
                "(run directories written before extensions existed must be trained again)"
            )
        spec = rl.get(data["algorithm"])
        config = from_jsonable(spec.config_cls, data["config"])
        hparams_data = dict(data["hparams"])
        ext_data = hparams_data.pop("ext", {})
        ext = {}
        for e in config.extensions:
            default = e.default_hparams()
            if default is not None:
                ext[e.name] = from_jsonable(type(default), ext_data[e.name]) if e.name in ext_data else default
        return RunSpec(
            algorithm=data["algorithm"],
            config=config,
            hparams=from_jsonable(spec.hparams_cls, hparams_data).replace(ext=ext),
            num_seeds=int(data["num_seeds"]),
            seed=int(data["seed"]),
            chunk_updates=int(data["chunk_updates"]),
        )


def atomic_write_text(path: pathlib.Path, text: str) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare_output_dir(
    out_dir: pathlib.Path,
    spec_json: dict[str, Any],
    resume: bool,
    overwrite: bool,
    *,
    spec_file: str = CONFIG_FILE,
    what: str = "run",
    resume_needs_spec: bool = True,
    normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> bool:
    """Create or check an output directory described by `spec_file` (its settings as JSON); True when
    resuming.

    resume: the stored settings must equal `spec_json` (one-line error naming the first differences
    otherwise; with `resume_needs_spec=False` a directory without them starts afresh). `normalize`
    rebuilds the stored settings with this version's code first (e.g. `RunSpec.from_json(d).to_json()`),
    so a directory written before a setting existed resumes with that setting's default; the file is
    then rewritten in full. Otherwise the directory must be empty or absent (`overwrite` empties it),
    and the settings are written atomically."""
    check_directory_path(out_dir)
    spec_json = _as_read_back(spec_json)
    path = out_dir / spec_file
    if resume and (path.is_file() or resume_needs_spec):
        if not path.is_file():
            raise CheckpointError(f"--resume: no {what} in {out_dir} ({spec_file} missing)")
        as_written = json.loads(path.read_text())
        stored = as_written
        if normalize is not None:
            try:
                stored = _as_read_back(normalize(stored))
            except (KeyError, TypeError, ValueError):  # CheckpointError and ConfigError are ValueErrors
                pass  # not readable by this version: compared as stored, and the difference named
        if stored != spec_json:
            raise CheckpointError(
                f"--resume: the settings differ from the {what} in {out_dir} ({json_differences(stored, spec_json)}); "
                f"pass the same flags as the original run (see its {spec_file})"
            )
        if as_written != spec_json:
            atomic_write_text(path, json.dumps(spec_json, indent=2) + "\n")  # with the settings added since
        return True
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{out_dir} already holds files; use --resume, --overwrite or another --out")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(spec_json, indent=2) + "\n")
    return False


def _as_read_back(data: Any) -> Any:
    return json.loads(json.dumps(data))  # tuples as lists, as read back from a file


def json_differences(stored: Any, current: Any, limit: int = 3) -> str:
    """The first `limit` places where two JSON values differ, as "path: stored -> current"."""
    found: list[str] = []
    absent = object()
    show = lambda x: "(absent)" if x is absent else json.dumps(x)  # noqa: E731

    def walk(a: Any, b: Any, where: str) -> None:
        if len(found) >= limit or a == b:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key, absent), b.get(key, absent), f"{where}.{key}" if where else str(key))
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{where}[{i}]")
        else:
            found.append(f"{where or 'settings'}: {show(a)} -> {show(b)}")

    walk(stored, current, "")
    return "; ".join(found)


def prepare_run_dir(
    run_dir: pathlib.Path,
    spec_json: dict[str, Any],
    resume: bool,
    overwrite: bool,
    what: str,
    normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> int:
    """`prepare_output_dir` for a directory of checkpoints and metrics rows; the number of updates
    already done. On resume, half-written and broken checkpoints are moved out of the way and the
    metrics rows past the newest intact checkpoint are dropped."""
    if not prepare_output_dir(run_dir, spec_json, resume, overwrite, what=what, normalize=normalize):
        return 0
    from rlcx_jax import logging as rlog

    remove_partial_checkpoints(run_dir)
    quarantine_broken(run_dir)
    done = latest_step(run_dir) or 0
    rlog.truncate_rows(run_dir, done)
    return done


def write_run_spec(run_dir: pathlib.Path, spec: RunSpec) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(spec.to_json(), indent=2) + "\n")


def read_run_spec(run_dir: pathlib.Path) -> RunSpec:
    path = pathlib.Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"No {CONFIG_FILE} in {run_dir}: not a run directory")
    try:
        return RunSpec.from_json(json.loads(path.read_text()))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a valid run config: {e}") from e


# ----------------------------------------------------------------------------------------------
# State checkpoints
# ----------------------------------------------------------------------------------------------
def remove_partial_checkpoints(run_dir: pathlib.Path) -> list[str]:
    """Delete checkpoints a crash left half-written (orbax's temporary directories).

    Done here, synchronously, instead of by orbax's background cleanup, so that two managers
    opened one after the other never race on the same directory.
    """
    ckpt = pathlib.Path(run_dir) / CHECKPOINT_DIR
    removed = []
    if ckpt.is_dir():
        for path in ckpt.iterdir():
            if ".orbax-checkpoint-tmp" in path.name:
                shutil.rmtree(path)
                removed.append(path.name)
    return removed


def _manager(run_dir: pathlib.Path, create: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=2, create=create, enable_async_checkpointing=False, cleanup_tmp_directories=False
    )
    return ocp.CheckpointManager(
        pathlib.Path(run_dir).absolute() / CHECKPOINT_DIR,
        options=options,
        item_handlers=ocp.StandardCheckpointHandler(),
    )


def save_state(run_dir: pathlib.Path, step: int, state: Any) -> None:
    """Save `state` as checkpoint `step` (atomic: temporary directory, then rename), then its manifest."""
    with _manager(run_dir, create=True) as mngr:
        mngr.save(step, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()
        kept = set(mngr.all_steps())
    _write_manifest(pathlib.Path(run_dir), step, kept)


def all_steps(run_dir: pathlib.Path) -> list[int]:
    """The run's checkpoint steps, newest first."""
    ckpt = pathlib.Path(run_dir) / CHECKPOINT_DIR
    if not ckpt.is_dir():
        return []
    with _manager(run_dir, create=False) as mngr:
        return sorted(mngr.all_steps(), reverse=True)


def latest_step(run_dir: pathlib.Path) -> int | None:
    steps = all_steps(run_dir)
    return steps[0] if steps else None


def _step_dir(run_dir: pathlib.Path, step: int) -> pathlib.Path:
    return pathlib.Path(run_dir) / CHECKPOINT_DIR / str(step)


def _file_digests(step_dir: pathlib.Path) -> dict[str, list[Any]]:
    """{path relative to the step directory: [bytes, SHA-256]} of every file of a checkpoint."""
    out: dict[str, list[Any]] = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out[path.relative_to(step_dir).as_posix()] = [path.stat().st_size, digest.hexdigest()]
    return out


def _write_manifest(run_dir: pathlib.Path, step: int, kept: set[int]) -> None:
    folder = run_dir / MANIFEST_DIR
    folder.mkdir(exist_ok=True)
    manifest = {"step": step, "files": _file_digests(_step_dir(run_dir, step))}
    atomic_write_text(folder / f"{step}.json", json.dumps(manifest))
    for old in folder.glob("*.json"):  # manifests of checkpoints orbax has deleted (max_to_keep)
        if old.stem.isdigit() and int(old.stem) not in kept:
            old.unlink()


def checkpoint_problem(run_dir: pathlib.Path, step: int) -> str | None:
    """What is wrong with checkpoint `step`'s files against its manifest, or None when they match
    (or when it has no manifest: written before manifests existed; orbax's own checks remain)."""
    manifest = pathlib.Path(run_dir) / MANIFEST_DIR / f"{step}.json"
    if not manifest.is_file():
        return None
    try:
        want = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"its manifest {manifest.name} is unreadable"
    step_dir = _step_dir(run_dir, step)
    for name, (size, _) in want.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} of its {size} bytes"
    got = _file_digests(step_dir)
    changed = [name for name, entry in want.items() if got[name] != entry]
    return f"{changed[0]} differs from its checksum" if changed else None


def quarantine_broken(run_dir: pathlib.Path, log: Callable[[str], None] = warn) -> list[int]:
    """Move the newest checkpoints that fail their manifest to BROKEN_DIR, down to the newest intact
    one (what `--resume` continues from); returns the steps moved."""
    moved = []
    for step in all_steps(run_dir):
        problem = checkpoint_problem(run_dir, step)
        if problem is None:
            break
        target = pathlib.Path(run_dir) / BROKEN_DIR / str(step)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(exist_ok=True)
        shutil.move(str(_step_dir(run_dir, step)), str(target))
        (pathlib.Path(run_dir) / MANIFEST_DIR / f"{step}.json").unlink(missing_ok=True)
        log(f"checkpoint {step} in {run_dir} is broken ({problem}); moved to {BROKEN_DIR}/{step}")
        moved.append(step)
    return moved


def _describe(leaf: Any) -> tuple[tuple[int, ...], str]:
    return tuple(leaf.shape), str(jnp.dtype(leaf.dtype))


def _leaves_by_path(tree: Any) -> dict[str, Any]:
    return flatten_with_paths(tree)


def _check_matches(step: int, stored: dict, expected: dict) -> None:
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing or extra:
        detail = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise CheckpointError(
            f"Checkpoint {step} does not belong to this config ({len(missing)} arrays missing, "
            f"{len(extra)} unexpected; first: {detail})"
        )
    for path, want in expected.items():
        got = stored[path]
        if hasattr(got, "shape") and _describe(got) != _describe(want):
            raise CheckpointError(
                f"Checkpoint {step} does not match the config at {path}: "
                f"stored shape/dtype {_describe(got)}, expected {_describe(want)}"
            )


def restore_state(
    run_dir: pathlib.Path,
    abstract_state: Any,
    step: int | None = None,
    fallback: bool = False,
    log: Callable[[str], None] = warn,
) -> tuple[int, Any]:
    """Restore checkpoint `step` (latest when None) into the structure of `abstract_state`.

    The checkpoint's files are checked against its manifest, and shapes and dtypes against
    `abstract_state` (built from config.json), before orbax restores it, so damage or a mismatch is
    a one-line CheckpointError naming the step. With `fallback` (and `step` None), a broken newest
    checkpoint is reported through `log` and the next older one is tried; a mismatch with the
    config is never skipped over.
    """
    steps = all_steps(run_dir) if step is None else [step]
    if not steps:
        raise CheckpointError(f"No checkpoint in {pathlib.Path(run_dir) / CHECKPOINT_DIR}")
    broken = []
    for candidate in steps:
        try:
            return candidate, _restore_verified(run_dir, abstract_state, candidate)
        except BrokenCheckpoint as e:
            if not (fallback and step is None):
                raise
            broken.append(candidate)
            older = [s for s in steps if s < candidate]
            log(f"{e}; {'falling back to checkpoint ' + str(older[0]) if older else 'no older checkpoint'}")
    raise BrokenCheckpoint(f"No intact checkpoint in {run_dir} (broken: {', '.join(map(str, broken))})")


def _restore_verified(run_dir: pathlib.Path, abstract_state: Any, step: int) -> Any:
    problem = checkpoint_problem(run_dir, step)
    if problem is not None:
        raise BrokenCheckpoint(f"Checkpoint {step} in {run_dir} is broken: {problem}")
    with _manager(run_dir, create=False) as mngr:
        try:
            stored = mngr.item_metadata(step)
        except Exception as e:  # orbax raises various types for unreadable metadata
            raise BrokenCheckpoint(f"Checkpoint {step} in {run_dir} is unreadable: {_first_line(e)}") from e
        if stored is not None:
            _check_matches(step, _leaves_by_path(stored), _leaves_by_path(abstract_state))
        try:
            return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as e:  # damaged array data: tensorstore / orbax errors of many types
            raise BrokenCheckpoint(f"Checkpoint {step} in {run_dir} is unreadable: {_first_line(e)}") from e


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


# ----------------------------------------------------------------------------------------------
# Whole runs
# ----------------------------------------------------------------------------------------------
def abstract_state(trainer: Any, run_spec: RunSpec) -> tuple[Any, tuple[Any, Any], Any]:
    """(the lowered vmapped init, its arguments, the abstract seed-batched state) of a run; traced
    once: `lowered.compile()(*arguments)` is the initial state."""
    args = _init_args(run_spec)
    lowered = jax.jit(jax.vmap(trainer.init)).lower(*args)
    return lowered, args, lowered.out_info


def _init_args(run_spec: RunSpec) -> tuple[Any, Any]:
    """The seed keys and seed-batched hyperparameters a run's vmapped `init` takes."""
    from rlcx_jax.rl.common import broadcast_tree

    keys = jax.random.split(jax.random.PRNGKey(run_spec.seed), run_spec.num_seeds)
    return keys, broadcast_tree(run_spec.hparams, run_spec.num_seeds)


def restore_run(run_dir: pathlib.Path) -> tuple[RunSpec, Any, int, Any]:
    """(run spec, trainer, checkpoint step, seed-batched state) of a run directory."""
    from rlcx_jax import rl

    run_spec = read_run_spec(run_dir)
    trainer = rl.make(run_spec.algorithm, run_spec.config)
    abstract = jax.eval_shape(jax.vmap(trainer.init), *_init_args(run_spec))  # shapes only: nothing to lower
    step, state = restore_state(run_dir, abstract, fallback=True)
    return run_spec, trainer, step, state
