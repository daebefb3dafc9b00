"""Metric sinks: the rows that go to `metrics.jsonl` (`logging.metrics_rows`: one dict per seed and
log point, keys "seed", "update", "env_steps", "episode/episode_return", ...; a value is a number or
None) sent to TensorBoard or Weights & Biases as well.

Both keep seeds apart, so the tools overlay them: TensorBoard gets one event directory per seed
(`RUN_DIR/tensorboard/seed_<i>`), W&B one run per seed in one group. A metric's x value is its row's
environment steps when the row holds them, else its update; None values (no episode finished in
that row) are not logged. The optional packages are imported only when a sink is made, and
`check_kinds` validates a list of sink names without importing them.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import pathlib
import urllib.parse
from collections.abc import Sequence
from typing import Any, Literal, Protocol, cast

KNOWN = ("tensorboard", "wandb")
_MODULES = {"tensorboard": "tensorboardX", "wandb": "wandb"}  # what each sink imports
INSTALL_HINT = 'pip install -e ".[log]"'
WandbMode = Literal["online", "offline", "disabled", "shared"]
WANDB_MODES = ("online", "offline", "disabled", "shared")


class MetricSink(Protocol):
    """Somewhere metric rows go besides metrics.jsonl."""

    def write(self, rows: list[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


def x_of(row: dict[str, Any]) -> tuple[str, int]:
    """(key, value) of a row's x axis: "env_steps" when the row holds them, else "update"."""
    key = "env_steps" if row.get("env_steps") is not None else "update"
    return key, int(row[key])


def _scalars(row: dict[str, Any], x_key: str) -> dict[str, float]:
    """The row's metrics to log: every present value except the seed and the x value itself."""
    return {k: float(v) for k, v in row.items() if v is not None and k not in ("seed", x_key)}


class TensorBoardSink:
    """One tensorboardX writer per seed under `run_dir/tensorboard/seed_<i>`, so TensorBoard shows
    the seeds as runs over one another; each metric key is a scalar tag at global step `x_of(row)`.

    resumed: the run continues from a checkpoint, so every event a killed run logged at or after the
    first step written now is stale; TensorBoard discards it (the writer's `purge_step`)."""

    def __init__(self, run_dir: pathlib.Path, subdir: str = "tensorboard", resumed: bool = False) -> None:
        from tensorboardX import SummaryWriter

        self._writer_cls = SummaryWriter
        self.root = pathlib.Path(run_dir) / subdir
        self.resumed = resumed
        self._writers: dict[int, Any] = {}

    def _writer(self, seed: int, step: int) -> Any:
        if seed not in self._writers:
            purge = step if self.resumed else None
            self._writers[seed] = self._writer_cls(logdir=str(self.root / f"seed_{seed}"), purge_step=purge)
        return self._writers[seed]

    def write(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            x_key, step = x_of(row)
            writer = self._writer(int(row["seed"]), step)
            for key, value in _scalars(row, x_key).items():
                writer.add_scalar(key, value, global_step=step)
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def wandb_mode() -> WandbMode:
    """$WANDB_MODE if set (ValueError if not a W&B mode); else "online" when an API key is
    configured ($WANDB_API_KEY, or the netrc entry `wandb login` writes for $WANDB_BASE_URL's host);
    else "offline"."""
    if mode := os.environ.get("WANDB_MODE"):
        if mode not in WANDB_MODES:
            raise ValueError(f"WANDB_MODE={mode!r}: expected one of {', '.join(WANDB_MODES)}")
        return cast(WandbMode, mode)
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
    try:
        return "online" if netrc.netrc().authenticators(host) else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


class WandbSink:
    """One W&B run per seed, all in one group (the W&B layout for repeated seeds: the workspace
    can group them into a mean with a spread, or show every seed). Runs are named "<group>-seed<i>"
    (group: the run directory's name by default); each gets `config` plus "seed_index". A row is one
    `log` call of its present metrics, with "env_steps" (or "update") as the charts' x axis
    (`define_metric`). Files go under `run_dir/wandb`; the mode is `wandb_mode()` unless given.
    W&B's console capture is off (it would wrap the training progress display) and its output quiet."""

    def __init__(
        self,
        run_dir: pathlib.Path,
        project: str,
        config: dict[str, Any],
        group: str | None = None,
        mode: WandbMode | None = None,
        entity: str | None = None,
    ) -> None:
        import wandb

        self._wandb = wandb
        self.run_dir = pathlib.Path(run_dir)
        self.project, self.config, self.entity = project, dict(config), entity
        self.group = group or self.run_dir.resolve().name
        self.mode = mode or wandb_mode()
        self._runs: dict[int, Any] = {}

    def _run(self, seed: int, x_key: str) -> Any:
        if seed not in self._runs:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            run = self._wandb.init(
                project=self.project,
                entity=self.entity,
                group=self.group,
                name=f"{self.group}-seed{seed}",
                config={**self.config, "seed_index": seed},
                dir=str(self.run_dir),
                mode=self.mode,
                reinit="create_new",
                settings=self._wandb.Settings(console="off", quiet=True),
            )
            run.define_metric(x_key)
            run.define_metric("*", step_metric=x_key)
            self._runs[seed] = run
        return self._runs[seed]

    def write(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            x_key, _ = x_of(row)
            self._run(int(row["seed"]), x_key).log({k: v for k, v in row.items() if k != "seed" and v is not None})

    def close(self) -> None:
        for run in self._runs.values():
            run.finish()
        self._runs.clear()


def check_kinds(kinds: Sequence[str]) -> None:
    """ValueError (one line) for an unknown sink name or a sink whose package is not installed;
    imports neither package (fast enough to run before anything compiles)."""
    for kind in kinds:
        if kind not in KNOWN:
            raise ValueError(f"unknown logger {kind!r}; known: {', '.join(KNOWN)}")
        if importlib.util.find_spec(_MODULES[kind]) is None:
            raise ValueError(f"the {kind} logger needs the {_MODULES[kind]} package: {INSTALL_HINT}")


def make_sinks(
    kinds: Sequence[str], run_dir: pathlib.Path, config: dict[str, Any], resumed: bool = False
) -> list[MetricSink]:
    """The sinks named in `kinds` (each once, in order) for a run directory; `config` (the run's
    config.json content) goes to W&B, whose project is $WANDB_PROJECT or "rlcx_jax"; `resumed`: the run
    continues from a checkpoint (TensorBoard drops what a killed run logged after it)."""
    check_kinds(kinds)
    sinks: list[MetricSink] = []
    for kind in dict.fromkeys(kinds):
        if kind == "tensorboard":
            sinks.append(TensorBoardSink(run_dir, resumed=resumed))
        else:
            sinks.append(WandbSink(run_dir, os.environ.get("WANDB_PROJECT", "rlcx_jax"), config))
    return sinks
