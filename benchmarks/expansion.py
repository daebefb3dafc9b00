"""Set and attention networks on an entity task: sample efficiency, zero-shot entity counts, and what an
MLP student learns from an attention teacher; multi-task networks and gradients on 10 CartPole tasks.

    python benchmarks/expansion.py               # the full run: 8 seeds, 64 evaluation episodes per seed
                                                 # (multitask: 32 per task)
    python benchmarks/expansion.py --quick       # smoke run: 2 seeds, tiny budgets (writes *_quick files)
    python benchmarks/expansion.py --markdown    # README-ready tables from the saved JSON
    python benchmarks/expansion.py --only distillation   # rerun one section, keep the others in the JSON

The task is `EntityNavigation-v0` (`rlcx_jax.envs.entities`): the agent must reach the one goal among
`num_entities` entities, each observed as a token (present, is_goal, dx, dy) in one of `max_entities`
slots; the goal sits in a random slot, so a flat MLP has to find the marked token among the slots while
a set network pools over tokens. Reward: potential shaping (d_prev - d_new) plus 1 on reaching the goal
(which ends the episode), at most 50 steps, so the return of an optimal policy is about the initial
distance + 1 and a uniformly random policy's about 0; both reference returns are measured below (the
reference policy moves along the axis of the goal's larger offset, read from the goal token).

Sections (each a function in SECTIONS; each adds its own block to the saved JSON):

1. networks -- PPO (Schulman et al. 2017; `rlcx_jax.rl.ppo`, the library's PPO defaults: PureJaxRL's
   settings, lr 2.5e-4 annealed, 4 epochs of 4 minibatches, entropy 0.01, clip 0.2, GAE 0.95, gamma 0.99,
   with 8 environments x 128 steps per update) on EntityNavigation-v0 (8 slots, 4 entities) with four
   networks, the same env-step budget and hyperparameters for all:
     * mlp: the flat MLP, hidden (64, 64) (flattens the 8 x 4 observation);
     * deepsets: phi per token (two layers of width 32), pooled by a learned query, rho = (64,)
       (Zaheer et al. 2017, "Deep Sets"; PMA pooling, Lee et al. 2019, "Set Transformer");
     * attention: tokens of width 32, 4 heads, ATTENTION_DEPTH pre-norm self-attention blocks with
       padding masked, pooled by a learned query, then (64,) (Vaswani et al. 2017; Lee et al. 2019);
     * memory: the attention network whose attention layers also attend to 8 learned memory slots
       (Sukhbaatar et al. 2019, "Augmenting self-attention with persistent memory").
   Depth: a depth check (2 seeds, a short budget) trains attention depth 1 and 2 and is recorded with the
   run; depth 1 is used (ATTENTION_DEPTH), see DEPTH_CHOICE.
   Evaluation: each seed's stochastic policy (the library evaluates PPO with its stochastic policy,
   `rl.evaluate.default_greedy`), the mean return over the evaluation episodes, at 4 entities (training)
   and zero-shot at 6 and 8 entities (same 8 slots, `EnvParams.num_entities`), and for the set networks
   at 12 entities in 16 slots (`EntityNavigation(max_entities=16)`, registered here as WIDE_ENV; the
   MLP's input size is fixed at 8 slots, so it is not applicable there). Training env steps per second
   are measured apart from compilation (all seeds vmapped in one program).
2. distillation -- each seed's attention policy from section 1 is a teacher; policy distillation (Rusu
   et al. 2016, "Policy Distillation"; `rlcx_jax.distill.policy_distillation`, softened KL at tau = 1,
   the library's default DAgger-style data, teacher acting with probability 1 -> 0 over the run, Ross et
   al. 2011) trains an MLP student (64, 64) for each teacher, once without and once with attention
   transfer (Zagoruyko & Komodakis 2017, "Paying more attention to attention", ICLR;
   `rlcx_jax.distill.attention_transfer.AttentionTransfer`, coef 1, and 0.1 as a sensitivity check): the
   teacher's map is its pooling query's attention over the entity tokens (mean over heads), the
   student's the saliency of its greedy logit per token (sum of |input gradient| over the token's
   features), and the term is || S/||S|| - T/||T|| ||_2 over the present entities only (the library's
   default `mask_padding=True`: padding slots, where the attention map is 0 by construction, are left
   out). Same distillation steps and hyperparameters for every student. Reported: student return (4
   entities, zero-shot 6 and 8), greedy-action agreement with its teacher on states the teacher visits
   (stochastic policy; 4 and 8 entities), and, on the same states, the attention-transfer distance and
   the share of each map on the goal token (how much of where the student "looks" is the goal), both
   over the present entities, as the trained term compares the maps.
3. multitask -- PPO (the library's defaults, PureJaxRL's CartPole PPO: 4 envs x 128 steps, MLP 64x64
   tanh) on `MultiTaskCartPole-v0` (`rlcx_jax.envs.task_set`): 10 CartPole tasks with varied pole
   length, masses and force, the force flipped in tasks 1, 3, 5, 7, 9, a task drawn per episode and its
   one-hot appended to the observation. Same budget and hyperparameters for five variants
   (`NetConfig(num_tasks=10, task_mode=...)`, `rlcx_jax.multitask.MultiTask`):
     * shared head: task_mode "shared" (the one-hot is ignored), no extension;
     * task embedding: task_mode "embedding" (the one-hot joins the torso features before one head);
     * per-task heads: task_mode "heads" (one output layer per task over a shared torso), the gradient
       of the batch's mean loss (no extension);
     * heads + per-task gradients: MultiTask(task_gradient="weighted"): one gradient per task (the loss
       on that task's samples), summed with uniform weights over the tasks present in the batch;
     * heads + PCGrad: MultiTask(task_gradient="pcgrad"), the per-task gradients with conflicting
       components projected away (Yu et al. 2020, "Gradient surgery for multi-task learning").
   Score of a seed: the mean over the 10 tasks of its mean return over the evaluation episodes of each
   task (`TaskSetParams.task = t`; stochastic policy for PPO as the library evaluates it); per-task
   returns are kept too. A task's return is at most 200 (its time limit), so variants at that ceiling
   can only tie. Also DQN (the library's defaults, PureJaxRL's CartPole DQN) with a shared head vs
   per-task heads + PCGrad (greedy policy), when the budget has DQN steps.

Statistics: one score per seed (mean return over the evaluation episodes), aggregated over seeds with
the interquartile mean (IQM) and a 95% percentile-bootstrap CI (`rlcx_jax.logging`, Agarwal et al. 2021).
A verdict "A > B" is "yes" or "no" only when the two CIs are disjoint, otherwise "tie (CIs overlap)".
Student i distils teacher seed i. Compile seconds are measured apart from run seconds; wall seconds on
a shared 2-core machine are information, not a speed claim.

Results: benchmarks/results/expansion_<cpu>.json, expansion_<cpu>_entities.png (return vs entity count
per network, learning curves), expansion_<cpu>_distillation.png and expansion_<cpu>_multitask.png (score
per variant, per-task returns, learning curves).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.util
import json
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

from rlcx_jax import envs, nets
from rlcx_jax import logging as rlog
from rlcx_jax.distill import attention_transfer as at
from rlcx_jax.distill import policy_distillation as pd
from rlcx_jax.envs.entities import ENTITY_NAV_ID, EntityNavigation, EntityNavParams
from rlcx_jax.envs.task_set import MULTITASK_CARTPOLE_ID
from rlcx_jax.multitask import MultiTask, MultiTaskHParams
from rlcx_jax.rl import dqn, ppo, rollout
from rlcx_jax.rl.common import vmap_learn
from rlcx_jax.rl.evaluate import default_greedy, make_evaluator

ENV = ENTITY_NAV_ID
WIDE_ENV = "EntityNavigation16-v0"
"""EntityNavigation(max_entities=16), registered by this benchmark: `env_kwargs` only override
EnvParams fields, so the constructor's `max_entities` needs its own env id."""
WIDE_SLOTS = 16
TRAIN_ENTITIES = 4
CONDITIONS = (  # (key, slots, entities)
    ("4", 8, 4),
    ("6", 8, 6),
    ("8", 8, 8),
    ("12/16", WIDE_SLOTS, 12),
)
CONDITION_LABELS = {
    "4": "4 entities (training)",
    "6": "6 entities (zero-shot)",
    "8": "8 entities (zero-shot)",
    "12/16": "12 entities in 16 slots (zero-shot)",
}
ATTENTION_DEPTH = 1
DEPTH_CHOICE = (
    "depth 1: in a probe before the full run (2 seeds, 65,536 steps, 8 envs) depth 1 and depth 2 both reached "
    "a return near the reference policy's while depth 2 trained about 3x slower; the run's own depth check is "
    "recorded beside it"
)
ATTENTION_WIDTH = 32
NETWORKS: dict[str, nets.NetConfig] = {
    "mlp": nets.NetConfig(hidden=(64, 64)),
    "deepsets": nets.NetConfig(torso="deepsets", attention_width=ATTENTION_WIDTH, hidden=(64,)),
    "attention": nets.NetConfig(
        torso="attention",
        attention_width=ATTENTION_WIDTH,
        attention_heads=4,
        attention_depth=ATTENTION_DEPTH,
        hidden=(64,),
    ),
    "memory": nets.NetConfig(
        torso="memory",
        attention_width=ATTENTION_WIDTH,
        attention_heads=4,
        attention_depth=ATTENTION_DEPTH,
        memory_slots=8,
        hidden=(64,),
    ),
}
SET_NETWORKS = ("deepsets", "attention", "memory")
"""Networks whose parameters do not depend on the number of slots (they run on 16 slots)."""
PPO_COLLECT = dict(num_envs=8, num_steps=128)
"""PPO rollout shape (the library's default is 4 envs; 8 gives a larger batch per update). Every other
PPO setting and hyperparameter is the library's default (`ppo.PPOConfig`, `ppo.PPOHParams`)."""
PPO_HPARAMS = ppo.PPOHParams()
STUDENT_NET = nets.NetConfig(hidden=(64, 64))
AT_COEFS = (1.0, 0.1)
"""Attention-transfer weights: 1 (the main comparison) and 0.1 (a lighter pull, as a sensitivity check)."""
DISTILL_HPARAMS = pd.DistillHParams()
"""The library's defaults: lr 1e-3, softened KL at tau = 1, value_coef 0.5, teacher fraction 1 -> 0."""
AGREEMENT_ENTITIES = (4, 8)

