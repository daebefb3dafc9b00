"""The `rlcx` command line.

  rlcx pipeline [--recipe FILE.toml] [--out DIR] [--from STAGE] [flags]   (workflows/pipeline.py)
  rlcx train {dqn,reinforce,a2c,ppo} [--env ID] [--seeds N] [--total-steps N] [--out DIR] [flags]
  rlcx eval DIR [--episodes N]
  rlcx compress DIR [--prune 0.9] [--quant int8] ...
  rlcx plot RUN [RUN ...] [--out FILE.png]
  rlcx sweep {dqn,reinforce,a2c,ppo} --grid NAME=V1,V2 [--random NAME=DIST:LO:HI --samples N] [train flags]
  rlcx sweep-merge PART_DIR [PART_DIR ...] --out DIR
  rlcx meta {maml,fomaml,reptile,platipus,pretrain} [--family point-nav-uniform] [--seeds N] [--out DIR] [flags]
  rlcx info

This module parses and validates every command's flags without importing jax (the config classes
live in the jax-free `rlcx_jax.configs`), so `--help`, a typo or an out-of-range value is answered in
a fraction of a second; only then does it import `rlcx_jax.runs`, which trains, evaluates or
compresses. Flags are generated from the algorithm's config and hyperparameter dataclasses (tyro),
so a new field is a new flag without editing this file; `rlcx train ALG --env ENV` starts from the
tuned preset of that algorithm and environment (`rlcx_jax.presets`) where there is one. Bad input
gives a one-line error and exit code 2.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import pathlib
import sys
import textwrap
import typing
from collections.abc import Sequence
from typing import Annotated, Any

import tyro

from rlcx_jax import presets
from rlcx_jax.configs.algorithms import ALGORITHMS, config_classes
from rlcx_jax.configs.base import Extension, check_directory_path
from rlcx_jax.configs.compress import CompressConfig, CompressOptions
from rlcx_jax.configs.envs import check_env_name
from rlcx_jax.configs.meta import METHODS, MetaConfig, MetaHParams, check_method
from rlcx_jax.configs.multitask import MultiTask
from rlcx_jax.configs.nets import NetConfig
from rlcx_jax.configs.pipeline import Recipe, load_recipe
from rlcx_jax.configs.sweep import SweepSpec, parse_chunk_size, parse_grid, parse_part, parse_random

# Config fields that the CLI exposes under other names (or not at all).
_RENAMED = {"env", "total_timesteps", "env_kwargs", "net", "extensions", "ext"}
# Extensions whose config and hyperparameter fields are flags of `rlcx train`; an extension is
# switched on when any of its flags differs from its default.
CLI_EXTENSIONS: tuple[type[Extension], ...] = (MultiTask, CompressConfig)
COMMANDS = ("pipeline", "train", "eval", "compress", "plot", "sweep", "sweep-merge", "meta", "info")


class CLIError(ValueError):
    """A user error: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------
# Flags from dataclasses
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunOptions:
    env: str = "CartPole-v1"
    """Environment id (gymnax, or one of ours)."""
    preset: str = "auto"
    """Settings to start from: auto (the tuned preset of this algorithm and environment, if there is one) or none
    (the algorithm's defaults, PureJaxRL's CartPole settings). Flags override either."""
    seeds: int = 8
    """Number of seeds trained at once (vmapped)."""
    seed: int = 0
    """Base PRNG seed; seed i uses split(PRNGKey(seed), seeds)[i]."""
    total_steps: int = -1
    """Environment steps per seed (-1: the preset's, else the algorithm's default)."""
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
    log: tuple[str, ...] = ()
    """Also send the metric rows to: tensorboard (RUN/tensorboard) and/or wandb (offline without an API key)."""
    compile_cache: str = ""
    """JAX's persistent compilation cache: a directory, 'off', or '' for $RLCX_COMPILE_CACHE or else
    ~/.cache/rlcx_jax/jax. A second identical run loads its compiled programs instead of compiling."""


