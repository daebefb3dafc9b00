"""Policy distillation: how much of a large teacher's return a small student keeps, and what it depends on.

    python benchmarks/distillation.py               # the full run: 8 seeds, 32 evaluation episodes per seed
    python benchmarks/distillation.py --quick       # smoke run: 2 seeds, tiny budgets (writes *_quick files)
    python benchmarks/distillation.py --markdown    # README-ready tables from the saved JSON

Policy distillation (Rusu et al. 2016, "Policy Distillation", ICLR) trains a student network to reproduce
a trained teacher's outputs on the states a behaviour policy visits; DAgger (Ross et al. 2011, "A
reduction of imitation learning and structured prediction to no-regret online learning", AISTATS) lets
the student itself collect some or all of those states, so that it learns where its own mistakes lead.
`rlcx_jax.distill.policy_distillation` does both in one jitted, seed-vmapped loop. Measured here:

1. Student size vs retained return, beside Rusu et al.'s Atari figures (students with 25% / 7% / 4% of
   the teacher's parameters kept 108% / 102% / 84% of its score). PPO teachers with a 256x256 actor on
   Acrobot-v1 and CartPole-v1; two-layer students whose width gives an actor with about 25%, 7% and 4%
   of the teacher's actor parameters (the actual fractions are recorded), and smaller ones (1%, 0.3%,
   0.1%; no reference figure) to find where the retained return starts to fall. Rusu's protocol: the
   teacher collects all data (teacher fraction 1 -> 1); the loss is the temperature-1 softened KL
   (Hinton et al. 2015), which for a stochastic-policy teacher targets the teacher's policy itself.
   Retained return: student IQM / teacher IQM on CartPole (returns are positive; Rusu's convention).
   Acrobot's returns are negative (-500 is a timeout), so there retained = (student - random) /
   (teacher - random), with the measured return of a uniformly random policy; both conventions and
   the raw returns are in the JSON for every row. A tie at CartPole's 500 ceiling is reported as a
   tie (saturated), not as a win.
2. Loss: Rusu's Q-value KL at tau = 0.01 and tau = 1, the greedy-action NLL and the Q-value MSE, for a
   DQN teacher (256x256, Acrobot-v1) and students with ~7% and ~0.1% of its parameters, teacher-collected
   data.
   DQN teachers and their students are evaluated greedily; PPO teachers and their students with their
   stochastic policy (as the library evaluates each algorithm). Greedy-action agreement with the
   teacher on the last training batches is recorded for every student.
3. Data: teacher- (1 -> 1), student- (0 -> 0) and DAgger-mixed (1 -> 0) collection, PPO teacher on
   Acrobot-v1, ~7% and ~0.1% students, softened KL at tau = 1.
4. Student size on MinAtar (Breakout-MinAtar): PPO teachers with the MinAtar CNN torso (one 3x3 conv of
   16 channels, then 256 units; Young & Tian 2019) and PureJaxRL's MinAtar PPO settings, trained long
   enough to sit clearly above the MLP plateau that benchmarks/compression.py measured on the same env
   (8 seeds, 1M steps, 64x64 MLP, lr 5e-4: IQM 6.0), and above a 64x64 MLP trained here with the
   teacher's settings and steps; CNN students whose hidden layer gives 25% / 7% / 4% (and
   1%) of the teacher's actor parameters, distilled as in 1. Run alone with `--only minatar`, which
   adds its rows, with their own commit, command and times, to the saved JSON of a full run.

Every comparison uses the same number of distillation steps per student. Student i distils teacher
seed i; scores are mean returns over the evaluation episodes of each seed, aggregated over seeds with
the interquartile mean (IQM) and a 95% percentile-bootstrap CI (`rlcx_jax.logging`, Agarwal et al.
2021). The retained-return CI is a paired bootstrap over seeds (student i resampled with teacher i;
the random-policy return is held at its point estimate). A verdict "A > B" is "yes" or "no" only when
the two CIs do not overlap, otherwise "tie (CIs overlap)". Wall seconds include compilation and were
taken on a shared machine: information only, not a speed measurement.

Results: benchmarks/results/distillation_<cpu>.json and distillation_<cpu>.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(REPO))

import jax
import jax.numpy as jnp
import numpy as np

from rlcx_jax import logging as rlog
from rlcx_jax import nets, rl
from rlcx_jax.compress import size
from rlcx_jax.distill import policy_distillation as pd
from rlcx_jax.rl import dqn, ppo
from rlcx_jax.rl.evaluate import make_evaluator

TEACHER_HIDDEN = (256, 256)
TARGET_FRACTIONS = (0.25, 0.07, 0.04)
EXTRA_FRACTIONS = (0.01, 0.003, 0.001)
"""Smaller students than Rusu's, to find where the retained return starts to fall (no reference figure)."""
COMPARISON_FRACTIONS = (0.07, 0.001)
"""Student sizes of the loss and data comparisons: Rusu's 7%, and 0.1% (a student with nothing to spare)."""
RUSU_RETAINED = {0.25: 1.08, 0.07: 1.02, 0.04: 0.84}
"""Rusu et al. 2016, policy compression: students with 25% / 7% / 4% of the DQN teacher's parameters
kept 108% / 102% / 84% of its score (geometric mean over 10 Atari games, KL loss with tau = 0.01)."""
RUSU_SOURCE = "Rusu et al. 2016, Policy Distillation (ICLR), policy compression on 10 Atari games"
CEILING = {"CartPole-v1": 500.0}
SATURATED = 0.99
"""Two rows tie as saturated when both IQMs reach this fraction of the environment's return ceiling."""
TEACHER_DATA, STUDENT_DATA, MIXED_DATA = (1.0, 1.0), (0.0, 0.0), (1.0, 0.0)
MINATAR_ENV = "Breakout-MinAtar"
MINATAR_TEACHER_NET = nets.NetConfig(torso="cnn", hidden=(128,), activation="relu", conv_features=16)
"""Young & Tian 2019's MinAtar network: one 3x3 conv of 16 channels, then 128 units."""
MINATAR_MLP_NET = nets.NetConfig(torso="mlp", hidden=(64, 64), activation="relu")
"""The MLP of benchmarks/compression.py's MinAtar rows, trained here with the teacher's settings."""
MINATAR_FRACTIONS = TARGET_FRACTIONS
MINATAR_HPARAMS = ppo.PPOHParams(lr=1e-3)
"""PureJaxRL's MinAtar PPO settings (64 envs x 128 steps, 4 epochs of 8 minibatches, annealed), but lr
1e-3: in a 2-seed, 2M-step probe lr 5e-4 (and 256 units) stayed at 7 on both seeds, lr 1e-3 reached 11 and 25."""
MINATAR_DISTILL_COLLECT = dict(num_envs=64, num_steps=32, update_epochs=4, num_minibatches=4)
MLP_PLATEAU_SOURCE = "compression_amd-epyc.json"


