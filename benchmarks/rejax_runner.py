"""Timing worker for the rejax side of benchmarks/throughput.py.

Runs inside its own virtual environment (benchmarks/.rejax-venv, made by throughput.py) because
rejax 0.1.3 needs gymnax 0.0.9 (the old 5-value `step` API), while rlcx_jax uses gymnax 1.x.
It imports nothing from rlcx_jax.

Two modes:

  one-shot   python benchmarks/rejax_runner.py --algo ppo --n-seeds 1 8 --repeats 3
             builds, compiles, times and evaluates every point, then prints ONE JSON line.

  serve      python benchmarks/rejax_runner.py --serve
             prints {"event": "ready", ...} once, then answers JSON requests read one per line
             from stdin with one JSON line each on stdout, so that throughput.py can alternate
             its own runs with rejax runs without recompiling rejax between repeats:
               {"op": "run", "algo": "ppo", "n_seeds": 8, "total_timesteps": 500000,
                "seed": 0, "eval_episodes": 32, "evaluate": true}
               {"op": "quit"}
             The compiled function of each (algo, n_seeds, total_timesteps) is cached; the first
             request for a point reports its trace/lower and compile times.

Everything else (jax's warnings, logs) goes to stderr; stdout carries only the JSON lines.

What is timed: `jax.jit(jax.vmap(algo.train))` over `n_seeds` PRNG keys, lowered and compiled
ahead of time (timed separately), then executed and `block_until_ready`-ed. rejax's periodic
evaluation is switched off for the timed run (eval_callback replaced by a no-op,
skip_initial_evaluation=True), so the timed work is training only. The final policy of every seed
is evaluated afterwards, untimed, with rejax's own `rejax.evaluate.evaluate` (one episode in each
of `eval_episodes` parallel environments): PPO with its stochastic policy (rejax's `make_act`),
DQN greedily (argmax Q), matching how rlcx_jax evaluates.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rejax
from rejax.evaluate import evaluate as rejax_evaluate

# ----------------------------------------------------------------------------------------------
# Settings: PureJaxRL's CartPole-v1 configurations, in rejax 0.1.3's vocabulary
# ----------------------------------------------------------------------------------------------
PPO_SETTINGS = {
    "num_envs": 4,
    "num_steps": 128,
    "num_epochs": 4,  # PureJaxRL UPDATE_EPOCHS
    "num_minibatches": 4,
    "learning_rate": 2.5e-4,  # linearly annealed to 0 (see build_ppo)
    "anneal_lr": True,
    "gamma": 0.99,
    "gae_lambda": 0.95,
    "clip_eps": 0.2,
    "ent_coef": 0.01,
    "vf_coef": 0.5,
    "max_grad_norm": 0.5,
    "hidden_layer_sizes": [64, 64],
    "activation": "tanh",
}

DQN_SETTINGS = {
    "num_envs": 10,
    "buffer_size": 10_000,
    "batch_size": 128,
    "eps_start": 1.0,
    "eps_end": 0.05,
    "exploration_fraction": 0.5,  # epsilon decays over the first 50% of training
    "target_update_freq": 500,  # env steps (rejax counts global_step in env steps)
    "polyak": 0.0,  # 0 => hard copy of the online params at each target update
    "learning_rate": 2.5e-4,
    "fill_buffer": 10_000,  # learning_starts
    "num_epochs": 1,  # gradient steps per train_iteration (= per num_envs env steps)
    "gamma": 0.99,
    "ddqn": False,  # PureJaxRL's DQN is vanilla DQN
    "max_grad_norm": None,  # None => rejax default (inf: no clipping); PureJaxRL DQN has none
    "hidden_layer_sizes": [120, 84],
    "activation": "relu",
}

# rejax's own CartPole DQN (configs/gymnax/cartpole.yaml of the rejax repository; create_agent fixes
# hidden_layer_sizes=(64, 64)); target_update_freq is left at rejax's default (every iteration).
DQN_REJAX_SETTINGS = {
    "agent": "DuelingQNetwork",
    "activation": "swish",
    "hidden_layer_sizes": [64, 64],
    "num_envs": 10,
    "buffer_size": 50_000,
    "fill_buffer": 5_000,
    "batch_size": 100,
    "max_grad_norm": 10.0,
    "learning_rate": 0.001,
    "num_epochs": 5,
    "polyak": 0.98,
    "target_update_freq": 1,
    "eps_start": 1.0,
    "eps_end": 0.05,
    "exploration_fraction": 0.5,
    "gamma": 0.99,
    "ddqn": True,
}

NOTES = {
    "ppo": [
        "rejax PPO has no learning-rate annealing option; an optax.linear_schedule (2.5e-4 -> 0 over "
        "all optimizer steps) is passed as learning_rate. It decays per minibatch step, PureJaxRL's "
        "per update; actor and critic have separate Adam optimizers (PureJaxRL: one).",
        "rejax clips gradients element-wise (optax.clip(max_grad_norm)), not by global norm as "
        "PureJaxRL (optax.clip_by_global_norm) does.",
        "rejax normalizes advantages per minibatch; PureJaxRL does so too.",
        "rejax initialises its MLPs with flax defaults (lecun normal), PureJaxRL orthogonal.",
        "total_timesteps is rounded down to whole updates (num_envs * num_steps), as PureJaxRL does, "
        "so both libraries do the same number of env steps; the steps actually done are read back "
        "from rejax's global_step.",
    ],
    "dqn": [
        "rejax 0.1.3 hard-codes a (64, 64) Q-network in DQN.create; the agent is replaced after "
        "create() by the same rejax network class with hidden_layer_sizes=(120, 84), relu, as in "
        "PureJaxRL's CartPole DQN.",
        "train_iteration = one vectorised step of 10 envs + num_epochs=1 gradient step, i.e. one "
        "update every 10 env steps (PureJaxRL TRAINING_INTERVAL=10 with 10 envs).",
        "rejax's loss is optax.l2_loss (0.5 * squared error); PureJaxRL uses the mean squared error.",
        "learning starts when global_step > fill_buffer (10k env steps).",
        "rejax's `done` is terminated or truncated: a truncated episode is not bootstrapped (rlcx_jax "
        "bootstraps it from the pre-reset observation); the compute is the same.",
    ],
    "dqn-rejax": [
        "rejax's own CartPole DQN config (configs/gymnax/cartpole.yaml): dueling (64, 64) swish network, "
        "double DQN, batch 100, 5 gradient steps per 10 env steps, Polyak target 0.98 every 10 env steps, "
        "buffer 50k, learning from 5k env steps, lr 1e-3, element-wise gradient clip at 10 (optax.clip).",
        "rlcx_jax runs the same settings except the clip, which is by global norm at 10 "
        "(optax.clip_by_global_norm); its loss is the mean squared TD error, rejax's optax.l2_loss (half of it).",
        "rejax's `done` is terminated or truncated: a truncated episode is not bootstrapped.",
    ],
}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "gymnax", "rejax", "distrax", "chex", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


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


def _no_eval(algo, ts, rng):
    """Replaces rejax's eval callback during the timed run: no evaluation work at all."""
    return jnp.zeros(())


