"""The CLI answers before jax loads: jax-free config modules, the static env table, pytree
registration after the fact, presets as flag defaults, and random input thrown at every command."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import subprocess
import sys
import time
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlcx_jax
from rlcx_jax import cli, presets
from rlcx_jax.configs import envs as env_table
from rlcx_jax.configs import nets as net_names

HEAVY = ("jax", "flax", "gymnax", "optax", "orbax", "distrax", "chex")
JAX_FREE = (
    "rlcx_jax.cli",
    "rlcx_jax.configs.base",
    "rlcx_jax.configs.envs",
    "rlcx_jax.configs.nets",
    "rlcx_jax.configs.algorithms",
    "rlcx_jax.configs.compress",
    "rlcx_jax.configs.multitask",
    "rlcx_jax.configs.pipeline",
    "rlcx_jax.configs.sweep",
    "rlcx_jax.configs.meta",
    "rlcx_jax.configs.tasks",
    "rlcx_jax.presets",
    "rlcx_jax.plot",
    "rlcx_jax.loggers",
    "rlcx_jax.logging",
)
BAD_INPUT = [
    ["--help"],
    ["train", "ppo", "--help"],
    ["frobnicate"],
    ["train", "ppoo"],
    ["train", "ppo", "--env", "CartPol-v1"],
    ["train", "ppo", "--lr", "-1"],
    ["train", "ppo", "--gamma", "1.5"],
    ["train", "dqn", "--env", "Pendulum-v1"],
    ["train", "dqn", "--gradient-steps", "0"],
    ["train", "ppo", "--net-dueling"],
    ["train", "ppo", "--adam-eps", "0"],
    ["train", "ppo", "--net-torso", "attn"],
    ["train", "ppo", "--preset", "tuned"],
    ["train", "ppo", "--log", "tensorbord"],
    ["train", "ppo", "--prune-schedule", "gradual", "--sparsity", "1.0"],
    ["eval", "/nonexistent/run"],
    ["compress", "/nonexistent/run", "--quant", "int1"],
    ["pipeline", "--sparsity", "1.5"],
    ["pipeline", "--stages", "teacher", "prune", "distill"],
    ["plot", "/nonexistent/run"],
    ["sweep", "ppo", "--help"],
    ["sweep", "ppo"],
    ["sweep", "ppo", "--grid", "lr="],
    ["sweep", "ppo", "--grid", "lrr=1e-3,1e-4"],
    ["sweep", "ppo", "--grid", "num_envs=4,8"],
    ["sweep", "ppo", "--grid", "gamma=0.9,1.5"],
    ["sweep", "ppo", "--grid", "sparsity=0.5,0.9"],
    ["sweep", "ppo", "--grid", "lr=1e-3", "--chunk-size", "0"],
    ["sweep", "ppo", "--random", "lr=loguniform:0:1e-3", "--samples", "4"],
    ["sweep", "ppo", "--grid", "lr=1e-3", "--part", "2/2"],
    ["sweep", "ppo", "--grid", "lr=1e-3", "--coordinator", "host:1234"],
    ["sweep", "ppo", "--grid", "lr=1e-3", "--cpu-devices", "-1"],
    ["sweep-merge", "/nonexistent/part-0", "--out", "merged"],
    ["info", "--devices"],
    ["meta", "maml", "--help"],
    ["meta"],
    ["meta", "mamll"],
    ["meta", "maml", "--family", "point-nav"],
    ["meta", "maml", "--inner-steps", "-1"],
    ["meta", "maml", "--meta-batch", "0"],
    ["meta", "maml", "--inner-lr", "0"],
    ["meta", "reptile", "--inner-steps", "0"],
    ["meta", "maml", "--family", "cartpole", "--range", "masspole=-0.1:0.5"],
    ["meta", "maml", "--family", "cartpole", "--range", "length=0:1"],
    ["meta", "maml", "--family", "cartpole", "--range", "mass=1:2"],
    ["meta", "platipus", "--kl-weight", "-1"],
    ["meta", "maml", "--inner-steps", "2", "--step-loss-weight", "-0.5"],
]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_cli_and_config_modules_import_without_jax() -> None:
    code = f"import sys\nfor m in {JAX_FREE!r}: __import__(m)\nprint(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_help_and_every_refused_input_are_answered_before_jax_is_imported() -> None:
    """Each case runs `main` in one fresh process and reports its exit code and whether jax got loaded."""
    code = (
        "import io, sys, contextlib\nfrom rlcx_jax.cli import main\n"
        f"for argv in {BAD_INPUT!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "        try:\n            rc = main(argv)\n        except SystemExit as e:\n            rc = e.code\n"
        "    print(rc, 'jax' in sys.modules)\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    answers = [line.split() for line in proc.stdout.splitlines()]
    assert len(answers) == len(BAD_INPUT)
    for argv, (rc, jax_loaded) in zip(BAD_INPUT, answers):
        assert rc == ("0" if "--help" in argv else "2"), argv
        assert jax_loaded == "False", f"{argv} imported jax before answering"


NEW_FLAG_ERRORS = [
    (["train", "dqn", "--gradient-steps", "0"], "gradient_steps must be positive"),
    (["train", "dqn", "--gradient-steps", "-2"], "gradient_steps must be positive"),
    (["train", "ppo", "--net-dueling"], "net.dueling applies to Q-networks (dqn) only"),
    (["train", "a2c", "--net-dueling"], "net.dueling applies to Q-networks (dqn) only"),
    (["train", "reinforce", "--net-dueling"], "net.dueling applies to Q-networks (dqn) only"),
    (["train", "ppo", "--adam-eps", "0"], "adam_eps must be positive"),
    (["train", "dqn", "--adam-eps", "-1e-8"], "adam_eps must be positive"),
    (["train", "ppo", "--net", "attention", "--net-attention-heads", "3"], "attention_heads=3 must divide"),
    (["train", "dqn", "--net", "atention"], "Unknown torso 'atention'. Did you mean 'attention'?"),
    (["train", "ppo", "--net", "memory", "--net-attention-pool", "max"], "Unknown attention pooling 'max'"),
    (["train", "ppo", "--net", "attention", "--net-attention-depth", "0"], "attention_depth must be >= 1"),
    (["train", "ppo", "--task-gradient", "pcgrad"], "multitask needs a multi-task network"),
    (
        ["train", "dqn", "--env", "MultiTaskCartPole-v0", "--net-num-tasks", "5", "--task-gradient", "pcgrad"],
        "MultiTaskCartPole-v0 has 10 tasks, but the network has num_tasks=5",
    ),
    (
        ["train", "ppo", "--env", "MultiTaskCartPole-v0", "--net-num-tasks", "10", "--task-weights", "1", "2"],
        "task_weights need task_gradient weighted or pcgrad",
    ),
    (
        [
            "train",
            "ppo",
            "--env",
            "MultiTaskCartPole-v0",
            "--net-num-tasks",
            "10",
            "--task-gradient",
            "weighted",
            "--task-weights",
            "1",
            "2",
        ],
        "task_weights has 2 entries for 10 tasks",
    ),
    (["train", "ppo", "--task-gradient", "pcgard"], "Unknown task gradient 'pcgard'"),
    (["train", "ppo", "--net-num-tasks", "1"], "num_tasks must be 0 (off) or >= 2"),
]


def test_dueling_gradient_steps_and_adam_eps_errors_are_one_line_before_jax() -> None:
    """Refused values of the dueling / gradient-steps / Adam-epsilon flags: exit code 2 and one
    `rlcx: error:` line naming the flag, no traceback, jax not loaded; the accepted values (dueling
    on dqn) are built into the config and hyperparameters, still without jax."""
    code = (
        "import io, json, sys, contextlib\nfrom rlcx_jax.cli import main, build_run, parse_train_args\n"
        f"for argv in {[argv for argv, _ in NEW_FLAG_ERRORS]!r}:\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):\n"
        "        try:\n            rc = main(argv)\n        except SystemExit as e:\n            rc = e.code\n"
        "    print(json.dumps([rc, 'jax' in sys.modules, err.getvalue()]))\n"
        "argv = ['--net-dueling', '--gradient-steps', '3', '--adam-eps', '1e-8']\n"
        "config, hparams = build_run('dqn', parse_train_args('dqn', argv))\n"
        "print(json.dumps([config.net.dueling, config.gradient_steps, hparams.adam_eps, 'jax' in sys.modules]))\n"
        "config, _ = build_run('ppo', parse_train_args('ppo', ['--net', 'memory', '--net-memory-slots', '4']))\n"
        "print(json.dumps([config.net.torso, config.net.memory_slots, 'jax' in sys.modules]))\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    *answers, accepted, attention = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(answers) == len(NEW_FLAG_ERRORS)
    for (argv, message), (rc, jax_loaded, err) in zip(NEW_FLAG_ERRORS, answers):
        assert rc == 2 and not jax_loaded, (argv, rc, jax_loaded)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert err.startswith("rlcx: error: ") and message in err, (argv, err)
    assert accepted == [True, 3, 1e-8, False]
    assert attention == ["memory", 4, False]  # `--net` is `--net-torso`


def test_cpu_devices_flag_replaces_an_earlier_count_and_keeps_other_xla_flags() -> None:
    flag = "--xla_force_host_platform_device_count"
    assert cli.with_cpu_devices("", 4) == f"{flag}=4"
    assert cli.with_cpu_devices(f"--xla_cpu_enable_fast_math=false {flag}=8", 2) == (
        f"--xla_cpu_enable_fast_math=false {flag}=2"
    )


def test_help_takes_less_time_than_importing_jax() -> None:
    """Medians of 5 alternating runs: `rlcx --help` in a fresh interpreter against `import jax` alone
    (the relative split holds on any host, however loaded)."""
    times: dict[str, list[float]] = {"help": [], "jax": []}
    commands = {"help": [sys.executable, "-m", "rlcx_jax.cli", "--help"], "jax": [sys.executable, "-c", "import jax"]}
    for _ in range(5):
        for name, command in commands.items():
            t = time.perf_counter()
            subprocess.run(command, capture_output=True, check=True, timeout=300)
            times[name].append(time.perf_counter() - t)
    assert statistics.median(times["help"]) < statistics.median(times["jax"]), times


def test_env_table_is_gymnax_registry_and_action_spaces() -> None:
    import gymnax

    from rlcx_jax import envs

    assert list(env_table.GYMNAX_ENVS) == list(gymnax.registered_envs)
    for name, discrete in env_table.known_envs().items():
        if name == "MNISTBandit-bsuite":  # downloads MNIST on construction
            continue
        env, params = envs.make(name)
        assert hasattr(env.action_space(params), "n") == discrete, name


def test_static_torso_and_activation_names_are_the_registered_ones() -> None:
    from rlcx_jax import nets

    assert set(nets.TORSOS) == net_names.TORSO_NAMES
    assert tuple(nets.ACTIVATIONS) == net_names.ACTIVATION_NAMES


def test_pytree_dataclass_declared_before_jax_is_registered_once_jax_loads() -> None:
    code = (
        "import sys\nfrom rlcx_jax import pytree\n"
        "@pytree.dataclass\nclass H:\n    lr: float = 1.0\n    n: int = pytree.field(static=True, default=3)\n"
        "assert 'jax' not in sys.modules and not pytree.is_registered(H)\n"
        "import jax, jax.numpy as jnp\n"
        "h = H(lr=jnp.arange(3.0))\n"
        "print(jax.tree.leaves(h), jax.vmap(lambda h: h.lr * h.n)(h).tolist(), h.replace(n=4).n)\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[Array([0., 1., 2.], dtype=float32)] [0.0, 3.0, 6.0] 4", proc.stdout


def test_hparams_are_pytrees_whose_leaves_are_the_traced_values() -> None:
    import jax

    from rlcx_jax.rl import ppo

    hp = ppo.PPOHParams(lr=1e-3, clip_eps=0.3)
    names = [str(k[0].name) for k, _ in jax.tree_util.tree_flatten_with_path(hp)[0]]
    assert names == ["lr", "gamma", "max_grad_norm", "adam_eps", "ent_coef", "vf_coef", "gae_lambda", "clip_eps"]
    assert jax.tree.leaves(hp)[0] == 1e-3 and jax.tree.leaves(hp)[-1] == 0.3


# ----------------------------------------------------------------------------------------------
# Presets as flag defaults
# ----------------------------------------------------------------------------------------------
def test_train_starts_from_the_environments_preset_and_flags_override_it() -> None:
    preset = presets.get("ppo", "Pendulum-v1")
    assert preset is not None
    args = cli.parse_train_args("ppo", ["--env", "Pendulum-v1"])
    for name, value in preset.values.items():
        assert getattr(args, name) == value, name
    config, hparams = cli.build_run("ppo", args)
    assert config.total_timesteps == preset.total_steps and hparams.gamma == preset.values["gamma"]

    overridden = cli.parse_train_args("ppo", ["--env=Pendulum-v1", "--gamma", "0.9"])
    assert overridden.gamma == 0.9 and overridden.lr == preset.values["lr"]

    raw = cli.parse_train_args("ppo", ["--env", "Pendulum-v1", "--preset", "none"])
    defaults = cli.train_args_class("ppo")()
    assert dataclasses.asdict(raw) == {**dataclasses.asdict(defaults), "env": "Pendulum-v1", "preset": "none"}


def test_cartpole_presets_are_the_algorithm_defaults() -> None:
    """The suite's CLI runs on CartPole rely on the defaults; the presets must not move them."""
    for algorithm in ("ppo", "dqn"):
        preset_args = dataclasses.asdict(cli.parse_train_args(algorithm, []))
        raw_args = dataclasses.asdict(cli.parse_train_args(algorithm, ["--preset", "none"]))
        changed = {k for k in preset_args if preset_args[k] != raw_args[k] and k not in ("preset", "total_steps")}
        assert not changed, (algorithm, changed)