@dataclasses.dataclass
class SweepOptions:
    grid: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """A swept hyperparameter and its values, NAME=V1,V2,... (repeat the flag for more: their product is swept)."""
    random: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """A hyperparameter drawn at random, NAME=DIST:LOW:HIGH with DIST uniform or loguniform (repeatable)."""
    samples: int = 0
    """Random settings drawn (each with every grid point)."""
    env: str = "CartPole-v1"
    """Environment id (gymnax, or one of ours)."""
    preset: str = "auto"
    """Settings to start from: auto (the tuned preset of this algorithm and environment, if there is one) or none."""
    seeds: int = 4
    """Seeds per setting (seed i of every setting uses the key of seed i of `rlcx train`)."""
    seed: int = 0
    """Base PRNG seed (also seeds the random draws)."""
    total_steps: int = -1
    """Environment steps per run (-1: the preset's, else the algorithm's default)."""
    eval_episodes: int = 32
    """Evaluation episodes of each run's final policy."""
    env_param: tuple[str, ...] = ()
    """Environment parameter overrides, e.g. --env-param max_steps_in_episode=200."""
    chunk_size: str = "auto"
    """Runs (settings x seeds) per compiled call: a number, or auto (all that fit in memory, by XLA's estimate)."""
    part: str = ""
    """I/N: run only the settings s with s % N == I (one of N independent jobs; join them with sweep-merge)."""
    out: str = ""
    """Run directory (default: runs/sweep-<algo>-<env>-<timestamp>)."""
    resume: bool = False
    """Run only the runs missing from --out (finished chunks are kept)."""
    overwrite: bool = False
    """Delete an existing sweep in --out first."""
    cpu_devices: int = 0
    """Split this machine's CPU into N XLA devices, e.g. one per core (--cpu-devices $(nproc)), so that runs are
    sharded over the cores like over GPUs (0: JAX's default, one CPU device). A row may then differ from the
    one-device run in the last bits of a float (matrix products see fewer rows)."""
    distributed: bool = False
    """Join a multi-process run (jax.distributed.initialize(); Slurm, Open MPI and TPU pods are detected)."""
    coordinator: str = ""
    """HOST:PORT of process 0, for a multi-process run on a cluster jax does not detect (with --num-processes and
    --process-id)."""
    num_processes: int = 0
    """Processes in the multi-process run (with --coordinator)."""
    process_id: int = -1
    """This process's index in the multi-process run (with --coordinator)."""
    compile_cache: str = ""
    """JAX's persistent compilation cache: a directory, 'off', or '' for $RLCX_COMPILE_CACHE or else
    ~/.cache/rlcx_jax/jax."""


CACHE_VARIABLE = "RLCX_COMPILE_CACHE"
PRESET_CHOICES = ("auto", "none")


def compile_cache_dir(setting: str = "") -> pathlib.Path | None:
    """Where compiled programs are cached: `setting`, else $RLCX_COMPILE_CACHE, else the user cache
    directory ($XDG_CACHE_HOME or ~/.cache, then rlcx_jax/jax); None for 'off'."""
    setting = setting or os.environ.get(CACHE_VARIABLE, "")
    if setting.lower() == "off":
        return None
    if setting:
        return pathlib.Path(setting).expanduser()
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "rlcx_jax" / "jax"


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


_ALIASES: dict[str, tuple[str, ...]] = {"net_torso": ("--net",)}
"""Short spellings of flags: `rlcx train ppo --net attention`."""


def train_args_class(algorithm: str, options: type = RunOptions, command: str = "Train") -> type:
    """A flat dataclass of run options (`options`: RunOptions, or SweepOptions for `rlcx sweep`) + the
    algorithm's config, network and hyperparameters."""
    config_cls, hparams_cls = config_classes(algorithm)
    config0 = config_cls()
    fields: list[tuple[str, Any, Any]] = []

    def add(name: str, hint: Any, default: Any, doc: str | None) -> None:
        aliases = _ALIASES.get(name, ())
        flag_type = Annotated[hint, tyro.conf.arg(help=doc, aliases=aliases)] if doc or aliases else hint
        fields.append((name, flag_type, dataclasses.field(default=default)))

    run_docs = field_docs(options)
    hints = typing.get_type_hints(options, include_extras=True)
    for f in dataclasses.fields(options):
        add(f.name, hints[f.name], f.default, run_docs.get(f.name))
    parts: list[tuple[Any, str]] = [(config0, ""), (config0.net, "net_"), (hparams_cls(), "")]
    for ext_cls in CLI_EXTENSIONS:
        ext0 = ext_cls()
        parts += [(ext0, "")] + ([(ext0.default_hparams(), "")] if ext0.default_hparams() is not None else [])
    for obj, prefix in parts:
        hints = typing.get_type_hints(type(obj))
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            if prefix == "" and f.name in _RENAMED:
                continue
            add(prefix + f.name, hints[f.name], getattr(obj, f.name), docs.get(f.name))
    return dataclasses.make_dataclass(f"{command}{algorithm.upper()}", fields)


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value given to `flag` in `argv` (`--flag VALUE` or `--flag=VALUE`; the last one wins)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def preset_for(algorithm: str, argv: Sequence[str]) -> presets.Preset | None:
    """The preset `argv` asks for: that of the algorithm and `--env` with `--preset auto` (the default)."""
    choice = _flag_value(argv, "--preset") or "auto"
    if choice not in PRESET_CHOICES:
        raise CLIError(f"--preset must be one of {', '.join(PRESET_CHOICES)}, got {choice!r}")
    env = _flag_value(argv, "--env") or RunOptions.env
    return presets.get(algorithm, env) if choice == "auto" else None


