"""Hyperparameter sweeps: every (setting, seed) of a `SweepSpec` as one row of a jitted, vmapped
program sharded over all devices, run in chunks sized from a memory estimate.

    from rlcx_jax import sweep
    from rlcx_jax.configs.sweep import SweepSpec, parse_grid
    from rlcx_jax.rl.ppo import PPOConfig, PPOHParams

    spec = SweepSpec("ppo", PPOConfig(total_timesteps=100_000), PPOHParams(),
                     grid=(parse_grid("lr=1e-4,3e-4,1e-3"),), seeds=4)
    result = sweep.run(spec, "runs/sweep")        # result.rows: one dict per (setting, seed)

A row trains with `trainer.train(key, hparams)` and evaluates its final policy; only returns (and
the final parameters' zero fraction, which makes pruning sweeps readable) leave the device, so a
chunk's output is small whatever the network. The chunk program is compiled once: every chunk is
padded to the same number of rows (a multiple of the device count) by repeating its last row.

Run directory: `sweep.json` (the spec), `chunks/*.json` (rows of each finished chunk, written
atomically, so `resume=True` runs only the missing rows), then `results.csv` / `results.json` (one
row per setting and seed), `summary.csv` (per setting: IQM over seeds with a bootstrap interval)
and `sweep.png` (return against each swept hyperparameter). `part=(i, n)` runs only the settings
s with s % n == i, for n independent jobs (Slurm array, Ray tasks) whose directories `merge` joins.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlcx_jax import logging as rlog
from rlcx_jax import rl, shard, xla
from rlcx_jax.checkpoint import RunSpec, atomic_write_text, prepare_output_dir
from rlcx_jax.configs.sweep import Axis, SweepSpec
from rlcx_jax.rl.common import Trainer
from rlcx_jax.rl.evaluate import default_greedy, make_evaluator

__all__ = [
    "RowOutput",
    "SweepResult",
    "run",
    "merge",
    "spec_to_json",
    "spec_from_json",
    "rows_fn",
    "memory_budget",
    "plot",
]

SPEC_FILE = "sweep.json"
CHUNKS_DIR = "chunks"
RESULTS_CSV, RESULTS_JSON, SUMMARY_CSV, PLOT_FILE = "results.csv", "results.json", "summary.csv", "sweep.png"
SPEC_FORMAT = 1
EVAL_SEED_OFFSET = 10_000
"""Evaluation keys: seed i evaluates with split(PRNGKey(seed + 10_000), seeds)[i], as `rlcx train` does."""
MEMORY_FRACTION = {"gpu": 0.8, "tpu": 0.8, "cpu": 0.5}
"""Share of a device's free memory an automatically sized chunk may use."""


@struct.dataclass
class RowOutput:
    """What one (setting, seed) row brings back from the device."""

    eval_returns: jax.Array
    """[eval_episodes] returns of the final policy."""
    train_return: jax.Array
    """[metric rows] mean training episode return of each metrics row."""
    train_count: jax.Array
    """[metric rows] episodes that finished in each metrics row."""
    zero_fraction: jax.Array
    """Fraction of the final parameters that are exactly zero (pruning)."""


@dataclasses.dataclass
class SweepResult:
    """The sweep, its rows (one per setting and seed), the per-setting summary, and timings."""

    spec: SweepSpec
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    timing: dict[str, Any]
    out_dir: pathlib.Path | None


# ----------------------------------------------------------------------------------------------
# The program
# ----------------------------------------------------------------------------------------------
def _episode_leaf(metrics: Any, name: str) -> jax.Array:
    for path, leaf in jax.tree_util.tree_flatten_with_path(metrics)[0]:
        keys = [str(getattr(k, "name", getattr(k, "key", k))) for k in path]
        if keys[-2:] == ["episode", name]:
            return leaf
    raise ValueError(f"the metrics have no episode/{name}")