# ----------------------------------------------------------------------------------------------
# Random input thrown at every command
# ----------------------------------------------------------------------------------------------
class _Recorder(types.ModuleType):
    """Stands in for `rlcx_jax.runs`: records what a command would run, so no input reaches jax."""

    def __init__(self) -> None:
        super().__init__("rlcx_jax.runs")
        self.calls: list[tuple[str, tuple]] = []
        for name in (
            "run_train",
            "run_eval",
            "run_compress",
            "run_pipeline",
            "run_sweep",
            "run_sweep_merge",
            "run_info",
            "run_meta",
        ):
            setattr(self, name, lambda *a, _name=name: self.calls.append((_name, a)))


def _flags(command: str) -> list[str]:
    fields = {
        "train": dataclasses.fields(cli.train_args_class("ppo")) + dataclasses.fields(cli.train_args_class("dqn")),
        "compress": dataclasses.fields(cli.CompressArgs),
        "pipeline": dataclasses.fields(cli.PipelineArgs),
        "eval": dataclasses.fields(cli.EvalArgs),
        "plot": (),
        "sweep": dataclasses.fields(cli.train_args_class("ppo", cli.SweepOptions, "Sweep")),
        "sweep-merge": dataclasses.fields(cli.MergeArgs),
        "meta": dataclasses.fields(cli.meta_args_class()),
        "info": (),
    }[command]
    return sorted({"--" + f.name.replace("_", "-") for f in fields} | {"--help", "--out", "--label"})