MT_ENV = MULTITASK_CARTPOLE_ID
MT_TASKS = 10
MT_FLIPPED = (1, 3, 5, 7, 9)
"""Tasks whose force is flipped (`envs.task_set`): the same action pushes the cart the other way."""
MT_MAX_RETURN = 200.0
"""Every task's time limit is 200 steps at reward 1 per step: the ceiling of a task's return."""


@dataclasses.dataclass(frozen=True)
class MTVariant:
    """One multi-task setup: the task mode of the network and the MultiTask extension's gradient
    (None: no extension, the gradient of the batch's mean loss)."""

    label: str
    task_mode: str
    task_gradient: str | None

    def net(self, base: nets.NetConfig) -> nets.NetConfig:
        return dataclasses.replace(base, num_tasks=MT_TASKS, task_mode=self.task_mode)

    def extensions(self) -> tuple[Any, ...]:
        return () if self.task_gradient is None else (MultiTask(task_gradient=self.task_gradient),)

    def hparams(self, base: Any) -> Any:
        return base if self.task_gradient is None else base.with_ext(MultiTask.name, MT_HPARAMS)


MT_VARIANTS: dict[str, MTVariant] = {
    "shared": MTVariant("shared head", "shared", None),
    "embedding": MTVariant("task embedding", "embedding", None),
    "heads": MTVariant("per-task heads", "heads", None),
    "weighted": MTVariant("heads + per-task gradients", "heads", "weighted"),
    "pcgrad": MTVariant("heads + PCGrad", "heads", "pcgrad"),
}
"""The PPO variants of the multitask section, every one on the same budget and PPO hyperparameters."""
MT_DQN_VARIANTS = ("shared", "pcgrad")
MT_PPO_NET = ppo.PPOConfig().net
"""The library's PPO network (MLP 64x64 tanh), made multi-task by each variant."""
MT_DQN_NET = dqn.DQNConfig().net
"""The library's DQN network (MLP 120x84 relu), made multi-task by each variant."""
MT_HPARAMS = MultiTaskHParams()
"""Uniform task weights, no head decay."""
MT_DQN_HPARAMS = dqn.DQNHParams()


@dataclasses.dataclass(frozen=True)
class Budget:
    """Seeds, evaluation episodes and environment steps per seed of every stage."""

    seeds: int
    eval_episodes: int
    train_steps: int
    depth_check_seeds: int
    depth_check_steps: int
    distill_steps: int
    agreement_envs: int
    agreement_steps: int
    mt_seeds: int
    mt_steps: int
    mt_eval_episodes: int
    mt_dqn_seeds: int
    mt_dqn_steps: int
    """0: no DQN runs in the multitask section."""


FULL = Budget(
    seeds=8,
    eval_episodes=64,
    train_steps=131_072,
    depth_check_seeds=2,
    depth_check_steps=65_536,
    distill_steps=131_072,
    agreement_envs=16,
    agreement_steps=64,
    mt_seeds=8,
    mt_steps=300_000,
    mt_eval_episodes=32,
    mt_dqn_seeds=8,
    mt_dqn_steps=200_000,
)
QUICK = Budget(
    seeds=2,
    eval_episodes=8,
    train_steps=8_192,
    depth_check_seeds=2,
    depth_check_steps=4_096,
    distill_steps=4_096,
    agreement_envs=4,
    agreement_steps=16,
    mt_seeds=2,
    mt_steps=8_192,
    mt_eval_episodes=4,
    mt_dqn_seeds=2,
    mt_dqn_steps=12_000,
)

START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {msg}", flush=True)