def rows_fn(trainer: Trainer, algorithm: str, eval_episodes: int) -> Callable[..., RowOutput]:
    """`rows(train_keys, eval_keys, hparams) -> RowOutput`, vmapped over a leading row axis."""
    evaluator = make_evaluator(trainer, eval_episodes, default_greedy(algorithm))

    def one(train_key: jax.Array, eval_key: jax.Array, hparams: Any) -> RowOutput:
        out = trainer.train(train_key, hparams)
        leaves = jax.tree.leaves(out.state.params)
        zeros = sum(jnp.sum(x == 0) for x in leaves) / sum(x.size for x in leaves)
        return RowOutput(
            eval_returns=evaluator(out.state.params, out.state.obs_stats, eval_key),
            train_return=_episode_leaf(out.metrics, "episode_return"),
            train_count=_episode_leaf(out.metrics, "episode_count"),
            zero_fraction=zeros,
        )

    return jax.vmap(one)


def row_inputs(spec: SweepSpec, settings: Sequence[Any], rows: Sequence[tuple[int, int]]) -> tuple[Any, Any, Any]:
    """(train keys, eval keys, hyperparameters) of `rows` ((setting, seed) pairs), host arrays with a
    leading row axis; the keys of seed i are those of `rlcx train --seed SEED --seeds SEEDS`."""
    train = np.asarray(jax.random.split(jax.random.PRNGKey(spec.seed), spec.seeds))
    evals = np.asarray(jax.random.split(jax.random.PRNGKey(spec.seed + EVAL_SEED_OFFSET), spec.seeds))
    seeds = np.array([seed for _, seed in rows])
    per_row = [settings[s] for s, _ in rows]
    hparams = jax.tree.map(lambda *xs: np.stack([np.asarray(jnp.asarray(x)) for x in xs]), *per_row)
    return train[seeds], evals[seeds], hparams


