"""The `rlcx` command line.

  rlcx pipeline [--recipe FILE.toml] [--out DIR] [--from STAGE] [flags]   (workflows/pipeline.py)
  rlcx train {dqn,reinforce,a2c,ppo} [--env ID] [--seeds N] [--total-steps N] [--out DIR] [flags]
  rlcx eval DIR [--episodes N]

Training runs in chunks (the `init` / `learn(state, n)` mode) vmapped over seeds, so the host can
show progress with an ETA, append `metrics.jsonl` and write an orbax checkpoint between chunks;
`--resume` continues from the last checkpoint and ends bit-identical to an uninterrupted run.
Flags are generated from the algorithm's config and hyperparameter dataclasses (tyro), so a new
field is a new flag without editing this file. Bad input gives a one-line error and exit code 2.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import inspect
import json
import math
import pathlib
import shutil
import sys
import textwrap
import time
import typing
from collections.abc import Sequence
from typing import Annotated, Any

import jax
import numpy as np
import tyro

from rlcx_jax import checkpoint, envs, nets, rl
from rlcx_jax import logging as rlog
from rlcx_jax.compress.training import CompressConfig
from rlcx_jax.nets.policy import AGREEMENT_TOLERANCE, agreement_label
from rlcx_jax.rl.common import vmap_learn
from rlcx_jax.rl.evaluate import default_greedy, make_evaluator
from rlcx_jax.seams import Extension
from rlcx_jax.workflows import pipeline
from rlcx_jax.workflows.compress_run import CompressOptions, compress_run

# Config fields that the CLI exposes under other names (or not at all).
_RENAMED = {"env", "total_timesteps", "env_kwargs", "net", "extensions", "ext"}
# Extensions whose config and hyperparameter fields are flags of `rlcx train`; an extension is
# switched on when any of its flags differs from its default.
CLI_EXTENSIONS: tuple[type[Extension], ...] = (CompressConfig,)


class CLIError(ValueError):
    """A user error: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------
# Flags from dataclasses
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunOptions:
    env: str = "CartPole-v1"
    """Environment id (gymnax, or one of ours)."""
    seeds: int = 8
    """Number of seeds trained at once (vmapped)."""
    seed: int = 0
    """Base PRNG seed; seed i uses split(PRNGKey(seed), seeds)[i]."""
    total_steps: int = -1
    """Environment steps per seed (-1: the algorithm's default)."""
    out: str = ""
    """Run directory (default: runs/<algo>-<env>-<timestamp>)."""
    resume: bool = False
    """Continue the run in --out from its last checkpoint."""
    overwrite: bool = False
    """Delete an existing run in --out first."""
    chunks: int = 20
    """Number of chunks (progress / checkpoint points) the run is split into."""
    eval_episodes: int = 32
    """Episodes per seed for the final evaluation."""
    env_param: tuple[str, ...] = ()
    """Environment parameter overrides, e.g. --env-param max_steps_in_episode=200."""
    compile_cache: str = ""
    """JAX's persistent compilation cache: a directory, 'off', or '' for $RLCX_COMPILE_CACHE or else
    ~/.cache/rlcx_jax/jax. A second identical run loads its compiled programs instead of compiling."""


CACHE_VARIABLE = "RLCX_COMPILE_CACHE"


def compile_cache_dir(setting: str = "") -> pathlib.Path | None:
    """Where compiled programs are cached: `setting`, else $RLCX_COMPILE_CACHE, else the user cache
    directory ($XDG_CACHE_HOME or ~/.cache, then rlcx_jax/jax); None for 'off'."""
    import os

    setting = setting or os.environ.get(CACHE_VARIABLE, "")
    if setting.lower() == "off":
        return None
    if setting:
        return pathlib.Path(setting).expanduser()
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "rlcx_jax" / "jax"


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


def _field_default(instance: Any, f: dataclasses.Field) -> Any:
    return getattr(instance, f.name)


def field_docs(cls: type) -> dict[str, str]:
    """{field: its attribute docstring} of a dataclass, a subclass's overriding its bases'.

    An attribute docstring is the string literal on the line after `name: type = default`."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def train_args_class(algorithm: str) -> type:
    """A flat dataclass of run options + the algorithm's config, network and hyperparameters."""
    spec = rl.get(algorithm)
    config0 = spec.config_cls()
    hparams0 = spec.hparams_cls()
    fields: list[tuple[str, Any, Any]] = []

    def add(name: str, hint: Any, default: Any, doc: str | None) -> None:
        flag_type = Annotated[hint, tyro.conf.arg(help=doc)] if doc else hint
        fields.append((name, flag_type, dataclasses.field(default=default)))

    run_docs = field_docs(RunOptions)
    for f in dataclasses.fields(RunOptions):
        add(f.name, typing.get_type_hints(RunOptions)[f.name], f.default, run_docs.get(f.name))
    parts: list[tuple[Any, str]] = [(config0, ""), (config0.net, "net_"), (hparams0, "")]
    for ext_cls in CLI_EXTENSIONS:
        ext0 = ext_cls()
        parts += [(ext0, "")] + ([(ext0.default_hparams(), "")] if ext0.default_hparams() is not None else [])
    for obj, prefix in parts:
        hints = typing.get_type_hints(type(obj))
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            if prefix == "" and f.name in _RENAMED:
                continue
            add(prefix + f.name, hints[f.name], _field_default(obj, f), docs.get(f.name))
    return dataclasses.make_dataclass(f"Train{algorithm.upper()}", fields)