def _throughput() -> Any:
    """benchmarks/throughput.py's machine, version and git helpers, loaded by path."""
    spec = importlib.util.spec_from_file_location("rlcx_bench_throughput", HERE / "throughput.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _register_wide_env() -> None:
    if WIDE_ENV not in envs.list_envs():
        envs.register(
            WIDE_ENV, lambda: (EntityNavigation(WIDE_SLOTS), EntityNavigation(WIDE_SLOTS).default_params), discrete=True
        )


# ----------------------------------------------------------------------------------------------
# Statistics and verdicts
# ----------------------------------------------------------------------------------------------
def summarize(per_seed: np.ndarray) -> dict[str, Any]:
    """Per-seed scores with their IQM, mean and 95% bootstrap CI of the IQM."""
    point, lo, hi = rlog.bootstrap_ci(np.asarray(per_seed), "iqm")
    return {"per_seed": [float(x) for x in per_seed], "iqm": point, "ci": [lo, hi], "mean": float(np.mean(per_seed))}


def verdict(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Is A's IQM above B's? yes / no when the CIs are disjoint, a tie otherwise."""
    if a["ci"][0] > b["ci"][1]:
        return "yes"
    if a["ci"][1] < b["ci"][0]:
        return "no"
    return "tie (CIs overlap)"


def fmt(s: dict[str, Any] | None, digits: int = 2) -> str:
    if s is None:
        return "n/a"
    return f"{s['iqm']:.{digits}f} [{s['ci'][0]:.{digits}f}, {s['ci'][1]:.{digits}f}]"


def fmt_pct(s: dict[str, Any]) -> str:
    return f"{100 * s['iqm']:.1f}% [{100 * s['ci'][0]:.1f}, {100 * s['ci'][1]:.1f}]"


def comparison(name_a: str, a: dict[str, Any], name_b: str, b: dict[str, Any], percent: bool = False) -> dict:
    """One verdict with the figures it comes from."""
    f = fmt_pct if percent else fmt
    return {"claim": f"{name_a} > {name_b}", "verdict": verdict(a, b), "a": f(a), "b": f(b)}


# ----------------------------------------------------------------------------------------------
# Training and evaluation helpers
# ----------------------------------------------------------------------------------------------
def f32(tree: Any) -> Any:
    """Hyperparameters as float32 arrays (traced, not baked into the program)."""
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def seed_keys(tag: int, n: int) -> jax.Array:
    return jax.random.split(jax.random.PRNGKey(tag), n)


def ppo_config(net: nets.NetConfig, steps: int, env: str = ENV) -> ppo.PPOConfig:
    return ppo.PPOConfig(env=env, net=net, total_timesteps=steps, log_every=4, **PPO_COLLECT)


def env_params(entities: int) -> EntityNavParams:
    """The default EntityNavigation parameters with `entities` present (traced: one program for all counts)."""
    return EntityNavParams(num_entities=jnp.asarray(entities, jnp.int32))


def timed_call(fn: Callable[..., Any], *args: Any) -> tuple[Any, float, float]:
    """(output, compile seconds, run seconds) of jax.jit(fn)(*args)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return out, compile_s, time.perf_counter() - t0


@dataclasses.dataclass
class Population:
    """Seeds of one network trained with PPO (vmapped), with the record of the run."""

    name: str
    net: nets.NetConfig
    config: ppo.PPOConfig
    trainer: Any
    state: Any
    record: dict[str, Any]


def train_population(name: str, net: nets.NetConfig, seeds: int, steps: int) -> Population:
    config = ppo_config(net, steps)
    trainer = ppo.make(config)
    log(f"train {name}: {seeds} seeds x {config.num_updates * config.steps_per_update:,} steps")
    out, compile_s, run_s = timed_call(
        jax.vmap(trainer.train, in_axes=(0, None)), seed_keys(0, seeds), f32(PPO_HPARAMS)
    )
    env_steps = config.num_updates * config.steps_per_update * seeds
    curve_steps = np.asarray(out.metrics.env_steps)[0]
    curve = np.asarray(out.metrics.episode.episode_return)  # [seeds, rows]
    record = {
        "net": dataclasses.asdict(net),
        "seeds": seeds,
        "total_timesteps_per_seed": config.num_updates * config.steps_per_update,
        "compile_s": compile_s,
        "run_s": run_s,
        "env_steps_per_s": env_steps / run_s,
        "learning_curve": {
            "env_steps": curve_steps.tolist(),
            "mean_return": curve.mean(axis=0).tolist(),
            "note": "training episodes' mean return per metrics row, mean over seeds",
        },
    }
    log(f"train {name}: compile {compile_s:.0f} s, run {run_s:.0f} s, {env_steps / run_s:,.0f} env steps/s")
    return Population(name, net, config, trainer, out.state, record)


class Evaluators:
    """Stochastic-policy evaluators (the library's `make_evaluator`), one compiled program per trainer
    and env id; the entity count is a traced argument."""

    def __init__(self, episodes: int) -> None:
        self.episodes = episodes
        self._fns: dict[Any, Any] = {}

    def __call__(
        self, trainer: Any, params: Any, obs_stats: Any, slots: int, entities: int, key_tag: int
    ) -> np.ndarray:
        """Mean return per seed over `episodes` episodes -> [seeds]."""
        if slots == WIDE_SLOTS:
            trainer = dataclasses.replace(trainer, config=dataclasses.replace(trainer.config, env=WIDE_ENV))
        cache_key = (id(trainer.act), trainer.config.env)
        if cache_key not in self._fns:
            greedy = default_greedy("ppo")
            evaluate = make_evaluator(trainer, self.episodes, greedy)
            self._fns[cache_key] = jax.jit(jax.vmap(evaluate, in_axes=(0, 0, 0, None)))
        n = jax.tree.leaves(params)[0].shape[0]
        returns = self._fns[cache_key](params, obs_stats, seed_keys(key_tag, n), env_params(entities))
        return np.asarray(returns).mean(axis=1)


def reference_act(kind: str) -> Callable[..., jax.Array]:
    """act(params, obs_stats, obs, key, greedy) of a policy with no parameters: "random" (uniform over the
    5 actions) or "reference" (one step along the axis of the goal token's larger offset)."""

    def act(params: Any, obs_stats: Any, obs: jax.Array, key: jax.Array, greedy: bool = False) -> jax.Array:
        if kind == "random":
            return jax.random.randint(key, obs.shape[:1], 0, 5)
        goal = jnp.argmax(obs[..., 1], axis=-1)
        d = jnp.take_along_axis(obs[..., 2:], goal[:, None, None], axis=1)[:, 0]  # [B, 2]: goal - agent
        along_x = jnp.abs(d[:, 0]) >= jnp.abs(d[:, 1])
        return jnp.where(along_x, jnp.where(d[:, 0] > 0, 4, 3), jnp.where(d[:, 1] > 0, 1, 2))  # +x / -x, +y / -y

    return act


def reference_returns(base_trainer: Any, evaluators: Evaluators, seeds: int) -> dict[str, dict[str, Any]]:
    """The uniformly random and the reference policy at every condition (one 'seed' per evaluation key)."""
    out: dict[str, dict[str, Any]] = {}
    for kind in ("random", "reference"):
        trainer = dataclasses.replace(base_trainer, act=reference_act(kind))
        dummy = jnp.zeros((seeds,))
        out[kind] = {
            key: summarize(evaluators(trainer, dummy, dummy, slots, entities, 2 + i))
            for i, (key, slots, entities) in enumerate(CONDITIONS)
        }
    return out


def evaluate_conditions(
    trainer: Any, params: Any, obs_stats: Any, evaluators: Evaluators, set_network: bool
) -> dict[str, dict[str, Any] | None]:
    """Per condition: the summary of per-seed returns, None where the network cannot take the slots."""
    result: dict[str, dict[str, Any] | None] = {}
    for i, (key, slots, entities) in enumerate(CONDITIONS):
        if slots != 8 and not set_network:
            result[key] = None
            continue
        result[key] = summarize(evaluators(trainer, params, obs_stats, slots, entities, 2 + i))
    return result


def visited_obs(trainer: Any, params: Any, obs_stats: Any, entities: int, budget: Budget, key_tag: int) -> jax.Array:
    """[seeds, B, slots, 4] observations visited by each seed's stochastic policy at `entities` entities."""
    env = trainer.agent.env

    def one(p: Any, stats: Any, k: jax.Array) -> jax.Array:
        k_reset, k_run = jax.random.split(k)
        ep = env_params(entities)
        runner = rollout.reset(env, ep, k_reset, budget.agreement_envs)

        def policy_fn(kk: jax.Array, obs: jax.Array) -> tuple[jax.Array, None]:
            return trainer.act(p, stats, obs, kk, False), None

        _, traj = rollout.collect(env, ep, policy_fn, runner, k_run, budget.agreement_steps)
        return traj.obs.reshape((-1,) + traj.obs.shape[2:])

    n = jax.tree.leaves(params)[0].shape[0]
    return jax.jit(jax.vmap(one))(params, obs_stats, seed_keys(key_tag, n))


# ----------------------------------------------------------------------------------------------
# Run context: populations are trained once and shared by the sections that need them
# ----------------------------------------------------------------------------------------------
class Context:
    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.evaluators = Evaluators(budget.eval_episodes)
        self._populations: dict[str, Population] = {}

    def population(self, name: str) -> Population:
        if name not in self._populations:
            self._populations[name] = train_population(name, NETWORKS[name], self.budget.seeds, self.budget.train_steps)
        return self._populations[name]


# ----------------------------------------------------------------------------------------------
# Section 1: networks on the entity task
# ----------------------------------------------------------------------------------------------
def depth_check(budget: Budget) -> dict[str, Any]:
    """Attention depth 1 vs 2 at a short budget (2 seeds): return and training speed."""
    rows = {}
    evaluators = Evaluators(budget.eval_episodes)
    for depth in (1, 2):
        net = dataclasses.replace(NETWORKS["attention"], attention_depth=depth)
        pop = train_population(f"attention depth {depth}", net, budget.depth_check_seeds, budget.depth_check_steps)
        returns = evaluators(pop.trainer, pop.state.params, pop.state.obs_stats, 8, TRAIN_ENTITIES, 2)
        rows[str(depth)] = {**pop.record, "return": summarize(returns)}
        rows[str(depth)].pop("learning_curve")
        log(f"depth check: depth {depth} return {fmt(rows[str(depth)]['return'])}")
    return {
        "rows": rows,
        "chosen": ATTENTION_DEPTH,
        "rule": DEPTH_CHOICE,
        "steps": budget.depth_check_steps,
        "seeds": budget.depth_check_seeds,
    }


def networks_section(ctx: Context) -> dict[str, Any]:
    budget = ctx.budget
    _register_wide_env()
    check = depth_check(budget)
    rows: dict[str, Any] = {}
    for name in NETWORKS:
        pop = ctx.population(name)
        t0 = time.perf_counter()
        returns = evaluate_conditions(
            pop.trainer, pop.state.params, pop.state.obs_stats, ctx.evaluators, name in SET_NETWORKS
        )
        rows[name] = {**pop.record, "returns": returns, "eval_s": time.perf_counter() - t0}
        log(f"{name}: " + ", ".join(f"{k}: {fmt(v)}" for k, v in returns.items()))
    refs = reference_returns(ctx.population("mlp").trainer, ctx.evaluators, budget.seeds)
    verdicts = [
        comparison(
            "attention (4 entities)", rows["attention"]["returns"]["4"], "mlp (4 entities)", rows["mlp"]["returns"]["4"]
        )
    ]
    for other in ("deepsets", "memory"):
        verdicts.append(
            comparison(
                "attention (4 entities)",
                rows["attention"]["returns"]["4"],
                f"{other} (4 entities)",
                rows[other]["returns"]["4"],
            )
        )
    verdicts.append(
        comparison(
            "deepsets (4 entities)", rows["deepsets"]["returns"]["4"], "mlp (4 entities)", rows["mlp"]["returns"]["4"]
        )
    )
    drops = []
    for name in NETWORKS:
        for key, _, _ in CONDITIONS[1:]:
            at_k = rows[name]["returns"][key]
            if at_k is None:
                continue
            v = comparison(
                f"{name} at 4 entities", rows[name]["returns"]["4"], f"{name} at {CONDITION_LABELS[key]}", at_k
            )
            v["network"], v["condition"] = name, key
            v["keeps_return"] = {"no": "yes (higher)", "yes": "no (drop)"}.get(v["verdict"], "yes (no drop detected)")
            base = rows[name]["returns"]["4"]["iqm"]
            v["retained"] = at_k["iqm"] / base if base > 0.1 else None  # a ratio to a return near 0 means nothing
            drops.append(v)
    for key, _, _ in CONDITIONS[1:3]:
        verdicts.append(
            comparison(
                f"attention ({CONDITION_LABELS[key]})",
                rows["attention"]["returns"][key],
                f"mlp ({CONDITION_LABELS[key]})",
                rows["mlp"]["returns"][key],
            )
        )
    return {
        "env": ENV,
        "wide_env": f"{WIDE_ENV} = EntityNavigation(max_entities={WIDE_SLOTS}), registered by this benchmark",
        "conditions": [{"key": k, "slots": s, "entities": e, "label": CONDITION_LABELS[k]} for k, s, e in CONDITIONS],
        "evaluation": "stochastic policy (rl.evaluate.default_greedy('ppo') is False), mean return over "
        f"{budget.eval_episodes} episodes per seed",
        "ppo_config": repr(ppo_config(NETWORKS["mlp"], budget.train_steps)),
        "ppo_hparams": {k: v for k, v in dataclasses.asdict(PPO_HPARAMS).items() if k != "ext"},
        "depth_check": check,
        "rows": rows,
        "reference_policies": refs,
        "verdicts": verdicts,
        "zero_shot": drops,
    }


# ----------------------------------------------------------------------------------------------
# Section 2: attention teacher -> MLP student, with and without attention transfer
# ----------------------------------------------------------------------------------------------
def distill_config(teacher: Population, steps: int, with_at: bool) -> pd.DistillConfig:
    ext = (
        (
            at.AttentionTransfer(
                teacher_algorithm="ppo", teacher_net=teacher.net, teacher_map="attention", student_map="saliency"
            ),
        )
        if with_at
        else ()
    )
    return pd.DistillConfig(
        env=ENV,
        teacher_algorithm="ppo",
        teacher_net=teacher.net,
        net=STUDENT_NET,
        loss="kl",
        total_timesteps=steps,
        log_every=4,
        extensions=ext,
    )


def distill_students(
    teacher: Population, budget: Budget, coefs: tuple[float, ...] | None
) -> tuple[Any, list[tuple[Any, dict[str, Any]]]]:
    """Distil every teacher seed into an MLP student (student i distils teacher seed i): without attention
    transfer (`coefs` None), or with it once per coefficient in `coefs` (one compiled program; the
    coefficient is a traced hyperparameter). Returns (trainer, [(seed-batched student state, record)])."""
    with_at = coefs is not None
    config = distill_config(teacher, budget.distill_steps, with_at)
    trainer = pd.make(config)
    tstate = teacher.state
    teachers = pd.Teacher(params=tstate.params, obs_stats=tstate.obs_stats)
    init = jax.jit(jax.vmap(trainer.init, in_axes=(0, None, 0)))
    learn, runs = None, []
    for coef in coefs if with_at else (None,):
        hparams = DISTILL_HPARAMS
        if coef is not None:
            hparams = hparams.with_ext(at.AttentionTransfer.name, at.AttentionTransferHParams(coef=coef))
        state = init(seed_keys(1, budget.seeds), f32(hparams), teachers)  # installs the AT teacher too
        compile_s = 0.0
        if learn is None:  # the first run compiles; later coefficients reuse the program
            t0 = time.perf_counter()
            learn = jax.jit(vmap_learn(trainer, trainer.num_updates, state)).lower(state).compile()
            compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        state, metrics = jax.block_until_ready(learn(state))
        run_s = time.perf_counter() - t0
        env_steps = trainer.num_updates * config.steps_per_update * budget.seeds
        record = {
            "attention_transfer_coef": coef,
            "compile_s": compile_s,
            "run_s": run_s,
            "env_steps_per_s": env_steps / run_s,
            "agreement_training_batches": [float(a) for a in np.asarray(metrics.aux.agreement)[:, -1]],
        }
        if with_at:
            record["at_loss_training_batches"] = [
                float(x) for x in np.asarray(metrics.ext[at.AttentionTransfer.name]["aux"]["loss"])[:, -1]
            ]
        runs.append((state, record))
    return trainer, runs


def map_stats(teacher: Population, trainer: Any, students: Any, obs: jax.Array) -> dict[str, np.ndarray]:
    """Per seed, on `obs` [seeds, B, N, F]: greedy agreement with the teacher, the attention-transfer
    distance between the student's saliency and the teacher's pooling attention, and each map's share on
    the goal token; both maps over the present entities only (padding slots set to 0, as the trained term
    does with `AttentionTransfer(mask_padding=True)`, the library default)."""
    t_agent, s_agent = teacher.trainer.agent, trainer.agent

    def one(tp: Any, sp: Any, x: jax.Array) -> dict[str, jax.Array]:
        present = x[..., 0] > 0.5
        t_map = jnp.where(present, at.pooling_map(t_agent.apply, tp, x, "actor_torso"), 0.0)
        s_map = jnp.where(present, at.saliency_map(s_agent.apply, sp, x, s_agent.network.obs_ndim), 0.0)
        is_goal = x[..., 1]
        share = lambda m: jnp.mean(jnp.sum(m * is_goal, -1) / jnp.maximum(jnp.sum(m, -1), 1e-12))
        t_act = teacher.trainer.act(tp, None, x, jax.random.PRNGKey(0), True)
        s_act = trainer.act(sp, None, x, jax.random.PRNGKey(0), True)
        return {
            "agreement": jnp.mean(t_act == s_act),
            "at_distance": jnp.mean(at.attention_transfer_loss(s_map, t_map)),
            "teacher_goal_share": share(t_map),
            "student_goal_share": share(s_map),
        }

    out = jax.jit(jax.vmap(one))(teacher.state.params, students.params, obs)
    return {k: np.asarray(v) for k, v in out.items()}


def distillation_section(ctx: Context) -> dict[str, Any]:
    budget = ctx.budget
    teacher = ctx.population("attention")
    teacher_returns = evaluate_conditions(
        teacher.trainer, teacher.state.params, teacher.state.obs_stats, ctx.evaluators, True
    )
    obs = {
        n: visited_obs(teacher.trainer, teacher.state.params, teacher.state.obs_stats, n, budget, 10 + n)
        for n in AGREEMENT_ENTITIES
    }
    rows = {}
    for coefs in (None, AT_COEFS):
        what = "without attention transfer" if coefs is None else f"with attention transfer, coef {coefs}"
        log(f"distil {budget.seeds} MLP students {what}, {budget.distill_steps:,} steps each")
        trainer, runs = distill_students(teacher, budget, coefs)
        for state, record in runs:
            coef = record["attention_transfer_coef"]
            label = "without attention transfer" if coef is None else f"with attention transfer (coef {coef:g})"
            returns = {
                key: summarize(ctx.evaluators(trainer, state.params, state.obs_stats, slots, entities, 2 + i))
                for i, (key, slots, entities) in enumerate(CONDITIONS)
                if slots == 8
            }
            on_states = {
                str(n): {k: summarize(v) for k, v in map_stats(teacher, trainer, state, obs[n]).items()}
                for n in AGREEMENT_ENTITIES
            }
            rows[label] = {**record, "returns": returns, "on_teacher_states": on_states}
            log(
                f"{label}: compile {record['compile_s']:.0f} s, run {record['run_s']:.0f} s; "
                + ", ".join(f"{k}: {fmt(v)}" for k, v in returns.items())
                + f"; agreement (4) {fmt_pct(on_states['4']['agreement'])}"
            )
    plain = rows["without attention transfer"]
    verdicts = []
    for row in rows.values():
        if row["attention_transfer_coef"] is None:
            continue
        name = f"AT coef {row['attention_transfer_coef']:g}"
        verdicts += [
            comparison(
                f"{name} ({CONDITION_LABELS[k]})",
                row["returns"][k],
                f"no AT ({CONDITION_LABELS[k]})",
                plain["returns"][k],
            )
            for k in plain["returns"]
        ]
        verdicts += [
            comparison(
                f"{name} agreement ({n} entities)",
                row["on_teacher_states"][str(n)]["agreement"],
                f"no AT agreement ({n} entities)",
                plain["on_teacher_states"][str(n)]["agreement"],
                percent=True,
            )
            for n in AGREEMENT_ENTITIES
        ]
    return {
        "teacher": {"net": dataclasses.asdict(teacher.net), "returns": teacher_returns},
        "student_net": dataclasses.asdict(STUDENT_NET),
        "distill_steps": budget.distill_steps,
        "distill_config": repr(distill_config(teacher, budget.distill_steps, True)),
        "distill_hparams": {k: v for k, v in dataclasses.asdict(DISTILL_HPARAMS).items() if k != "ext"},
        "attention_transfer": {
            "coefs": list(AT_COEFS),
            "teacher_map": "attention",
            "student_map": "saliency",
            "mask_padding": at.AttentionTransfer().mask_padding,
            "maps_reported": "over present entities (padding slots 0), as the trained term compares them",
        },
        "agreement_states": f"{budget.agreement_envs} envs x {budget.agreement_steps} steps per seed of the "
        "teacher's stochastic policy, at " + " and ".join(map(str, AGREEMENT_ENTITIES)) + " entities",
        "rows": rows,
        "verdicts": verdicts,
    }


# ----------------------------------------------------------------------------------------------
# Section 3: multi-task learning on MultiTaskCartPole-v0
# ----------------------------------------------------------------------------------------------
def mt_ppo_config(variant: MTVariant, steps: int) -> ppo.PPOConfig:
    return ppo.PPOConfig(
        env=MT_ENV, net=variant.net(MT_PPO_NET), total_timesteps=steps, log_every=4, extensions=variant.extensions()
    )


def mt_dqn_config(variant: MTVariant, steps: int) -> dqn.DQNConfig:
    return dqn.DQNConfig(
        env=MT_ENV, net=variant.net(MT_DQN_NET), total_timesteps=steps, extensions=variant.extensions()
    )


def mt_tasks_record() -> list[dict[str, Any]]:
    """The physics of each task of the task set."""
    _, params = envs.make(MT_ENV)
    fields = ("force_mag", "length", "masspole", "masscart", "gravity", "tau", "max_steps_in_episode")
    values = {f: np.asarray(getattr(params.tasks, f)) for f in fields}
    return [
        {"task": t, "force_flipped": t in MT_FLIPPED, **{f: float(values[f][t]) for f in fields}}
        for t in range(MT_TASKS)
    ]


def mt_evaluate(trainer: Any, algorithm: str, state: Any, episodes: int) -> np.ndarray:
    """Per seed and task: the mean return of `episodes` episodes of that task (the task fixed through
    `TaskSetParams.task`; the library's evaluation policy: stochastic for PPO, greedy for DQN) -> [seeds, T]."""
    evaluate = jax.jit(jax.vmap(make_evaluator(trainer, episodes, default_greedy(algorithm)), in_axes=(0, 0, 0, None)))
    _, base = envs.make(MT_ENV)
    n = jax.tree.leaves(state.params)[0].shape[0]
    per_task = [
        np.asarray(
            evaluate(state.params, state.obs_stats, seed_keys(100 + t, n), base.replace(task=jnp.asarray(t, jnp.int32)))
        ).mean(axis=1)
        for t in range(MT_TASKS)
    ]
    return np.stack(per_task, axis=1)


def mt_run(variant: MTVariant, algorithm: str, seeds: int, steps: int, episodes: int) -> dict[str, Any]:
    """Train `seeds` seeds of one variant (vmapped, one program), evaluate every task; the record."""
    if algorithm == "ppo":
        config, hparams = mt_ppo_config(variant, steps), variant.hparams(PPO_HPARAMS)
        trainer = ppo.make(config)
    else:
        config, hparams = mt_dqn_config(variant, steps), variant.hparams(MT_DQN_HPARAMS)
        trainer = dqn.make(config)
    per_seed_steps = config.num_updates * config.steps_per_update
    log(f"multitask {algorithm} {variant.label}: {seeds} seeds x {per_seed_steps:,} steps")
    out, compile_s, run_s = timed_call(jax.vmap(trainer.train, in_axes=(0, None)), seed_keys(0, seeds), f32(hparams))
    t0 = time.perf_counter()
    returns = mt_evaluate(trainer, algorithm, out.state, episodes)  # [seeds, T]
    eval_s = time.perf_counter() - t0
    flipped = np.array(MT_FLIPPED)
    plain = np.array([t for t in range(MT_TASKS) if t not in MT_FLIPPED])
    record = {
        "label": variant.label,
        "algorithm": algorithm,
        "task_mode": variant.task_mode,
        "task_gradient": variant.task_gradient or "none (batch mean)",
        "net": dataclasses.asdict(config.net),
        "config": repr(config),
        "seeds": seeds,
        "total_timesteps_per_seed": per_seed_steps,
        "compile_s": compile_s,
        "run_s": run_s,
        "env_steps_per_s": per_seed_steps * seeds / run_s,
        "eval_s": eval_s,
        "score": summarize(returns.mean(axis=1)),
        "force_plus_tasks": summarize(returns[:, plain].mean(axis=1)),
        "force_flipped_tasks": summarize(returns[:, flipped].mean(axis=1)),
        "per_task": [summarize(returns[:, t]) for t in range(MT_TASKS)],
        "learning_curve": {
            "env_steps": np.asarray(out.metrics.env_steps)[0].tolist(),
            "mean_return": np.asarray(out.metrics.episode.episode_return).mean(axis=0).tolist(),
            "note": "training episodes' mean return per metrics row (tasks drawn per episode), mean over seeds",
        },
    }
    log(
        f"multitask {algorithm} {variant.label}: compile {compile_s:.0f} s, run {run_s:.0f} s, "
        f"{record['env_steps_per_s']:,.0f} env steps/s; score {fmt(record['score'], 1)} "
        f"(force + {fmt(record['force_plus_tasks'], 1)}, flipped {fmt(record['force_flipped_tasks'], 1)})"
    )
    return record


def multitask_section(ctx: Context) -> dict[str, Any]:
    budget = ctx.budget
    rows = {
        key: mt_run(v, "ppo", budget.mt_seeds, budget.mt_steps, budget.mt_eval_episodes)
        for key, v in MT_VARIANTS.items()
    }
    s = {k: r["score"] for k, r in rows.items()}
    verdicts = [
        comparison(MT_VARIANTS[a].label, s[a], MT_VARIANTS[b].label, s[b])
        for a, b in (("heads", "shared"), ("pcgrad", "shared"), ("pcgrad", "heads"), ("weighted", "heads"))
    ]
    verdicts.append(
        comparison(MT_VARIANTS["embedding"].label, s["embedding"], MT_VARIANTS["shared"].label, s["shared"])
    )
    dqn_block = None
    if budget.mt_dqn_steps > 0:
        dqn_rows = {
            key: mt_run(MT_VARIANTS[key], "dqn", budget.mt_dqn_seeds, budget.mt_dqn_steps, budget.mt_eval_episodes)
            for key in MT_DQN_VARIANTS
        }
        ds = {k: r["score"] for k, r in dqn_rows.items()}
        dqn_block = {
            "config": {k: r["config"] for k, r in dqn_rows.items()},
            "hparams": {k: v for k, v in dataclasses.asdict(MT_DQN_HPARAMS).items() if k != "ext"},
            "settings": "the library's DQN defaults = PureJaxRL's CartPole DQN = the DQN CartPole-v1 preset: "
            "10 envs, 10k buffer, batch 128, 10k steps before learning, a gradient step every 10 env steps, "
            "hard target update every 500 steps, eps 1 -> 0.05 over half the run, lr 2.5e-4, grad norm 10, "
            "120x84 relu; here with a 10-task network",
            "rows": dqn_rows,
            "verdicts": [
                comparison(
                    f"DQN {MT_VARIANTS['pcgrad'].label}",
                    ds["pcgrad"],
                    f"DQN {MT_VARIANTS['shared'].label}",
                    ds["shared"],
                )
            ],
        }
    return {
        "env": MT_ENV,
        "num_tasks": MT_TASKS,
        "tasks": mt_tasks_record(),
        "max_return": MT_MAX_RETURN,
        "eval_episodes": budget.mt_eval_episodes,
        "evaluation": f"per seed and task, the mean return of {budget.mt_eval_episodes} episodes of that task "
        "(TaskSetParams.task = t; the library's evaluation policy, rl.evaluate.default_greedy: stochastic for PPO, "
        "greedy for DQN), then the mean over the "
        f"{MT_TASKS} tasks = the seed's score; IQM over seeds with a 95% bootstrap CI",
        "seeds": f"{budget.mt_seeds} training seeds: jax.random.split(PRNGKey(0), n); evaluation keys "
        "split(PRNGKey(100 + task), n), the same for every variant",
        "ppo_settings": "the library's PPO defaults (PureJaxRL's CartPole PPO: 4 envs x 128 steps, 4 epochs of 4 "
        "minibatches, lr 2.5e-4 annealed, entropy 0.01, clip 0.2, GAE 0.95, gamma 0.99, MLP 64x64 tanh), "
        "one budget for every variant",
        "ppo_hparams": {k: v for k, v in dataclasses.asdict(PPO_HPARAMS).items() if k != "ext"},
        "multitask_hparams": dataclasses.asdict(MT_HPARAMS),
        "total_timesteps_per_seed": next(iter(rows.values()))["total_timesteps_per_seed"],
        "rows": rows,
        "verdicts": verdicts,
        "dqn": dqn_block,
    }


SECTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "networks": networks_section,
    "distillation": distillation_section,
    "multitask": multitask_section,
}
"""Every section of the benchmark, in run order: name -> section(ctx) -> its JSON block. A section added
later registers its function here, its table renderer in MARKDOWN and its figure in PLOTS / PLOT_SUFFIX;
it may share the trained populations through `ctx.population(name)`."""


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------
def plot_entities(section: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_curve) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.3, 1]})
    keys = [c["key"] for c in section["conditions"]]
    xs = np.arange(len(keys))
    names = list(section["rows"])
    width = 0.8 / (len(names) + 0.5)
    for j, name in enumerate(names):
        pts = [(i, r) for i, r in enumerate(section["rows"][name]["returns"].values()) if r is not None]
        x = np.array([i for i, _ in pts]) + (j - (len(names) - 1) / 2) * width
        ys = np.array([r["iqm"] for _, r in pts])
        err = [[r["iqm"] - r["ci"][0] for _, r in pts], [r["ci"][1] - r["iqm"] for _, r in pts]]
        ax.errorbar(x, ys, yerr=err, marker="o", capsize=4, ls="-", label=name)
    for kind, style in (("reference", "k--"), ("random", "r:")):
        ref = section["reference_policies"][kind]
        ax.plot(
            xs,
            [ref[k]["mean"] for k in keys],
            style,
            lw=1,
            label="reference policy (goal axis)" if kind == "reference" else "uniformly random policy",
        )
    ax.set_xticks(xs, [c["label"].replace(" (", "\n(") for c in section["conditions"]], fontsize=8)
    ax.set_ylabel("return (IQM over seeds, 95% CI)")
    ax.set_title(f"PPO on {section['env']}: trained on 4 entities, evaluated zero-shot", fontsize=10)
    ax.legend(fontsize=8)
    for name in names:
        c = section["rows"][name]["learning_curve"]
        ax_curve.plot(c["env_steps"], c["mean_return"], label=name)
    ax_curve.set_xlabel("env steps per seed")
    ax_curve.set_ylabel("training episode return (mean over seeds)")
    ax_curve.set_title("Learning curves (4 entities)", fontsize=10)
    ax_curve.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def short(label: str) -> str:
    """'with attention transfer (coef 1)' -> 'AT coef 1'; 'without attention transfer' -> 'no AT'."""
    return (
        label.replace("without attention transfer", "no AT")
        .replace("with attention transfer (coef ", "AT coef ")
        .rstrip(")")
    )


