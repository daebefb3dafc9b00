"""What the `rlcx` commands run once their flags have been parsed and validated (`rlcx_jax.cli`):
training in chunks with progress, checkpoints and a final evaluation; evaluation of a run;
post-training compression; the pipeline; meta-learning (`workflows.meta_run.run_meta`). This module
imports jax; the CLI imports it only after every check that needs no jax has passed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np

from rlcx_jax import checkpoint, envs, loggers, nets, rl, xla
from rlcx_jax import logging as rlog
from rlcx_jax.cli import CLIError, compile_cache_dir
from rlcx_jax.configs.compress import CompressOptions
from rlcx_jax.configs.pipeline import Recipe
from rlcx_jax.nets.policy import AGREEMENT_TOLERANCE, agreement_label
from rlcx_jax.rl.common import fused_products, vmap_learn
from rlcx_jax.rl.evaluate import default_greedy, make_evaluator
from rlcx_jax.workflows import meta_run, pipeline
from rlcx_jax.workflows.compress_run import compress_run


def enable_compile_cache(setting: str = "") -> pathlib.Path | None:
    """Turn on JAX's persistent compilation cache for this process (every program, however fast it
    compiled); returns its directory, None when off or not creatable."""
    path = compile_cache_dir(setting)
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"rlcx: note: compilation cache off ({path}: {e.strerror})", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def evaluate_states(trainer: Any, algorithm: str, state: Any, num_episodes: int, seed: int) -> np.ndarray:
    """Returns (seeds, episodes) of every seed's final policy."""
    evaluator = make_evaluator(trainer, num_episodes, default_greedy(algorithm))
    n = jax.tree.leaves(state.params)[0].shape[0]
    keys = jax.random.split(jax.random.PRNGKey(seed + 10_000), n)
    return np.asarray(jax.jit(jax.vmap(evaluator))(state.params, state.obs_stats, keys))


