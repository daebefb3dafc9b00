"""`rlcx meta METHOD`: meta-train over a task family for several seeds at once (vmapped), in chunks with
progress, metrics rows and orbax checkpoints (`--resume` continues bit-identically), then the adaptation
table of Finn et al. (2017): mean return over the fixed test tasks after 0..k policy-gradient steps,
beside the random-init baseline (the same network untrained, adapted the same way) and the oracle.

Run directory: config.json (the settings; `--resume` refuses others), metrics.jsonl (one row per seed and
logging point), checkpoints/, adaptation.json (every seed's returns per test task and step) and
summary.json (the table, timings, env steps per second).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import pathlib
import time
from typing import Any

import jax
import numpy as np

from rlcx_jax import checkpoint, xla
from rlcx_jax import logging as rlog
from rlcx_jax.configs.base import to_jsonable
from rlcx_jax.configs.meta import MetaConfig, MetaHParams
from rlcx_jax.meta.loop import MetaTrainer, eval_tasks, make_trainer
from rlcx_jax.meta.maml import MAML
from rlcx_jax.rl.common import broadcast_tree

__all__ = [
    "META_FORMAT",
    "MetaRun",
    "run_meta",
    "adaptation_summary",
    "adaptation_tables",
    "random_init_returns",
    "oracle_return",
]

META_FORMAT = 1


class MetaRunError(ValueError):
    """A one-line user error (an existing run, settings that differ on --resume)."""


@dataclasses.dataclass(frozen=True)
class MetaRun:
    """What a meta run directory is rebuilt from."""

    config: MetaConfig
    hparams: MetaHParams
    seeds: int
    seed: int
    chunk_iterations: int

    def to_json(self) -> dict[str, Any]:
        return {
            "format": META_FORMAT,
            "kind": "meta",
            "config": to_jsonable(self.config),
            "hparams": to_jsonable(self.hparams),
            "seeds": self.seeds,
            "seed": self.seed,
            "chunk_iterations": self.chunk_iterations,
        }


def _seed_inputs(run: MetaRun) -> tuple[jax.Array, MetaHParams]:
    keys = jax.random.split(jax.random.PRNGKey(run.seed), run.seeds)
    return keys, broadcast_tree(run.hparams, run.seeds)


def random_init_returns(trainer: MetaTrainer, hparams: MetaHParams, key: jax.Array) -> jax.Array:
    """The random-init baseline of one seed: an untrained policy adapted like the meta-learned ones;
    returns [tasks, steps + 1] (traceable: vmap it over seeds)."""
    init_key, eval_key = jax.random.split(key)
    params = trainer.policy_params(init_key)
    return trainer.evaluate(params, hparams, eval_key, starts_from=MAML()).returns


def adaptation_tables(
    trainer: MetaTrainer, state: Any, hparams: MetaHParams, seed: int, seeds: int
) -> tuple[np.ndarray, np.ndarray]:
    """(meta-learned, random init) returns [seeds, tasks, steps + 1] of a seed-batched final state,
    in one compiled program."""

    def tables(meta_params: Any, batched: MetaHParams, keys: jax.Array, random_keys: jax.Array) -> Any:
        trained = jax.vmap(lambda m, h, k: trainer.evaluate(m, h, k).returns)(meta_params, batched, keys)
        random = jax.vmap(lambda k: random_init_returns(trainer, hparams, k))(random_keys)
        return trained, random

    keys = jax.random.split(jax.random.PRNGKey(seed + 1), seeds)
    random_keys = jax.random.split(jax.random.PRNGKey(seed + 2), seeds)
    trained, random = jax.jit(tables)(state.meta_params, state.hparams, keys, random_keys)
    return np.asarray(trained), np.asarray(random)


def oracle_return(trainer: MetaTrainer) -> float | None:
    """Mean return of the family's analytic oracle over the test tasks, None where it has none."""
    tasks = eval_tasks(trainer.family, trainer.config.eval_tasks)
    values = [
        trainer.family.oracle_return(jax.tree.map(lambda x: x[i], tasks)) for i in range(trainer.config.eval_tasks)
    ]
    return None if any(v is None for v in values) else float(np.mean(values))


def adaptation_summary(returns: np.ndarray) -> list[dict[str, float]]:
    """Per adaptation step: the mean over tasks of each seed's returns, then the mean over seeds with a
    95% bootstrap confidence interval. `returns` is [seeds, tasks, steps + 1]."""
    per_seed = np.asarray(returns, np.float64).mean(axis=1)  # [seeds, steps + 1]
    rows = []
    for step in range(per_seed.shape[1]):
        mean, lo, hi = rlog.bootstrap_ci(per_seed[:, step], statistic="mean")
        rows.append({"step": step, "mean": mean, "ci_low": lo, "ci_high": hi})
    return rows


