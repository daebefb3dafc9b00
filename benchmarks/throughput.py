"""Throughput benchmark: rlcx_jax against rejax on CartPole-v1, in one invocation.

    python benchmarks/throughput.py                       # every workload, 1 / 8 / 32 seeds, 3 repeats
    python benchmarks/throughput.py --quick               # smoke run, a few minutes
    python benchmarks/throughput.py --algos ppo --seeds 1 8 --repeats 5

Workloads (`--algos`), each with both libraries on the settings named:
  ppo        PureJaxRL's CartPole PPO (rejax's PPO differs in details: rejax_runner.py NOTES).
  dqn        PureJaxRL's CartPole DQN, like for like: the same network, batch, gradient and target
             steps on both sides, no gradient clipping, Adam's epsilon 1e-8.
  dqn-rejax  rejax's own CartPole DQN config (dueling swish 64x64, double DQN, batch 100, 5 gradient
             steps per 10 env steps, Polyak target), like for like, 100k steps (its own budget).
  a2c, reinforce   rlcx_jax's defaults; rejax has neither, so these rows are ours alone.

Sides (`--sides`): `ours` is `jax.jit(jax.vmap(train))` on one device; `ours-sharded` splits the same
vmapped seeds over one XLA:CPU device per usable core (`rlcx_jax.shard`, XLA_FLAGS
--xla_force_host_platform_device_count, what `rlcx sweep --cpu-devices N` does), for 2 seeds or more;
`rejax` is rejax 0.1.3's `jax.jit(jax.vmap(algo.train))`.

Tracing + compilation is done ahead of time (`.lower(...).compile()`) and reported apart from the run
time; each timed run executes the compiled function and waits for it (`block_until_ready`). The sides
alternate within every repeat (the order reverses on odd repeats), and the figure reported is the
median over repeats of env steps/s = n_seeds * env steps per seed / run seconds. The final policy of
every seed is evaluated after timing (untimed) over --eval-episodes episodes, so each throughput figure
sits beside the returns it produced.

Each side runs in its own long-lived worker process that keeps its compiled functions between
repeats; only one of them computes at a time. rejax 0.1.3 needs gymnax 0.0.9 (old step API), so its
worker (benchmarks/rejax_runner.py --serve) runs in benchmarks/.rejax-venv, created on first use;
ours is `throughput.py --worker ours` under this interpreter. A request that outlives --timeout
(XLA:CPU's thread pool can wedge and leave a run waiting forever) gets its worker killed and
restarted and is retried; such hangs are listed in the JSON.

Results: a table on stdout and JSON in benchmarks/results/throughput_<cpu>.json
(throughput_<cpu>_quick.json for --quick) with hardware, versions of both sides, settings, every
raw timing, medians, returns and ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import re
import select
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
REJAX_VENV = HERE / ".rejax-venv"
RUNNER = HERE / "rejax_runner.py"

# Known-good set for the rejax venv (checked on Python 3.11, CPU): rejax 0.1.3 with gymnax 0.0.9
# works with jax/jaxlib 0.10.2 and flax 0.12.8. Library versions shared with our side (jax, jaxlib,
# flax, optax, distrax, chex, numpy) are pinned to what THIS interpreter has, so both sides run
# the same XLA; the fallbacks below are used only when a package is missing here.
REJAX_PINS = {"rejax": "0.1.3", "gymnax": "0.0.9"}
SHARED_FALLBACK_PINS = {
    "jax": "0.10.2",
    "jaxlib": "0.10.2",
    "flax": "0.12.8",
    "optax": "0.2.8",
    "distrax": "0.1.9",
    "chex": "0.1.92",
    "numpy": "2.4.6",
}
VERSION_PACKAGES = ("jax", "jaxlib", "flax", "optax", "gymnax", "distrax", "chex", "numpy")

ALGOS = ("ppo", "dqn", "dqn-rejax", "a2c", "reinforce")
SIDES = ("ours", "ours-sharded", "rejax")
REJAX_ALGOS = ("ppo", "dqn", "dqn-rejax")  # what rejax 0.1.3 has (no A2C, no REINFORCE)
LIKE_FOR_LIKE = {
    "ppo": False,  # rejax's PPO differs in details (benchmarks/rejax_runner.py NOTES); same workload sizes
    "dqn": True,
    "dqn-rejax": True,
    "a2c": False,
    "reinforce": False,
}
"""Points where both libraries run identical settings (network, batch, gradient steps, target updates,
optimizer), up to the differences rejax_runner.py's NOTES list for that point."""
DEFAULT_TOTAL = {**{a: 500_000 for a in ALGOS}, "dqn-rejax": 100_000}  # rejax's config trains for 100k
QUICK_TOTAL = {"ppo": 20_480, "dqn": 20_000, "dqn-rejax": 20_000, "a2c": 20_480, "reinforce": 20_480}

