"""`rlcx plot RUN [RUN ...]`: the learning curves of several runs overlaid on one axes.

Each run is drawn as the interquartile mean (IQM) over its seeds at every log point, with a
percentile-bootstrap confidence band over seeds (Agarwal et al. 2021, "Deep RL at the edge of the
statistical precipice"). Every run keeps its own x grid (environment steps when the rows hold them,
else updates), so runs logged at different points still overlay correctly. Reads only
`metrics.jsonl` (and `config.json` for the legend); imports neither jax nor the training code.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import warnings
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import numpy as np
import tyro

from rlcx_jax import logging as rlog

DEFAULT_METRIC = "episode/episode_return"
X_KEYS = ("env_steps", "update")
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")
CONFIG_FILE = "config.json"  # checkpoint.CONFIG_FILE (not imported: checkpoint imports jax)
_NOT_METRICS = ("seed", "update", "env_steps")
_CHUNK_ELEMENTS = 1 << 22  # bootstrap resamples are built this many values at a time


def nan_iqm(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Interquartile mean along `axis` over the non-NaN values only: the mean of the sorted values
    [floor(n/4), ceil(3n/4)) of the n present ones (as `logging.iqm`); NaN where none is present."""
    x = np.sort(np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1), axis=-1)  # NaN sorts last
    n = np.sum(~np.isnan(x), axis=-1)
    lo, hi = n // 4, (3 * n + 3) // 4
    k = np.arange(x.shape[-1])
    keep = (k >= lo[..., None]) & (k < hi[..., None])
    with np.errstate(invalid="ignore"):  # n == 0: 0 / 0 -> NaN
        return np.where(keep, x, 0.0).sum(axis=-1) / (hi - lo)