def timed_run_settings(total: int) -> dict:
    """What every timed rejax run shares: no normalisation, `total` env steps in one block of
    iterations, and a single (no-op) evaluation at its end instead of periodic ones."""
    return {"normalize_observations": False, "normalize_rewards": False, "total_timesteps": total,
            "eval_freq": total, "skip_initial_evaluation": True}


def build_ppo(total_timesteps: int) -> tuple[object, int, dict]:
    s = PPO_SETTINGS
    steps_per_update = s["num_envs"] * s["num_steps"]
    num_updates = max(total_timesteps // steps_per_update, 1)
    total = num_updates * steps_per_update
    lr = s["learning_rate"]
    if s["anneal_lr"]:
        opt_steps = num_updates * s["num_epochs"] * s["num_minibatches"]
        lr = optax.linear_schedule(s["learning_rate"], 0.0, opt_steps)
    config = {
        "env": "CartPole-v1",
        "num_envs": s["num_envs"],
        "num_steps": s["num_steps"],
        "num_epochs": s["num_epochs"],
        "num_minibatches": s["num_minibatches"],
        "learning_rate": lr,
        "gamma": s["gamma"],
        "gae_lambda": s["gae_lambda"],
        "clip_eps": s["clip_eps"],
        "ent_coef": s["ent_coef"],
        "vf_coef": s["vf_coef"],
        "max_grad_norm": s["max_grad_norm"],
        "agent_kwargs": {
            "hidden_layer_sizes": tuple(s["hidden_layer_sizes"]),
            "activation": s["activation"],
        },
        **timed_run_settings(total),
    }
    algo = rejax.PPO.create(**config).replace(eval_callback=_no_eval)
    recorded = {k: v for k, v in config.items() if k != "learning_rate"}
    recorded["learning_rate"] = (
        f"linear_schedule({s['learning_rate']} -> 0 over {num_updates * s['num_epochs'] * s['num_minibatches']} "
        "optimizer steps)" if s["anneal_lr"] else s["learning_rate"]
    )
    recorded["num_updates"] = num_updates
    return algo, total, recorded


def build_dqn(total_timesteps: int) -> tuple[object, int, dict]:
    from flax import linen as nn
    from rejax.networks import DiscreteQNetwork, EpsilonGreedyPolicy

    s = DQN_SETTINGS
    total = max(total_timesteps // s["num_envs"], 1) * s["num_envs"]
    config = {
        "env": "CartPole-v1",
        "num_envs": s["num_envs"],
        "buffer_size": s["buffer_size"],
        "batch_size": s["batch_size"],
        "eps_start": s["eps_start"],
        "eps_end": s["eps_end"],
        "exploration_fraction": s["exploration_fraction"],
        "target_update_freq": s["target_update_freq"],
        "polyak": s["polyak"],
        "learning_rate": s["learning_rate"],
        "fill_buffer": min(s["fill_buffer"], total),
        "num_epochs": s["num_epochs"],
        "gamma": s["gamma"],
        "ddqn": s["ddqn"],
        "agent_kwargs": {"activation": s["activation"]},
        **timed_run_settings(total),
    }
    if s["max_grad_norm"] is not None:
        config["max_grad_norm"] = s["max_grad_norm"]
    algo = rejax.DQN.create(**config)
    action_dim = algo.env.action_space(algo.env_params).n
    agent = EpsilonGreedyPolicy(DiscreteQNetwork)(
        hidden_layer_sizes=tuple(s["hidden_layer_sizes"]),
        action_dim=action_dim,
        activation=getattr(nn, s["activation"]),
    )
    algo = algo.replace(agent=agent, eval_callback=_no_eval)
    recorded = dict(config)
    recorded["hidden_layer_sizes"] = list(s["hidden_layer_sizes"])
    mgn = float(algo.max_grad_norm)
    recorded["max_grad_norm"] = mgn if math.isfinite(mgn) else "inf (no clipping)"
    return algo, total, recorded


def build_dqn_rejax(total_timesteps: int) -> tuple[object, int, dict]:
    s = DQN_REJAX_SETTINGS
    total = max(total_timesteps // s["num_envs"], 1) * s["num_envs"]
    config = {k: v for k, v in s.items() if k not in ("activation", "hidden_layer_sizes")}
    config.update({
        "env": "CartPole-v1",
        "agent_kwargs": {"activation": s["activation"]},
        "fill_buffer": min(s["fill_buffer"], total),
        **timed_run_settings(total),
    })
    algo = rejax.DQN.create(**config).replace(eval_callback=_no_eval)
    recorded = {**config, "hidden_layer_sizes": list(s["hidden_layer_sizes"]), "activation": s["activation"]}
    recorded.pop("agent_kwargs")
    return algo, total, recorded


BUILDERS = {"ppo": build_ppo, "dqn": build_dqn, "dqn-rejax": build_dqn_rejax}
SETTINGS = {"ppo": PPO_SETTINGS, "dqn": DQN_SETTINGS, "dqn-rejax": DQN_REJAX_SETTINGS}


def make_eval_act(algo_name: str, algo, ts):
    """The final policy as rejax's evaluate wants it: act(obs, rng) -> action."""
    if algo_name == "ppo":
        return algo.make_act(ts)  # samples from the policy (stochastic)

    def act(obs, rng):  # greedy DQN
        q = algo.agent.apply(ts.q_ts.params, jnp.expand_dims(obs, 0))
        return jnp.argmax(q, axis=-1)[0]

    return act


class Point:
    """One (algo, n_seeds, total_timesteps): built, compiled once, run many times."""

    def __init__(self, algo_name: str, n_seeds: int, total_timesteps: int, seed: int):
        self.algo_name = algo_name
        self.n_seeds = n_seeds
        t0 = time.perf_counter()
        self.algo, self.total, self.config = BUILDERS[algo_name](total_timesteps)
        self.keys = jax.random.split(jax.random.PRNGKey(seed), n_seeds)
        self.eval_key = jax.random.fold_in(jax.random.PRNGKey(seed), 1_000_003)
        t1 = time.perf_counter()
        lowered = jax.jit(jax.vmap(self.algo.train)).lower(self.keys)
        t2 = time.perf_counter()
        self.compiled = lowered.compile()
        t3 = time.perf_counter()
        self.compile_info = {
            "build_s": t1 - t0,
            "trace_lower_s": t2 - t1,
            "xla_compile_s": t3 - t2,
            "compile_s": t3 - t1,  # trace + lower + XLA compile
        }
        self.returns = None

    def run(self) -> dict:
        busy0, cpu0 = _system_busy_s(), time.process_time()
        t0 = time.perf_counter()
        out = self.compiled(self.keys)
        jax.block_until_ready(out)
        run_s = time.perf_counter() - t0
        load = contention(busy0, cpu0, run_s)
        ts = out[0]
        env_steps_per_seed = int(np.asarray(ts.global_step).reshape(-1)[0])
        self.last_ts = ts
        return {
            "run_s": run_s,
            "env_steps_per_seed": env_steps_per_seed,
            "env_steps": env_steps_per_seed * self.n_seeds,
            "steps_per_s": env_steps_per_seed * self.n_seeds / run_s,
            **load,
        }

    def evaluate(self, num_episodes: int) -> dict:
        algo, name = self.algo, self.algo_name
        max_steps = int(algo.env_params.max_steps_in_episode)

        def eval_one(ts, key):
            act = make_eval_act(name, algo, ts)
            _, returns = rejax_evaluate(act, key, algo.env, algo.env_params, num_episodes, max_steps)
            return returns

        keys = jax.random.split(self.eval_key, self.n_seeds)
        t0 = time.perf_counter()
        returns = np.asarray(jax.jit(jax.vmap(eval_one))(self.last_ts, keys))
        eval_s = time.perf_counter() - t0
        per_seed = returns.mean(axis=1)
        self.returns = {
            "episodes_per_seed": num_episodes,
            "policy": "stochastic" if name == "ppo" else "greedy",
            "mean_return_per_seed": [float(x) for x in per_seed],
            "min_episode_return_per_seed": [float(x) for x in returns.min(axis=1)],
            "mean_over_seeds": float(per_seed.mean()),
            "min_over_seeds": float(per_seed.min()),
            "eval_s": eval_s,
        }
        return self.returns


class Worker:
    def __init__(self):
        self.points: dict[tuple, Point] = {}

    def handle(self, req: dict) -> dict:
        algo = req["algo"]
        if algo not in BUILDERS:
            raise ValueError(f"unknown algo {algo!r}; known: {sorted(BUILDERS)}")
        n_seeds = int(req["n_seeds"])
        total = int(req["total_timesteps"])
        seed = int(req.get("seed", 0))
        key = (algo, n_seeds, total, seed)
        fresh = key not in self.points
        if fresh:
            self.points[key] = Point(algo, n_seeds, total, seed)
        point = self.points[key]
        res = {"algo": algo, "n_seeds": n_seeds, "total_timesteps_requested": total,
               "total_timesteps": point.total, "seed": seed}
        if fresh:
            res["compile"] = point.compile_info
            res["settings"] = point.config
        res.update(point.run())
        if req.get("evaluate", False):
            res["returns"] = point.evaluate(int(req.get("eval_episodes", 32)))
        if req.get("drop", False):  # free the compiled function and buffers
            del self.points[key]
        return res


_OUT = sys.stdout  # the protocol channel; serve() points sys.stdout at stderr for everything else


def emit(obj: dict) -> None:
    _OUT.write(json.dumps(obj) + "\n")
    _OUT.flush()


def serve() -> None:
    sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the protocol
    worker = Worker()
    emit({"event": "ready", "versions": versions(), "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()], "settings": SETTINGS,
          "notes": NOTES})
    for line in sys.stdin:
        line = line.strip()
        if not line:
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


def one_shot(args: argparse.Namespace) -> None:
    worker = Worker()
    points = []
    for n in args.n_seeds:
        runs = []
        for r in range(args.repeats):
            req = {"algo": args.algo, "n_seeds": n, "total_timesteps": args.total_timesteps,
                   "seed": args.seed, "evaluate": r == 0, "eval_episodes": args.eval_episodes,
                   "drop": r == args.repeats - 1}
            runs.append(worker.handle(req))
            print(f"[rejax {args.algo}] seeds={n} repeat={r} run_s={runs[-1]['run_s']:.2f} "
                  f"steps/s={runs[-1]['steps_per_s']:,.0f}", file=sys.stderr, flush=True)
        sps = [x["steps_per_s"] for x in runs]
        points.append({
            "n_seeds": n,
            "compile": runs[0]["compile"],
            "settings": runs[0]["settings"],
            "returns": runs[0]["returns"],
            "runs": [{k: x[k] for k in ("run_s", "env_steps", "steps_per_s", "other_cpu_frac") if k in x}
                     for x in runs],
            "median_steps_per_s": float(np.median(sps)),
        })
    emit({"algo": args.algo, "versions": versions(), "backend": jax.default_backend(),
          "notes": NOTES[args.algo], "points": points})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", action="store_true", help="answer JSON requests on stdin (used by throughput.py)")
    p.add_argument("--algo", choices=sorted(BUILDERS), default="ppo")
    p.add_argument("--n-seeds", type=int, nargs="+", default=[1])
    p.add_argument("--total-timesteps", type=int, default=500_000)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-episodes", type=int, default=32)
    args = p.parse_args()
    if args.serve:
        serve()
    else:
        one_shot(args)


if __name__ == "__main__":
    main()