VALUES = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            "0",
            "-1",
            "1e400",
            "nan",
            "inf",
            "",
            "x",
            "True",
            "2:4",
            "int8",
            "uniform",
            "gradual",
            "tensorboard",
            "CartPole-v1",
            "point-nav-circle",
            "cartpole",
            "length=0.1:2",
            "Pendulum-v1",
            "cnn",
            "relu",
            "none",
            "auto",
            "64",
            "64 64",
        ]
    ),
    st.text(max_size=12),
)


@st.composite
def _argv(draw: st.DrawFn) -> list[str]:
    command = draw(st.sampled_from([*cli.COMMANDS, "", "trian", "-h"]))
    argv = [command] if command else []
    if command in ("train", "sweep"):
        argv.append(draw(st.sampled_from([*cli.ALGORITHMS, "ppoo", "--env"])))
    if command == "meta":
        argv.append(draw(st.sampled_from([*cli.METHODS, "mam", "--family"])))
    if command == "sweep":
        argv += [
            draw(st.sampled_from(["--grid", "--random"])),
            draw(st.sampled_from(["lr=1e-3,1e-4", "lr=uniform:0.1:0.2", "gamma=", "x=1"])),
        ]
    if command in ("eval", "compress", "plot", "sweep-merge"):
        argv.append(draw(st.sampled_from(["RUN", "/nonexistent", "", "--episodes"])))
    flags = _flags(command) if command in cli.COMMANDS else ["--x"]
    for _ in range(draw(st.integers(0, 4))):
        argv += [draw(st.sampled_from(flags)), draw(VALUES)]
    return argv


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("fuzz") / "run"
    path.mkdir()
    (path / "metrics.jsonl").write_text('{"seed": 0, "update": 1, "episode/episode_return": 1.0}\n')
    return str(path)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=_argv())