def _parse_env_params(items: Sequence[str]) -> tuple[tuple[str, Any], ...]:
    out = []
    for item in items:
        if "=" not in item:
            raise CLIError(f"--env-param expects NAME=VALUE, got {item!r}")
        name, value = item.split("=", 1)
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.append((name.strip(), parsed))
    return tuple(out)


def build_run(algorithm: str, args: Any) -> tuple[Any, Any]:
    """(config, hparams) from parsed flags; validates both before anything is compiled."""
    spec = rl.get(algorithm)
    config0 = spec.config_cls()
    values = dataclasses.asdict(args)
    net_kwargs = {f.name: values["net_" + f.name] for f in dataclasses.fields(nets.NetConfig)}
    cfg_kwargs = {f.name: values[f.name] for f in dataclasses.fields(config0) if f.name not in _RENAMED}
    total = args.total_steps if args.total_steps != -1 else config0.total_timesteps
    env_kwargs = _parse_env_params(args.env_param)
    envs.make(args.env, **dict(env_kwargs))  # unknown env / parameter: clear error now
    extensions, ext_hparams = _cli_extensions(values)
    config = spec.config_cls(
        env=args.env,
        total_timesteps=total,
        env_kwargs=env_kwargs,
        net=nets.NetConfig(**net_kwargs),
        extensions=extensions,
        **cfg_kwargs,
    )
    hp_fields = [f.name for f in dataclasses.fields(spec.hparams_cls) if f.name not in _RENAMED]
    hparams = spec.hparams_cls(**{name: values[name] for name in hp_fields}, ext=ext_hparams)
    config.validate()
    hparams.validate(config.extensions)
    if args.seeds < 1:
        raise CLIError(f"--seeds must be >= 1, got {args.seeds}")
    if args.chunks < 1:
        raise CLIError(f"--chunks must be >= 1, got {args.chunks}")
    if args.eval_episodes < 1:
        raise CLIError(f"--eval-episodes must be >= 1, got {args.eval_episodes}")
    return config, hparams


def _cli_extensions(values: dict[str, Any]) -> tuple[tuple[Extension, ...], dict[str, Any]]:
    """The CLI extensions whose flags were changed, and their hyperparameters."""
    extensions, ext_hparams = [], {}
    for ext_cls in CLI_EXTENSIONS:
        ext = ext_cls(**{f.name: values[f.name] for f in dataclasses.fields(ext_cls)})
        hp0 = ext_cls().default_hparams()
        hp = None if hp0 is None else type(hp0)(**{f.name: values[f.name] for f in dataclasses.fields(hp0)})
        if ext != ext_cls() or hp != hp0:
            extensions.append(ext)
            if hp is not None:
                ext_hparams[ext.name] = hp
    return tuple(extensions), ext_hparams


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def _prepare_run_dir(run_dir: pathlib.Path, run_spec: checkpoint.RunSpec, resume: bool, overwrite: bool) -> int:
    """Create or check the run directory; returns the number of updates already done."""
    checkpoint.check_directory_path(run_dir)
    if resume:
        existing = checkpoint.read_run_spec(run_dir)
        if existing.to_json() != run_spec.to_json():
            raise CLIError(
                f"--resume: the settings differ from the run in {run_dir}; "
                "pass the same flags as the original run (see its config.json)"
            )
        checkpoint.remove_partial_checkpoints(run_dir)
        checkpoint.quarantine_broken(run_dir)
        done = checkpoint.latest_step(run_dir) or 0
        rlog.truncate_rows(run_dir, done)
        return done
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise CLIError(f"{run_dir} already holds a run; use --resume, --overwrite or another --out")
        shutil.rmtree(run_dir)
    checkpoint.write_run_spec(run_dir, run_spec)
    return 0


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


