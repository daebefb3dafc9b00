"""Metrics rows (`metrics.jsonl`), summary statistics and learning-curve plots.

Metrics leave jit as fixed-shape arrays (one row per `log_every` updates per seed); this module
turns them into JSON rows and pictures on the host, between chunks. It imports without jax (only
`flatten_metrics` needs it), so `rlcx plot` and the metric sinks start fast.
"""

from __future__ import annotations

import json
import pathlib
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"


def flatten_metrics(metrics: Any) -> dict[str, np.ndarray]:
    """Nested metrics dataclass -> {"episode/episode_return": array, ...} on the host."""
    import jax

    out: dict[str, np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(metrics)[0]:
        name = "/".join(str(getattr(k, "name", getattr(k, "key", k))) for k in path)
        out[name] = np.asarray(leaf)
    return out


EPISODE_COUNT = "episode_count"


def metrics_rows(metrics: Any, first_row: int, log_every: int) -> list[dict[str, Any]]:
    """Rows for `metrics.jsonl` from vmapped chunk metrics with shape (seeds, rows).

    Episode statistics of a row in which no episode finished (a sibling `episode_count` of 0) are
    missing, None (JSON null), not the 0.0 the fixed-shape metrics carry."""
    flat = flatten_metrics(metrics)
    num_seeds, num_rows = next(iter(flat.values())).shape[:2]
    counts = {k: flat[_count_key(k)] for k in flat if _count_key(k) in flat and not k.endswith(EPISODE_COUNT)}
    rows = []
    for r in range(num_rows):
        for s in range(num_seeds):
            row: dict[str, Any] = {"seed": s, "update": (first_row + r + 1) * log_every}
            for k, v in flat.items():
                missing = k in counts and counts[k][s, r] == 0
                row[k] = None if missing else float(v[s, r])
            rows.append(row)
    return rows


def _count_key(name: str) -> str:
    """The episode count beside an episode statistic: ".../episode/episode_return" -> ".../episode/episode_count"."""
    return name.rsplit("/", 1)[0] + "/" + EPISODE_COUNT if "/" in name else ""


def append_rows(run_dir: pathlib.Path, rows: Iterable[dict[str, Any]]) -> None:
    with open(pathlib.Path(run_dir) / METRICS_FILE, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_rows(run_dir: pathlib.Path) -> list[dict[str, Any]]:
    path = pathlib.Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash: everything before it is valid
                break
    return rows


def truncate_rows(run_dir: pathlib.Path, max_update: int) -> None:
    """Keep only rows up to `max_update` (used on resume, to match the restored checkpoint)."""
    from rlcx_jax.checkpoint import atomic_write_text

    rows = [r for r in read_rows(run_dir) if r["update"] <= max_update]
    atomic_write_text(pathlib.Path(run_dir) / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def forward_fill(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Along the last axis, carry the last value of a row that had episodes over rows that had none
    (a long episode can span several logging rows); NaN before the first episode."""
    values = np.asarray(values, dtype=np.float64)
    filled = np.where(np.asarray(counts) > 0, values, np.nan)
    out = np.empty_like(filled)
    last = np.full(filled.shape[:-1], np.nan)
    for i in range(filled.shape[-1]):
        last = np.where(np.isnan(filled[..., i]), last, filled[..., i])
        out[..., i] = last
    return out


def iqm(x: np.ndarray) -> float:
    """Interquartile mean (Agarwal et al. 2021): mean of the middle 50% of values."""
    x = np.asarray(x, dtype=np.float64).ravel()
    return float(_iqm_rows(x[None])[0]) if x.size else float("nan")


def _iqm_rows(x: np.ndarray) -> np.ndarray:
    """Interquartile mean of every row of a 2-D array: the mean of sorted values [floor(n/4),
    ceil(3n/4)), or of all values when that slice is empty."""
    x = np.sort(np.asarray(x, dtype=np.float64), axis=-1)
    n = x.shape[-1]
    lo, hi = int(np.floor(0.25 * n)), int(np.ceil(0.75 * n))
    if hi <= lo:
        lo, hi = 0, n
    return np.mean(x[..., lo:hi], axis=-1)


def bootstrap_ci(
    x: np.ndarray,
    statistic: str = "iqm",
    num_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(point estimate, lower, upper): percentile bootstrap confidence interval of `statistic`
    ("iqm" or "mean") over runs (Efron & Tibshirani 1993; as in Agarwal et al. 2021, rliable).

    `x` is `[runs]` (e.g. one score per seed) or `[runs, tasks]`. The bootstrap is stratified: each
    resample draws `runs` rows with replacement independently within every task column, then the
    statistic is taken over all resampled scores (so every task keeps its number of runs).
    A fixed `seed` makes the interval reproducible.
    """
    if statistic not in ("iqm", "mean"):
        raise ValueError(f"statistic must be 'iqm' or 'mean', got {statistic!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be [runs] or [runs, tasks] with runs >= 1, got shape {x.shape}")
    stat = _iqm_rows if statistic == "iqm" else (lambda v: np.mean(v, axis=-1))
    runs, tasks = x.shape
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, runs, size=(num_resamples, runs, tasks))  # stratified: per task column
    resampled = np.take_along_axis(np.broadcast_to(x, (num_resamples, runs, tasks)), idx, axis=1)
    values = stat(resampled.reshape(num_resamples, runs * tasks))
    alpha = 100.0 * (1.0 - confidence) / 2.0
    lo, hi = np.percentile(values, [alpha, 100.0 - alpha])
    return float(stat(x.reshape(1, -1))[0]), float(lo), float(hi)


def metric_curve(rows: list[dict[str, Any]], metric: str, x: str = "env_steps") -> tuple[np.ndarray, np.ndarray]:
    """(x[points], values[seeds, points]) of one metric from metrics.jsonl rows: one column per
    update (sorted), one row per seed (sorted); `x` is a row key ("env_steps") or "update".

    A missing value (None: no episode finished in that row; a count of 0 beside an episode
    statistic; no row for that seed) is NaN before the seed's first value and the last value carried
    forward after it (`forward_fill`)."""
    seeds = sorted({r["seed"] for r in rows})
    updates = sorted({r["update"] for r in rows})
    s_index = {s: i for i, s in enumerate(seeds)}
    u_index = {u: i for i, u in enumerate(updates)}
    values = np.full((len(seeds), len(updates)), np.nan)
    present = np.zeros(values.shape, dtype=bool)
    xs = np.asarray(updates, dtype=np.float64) if x == "update" else np.full(len(updates), np.nan)
    count_key = "" if metric.endswith(EPISODE_COUNT) else _count_key(metric)
    for r in rows:
        s, i = s_index[r["seed"]], u_index[r["update"]]
        value = r.get(metric)
        present[s, i] = value is not None and (count_key not in r or (r[count_key] or 0) > 0)
        values[s, i] = value if present[s, i] else np.nan
        if x != "update":
            xs[i] = r[x]
    return xs, forward_fill(values, present)


def curves_from_rows(rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(env_steps[rows], returns[seeds, rows]) forward-filled, from metrics.jsonl rows."""
    return metric_curve(rows, "episode/episode_return", "env_steps")


def plot_learning_curves(rows: list[dict[str, Any]], path: pathlib.Path, title: str) -> None:
    """Learning curve over seeds: each seed thin, mean bold, IQR shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, returns = curves_from_rows(rows)
    fig, ax = plt.subplots(figsize=(7, 4))
    for seed_curve in returns:
        ax.plot(steps, seed_curve, lw=0.6, alpha=0.4)
    with warnings.catch_warnings():  # a log point before any episode ended is all-NaN: left blank
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(returns, axis=0)
        q25, q75 = np.nanpercentile(returns, [25, 75], axis=0)
    ax.plot(steps, mean, lw=2.0, color="k", label=f"mean over {returns.shape[0]} seeds")
    ax.fill_between(steps, q25, q75, alpha=0.2, color="k", label="interquartile range")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episode return (training)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def progress_bar(unit: str = "") -> Any:
    """A rich progress bar with count, elapsed time and ETA (`unit` after the count, e.g. "updates")."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(unit)] if unit else []
    return Progress(*columns, TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False)