def plot_distillation(section: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_agree) = plt.subplots(1, 2, figsize=(12, 4.5))
    keys = list(next(iter(section["rows"].values()))["returns"])
    series = {"attention teacher": {k: section["teacher"]["returns"][k] for k in keys}}
    series.update({f"MLP student {short(label)}": row["returns"] for label, row in section["rows"].items()})
    width = 0.8 / len(series)

    def bars(axis: Any, data: dict[str, dict[str, Any]], xkeys: list[str], scale: float = 1.0) -> None:
        for j, (label, per_key) in enumerate(data.items()):
            x = np.arange(len(xkeys)) + (j - (len(data) - 1) / 2) * width
            ys = np.array([scale * per_key[k]["iqm"] for k in xkeys])
            err = [
                [y - scale * per_key[k]["ci"][0] for y, k in zip(ys, xkeys)],
                [scale * per_key[k]["ci"][1] - y for y, k in zip(ys, xkeys)],
            ]
            axis.bar(x, ys, width, yerr=err, capsize=3, label=label, color="grey" if j == 0 else f"C{j - 1}")

    bars(ax, series, keys)
    ax.set_ylim(top=1.35 * max(r[k]["ci"][1] for r in series.values() for k in keys))
    ax.set_xticks(range(len(keys)), [CONDITION_LABELS[k] for k in keys], fontsize=8)
    ax.set_ylabel("return (IQM over seeds, 95% CI)")
    ax.set_title(
        f"Attention teacher -> MLP {'x'.join(map(str, section['student_net']['hidden']))} student "
        f"({section['distill_steps']:,} steps)",
        fontsize=10,
    )
    ax.legend(fontsize=8, ncol=2, loc="upper center")
    n_keys = list(next(iter(section["rows"].values()))["on_teacher_states"])
    agree = {
        label: {n: row["on_teacher_states"][n]["agreement"] for n in n_keys} for label, row in section["rows"].items()
    }
    width = 0.8 / len(agree)
    for j, (label, per_n) in enumerate(agree.items()):
        x = np.arange(len(n_keys)) + (j - (len(agree) - 1) / 2) * width
        ys = np.array([100 * per_n[n]["iqm"] for n in n_keys])
        err = [
            [y - 100 * per_n[n]["ci"][0] for y, n in zip(ys, n_keys)],
            [100 * per_n[n]["ci"][1] - y for y, n in zip(ys, n_keys)],
        ]
        ax_agree.bar(x, ys, width, yerr=err, capsize=3, label=f"MLP student {short(label)}", color=f"C{j}")
    ax_agree.set_xticks(range(len(n_keys)), [f"{n} entities" for n in n_keys])
    ax_agree.set_ylabel("greedy agreement with the teacher, % (IQM, 95% CI)")
    ax_agree.set_title("Agreement on states the teacher visits", fontsize=10)
    ax_agree.set_ylim(0, 100)
    ax_agree.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_multitask(section: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_task, ax_curve) = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [1, 1.7, 1]})
    rows = section["rows"]
    color = {key: f"C{j}" for j, key in enumerate(rows)}
    bars = [(f"PPO {r['label']}", r, color[key], "") for key, r in rows.items()]
    if section.get("dqn"):
        bars += [(f"DQN {r['label']}", r, color[key], "//") for key, r in section["dqn"]["rows"].items()]
    ys = np.array([b[1]["score"]["iqm"] for b in bars])
    err = [ys - [b[1]["score"]["ci"][0] for b in bars], [b[1]["score"]["ci"][1] for b in bars] - ys]
    for i, (_, _, c, hatch) in enumerate(bars):
        ax.barh(i, ys[i], xerr=[[err[0][i]], [err[1][i]]], capsize=3, color=c, hatch=hatch, edgecolor="k", lw=0.5)
    ax.set_yticks(np.arange(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(section["max_return"], color="k", ls="--", lw=1)
    ax.set_xlabel(f"mean return over the {section['num_tasks']} tasks (IQM over seeds, 95% CI)")
    ax.set_title(f"{section['env']}: score per variant", fontsize=10)
    tasks = np.arange(section["num_tasks"])
    width = 0.8 / len(rows)
    for j, r in enumerate(rows.values()):
        x = tasks + (j - (len(rows) - 1) / 2) * width
        yt = np.array([p["iqm"] for p in r["per_task"]])
        et = [yt - [p["ci"][0] for p in r["per_task"]], [p["ci"][1] for p in r["per_task"]] - yt]
        ax_task.bar(x, yt, width, yerr=et, capsize=2, label=r["label"], color=f"C{j}")
    flipped = {t["task"] for t in section["tasks"] if t["force_flipped"]}
    ax_task.set_xticks(tasks, [f"{t}{'*' if t in flipped else ''}" for t in tasks])
    ax_task.set_xlabel("task (* force flipped)")
    ax_task.set_ylabel("return (IQM over seeds, 95% CI)")
    ax_task.set_ylim(0, 1.2 * section["max_return"])
    ax_task.set_title(f"PPO per task ({section['total_timesteps_per_seed']:,} env steps per seed)", fontsize=10)
    ax_task.legend(fontsize=8, ncol=3, loc="upper center")
    for j, r in enumerate(rows.values()):
        c = r["learning_curve"]
        ax_curve.plot(c["env_steps"], c["mean_return"], label=r["label"], color=f"C{j}")
    ax_curve.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
    ax_curve.set_xlabel("env steps per seed")
    ax_curve.set_ylabel("training episode return (mean over seeds)")
    ax_curve.set_title("PPO learning curves (tasks drawn per episode)", fontsize=10)
    ax_curve.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "networks": plot_entities,
    "distillation": plot_distillation,
    "multitask": plot_multitask,
}
PLOT_SUFFIX = {"networks": "entities", "distillation": "distillation", "multitask": "multitask"}


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------
CURVE_FRACTION = 0.9
AT_REFERENCE = 0.98


def steps_to_reach(curve: dict[str, Any], target: float) -> int | None:
    """The first logged env-step count at which the mean training curve reaches `target` (None if never)."""
    for steps, value in zip(curve["env_steps"], curve["mean_return"]):
        if value >= target:
            return int(steps)
    return None


def ratio(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def networks_markdown(s: dict[str, Any]) -> list[str]:
    keys = [c["key"] for c in s["conditions"]]
    some = next(iter(s["rows"].values()))
    lines = [
        f"**Networks on {s['env']}** (PPO, library defaults with {PPO_COLLECT['num_envs']} envs x "
        f"{PPO_COLLECT['num_steps']} steps per update; {some['total_timesteps_per_seed']:,} env steps per seed, "
        f"{some['seeds']} seeds; trained on 4 entities in 8 slots; return = IQM over seeds of each seed's mean "
        f"return, stochastic policy [95% bootstrap CI]; n/a: the MLP's input is 8 slots)",
        "",
        "| network | "
        + " | ".join(c["label"] for c in s["conditions"])
        + f" | env steps to {100 * CURVE_FRACTION:.0f}% of the reference return (mean training curve) "
        "| env steps/s (training) | compile s | run s |",
        "|---" * (len(keys) + 5) + "|",
    ]
    reference = s["reference_policies"]["reference"]
    for name, r in s["rows"].items():
        cells = " | ".join(fmt(r["returns"][k]) for k in keys)
        reach = steps_to_reach(r["learning_curve"], CURVE_FRACTION * reference["4"]["iqm"])
        lines.append(
            f"| {name} | {cells} | {'not reached' if reach is None else f'{reach:,}'} "
            f"| {r['env_steps_per_s']:,.0f} | {r['compile_s']:.0f} | {r['run_s']:.0f} |"
        )
    for kind, label in (("reference", "reference policy (goal axis)"), ("random", "uniformly random policy")):
        ref = s["reference_policies"][kind]
        lines.append(f"| {label} | " + " | ".join(fmt(ref[k]) for k in keys) + " | | | | |")
    at_ref = {
        k: [
            n
            for n, r in s["rows"].items()
            if r["returns"][k] and r["returns"][k]["iqm"] >= AT_REFERENCE * reference[k]["iqm"]
        ]
        for k in keys
    }
    lines += [
        "",
        f"At the reference policy's return (IQM >= {100 * AT_REFERENCE:.0f}% of its IQM; the return is "
        "d_0 - d_end + 1[goal reached] with d_end < 0.1 once reached, nearly the same for every policy that "
        "reaches the goal in time, so such rows can only tie): "
        + "; ".join(f"{CONDITION_LABELS[k]}: {', '.join(v) or 'none'}" for k, v in at_ref.items())
        + ".",
    ]
    d = s["depth_check"]
    lines += [
        "",
        f"Attention depth: {d['chosen']} ({d['rule']}). Depth check of this run ({d['seeds']} seeds, "
        f"{d['steps']:,} steps): "
        + "; ".join(
            f"depth {k}: return {fmt(v['return'])}, {v['env_steps_per_s']:,.0f} env steps/s"
            for k, v in d["rows"].items()
        )
        + ".",
        "",
        "| claim | verdict | A | B |",
        "|---|---|---|---|",
    ]
    lines += [f"| {v['claim']} | **{v['verdict']}** | {v['a']} | {v['b']} |" for v in s["verdicts"]]
    lines += [
        "",
        "Zero-shot: does a network keep its 4-entity return? (drop = its 4-entity CI lies above the other's)",
        "",
        "| network | condition | return at 4 | return there | IQM ratio | keeps its return |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {v['network']} | {CONDITION_LABELS[v['condition']]} | {v['a']} | {v['b']} | {ratio(v['retained'])} "
        f"| {v['keeps_return']} |"
        for v in s["zero_shot"]
    ]
    return lines


def distillation_markdown(s: dict[str, Any]) -> list[str]:
    keys = list(s["teacher"]["returns"])
    keys = [k for k in keys if k in next(iter(s["rows"].values()))["returns"]]
    n_keys = list(next(iter(s["rows"].values()))["on_teacher_states"])
    a = s["attention_transfer"]
    lines = [
        f"**Attention teacher -> MLP student** (student {'x'.join(map(str, s['student_net']['hidden']))}, "
        f"{s['distill_steps']:,} distillation steps, softened KL tau = 1, teacher acting with probability "
        f"{s['distill_hparams']['teacher_fraction_start']:g} -> {s['distill_hparams']['teacher_fraction_end']:g}; "
        f"attention transfer coef {' or '.join(f'{c:g}' for c in a['coefs'])}, teacher map = pooling attention, "
        "student map = saliency; "
        f"agreement and maps on {s['agreement_states']})",
        "",
        "| policy | "
        + " | ".join(CONDITION_LABELS[k] for k in keys)
        + " | "
        + " | ".join(f"agreement ({n})" for n in n_keys)
        + " | AT distance (4) | goal share of the map (4) "
        "| run s |",
        "|---" * (len(keys) + len(n_keys) + 4) + "|",
        "| attention teacher | "
        + " | ".join(fmt(s["teacher"]["returns"][k]) for k in keys)
        + " | "
        + " | ".join("100%" for _ in n_keys)
        + " | - | "
        + fmt(next(iter(s["rows"].values()))["on_teacher_states"]["4"]["teacher_goal_share"])
        + " | |",
    ]
    for label, r in s["rows"].items():
        st = r["on_teacher_states"]
        lines.append(
            f"| MLP student {label} | "
            + " | ".join(fmt(r["returns"][k]) for k in keys)
            + " | "
            + " | ".join(fmt_pct(st[n]["agreement"]) for n in n_keys)
            + f" | {fmt(st['4']['at_distance'])} | {fmt(st['4']['student_goal_share'])} | {r['run_s']:.0f} |"
        )
    lines += ["", "| claim | verdict | A | B |", "|---|---|---|---|"]
    lines += [f"| {v['claim']} | **{v['verdict']}** | {v['a']} | {v['b']} |" for v in s["verdicts"]]
    return lines


def multitask_markdown(s: dict[str, Any]) -> list[str]:
    rows = s["rows"]
    some = next(iter(rows.values()))
    flipped = [t["task"] for t in s["tasks"] if t["force_flipped"]]
    plain = [t["task"] for t in s["tasks"] if not t["force_flipped"]]
    lines = [
        f"**Multi-task PPO on {s['env']}** ({s['num_tasks']} CartPole tasks, force flipped in tasks "
        f"{', '.join(map(str, flipped))}; library PPO defaults, MLP 64x64; {s['total_timesteps_per_seed']:,} env "
        f"steps per seed, {some['seeds']} seeds, every variant; score = a seed's mean over the tasks of its mean "
        f"return over {s['eval_episodes']} episodes of each task, "
        f"stochastic policy; IQM over seeds [95% bootstrap CI]; maximum return {s['max_return']:g})",
        "",
        "| variant | task mode | task gradient | score (mean over the tasks) "
        f"| force + tasks ({', '.join(map(str, plain))}) | force-flipped tasks ({', '.join(map(str, flipped))}) "
        "| env steps/s (training) | compile s | run s |",
        "|---" * 9 + "|",
    ]

    def row_line(r: dict[str, Any], prefix: str = "") -> str:
        return (
            f"| {prefix}{r['label']} | {r['task_mode']} | {r['task_gradient']} | {fmt(r['score'], 1)} "
            f"| {fmt(r['force_plus_tasks'], 1)} | {fmt(r['force_flipped_tasks'], 1)} "
            f"| {r['env_steps_per_s']:,.0f} | {r['compile_s']:.0f} | {r['run_s']:.0f} |"
        )

    lines += [row_line(r) for r in rows.values()]
    lines += [
        "",
        "Per task (IQM over seeds of the task's mean return; CIs in the JSON; * force flipped):",
        "",
        "| variant | " + " | ".join(f"{t['task']}{'*' if t['force_flipped'] else ''}" for t in s["tasks"]) + " |",
        "|---" * (len(s["tasks"]) + 1) + "|",
    ]
    lines += [f"| {r['label']} | " + " | ".join(f"{p['iqm']:.0f}" for p in r["per_task"]) + " |" for r in rows.values()]
    lines += ["", "| claim | verdict | A | B |", "|---|---|---|---|"]
    lines += [f"| {v['claim']} | **{v['verdict']}** | {v['a']} | {v['b']} |" for v in s["verdicts"]]
    d = s.get("dqn")
    if d:
        dsome = next(iter(d["rows"].values()))
        lines += [
            "",
            f"**Multi-task DQN** ({d['settings']}; {dsome['total_timesteps_per_seed']:,} env steps per seed, "
            f"{dsome['seeds']} seeds; greedy policy, same score)",
            "",
            "| variant | task mode | task gradient | score (mean over the tasks) | force + tasks | force-flipped tasks "
            "| env steps/s (training) | compile s | run s |",
            "|---" * 9 + "|",
        ]
        lines += [row_line(r, "DQN ") for r in d["rows"].values()]
        lines += [
            "",
            "| DQN variant | "
            + " | ".join(f"{t['task']}{'*' if t['force_flipped'] else ''}" for t in s["tasks"])
            + " |",
            "|---" * (len(s["tasks"]) + 1) + "|",
        ]
        lines += [
            f"| {r['label']} | " + " | ".join(f"{p['iqm']:.0f}" for p in r["per_task"]) + " |"
            for r in d["rows"].values()
        ]
        lines += ["", "| claim | verdict | A | B |", "|---|---|---|---|"]
        lines += [f"| {v['claim']} | **{v['verdict']}** | {v['a']} | {v['b']} |" for v in d["verdicts"]]
    return lines


MARKDOWN: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "networks": networks_markdown,
    "distillation": distillation_markdown,
    "multitask": multitask_markdown,
}


def markdown(record: dict[str, Any]) -> str:
    hw, c = record["hardware"], record["commit"]
    head = c["commit"][:12] if c else "unknown"
    dirty = " (dirty tree)" if c and c.get("dirty") else ""
    lib = record.get("library_tree")
    if c and c.get("dirty") and lib is not None and not lib["dirty"]:
        where = sorted({p.split("/")[0] + "/" for p in c["dirty_paths"]})
        dirty = (
            f" (library clean: rlcx_jax/ and tests/ as committed; {c['dirty_count']} uncommitted path(s) in "
            f"{', '.join(where)})"
        )
    wall = record["wall_seconds_per_section"]
    lines = [
        f"`{record['command']}` on {hw['cpu_model']} ({hw['usable_cores']} cores), commit {head}{dirty}: "
        f"{record['wall_seconds'] / 60:.1f} min in all ("
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in wall.items())
        + ").",
    ]
    for name, section in record["sections"].items():
        lines += [""] + MARKDOWN[name](section)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def run(budget: Budget, quick: bool, argv: list[str], only: list[str] | None) -> dict[str, Any]:
    tp = _throughput()
    hw = tp.cpu_info()
    slug = tp.cpu_short_name(hw["cpu_model"]) + ("_quick" if quick else "")
    out = RESULTS / f"expansion_{slug}.json"
    commit = tp.git_state(max_paths=20)
    library_tree = tp.git_state(("rlcx_jax", "tests"), max_paths=20)
    ctx = Context(budget)
    names = only or list(SECTIONS)
    sections, wall = {}, {}
    for name in names:
        t0 = time.perf_counter()
        sections[name] = SECTIONS[name](ctx)
        wall[name] = time.perf_counter() - t0
        log(f"section {name}: {wall[name]:.0f} s")
    record = {
        "benchmark": "expansion",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/expansion.py", *argv]),
        "hardware": hw,
        "versions": tp.local_versions(),
        "commit": commit,
        "library_tree": library_tree,
        "loadavg_end": tp.loadavg(),
        "settings": {
            **dataclasses.asdict(budget),
            "networks": {k: dataclasses.asdict(v) for k, v in NETWORKS.items()},
            "ppo_collect": PPO_COLLECT,
            "statistic": "IQM over per-seed mean returns, 95% percentile bootstrap CI (2000 resamples)",
            "verdict_rule": "yes/no only when the CIs are disjoint, else tie (CIs overlap)",
            "wall_seconds_note": "compile-inclusive, on a shared machine: information only",
        },
        "wall_seconds": time.perf_counter() - START,
        "wall_seconds_per_section": wall,
        "sections": sections,
    }
    if only and out.exists():  # a partial rerun: the other sections keep their own record
        old = json.loads(out.read_text())
        for name, section in old["sections"].items():
            if name not in sections:
                section.setdefault("provenance", {k: old[k] for k in ("date", "command", "commit")})
                sections[name] = section
                record["wall_seconds_per_section"][name] = old["wall_seconds_per_section"][name]
        record["sections"] = {k: sections[k] for k in SECTIONS if k in sections}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    for name, section in record["sections"].items():
        png = RESULTS / f"expansion_{slug}_{PLOT_SUFFIX[name]}.png"
        PLOTS[name](section, png)
        log(f"wrote {png}")
    log(f"wrote {out}")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, tiny budgets")
    parser.add_argument("--markdown", action="store_true", help="print README-ready tables from the saved JSON")
    parser.add_argument("--json", type=Path, default=None, help="results file for --markdown")
    parser.add_argument(
        "--only", default="", help=f"comma-separated sections to run ({', '.join(SECTIONS)}); the others stay as saved"
    )
    args = parser.parse_args(argv)
    if args.markdown:
        path = args.json or next(p for p in sorted(RESULTS.glob("expansion_*.json")) if "_quick" not in p.name)
        print(markdown(json.loads(path.read_text())))
        return 0
    only = [s for s in args.only.split(",") if s]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    budget, command = QUICK if args.quick else FULL, sys.argv[1:] if argv is None else argv
    record = run(budget, args.quick, command, only or None)
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