def parse_train_args(algorithm: str, argv: Sequence[str], options: type = RunOptions, command: str = "train") -> Any:
    """The flat flags of `rlcx train ALG` (or `rlcx sweep ALG`), starting from the preset of the algorithm
    and environment."""
    args_cls = train_args_class(algorithm, options, command.capitalize())
    preset = preset_for(algorithm, argv)
    default = args_cls()
    if preset is not None:
        values = dict(preset.values)
        names = {f.name for f in dataclasses.fields(args_cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise CLIError(f"the {algorithm} preset for {preset.env} sets unknown flags {unknown}")
        default = dataclasses.replace(default, **values)
    return tyro.cli(args_cls, args=list(argv), default=default, prog=f"rlcx {command} {algorithm}")


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
    """(config, hparams) from parsed flags; validates both (and the run options) before jax is imported.
    Environment parameter names (`--env-param`) are checked when the environment is built."""
    config_cls, hparams_cls = config_classes(algorithm)
    config0 = config_cls()
    values = dataclasses.asdict(args)
    net_kwargs = {f.name: values["net_" + f.name] for f in dataclasses.fields(NetConfig)}
    cfg_kwargs = {f.name: values[f.name] for f in dataclasses.fields(config0) if f.name not in _RENAMED}
    total = args.total_steps if args.total_steps != -1 else config0.total_timesteps
    check_env_name(args.env)
    extensions, ext_hparams = _cli_extensions(values)
    config = config_cls(
        env=args.env,
        total_timesteps=total,
        env_kwargs=_parse_env_params(args.env_param),
        net=NetConfig(**net_kwargs),
        extensions=extensions,
        **cfg_kwargs,
    )
    hp_fields = [f.name for f in dataclasses.fields(hparams_cls) if f.name not in _RENAMED]
    hparams = hparams_cls(**{name: values[name] for name in hp_fields}, ext=ext_hparams)
    config.validate()
    hparams.validate(config.extensions)
    for ext in config.extensions:
        ext.check_run(config, hparams.ext[ext.name])
    for name in ("seeds", "chunks", "eval_episodes"):
        if getattr(args, name, 1) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.preset not in PRESET_CHOICES:
        raise CLIError(f"--preset must be one of {', '.join(PRESET_CHOICES)}, got {args.preset!r}")
    from rlcx_jax import loggers

    loggers.check_kinds(getattr(args, "log", ()))
    if args.out:
        check_directory_path(pathlib.Path(args.out))
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


def build_sweep(algorithm: str, args: Any) -> tuple[SweepSpec, int | None, tuple[int, int] | None]:
    """(spec, chunk size or None for auto, part or None) from the flags of `rlcx sweep`; every check
    (axes, names, values of every setting, counts) runs here, before jax is imported."""
    config, hparams = build_run(algorithm, args)
    spec = SweepSpec(
        algorithm=algorithm,
        config=config,
        hparams=hparams,
        grid=tuple(parse_grid(g) for g in args.grid),
        random=tuple(parse_random(r) for r in args.random),
        samples=args.samples,
        seeds=args.seeds,
        seed=args.seed,
        eval_episodes=args.eval_episodes,
    )
    spec.validate()
    chunk_size = parse_chunk_size(args.chunk_size)
    part = parse_part(args.part) if args.part else None
    check_distributed(args)
    if args.cpu_devices < 0:
        raise CLIError(f"--cpu-devices must be >= 0, got {args.cpu_devices}")
    return spec, chunk_size, part


CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def with_cpu_devices(xla_flags: str, n: int) -> str:
    """`xla_flags` (the XLA_FLAGS value) asking XLA for `n` CPU devices; an earlier count is replaced."""
    kept = [f for f in xla_flags.split() if not f.startswith(CPU_DEVICES_FLAG + "=")]
    return " ".join([*kept, f"{CPU_DEVICES_FLAG}={n}"])


def force_cpu_devices(n: int) -> None:
    """Ask XLA for `n` CPU devices (`--cpu-devices`; 0 leaves the default). XLA reads XLA_FLAGS when jax
    starts its CPU backend, so this must run before that; if jax is already running with another count,
    a one-line error says so."""
    if n == 0:
        return
    if "jax" in sys.modules:
        import jax

        cpus = len(jax.devices("cpu"))
        if cpus != n:
            raise CLIError(f"--cpu-devices {n}: jax already runs with {cpus} CPU device(s) in this process")
        return
    os.environ["XLA_FLAGS"] = with_cpu_devices(os.environ.get("XLA_FLAGS", ""), n)


def check_distributed(args: Any) -> None:
    """--coordinator needs --num-processes >= 1 and 0 <= --process-id < it; the two only with it."""
    if args.coordinator:
        host, sep, port = args.coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise CLIError(f"--coordinator expects HOST:PORT, got {args.coordinator!r}")
        if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
            raise CLIError(
                "--coordinator needs --num-processes N (>= 1) and --process-id I (0 <= I < N), "
                f"got {args.num_processes} and {args.process_id}"
            )
    elif args.num_processes or args.process_id != -1:
        raise CLIError("--num-processes and --process-id go with --coordinator HOST:PORT")


def start_distributed(args: Any) -> None:
    """Join a multi-process run (`--coordinator`, or `--distributed` for a cluster jax detects: Slurm,
    Open MPI, TPU pods). It must precede everything that starts a jax backend, so it runs before
    `rlcx_jax.runs` (which imports gymnax) is imported."""
    if not (args.coordinator or args.distributed):
        return
    import jax

    try:
        if args.coordinator:
            jax.distributed.initialize(
                coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id
            )
        else:
            jax.distributed.initialize()
    except Exception as e:  # unreachable coordinator, undetected cluster: one line, not a traceback
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"could not join the multi-process run: {message}") from None


@dataclasses.dataclass
class MergeArgs:
    parts: tyro.conf.Positional[tuple[str, ...]]
    """Run directories of the parts (`rlcx sweep ... --part I/N --out DIR`)."""
    out: str = ""
    """Where the joined sweep is written."""
    overwrite: bool = False
    """Delete an existing directory at --out first."""


def parse_merge(argv: Sequence[str]) -> MergeArgs:
    args = tyro.cli(MergeArgs, args=list(argv), prog="rlcx sweep-merge")
    if not args.parts:
        raise CLIError("sweep-merge needs the part directories")
    for part in args.parts:
        if not pathlib.Path(part).is_dir():
            raise CLIError(f"No sweep directory at {part}")
    if not args.out:
        raise CLIError("sweep-merge needs --out DIR")
    check_directory_path(pathlib.Path(args.out))
    return args


# ----------------------------------------------------------------------------------------------
# rlcx meta
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class MetaOptions:
    seeds: int = 4
    """Number of seeds meta-trained at once (vmapped)."""
    seed: int = 0
    """Base PRNG seed; seed i uses split(PRNGKey(seed), seeds)[i]."""
    range: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """Override a sampled range of the task family, NAME=LOW:HIGH (repeatable), e.g. --range length=0.25:1.0."""
    out: str = ""
    """Run directory (default: runs/meta-<method>-<family>-<timestamp>)."""
    resume: bool = False
    """Continue the run in --out from its last checkpoint."""
    overwrite: bool = False
    """Delete an existing run in --out first."""
    chunks: int = 10
    """Number of chunks (progress / checkpoint points) the run is split into."""
    compile_cache: str = ""
    """JAX's persistent compilation cache: a directory, 'off', or '' for $RLCX_COMPILE_CACHE or else
    ~/.cache/rlcx_jax/jax."""


_META_RENAMED = {"method", "net", "family_ranges"}


def meta_args_class() -> type:
    """A flat dataclass of `rlcx meta` flags: run options + MetaConfig + its network + MetaHParams."""
    fields: list[tuple[str, Any, Any]] = []
    for cls, obj, prefix in (
        (MetaOptions, MetaOptions(), ""),
        (MetaConfig, MetaConfig(), ""),
        (NetConfig, MetaConfig().net, "net_"),
        (MetaHParams, MetaHParams(), ""),
    ):
        hints = typing.get_type_hints(cls, include_extras=True)
        docs = field_docs(cls)
        for f in dataclasses.fields(obj):
            if prefix == "" and f.name in _META_RENAMED:
                continue
            hint = Annotated[hints[f.name], tyro.conf.arg(help=docs[f.name])] if f.name in docs else hints[f.name]
            fields.append((prefix + f.name, hint, dataclasses.field(default=getattr(obj, f.name))))
    return dataclasses.make_dataclass("MetaArgs", fields)


def parse_meta(method: str, argv: Sequence[str]) -> tuple[Any, MetaConfig, MetaHParams]:
    """(run options, config, hyperparameters) of `rlcx meta METHOD`, all validated before jax loads."""
    check_method(method)
    args: Any = tyro.cli(meta_args_class(), args=list(argv), prog=f"rlcx meta {method}")
    values = dataclasses.asdict(args)
    net = NetConfig(**{f.name: values["net_" + f.name] for f in dataclasses.fields(NetConfig)})
    config_values = {f.name: values[f.name] for f in dataclasses.fields(MetaConfig) if f.name not in _META_RENAMED}
    config = MetaConfig(method=method, net=net, family_ranges=tuple(args.range), **config_values)
    hparams = MetaHParams(**{f.name: values[f.name] for f in dataclasses.fields(MetaHParams)})
    config.validate()
    hparams.validate()
    for name in ("seeds", "chunks"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.out:
        check_directory_path(pathlib.Path(args.out))
    return args, config, hparams


# ----------------------------------------------------------------------------------------------
# The other commands' flags
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class EvalArgs:
    run_dir: tyro.conf.Positional[str]
    """A run directory written by `rlcx train`."""
    episodes: int = 32
    """Episodes per seed."""
    seed: int = 0
    """Evaluation PRNG seed."""


def parse_eval(argv: Sequence[str]) -> EvalArgs:
    args = tyro.cli(EvalArgs, args=list(argv), prog="rlcx eval")
    if args.episodes < 1:
        raise CLIError(f"--episodes must be >= 1, got {args.episodes}")
    if not pathlib.Path(args.run_dir).is_dir():
        raise CLIError(f"No run directory at {args.run_dir}")
    return args


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


def parse_compress(argv: Sequence[str]) -> tuple[CompressArgs, CompressOptions, pathlib.Path]:
    args = tyro.cli(CompressArgs, args=list(argv), prog="rlcx compress")
    options = CompressOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CompressOptions)})
    options.validate()  # bad sparsity, bit width, N:M or scheme: clear error before anything compiles
    if args.episodes < 1:
        raise CLIError(f"--episodes must be >= 1, got {args.episodes}")
    run_dir = pathlib.Path(args.run_dir)
    if not args.run_dir or not run_dir.is_dir():
        raise CLIError(f"No run directory at {run_dir}")
    out_dir = pathlib.Path(args.out) if args.out else run_dir / "compressed"
    check_directory_path(out_dir)
    return args, options, out_dir