def memory_budget(mesh: Mesh) -> int | None:
    """Bytes a chunk may use on each device of `mesh`: a share of the device's free memory (GPU/TPU:
    its allocator's limit less what is in use; CPU: the host's available memory shared by the local
    devices). None when unknown."""
    device = mesh.devices.flat[0]
    fraction = MEMORY_FRACTION.get(device.platform, 0.5)
    try:
        stats = device.memory_stats()
    except Exception:  # some backends do not implement it
        stats = None
    if stats and "bytes_limit" in stats:
        return int(fraction * stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
    return int(fraction * available / max(jax.local_device_count(), 1))


def _program_bytes(compiled: Any) -> int | None:
    """Bytes one device needs to run `compiled` (arguments + outputs + temporaries), if XLA says."""
    try:
        stats = compiled.memory_analysis()
    except Exception:
        return None
    if stats is None:
        return None
    return int(
        stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes - stats.alias_size_in_bytes
    )


@dataclasses.dataclass
class ChunkPlan:
    compiled: Any
    rows: int
    """Rows per call (a multiple of the mesh size)."""
    bytes_per_device: int | None
    budget_per_device: int | None
    compile_s: float


_COMPILED: dict[tuple[Any, ...], Any] = {}
"""Compiled chunk programs of this process, by (program key, rows, devices): a second sweep with the
same static config (other values, other seeds, a resumed part) compiles nothing."""


def plan_chunks(
    fn: Callable[..., Any],
    example: tuple[Any, ...],
    total_rows: int,
    mesh: Mesh,
    chunk_size: int | None,
    program_key: tuple[Any, ...] | None = None,
) -> ChunkPlan:
    """Compile `fn` for the chunk size: `chunk_size` rows when given, else all rows if XLA's memory
    analysis of that program fits `memory_budget`, else as many rows as fit (rows scale the buffers
    linearly). Rows are rounded up to a multiple of the mesh size. With `program_key` (hashable, the
    same exactly when `fn` computes the same), compiled programs are reused within the process."""
    sharding = NamedSharding(mesh, PartitionSpec(shard.AXIS))
    jitted = xla.jit(fn, in_shardings=sharding, out_shardings=sharding)

    def compile_for(rows: int) -> Any:
        leaves, treedef = jax.tree.flatten(example)
        signature = (treedef, tuple((np.shape(x)[1:], np.asarray(x).dtype.str) for x in leaves))
        key = None if program_key is None else (program_key, signature, rows, tuple(mesh.device_ids.flat))
        if key in _COMPILED:
            return _COMPILED[key]
        shaped = lambda x: jax.ShapeDtypeStruct((rows, *np.shape(x)[1:]), x.dtype, sharding=sharding)
        abstract = jax.tree.map(shaped, example)
        compiled = jitted.lower(*abstract).compile()
        if key is not None:
            _COMPILED[key] = compiled
        return compiled

    started = time.perf_counter()
    budget = memory_budget(mesh)
    rows = shard.padded_size(min(chunk_size or total_rows, total_rows), mesh.size)
    compiled = compile_for(rows)
    need = _program_bytes(compiled)
    if chunk_size is None and need is not None and budget is not None and need > budget:
        per_row = need / (rows // mesh.size)
        fit = max(int(budget // per_row), 1)
        rows = fit * mesh.size
        compiled = compile_for(rows)
        need = _program_bytes(compiled)
    return ChunkPlan(compiled, rows, need, budget, time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------
# Rows, tables, plots
# ----------------------------------------------------------------------------------------------
def _last_finished(returns: np.ndarray, counts: np.ndarray) -> float:
    finished = np.nonzero(counts > 0)[0]
    return float(returns[finished[-1]]) if finished.size else float("nan")


def tidy_rows(
    spec: SweepSpec, values: Sequence[dict[str, float]], rows: Sequence[tuple[int, int]], out: RowOutput
) -> list[dict[str, Any]]:
    """One dict per (setting, seed): swept values, evaluation returns, last training return."""
    env_steps = spec.config.num_updates * spec.config.steps_per_update
    table = []
    for i, (setting, seed) in enumerate(rows):
        episodes = np.asarray(out.eval_returns[i], dtype=np.float64)
        table.append(
            {
                "setting": setting,
                "seed": seed,
                **values[setting],
                "return_mean": float(episodes.mean()),
                "return_iqm": rlog.iqm(episodes),
                "return_min": float(episodes.min()),
                "train_return": _last_finished(np.asarray(out.train_return[i]), np.asarray(out.train_count[i])),
                "zero_fraction": float(out.zero_fraction[i]),
                "env_steps": env_steps,
            }
        )
    return table


def summarize(
    spec: SweepSpec, values: Sequence[dict[str, float]], rows: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per setting: IQM over seeds of the evaluation return with a 95% bootstrap interval, mean, min."""
    by_setting: dict[int, list[float]] = {}
    for row in rows:
        by_setting.setdefault(row["setting"], []).append(row["return_mean"])
    summary = []
    for setting, returns in sorted(by_setting.items()):
        point, low, high = rlog.bootstrap_ci(np.asarray(returns), "iqm", seed=spec.seed)
        summary.append(
            {
                "setting": setting,
                **values[setting],
                "seeds": len(returns),
                "return_iqm": point,
                "ci_low": low,
                "ci_high": high,
                "return_mean": float(np.mean(returns)),
                "return_min": float(np.min(returns)),
            }
        )
    return summary


def _write_csv(path: pathlib.Path, rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["setting"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _log_axis(axis: Axis, xs: np.ndarray) -> bool:
    if axis.is_random:
        return axis.distribution == "loguniform"
    return bool(np.all(xs > 0) and xs.max() / xs.min() >= 10)


def plot(
    spec: SweepSpec, rows: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]], path: pathlib.Path
) -> None:
    """Return against each swept hyperparameter: every seed (dots), every setting's IQM over seeds
    (circles), and for grid axes the best setting's IQM at each value (line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = spec.axes
    fig, panels = plt.subplots(1, len(axes), figsize=(4.2 * len(axes), 3.6), squeeze=False, sharey=True)
    for axis, ax in zip(axes, panels[0]):
        xs = np.array([r[axis.name] for r in rows])
        ax.scatter(xs, [r["return_mean"] for r in rows], s=8, alpha=0.35, color="tab:blue", label="seed")
        sx = np.array([s[axis.name] for s in summary])
        ax.scatter(sx, [s["return_iqm"] for s in summary], s=28, facecolors="none", color="k", label="setting IQM")
        if not axis.is_random:
            present = [v for v in axis.values if v in set(sx)]
            best = [max(s["return_iqm"] for s in summary if s[axis.name] == v) for v in present]
            ax.plot(present, best, color="tab:red", lw=1.5, label="best setting")
        if _log_axis(axis, sx):
            ax.set_xscale("log")
        ax.set_xlabel(axis.name)
        ax.grid(alpha=0.3)
    panels[0][0].set_ylabel(f"final return ({spec.eval_episodes} eval episodes)")
    panels[0][0].legend(fontsize=7)
    fig.suptitle(f"{spec.algorithm} {spec.config.env}: {spec.num_settings} settings x {spec.seeds} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Run directories
# ----------------------------------------------------------------------------------------------
def spec_to_json(spec: SweepSpec, part: tuple[int, int] | None = None) -> dict[str, Any]:
    run = RunSpec(spec.algorithm, spec.config, spec.hparams, spec.seeds, spec.seed, 0).to_json()
    return {
        "format": SPEC_FORMAT,
        "run": run,
        "grid": [dataclasses.asdict(a) for a in spec.grid],
        "random": [dataclasses.asdict(a) for a in spec.random],
        "samples": spec.samples,
        "eval_episodes": spec.eval_episodes,
        "part": list(part) if part else None,
        "settings": spec.setting_values(),
    }


def spec_from_json(data: dict[str, Any]) -> tuple[SweepSpec, tuple[int, int] | None]:
    if data.get("format") != SPEC_FORMAT:
        raise ValueError(f"{SPEC_FILE} has format {data.get('format')}; this version reads {SPEC_FORMAT}")
    run = RunSpec.from_json(data["run"])

    def axes(items: list[dict[str, Any]]) -> tuple[Axis, ...]:
        return tuple(Axis(**{**a, "values": tuple(a["values"])}) for a in items)

    spec = SweepSpec(
        algorithm=run.algorithm,
        config=run.config,
        hparams=run.hparams,
        grid=axes(data["grid"]),
        random=axes(data["random"]),
        samples=int(data["samples"]),
        seeds=run.num_seeds,
        seed=run.seed,
        eval_episodes=int(data["eval_episodes"]),
    )
    part = (int(data["part"][0]), int(data["part"][1])) if data.get("part") else None
    return spec, part


def _same_sweep(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return {**a, "part": None} == {**b, "part": None}


def _read_spec(out_dir: pathlib.Path) -> dict[str, Any]:
    path = out_dir / SPEC_FILE
    if not path.is_file():
        raise ValueError(f"{out_dir} holds no sweep ({SPEC_FILE} missing)")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def read_chunk_rows(out_dir: pathlib.Path) -> list[dict[str, Any]]:
    """Every row of every finished chunk in `out_dir` (a half-written chunk never has its final name)."""
    rows: list[dict[str, Any]] = []
    for path in sorted((out_dir / CHUNKS_DIR).glob("*.json")):
        rows += json.loads(path.read_text())["rows"]
    return rows


def _prepare(out_dir: pathlib.Path, spec_json: dict[str, Any], resume: bool, overwrite: bool) -> None:
    prepare_output_dir(
        out_dir, spec_json, resume, overwrite, spec_file=SPEC_FILE, what="sweep", resume_needs_spec=False
    )
    (out_dir / CHUNKS_DIR).mkdir(parents=True, exist_ok=True)


def finish(
    spec: SweepSpec, rows: list[dict[str, Any]], timing: dict[str, Any], out_dir: pathlib.Path | None
) -> SweepResult:
    """Sort the rows, summarise per setting, and write the tables and the plot to `out_dir`."""
    rows = sorted(rows, key=lambda r: (r["setting"], r["seed"]))
    values = spec.setting_values()
    summary = summarize(spec, values, rows)
    if out_dir is not None and jax.process_index() == 0:
        _write_csv(out_dir / RESULTS_CSV, rows)
        _write_csv(out_dir / SUMMARY_CSV, summary)
        payload = {"sweep": _read_spec(out_dir), "timing": timing, "rows": rows, "summary": summary}
        atomic_write_text(out_dir / RESULTS_JSON, json.dumps(payload, indent=1))
        if rows:
            plot(spec, rows, summary, out_dir / PLOT_FILE)
    return SweepResult(spec, rows, summary, timing, out_dir)


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------
def part_rows(spec: SweepSpec, part: tuple[int, int] | None) -> list[tuple[int, int]]:
    """The (setting, seed) rows of `part` (settings s with s % n == i), setting-major."""
    index, count = part or (0, 1)
    return [(s, k) for s in range(spec.num_settings) if s % count == index for k in range(spec.seeds)]


def run(
    spec: SweepSpec,
    out_dir: str | pathlib.Path | None = None,
    *,
    chunk_size: int | None = None,
    part: tuple[int, int] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    mesh: Mesh | None = None,
    progress: bool = True,
    on_chunk: Callable[[int, int], None] | None = None,
) -> SweepResult:
    """Train and evaluate every row of `spec` (of `part`), `chunk_size` rows per call (None: from a
    memory estimate), sharded over `mesh` (default: every device of every process).

    With `out_dir`, finished chunks are kept there and `resume=True` runs only the missing rows.
    `on_chunk(done_rows, total_rows)` is called after each chunk."""
    spec.validate()
    values = spec.setting_values()
    out = pathlib.Path(out_dir) if out_dir is not None else None
    spec_json = spec_to_json(spec, part)
    if out is not None and jax.process_index() == 0:
        _prepare(out, spec_json, resume, overwrite)
    done_rows = read_chunk_rows(out) if out is not None and resume else []
    done = {(r["setting"], r["seed"]) for r in done_rows}
    todo = [row for row in part_rows(spec, part) if row not in done]
    timing: dict[str, Any] = {"rows": len(todo), "devices": 0, "compile_s": 0.0, "run_s": 0.0}
    if todo:
        timing.update(_run_rows(spec, values, todo, out, mesh or shard.run_mesh(), chunk_size, progress, on_chunk))
        done_rows += timing.pop("table")
    return finish(spec, done_rows, timing, out)


def _run_rows(
    spec: SweepSpec,
    values: Sequence[dict[str, float]],
    todo: Sequence[tuple[int, int]],
    out: pathlib.Path | None,
    mesh: Mesh,
    chunk_size: int | None,
    progress: bool,
    on_chunk: Callable[[int, int], None] | None,
) -> dict[str, Any]:
    trainer = rl.make(spec.algorithm, spec.config)
    settings = [spec.setting(v) for v in values]
    fn = rows_fn(trainer, spec.algorithm, spec.eval_episodes)
    program = (spec.algorithm, spec.config, spec.eval_episodes)
    plan = plan_chunks(fn, row_inputs(spec, settings, todo[:1]), len(todo), mesh, chunk_size, program)
    chunks = [todo[i : i + plan.rows] for i in range(0, len(todo), plan.rows)]
    table: list[dict[str, Any]] = []
    run_s = 0.0
    show = progress and jax.process_index() == 0
    with _progress(show, f"{spec.algorithm} {spec.config.env}: {len(todo)} runs", len(todo)) as advance:
        for rows in chunks:
            inputs = shard.pad_rows(row_inputs(spec, settings, rows), plan.rows)
            started = time.perf_counter()
            result = shard.gather(plan.compiled(*shard.place(inputs, mesh)))
            run_s += time.perf_counter() - started
            chunk_table = tidy_rows(spec, values, rows, jax.tree.map(lambda x: x[: len(rows)], result))
            if out is not None and jax.process_index() == 0:
                first, last = rows[0], rows[-1]
                name = f"rows-s{first[0]:05d}k{first[1]:03d}-s{last[0]:05d}k{last[1]:03d}.json"
                atomic_write_text(out / CHUNKS_DIR / name, json.dumps({"rows": chunk_table}))
            table += chunk_table
            advance(len(rows))
            if on_chunk is not None:
                on_chunk(len(table), len(todo))
    env_steps = len(todo) * spec.config.num_updates * spec.config.steps_per_update
    return {
        "table": table,
        "devices": mesh.size,
        "chunk_rows": plan.rows,
        "chunks": len(chunks),
        "bytes_per_device": plan.bytes_per_device,
        "budget_per_device": plan.budget_per_device,
        "compile_s": plan.compile_s,
        "run_s": run_s,
        "env_steps": env_steps,
        "env_steps_per_s": env_steps / run_s if run_s > 0 else float("nan"),
    }


class _progress:
    """A rich progress bar over rows (with ETA) when `show`, else nothing; yields `advance(n)`."""

    def __init__(self, show: bool, title: str, total: int) -> None:
        self.show, self.title, self.total = show, title, total

    def __enter__(self) -> Callable[[int], None]:
        if not self.show:
            return lambda n: None
        self.bar = rlog.progress_bar()
        self.bar.__enter__()
        task = self.bar.add_task(self.title, total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: Any) -> None:
        if self.show:
            self.bar.__exit__(*exc)


# ----------------------------------------------------------------------------------------------
# Independent parts: merge
# ----------------------------------------------------------------------------------------------
def merge(part_dirs: Sequence[str | pathlib.Path], out_dir: str | pathlib.Path, overwrite: bool = False) -> SweepResult:
    """Join the run directories of one sweep's parts (`part=(i, n)`, any engine) into `out_dir`:
    the specs must agree, and every (setting, seed) must be there exactly once."""
    dirs = [pathlib.Path(d) for d in part_dirs]
    if not dirs:
        raise ValueError("sweep-merge needs at least one part directory")
    specs = [_read_spec(d) for d in dirs]
    for d, s in zip(dirs[1:], specs[1:]):
        if not _same_sweep(specs[0], s):
            raise ValueError(f"{d} holds a different sweep than {dirs[0]} (compare their {SPEC_FILE})")
    spec, _ = spec_from_json(specs[0])
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for d in dirs:
        for row in read_chunk_rows(d):
            key = (row["setting"], row["seed"])
            if key in rows:
                raise ValueError(f"setting {key[0]} seed {key[1]} is in more than one part ({d})")
            rows[key] = row
    missing = [row for row in part_rows(spec, None) if row not in rows]
    if missing:
        first = f"setting {missing[0][0]} seed {missing[0][1]}"
        raise ValueError(
            f"{len(missing)} of {spec.num_rows} runs are missing (first: {first}); finish every part first"
        )
    out = pathlib.Path(out_dir)
    _prepare(out, {**specs[0], "part": None}, resume=False, overwrite=overwrite)
    ordered = [rows[key] for key in sorted(rows)]
    atomic_write_text(out / CHUNKS_DIR / "merged.json", json.dumps({"rows": ordered}))
    return finish(spec, ordered, {"merged_from": [str(d) for d in dirs]}, out)


def top_settings(summary: Sequence[dict[str, Any]], n: int = 10) -> list[dict[str, Any]]:
    """The `n` settings with the highest IQM over seeds (ties broken by the mean, then the minimum)."""

    def rank(s: dict[str, Any]) -> tuple[float, ...]:
        return tuple(-s[k] if math.isfinite(s[k]) else math.inf for k in ("return_iqm", "return_mean", "return_min"))

    return sorted(summary, key=rank)[:n]


def run_with_ray(
    spec: SweepSpec,
    out_dir: str | pathlib.Path,
    num_parts: int,
    *,
    chunk_size: int | None = None,
    address: str | None = None,
    num_gpus_per_part: float = 0,
    overwrite: bool = False,
) -> SweepResult:
    """The sweep as `num_parts` Ray tasks (`part=(i, num_parts)`, each in `out_dir/part-i`, each its
    own process with its own devices), merged into `out_dir` when all are done. `address`: an
    existing cluster (`ray start --head` on one machine, `ray start --address ...` on the others),
    None for the running one or a new local one. Ray is optional: `pip install -e ".[ray]"`."""
    import ray

    spec.validate()
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    if not ray.is_initialized():
        ray.init(address=address)
    out = pathlib.Path(out_dir)
    if overwrite and out.exists():
        import shutil

        shutil.rmtree(out)

    @ray.remote(num_gpus=num_gpus_per_part)
    def part_task(index: int) -> str:
        where = out / f"part-{index}"
        run(spec, where, chunk_size=chunk_size, part=(index, num_parts), resume=where.is_dir(), progress=False)
        return str(where)

    dirs = ray.get([part_task.remote(i) for i in range(num_parts)])
    return merge(dirs, out / "merged", overwrite=True)