# PureJaxRL's CartPole settings in rlcx_jax's vocabulary (config fields are static, hparams traced).
OUR_SETTINGS = {
    "ppo": {
        "config": {
            "env": "CartPole-v1",
            "num_envs": 4,
            "num_steps": 128,
            "update_epochs": 4,
            "num_minibatches": 4,
            "anneal_lr": True,
            "net": {"hidden": (64, 64), "activation": "tanh"},
        },
        "hparams": {
            "lr": 2.5e-4,
            "gamma": 0.99,
            "gae_lambda": 0.95,
            "clip_eps": 0.2,
            "ent_coef": 0.01,
            "vf_coef": 0.5,
            "max_grad_norm": 0.5,
        },
    },
    "dqn": {
        "config": {
            "env": "CartPole-v1",
            "num_envs": 10,
            "buffer_size": 10_000,
            "batch_size": 128,
            "learning_starts": 10_000,
            "train_frequency": 10,
            "target_update_period": 500,
            "eps_start": 1.0,
            "eps_end": 0.05,
            "eps_decay_fraction": 0.5,
            "net": {"hidden": (120, 84), "activation": "relu"},
        },
        # PureJaxRL: no gradient clipping (1e10 never binds) and optax.adam's default epsilon, as rejax.
        "hparams": {"lr": 2.5e-4, "gamma": 0.99, "tau": 1.0, "max_grad_norm": 1e10, "adam_eps": 1e-8},
    },
    # rejax's own CartPole DQN (rejax_runner.py DQN_REJAX_SETTINGS) in rlcx_jax's vocabulary.
    "dqn-rejax": {
        "config": {
            "env": "CartPole-v1",
            "num_envs": 10,
            "buffer_size": 50_000,
            "batch_size": 100,
            "learning_starts": 5_000,
            "train_frequency": 10,
            "gradient_steps": 5,
            "target_update_period": 10,
            "eps_start": 1.0,
            "eps_end": 0.05,
            "eps_decay_fraction": 0.5,
            "double": True,
            "net": {"hidden": (64, 64), "activation": "silu", "dueling": True},
        },
        "hparams": {"lr": 1e-3, "gamma": 0.99, "tau": 0.02, "max_grad_norm": 10.0, "adam_eps": 1e-8},
    },
    # rlcx_jax's own A2C and REINFORCE defaults (no rejax counterpart).
    "a2c": {"config": {"env": "CartPole-v1"}, "hparams": {}},
    "reinforce": {"config": {"env": "CartPole-v1"}, "hparams": {}},
}


# ----------------------------------------------------------------------------------------------
# Machine and version facts
# ----------------------------------------------------------------------------------------------
def cpu_info() -> dict:
    model, count = platform.processor() or "unknown", os.cpu_count()
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        if m:
            model = m.group(1).strip()
        count = len(re.findall(r"^processor\s*:", text, re.M)) or count
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else count
    mem_gib = None
    try:
        m = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        mem_gib = round(int(m.group(1)) / 2**20, 1) if m else None
    except OSError:
        pass
    return {"cpu_model": model, "logical_cores": count, "usable_cores": affinity,
            "memory_gib": mem_gib, "machine": platform.machine(), "os": platform.platform()}


def cpu_short_name(model: str) -> str:
    name = re.sub(r"\((r|tm)\)|cpu|processor|\d+-core|@.*$", "", model, flags=re.I)
    name = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return name or "cpu"