@dataclasses.dataclass(frozen=True)
class PipelineArgs(Recipe):
    recipe: str = ""
    """A TOML file of recipe settings (keys are the flags' names with underscores); flags override it."""
    out: str = ""
    """Run directory (default: runs/pipeline-<env>); finished stages there are skipped."""
    from_stage: str = ""
    """Re-run this stage and every later one (also spelled --from)."""


def parse_pipeline(argv: Sequence[str]) -> tuple[Recipe, pathlib.Path, str]:
    argv = ["--from-stage" if a == "--from" else a.replace("--from=", "--from-stage=", 1) for a in argv]
    path = _flag_value(argv, "--recipe") or ""
    base = load_recipe(pathlib.Path(path) if path else None)
    default = PipelineArgs(**{f.name: getattr(base, f.name) for f in dataclasses.fields(Recipe)})
    args = tyro.cli(PipelineArgs, args=argv, default=default, prog="rlcx pipeline")
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})
    recipe.validate()
    run_dir = pathlib.Path(args.out or f"runs/pipeline-{recipe.env}")
    check_directory_path(run_dir)
    return recipe, run_dir, args.from_stage


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
USAGE = """usage: rlcx {pipeline,train,eval,compress,plot,sweep,sweep-merge,meta,info} ...

  rlcx pipeline [--recipe FILE.toml] [--out DIR] [--from STAGE] [flags]
                                train a teacher, distil, prune, quantize, export, evaluate

  rlcx train {dqn,reinforce,a2c,ppo} [--env ID] [--seeds N] [--total-steps N] [--out DIR] [flags]
                                starts from the tuned preset of the algorithm and env (--preset none: raw defaults)
  rlcx train ppo --help         all flags of one algorithm
  rlcx eval RUN_DIR [--episodes N]
  rlcx compress RUN_DIR [--prune 0.9] [--structured 0.5] [--nm 2:4] [--quant int8] [--activations minmax]
  rlcx plot RUN_DIR [RUN_DIR ...] [--out FILE.png] [--label NAME ...]
                                learning curves of several runs: IQM over seeds with 95% bootstrap bands
  rlcx sweep {dqn,reinforce,a2c,ppo} --grid lr=1e-4,3e-4 [--grid NAME=...] [--random NAME=loguniform:LO:HI
             --samples N] [--seeds 4] [--chunk-size auto] [--part I/N] [any flag of rlcx train]
                                every setting x seed in one jitted, vmapped program over all devices; writes
                                results.csv/json (one row per setting and seed), summary.csv and sweep.png
  rlcx sweep-merge PART_DIR [PART_DIR ...] --out DIR
                                join the parts of a sweep run as independent jobs (--part I/N)
  rlcx meta {maml,fomaml,reptile,platipus,pretrain} [--family point-nav-uniform] [--seeds 4] [--iterations 500]
            [--inner-steps 1] [--inner-lr 0.1] [--range NAME=LO:HI] [--out DIR] [--resume]
                                meta-train over a task family, then the table of returns after 0..3 adaptation
                                steps on 40 test tasks (families: point-nav-uniform, point-nav-circle,
                                point-nav-sparse, cartpole, cartpole-flip, pendulum, acrobot, bandit, meta-maze)
  rlcx info                     jax version, backend, devices and their memory (paste it into bug reports)
"""