def test_random_input_to_every_command_exits_0_or_2_with_at_most_one_line_of_error(
    argv: list[str], run_dir: str, monkeypatch, capsys
) -> None:
    argv = [run_dir if a == "RUN" else a for a in argv]
    recorder = _Recorder()
    # `from rlcx_jax import runs` reads the package attribute first, which exists once any earlier test in
    # this worker imported the real module; replace both or a random recipe really trains.
    monkeypatch.setitem(sys.modules, "rlcx_jax.runs", recorder)
    monkeypatch.setattr(rlcx_jax, "runs", recorder, raising=False)
    monkeypatch.setattr("rlcx_jax.plot._draw", lambda *a, **k: None)  # no figure files while fuzzing
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # tyro's own parse errors and --help
        rc = e.code
    err = capsys.readouterr().err
    assert rc in (0, 2), (argv, rc, err)
    assert "Traceback" not in err, (argv, err)
    if rc == 2 and err.startswith("rlcx: error:"):
        assert len(err.strip().splitlines()) == 1, (argv, err)
    for name, args in recorder.calls:  # what would have run holds valid, finite settings
        if name == "run_train":
            _, _, config, hparams, _ = args
            config.validate()
            hparams.validate(config.extensions)
            assert all(math.isfinite(v) for v in dataclasses.astuple(hparams) if isinstance(v, float)), hparams
        elif name == "run_pipeline":
            args[0].validate()
        elif name == "run_sweep":
            args[0].validate()  # the spec: every setting's values in range
        elif name == "run_meta":
            _, config, hparams = args
            config.validate()
            hparams.validate()