def git_state(paths: tuple[str, ...] = (), max_paths: int | None = None) -> dict | None:
    """The repository's HEAD and whether the tree differs from it (`git status --porcelain`, untracked
    files included), over `paths` (default: the whole tree); `dirty_paths` lists at most `max_paths`
    of them (all if None), `dirty_count` how many there are. None where git or the repository is missing."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                                  check=True).stdout

        head = git("rev-parse", "HEAD").strip()
        dirty = [ln[3:] for ln in git("status", "--porcelain", "--", *paths).splitlines() if ln.strip()]
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": head, "dirty": bool(dirty), "dirty_count": len(dirty),
            "dirty_paths": dirty if max_paths is None else dirty[:max_paths]}


def local_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in VERSION_PACKAGES + ("rlcx_jax",):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    git = git_state(("rlcx_jax",), max_paths=0)
    out["rlcx_jax_git"] = None if git is None else git["commit"] + ("+dirty" if git["dirty"] else "")
    return out


def jax_environment(env: dict[str, str] | None = None) -> dict:
    """The variables that change what XLA does, as the workers see them."""
    env = os.environ if env is None else env
    keys = ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_ENABLE_X64", "JAX_COMPILATION_CACHE_DIR",
            "OMP_NUM_THREADS", "TF_CPP_MIN_LOG_LEVEL")
    return {k: env.get(k) for k in keys}


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _system_busy_s() -> float | None:
    """CPU seconds spent busy by the whole machine so far (all cores; /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def contention(busy0: float | None, cpu0: float, run_s: float) -> dict:
    """CPU seconds other processes used while a run was timed (from /proc/stat minus our own)."""
    busy1, cpu1 = _system_busy_s(), time.process_time()
    if busy0 is None or busy1 is None:
        return {}
    own = cpu1 - cpu0
    other = max(busy1 - busy0 - own, 0.0)
    cores = os.cpu_count() or 1
    return {"own_cpu_s": own, "other_cpu_s": other, "other_cpu_frac": other / max(run_s * cores, 1e-9)}


# ----------------------------------------------------------------------------------------------
# The rejax side: venv + worker subprocess
# ----------------------------------------------------------------------------------------------
def probe(python: str, code: str, what: str, env: dict[str, str] | None = None, timeout_s: float = 900) -> dict:
    """Run `code` in a fresh `python` process and return the JSON of its last `RESULT ` line (what
    compile_time.py and against_commit.py sample); a failed process ends the benchmark naming `what`."""
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, timeout=timeout_s)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def rejax_pins(override: list[str] | None) -> list[str]:
    pins = dict(REJAX_PINS)
    for name, fallback in SHARED_FALLBACK_PINS.items():
        try:
            pins[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pins[name] = fallback
    for spec in override or []:
        name, _, version = spec.partition("==")
        pins[name.strip()] = version.strip()
    return [f"{k}=={v}" for k, v in sorted(pins.items())]


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_rejax_venv(venv: Path, pins: list[str], log=print) -> dict:
    """Create (or re-create, when the pins changed) the rejax venv. Returns what was done."""
    stamp = venv / "rlcx-bench-pins.txt"
    wanted = "\n".join(pins) + "\n"
    if venv_python(venv).exists() and stamp.exists() and stamp.read_text() == wanted:
        return {"created": False, "path": str(venv), "pins": pins}
    log(f"[setup] creating rejax venv at {venv} with {' '.join(pins)} (once; takes about a minute)")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(venv_python(venv)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    proc = subprocess.run(pip + pins, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"pip install into {venv} failed; try other versions with --rejax-pin NAME==VER")
    stamp.write_text(wanted)
    seconds = time.perf_counter() - t0
    log(f"[setup] rejax venv ready in {seconds:.0f} s")
    return {"created": True, "path": str(venv), "pins": pins, "create_s": seconds}


class WorkerHung(RuntimeError):
    """A worker did not answer within its time limit (it was killed)."""


class Worker:
    """A side's long-lived worker process: one JSON request line in, one JSON line out.

    Each side runs in a process of its own, so a computation that never finishes (XLA:CPU's thread
    pool can wedge, leaving block_until_ready waiting forever) can be detected by a time limit,
    the worker killed and restarted, and the run retried; the hang is recorded in the results.
    """

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], ready_timeout_s: float = 300.0):
        self.name, self.cmd, self.env = name, cmd, env
        self.ready_timeout_s = ready_timeout_s
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-{self.name}-", suffix=".log", delete=False)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, bufsize=1, cwd=str(REPO), env=self.env)
        self.ready = self._read(self.ready_timeout_s)
        self.ready["startup_s"] = time.perf_counter() - t0
        if self.ready.get("event") != "ready":
            raise RuntimeError(f"{self.name} worker did not start: {self.ready}")

    def _stderr_tail(self, n: int = 4000) -> str:
        self.log.flush()
        try:
            return Path(self.log.name).read_text()[-n:]
        except OSError:
            return ""

    def _read(self, timeout_s: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            self._kill()
            raise WorkerHung(f"{self.name} worker gave no answer in {timeout_s:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker exited (rc={self.proc.wait()}); its stderr:\n{self._stderr_tail()}")
        return json.loads(line)

    def request(self, req: dict, timeout_s: float) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        res = self._read(timeout_s)
        if not res.get("ok", False):
            raise RuntimeError(f"{self.name} worker failed on {req}: {res.get('error')}\n{res.get('traceback', '')}")
        return res

    def restart(self) -> None:
        self._kill()
        self.restarts += 1
        self._start()

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._drop_log()

    def _drop_log(self) -> None:
        self.log.close()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._drop_log()


# ----------------------------------------------------------------------------------------------
# Our side: rlcx_jax, served by `throughput.py --worker ours`
# ----------------------------------------------------------------------------------------------
def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    try:
        v = np.asarray(x)
        if v.ndim == 0:
            return _jsonable(v.item())
        return _jsonable(v.tolist())
    except Exception:
        return str(x)


class OurPoint:
    """One (algo, n_seeds, total_timesteps) of rlcx_jax: built and compiled once, run many times."""

    def __init__(self, algo: str, n_seeds: int, total_timesteps: int, seed: int):
        import jax
        import jax.numpy as jnp

        from rlcx_jax import rl
        from rlcx_jax.nets import NetConfig

        self.jax = jax
        self.algo, self.n_seeds = algo, n_seeds
        self.rl_name = algo.split("-")[0]  # "dqn-rejax" is DQN with other settings
        spec = rl.get(self.rl_name)
        module, config_cls, hparams_cls = spec.module, spec.config_cls, spec.hparams_cls
        settings = OUR_SETTINGS[algo]

        t0 = time.perf_counter()
        kwargs = dict(settings["config"])
        if "net" in kwargs:
            kwargs["net"] = NetConfig(**kwargs["net"])
        kwargs["total_timesteps"] = total_timesteps
        if os.environ.get("RLCX_BENCH_PRNG_IMPL"):  # set by --prng-impl in the parent process
            kwargs["prng_impl"] = os.environ["RLCX_BENCH_PRNG_IMPL"]
        fields = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise TypeError(f"{config_cls.__name__} has no field(s) {unknown}; it has {sorted(fields)}")
        cfg = config_cls(**kwargs)
        # Keep the metrics cadence legal for short runs (it does not change the training work).
        if "log_every" in fields:
            num_updates = getattr(cfg, "num_updates", None)
            if isinstance(num_updates, int) and num_updates > 0 and num_updates % cfg.log_every:
                cfg = dataclasses.replace(cfg, log_every=math.gcd(num_updates, cfg.log_every))
        self.cfg = cfg
        hp = hparams_cls(**settings["hparams"])
        self.hparams = hp
        self.module = module
        train = module.make_train(cfg)

        steps_per_update = getattr(cfg, "steps_per_update", None)
        num_updates = getattr(cfg, "num_updates", None)
        if isinstance(steps_per_update, int) and isinstance(num_updates, int):
            self.env_steps_per_seed = steps_per_update * num_updates
        else:
            self.env_steps_per_seed = total_timesteps
        self.keys = jax.random.split(jax.random.PRNGKey(seed), n_seeds)
        self.eval_key = jax.random.fold_in(jax.random.PRNGKey(seed), 1_000_003)
        self.hps = jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (n_seeds,) + jnp.shape(x)), hp)
        t1 = time.perf_counter()
        # rlcx_jax.xla.jit is the documented way to compile our programs (jax.jit + per-backend XLA
        # options); --compiler-options off compiles with plain jax.jit for the ablation.
        from rlcx_jax import xla

        # the config decides whether this many seeds on one device compile with the fused-product options
        off = os.environ.get("RLCX_BENCH_COMPILER_OPTIONS") == "off"
        self.compiler_options = {} if off else xla.compiler_options(fused_products=cfg.fused_products(n_seeds))
        options = self.compiler_options or None
        # ours-sharded: the seed axis split over every device (one XLA:CPU device per core, forced with
        # XLA_FLAGS by the parent) with rlcx_jax.shard, as `rlcx train --seeds N` runs on several devices.
        self.sharded = os.environ.get("RLCX_BENCH_SHARDED") == "1"
        if self.sharded:
            from rlcx_jax import shard

            mesh = shard.run_mesh()
            self.args = shard.place_rows((self.keys, self.hps), mesh)
            fused = cfg.fused_products(math.ceil(n_seeds / len(jax.devices())))  # seeds on one device
            jitted = shard.jit_rows(jax.vmap(train), mesh, fused)  # always with rlcx_jax.xla's options
            self.compiler_options = xla.compiler_options(fused_products=fused)
        else:
            self.args = (self.keys, self.hps)
            jitted = jax.jit(jax.vmap(train), compiler_options=options)
        lowered = jitted.lower(*self.args)
        t2 = time.perf_counter()
        self.compiled = lowered.compile()
        t3 = time.perf_counter()
        self.compile_info = {"build_s": t1 - t0, "trace_lower_s": t2 - t1, "xla_compile_s": t3 - t2,
                             "compile_s": t3 - t1}
        self.settings = {"config": _jsonable(cfg), "hparams": _jsonable(hp),
                         "env_steps_per_seed": self.env_steps_per_seed, "compiler_options": self.compiler_options,
                         "devices": len(jax.devices()) if self.sharded else 1}
        self.out = None

    def run(self) -> dict:
        busy0, cpu0 = _system_busy_s(), time.process_time()
        t0 = time.perf_counter()
        out = self.compiled(*self.args)
        self.jax.block_until_ready(out)
        run_s = time.perf_counter() - t0
        load = contention(busy0, cpu0, run_s)
        self.out = out
        res = {"run_s": run_s, "env_steps_per_seed": self.env_steps_per_seed,
               "env_steps": self.env_steps_per_seed * self.n_seeds,
               "steps_per_s": self.env_steps_per_seed * self.n_seeds / run_s, **load}
        env_steps = getattr(getattr(out, "metrics", None), "env_steps", None)
        if env_steps is not None:  # cross-check: the library's own step counter
            res["metrics_env_steps_max"] = int(np.max(np.asarray(env_steps)))
        return res

    def evaluate(self, num_episodes: int) -> dict:
        jax = self.jax
        state = jax.tree.map(lambda x: x[: self.n_seeds], self.out.state)  # drop the sharded side's padding
        keys = jax.random.split(self.eval_key, self.n_seeds)
        greedy = self.rl_name == "dqn"
        t0 = time.perf_counter()
        try:  # vmapped over seeds, one compilation
            from rlcx_jax.rl.evaluate import make_evaluator

            ev = make_evaluator(self.module.make(self.cfg), num_episodes, greedy)
            returns = np.asarray(jax.jit(jax.vmap(ev))(state.params, state.obs_stats, keys))
            how = "rlcx_jax.rl.evaluate.make_evaluator, vmapped over seeds"
        except (ImportError, AttributeError, TypeError):  # the documented per-seed entry point
            from rlcx_jax.rl.evaluate import evaluate

            rows = []
            for i in range(self.n_seeds):
                params_i = jax.tree.map(lambda x: x[i], state.params)
                rows.append(np.asarray(evaluate(self.rl_name, self.cfg, params_i, keys[i], num_episodes=num_episodes)))
            returns = np.stack(rows)
            how = "rlcx_jax.rl.evaluate.evaluate, per seed"
        eval_s = time.perf_counter() - t0
        per_seed = returns.mean(axis=1)
        return {
            "episodes_per_seed": num_episodes,
            "policy": "greedy" if greedy else "stochastic",
            "how": how,
            "mean_return_per_seed": [float(x) for x in per_seed],
            "min_episode_return_per_seed": [float(x) for x in returns.min(axis=1)],
            "mean_over_seeds": float(per_seed.mean()),
            "min_over_seeds": float(per_seed.min()),
            "eval_s": eval_s,
        }