def _dispatch(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        if not argv:
            raise CLIError(f"missing command ({', '.join(COMMANDS)})")
        return
    command, rest = argv[0], argv[1:]
    if command in ("train", "sweep", "meta") and (not rest or rest[0] in ("-h", "--help")):
        print(USAGE)
        if not rest:
            what = (
                "method: one of " + ", ".join(METHODS)
                if command == "meta"
                else "algorithm: one of " + ", ".join(ALGORITHMS)
            )
            raise CLIError(f"missing {what}")
        return
    if command == "train":
        algorithm = rest[0]
        args = parse_train_args(algorithm, rest[1:])
        config, hparams = build_run(algorithm, args)
        preset = preset_for(algorithm, rest[1:])
        from rlcx_jax import runs

        note = None if preset is None else f"starting from the {algorithm} preset for {preset.env} ({preset.source})"
        runs.run_train(algorithm, args, config, hparams, note)
    elif command == "eval":
        eval_args = parse_eval(rest)
        from rlcx_jax import runs

        runs.run_eval(eval_args)
    elif command == "compress":
        compress_args, options, out_dir = parse_compress(rest)
        from rlcx_jax import runs

        runs.run_compress(compress_args, options, out_dir)
    elif command == "pipeline":
        recipe, run_dir, from_stage = parse_pipeline(rest)
        from rlcx_jax import runs

        runs.run_pipeline(recipe, run_dir, from_stage)
    elif command == "plot":
        from rlcx_jax import plot

        plot.run_plot(rest)
    elif command == "sweep":
        algorithm = rest[0]
        args = parse_train_args(algorithm, rest[1:], SweepOptions, "sweep")
        spec, chunk_size, part = build_sweep(algorithm, args)
        force_cpu_devices(args.cpu_devices)
        start_distributed(args)
        from rlcx_jax import runs

        runs.run_sweep(spec, args, chunk_size, part)
    elif command == "sweep-merge":
        merge_args = parse_merge(rest)
        from rlcx_jax import runs

        runs.run_sweep_merge(merge_args)
    elif command == "meta":
        meta_args, meta_config, meta_hparams = parse_meta(rest[0], rest[1:])
        from rlcx_jax import runs

        runs.run_meta(meta_args, meta_config, meta_hparams)
    elif command == "info":
        if rest and rest[0] not in ("-h", "--help"):
            raise CLIError(f"info takes no arguments, got {rest[0]!r}")
        if rest:
            print("usage: rlcx info\n\njax version, backend, devices and their memory, on one line each")
            return
        from rlcx_jax import runs

        runs.run_info()
    else:
        raise CLIError(f"unknown command {command!r}; expected {', '.join(COMMANDS)}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _dispatch(argv)
    except (ValueError, FileNotFoundError) as e:  # every error of ours is a ValueError (CheckpointError too)
        print(f"rlcx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlcx: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