def run_meta(args: Any, config: MetaConfig, hparams: MetaHParams) -> dict[str, Any]:
    """Meta-train `config` / `hparams` (validated by the CLI) for `args.seeds` seeds, then evaluate."""
    started = time.perf_counter()
    trainer = make_trainer(config)
    rows_total = config.iterations // config.rows_every
    chunk_iterations = math.ceil(rows_total / min(args.chunks, rows_total)) * config.rows_every
    run = MetaRun(config, hparams, args.seeds, args.seed, chunk_iterations)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = pathlib.Path(args.out or f"runs/meta-{config.method}-{config.family}-{stamp}")
    done = checkpoint.prepare_run_dir(run_dir, run.to_json(), args.resume, args.overwrite, "meta run")

    keys, batched_hparams = _seed_inputs(run)
    init = jax.jit(jax.vmap(trainer.init))
    abstract = jax.eval_shape(init, keys, batched_hparams)
    compiled: dict[int, Any] = {}
    compile_s = 0.0

    def learn_fn(n: int) -> Any:
        nonlocal compile_s
        if n not in compiled:
            t = time.perf_counter()
            compiled[n] = xla.jit(jax.vmap(lambda s: trainer.learn(s, n))).lower(abstract).compile()
            compile_s += time.perf_counter() - t
        return compiled[n]

    if done:
        _, state = checkpoint.restore_state(run_dir, abstract, done)
    else:
        state = init(keys, batched_hparams)
    run_s = 0.0
    start_done = done
    with rlog.progress_bar("iterations") as progress:
        task = progress.add_task(
            f"{config.method} {config.family} x{args.seeds}", total=config.iterations, completed=done
        )
        while done < config.iterations:
            n = min(chunk_iterations, config.iterations - done)
            fn = learn_fn(n)
            t = time.perf_counter()
            state, metrics = fn(state)
            jax.block_until_ready(state)
            run_s += time.perf_counter() - t
            rlog.append_rows(run_dir, rlog.metrics_rows(metrics, done // config.rows_every, config.rows_every))
            done += n
            checkpoint.save_state(run_dir, done, state)
            progress.update(task, completed=done)

    # ADAPTATION TABLE: every seed's meta-learned init, and the random-init baseline
    returns, random = adaptation_tables(trainer, state, hparams, args.seed, args.seeds)
    oracle = oracle_return(trainer)
    env_steps = (done - start_done) * config.env_steps_per_iteration * args.seeds
    summary = {
        "method": config.method,
        "family": config.family,
        "seeds": args.seeds,
        "iterations": config.iterations,
        "adaptation": adaptation_summary(returns),
        "random_init": adaptation_summary(random),
        "oracle": oracle,
        "env_steps_per_second": env_steps / run_s if run_s > 0 else None,
        "compile_seconds": compile_s,
        "run_seconds": run_s,
        "wall_seconds": time.perf_counter() - started,
        "device": jax.devices()[0].device_kind,
    }
    checkpoint.atomic_write_text(
        run_dir / "adaptation.json",
        json.dumps({"returns": returns.tolist(), "random_init": random.tolist()}) + "\n",
    )
    checkpoint.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    _print_table(summary, run_dir)
    return summary


def _print_table(summary: dict[str, Any], run_dir: pathlib.Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{summary['method']} on {summary['family']}: mean return over the test tasks after k "
        f"policy-gradient steps (mean over {summary['seeds']} seeds, 95% bootstrap CI)"
    )
    table.add_column("steps k", justify="right")
    table.add_column(summary["method"], justify="right")
    table.add_column("random init", justify="right")
    for ours, rand in zip(summary["adaptation"], summary["random_init"]):
        table.add_row(
            str(ours["step"]),
            f"{ours['mean']:.1f} [{ours['ci_low']:.1f}, {ours['ci_high']:.1f}]",
            f"{rand['mean']:.1f} [{rand['ci_low']:.1f}, {rand['ci_high']:.1f}]",
        )
    console = Console()
    console.print(table)
    if summary["oracle"] is not None:
        console.print(f"oracle (straight to the goal): {summary['oracle']:.1f}")
    sps = summary["env_steps_per_second"]
    console.print(f"env steps/s (all seeds, excl. compile): {sps:,.0f}" if sps else "env steps/s: -")
    console.print(f"compile time: {summary['compile_seconds']:.1f} s; run time: {summary['run_seconds']:.1f} s")
    console.print(f"run directory: {run_dir}")