class OurWorker:
    """rlcx_jax side of the worker protocol (same requests and answers as rejax_runner.py)."""

    def __init__(self):
        self.points: dict[tuple, OurPoint] = {}

    def handle(self, req: dict) -> dict:
        key = (req["algo"], int(req["n_seeds"]), int(req["total_timesteps"]), int(req.get("seed", 0)))
        fresh = key not in self.points
        if fresh:
            self.points[key] = OurPoint(*key)
        point = self.points[key]
        res = {"algo": key[0], "n_seeds": key[1], "total_timesteps_requested": key[2], "seed": key[3]}
        if fresh:
            res["compile"] = point.compile_info
            res["settings"] = point.settings
        res.update(point.run())
        if req.get("evaluate", False):
            res["returns"] = point.evaluate(int(req.get("eval_episodes", 32)))
        if req.get("drop", False):
            del self.points[key]
        return res


def serve_ours() -> None:
    """`throughput.py --worker ours`: answer requests on stdin, one JSON line each on stdout."""
    import traceback

    out = sys.stdout
    sys.stdout = sys.stderr  # anything printed by libraries must not corrupt the protocol
    t0 = time.perf_counter()
    import jax

    import rlcx_jax.rl  # noqa: F401  (import cost measured here, not in the first compile)

    def emit(obj: dict) -> None:
        out.write(json.dumps(_jsonable(obj)) + "\n")
        out.flush()

    emit({"event": "ready", "versions": local_versions(), "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()], "import_s": time.perf_counter() - t0})
    worker = OurWorker()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            if req.get("op") == "quit":
                emit({"event": "bye"})
                return
            emit({"event": "result", "ok": True, **worker.handle(req)})
        except Exception as e:  # report, keep serving
            emit({"event": "result", "ok": False, "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()})


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------
def summarize(side_runs: list[dict]) -> dict:
    sps = [r["steps_per_s"] for r in side_runs]
    first = side_runs[0]
    return {
        "compile": first.get("compile"),
        "returns": first.get("returns"),
        "env_steps_per_seed": first.get("env_steps_per_seed"),
        "runs": [{k: r[k] for k in ("run_s", "env_steps", "steps_per_s", "loadavg_before",
                                     "order", "attempt", "own_cpu_s", "other_cpu_s", "other_cpu_frac",
                                     "metrics_env_steps_max") if k in r} for r in side_runs],
        "median_steps_per_s": float(np.median(sps)),
        "median_run_s": float(np.median([r["run_s"] for r in side_runs])),
        "min_steps_per_s": float(np.min(sps)),
        "max_other_cpu_frac": max((r.get("other_cpu_frac", 0.0) for r in side_runs), default=None),
        "max_steps_per_s": float(np.max(sps)),
        "median_cpu_s_per_m_steps": cpu_s_per_m_steps(side_runs),
    }


def cpu_s_per_m_steps(side_runs: list[dict]) -> float | None:
    """Median over runs of the worker's own CPU seconds (all its threads) per million env steps:
    the work a run costs, whatever the number of cores it kept busy."""
    per = [r["own_cpu_s"] / r["env_steps"] * 1e6 for r in side_runs if r.get("own_cpu_s") and r.get("env_steps")]
    return float(np.median(per)) if per else None


def fmt_int(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def fmt_cpu(side: dict | None) -> str:
    x = side and (side.get("median_cpu_s_per_m_steps") or cpu_s_per_m_steps(side.get("runs", [])))
    return "-" if not x else f"{x:.1f}"


def fmt_ret(r: dict | None) -> str:
    return "-" if not r else f"{r['mean_over_seeds']:.0f}/{r['min_over_seeds']:.0f}"


def print_table(points: list[dict]) -> None:
    head = (f"{'algo':<10}{'seeds':>6} | {'ours steps/s':>13}{'sharded':>10}{'rejax steps/s':>14}{'ours/rejax':>11}"
            f"{'sharded/rejax':>14} | {'compile s ours':>15}{'rejax':>7} | {'CPU s/1M ours':>14}{'rejax':>7} | "
            f"{'return mean/min ours':>21}{'rejax':>10}")
    print(head)
    print("-" * len(head))
    for p in points:
        o, sh, r = (p["sides"].get(k) for k in ("ours", "ours-sharded", "rejax"))
        ratio, sratio = p.get("ratio_ours_over_rejax"), p.get("ratio_sharded_over_rejax")
        oc = o["compile"]["compile_s"] if o and o.get("compile") else None
        rc = r["compile"]["compile_s"] if r and r.get("compile") else None
        print(f"{p['algo']:<10}{p['n_seeds']:>6} | "
              f"{fmt_int(o and o['median_steps_per_s']):>13}{fmt_int(sh and sh['median_steps_per_s']):>10}"
              f"{fmt_int(r and r['median_steps_per_s']):>14}"
              f"{'-' if ratio is None else f'{ratio:.2f}x':>11}{'-' if sratio is None else f'{sratio:.2f}x':>14} | "
              f"{'-' if oc is None else f'{oc:.1f}':>15}{'-' if rc is None else f'{rc:.1f}':>7} | "
              f"{fmt_cpu(o):>14}{fmt_cpu(r):>7} | "
              f"{fmt_ret(o and o['returns']):>21}{fmt_ret(r and r['returns']):>10}")
    busy = [(p["algo"], p["n_seeds"], name, side["max_other_cpu_frac"]) for p in points
            for name, side in p["sides"].items() if side.get("max_other_cpu_frac") is not None]
    worst = max(busy, key=lambda b: b[3], default=None)
    if worst and worst[3] > 0.05:
        print(f"[warn] other processes used up to {100 * worst[3]:.0f}% of the machine's CPU during timed runs "
              f"({worst[0]} seeds={worst[1]}, {worst[2]}): these figures are contended; rerun on a quiet machine")
    print("steps/s: median over repeats of n_seeds * env steps per seed / run seconds (compile excluded); "
          "CPU s/1M: the worker's CPU seconds per million env steps (all threads); "
          "return: mean over seeds / min over seeds of each seed's mean final-policy return")


def compile_pair(o: dict | None, r: dict | None) -> str:
    def one(side: dict | None) -> str:
        c = side and side.get("compile")
        return "-" if not c else f"{c['compile_s']:.1f}"

    return f"{one(o)} / {one(r)}"


def merged_points(paths: list[Path]) -> list[dict]:
    """The points of several result files, later files replacing the same (algo, n_seeds); each point
    gets `measured` (the run's date and our commit) so a table says which run each row is from."""
    points: dict[tuple[str, int], dict] = {}
    for path in paths:
        doc = json.loads(path.read_text())
        commit = ((doc.get("versions") or {}).get("ours") or {}).get("rlcx_jax_git") or "?"
        for p in doc["points"]:
            points[(p["algo"], p["n_seeds"])] = {**p, "measured": f"{doc['timestamp_utc'][:10]} {commit[:7]}"}
    return sorted(points.values(), key=lambda p: (p["algo"] != "ppo", p["algo"], p["n_seeds"]))


def speed_verdict(ratio: float | None) -> str:
    """>= 1.3x is the target, within 5% either way a tie."""
    if ratio is None:
        return "-"
    if ratio >= 1.3:
        return f"{ratio:.2f}x, target 1.3x met"
    if ratio >= 1.05:
        return f"{ratio:.2f}x, ahead (below 1.3x)"
    if ratio > 1 / 1.05:
        return f"{ratio:.2f}x, a tie"
    return f"{ratio:.2f}x, behind"


def markdown_table(points: list[dict]) -> str:
    """README's throughput table: speeds, their ratio and the returns beside them, from the JSON.
    `ours` is one device (jit(vmap)), `sharded` the seed axis split over one XLA:CPU device per core."""
    lines = ["| algorithm | seeds | like for like | ours env steps/s | sharded env steps/s | rejax env steps/s "
             "| ours / rejax | sharded / rejax | compile s ours / rejax | CPU s per 1M steps ours / rejax "
             "| final return ours mean/min | rejax mean/min | measured |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        o, sh, r = (p["sides"].get(k) for k in ("ours", "ours-sharded", "rejax"))
        lfl = p.get("like_for_like") if r else None  # no rejax side: nothing to be like
        lines.append(f"| {p['algo'].upper()} | {p['n_seeds']} | {'-' if lfl is None else ('yes' if lfl else 'no')} | "
                     f"{fmt_int(o and o['median_steps_per_s'])} | {fmt_int(sh and sh['median_steps_per_s'])} | "
                     f"{fmt_int(r and r['median_steps_per_s'])} | {speed_verdict(p.get('ratio_ours_over_rejax'))} | "
                     f"{speed_verdict(p.get('ratio_sharded_over_rejax'))} | "
                     f"{compile_pair(o, r)} | {fmt_cpu(o)} / {fmt_cpu(r)} | "
                     f"{fmt_ret(o and o['returns']).replace('/', ' / ')} | {fmt_ret(r and r['returns']).replace('/', ' / ')} | "
                     f"{p.get('measured', '-')} |")
    return "\n".join(lines)


def sharded_env(env: dict[str, str], devices: int) -> dict[str, str]:
    """The environment of the ours-sharded worker: `devices` XLA:CPU devices, sharding switched on."""
    flags = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return {**env, "XLA_FLAGS": flags, "RLCX_BENCH_SHARDED": "1"}


def side_applies(side: str, algo: str, n_seeds: int) -> bool:
    """rejax runs only what it has; sharding needs at least two seeds to split."""
    if side == "rejax":
        return algo in REJAX_ALGOS
    if side == "ours-sharded":
        return n_seeds > 1
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", nargs="+", choices=ALGOS, default=None, help=f"default: {' '.join(ALGOS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="vmapped seed counts (default: 1 8 32)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per point and side (default 3)")
    p.add_argument("--total-timesteps", type=int, default=None,
                   help="env steps per seed, all algos (default 500k; --quick: about 20k)")
    p.add_argument("--eval-episodes", type=int, default=32, help="episodes per seed for the final returns")
    p.add_argument("--seed", type=int, default=0, help="base PRNG seed (same keys for both sides)")
    p.add_argument("--quick", action="store_true", help="smoke run: ~20k steps, seeds [1], 1 repeat")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES),
                   help="sides to run (ours-sharded: the seed axis split over one XLA:CPU device per usable core)")
    p.add_argument("--xla-flags", default=None,
                   help="XLA_FLAGS for both workers (default: inherited), e.g. --xla-flags=--xla_cpu_multi_thread_eigen=false")
    p.add_argument("--prng-impl", default=None, choices=("threefry2x32", "unsafe_rbg", "rbg"),
                   help="our side's PRNG implementation (config field prng_impl; default: the config's)")
    p.add_argument("--compiler-options", choices=("default", "off"), default="default",
                   help="our side's XLA compiler options: rlcx_jax.xla's per-backend defaults, or none (ablation)")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds a worker may take for one request (compile + run + eval) before it counts "
                        "as hung, is killed, restarted and the request retried; later repeats of a point "
                        "get min(this, 120 + 5 * the previous run)")
    p.add_argument("--hang-retries", type=int, default=2, help="retries of a request after a hang")
    p.add_argument("--rejax-venv", type=Path, default=REJAX_VENV)
    p.add_argument("--rejax-pin", action="append", metavar="NAME==VER",
                   help="override a version pinned in the rejax venv (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/throughput_<cpu>.json)")
    p.add_argument("--markdown", type=Path, nargs="+", default=None, metavar="JSON",
                   help="print README's table from result JSONs and exit (runs nothing); a point (algo, seeds) "
                        "of a later file replaces that of an earlier one, each row names the run it comes from")
    p.add_argument("--worker", choices=("ours",), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.prng_impl:
        os.environ["RLCX_BENCH_PRNG_IMPL"] = args.prng_impl  # inherited by our worker process
    os.environ["RLCX_BENCH_COMPILER_OPTIONS"] = args.compiler_options
    if args.algos is None:
        args.algos = list(ALGOS)
    if args.seeds is None:
        args.seeds = [1] if args.quick else [1, 8, 32]
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if not args.quick and args.repeats < 3 and args.worker is None:
        print(f"[warn] --repeats {args.repeats} < 3: medians of fewer than 3 runs", file=sys.stderr)
    return args


def request_with_retries(worker: Worker, req: dict, timeout_s: float, retries: int, hangs: list[dict]) -> dict:
    for attempt in range(retries + 1):
        t0 = time.perf_counter()
        try:
            res = worker.request(req, timeout_s)
            res["attempt"] = attempt
            return res
        except WorkerHung as e:
            hangs.append({"side": worker.name, "request": req, "attempt": attempt, "timeout_s": timeout_s,
                          "waited_s": time.perf_counter() - t0, "loadavg": loadavg(),
                          "utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
            print(f"[hang] {e}; killed, restarting it and retrying ({attempt + 1}/{retries})",
                  file=sys.stderr, flush=True)
            worker.restart()
            timeout_s = max(timeout_s, 300.0)  # the retry recompiles
    raise WorkerHung(f"{worker.name} worker hung {retries + 1} times on {req}")


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.markdown is not None:
        print(markdown_table(merged_points(args.markdown)))
        return None
    if args.worker == "ours":
        serve_ours()
        return None
    hw = cpu_info()
    totals = {a: args.total_timesteps or (QUICK_TOTAL if args.quick else DEFAULT_TOTAL)[a] for a in args.algos}
    out_path = args.out or RESULTS / f"throughput_{cpu_short_name(hw['cpu_model'])}{'_quick' if args.quick else ''}.json"
    started = dt.datetime.now(dt.timezone.utc)
    print(f"[bench] {hw['cpu_model']}, {hw['logical_cores']} cores; algos={args.algos} seeds={args.seeds} "
          f"repeats={args.repeats} total_timesteps={totals}; load average {loadavg()}", flush=True)

    env = dict(os.environ)
    if args.xla_flags is not None:
        env["XLA_FLAGS"] = args.xla_flags
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    workers: dict[str, Worker] = {}
    venv_info = None
    hangs: list[dict] = []
    points = []
    try:
        ours_cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "ours"]
        if "ours" in args.sides:
            workers["ours"] = Worker("ours", ours_cmd, env)
            print(f"[bench] rlcx_jax worker up in {workers['ours'].ready['startup_s']:.1f} s", flush=True)
        if "ours-sharded" in args.sides and hw["usable_cores"] > 1:
            workers["ours-sharded"] = Worker("ours-sharded", ours_cmd, sharded_env(env, hw["usable_cores"]))
            print(f"[bench] rlcx_jax sharded worker up with {len(workers['ours-sharded'].ready['devices'])} "
                  "devices", flush=True)
        if "rejax" in args.sides:
            venv_info = ensure_rejax_venv(args.rejax_venv, rejax_pins(args.rejax_pin))
            workers["rejax"] = Worker("rejax", [str(venv_python(args.rejax_venv)), str(RUNNER), "--serve"], env)
            v = workers["rejax"].ready["versions"]
            print(f"[bench] rejax worker up in {workers['rejax'].ready['startup_s']:.1f} s "
                  f"(rejax {v.get('rejax')}, gymnax {v.get('gymnax')}, jax {v.get('jax')})", flush=True)

        for algo in args.algos:
            for n in args.seeds:
                names = [s for s in SIDES if s in workers and side_applies(s, algo, n)]
                raw: dict[str, list[dict]] = {s: [] for s in names}
                timeouts = {s: args.timeout for s in names}
                for r in range(args.repeats):
                    order = names if r % 2 == 0 else names[::-1]  # ours first on even repeats
                    for pos, name in enumerate(order):
                        req = {"op": "run", "algo": algo, "n_seeds": n, "total_timesteps": totals[algo],
                               "seed": args.seed, "evaluate": r == 0, "eval_episodes": args.eval_episodes,
                               "drop": r == args.repeats - 1}
                        before = loadavg()
                        res = request_with_retries(workers[name], req, timeouts[name], args.hang_retries, hangs)
                        res["loadavg_before"] = before
                        res["order"] = pos
                        raw[name].append(res)
                        timeouts[name] = min(args.timeout, 120.0 + 5.0 * res["run_s"])
                        extra = f" (compile {res['compile']['compile_s']:.1f} s)" if "compile" in res else ""
                        if "other_cpu_frac" in res:
                            extra += f"  [other processes: {100 * res['other_cpu_frac']:.0f}% of the CPU]"
                        print(f"[{name:>12}] {algo} seeds={n:<3} repeat={r} run {res['run_s']:7.2f} s "
                              f"{res['steps_per_s']:>12,.0f} steps/s{extra}", flush=True)
                point = {"algo": algo, "n_seeds": n, "total_timesteps_requested": totals[algo],
                         "like_for_like": LIKE_FOR_LIKE[algo],
                         "sides": {name: summarize(runs) for name, runs in raw.items()},
                         "settings": {name: runs[0].get("settings") for name, runs in raw.items()}}
                for ours, key in (("ours", "ratio_ours_over_rejax"), ("ours-sharded", "ratio_sharded_over_rejax")):
                    if ours in raw and "rejax" in raw:
                        o, j = point["sides"][ours], point["sides"]["rejax"]
                        point[key] = o["median_steps_per_s"] / j["median_steps_per_s"]
                        if o["env_steps_per_seed"] != j["env_steps_per_seed"]:
                            print(f"[warn] env steps per seed differ: {ours} {o['env_steps_per_seed']} "
                                  f"rejax {j['env_steps_per_seed']}", file=sys.stderr)
                points.append(point)
    finally:
        for w in workers.values():
            w.close()

    print()
    print_table(points)
    if hangs:
        print(f"[bench] {len(hangs)} hung request(s) were killed and retried; see 'hangs' in the JSON")
    ready = {name: w.ready for name, w in workers.items()}
    rejax_ready = ready.get("rejax")
    result = {
        "benchmark": "throughput",
        "timestamp_utc": started.isoformat(timespec="seconds"),
        "finished_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/throughput.py"] + (argv if argv is not None else sys.argv[1:])),
        "hardware": hw,
        "backend": {name: r.get("backend") for name, r in ready.items()},
        "jax_environment": jax_environment(env),
        "versions": {"ours": ready["ours"]["versions"] if "ours" in ready else local_versions(),
                     "rejax_side": rejax_ready and rejax_ready.get("versions")},
        "rejax_venv": venv_info,
        "settings": {
            "algos": args.algos, "seeds": args.seeds, "repeats": args.repeats,
            "total_timesteps": totals, "eval_episodes": args.eval_episodes, "seed": args.seed,
            "quick": args.quick, "sides": list(workers),
            "ours_compiler_options": args.compiler_options,
            "ours": _jsonable({a: OUR_SETTINGS[a] for a in args.algos}),
            "rejax": rejax_ready and {a: rejax_ready["settings"][a] for a in args.algos if a in REJAX_ALGOS},
            "rejax_notes": rejax_ready and {a: rejax_ready["notes"][a] for a in args.algos if a in REJAX_ALGOS},
            "like_for_like": {a: LIKE_FOR_LIKE[a] for a in args.algos},
        },
        "method": ("each side runs in its own worker process (the other is idle meanwhile); "
                   "jax.jit(jax.vmap(train)) over n_seeds keys (ours: with rlcx_jax.xla.compiler_options(), "
                   "as rlcx_jax.xla.jit compiles, unless --compiler-options off); .lower().compile() timed apart (compile_s); "
                   "each run = compiled call + block_until_ready; env steps/s = n_seeds * env steps per seed / "
                   "run_s; median over repeats; sides alternate each repeat (order 0 = ran first); returns "
                   "= untimed evaluation of each seed's final policy after the first timed run"),
        "startup_s": {name: r.get("startup_s") for name, r in ready.items()},
        "worker_restarts": {name: w.restarts for name, w in workers.items()},
        "hangs": hangs,
        "points": points,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(_jsonable(result), indent=1) + "\n")
    print(f"\n[bench] wrote {out_path}")
    return result


if __name__ == "__main__":
    main()