def _print_table(title: str, returns: np.ndarray, extra: dict[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("seed", justify="right")
    table.add_column("mean return", justify="right")
    table.add_column("min", justify="right")
    table.add_column("max", justify="right")
    for s, r in enumerate(returns):
        table.add_row(str(s), f"{r.mean():.1f}", f"{r.min():.1f}", f"{r.max():.1f}")
    per_seed = returns.mean(axis=1)
    table.add_row("mean", f"{per_seed.mean():.1f}", f"{per_seed.min():.1f}", f"{per_seed.max():.1f}", end_section=True)
    table.add_row("IQM", f"{rlog.iqm(per_seed):.1f}", "", "")
    console = Console()
    console.print(table)
    for k, v in extra.items():
        console.print(f"{k}: {v}")


def _stored_spec_now(stored: dict[str, Any]) -> dict[str, Any]:
    """A run directory's stored settings as this version writes them (settings added since filled in
    with their defaults), for the --resume comparison."""
    return checkpoint.RunSpec.from_json(stored).to_json()


def run_train(algorithm: str, args: Any, config: Any, hparams: Any, note: str | None = None) -> dict[str, Any]:
    """Train `config` / `hparams` (validated by the CLI) for `args.seeds` seeds in chunks; `note` (the
    preset used) is printed once the environment is built."""
    started = time.perf_counter()
    envs.make(config.env, **dict(config.env_kwargs))  # unknown environment parameter: clear error now
    if note:
        print(f"rlcx: note: {note}", file=sys.stderr)
    cache = enable_compile_cache(args.compile_cache)
    trainer = rl.make(algorithm, config)
    notice = config.rounding_notice()
    if notice:
        print(f"rlcx: note: {notice}", file=sys.stderr)
    rows_total = trainer.num_updates // trainer.log_every
    chunk_updates = math.ceil(rows_total / min(args.chunks, rows_total)) * trainer.log_every
    run_spec = checkpoint.RunSpec(algorithm, config, hparams, args.seeds, args.seed, chunk_updates)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = pathlib.Path(args.out or f"runs/{algorithm}-{config.env}-{stamp}")
    done = checkpoint.prepare_run_dir(
        run_dir, run_spec.to_json(), args.resume, args.overwrite, "run", normalize=_stored_spec_now
    )

    # TRACE AND COMPILE, timed apart from running (XLA compilation is what the persistent cache saves;
    # tracing and lowering the Python program happen in every process)
    seconds = {"trace": 0.0, "compile": 0.0}

    def timed(kind: str, fn: Any) -> Any:
        t = time.perf_counter()
        out = fn()
        seconds[kind] += time.perf_counter() - t
        return out

    init, init_args, abstract = timed("trace", lambda: checkpoint.abstract_state(trainer, run_spec))
    compiled: dict[int, Any] = {}

    def learn_fn(n: int) -> Any:
        if n not in compiled:
            jitted = xla.jit(vmap_learn(trainer, n, abstract), fused_products=fused_products(trainer, abstract))
            lowered = timed("trace", lambda: jitted.lower(abstract))
            compiled[n] = timed("compile", lowered.compile)
        return compiled[n]

    learn_fn(min(chunk_updates, trainer.num_updates - done) if done < trainer.num_updates else chunk_updates)
    if done:
        _, state = checkpoint.restore_state(run_dir, abstract, done)
    else:
        state = timed("compile", init.compile)(*init_args)
    jax.block_until_ready(state)
    compile_s, trace_s = seconds["compile"], seconds["trace"]

    # TRAIN IN CHUNKS
    start_done = done
    run_s = 0.0
    first_chunk_s = float("nan")
    sinks = loggers.make_sinks(args.log, run_dir, run_spec.to_json(), resumed=done > 0) if args.log else []
    with rlog.progress_bar("updates") as progress, contextlib.ExitStack() as closing:
        for sink in sinks:
            closing.callback(sink.close)
        task = progress.add_task(f"{algorithm} {config.env} x{args.seeds}", total=trainer.num_updates, completed=done)
        while done < trainer.num_updates:
            n = min(chunk_updates, trainer.num_updates - done)
            fn = learn_fn(n)
            t = time.perf_counter()
            state, metrics = fn(state)
            jax.block_until_ready(state)
            run_s += time.perf_counter() - t
            rows = rlog.metrics_rows(metrics, done // trainer.log_every, trainer.log_every)
            rlog.append_rows(run_dir, rows)
            for sink in sinks:
                sink.write(rows)
            done += n
            checkpoint.save_state(run_dir, done, state)
            if math.isnan(first_chunk_s):
                first_chunk_s = time.perf_counter() - started
            progress.update(task, completed=done)

    # EVALUATE, REPORT
    returns = evaluate_states(trainer, algorithm, state, args.eval_episodes, args.seed)
    env_steps = (done - start_done) * config.steps_per_update * args.seeds
    sps = env_steps / run_s if run_s > 0 else float("nan")
    summary = {
        "algorithm": algorithm,
        "env": config.env,
        "seeds": args.seeds,
        "total_steps_per_seed": trainer.num_updates * config.steps_per_update,
        "eval_return_per_seed": returns.mean(axis=1).tolist(),
        "eval_return_mean": float(returns.mean()),
        "eval_return_iqm": rlog.iqm(returns.mean(axis=1)),
        "env_steps_per_second": sps,
        "trace_seconds": trace_s,
        "compile_seconds": compile_s,
        "compile_cache": None if cache is None else str(cache),
        "first_chunk_seconds": None if math.isnan(first_chunk_s) else first_chunk_s,
        "first_chunk_updates": min(chunk_updates, trainer.num_updates - start_done),
        "run_seconds": run_s,
        "device": jax.devices()[0].device_kind,
    }
    checkpoint.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    rows = rlog.read_rows(run_dir)
    if rows:
        rlog.plot_learning_curves(rows, run_dir / "learning_curve.png", f"{algorithm} on {config.env}")
    _print_table(
        f"{algorithm} on {config.env}: evaluation over {args.eval_episodes} episodes per seed",
        returns,
        {
            "env steps/s (all seeds, excl. compile)": f"{sps:,.0f}",
            "trace + lower time": f"{trace_s:.1f} s",
            "XLA compile time": f"{compile_s:.1f} s (persistent cache: {cache or 'off'})",
            "time to the first chunk": f"{first_chunk_s:.1f} s ({summary['first_chunk_updates']} updates; "
            "since the flags were parsed, compilation included)",
            "run time": f"{run_s:.1f} s",
            "run directory": str(run_dir),
        },
    )
    return summary


def run_meta(args: Any, config: Any, hparams: Any) -> dict[str, Any]:
    """`rlcx meta` (`workflows.meta_run`), with the persistent compilation cache of `--compile-cache`."""
    enable_compile_cache(args.compile_cache)
    return meta_run.run_meta(args, config, hparams)


def run_eval(args: Any) -> dict[str, Any]:
    """Evaluate the newest intact checkpoint of `args.run_dir` (checked by the CLI)."""
    run_dir = pathlib.Path(args.run_dir)
    enable_compile_cache()
    run_spec, trainer, step, state = checkpoint.restore_run(run_dir)
    returns = evaluate_states(trainer, run_spec.algorithm, state, args.episodes, args.seed)
    _print_table(
        f"{run_spec.algorithm} on {run_spec.config.env} (checkpoint at update {step}): "
        f"{args.episodes} episodes per seed",
        returns,
        {"run directory": str(run_dir)},
    )
    return {"eval_return_per_seed": returns.mean(axis=1).tolist(), "step": step}


# ----------------------------------------------------------------------------------------------
# Compression of a trained run
# ----------------------------------------------------------------------------------------------
def run_compress(args: Any, options: CompressOptions, out_dir: pathlib.Path) -> dict[str, Any]:
    """Compress every seed of `args.run_dir` with `options` (both checked by the CLI) into `out_dir`."""
    run_dir = pathlib.Path(args.run_dir)
    enable_compile_cache()
    run_spec, _, step, state = checkpoint.restore_run(run_dir)
    rows = compress_run(run_spec.algorithm, run_spec.config, state, options, out_dir, args.episodes, args.seed)
    env, env_params = envs.make_training_env(run_spec.config.env, run_spec.config.env_kwargs)
    spec = nets.action_spec(env.action_space(env_params))
    _print_compress_table(run_spec, step, options, rows, spec)
    summary = {
        "options": dataclasses.asdict(options),
        "checkpoint_step": step,
        "agreement_measure": agreement_label(spec),
        "rows": [
            {
                "name": r.name,
                "return_per_seed": r.returns.mean(axis=1).tolist(),
                "return_iqm": rlog.iqm(r.returns.mean(axis=1)),
                "agreement_per_seed": r.agreement.tolist(),
                "action_gap_per_seed": r.gap.tolist(),
                "params": r.params,
                "nonzeros": r.nonzeros,
                "artifact_bytes": r.artifact_bytes,
                "flops": r.flops,
                "latency_s": r.latency_s,
                "export_exact": r.export_exact,
            }
            for r in rows
        ],
    }
    checkpoint.atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def _print_compress_table(
    run_spec: checkpoint.RunSpec, step: int, options: CompressOptions, rows: list[Any], spec: nets.ActionSpec
) -> None:
    from rich.console import Console
    from rich.table import Table

    changes = {
        k: v for k, v in dataclasses.asdict(options).items() if v and k not in ("include", "exclude", "distribution")
    }
    table = Table(title=f"{run_spec.algorithm} on {run_spec.config.env} (update {step}), compressed with {changes}")
    for col in (
        "policy",
        "return (mean)",
        "return (IQM)",
        agreement_label(spec),
        *(() if spec.discrete else ("mean action gap (% of range)",)),
        "policy params",
        "non-zeros",
        "file bytes",
        "FLOPs/forward",
        "latency (us)",
    ):
        table.add_column(col, justify="right")
    base = rows[0]
    for r in rows:
        per_seed = r.returns.mean(axis=1)
        table.add_row(
            r.name,
            f"{per_seed.mean():.1f}",
            f"{rlog.iqm(per_seed):.1f}",
            f"{100 * r.agreement.mean():.2f}%",
            *(() if spec.discrete else (f"{100 * r.gap.mean():.3f}%",)),
            f"{r.params:,}",
            f"{r.nonzeros:,}",
            f"{r.artifact_bytes:,.0f} ({base.artifact_bytes / r.artifact_bytes:.1f}x smaller)"
            if r is not base
            else f"{r.artifact_bytes:,.0f}",
            f"{r.flops:,}",
            f"{1e6 * r.latency_s:.1f}",
        )
    console = Console(width=max(Console().width, 150))
    console.print(table)
    if not rows[-1].export_exact:
        console.print("[red]warning: the loaded artifact's weights or actions differ from the evaluated policy's[/red]")
    console.print(
        "file bytes: one exported artifact (mean over seeds); latency: one jitted forward, batch 1, float compute"
    )
    if not spec.discrete:
        console.print(
            "action agreement: states (visited by the original policy) where every dimension of the compressed "
            f"policy's mean action, clipped to the action bounds, lies within {100 * AGREEMENT_TOLERANCE:g}% of the "
            "action range of the original's; mean action gap: mean |difference| of the clipped mean actions / range"
        )


# ----------------------------------------------------------------------------------------------
# The expand-then-compress pipeline
# ----------------------------------------------------------------------------------------------
def run_pipeline(recipe: Recipe, run_dir: pathlib.Path, from_stage: str) -> list[dict[str, Any]]:
    """Run (or resume) the pipeline of `recipe` (checked by the CLI) in `run_dir`."""
    enable_compile_cache()
    t0 = time.perf_counter()
    rows = pipeline.run_pipeline(recipe, run_dir, from_stage or None, log=lambda m: print(m, flush=True))
    if rows:
        _print_pipeline_table(rows, recipe)
    print(f"pipeline finished in {time.perf_counter() - t0:.0f} s; run directory {run_dir}")
    return rows


def _print_pipeline_table(rows: list[dict[str, Any]], recipe: pipeline.Recipe) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"expand -> compress on {recipe.env}, {recipe.seeds} seeds, {recipe.eval_episodes} episodes each"
    )
    columns = (
        "stage",
        "return IQM [95% CI]",
        "kept",
        "agreement",
        "params",
        "non-zeros",
        "file bytes",
        "smaller",
        "FLOPs",
        "latency (us)",
    )
    for col in columns:
        table.add_column(col, justify="right")
    for r in rows:
        lo, hi = r["return_ci95"]
        table.add_row(
            r["name"],
            f"{r['return_iqm']:.1f} [{lo:.1f}, {hi:.1f}]",
            f"{100 * r['return_retained']:.0f}%",
            pipeline.percent(r["agreement_with_teacher"]),
            f"{r['params']:,}",
            f"{r['nonzeros']:,}",
            f"{r['artifact_bytes']:,.0f}",
            f"{r['smaller_than_teacher']:.1f}x",
            f"{r['flops']:,}",
            f"{r['latency_us']:.1f}",
        )
    console = Console(width=max(Console().width, 160))
    console.print(table)
    for line in pipeline.verdicts(rows):
        console.print(line)


# ----------------------------------------------------------------------------------------------
# Sweeps, device report
# ----------------------------------------------------------------------------------------------
def run_sweep(spec: Any, args: Any, chunk_size: int | None, part: tuple[int, int] | None) -> Any:
    """Run the sweep `spec` (validated by the CLI) into `args.out`, print the best settings."""
    from rlcx_jax import sweep

    envs.make(spec.config.env, **dict(spec.config.env_kwargs))  # unknown environment parameter: clear error now
    enable_compile_cache(args.compile_cache)
    notice = spec.config.rounding_notice()
    if notice and jax.process_index() == 0:
        print(f"rlcx: note: {notice}", file=sys.stderr)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = pathlib.Path(args.out or f"runs/sweep-{spec.algorithm}-{spec.config.env}-{stamp}")
    if jax.process_index() == 0:
        which = "" if part is None else f" (part {part[0]}/{part[1]})"
        print(
            f"rlcx: sweep of {spec.num_settings} settings x {spec.seeds} seeds{which} over "
            f"{jax.device_count()} {jax.devices()[0].platform} device(s) -> {out}",
            file=sys.stderr,
        )
    try:
        result = sweep.run(spec, out, chunk_size=chunk_size, part=part, resume=args.resume, overwrite=args.overwrite)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if jax.process_index() == 0:
        _print_sweep(result)
    return result


def run_sweep_merge(args: Any) -> Any:
    from rlcx_jax import sweep

    try:
        result = sweep.merge(args.parts, args.out, overwrite=args.overwrite)
    except ValueError as e:
        raise CLIError(str(e)) from None
    _print_sweep(result)
    return result


def _print_sweep(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from rlcx_jax import sweep

    spec = result.spec
    best = sweep.top_settings(result.summary)
    table = Table(title=f"{spec.algorithm} on {spec.config.env}: best of {len(result.summary)} settings")
    names = [a.name for a in spec.axes]
    for col in ("setting", *names, "return IQM [95% CI] over seeds", "mean", "min"):
        table.add_column(col, justify="right")
    for s in best:
        table.add_row(
            str(s["setting"]),
            *(f"{s[n]:.4g}" for n in names),
            f"{s['return_iqm']:.1f} [{s['ci_low']:.1f}, {s['ci_high']:.1f}]",
            f"{s['return_mean']:.1f}",
            f"{s['return_min']:.1f}",
        )
    console = Console()
    console.print(table)
    t = result.timing
    if t.get("run_s"):
        console.print(
            f"{t['rows']} runs in {t['chunks']} chunk(s) of {t['chunk_rows']} on {t['devices']} device(s): "
            f"{t['env_steps_per_s']:,.0f} env steps/s, compile {t['compile_s']:.1f} s, run {t['run_s']:.1f} s"
        )
    if result.out_dir is not None:
        console.print(f"tables and plot: {result.out_dir}/{{results.csv,summary.csv,sweep.png}}")


def device_report() -> list[str]:
    """One line each: jax and jaxlib versions, backend, process, and every local device with its memory."""
    import jaxlib

    lines = [
        f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, backend {jax.default_backend()}, "
        f"process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} device(s) in all"
    ]
    for d in jax.local_devices():
        try:
            stats = d.memory_stats() or {}
        except Exception:
            stats = {}
        limit = stats.get("bytes_limit")
        memory = f"{limit / 2**30:.1f} GiB" if limit else _host_memory()
        lines.append(f"  {d.id}: {d.device_kind} ({d.platform}), memory {memory}")
    return lines


def _host_memory() -> str:
    try:
        return f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.1f} GiB (host)"
    except (ValueError, OSError):
        return "host memory"


def run_info() -> list[str]:
    lines = device_report()
    print("\n".join(lines))
    return lines