@dataclasses.dataclass(frozen=True)
class Budget:
    """Seeds, evaluation episodes and environment steps per seed of every stage."""

    seeds: int
    eval_episodes: int
    ppo_teacher_steps: dict[str, int]
    dqn_teacher_steps: int
    distill_steps: int
    minatar_teacher_steps: int
    minatar_distill_steps: int


FULL = Budget(
    seeds=8,
    eval_episodes=32,
    ppo_teacher_steps={"Acrobot-v1": 500_000, "CartPole-v1": 500_000},
    dqn_teacher_steps=200_000,
    distill_steps=100_000,
    minatar_teacher_steps=2_000_000,
    minatar_distill_steps=500_000,
)
QUICK = Budget(
    seeds=2,
    eval_episodes=8,
    ppo_teacher_steps={"Acrobot-v1": 16_384, "CartPole-v1": 16_384},
    dqn_teacher_steps=20_000,
    distill_steps=8_192,
    minatar_teacher_steps=32_768,
    minatar_distill_steps=16_384,
)

START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {msg}", flush=True)


def _throughput() -> Any:
    """benchmarks/throughput.py's machine and version helpers, loaded by path (as benchmarks/pipeline.py does)."""
    spec = importlib.util.spec_from_file_location("rlcx_bench_throughput", HERE / "throughput.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------
# Statistics and verdicts
# ----------------------------------------------------------------------------------------------
def summarize(per_seed: np.ndarray) -> dict[str, Any]:
    """Per-seed scores with their IQM and 95% bootstrap CI."""
    point, lo, hi = rlog.bootstrap_ci(np.asarray(per_seed), "iqm")
    return {"per_seed": [float(x) for x in per_seed], "iqm": point, "ci": [lo, hi]}


def retained(student: np.ndarray, teacher: np.ndarray, random: float | None, resamples: int = 2000) -> dict[str, Any]:
    """IQM(student) / IQM(teacher), or (IQM(student) - random) / (IQM(teacher) - random) when `random`
    is given, with a paired percentile-bootstrap 95% CI over seeds."""
    s, t = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    base = 0.0 if random is None else random

    def ratio(idx: np.ndarray) -> float:
        return (rlog.iqm(s[idx]) - base) / (rlog.iqm(t[idx]) - base)

    rng = np.random.default_rng(0)
    boot = [ratio(idx) for idx in rng.integers(0, len(s), size=(resamples, len(s)))]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"value": ratio(np.arange(len(s))), "ci": [float(lo), float(hi)]}


def verdict(a: dict[str, Any], b: dict[str, Any], ceiling: float | None = None) -> str:
    """Is A's IQM above B's? yes / no when the CIs are disjoint, a tie otherwise or at the ceiling."""
    if ceiling is not None and min(a["iqm"], b["iqm"]) >= SATURATED * ceiling:
        return f"tie (saturated at {ceiling:g})"
    if a["ci"][0] > b["ci"][1]:
        return "yes"
    if a["ci"][1] < b["ci"][0]:
        return "no"
    return "tie (CIs overlap)"


def fmt_return(s: dict[str, Any]) -> str:
    return f"{s['iqm']:.1f} [{s['ci'][0]:.1f}, {s['ci'][1]:.1f}]"


def fmt_percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%" if fraction >= 0.01 else f"{100 * fraction:.2f}%"