def iqm_band(
    values: np.ndarray, num_resamples: int = 500, confidence: float = 0.95, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(IQM, lower, upper), each [points], of `values[seeds, points]` (NaN: no value yet).

    Percentile bootstrap over seeds: a resample draws whole seed curves with replacement (the same
    draws at every point) and takes the IQM of the present values. A point where every seed has a
    value therefore gets exactly `logging.bootstrap_ci(values[:, p], "iqm", num_resamples,
    confidence, seed)`; a point where no resampled seed has one gets no band (NaN)."""
    values = np.asarray(values, dtype=np.float64)
    num_seeds, num_points = values.shape
    idx = np.random.default_rng(seed).integers(0, num_seeds, size=(num_resamples, num_seeds))
    stats = np.empty((num_resamples, num_points))
    step = max(1, _CHUNK_ELEMENTS // max(1, num_resamples * num_seeds))
    for start in range(0, num_points, step):
        stats[:, start : start + step] = nan_iqm(values[idx, start : start + step], axis=1)
    alpha = 100.0 * (1.0 - confidence) / 2.0
    with warnings.catch_warnings():  # all-NaN columns (before any episode ended): no band
        warnings.simplefilter("ignore", RuntimeWarning)
        lower, upper = np.nanpercentile(stats, [alpha, 100.0 - alpha], axis=0)
    return nan_iqm(values, axis=0), lower, upper


@dataclasses.dataclass(frozen=True)
class RunCurve:
    """One run's curve: IQM over seeds and its bootstrap band at each of its own log points."""

    run_dir: pathlib.Path
    label: str
    x: np.ndarray  # [points]
    values: np.ndarray  # [seeds, points], forward-filled (logging.metric_curve)
    iqm: np.ndarray  # [points]
    lower: np.ndarray  # [points]
    upper: np.ndarray  # [points]

    def summary(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "label": self.label,
            "seeds": int(self.values.shape[0]),
            "points": int(self.x.size),
            "final_x": float(self.x[-1]),
            "final_iqm": float(self.iqm[-1]),
            "final_ci": [float(self.lower[-1]), float(self.upper[-1])],
        }


def default_label(run_dir: pathlib.Path) -> str:
    """The run directory's name, plus "(algorithm on env)" when its config.json says so."""
    run_dir = pathlib.Path(run_dir)
    name = run_dir.resolve().name
    try:
        data = json.loads((run_dir / CONFIG_FILE).read_text())
        return f"{name} ({data['algorithm']} on {data['config']['env']})"
    except (OSError, ValueError, KeyError, TypeError):
        return name


def _read_run(run_dir: pathlib.Path, metric: str) -> list[dict[str, Any]]:
    """The rows of one run, or ValueError (one line) when the run or the metric is missing."""
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: not a directory")
    if not (run_dir / rlog.METRICS_FILE).is_file():
        raise ValueError(f"{run_dir}: no {rlog.METRICS_FILE} (not a run directory)")
    rows = rlog.read_rows(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}/{rlog.METRICS_FILE} holds no rows")
    if not all(isinstance(r, dict) and "seed" in r and "update" in r for r in rows):
        raise ValueError(f"{run_dir}/{rlog.METRICS_FILE}: a row without seed and update (not written by rlcx)")
    if not any(metric in r for r in rows):
        available = sorted({k for r in rows for k in r} - set(_NOT_METRICS))
        raise ValueError(f"unknown metric {metric!r} in {run_dir}; available: {', '.join(available)}")
    return rows


def _check_out(out: pathlib.Path) -> None:
    if out.suffix.lower() not in FIGURE_SUFFIXES:
        raise ValueError(f"--out {out}: the figure file must end in {', '.join(FIGURE_SUFFIXES)}")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: directory {out.parent} does not exist")


def plot_runs(
    run_dirs: Sequence[pathlib.Path],
    out: pathlib.Path,
    metric: str = DEFAULT_METRIC,
    labels: Sequence[str] | None = None,
    x: str = "env_steps",
    num_resamples: int = 500,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Overlay the runs' IQM curves of `metric` with bootstrap bands in one figure at `out`.

    `x="env_steps"` uses environment steps (per seed) when every run's rows hold them, and updates
    otherwise; `x="update"` always uses updates. Labels default to `default_label`. Returns
    {"out", "metric", "x", "runs": [per run: run_dir, label, seeds, points, final_x, final_iqm,
    final_ci]}, "final" being the last log point. Bad input raises ValueError (one line)."""
    run_dirs = [pathlib.Path(d) for d in run_dirs]
    out = pathlib.Path(out)
    if not run_dirs:
        raise ValueError("no run directories given")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs: give one --label per run or none")
    if x not in X_KEYS:
        raise ValueError(f"x must be one of {', '.join(X_KEYS)}, got {x!r}")
    _check_out(out)
    all_rows = [_read_run(d, metric) for d in run_dirs]
    if x == "env_steps" and any(r.get("env_steps") is None for rows in all_rows for r in rows):
        x = "update"
    names = list(labels) if labels is not None else [default_label(d) for d in run_dirs]
    curves = []
    for run_dir, label, rows in zip(run_dirs, names, all_rows):
        xs, values = rlog.metric_curve(rows, metric, x)
        band = iqm_band(values, num_resamples, confidence, seed)
        curves.append(RunCurve(run_dir, label, xs, values, *band))
    _draw(curves, out, metric, x, confidence)
    return {"out": str(out), "metric": metric, "x": x, "runs": [c.summary() for c in curves]}


def _draw(curves: list[RunCurve], out: pathlib.Path, metric: str, x: str, confidence: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for c in curves:
        (line,) = ax.plot(c.x, c.iqm, lw=1.8, label=f"{c.label}, {c.values.shape[0]} seeds")
        has_band = np.isfinite(c.lower) & np.isfinite(c.upper)
        ax.fill_between(c.x, c.lower, c.upper, where=has_band, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("environment steps (per seed)" if x == "env_steps" else "updates")
    ax.set_ylabel(metric)
    ax.set_title(f"IQM over seeds, {100 * confidence:g}% bootstrap CI")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


@dataclasses.dataclass(frozen=True)
class PlotArgs:
    runs: Annotated[tuple[str, ...], tyro.conf.Positional, tyro.conf.arg(metavar="RUN [RUN ...]")] = ()
    """Run directories (each with a metrics.jsonl)."""
    out: str = "learning_curves.png"
    """Figure file (.png, .pdf or .svg) in an existing directory."""
    metric: str = DEFAULT_METRIC
    """The metrics.jsonl key to plot."""
    label: tyro.conf.UseAppendAction[tuple[str, ...]] = ()
    """Legend label of each run, in order (repeat the flag; default: directory name, algorithm, env)."""
    x: Literal["env_steps", "update"] = "env_steps"
    """x axis: environment steps (updates when a run lacks them) or updates."""


def run_plot(argv: Sequence[str]) -> dict[str, Any]:
    """`rlcx plot RUN [RUN ...] [--out FILE.png] [--metric NAME] [--label A --label B]`."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    args = tyro.cli(PlotArgs, args=list(argv), prog="rlcx plot")
    summary = plot_runs(
        [pathlib.Path(r) for r in args.runs],
        pathlib.Path(args.out),
        metric=args.metric,
        labels=list(args.label) or None,
        x=args.x,
    )
    x_name = "env steps" if summary["x"] == "env_steps" else "updates"
    table = Table(title=f"{summary['metric']}: final IQM over seeds [95% bootstrap CI]")
    for column in ("run", "seeds", f"at {x_name}", "IQM [CI]"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for r in summary["runs"]:
        lo, hi = r["final_ci"]
        final = f"{r['final_iqm']:.4g} [{lo:.4g}, {hi:.4g}]"
        table.add_row(escape(r["label"]), str(r["seeds"]), f"{r['final_x']:g}", final)
    console = Console()
    console.print(f"figure: {summary['out']}", markup=False, highlight=False, soft_wrap=True)
    console.print(table)
    return summary