def run_train(algorithm: str, args: Any) -> dict[str, Any]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    started = time.perf_counter()
    config, hparams = build_run(algorithm, args)
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
    done = _prepare_run_dir(run_dir, run_spec, args.resume, args.overwrite)

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
            lowered = timed("trace", lambda: jax.jit(vmap_learn(trainer, n, abstract)).lower(abstract))
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
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("updates"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(f"{algorithm} {config.env} x{args.seeds}", total=trainer.num_updates, completed=done)
        while done < trainer.num_updates:
            n = min(chunk_updates, trainer.num_updates - done)
            fn = learn_fn(n)
            t = time.perf_counter()
            state, metrics = fn(state)
            jax.block_until_ready(state)
            run_s += time.perf_counter() - t
            rlog.append_rows(run_dir, rlog.metrics_rows(metrics, done // trainer.log_every, trainer.log_every))
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


@dataclasses.dataclass
class EvalArgs:
    run_dir: tyro.conf.Positional[str]
    """A run directory written by `rlcx train`."""
    episodes: int = 32
    """Episodes per seed."""
    seed: int = 0
    """Evaluation PRNG seed."""


def run_eval(argv: Sequence[str]) -> dict[str, Any]:
    args = tyro.cli(EvalArgs, args=list(argv), prog="rlcx eval")
    if args.episodes < 1:
        raise CLIError(f"--episodes must be >= 1, got {args.episodes}")
    run_dir = pathlib.Path(args.run_dir)
    if not run_dir.is_dir():
        raise CLIError(f"No run directory at {run_dir}")
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
@dataclasses.dataclass(frozen=True)
class CompressArgs(CompressOptions):
    run_dir: tyro.conf.Positional[str] = ""
    """A directory written by `rlcx train`."""
    episodes: int = 32
    """Evaluation episodes per seed."""
    out: str = ""
    """Where the artifacts go (default: RUN_DIR/compressed)."""
    seed: int = 0
    """Evaluation PRNG seed."""


def run_compress(argv: Sequence[str]) -> dict[str, Any]:
    args = tyro.cli(CompressArgs, args=list(argv), prog="rlcx compress")
    options = CompressOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CompressOptions)})
    options.validate()  # bad sparsity, bit width, N:M or scheme: clear error before anything compiles
    if args.episodes < 1:
        raise CLIError(f"--episodes must be >= 1, got {args.episodes}")
    run_dir = pathlib.Path(args.run_dir)
    if not args.run_dir or not run_dir.is_dir():
        raise CLIError(f"No run directory at {run_dir}")
    out_dir = pathlib.Path(args.out) if args.out else run_dir / "compressed"
    checkpoint.check_directory_path(out_dir)
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
@dataclasses.dataclass(frozen=True)
class PipelineArgs(pipeline.Recipe):
    recipe: str = ""
    """A TOML file of recipe settings (keys are the flags' names with underscores); flags override it."""
    out: str = ""
    """Run directory (default: runs/pipeline-<env>); finished stages there are skipped."""
    from_stage: str = ""
    """Re-run this stage and every later one (also spelled --from)."""


def _recipe_path(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg == "--recipe" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--recipe="):
            return arg.split("=", 1)[1]
    return ""


def run_pipeline_command(argv: Sequence[str]) -> list[dict[str, Any]]:
    argv = ["--from-stage" if a == "--from" else a.replace("--from=", "--from-stage=", 1) for a in argv]
    path = _recipe_path(argv)
    base = pipeline.load_recipe(pathlib.Path(path) if path else None)
    default = PipelineArgs(**{f.name: getattr(base, f.name) for f in dataclasses.fields(pipeline.Recipe)})
    args = tyro.cli(PipelineArgs, args=argv, default=default, prog="rlcx pipeline")
    recipe = pipeline.Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(pipeline.Recipe)})
    run_dir = pathlib.Path(args.out or f"runs/pipeline-{recipe.env}")
    enable_compile_cache()
    t0 = time.perf_counter()
    rows = pipeline.run_pipeline(recipe, run_dir, args.from_stage or None, log=lambda m: print(m, flush=True))
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
# Entry point
# ----------------------------------------------------------------------------------------------
USAGE = """usage: rlcx {pipeline,train,eval,compress} ...

  rlcx pipeline [--recipe FILE.toml] [--out DIR] [--from STAGE] [flags]
                                train a teacher, distil, prune, quantize, export, evaluate

  rlcx train {dqn,reinforce,a2c,ppo} [--env ID] [--seeds N] [--total-steps N] [--out DIR] [flags]
  rlcx train ppo --help         all flags of one algorithm
  rlcx eval RUN_DIR [--episodes N]
  rlcx compress RUN_DIR [--prune 0.9] [--structured 0.5] [--nm 2:4] [--quant int8] [--activations minmax]
"""


def _dispatch(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        if not argv:
            raise CLIError("missing command (pipeline, train, eval or compress)")
        return
    command, rest = argv[0], argv[1:]
    if command == "train":
        if not rest or rest[0] in ("-h", "--help"):
            print(USAGE)
            if not rest:
                raise CLIError(f"missing algorithm: one of {', '.join(rl.ALGORITHMS)}")
            return
        algorithm = rest[0]
        rl.get(algorithm)  # unknown algorithm -> ValueError with close match
        args: Any = tyro.cli(train_args_class(algorithm), args=rest[1:], prog=f"rlcx train {algorithm}")
        run_train(algorithm, args)
    elif command == "eval":
        run_eval(rest)
    elif command == "compress":
        run_compress(rest)
    elif command == "pipeline":
        run_pipeline_command(rest)
    else:
        raise CLIError(f"unknown command {command!r}; expected pipeline, train, eval or compress")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _dispatch(argv)
    except (ValueError, checkpoint.CheckpointError, FileNotFoundError) as e:
        print(f"rlcx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlcx: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