def fmt_rusu(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def fmt_retained(r: dict[str, Any]) -> str:
    value, lo, hi = (round(100 * x) + 0 for x in (r["value"], *r["ci"]))  # + 0: no "-0"
    return f"{value}% [{lo}, {hi}]"


def comparison(name_a: str, a: dict[str, Any], name_b: str, b: dict[str, Any], ceiling: float | None) -> dict:
    """One verdict with the figures it comes from."""
    return {"claim": f"{name_a} > {name_b}", "verdict": verdict(a, b, ceiling), "a": fmt_return(a), "b": fmt_return(b)}


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------
def f32(tree: Any) -> Any:
    """Hyperparameters as float32 arrays, so repeated calls share one compilation."""
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def stack(trees: list[Any]) -> Any:
    """Hyperparameter variants stacked on a leading axis (vmapped over)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *[f32(t) for t in trees])


def seed_keys(tag: int, n: int) -> jax.Array:
    return jax.random.split(jax.random.PRNGKey(tag), n)


def ppo_teacher_config(env: str, steps: int) -> ppo.PPOConfig:
    return ppo.PPOConfig(env=env, net=nets.NetConfig(hidden=TEACHER_HIDDEN), total_timesteps=steps, log_every=16)


def dqn_teacher_config(env: str, steps: int) -> dqn.DQNConfig:
    net = nets.NetConfig(hidden=TEACHER_HIDDEN, activation="relu")
    return dqn.DQNConfig(env=env, net=net, total_timesteps=steps, learning_starts=1_000, log_every=100)


def train_teachers(algorithm: str, config: Any, seeds: int, hparams: Any = None) -> tuple[Any, Any, float]:
    """(trainer, seed-batched final state, compile-inclusive seconds) of `seeds` teachers."""
    trainer = rl.make(algorithm, config)
    hparams = f32(rl.get(algorithm).hparams_cls() if hparams is None else hparams)
    t0 = time.perf_counter()
    out = jax.jit(jax.vmap(trainer.train, in_axes=(0, None)))(seed_keys(0, seeds), hparams)
    jax.block_until_ready(out.state)
    return trainer, out.state, time.perf_counter() - t0


def evaluate(trainer: Any, params: Any, obs_stats: Any, greedy: bool, episodes: int) -> np.ndarray:
    """Mean return over `episodes` episodes for each seed of seed-batched `params` -> [seeds]."""
    fn = jax.jit(jax.vmap(make_evaluator(trainer, episodes, greedy)))
    n = jax.tree.leaves(params)[0].shape[0]
    return np.asarray(fn(params, obs_stats, seed_keys(2, n))).mean(axis=1)


def random_policy_return(trainer: Any, teacher: Any, episodes: int) -> dict[str, Any]:
    """A uniformly random policy: the teacher's actor-critic with every parameter 0 (uniform logits),
    evaluated with its stochastic policy."""
    zeros = jax.tree.map(jnp.zeros_like, teacher.params)
    per_seed = evaluate(trainer, zeros, teacher.obs_stats, False, episodes)
    return {**summarize(per_seed), "mean": float(np.mean(per_seed)), "method": "actor-critic with zero parameters"}


def actor_params(net: nets.NetConfig, head: str, agent: Any) -> int:
    """Parameters of the actor (actor torso + policy head, or the whole Q-network) of `net`."""
    return _actor_params(net, head, tuple(agent.obs_shape), agent.spec)


@functools.cache
def _actor_params(net: nets.NetConfig, head: str, obs_shape: tuple[int, ...], spec: Any) -> int:
    network = nets.make(net, obs_shape, spec, head=head)
    shapes = jax.eval_shape(lambda k: nets.init_params(network, k, obs_shape), jax.random.PRNGKey(0))
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)  # size.count reads arrays
    return size.count(zeros, 32, nets.layout(net, head).prefixes("policy")).params


def student_net(teacher_net: nets.NetConfig, head: str, agent: Any, target: float) -> tuple[nets.NetConfig, int]:
    """The student with the teacher's torso and depth, every hidden layer of one width, whose actor
    is closest to `target` x the teacher's."""
    full = actor_params(teacher_net, head, agent)
    widths = range(1, max(teacher_net.hidden) + 1)
    counts = {w: _width_params(teacher_net, head, agent, w) for w in widths}
    best = min(widths, key=lambda w: abs(counts[w] / full - target))
    return _with_width(teacher_net, best), counts[best]


def _with_width(net: nets.NetConfig, width: int) -> nets.NetConfig:
    return dataclasses.replace(net, hidden=(width,) * len(net.hidden))


def _width_params(teacher_net: nets.NetConfig, head: str, agent: Any, width: int) -> int:
    return actor_params(_with_width(teacher_net, width), head, agent)


@dataclasses.dataclass
class Setting:
    """A teacher population to distil from."""

    name: str
    algorithm: str
    config: Any
    trainer: Any
    state: Any
    greedy: bool

    @property
    def head(self) -> str:
        return str(self.config.HEAD)

    @property
    def teacher(self) -> pd.Teacher:
        return pd.Teacher(params=self.state.params, obs_stats=self.state.obs_stats)


def distill(
    setting: Setting, net: nets.NetConfig, loss: str, variants: list[pd.DistillHParams], budget: Budget,
    steps: int | None = None, collect: dict[str, int] | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """Distil every teacher seed into a student of `net`, once per hyperparameter variant (vmapped),
    for `steps` (default: the budget's distill_steps) with `collect` overriding the rollout shape.
    Returns per variant: evaluation score per seed, final greedy-action agreement per seed; and seconds."""
    tconfig = setting.config
    config = pd.DistillConfig(
        env=tconfig.env,
        env_kwargs=tconfig.env_kwargs,
        teacher_algorithm=setting.algorithm,
        teacher_net=tconfig.net,
        net=net,
        loss=loss,
        total_timesteps=budget.distill_steps if steps is None else steps,
        normalize_obs=bool(getattr(tconfig, "normalize_obs", False)),
        log_every=16,
        **(collect or {}),
    )
    trainer = pd.make(config)
    per_seed = jax.vmap(trainer.train, in_axes=(0, None, 0))
    train = jax.jit(jax.vmap(per_seed, in_axes=(None, 0, None)))  # variants x seeds, same keys per variant
    t0 = time.perf_counter()
    out = train(seed_keys(1, budget.seeds), stack(variants), setting.teacher)
    jax.block_until_ready(out.state)
    seconds = time.perf_counter() - t0
    agreement = np.asarray(out.metrics.aux.agreement)[:, :, -1]  # [variants, seeds], last metrics row
    scores = [
        evaluate(trainer, _index(out.state.params, v), setting.state.obs_stats, setting.greedy, budget.eval_episodes)
        for v in range(len(variants))
    ]
    return scores, list(agreement), seconds


def _index(tree: Any, i: int) -> Any:
    return jax.tree.map(lambda x: x[i], tree)


def student_row(
    label: str, scores: np.ndarray, agreement: np.ndarray, teacher: dict[str, Any], random: float | None, **extra: Any
) -> dict[str, Any]:
    """A result row: the student's returns, retained return (both conventions) and agreement."""
    returns = summarize(scores)
    t = np.asarray(teacher["per_seed"])
    return {
        "label": label,
        **extra,
        "returns": returns,
        "retained_ratio": retained(scores, t, None),
        "retained_random_normalized": None if random is None else retained(scores, t, random),
        "agreement_final": [float(a) for a in agreement],
        "agreement_iqm": rlog.iqm(agreement),
    }


def primary_retained(row: dict[str, Any], env: str) -> dict[str, Any]:
    """The retained-return convention used for `env` (random-normalized where returns are negative)."""
    return row["retained_random_normalized"] if env == "Acrobot-v1" else row["retained_ratio"]


# ----------------------------------------------------------------------------------------------
# The experiments
# ----------------------------------------------------------------------------------------------
def teacher_setting(
    name: str, algorithm: str, config: Any, budget: Budget, hparams: Any = None
) -> tuple[Setting, dict[str, Any]]:
    """Train and evaluate one teacher population."""
    steps = config.total_timesteps
    log(f"{name}: training {budget.seeds} {algorithm.upper()} teachers {config.net.torso} {config.net.hidden}, "
        f"{steps:,} steps each")
    trainer, state, seconds = train_teachers(algorithm, config, budget.seeds, hparams)
    greedy = algorithm == "dqn"
    setting = Setting(name, algorithm, config, trainer, state, greedy)
    scores = evaluate(trainer, state.params, state.obs_stats, greedy, budget.eval_episodes)
    teacher = {
        **summarize(scores),
        "algorithm": algorithm,
        "env": config.env,
        "hidden": list(config.net.hidden),
        "torso": config.net.torso,
        "actor_params": actor_params(config.net, setting.head, trainer.agent),
        "total_timesteps": config.total_timesteps,
        "evaluation": "greedy" if greedy else "stochastic policy",
        "config": repr(config),
        "wall_seconds": seconds,
    }
    log(f"{name}: teacher IQM {fmt_return(teacher)} ({seconds:.0f} s)")
    return setting, teacher


def random_for(env: str, budget: Budget) -> dict[str, Any]:
    """The uniformly random policy's return on `env` (a PPO network with zero parameters)."""
    trainer = rl.make("ppo", ppo_teacher_config(env, 1024))
    state = jax.jit(jax.vmap(trainer.init, in_axes=(0, None)))(seed_keys(3, budget.seeds), f32(ppo.PPOHParams()))
    return random_policy_return(trainer, state, budget.eval_episodes)


def size_experiment(
    env: str, budget: Budget, randoms: dict[str, Any], config: ppo.PPOConfig | None = None, hparams: Any = None,
    fractions: tuple[float, ...] = TARGET_FRACTIONS + EXTRA_FRACTIONS, steps: int | None = None,
    collect: dict[str, int] | None = None,
) -> tuple[dict[str, Any], Setting]:
    """Experiment 1 on one env: students at 25% / 7% / 4% (and `fractions`' others) of the teacher's
    actor, teacher-collected data. Teachers: `config` (default: the 256x256 MLP PPO teacher)."""
    config = ppo_teacher_config(env, budget.ppo_teacher_steps[env]) if config is None else config
    setting, teacher = teacher_setting(f"size/{env}", "ppo", config, budget, hparams)
    random = randoms[env]["mean"] if env == "Acrobot-v1" else None
    ceiling = CEILING.get(env)
    start, end = TEACHER_DATA
    hp = pd.DistillHParams(temperature=1.0, teacher_fraction_start=start, teacher_fraction_end=end)
    rows = []
    for target in fractions:
        net, count = student_net(setting.config.net, setting.head, setting.trainer.agent, target)
        rusu = RUSU_RETAINED.get(target)
        (scores,), (agreement,), seconds = distill(setting, net, "kl", [hp], budget, steps, collect)
        row = student_row(
            f"{100 * target:g}% student", scores, agreement, teacher, random,
            hidden=list(net.hidden), actor_params=count, param_fraction=count / teacher["actor_params"],
            target_fraction=target, rusu_retained=rusu, wall_seconds=seconds,
        )
        ours = primary_retained(row, env)
        row["retained"] = ours
        row["rusu_in_our_ci"] = None if rusu is None else bool(ours["ci"][0] <= rusu <= ours["ci"][1])
        row["student_vs_teacher"] = comparison("student", row["returns"], "teacher", teacher, ceiling)
        rows.append(row)
        log(f"size/{env}: {net.hidden} ({100 * row['param_fraction']:.2f}% of the actor) IQM "
            f"{fmt_return(row['returns'])}, retained {fmt_retained(ours)} (Rusu {fmt_rusu(rusu)}), {seconds:.0f} s")
    result = {
        "env": env,
        "teacher": teacher,
        "retained_definition": "(student - random) / (teacher - random)" if random is not None else "student / teacher",
        "random_policy_return": randoms.get(env),
        "loss": "kl",
        "temperature": 1.0,
        "teacher_fraction": list(TEACHER_DATA),
        "distill_steps": budget.distill_steps if steps is None else steps,
        "distill_collect": collect or {},
        "rows": rows,
    }
    return result, setting


def loss_experiment(
    setting: Setting, teacher: dict[str, Any], target: float, budget: Budget, randoms: dict[str, Any]
) -> dict[str, Any]:
    """Experiment 2: KL(tau = 0.01), KL(tau = 1), NLL and MSE from DQN teachers, student at `target`."""
    env = setting.config.env
    net, count = student_net(setting.config.net, setting.head, setting.trainer.agent, target)
    base = pd.DistillHParams(teacher_fraction_start=TEACHER_DATA[0], teacher_fraction_end=TEACHER_DATA[1])
    runs: list[tuple[str, list[pd.DistillHParams], list[str]]] = [
        ("kl", [base.replace(temperature=0.01), base.replace(temperature=1.0)], ["KL(0.01)", "KL(1)"]),
        ("nll", [base], ["NLL"]),
        ("mse", [base], ["MSE"]),
    ]
    rows: dict[str, dict[str, Any]] = {}
    for loss, variants, labels in runs:
        scores, agreement, seconds = distill(setting, net, loss, variants, budget)
        for label, s, a, hp in zip(labels, scores, agreement, variants):
            rows[label] = student_row(label, s, a, teacher, randoms[env]["mean"], loss=loss,
                                      temperature=float(hp.temperature), wall_seconds=seconds)
            log(f"loss/{env}/{net.hidden}: {label} IQM {fmt_return(rows[label]['returns'])}, "
                f"agreement {100 * rows[label]['agreement_iqm']:.1f}%, {seconds:.0f} s (this call)")
    pairs = [("KL(0.01)", "NLL"), ("KL(0.01)", "MSE"), ("NLL", "MSE"), ("KL(0.01)", "KL(1)")]
    verdicts = [comparison(a, rows[a]["returns"], b, rows[b]["returns"], CEILING.get(env)) for a, b in pairs]
    return {
        "env": env,
        "teacher": teacher,
        "random_policy_return": randoms[env],
        "retained_definition": "(student - random) / (teacher - random)",
        "student_hidden": list(net.hidden),
        "actor_params": count,
        "target_fraction": target,
        "param_fraction": count / teacher["actor_params"],
        "teacher_fraction": list(TEACHER_DATA),
        "rows": list(rows.values()),
        "verdicts": verdicts,
    }


def data_experiment(
    setting: Setting, teacher: dict[str, Any], target: float, budget: Budget, randoms: dict[str, Any]
) -> dict[str, Any]:
    """Experiment 3: teacher-, student- and mixed-collected data (PPO teacher, Acrobot-v1), student at `target`."""
    env = setting.config.env
    net, count = student_net(setting.config.net, setting.head, setting.trainer.agent, target)
    fractions = {"teacher data (1 -> 1)": TEACHER_DATA, "student data (0 -> 0)": STUDENT_DATA,
                 "DAgger mixed (1 -> 0)": MIXED_DATA}
    variants = [pd.DistillHParams(temperature=1.0, teacher_fraction_start=a, teacher_fraction_end=b)
                for a, b in fractions.values()]
    scores, agreement, seconds = distill(setting, net, "kl", variants, budget)
    rows = {}
    for (label, frac), s, a in zip(fractions.items(), scores, agreement):
        rows[label] = student_row(label, s, a, teacher, randoms[env]["mean"], teacher_fraction=list(frac),
                                  wall_seconds=seconds)
        log(f"data/{env}/{net.hidden}: {label} IQM {fmt_return(rows[label]['returns'])}, "
            f"agreement {100 * rows[label]['agreement_iqm']:.1f}%")
    t, st, mx = (rows[k]["returns"] for k in fractions)
    verdicts = [
        comparison("DAgger mixed", mx, "teacher data", t, None),
        comparison("student data", st, "teacher data", t, None),
        comparison("DAgger mixed", mx, "student data", st, None),
    ]
    return {
        "env": env,
        "teacher": teacher,
        "random_policy_return": randoms[env],
        "retained_definition": "(student - random) / (teacher - random)",
        "loss": "kl",
        "temperature": 1.0,
        "student_hidden": list(net.hidden),
        "actor_params": count,
        "target_fraction": target,
        "param_fraction": count / teacher["actor_params"],
        "rows": list(rows.values()),
        "verdicts": verdicts,
        "wall_seconds": seconds,
    }


def minatar_teacher_config(steps: int) -> ppo.PPOConfig:
    return ppo.PPOConfig(env=MINATAR_ENV, num_envs=64, num_steps=128, update_epochs=4, num_minibatches=8,
                         anneal_lr=True, net=MINATAR_TEACHER_NET, total_timesteps=steps, log_every=16)


def mlp_plateau() -> dict[str, Any] | None:
    """The dense MLP return on MINATAR_ENV measured by benchmarks/compression.py (same PPO settings)."""
    path = RESULTS / MLP_PLATEAU_SOURCE
    if not path.exists():
        return None
    record = json.loads(path.read_text())["envs"].get(MINATAR_ENV)
    if record is None:
        return None
    dense, settings = record["dense"], record["settings"]
    return {"iqm": dense["iqm"], "ci": list(dense["ci95"]), "per_seed": dense["per_seed"], "source": path.name,
            "net": settings["config"]["net"], "lr": settings["hparams"]["lr"],
            "total_timesteps": settings["total_timesteps"]}


def minatar_experiment(budget: Budget) -> dict[str, Any]:
    """Experiment 4: experiment 1 on MINATAR_ENV with CNN teachers and CNN students; the teacher is
    compared with the MLP plateau."""
    result, _ = size_experiment(
        MINATAR_ENV, budget, {}, minatar_teacher_config(budget.minatar_teacher_steps), MINATAR_HPARAMS,
        MINATAR_FRACTIONS, budget.minatar_distill_steps, MINATAR_DISTILL_COLLECT,
    )
    config = dataclasses.replace(minatar_teacher_config(budget.minatar_teacher_steps), net=MINATAR_MLP_NET)
    _, mlp = teacher_setting(f"size/{MINATAR_ENV}/mlp", "ppo", config, budget, MINATAR_HPARAMS)
    result["mlp_same_settings"] = mlp
    result["teacher_vs_mlp"] = comparison("CNN teacher", result["teacher"], "MLP, same settings", mlp, None)
    plateau = mlp_plateau()
    result["mlp_plateau"] = plateau
    result["teacher_vs_mlp_plateau"] = (None if plateau is None else
                                        comparison("CNN teacher", result["teacher"], "MLP plateau", plateau, None))
    result["teacher_hparams"] = {k: v for k, v in dataclasses.asdict(MINATAR_HPARAMS).items() if k != "ext"}
    return result


# ----------------------------------------------------------------------------------------------
# Record, plot, markdown
# ----------------------------------------------------------------------------------------------
def git_state() -> dict[str, Any]:
    """HEAD and the tracked files that differ from it (untracked files, e.g. new results, do not count)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout

    dirty = git("status", "--porcelain", "--untracked-files=no").splitlines()
    return {"head": git("rev-parse", "HEAD").strip(), "dirty": bool(dirty), "dirty_paths": [ln[3:] for ln in dirty]}


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_size, ax_loss, ax_data) = plt.subplots(1, 3, figsize=(17, 5), gridspec_kw={"width_ratios": [1.2, 1, 1]})
    for i, exp in enumerate(size_experiments(record)):
        xs = [100 * r["param_fraction"] for r in exp["rows"]]
        ys = [100 * r["retained"]["value"] for r in exp["rows"]]
        err = [[y - 100 * r["retained"]["ci"][0] for y, r in zip(ys, exp["rows"])],
               [100 * r["retained"]["ci"][1] - y for y, r in zip(ys, exp["rows"])]]
        label = f"{exp['env']} (PPO {exp['teacher'].get('torso', 'mlp').upper()} teacher; {exp['retained_definition']})"
        ax_size.errorbar([x * (1 + 0.03 * i) for x in xs], ys, yerr=err, marker="o", capsize=4, label=label)
    ax_size.plot([100 * f for f in TARGET_FRACTIONS], [100 * RUSU_RETAINED[f] for f in TARGET_FRACTIONS], "k*",
                 markersize=12, linestyle="none", label="Rusu et al. 2016 (DQN teachers, Atari)")
    ax_size.axhline(100, color="grey", lw=0.8, ls="--")
    ax_size.set_xscale("log")
    ticks = TARGET_FRACTIONS + EXTRA_FRACTIONS
    ax_size.set_xticks([100 * f for f in ticks], [f"{100 * f:g}%" for f in ticks])
    ax_size.minorticks_off()
    ax_size.set_xlabel("student actor parameters, % of the teacher's")
    ax_size.set_ylabel("retained return, % (IQM over seeds, 95% CI)")
    ax_size.set_title("Student size vs retained return")
    ax_size.legend(fontsize=8)
    _bars(ax_loss, record["loss"], "Loss (DQN teacher, Acrobot-v1)")
    _bars(ax_data, record["data"], "Collected data (PPO teacher, Acrobot-v1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax: Any, exps: list[dict[str, Any]], title: str) -> None:
    """Grouped bars: the teacher, then every variant with one bar per student size; rising from the
    random policy's return, with 95% CIs."""
    random = exps[0]["random_policy_return"]["mean"]
    labels = ["teacher"] + [r["label"] for r in exps[0]["rows"]]
    width = 0.8 / len(exps)

    def bar(x: float, s: dict[str, Any], color: str, label: str | None) -> None:
        err = [[s["iqm"] - s["ci"][0]], [s["ci"][1] - s["iqm"]]]
        ax.bar(x, s["iqm"] - random, width, bottom=random, yerr=err, capsize=3, color=color, label=label)

    bar(0, exps[0]["teacher"], "grey", None)
    for j, exp in enumerate(exps):
        name = f"student {'x'.join(map(str, exp['student_hidden']))} ({100 * exp['param_fraction']:.1f}%)"
        for i, r in enumerate(exp["rows"], start=1):
            bar(i + (j - (len(exps) - 1) / 2) * width, r["returns"], f"C{j}", name if i == 1 else None)
    ax.axhline(random, color="red", lw=0.8, ls="--", label="uniformly random policy")
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo - 0.03 * (hi - lo), hi)  # keep the random policy's line in view
    ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    ax.set_ylabel("return (IQM over seeds, 95% CI)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def size_experiments(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Experiment 1's envs, then MinAtar's when it ran (format of older records: `minatar.skipped`)."""
    minatar = record.get("minatar")
    return record["size"] + ([minatar] if minatar and not minatar.get("skipped") else [])


def markdown(record: dict[str, Any]) -> str:
    s = record["settings"]
    hw = record["hardware"]
    lines = [
        f"`{record['command']}` on {hw['cpu_model']} ({hw['usable_cores']} cores), commit "
        f"{record['commit']['head'][:12]}{' (dirty tree)' if record['commit']['dirty'] else ''}: "
        f"{record['wall_seconds'] / 60:.0f} min in all. {s['seeds']} seeds, {s['eval_episodes']} evaluation episodes "
        f"per seed, {s['distill_steps']:,} distillation steps per student; return = IQM over seeds [95% bootstrap CI]. "
        "Student i distils teacher seed i.",
        "",
        "**Student size vs retained return** (PPO teachers: 256x256 MLP; on MinAtar Young & Tian's CNN, one 3x3 "
        "conv of 16 channels and 128 units; "
        "students of the teacher's torso and depth, narrower; softened KL tau = 1, teacher-collected data, "
        "as in Rusu et al.; retained = student / teacher on CartPole and MinAtar, (student - random) / "
        "(teacher - random) on Acrobot, whose returns are negative)",
        "",
        "| env | student | actor params (% of teacher) | teacher return | student return | retained [95% CI] "
        "| Rusu et al. 2016 | Rusu in our CI | student > teacher |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for exp in size_experiments(record):
        for r in exp["rows"]:
            v = r["student_vs_teacher"]
            lines.append(
                f"| {exp['env']} | {'x'.join(map(str, r['hidden']))} | {r['actor_params']:,} "
                f"({fmt_percent(r['param_fraction'])}) | {fmt_return(exp['teacher'])} | {fmt_return(r['returns'])} "
                f"| {fmt_retained(r['retained'])} | {fmt_rusu(r['rusu_retained'])} "
                f"| {'-' if r['rusu_in_our_ci'] is None else 'yes' if r['rusu_in_our_ci'] else 'no'} "
                f"| {v['verdict']} |"
            )
    randoms = {exp["env"]: exp["random_policy_return"] for exp in record["size"]}
    lines += ["", "Uniformly random policy: " + ", ".join(f"{e} {fmt_return(r)}" for e, r in randoms.items()) + "."]
    experiments = [("loss", "Distillation loss", exp) for exp in record["loss"]]
    experiments += [("data", "Collected data", exp) for exp in record["data"]]
    for key, title, exp in experiments:
        detail = (f"DQN teachers 256x256 on {exp['env']} (greedy evaluation), teacher-collected data"
                  if key == "loss" else f"PPO teachers 256x256 on {exp['env']}, softened KL tau = 1")
        lines += [
            "",
            f"**{title}** ({detail}; student {'x'.join(map(str, exp['student_hidden']))}, "
            f"{fmt_percent(exp['param_fraction'])} of the teacher's actor; retained = (student - random) / "
            "(teacher - random))",
            "",
            "| student | return | retained [95% CI] | greedy agreement (last training batches, IQM) |",
            "|---|---|---|---|",
            f"| teacher | {fmt_return(exp['teacher'])} | 100% | - |",
        ]
        for r in exp["rows"]:
            kept = fmt_retained(r["retained_random_normalized"])
            lines.append(f"| {r['label']} | {fmt_return(r['returns'])} | {kept} | {100 * r['agreement_iqm']:.1f}% |")
        lines.append("")
        lines += [f"- {v['claim']}: **{v['verdict']}** ({v['a']} vs {v['b']})" for v in exp["verdicts"]]
    lines += ["", minatar_summary(record.get("minatar") or {})]
    return "\n".join(lines)


def minatar_summary(m: dict[str, Any]) -> str:
    """How the MinAtar rows were measured, and the teacher against the MLP plateau."""
    if not m or m.get("skipped"):
        return f"MinAtar: not measured ({m.get('reason', 'no record')})."
    t, p = m["teacher"], m["mlp_plateau"]
    text = (f"MinAtar ({m['env']}): CNN teachers {t['total_timesteps']:,} steps ({t['wall_seconds'] / 60:.0f} min for "
            f"{len(t['per_seed'])} seeds, compile-inclusive), students distilled for {m['distill_steps']:,} steps; "
            f"measured by `{m['command']}` at commit {m['commit']['head'][:12]}"
            f"{' (dirty tree)' if m['commit']['dirty'] else ''}, {m['wall_seconds'] / 60:.0f} min in all.")
    mlp, v = m["mlp_same_settings"], m["teacher_vs_mlp"]
    text += (f" CNN teacher {fmt_return(t)} vs a {'x'.join(map(str, mlp['hidden']))} MLP trained with the same "
             f"settings and steps {fmt_return(mlp)}: teacher above the MLP: **{v['verdict']}**.")
    if p is not None:
        v = m["teacher_vs_mlp_plateau"]
        text += (f" The MLP plateau of {p['source']} ({'x'.join(map(str, p['net']['hidden']))} MLP, lr {p['lr']:g}, "
                 f"{p['total_timesteps']:,} steps): "
                 f"{fmt_return(p)}; teacher above it: **{v['verdict']}**.")
    return text


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def minatar_record(budget: Budget, argv: list[str]) -> dict[str, Any]:
    """Experiment 4 with its own provenance (it may be measured apart from the rest: --only minatar)."""
    t0, commit = time.perf_counter(), git_state()
    result = minatar_experiment(budget)
    return {
        **result,
        "skipped": False,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/distillation.py", *argv]),
        "commit": {**commit, "head_at_end": git_state()["head"]},
        "settings": {"teacher_steps": budget.minatar_teacher_steps, "distill_steps": budget.minatar_distill_steps,
                     "teacher_net": dataclasses.asdict(MINATAR_TEACHER_NET), "fractions": list(MINATAR_FRACTIONS),
                     "distill_collect": MINATAR_DISTILL_COLLECT, "seeds": budget.seeds,
                     "eval_episodes": budget.eval_episodes},
        "wall_seconds": time.perf_counter() - t0,
    }


def run_minatar_only(budget: Budget, quick: bool, argv: list[str]) -> dict[str, Any]:
    """Measure experiment 4 alone and store it in the saved record of a full run (same budget kind)."""
    tp = _throughput()
    slug = tp.cpu_short_name(tp.cpu_info()["cpu_model"]) + ("_quick" if quick else "")
    out = RESULTS / f"distillation_{slug}.json"
    if not out.exists():
        raise SystemExit(f"--only minatar adds to {out}, which does not exist: run the full benchmark first")
    record = json.loads(out.read_text())
    record["minatar"] = minatar_record(budget, argv)
    record["wall_seconds_per_experiment"]["minatar"] = record["minatar"]["wall_seconds"]
    record["wall_seconds_per_experiment"].pop("minatar_probe", None)
    out.write_text(json.dumps(record, indent=2) + "\n")
    png = out.with_suffix(".png")
    plot(record, png)
    log(f"wrote {out} and {png}")
    return record


def run(budget: Budget, quick: bool, argv: list[str]) -> dict[str, Any]:
    tp = _throughput()
    hw = tp.cpu_info()
    commit = git_state()  # the code this run imported (others may commit while it runs)
    wall: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        result = fn()
        wall[name] = time.perf_counter() - t0
        return result

    randoms = timed("random_policy", lambda: {env: random_for(env, budget) for env in ("Acrobot-v1", "CartPole-v1")})
    log("random policy: " + ", ".join(f"{e} {fmt_return(r)}" for e, r in randoms.items()))
    acrobot, acrobot_setting = timed("size_acrobot", lambda: size_experiment("Acrobot-v1", budget, randoms))
    cartpole, _ = timed("size_cartpole", lambda: size_experiment("CartPole-v1", budget, randoms))
    dqn_config = dqn_teacher_config("Acrobot-v1", budget.dqn_teacher_steps)
    dqn_setting, dqn_teacher = timed("dqn_teacher", lambda: teacher_setting("loss", "dqn", dqn_config, budget))
    loss = timed("loss_dqn_acrobot", lambda: [loss_experiment(dqn_setting, dqn_teacher, f, budget, randoms)
                                              for f in COMPARISON_FRACTIONS])
    data = timed("data_ppo_acrobot", lambda: [data_experiment(acrobot_setting, acrobot["teacher"], f, budget, randoms)
                                              for f in COMPARISON_FRACTIONS])
    minatar = timed("minatar", lambda: minatar_record(budget, argv))
    slug = tp.cpu_short_name(hw["cpu_model"]) + ("_quick" if quick else "")
    record = {
        "benchmark": "distillation",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/distillation.py", *argv]),
        "hardware": hw,
        "versions": tp.local_versions(),
        "commit": {**commit, "head_at_end": git_state()["head"]},
        "settings": {
            **dataclasses.asdict(budget),
            "teacher_hidden": list(TEACHER_HIDDEN),
            "target_fractions": list(TARGET_FRACTIONS),
            "extra_fractions": list(EXTRA_FRACTIONS),
            "comparison_fractions": list(COMPARISON_FRACTIONS),
            "statistic": "IQM over per-seed mean returns, 95% percentile bootstrap CI (2000 resamples)",
            "retained_ci": "paired bootstrap over seeds; random-policy return held at its point estimate",
            "verdict_rule": f"yes/no only when the CIs are disjoint; tie when they overlap or both IQMs are "
                            f">= {SATURATED:g} x the ceiling {CEILING}",
            "evaluation": "PPO teachers and students: stochastic policy; DQN teachers and students: greedy",
            "agreement": "fraction of the last metrics row's training batches where the student's greedy action "
                         "is the teacher's (states from the behaviour policy)",
            "wall_seconds_note": "compile-inclusive, on a shared machine: information only",
        },
        "rusu_2016": {
            "source": RUSU_SOURCE,
            "retained_by_param_fraction": {str(k): v for k, v in RUSU_RETAINED.items()},
            "setting": "DQN teachers, KL loss with tau = 0.01, teacher-collected data",
        },
        "wall_seconds": time.perf_counter() - START,
        "wall_seconds_per_experiment": wall,
        "size": [acrobot, cartpole],
        "loss": loss,
        "data": data,
        "minatar": minatar,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"distillation_{slug}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    png = RESULTS / f"distillation_{slug}.png"
    plot(record, png)
    log(f"wrote {out} and {png}")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, tiny budgets")
    parser.add_argument("--markdown", action="store_true", help="print README-ready tables from the saved JSON")
    parser.add_argument("--json", type=Path, default=None, help="results file for --markdown")
    parser.add_argument("--only", choices=["minatar"], default=None,
                        help="measure one experiment and store it in the saved JSON of a full run")
    args = parser.parse_args(argv)
    if args.markdown:
        path = args.json or next(p for p in sorted(RESULTS.glob("distillation_*.json")) if "_quick" not in p.name)
        print(markdown(json.loads(path.read_text())))
        return 0
    budget, command = QUICK if args.quick else FULL, sys.argv[1:] if argv is None else argv
    record = (run_minatar_only if args.only else run)(budget, args.quick, command)
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
