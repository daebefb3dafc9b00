"""Compression benchmark: pruning, quantization, size and cost of PPO policies, against the papers.

    python benchmarks/compression.py --quick                    # smoke run, ~2 minutes
    python benchmarks/compression.py --envs CartPole-v1         # the full CartPole study
    python benchmarks/compression.py --envs Acrobot-v1 Breakout-MinAtar   # reduced studies
    python benchmarks/compression.py --envs CartPole-v1 --experiments ptq qat   # some of them

Every figure is measured in this run. Scores: the greedy policy of every seed is evaluated on
--eval-episodes episodes (the same evaluation keys for every method: common random numbers); the
per-seed mean return is the unit, and we report the interquartile mean (IQM) over seeds with a 95%
percentile-bootstrap confidence interval (`rlcx_jax.logging.bootstrap_ci`, 2000 resamples of seeds,
fixed seed; Agarwal et al. 2021).

Experiments (each a function; the JSON is rewritten after each one, so a crash loses only the one
running; re-running with --experiments merges into the existing JSON):
  dense     the dense baseline (all seeds in one `jit(vmap(train))`).
  gradual   Zhu & Gupta gradual magnitude pruning during training, all sparsity levels x seeds in one
            vmapped call (`hparams.ext["compress"].sparsity` is traced).
  train_cost  wall time of gradual pruning to 90% against the dense run (all seeds vmapped through
            `vmap_learn` as `rlcx train` runs them, alternating, median of 3), each beside its return.
  oneshot   post-training magnitude pruning of the dense policies (no fine-tune), then
            `recipes.prune_and_finetune` for --finetune-steps.
  lottery   `recipes.lottery_ticket`: iterative magnitude pruning with rewinding to ~3% of updates.
  ptq       post-training quantization of the dense policies: weights only (uniform / log per
            output channel, k-means per tensor) and weights + activations (uniform / log, ranges
            calibrated on dense-policy rollouts, minmax and percentile), with greedy-action
            agreement against the dense policy on other dense-policy rollouts.
  qat       quantization-aware training (the `CompressConfig` extension's `qat_bits`, weights, straight-through),
            started from the dense policies for --finetune-steps (QuaRL's quantization delay: the
            dense run is the delay). Compared with PTQ of the same dense policies and with PTQ of
            an equally long fine-tune without quantization (the control).
  qat_cost  wall time of k-means QAT (trained weight sharing: frozen clusters re-assigned every 16 optimizer
            steps, centroids trained) against uniform QAT, same fine-tune, every bit width (compiled apart,
            alternating, median of 3), each beside its return.
  qat_act   QAT of weights and activations (dynamic activation ranges, one per sample: each observation's
            Dense inputs quantized with their own min/max, as QAT trains) vs PTQ with the same quantizer,
            of the dense policies and of the control fine-tune.
  wide      a 256x256 net gradually pruned to 90% vs a dense net with the same number of non-zero
            torso kernel weights (width solved for), and the 256x256 net trained dense.
  export    artifact bytes: the dense float32 file vs 90%-pruned (gradual) + int8, actor only and
            actor + critic; where the bytes go.
  cost      FLOPs and latency of the policy: dense, 90% pruned, structured `shrink` 50%, int8 (latency:
            7 alternating rounds of >= 200 ms of calls per variant and batch size, median and min-max).

Results: a table on stdout, JSON in benchmarks/results/compression_<cpu>.json (…_quick.json with
--quick), plots compression_<cpu>_<env>_{sparsity,bits}.png and benchmarks/results/compression_summary.md.
"""

from __future__ import annotations

# Any script run from benchmarks/ has this folder on sys.path, where this file shadows the
# `compression` package (Python 3.14 stdlib / backport) that jax tries `from compression import
# zstd`; jax falls back to zlib on ImportError, so refuse to be imported under that name.
if __name__ == "compression":
    raise ImportError("benchmarks/compression.py is a script, not the `compression` package")

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
# This file's name shadows the stdlib-backport package `compression` (jax imports `compression.zstd`
# when present): take its folder off sys.path and load the sibling throughput.py by path instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(REPO))


def _load_sibling(name: str):
    """A benchmark script of this folder, loaded by path (see above)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"rlcx_bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_tp = _load_sibling("throughput")
_jsonable, cpu_info, cpu_short_name = _tp._jsonable, _tp.cpu_info, _tp.cpu_short_name
jax_environment, loadavg, local_versions = _tp.jax_environment, _tp.loadavg, _tp.local_versions
git_state = _tp.git_state

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from rlcx_jax import envs, nets, rl  # noqa: E402
from rlcx_jax.compress import export as export_lib  # noqa: E402
from rlcx_jax.compress import masks as masks_lib  # noqa: E402
from rlcx_jax.compress import quant, size, structured  # noqa: E402
from rlcx_jax.compress.training import CompressConfig, CompressHParams, prune_selection  # noqa: E402
from rlcx_jax.logging import bootstrap_ci  # noqa: E402
from rlcx_jax.nets.policy import action_agreement, action_gap, agreement_label  # noqa: E402
from rlcx_jax.rl import ppo  # noqa: E402
from rlcx_jax.rl.evaluate import make_evaluator  # noqa: E402
from rlcx_jax.rl.common import vmap_learn  # noqa: E402
from rlcx_jax.seams import Hooks, make_apply  # noqa: E402
from rlcx_jax.workflows import compress_run, recipes  # noqa: E402

ALL_EXPERIMENTS = ("dense", "gradual", "train_cost", "oneshot", "lottery", "ptq", "qat", "qat_cost", "qat_act", "wide",
                   "export", "cost")
REDUCED_EXPERIMENTS = ("dense", "gradual", "train_cost", "lottery", "ptq", "qat", "qat_act")

# PureJaxRL's CartPole PPO settings (also used for Acrobot). Breakout-MinAtar: PureJaxRL's MinAtar
# PPO settings, but an MLP torso on the flattened 10x10x4 observation (the conv torso is too slow
# on a 2-core CPU).
PPO_CLASSIC = dict(num_envs=4, num_steps=128, update_epochs=4, num_minibatches=4, anneal_lr=True,
                   net=dict(torso="mlp", hidden=(64, 64), activation="tanh"))
HP_CLASSIC = dict(lr=2.5e-4, gamma=0.99, gae_lambda=0.95, clip_eps=0.2, ent_coef=0.01, vf_coef=0.5,
                  max_grad_norm=0.5)
ENV_SETTINGS: dict[str, dict[str, Any]] = {
    "CartPole-v1": dict(config=PPO_CLASSIC, hparams=HP_CLASSIC, total=500_000, finetune=100_000,
                        experiments=ALL_EXPERIMENTS, sparsities=(0.0, 0.5, 0.8, 0.9, 0.95, 0.98),
                        bits=(8, 6, 4, 3, 2), schemes=("uniform", "log", "kmeans")),
    "Acrobot-v1": dict(config=PPO_CLASSIC, hparams=HP_CLASSIC, total=500_000, finetune=100_000,
                       experiments=REDUCED_EXPERIMENTS, sparsities=(0.0, 0.9), bits=(8, 4),
                       schemes=("uniform", "log")),
    # Pendulum (continuous, Gaussian policy): gamma 0.95 and GAE lambda 0.9 (Pendulum's costs make
    # long horizons noisy), 10 epochs of 32 minibatches, no entropy bonus; tuned here on 8 seeds
    # (IQM -141 after 1M steps; gamma 0.9 / lr 3e-4 gave -165, observation normalisation -139).
    "Pendulum-v1": dict(
        config=dict(num_envs=16, num_steps=128, update_epochs=10, num_minibatches=32, anneal_lr=True,
                    net=dict(torso="mlp", hidden=(64, 64), activation="tanh")),
        hparams=dict(lr=1e-3, gamma=0.95, gae_lambda=0.9, clip_eps=0.2, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5),
        total=1_000_000, finetune=200_000, experiments=("dense", "gradual", "oneshot", "ptq", "qat"),
        sparsities=(0.0, 0.5, 0.8, 0.9, 0.95), bits=(8, 6, 4, 3), schemes=("uniform", "log", "kmeans")),
    "Breakout-MinAtar": dict(
        config=dict(num_envs=64, num_steps=128, update_epochs=4, num_minibatches=8, anneal_lr=True,
                    net=dict(torso="mlp", hidden=(64, 64), activation="relu")),
        hparams=dict(HP_CLASSIC, lr=5e-4), total=2_000_000, finetune=262_144,
        experiments=REDUCED_EXPERIMENTS, sparsities=(0.0, 0.9), bits=(8, 4), schemes=("uniform", "log")),
    # SpaceInvaders-MinAtar: Breakout's settings. Its return keeps rising with the budget (no
    # plateau or ceiling near 1M steps with this MLP), so methods that lose return show it.
    "SpaceInvaders-MinAtar": dict(
        config=dict(num_envs=64, num_steps=128, update_epochs=4, num_minibatches=8, anneal_lr=True,
                    net=dict(torso="mlp", hidden=(64, 64), activation="relu")),
        hparams=dict(HP_CLASSIC, lr=5e-4), total=1_000_000, finetune=131_072,
        experiments=("dense", "gradual", "ptq", "qat", "qat_act"), sparsities=(0.0, 0.9), bits=(8, 4),
        schemes=("uniform", "log")),
}
QUICK = dict(total=20_480, finetune=10_240, sparsities=(0.0, 0.9), bits=(8, 4), schemes=("uniform", "log", "kmeans"))
# The lowest return an episode can score (Acrobot: -1 per step for 500 steps; Pendulum: the largest
# cost pi^2 + 0.1 * 8^2 + 0.001 * 2^2 for 200 steps): fractions of dense return are taken above it,
# (x - floor) / (dense - floor), so they mean the same for negative returns.
PENDULUM_FLOOR = -200 * (math.pi**2 + 0.1 * 8.0**2 + 0.001 * 2.0**2)
SCORE_FLOOR = {"CartPole-v1": 0.0, "Acrobot-v1": -500.0, "Breakout-MinAtar": 0.0, "SpaceInvaders-MinAtar": 0.0,
               "Pendulum-v1": PENDULUM_FLOOR}
# Graesser et al. 2022: prune 20%..80%. Uniform layer budgets: what every stored gradual, train-cost and
# export row measured (the library default became ERK after the wide experiment; it compares both).
GRADUAL = dict(prune_start=0.2, prune_end=0.8, prune_every=16, prune_distribution="uniform")
TARGETS = {  # docs/architecture.md "Reference targets"
    "gradual90_keeps": 0.95,
    "int8_agreement": 0.99,
    "export_ratio": 20.0,
}
TRAIN_COST_TARGET = 1.25  # this benchmark's own bar for pruning during training (not in docs/architecture.md)
QAT_COST_TARGET = 3.0  # k-means QAT against uniform QAT, wall time (the compression review's bar)


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def score(per_seed: np.ndarray, seed: int = 0) -> dict:
    """IQM over seeds of the per-seed mean return, with its 95% stratified bootstrap CI."""
    per_seed = np.asarray(per_seed, np.float64)
    point, lo, hi = bootstrap_ci(per_seed, "iqm", 2000, 0.95, seed)
    return {"iqm": point, "ci95": [lo, hi], "mean": float(per_seed.mean()), "min": float(per_seed.min()),
            "per_seed": per_seed.tolist()}


def fmt(s: dict | None) -> str:
    if not s:
        return "not run"
    return f"{s['iqm']:.1f} [{s['ci95'][0]:.1f}, {s['ci95'][1]:.1f}]"


def leading(tree: Any, i: int) -> Any:
    return jax.tree.map(lambda x: x[i], tree)


def tile(tree: Any, reps: int) -> Any:
    """Repeat the leading (seed) axis `reps` times: [s...] -> [s..., s..., ...]."""
    return jax.tree.map(lambda x: jnp.concatenate([x] * reps, axis=0), tree)


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


@dataclasses.dataclass
class Ctx:
    """One environment's study: settings, keys, cached dense policies and the results so far."""

    env: str
    n_seeds: int
    total: int
    finetune: int
    eval_episodes: int
    sparsities: tuple
    bits: tuple
    schemes: tuple
    qat_schemes: tuple
    config: Any
    hparams: Any
    seed: int
    save: Callable[[], None]
    results: dict
    _dense: Any = None
    _gradual: Any = None
    _wide: Any = None
    _control: Any = None
    _evals: dict = dataclasses.field(default_factory=dict)

    @property
    def train_keys(self) -> jax.Array:
        return jax.random.split(jax.random.PRNGKey(self.seed), self.n_seeds)

    @property
    def eval_keys(self) -> jax.Array:
        return jax.random.split(jax.random.PRNGKey(self.seed + 10_000), self.n_seeds)

    def fresh_keys(self, tag: int) -> jax.Array:
        return jax.random.split(jax.random.PRNGKey(self.seed + 1000 * tag), self.n_seeds)


def make_config(env: str, settings: dict, total: int, net_overrides: dict | None = None,
                compress: CompressConfig | None = None) -> ppo.PPOConfig:
    kw = dict(settings["config"])
    net = dict(kw.pop("net"))
    net.update(net_overrides or {})
    return ppo.PPOConfig(env=env, total_timesteps=total, net=nets.NetConfig(**net),
                         extensions=(compress,) if compress is not None else (), **kw)


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------
def train_batch(config: ppo.PPOConfig, hparams: Any, keys: jax.Array, hp_axis: int | None = None) -> tuple[Any, dict]:
    """`jit(vmap(train))` over the leading axis of keys (and hparams if hp_axis=0), compile timed apart."""
    trainer = ppo.make(config)
    fn = jax.jit(jax.vmap(trainer.train, in_axes=(0, hp_axis)))
    t = Timer()
    compiled = fn.lower(keys, hparams).compile()
    compile_s = t()
    t = Timer()
    out = compiled(keys, hparams)
    jax.block_until_ready(out.state.params)
    run_s = t()
    n = keys.shape[0]
    steps = trainer.num_updates * config.steps_per_update
    vl = np.asarray(out.metrics.aux.value_loss)  # [runs, rows]: the critic's 0.5 MSE to its GAE targets
    tail = max(1, vl.shape[1] // 10)
    return out.state, {"compile_s": compile_s, "run_s": run_s, "runs": n, "env_steps_per_run": steps,
                       "env_steps_per_s": n * steps / run_s,
                       "final_value_loss_per_run": vl[:, -tail:].mean(axis=1).tolist()}


def evaluator(ctx: Ctx, config: ppo.PPOConfig, act_spec: quant.QuantSpec | None = None,
              dynamic: str | None = None) -> Callable:
    """jit(vmap(evaluate)) over seeds: fn(params, ranges, obs_stats, keys) -> returns[seeds, episodes].

    With `act_spec`, every Dense input is fake-quantized with the per-seed calibrated `ranges`
    (the trainer is built inside the traced function so the ranges can be traced, vmapped values),
    or, with `dynamic` ("sample" or "tensor", `quant.DYNAMIC_RANGES`), with a range measured on the
    fly: each sample's own ("sample", what `CompressConfig(qat_activations=True)` trains with by
    default) or each call's ("tensor").
    """
    cache_key = (config, act_spec, dynamic)
    if cache_key not in ctx._evals:

        def one(params, ranges, obs_stats, key):
            hooks = Hooks() if act_spec is None else Hooks(
                interceptor=quant.activation_interceptor(act_spec, None, dynamic=dynamic) if dynamic
                else quant.activation_interceptor(act_spec, ranges))
            trainer = rl.make("ppo", config, hooks)
            return make_evaluator(trainer, ctx.eval_episodes, greedy=True)(params, obs_stats, key)

        ctx._evals[cache_key] = jax.jit(jax.vmap(one))
    return ctx._evals[cache_key]


def evaluate(ctx: Ctx, config: ppo.PPOConfig, params: Any, obs_stats: Any, act_spec=None, ranges=None,
             dynamic: str | None = None) -> dict:
    t = Timer()
    fn = evaluator(ctx, config, act_spec, dynamic)
    returns = np.asarray(fn(params, {} if ranges is None else ranges, obs_stats, ctx.eval_keys))
    out = score(returns.mean(axis=1))
    out["eval_s"] = t()
    return out


def base_config(ctx: Ctx, compress: CompressConfig | None = None, **kw) -> ppo.PPOConfig:
    """The study's config with changes; `compress` becomes its compression extension (none by default)."""
    if compress is not None:
        others = tuple(e for e in ctx.config.extensions if e.name != CompressConfig.name)
        kw["extensions"] = others + (compress,)
    return dataclasses.replace(ctx.config, **kw)


def with_sparsity(hparams: Any, sparsity: Any) -> Any:
    """`hparams` with the compression extension's target sparsity (traced; may be batched)."""
    return hparams.with_ext(CompressConfig.name, CompressHParams(sparsity=sparsity))


def prunable(config: ppo.PPOConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(include, exclude) regexes of the weights the config's compression extension prunes (the
    default extension's when the config has none): its `prune_roles` in the network's layout."""
    cc = recipes.compress_extension(config)
    return prune_selection(cc, nets.layout(config.net, config.HEAD)), cc.prune_exclude


def policy_paths(config: ppo.PPOConfig) -> tuple[str, ...]:
    """Path prefixes of the layers a greedy action needs (actor torso and head), from the layout."""
    return nets.layout(config.net, config.HEAD).prefixes("policy")


def dense_state(ctx: Ctx) -> Any:
    if ctx._dense is None:
        exp_dense(ctx)
    return ctx._dense


def actor_params(params: Any, config: ppo.PPOConfig) -> dict:
    paths = policy_paths(config)
    return {k: v for k, v in params.items() if k in paths}


def torso_kernel_nnz(params: Any, torso: str = "actor_torso") -> tuple[int, int]:
    leaves = [np.asarray(v["kernel"]) for k, v in params[torso].items()]
    return sum(int(np.count_nonzero(x)) for x in leaves), sum(x.size for x in leaves)


def selected_sparsity(params: Any, config: ppo.PPOConfig) -> float:
    """Fraction of zeros among the prunable weights (the config's compression extension's selection)."""
    include, exclude = prunable(config)
    sel = masks_lib.select(params, include, exclude)
    zeros = total = 0
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(sel)):
        if s:
            zeros += int(np.sum(np.asarray(p) == 0))
            total += int(np.size(p))
    return zeros / max(total, 1)


# ----------------------------------------------------------------------------------------------
# Experiments
# ----------------------------------------------------------------------------------------------
def exp_dense(ctx: Ctx) -> dict:
    state, timing = train_batch(ctx.config, ctx.hparams, ctx.train_keys)
    ctx._dense = state
    res = evaluate(ctx, ctx.config, state.params, state.obs_stats)
    res["timing"] = timing
    log(f"dense: {fmt(res)}  (compile {timing['compile_s']:.1f}s, run {timing['run_s']:.1f}s)")
    return res


def gradual_config(ctx: Ctx, **kw) -> ppo.PPOConfig:
    return base_config(ctx, compress=CompressConfig(prune_schedule="gradual", **GRADUAL), **kw)


def exp_gradual(ctx: Ctx) -> dict:
    """All sparsity levels x seeds in one vmapped call (sparsity is a traced hyperparameter)."""
    levels = ctx.sparsities
    config = gradual_config(ctx)
    keys = tile(ctx.train_keys, len(levels))
    sparsity = jnp.repeat(jnp.asarray(levels, jnp.float32), ctx.n_seeds)
    hp = jax.tree.map(lambda x: jnp.full((len(levels) * ctx.n_seeds,), x, jnp.float32), ctx.hparams)
    hp = with_sparsity(hp, sparsity)
    state, timing = train_batch(config, hp, keys, hp_axis=0)
    ctx._gradual = (levels, state)
    out = {"schedule": dataclasses.asdict(config.extension(CompressConfig.name)), "timing": timing, "levels": {}}
    for i, level in enumerate(levels):
        sl = slice(i * ctx.n_seeds, (i + 1) * ctx.n_seeds)
        st = jax.tree.map(lambda x: x[sl], state)
        res = evaluate(ctx, ctx.config, st.params, st.obs_stats)
        res["measured_sparsity"] = selected_sparsity(leading(st.params, 0), config)
        out["levels"][str(level)] = res
        log(f"gradual {level:.2f}: {fmt(res)}  (measured sparsity {res['measured_sparsity']:.3f})")
    log(f"gradual: compile {timing['compile_s']:.1f}s, run {timing['run_s']:.1f}s for {timing['runs']} runs")
    return out


def exp_train_cost(ctx: Ctx, repeats: int = 3) -> dict:
    """What pruning during training costs: wall time of gradual pruning to 90% against the dense run,
    both on the study's seeds through the path `rlcx train` uses (`vmap_learn`: the seeds share their
    step counters, so the mask ranking runs only when due), compiled ahead of time, alternating
    (order flipped every repeat), median of `repeats`; each with its greedy return (IQM)."""
    sparse_cost = _load_sibling("sparse_cost")
    hp90 = with_sparsity(ctx.hparams, 0.9)
    variants = {"dense": sparse_cost.Variant("dense", ppo.make(ctx.config), ctx.hparams, plain=False),
                "gradual90": sparse_cost.Variant("gradual90", ppo.make(gradual_config(ctx)), hp90, plain=False)}
    built = {}
    for name, v in variants.items():
        keys = ctx.train_keys
        state = jax.jit(jax.vmap(v.trainer.init, in_axes=(0, None)))(keys, v.hparams)
        learn = vmap_learn(v.trainer, v.trainer.num_updates, state)
        t = Timer()
        built[name] = (jax.jit(learn).lower(state).compile(), state, t())
    times: dict[str, list[float]] = {name: [] for name in variants}
    finals: dict[str, Any] = {}
    for r in range(repeats):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            fn, state, _ = built[name]
            seconds, out, _metrics = sparse_cost.run_once(fn, state)
            times[name].append(seconds)
            finals[name] = out
    dense_s = float(np.median(times["dense"]))
    out = {"note": f"{ctx.n_seeds} seeds vmapped (vmap_learn), median of {repeats} alternating runs, compile apart",
           "cost_vs_dense": float(np.median(times["gradual90"])) / dense_s, "variants": {}}
    for name in variants:
        st = finals[name]
        res = evaluate(ctx, ctx.config, st.params, st.obs_stats)
        res.update(run_seconds=times[name], median_run_seconds=float(np.median(times[name])),
                   compile_seconds=built[name][2])
        out["variants"][name] = res
        log(f"train cost {name}: median {res['median_run_seconds']:.2f}s (compile {built[name][2]:.1f}s)  {fmt(res)}")
    log(f"train cost: gradual 90% = x{out['cost_vs_dense']:.2f} the dense run's wall time")
    return out


def exp_oneshot(ctx: Ctx) -> dict:
    dense = dense_state(ctx)
    held = rollout_obs(ctx, dense.params, dense.obs_stats, 5, 16, 256)
    agree = agreement_fn(ctx, None)
    out = {"finetune_steps": ctx.finetune, "levels": {}, "agreement_obs_per_seed": int(held.shape[1]),
           "agreement_measure": agreement_label(policy_network(ctx.config)[1]) + " of the pruned policy, no fine-tune"}
    for level in ctx.sparsities:
        t = Timer()
        masks = recipes._batched_masks(dense.params, level, ctx.config, "uniform")
        pruned = masks_lib.apply_masks(dense.params, masks)
        no_ft = with_agreement(evaluate(ctx, ctx.config, pruned, dense.obs_stats), agree(pruned, {}, dense.params, held))
        t_ft = Timer()
        state, _, _ = recipes.prune_and_finetune("ppo", ctx.config, ctx.hparams, ctx.fresh_keys(2), dense.params,
                                                 level, ctx.finetune)
        jax.block_until_ready(state.params)
        ft_s = t_ft()
        ft = evaluate(ctx, ctx.config, state.params, state.obs_stats)
        out["levels"][str(level)] = {"no_finetune": no_ft, "finetune": ft, "finetune_wall_s": ft_s, "wall_s": t(),
                                     "measured_sparsity": selected_sparsity(leading(state.params, 0), ctx.config)}
        log(f"oneshot {level:.2f}: no-FT {fmt(no_ft)} agree {no_ft['agreement']:.4f}  FT {fmt(ft)}  ({t():.1f}s)")
    return out


def exp_lottery(ctx: Ctx) -> dict:
    levels = [s for s in ctx.sparsities if s > 0]
    trainer = ppo.make(ctx.config)
    rewind = max(1, round(0.03 * trainer.num_updates))
    out = {"rewind_updates": rewind, "rewind_fraction": rewind / trainer.num_updates, "levels": {}}
    t = Timer()
    last = [time.perf_counter()]

    def on_round(r: recipes.TicketRound) -> None:
        res = evaluate(ctx, ctx.config, r.state.params, r.state.obs_stats)
        res["round_wall_s"] = time.perf_counter() - last[0]
        res["measured_sparsity"] = selected_sparsity(leading(r.state.params, 0), ctx.config)
        out["levels"][str(r.sparsity)] = res
        log(f"lottery {r.sparsity:.2f}: {fmt(res)} ({res['round_wall_s']:.1f}s)")
        last[0] = time.perf_counter()
        ctx.results.setdefault("lottery_partial", {}).update(out["levels"])
        ctx.save()

    rounds = recipes.lottery_ticket("ppo", ctx.config, ctx.hparams, ctx.fresh_keys(3), levels, rewind, on_round=on_round)
    res0 = evaluate(ctx, ctx.config, rounds[0].state.params, rounds[0].state.obs_stats)
    out["levels"]["0.0"] = res0
    out["wall_s"] = t()
    ctx.results.pop("lottery_partial", None)
    return out


def rollout_obs(ctx: Ctx, params: Any, obs_stats: Any, key_tag: int, num_envs: int, num_steps: int) -> jax.Array:
    """Observations [seeds, num_envs * num_steps, ...] from each seed's dense policy (sampled actions)."""
    dense = ctx._dense.replace(params=params, obs_stats=obs_stats)
    return compress_run.policy_observations(ppo.make(ctx.config), dense, False, num_envs, num_steps,
                                            jax.random.PRNGKey(ctx.seed + 1000 * key_tag))


def policy_network(config: ppo.PPOConfig):
    env, env_params = envs.make_training_env(config.env, config.env_kwargs)
    spec = nets.action_spec(env.action_space(env_params))
    obs_shape = tuple(env.observation_space(env_params).shape)
    return nets.make(config.net, obs_shape, spec, head=config.HEAD), spec, obs_shape


def agreement_fn(ctx: Ctx, act_spec: quant.QuantSpec | None, config: ppo.PPOConfig | None = None):
    """jit(vmap) over seeds: fn(params_q, ranges, params, obs) -> (agreement, gap) of the compressed
    policy's greedy actions with the dense policy's (`nets.policy.action_agreement` / `action_gap`:
    exact equality for discrete actions, within 1% of the range for continuous ones); the network
    of `config` (default: the study's)."""
    network, spec, _ = policy_network(ctx.config if config is None else config)

    def one(params_q, ranges, params, obs):
        hooks = Hooks() if act_spec is None else Hooks(interceptor=quant.activation_interceptor(act_spec, ranges))
        a_q = compress_run.policy_forward(network, hooks, spec)(params_q, obs)
        a = compress_run.policy_forward(network, Hooks(), spec)(params, obs)
        return action_agreement(a_q, a, spec), action_gap(a_q, a, spec)

    return jax.jit(jax.vmap(one))


def with_agreement(res: dict, measured: tuple[jax.Array, jax.Array]) -> dict:
    """`res` with the per-seed agreement and action gap (and their means) of `agreement_fn`."""
    agree, gap = (np.asarray(x) for x in measured)
    res.update(agreement=float(agree.mean()), agreement_per_seed=agree.tolist(), action_gap=float(gap.mean()),
               action_gap_per_seed=gap.tolist())
    return res


def weight_spec(scheme: str, bits: int) -> quant.QuantSpec:
    return quant.QuantSpec(scheme=scheme, bits=bits, per_channel=scheme != "kmeans")


WEIGHTS = (r".*kernel",)  # every kernel, heads included (as QAT's weight transform); biases stay float32


def exp_ptq(ctx: Ctx) -> dict:
    dense = dense_state(ctx)
    network, _, _ = policy_network(ctx.config)
    apply_plain = make_apply(network)
    assert not ctx.config.normalize_obs  # calibration feeds raw observations to the network
    calib = rollout_obs(ctx, dense.params, dense.obs_stats, 4, 16, 64)
    held = rollout_obs(ctx, dense.params, dense.obs_stats, 5, 16, 256)
    out = {"calibration_obs_per_seed": int(calib.shape[1]), "agreement_obs_per_seed": int(held.shape[1]),
           "agreement_measure": agreement_label(policy_network(ctx.config)[1]),
           "weights": "every kernel incl. heads, per output channel (uniform/log), one codebook per tensor (kmeans); biases float32",
           "activations": "input of every Dense layer, per tensor, symmetric, ranges calibrated per seed",
           "results": {}}
    agree_w = agreement_fn(ctx, None)
    t_all = Timer()
    for scheme in ctx.schemes:
        for bits in ctx.bits:
            t = Timer()
            wspec = weight_spec(scheme, bits)
            params_q = jax.jit(jax.vmap(lambda p: quant.quantize_tree(p, wspec, include=WEIGHTS)))(dense.params)
            res = {"weights": with_agreement(evaluate(ctx, ctx.config, params_q, dense.obs_stats),
                                             agree_w(params_q, {}, dense.params, held))}
            line = f"ptq {scheme:>7} {bits}b W: {fmt(res['weights'])} agree {res['weights']['agreement']:.4f}"
            if scheme != "kmeans":
                for method in ("minmax", "percentile"):
                    aspec = quant.QuantSpec(scheme=scheme, bits=bits, per_channel=False, range_method=method)
                    ranges = [quant.calibrate(apply_plain, leading(params_q, i), calib[i], aspec)
                              for i in range(ctx.n_seeds)]
                    ranges = jax.tree.map(lambda *xs: jnp.stack(xs), *ranges)
                    r = with_agreement(evaluate(ctx, ctx.config, params_q, dense.obs_stats, aspec, ranges),
                                       agreement_fn(ctx, aspec)(params_q, ranges, dense.params, held))
                    res[f"weights_act_{method}"] = r
                    line += f" | W+A {method}: {fmt(r)} agree {r['agreement']:.4f}"
            res["wall_s"] = t()
            out["results"][f"{scheme}/{bits}"] = res
            log(line + f" ({t():.1f}s)")
    out["wall_s"] = t_all()
    return out


def compile_finetune(ctx: Ctx, cc: CompressConfig) -> tuple[Callable, Any, ppo.PPOConfig, float]:
    """(compiled learn, initial state, config, compile seconds) of continuing every dense policy for
    --finetune-steps with compression config `cc` (fixed keys)."""
    config = base_config(ctx, total_timesteps=ctx.finetune, compress=cc)
    trainer = ppo.make(config)
    t = Timer()
    init = jax.jit(jax.vmap(trainer.init, in_axes=(0, None)))
    state = init(ctx.fresh_keys(6), ctx.hparams).with_params(dense_state(ctx).params)
    compiled = jax.jit(vmap_learn(trainer, trainer.num_updates, state)).lower(state).compile()
    return compiled, state, config, t()


def run_compiled(compiled: Callable, state: Any) -> tuple[Any, float]:
    t = Timer()
    state, _ = compiled(state)
    jax.block_until_ready(state.params)
    return state, t()


def finetune_from_dense(ctx: Ctx, cc: CompressConfig) -> tuple[Any, ppo.PPOConfig, float, float]:
    """Continue every dense policy for --finetune-steps with compression config `cc` (fixed keys)."""
    compiled, state, config, compile_s = compile_finetune(ctx, cc)
    state, run_s = run_compiled(compiled, state)
    return state, config, compile_s, run_s


def control_finetune(ctx: Ctx) -> Any:
    """The same fine-tune as QAT's (keys, steps) without quantization: QAT against PTQ of this
    separates "trained with quantization in the loop" from "trained longer"."""
    if ctx._control is None:
        ctx._control = finetune_from_dense(ctx, CompressConfig())[0]
    return ctx._control


def exp_qat(ctx: Ctx) -> dict:
    dense = dense_state(ctx)
    out = {"mode": "fine-tune from the dense policies (quantization delay = the dense run)",
           "finetune_steps": ctx.finetune, "activations": False,
           "weights": "every kernel incl. heads; per output channel (uniform/log), per tensor (kmeans)",
           "results": {}}
    # Control: the same fine-tune (keys, steps) without quantization, then PTQ of its weights. QAT
    # against this separates "trained with quantization in the loop" from "trained longer".
    control = control_finetune(ctx)
    out["control_finetune_dense"] = evaluate(ctx, ctx.config, control.params, control.obs_stats)
    out["control_ptq"] = {}
    # Agreement with the dense policy on states it visits (as PTQ's), so that ties at a ceiling or a
    # plateau can be decided: the QAT policy's weights as its forward pass sees them.
    held = rollout_obs(ctx, dense.params, dense.obs_stats, 5, 16, 256)
    agree = agreement_fn(ctx, None)
    out["agreement_measure"] = agreement_label(policy_network(ctx.config)[1]) + " with the dense policy"
    log(f"qat control: dense fine-tune {fmt(out['control_finetune_dense'])}")
    for scheme in ctx.qat_schemes:
        for bits in ctx.bits:
            cc = CompressConfig(qat_bits=bits, qat_scheme=scheme, qat_per_channel=scheme != "kmeans", qat_activations=False)
            state, config, compile_s, run_s = finetune_from_dense(ctx, cc)
            res = evaluate(ctx, config, state.params, state.obs_stats)  # forward pass through the QAT fake-quant
            # what that forward pass runs: fake-quantized weights (k-means QAT's are already shared: lossless)
            seen = jax.jit(jax.vmap(lambda p: quant.quantize_tree(p, cc.qat_spec(), include=WEIGHTS)))(state.params)
            res = with_agreement(res, agree(seen, {}, dense.params, held))
            res.update(compile_s=compile_s, run_s=run_s)
            out["results"][f"{scheme}/{bits}"] = res
            wspec = weight_spec(scheme, bits)
            params_q = jax.jit(jax.vmap(lambda p: quant.quantize_tree(p, wspec, include=WEIGHTS)))(control.params)
            ctl = with_agreement(evaluate(ctx, ctx.config, params_q, control.obs_stats),
                                 agree(params_q, {}, dense.params, held))
            out["control_ptq"][f"{scheme}/{bits}"] = ctl
            log(f"qat {scheme:>7} {bits}b: {fmt(res)} agree {res['agreement']:.4f} | PTQ of the same fine-tune "
                f"without QAT {fmt(ctl)} agree {ctl['agreement']:.4f} (compile {compile_s:.1f}s, run {run_s:.1f}s)")
    return out


def exp_qat_cost(ctx: Ctx, repeats: int = 3) -> dict:
    """Wall time of k-means QAT against uniform QAT: the same fine-tune from the dense policies (keys,
    steps, seeds vmapped through `vmap_learn`), weights only, at every bit width; both programs
    compiled ahead of time, run alternately (order flipped every repeat), median of `repeats`; each
    with its greedy return (IQM)."""
    out: dict[str, Any] = {"finetune_steps": ctx.finetune, "repeats": repeats,
                           "note": f"{ctx.n_seeds} seeds vmapped (vmap_learn), median of {repeats} alternating "
                                   "runs, compile apart; k-means: clusters re-assigned every "
                                   f"{CompressConfig().qat_recluster_every} optimizer steps", "bits": {}}
    for bits in ctx.bits:
        built = {}
        for scheme in ("uniform", "kmeans"):
            cc = CompressConfig(qat_bits=bits, qat_scheme=scheme, qat_per_channel=scheme != "kmeans",
                                qat_activations=False)
            built[scheme] = compile_finetune(ctx, cc)
        times: dict[str, list[float]] = {name: [] for name in built}
        finals: dict[str, Any] = {}
        for r in range(repeats):
            for name in (list(built) if r % 2 == 0 else list(built)[::-1]):
                finals[name], seconds = run_compiled(built[name][0], built[name][1])
                times[name].append(seconds)
        row: dict[str, Any] = {}
        for name, (_, _, config, compile_s) in built.items():
            res = evaluate(ctx, config, finals[name].params, finals[name].obs_stats)
            res.update(run_seconds=times[name], median_run_seconds=float(np.median(times[name])),
                       compile_seconds=compile_s)
            row[name] = res
        row["kmeans_vs_uniform"] = row["kmeans"]["median_run_seconds"] / row["uniform"]["median_run_seconds"]
        out["bits"][str(bits)] = row
        log(f"qat cost {bits}b: uniform {row['uniform']['median_run_seconds']:.2f}s {fmt(row['uniform'])} | "
            f"kmeans {row['kmeans']['median_run_seconds']:.2f}s {fmt(row['kmeans'])} | x{row['kmeans_vs_uniform']:.2f}")
    return out


# What the `dynamic` activation ranges of `quant.activation_interceptor` are, for the JSON and the summary.
ACT_RANGE_TEXT = {
    "sample": "each sample's own range (min and max over that observation's Dense-input features, "
              "measured in every forward pass: dynamic, batch-independent)",
    "tensor": "one range per forward call over the whole batch (dynamic, depends on the batch)",
}


def qat_act_quantizer(mode: str) -> str:
    return f"kernels per tensor; Dense inputs: {ACT_RANGE_TEXT[mode]}; symmetric, minmax"


def exp_qat_act(ctx: Ctx) -> dict:
    """QAT of weights and activations vs PTQ of weights and activations, same quantizer at eval.

    Both quantize every kernel per tensor and the input of every Dense layer with a dynamic range of
    the kind `CompressConfig.qat_activation_range` trains with (default "sample": each observation its
    own range, `quant.sample_range`); PTQ is applied to the dense policies and to the equally long
    fine-tune without quantization (control)."""
    dense = dense_state(ctx)
    control = control_finetune(ctx)
    mode = CompressConfig().qat_activation_range
    out = {"mode": "fine-tune from the dense policies", "finetune_steps": ctx.finetune, "results": {},
           "activation_range": mode, "quantizer": qat_act_quantizer(mode)}
    for scheme in [s for s in ctx.schemes if s != "kmeans"]:
        for bits in ctx.bits:
            spec = quant.QuantSpec(scheme=scheme, bits=bits, per_channel=False)
            cc = CompressConfig(qat_bits=bits, qat_scheme=scheme, qat_per_channel=False, qat_activations=True,
                                qat_activation_range=mode)
            state, config, compile_s, run_s = finetune_from_dense(ctx, cc)
            res = {"qat": evaluate(ctx, config, state.params, state.obs_stats)}
            res["qat"].update(compile_s=compile_s, run_s=run_s)
            q = jax.jit(jax.vmap(lambda p: quant.quantize_tree(p, spec, include=WEIGHTS)))
            res["ptq_dense"] = evaluate(ctx, ctx.config, q(dense.params), dense.obs_stats, spec, dynamic=mode)
            res["ptq_control"] = evaluate(ctx, ctx.config, q(control.params), control.obs_stats, spec, dynamic=mode)
            out["results"][f"{scheme}/{bits}"] = res
            log(f"qat W+A {scheme:>7} {bits}b: {fmt(res['qat'])} | PTQ W+A of dense {fmt(res['ptq_dense'])} | "
                f"of the control fine-tune {fmt(res['ptq_control'])} (run {run_s:.1f}s)")
    return out


def exp_wide(ctx: Ctx) -> dict:
    sparsity = 0.9
    wide_h = (256, 256)
    config_w = gradual_config(ctx, net=dataclasses.replace(ctx.config.net, hidden=wide_h))
    hp = with_sparsity(ctx.hparams, sparsity)
    state_w, tw = train_batch(config_w, hp, ctx.train_keys)
    ctx._wide = (state_w, config_w)
    nnz_w, _ = torso_kernel_nnz(leading(state_w.params, 0))
    _, _, obs_shape = policy_network(ctx.config)
    d = int(np.prod(obs_shape))
    # dense torso d->w->w has d*w + w*w kernel weights; solve for the width with the same non-zeros
    width = int(round((-d + math.sqrt(d * d + 4 * nnz_w)) / 2))
    config_s = base_config(ctx, net=dataclasses.replace(ctx.config.net, hidden=(width, width)))
    state_s, ts = train_batch(config_s, ctx.hparams, ctx.train_keys)
    nnz_s, _ = torso_kernel_nnz(leading(state_s.params, 0))
    eval_cfg_w = base_config(ctx, net=config_w.net)
    # Reference: the wide net trained dense, to tell the cost of the width from the cost of pruning.
    state_d, td = train_batch(eval_cfg_w, ctx.hparams, ctx.train_keys)
    # Diagnostics: the same wide net with only the actor pruned (critic torso kept dense), and with
    # ERK layer budgets (Evci et al. 2020: density ~ (n_in + n_out) / (n_in n_out), so the 4-input
    # first layer stays dense and the 256x256 layer takes the cut) at the same total non-zeros.
    cc_w = config_w.extension(CompressConfig.name)
    actor_only = dataclasses.replace(cc_w, prune_exclude=tuple(cc_w.prune_exclude) + (r"critic_torso/.*",))
    config_a = base_config(ctx, net=config_w.net, compress=actor_only)
    state_a, ta = train_batch(config_a, hp, ctx.train_keys)
    config_e = base_config(ctx, net=config_w.net, compress=dataclasses.replace(cc_w, prune_distribution="erk"))
    state_e, te = train_batch(config_e, hp, ctx.train_keys)
    nnz_e, _ = torso_kernel_nnz(leading(state_e.params, 0))
    res = {
        "wide_sparse_actor_only": dict(evaluate(ctx, eval_cfg_w, state_a.params, state_a.obs_stats), hidden=wide_h,
                                       sparsity=sparsity, critic="dense", timing=ta,
                                       **wide_diagnostics(state_a.params)),
        "wide_sparse_erk": dict(evaluate(ctx, eval_cfg_w, state_e.params, state_e.obs_stats), hidden=wide_h,
                                sparsity=sparsity, distribution="erk", actor_torso_nonzero_kernel_weights=nnz_e,
                                timing=te, **wide_diagnostics(state_e.params)),
        "wide_dense": dict(evaluate(ctx, eval_cfg_w, state_d.params, state_d.obs_stats), hidden=wide_h, timing=td),
        "wide_sparse": dict(evaluate(ctx, eval_cfg_w, state_w.params, state_w.obs_stats), hidden=wide_h,
                            sparsity=sparsity, actor_torso_nonzero_kernel_weights=nnz_w, timing=tw,
                            **wide_diagnostics(state_w.params)),
        "small_dense": dict(evaluate(ctx, config_s, state_s.params, state_s.obs_stats), hidden=(width, width),
                            actor_torso_nonzero_kernel_weights=nnz_s, timing=ts),
        "note": "non-zeros counted over the actor torso kernels (the critic torso is pruned alike); heads not counted; "
                "final_value_loss_per_run: the critic's 0.5 MSE to its GAE targets, mean of the last 10% of updates",
    }
    log(f"wide-sparse {wide_h} @90%: {fmt(res['wide_sparse'])} nnz {nnz_w} | small-dense {width}x{width}: "
        f"{fmt(res['small_dense'])} nnz {nnz_s} | wide dense {fmt(res['wide_dense'])} | "
        f"wide, actor only pruned {fmt(res['wide_sparse_actor_only'])} | wide ERK {fmt(res['wide_sparse_erk'])} "
        f"nnz {nnz_e}")
    for k in ("wide_sparse", "wide_sparse_erk", "wide_sparse_actor_only", "wide_dense", "small_dense"):
        v = res[k]
        log(f"  {k}: min return {v['min']:.0f}; final value loss per seed "
            f"{np.round(v['timing']['final_value_loss_per_run'], 1).tolist()}; first-layer units without input "
            f"{v.get('inputless_first_layer_units', '-')}")
    return res


def wide_diagnostics(params: Any) -> dict:
    """Per torso, the fraction of first-layer hidden units left with no incoming weight (median over
    seeds): such a unit outputs the constant act(b_j), whatever the observation."""
    out = {}
    for torso in ("actor_torso", "critic_torso"):
        kernel = np.asarray(params[torso]["Dense_0"]["kernel"])  # [seeds, in, out]
        out[torso] = float(np.median(np.mean(np.all(kernel == 0, axis=1), axis=1)))
    return {"inputless_first_layer_units": out}


ALL_LEAVES = (r".*",)  # kernels and biases quantized


@dataclasses.dataclass(frozen=True)
class ExportVariant:
    """One way of writing the 90%-pruned actor: what is folded, quantized and entropy-coded."""

    fold: bool  # `structured.fold_dead_units` first (dead hidden units into consumer biases)
    per_channel: bool  # int8 scales per output channel (else one per tensor)
    include: tuple[str, ...] = WEIGHTS  # leaves quantized to int8; the rest stay float
    bias_dtype: str = "float32"  # storage of the unquantized leaves
    payload_codec: str = "none"

    def describe(self) -> dict:
        return {"fold_dead_units": self.fold, "per_channel": self.per_channel, "int8_leaves": list(self.include),
                "float_dtype_of_the_rest": self.bias_dtype, "payload_codec": self.payload_codec}


EXPORT_VARIANTS = {
    "int8_per_channel": ExportVariant(fold=False, per_channel=True),
    "int8_per_tensor": ExportVariant(fold=False, per_channel=False),
    "int8_per_tensor_lzma": ExportVariant(fold=False, per_channel=False, payload_codec="lzma"),
    "folded_int8_per_tensor": ExportVariant(fold=True, per_channel=False),
    "folded_int8_per_tensor_f16_biases": ExportVariant(fold=True, per_channel=False, bias_dtype="float16"),
    "folded_int8_all_per_tensor": ExportVariant(fold=True, per_channel=False, include=ALL_LEAVES),
    "folded_int8_all_per_channel": ExportVariant(fold=True, per_channel=True, include=ALL_LEAVES),
    "folded_int8_all_per_tensor_lzma": ExportVariant(fold=True, per_channel=False, include=ALL_LEAVES,
                                                     payload_codec="lzma"),
}
# what `rlcx compress --prune 0.9 --quant int8` ships by default is `folded_int8_per_tensor`
# (fold on, kernels int8, biases float32); the headline quantizes the biases too.
EXPORT_HEADLINE = "folded_int8_all_per_tensor"


def export_sizes(ctx: Ctx, st: Any, config: ppo.PPOConfig) -> dict:
    """Bytes of every seed's dense float32 file vs its pruned + int8 files (actor, actor+critic), where
    the bytes go (`export.breakdown`), and the return and greedy-action agreement of every shipped
    actor as `export.load` reads it back (agreement with the float 90%-pruned policy, on its states)."""
    _, spec, obs_shape = policy_network(config)
    meta = dict(net_config=config.net, obs_shape=obs_shape, action_spec=spec)
    out: dict[str, Any] = {"hidden": config.net.hidden, "headline": EXPORT_HEADLINE,
                           "variants": {k: v.describe() for k, v in EXPORT_VARIANTS.items()},
                           "breakdown_seed0": {}, "per_seed": []}
    folded = jax.jit(jax.vmap(lambda p: structured.fold_dead_units(p, config.net, config.HEAD)))(st.params)
    shipped: dict[str, list] = {name: [] for name in EXPORT_VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(ctx.n_seeds):
            p, pf = (jax.tree.map(np.asarray, leading(t, i)) for t in (st.params, folded))
            row: dict[str, Any] = {}
            for part in ("actor", "actor_critic"):
                row[part] = {"dense_float32_bytes": export_lib.dense_float32_bytes(
                    actor_params(p, config) if part == "actor" else p, **meta)}
                for name, v in EXPORT_VARIANTS.items():
                    src = pf if v.fold else p
                    tree = actor_params(src, config) if part == "actor" else src
                    f = os.path.join(tmp, f"{part}_{name}_{i}.rlcx")
                    qspec = quant.QuantSpec(scheme="uniform", bits=8, per_channel=v.per_channel)
                    row[part][name] = export_lib.export(tree, f, qspec=qspec, include=v.include,
                                                        float_dtype=v.bias_dtype, payload_codec=v.payload_codec,
                                                        **meta)
                    if part == "actor":
                        shipped[name].append({**p, **export_lib.load(f).params})  # critic: unused by the policy
                        if i == 0:
                            out["breakdown_seed0"][name] = export_lib.breakdown(f)
            out["per_seed"].append(row)
    for part in ("actor", "actor_critic"):
        rows = [r[part] for r in out["per_seed"]]
        out[part] = {"dense_float32_bytes": rows[0]["dense_float32_bytes"]}
        for name in EXPORT_VARIANTS:
            out[part][name] = {"median_bytes": float(np.median([r[name] for r in rows])),
                               "min_ratio": float(min(r["dense_float32_bytes"] / r[name] for r in rows)),
                               "median_ratio": float(np.median([r["dense_float32_bytes"] / r[name] for r in rows]))}
        out[part]["median_ratio"] = out[part][EXPORT_HEADLINE]["median_ratio"]
    out["float_policy_return"] = evaluate(ctx, config, st.params, st.obs_stats)
    held = compress_run.policy_observations(ppo.make(config), st, False, 16, 256,
                                            jax.random.PRNGKey(ctx.seed + 7000))
    agree = agreement_fn(ctx, None, config)
    out["shipped"] = {}
    for name, trees in shipped.items():
        params_q = jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
        out["shipped"][name] = with_agreement(evaluate(ctx, config, params_q, st.obs_stats),
                                              agree(params_q, {}, st.params, held))
    out["agreement_measure"] = (f"{agreement_label(spec)} of the policy read back from the artifact with the float "
                                "90%-pruned policy, on its own states (16 envs x 256 steps per seed)")
    a = out["actor"]
    log(f"export {config.net.hidden}: actor {a['dense_float32_bytes']} B dense f32 -> "
        + ", ".join(f"{k} {a[k]['median_bytes']:.0f} B (x{a[k]['median_ratio']:.1f}, "
                    f"{100 * out['shipped'][k]['agreement']:.2f}% agree)" for k in EXPORT_VARIANTS)
        + f"; actor+critic x{out['actor_critic']['median_ratio']:.1f}; shipped policy {fmt(out['shipped'][EXPORT_HEADLINE])}")
    return out


def exp_export(ctx: Ctx) -> dict:
    """Export the 90% gradual policies (standard width, and the wide net if `wide` ran) with int8 kernels."""
    if ctx._gradual is None or 0.9 not in ctx._gradual[0]:
        # train just the 90% level if the gradual sweep did not run in this process
        st, _ = train_batch(gradual_config(ctx), with_sparsity(ctx.hparams, 0.9), ctx.train_keys)
    else:
        levels, state = ctx._gradual
        i = levels.index(0.9)
        st = jax.tree.map(lambda x: x[i * ctx.n_seeds:(i + 1) * ctx.n_seeds], state)
    out = {"sparsity": 0.9,
           "note": ("int8 symmetric, per tensor or per output channel, of the kernels (heads included, unpruned) or "
                    "of every leaf (_all: biases too); the rest float32 or float16 where named; folded_: dead hidden "
                    "units folded into their consumers' biases first (`structured.fold_dead_units`, on by default "
                    "in `rlcx compress`); sparse index where smaller; _lzma: payload entropy-coded; artifact "
                    "format 3 (binary leaf records, metadata zlib-compressed with a preset dictionary)")}
    out.update(export_sizes(ctx, st, ctx.config))
    if ctx._wide is not None:
        state_w, config_w = ctx._wide
        out["wide"] = export_sizes(ctx, state_w, base_config(ctx, net=config_w.net))
    return out


LATENCY_NOTE = ("What the latency means: one jitted call of the actor forward (seed 0's parameters, on the "
                "device) on XLA:CPU, whose kernels are dense float32 matmuls: the 90%-masked net runs the same "
                "matmuls as the dense one (its FLOPs count non-zeros only), so masks do not make it faster; int8 "
                "runs dequantized float32 (or fake-quantizes in the forward); only structured shrink (smaller "
                "matrices) does less work. At batch 1 the per-call overhead of a jitted function dominates.")


def alternating_latency(variants: dict[str, tuple[Callable, Any]], obs: jax.Array, rounds: int = 7,
                        min_round_s: float = 0.2) -> dict[str, dict]:
    """Seconds per jitted call of every `forward(params, obs)` in `variants` {name: (forward, params)}.

    Each variant is compiled, warmed up and given a number of back-to-back calls that lasts at least
    `min_round_s`; then `rounds` rounds time every variant once, in an order that alternates (reversed
    every other round), so a slow spell of the shared host hits all variants alike. Per variant:
    median, min, max and quartiles over rounds of the mean seconds per call, and every round."""
    fns = {}
    for name, (forward, params) in variants.items():
        fn, dev = jax.jit(forward), jax.device_put(params)  # parameters on the device: no host copy per call
        jax.block_until_ready(fn(dev, obs))
        n, t = 1, 0.0
        while t < min_round_s / 10:  # estimate the call time on >= 1/10 of a round
            start = time.perf_counter()
            jax.block_until_ready([fn(dev, obs) for _ in range(n)][-1])
            t = time.perf_counter() - start
            n *= 2 if t < min_round_s / 10 else 1
        fns[name] = (fn, dev, max(10, math.ceil(min_round_s / (t / n))))
    per_call: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            fn, dev, calls = fns[name]
            start = time.perf_counter()
            out = None
            for _ in range(calls):
                out = fn(dev, obs)
            jax.block_until_ready(out)
            per_call[name].append((time.perf_counter() - start) / calls)
    out_ = {}
    for name, xs in per_call.items():
        q1, med, q3 = np.percentile(xs, [25, 50, 75])
        out_[name] = {"median_s": float(med), "min_s": float(min(xs)), "max_s": float(max(xs)),
                      "iqr_s": [float(q1), float(q3)], "rounds_s": xs, "calls_per_round": fns[name][2]}
    return out_


def exp_cost(ctx: Ctx, rounds: int = 7, min_round_s: float = 0.2) -> dict:
    dense = dense_state(ctx)
    p = jax.tree.map(np.asarray, leading(dense.params, 0))
    network, spec, obs_shape = policy_network(ctx.config)
    head = ctx.config.HEAD
    small, small_cfg = structured.shrink(p, ctx.config.net, 0.5, head=head)
    small_net = nets.make(small_cfg, obs_shape, spec, head=head)
    paths = policy_paths(ctx.config)  # the shrunk net has the same layout (same separate_critic)
    include, exclude = prunable(ctx.config)
    masks = masks_lib.magnitude_masks(p, 0.9, include=include, exclude=exclude)
    pruned = masks_lib.apply_masks(p, masks)
    qspec = quant.QuantSpec(scheme="uniform", bits=8, per_channel=True)
    p_int8 = quant.quantize_tree(p, qspec, include=WEIGHTS)

    def fwd(net, transform=None):
        def forward(params, obs):
            return net.apply({"params": transform(params) if transform else params}, obs, method="policy")
        return forward

    variants = {
        "dense": (fwd(network), p, p),
        "magnitude_90_masked": (fwd(network), pruned, pruned),
        "shrink_50": (fwd(small_net), small, small),
        "int8_dequantized": (fwd(network), p_int8, p_int8),
        "int8_fakequant_in_forward": (fwd(network, lambda q: quant.quantize_tree(q, qspec, include=WEIGHTS)),
                                      p, p_int8),
    }
    out = {"note": (f"latency: per variant and batch size, median and min-max over {rounds} rounds; each round "
                    f"times >= {1000 * min_round_s:.0f} ms of back-to-back jitted calls of the policy forward (actor "
                    "only), the variants alternating round by round (order reversed every other round). "
                    + LATENCY_NOTE),
           "latency_method": {"rounds": rounds, "min_round_s": min_round_s, "alternating": True,
                              "params_on_device": True},
           "variants": {}}
    for name, (_, _, params_count) in variants.items():
        rep = size.count(params_count, paths=paths)
        out["variants"][name] = {"params": rep.params, "nonzeros": rep.nonzeros,
                                 "flops_per_forward": size.flops_per_forward(params_count, obs_shape, paths),
                                 "latency_us": {}}
    for b in (1, 256):
        timed = alternating_latency({k: (f, pr) for k, (f, pr, _) in variants.items()}, size.batch_of(obs_shape, b),
                                    rounds, min_round_s)
        for name, t in timed.items():
            out["variants"][name]["latency_us"][f"batch{b}"] = {
                "median": 1e6 * t["median_s"], "min": 1e6 * t["min_s"], "max": 1e6 * t["max_s"],
                "iqr": [1e6 * x for x in t["iqr_s"]], "rounds": [1e6 * x for x in t["rounds_s"]],
                "calls_per_round": t["calls_per_round"]}
    for name, row in out["variants"].items():
        lat = row["latency_us"]
        log(f"cost {name:>26}: params {row['params']:>6} nnz {row['nonzeros']:>6} FLOPs {row['flops_per_forward']:>7} "
            + " ".join(f"{k} {latency_text(v)}us" for k, v in lat.items()))
    # return of the shrunk policy (no fine-tune)
    smalls = [structured.shrink(jax.tree.map(np.asarray, leading(dense.params, i)), ctx.config.net, 0.5, head=head)[0]
              for i in range(ctx.n_seeds)]
    small_b = jax.tree.map(lambda *xs: jnp.stack(xs), *smalls)
    out["shrink_50_return_no_finetune"] = evaluate(ctx, base_config(ctx, net=small_cfg), small_b, dense.obs_stats)
    out["shrink_50_config"] = dataclasses.asdict(small_cfg)
    log(f"cost: shrink 50% return (no fine-tune) {fmt(out['shrink_50_return_no_finetune'])}")
    return out


def latency_text(v: dict | float | None) -> str:
    """'median (min-max)' of a latency entry in us; an older run's single float is marked as such."""
    if v is None:
        return "—"
    if isinstance(v, dict):
        return f"{v['median']:.1f} ({v['min']:.1f}-{v['max']:.1f})"
    return f"{v:.1f} (single measurement (older run))"


EXPERIMENTS: dict[str, Callable[[Ctx], dict]] = {
    "dense": exp_dense, "gradual": exp_gradual, "train_cost": exp_train_cost, "oneshot": exp_oneshot, "lottery": exp_lottery,
    "ptq": exp_ptq, "qat": exp_qat, "qat_cost": exp_qat_cost, "qat_act": exp_qat_act, "wide": exp_wide, "export": exp_export, "cost": exp_cost,
}


# ----------------------------------------------------------------------------------------------
# Checks against the papers, plots, summary
# ----------------------------------------------------------------------------------------------
def get(d: dict, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def kept_fraction(env: str, x: float, dense: float) -> float:
    """x as a fraction of the dense return, both measured above the env's lowest possible return."""
    floor = SCORE_FLOOR.get(env, 0.0)
    return (x - floor) / (dense - floor) if dense != floor else float("nan")


# The highest return an episode can score, where there is one the trained policies reach: CartPole-v1
# ends at 500 steps (+1 per step). Acrobot (-1 per step to the goal), Breakout and Pendulum: none.
SCORE_CEILING = {"CartPole-v1": 500.0}
TIE = "tie (saturated)"


def saturation(env: str, a: dict, b: dict, dense: dict | None) -> str | None:
    """Why the environment cannot separate scores `a` and `b` (None where it can): both IQMs at the
    env's score ceiling, or a plateau (their 95% CIs overlap and both IQMs lie within the dense
    policy's CI: neither moved away from where the dense policy is)."""
    ceiling = SCORE_CEILING.get(env)
    if ceiling is not None and a["iqm"] >= ceiling and b["iqm"] >= ceiling:
        return f"both at the score ceiling {ceiling:g}"
    if dense and a.get("ci95") and b.get("ci95"):
        lo, hi = dense["ci95"]
        overlap = a["ci95"][0] <= b["ci95"][1] and b["ci95"][0] <= a["ci95"][1]
        if overlap and lo <= a["iqm"] <= hi and lo <= b["iqm"] <= hi:
            return "plateau: the CIs overlap and both IQMs lie within the dense CI"
    return None


def verdict_of(ok: bool) -> dict:
    return {"verdict": "yes" if ok else "no", "holds": bool(ok)}


def compare(env: str, a: dict, b: dict, dense: dict | None, names: tuple[str, str] = ("A", "B")) -> dict:
    """The check "A >= B" on returns (score dicts with iqm, ci95 and maybe agreement).

    A strict "yes" needs A's IQM >= B's where the environment separates them (`saturation` is None).
    Where it cannot, the check is a tie, decided on greedy-action agreement with the dense policy
    when both sides have one ("tie (saturated); decided on agreement: yes/no"), else left a tie.
    `holds` is True only for a yes (strict, or decided on agreement)."""
    out: dict[str, Any] = {"a": a["iqm"], "b": b["iqm"], "a_ci95": a.get("ci95"), "b_ci95": b.get("ci95"),
                           "names": list(names)}
    out["saturated"] = saturation(env, a, b, dense)
    if out["saturated"] is None:
        return {**out, **verdict_of(a["iqm"] >= b["iqm"])}
    agreement = (a.get("agreement"), b.get("agreement"))
    if None not in agreement:
        ok = agreement[0] >= agreement[1]
        return {**out, "agreement": list(agreement), "holds": ok,
                "verdict": f"{TIE}; decided on agreement: {'yes' if ok else 'no'}"}
    missing = [n for n, x in zip(names, agreement) if x is None]
    return {**out, "verdict": TIE, "holds": False,
            "agreement_missing": f"no agreement stored for {' and '.join(missing)}"}


def per_point(target: str, rows: dict[str, dict]) -> dict:
    """A claim checked at several points (bit widths): yes only if every point is a yes, no if any is."""
    n_yes = sum(1 for v in rows.values() if v["holds"])
    n_tie = sum(1 for v in rows.values() if v["verdict"] == TIE)
    n_no = len(rows) - n_yes - n_tie
    verdict = "yes" if n_yes == len(rows) else ("no" if n_no else TIE)
    missing = sorted({v["agreement_missing"] for v in rows.values() if "agreement_missing" in v})
    return {"target": target, "per_point": rows, "verdict": verdict, "holds": verdict == "yes",
            "counts": {"yes": n_yes, "tie": n_tie, "no": n_no,
                       "decided_on_agreement": sum(1 for v in rows.values() if "agreement" in v)},
            "bits_that_hold": sorted(k for k, v in rows.items() if v["holds"]), "agreement_missing": missing}


def checks(r: dict, env: str = "") -> dict:
    """docs/architecture.md "Reference targets", evaluated on our measurements (absent = not measured).

    Every check carries `verdict` ("yes", "no", "tie (saturated)" or "tie (saturated); decided on
    agreement: yes/no") and `holds` (True only for a yes); tables print these and decide nothing."""
    out: dict[str, Any] = {}
    dense = get(r, "dense")
    g90 = get(r, "gradual", "levels", "0.9")
    if dense and g90:
        frac = kept_fraction(env, g90["iqm"], dense["iqm"])
        out["gradual90_keeps_95pct"] = {
            "target": f">= {TARGETS['gradual90_keeps']} of dense IQM (above the floor {SCORE_FLOOR.get(env, 0.0):.1f})",
            "ours": frac, "iqm": g90["iqm"], "dense_iqm": dense["iqm"],
            **verdict_of(frac >= TARGETS["gradual90_keeps"])}
    tc = get(r, "train_cost")
    if tc:
        v = tc["variants"]
        out["train_cost_le_125"] = {
            "target": f"gradual pruning to 90% costs <= {TRAIN_COST_TARGET}x the dense run's wall time",
            "ours": tc["cost_vs_dense"], "seconds": {k: v[k]["median_run_seconds"] for k in v},
            "iqm": {k: v[k]["iqm"] for k in v}, **verdict_of(tc["cost_vs_dense"] <= TRAIN_COST_TARGET)}
    qc = get(r, "qat_cost", "bits")
    if qc:
        ratios = {b: v["kmeans_vs_uniform"] for b, v in qc.items()}
        out["kmeans_qat_cost_le_3"] = {
            "target": f"k-means QAT costs <= {QAT_COST_TARGET}x uniform QAT's wall time at every bit width",
            "ours": max(ratios.values()), "per_bits": ratios,
            "seconds": {b: {s: v[s]["median_run_seconds"] for s in ("uniform", "kmeans")} for b, v in qc.items()},
            "iqm": {b: {s: v[s]["iqm"] for s in ("uniform", "kmeans")} for b, v in qc.items()},
            **verdict_of(max(ratios.values()) <= QAT_COST_TARGET)}
    for method in ("weights", "weights_act_minmax", "weights_act_percentile"):
        p8 = get(r, "ptq", "results", "uniform/8", method)
        if dense and p8:
            lo, hi = dense["ci95"]
            within = lo <= p8["iqm"] <= hi
            measure = get(r, "ptq", "agreement_measure") or "greedy agreement"
            out[f"int8_ptq_{method}"] = {
                "target": f"IQM within dense CI and >= {100 * TARGETS['int8_agreement']:g}% {measure}",
                "ours": {"iqm": p8["iqm"], "dense_ci": [lo, hi], "agreement": p8["agreement"]},
                **verdict_of(within and p8["agreement"] >= TARGETS["int8_agreement"])}
    qat = get(r, "qat", "results") or {}
    rows = {k: compare(env, q, p, dense, ("QAT", "PTQ of the dense run"))
            for k, q in qat.items() if (p := get(r, "ptq", "results", k, "weights"))}
    if rows:
        out["qat_ge_ptq"] = per_point("QAT >= PTQ of the dense run at every bit width (weights; IQM)", rows)
    rows = {k: compare(env, q, c, dense, ("QAT", "PTQ of the control fine-tune"))
            for k, q in qat.items() if (c := get(r, "qat", "control_ptq", k))}
    if rows:
        out["qat_ge_ptq_same_training"] = per_point(
            "QAT >= PTQ of an equally long fine-tune without QAT, every bit width (IQM)", rows)
    rows = {}
    for key, v in (get(r, "qat_act", "results") or {}).items():
        best = max(("ptq_dense", "ptq_control"), key=lambda s: v[s]["iqm"])
        rows[key] = {**compare(env, v["qat"], v[best], dense, ("QAT W+A", "PTQ W+A")), "best_ptq": best}
    if rows:
        out["qat_ge_ptq_weights_and_activations"] = per_point(
            "QAT W+A >= the better of PTQ W+A (dense, same fine-tune) at every bit width (IQM)", rows)
    for kind, src in (("ptq", ("ptq", "results", "{s}/4", "weights")), ("qat", ("qat", "results", "{s}/4"))):
        lg = get(r, *[k.format(s="log") for k in src])
        un = get(r, *[k.format(s="uniform") for k in src])
        if lg and un:
            out[f"log4_ge_uniform4_{kind}"] = {"target": "4-bit log >= 4-bit uniform",
                                               "ours": {"log": lg["iqm"], "uniform": un["iqm"]},
                                               **compare(env, lg, un, dense, (f"log {kind}", f"uniform {kind}"))}
    # the library's default layer budgets (ERK) where measured, else the uniform ones of older runs
    budgets = "erk" if get(r, "wide", "wide_sparse_erk") else "uniform"
    ws = get(r, "wide", "wide_sparse_erk" if budgets == "erk" else "wide_sparse")
    sd = get(r, "wide", "small_dense")
    if ws and sd:
        out["wide_sparse_ge_small_dense"] = {"target": "wide sparse >= small dense at equal non-zeros",
                                             "budgets": budgets,
                                             "ours": {"wide_sparse": ws["iqm"], "small_dense": sd["iqm"]},
                                             **compare(env, ws, sd, dense, ("wide sparse", "small dense"))}
    for tag, keys in (("", ("export",)), ("_wide", ("export", "wide"))):
        ex = get(r, *keys)
        if ex:
            h = "x".join(str(w) for w in ex["hidden"])
            head = ex.get("headline", "int8_per_tensor_lzma")
            shipped = get(ex, "shipped", head)
            out[f"export_ratio_ge_20{tag}"] = {
                "target": f">= {TARGETS['export_ratio']:g}x (actor file of the {h} net, dense f32 vs 90% pruned + "
                          f"{head})",
                "hidden": h, "variant": head, "ours": ex["actor"]["median_ratio"],
                "min_ratio": get(ex, "actor", head, "min_ratio"),
                "shipped_agreement": None if shipped is None else shipped["agreement"],
                **verdict_of(ex["actor"]["median_ratio"] >= TARGETS["export_ratio"])}
    return out


def verdict_text(c: dict) -> str:
    """A check's verdict as the tables print it (no is bold; a tie decided on agreement shows both)."""
    v = c["verdict"]
    if "agreement" in c:
        a, b = c["agreement"]
        decided = v.rsplit(": ", 1)[1]
        return f"{TIE}; agreement {100 * a:.2f}% vs {100 * b:.2f}%: {'yes' if decided == 'yes' else '**no**'}"
    if v == TIE and isinstance(c.get("agreement_missing"), str):  # per-point checks: see counts_text
        return f"{TIE}; {c['agreement_missing']}"
    return {"yes": "yes", "no": "**no**"}.get(v, v)


def counts_text(c: dict) -> str:
    """'4/15 yes, 9 ties, 2 no' of a per-point check (ties decided on agreement count as yes or no)."""
    n = c["counts"]
    decided = f" ({n['decided_on_agreement']} ties decided on agreement)" if n["decided_on_agreement"] else ""
    missing = f"; {', '.join(c['agreement_missing'])}" if c.get("agreement_missing") and n["tie"] else ""
    return (f"{n['yes']}/{len(c['per_point'])} yes, {n['tie']} tie{'' if n['tie'] == 1 else 's'}, "
            f"{n['no']} no{decided}{missing}")


def plot(env: str, r: dict, prefix: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    dense = r.get("dense")

    def series(ax, pts: dict, label: str, scale: float = 1.0) -> None:
        """One IQM curve with its 95% CI band; x scaled (e.g. 100 for %)."""
        xs = sorted(pts)
        xv = [scale * x for x in xs]
        ax.plot(xv, [pts[x]["iqm"] for x in xs], marker="o", label=label)
        ax.fill_between(xv, [pts[x]["ci95"][0] for x in xs], [pts[x]["ci95"][1] for x in xs], alpha=0.15)

    def save(fig, suffix: str) -> None:
        fig.tight_layout()
        path = f"{prefix}_{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    curves = {
        "gradual (Zhu & Gupta)": {float(k): v for k, v in (get(r, "gradual", "levels") or {}).items()},
        "one-shot, no fine-tune": {float(k): v["no_finetune"] for k, v in (get(r, "oneshot", "levels") or {}).items()},
        "one-shot + fine-tune": {float(k): v["finetune"] for k, v in (get(r, "oneshot", "levels") or {}).items()},
        "lottery ticket (rewind)": {float(k): v for k, v in (get(r, "lottery", "levels") or {}).items()},
    }
    if any(curves.values()):
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, pts in curves.items():
            if pts:
                series(ax, pts, name, scale=100.0)
        if dense:
            ax.axhline(dense["iqm"], color="k", lw=1, ls="--", label="dense")
            ax.axhspan(*dense["ci95"], color="k", alpha=0.07)
        ax.set_xlabel("sparsity of prunable kernels (%)")
        ax.set_ylabel("greedy return (IQM over seeds, 95% CI)")
        ax.set_title(f"{env}: return vs sparsity")
        ax.legend(fontsize=8)
        save(fig, "sparsity")
    ptq, qat = get(r, "ptq", "results") or {}, get(r, "qat", "results") or {}
    if ptq or qat:
        schemes = sorted({k.split("/")[0] for k in list(ptq) + list(qat)})
        fig, axes = plt.subplots(1, len(schemes), figsize=(4.2 * len(schemes), 3.8), squeeze=False)
        for ax, s in zip(axes[0], schemes):
            curves_s = {"PTQ weights": {int(k.split("/")[1]): v["weights"] for k, v in ptq.items() if k.startswith(s + "/")},
                      "PTQ W+A minmax": {int(k.split("/")[1]): v["weights_act_minmax"] for k, v in ptq.items()
                                         if k.startswith(s + "/") and "weights_act_minmax" in v},
                      "PTQ W+A percentile": {int(k.split("/")[1]): v["weights_act_percentile"] for k, v in ptq.items()
                                             if k.startswith(s + "/") and "weights_act_percentile" in v},
                      "QAT weights": {int(k.split("/")[1]): v for k, v in qat.items() if k.startswith(s + "/")}}
            for name, pts in curves_s.items():
                if pts:
                    series(ax, pts, name)
            if dense:
                ax.axhline(dense["iqm"], color="k", lw=1, ls="--", label="dense")
            ax.set_title(f"{env}: {s}")
            ax.set_xlabel("bits")
            ax.invert_xaxis()
            ax.set_ylabel("greedy return (IQM, 95% CI)")
            ax.legend(fontsize=7)
        save(fig, "bits")
    agree_sparsity = {float(k): v["no_finetune"]["agreement"] for k, v in (get(r, "oneshot", "levels") or {}).items()
                      if "agreement" in v["no_finetune"]}
    agree_bits = {s: {int(k.split("/")[1]): v["weights"]["agreement"] for k, v in ptq.items() if k.startswith(s + "/")}
                  for s in sorted({k.split("/")[0] for k in ptq})}
    if agree_sparsity or any(agree_bits.values()):
        measure = get(r, "ptq", "agreement_measure") or "greedy agreement"
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
        if agree_sparsity:
            xs = sorted(agree_sparsity)
            ax1.plot([100 * x for x in xs], [100 * agree_sparsity[x] for x in xs], marker="o",
                     label="one-shot magnitude pruning, no fine-tune")
            ax1.legend(fontsize=7)
        ax1.set_xlabel("sparsity of prunable kernels (%)")
        ax1.set_ylabel(f"{measure} with dense (%)", fontsize=8)
        for s, pts in agree_bits.items():
            if pts:
                xs = sorted(pts)
                ax2.plot(xs, [100 * pts[x] for x in xs], marker="o", label=f"PTQ weights, {s}")
        ax2.set_xlabel("bits")
        ax2.invert_xaxis()
        ax2.legend(fontsize=7)
        fig.suptitle(f"{env}: agreement with the dense policy (mean over seeds)")
        save(fig, "agreement")
    return written


def continuous(r: dict) -> bool:
    """Whether an environment's agreement figures are the continuous measure (read from its JSON)."""
    return "within" in (get(r, "ptq", "agreement_measure") or get(r, "oneshot", "agreement_measure") or "")


def agree_cell(v: dict | None, cont: bool) -> str:
    """'IQM [CI] (agreement%)', with the mean action gap for continuous actions."""
    if not v:
        return "—"
    if "agreement" not in v:
        return fmt(v)
    gap = f", gap {100 * v['action_gap']:.2f}%" if cont and "action_gap" in v else ""
    return f"{fmt(v)} ({100 * v['agreement']:.1f}%{gap})"


TABLE_NOTE = (f"{TIE}: the environment cannot separate the two returns (both IQMs at the score ceiling, "
              f"CartPole-v1 {SCORE_CEILING['CartPole-v1']:g}; or a plateau: their 95% CIs overlap and both lie "
              "within the dense policy's CI); decided on agreement with the dense policy where both sides have one, "
              "else left a tie. Verdicts: `checks` in benchmarks/compression.py.")


def short_verdict(c: dict) -> str:
    """A per-point verdict in a few characters: (yes), (**no**), (tie), (tie; agreement: yes)."""
    v = c["verdict"]
    if "agreement" in c:
        return f"(tie; agreement: {'yes' if c['holds'] else '**no**'})"
    return {"yes": "(yes)", "no": "(**no**)", TIE: "(tie)"}[v]


def paper_table(result: dict) -> str:
    """One row per docs/architecture.md "Reference targets" claim, one column per environment: what we
    measured, each verdict printed beside its own figure and taken from `checks` (decided nowhere else)."""
    envs_ = list(result["envs"])

    def cell(env: str, kind: str) -> str:
        r = result["envs"][env]
        ck = checks(r, env)  # the verdicts of this code, also for a JSON whose stored checks are older
        if kind == "gradual90":
            c = ck.get("gradual90_keeps_95pct")
            if not c:
                return "not run"
            return f"{c['iqm']:.1f} vs dense {c['dense_iqm']:.1f} ({100 * c['ours']:.0f}%): {verdict_text(c)}"
        if kind == "curve":
            levels = sorted((get(r, "gradual", "levels") or {}).items(), key=lambda kv: float(kv[0]))
            return ", ".join(f"{100 * float(k):.0f}%: {v['iqm']:.0f}" for k, v in levels) or "not run"
        if kind == "wide":
            w, c = r.get("wide"), ck.get("wide_sparse_ge_small_dense")
            if not w:
                return "not run"
            if "wide_dense" not in w or not c:
                return "re-run"
            extra = (f"; actor-only pruning {w['wide_sparse_actor_only']['iqm']:.1f}"
                     if "wide_sparse_actor_only" in w else "")
            if c.get("budgets") == "erk":
                extra += f"; uniform budgets {fmt(w['wide_sparse'])}"
            label = "ERK " if c.get("budgets") == "erk" else ""
            return (f"{label}{fmt({'iqm': c['a'], 'ci95': c['a_ci95']})} vs {fmt(w['small_dense'])} (256-wide dense "
                    f"{w['wide_dense']['iqm']:.1f}{extra}): {verdict_text(c)}")
        if kind == "agree_curve":
            levels = get(r, "oneshot", "levels") or {}
            pts = sorted(((float(k), v["no_finetune"]) for k, v in levels.items()
                          if "agreement" in (v.get("no_finetune") or {})), key=lambda kv: kv[0])
            if levels and not pts:
                return "not measured (an older run)"
            return ", ".join(f"{100 * k:.0f}%: {100 * v['agreement']:.1f}%" for k, v in pts) or "not run"
        if kind == "bits_curve":
            ptq = get(r, "ptq", "results") or {}
            keys = sorted((k for k in ptq if k.startswith("uniform/")), key=lambda k: -int(k.split("/")[1]))
            return ", ".join(f"{k.split('/')[1]}: {ptq[k]['weights']['iqm']:.0f} "
                             f"({100 * ptq[k]['weights']['agreement']:.1f}%)" for k in keys) or "not run"
        if kind == "train_cost":
            c = ck.get("train_cost_le_125")
            if not c:
                return "not run"
            s, q = c["seconds"], c["iqm"]
            return (f"x{c['ours']:.2f} ({s['gradual90']:.1f}s vs {s['dense']:.1f}s); return {q['gradual90']:.1f} vs "
                    f"dense {q['dense']:.1f}: {verdict_text(c)}")
        if kind == "qat_cost":
            c = ck.get("kmeans_qat_cost_le_3")
            if not c:
                return "not run"
            worst = max(c["per_bits"], key=lambda b: c["per_bits"][b])
            s, q = c["seconds"][worst], c["iqm"][worst]
            return (f"worst x{c['ours']:.2f} at {worst} bits ({s['kmeans']:.1f}s vs {s['uniform']:.1f}s; return "
                    f"{q['kmeans']:.1f} vs {q['uniform']:.1f}); all: "
                    + ", ".join(f"{b}b x{v:.2f}" for b, v in c["per_bits"].items()) + f": {verdict_text(c)}")
        if kind == "int8":
            cw, ca = ck.get("int8_ptq_weights"), ck.get("int8_ptq_weights_act_minmax")
            if not cw:
                return "not run"
            w = get(r, "ptq", "results", "uniform/8", "weights")
            gap = f", gap {100 * w['action_gap']:.2f}% of range" if continuous(r) and "action_gap" in w else ""
            lo, hi = cw["ours"]["dense_ci"]
            text = (f"weights {cw['ours']['iqm']:.1f} in [{lo:.1f}, {hi:.1f}], {100 * cw['ours']['agreement']:.3f}% "
                    f"agree{gap}: {verdict_text(cw)}")
            if ca:
                text += (f"; W+A (minmax) {ca['ours']['iqm']:.1f}, {100 * ca['ours']['agreement']:.3f}% agree: "
                         f"{verdict_text(ca)}")
            return text
        if kind in ("qat_w", "qat_wa"):
            c = ck.get({"qat_w": "qat_ge_ptq_same_training", "qat_wa": "qat_ge_ptq_weights_and_activations"}[kind])
            if not c:
                return "not run"
            four = {k: v for k, v in c["per_point"].items() if k.endswith("/4")}
            fours = "; ".join(f"{k}: {v['a']:.1f} vs {v['b']:.1f} {short_verdict(v)}" for k, v in four.items())
            return f"4 bits: {fours}; all widths: {counts_text(c)}"
        if kind == "log4":
            c = ck.get("log4_ge_uniform4_ptq")
            if not c:
                return "not run"
            log4, uni4 = ({"iqm": c[s], "ci95": c[f"{s}_ci95"]} for s in ("a", "b"))
            return f"{fmt(log4)} vs {fmt(uni4)}: {verdict_text(c)}"
        if kind == "export":
            out = [f"{c['hidden']}: x{c['ours']:.1f}"
                   + (f" (min x{c['min_ratio']:.1f}, {100 * c['shipped_agreement']:.2f}% agree)"
                      if c.get("shipped_agreement") is not None else "") + f" {verdict_text(c)}"
                   for key in ("export_ratio_ge_20", "export_ratio_ge_20_wide") if (c := ck.get(key))]
            return "; ".join(out) or "not run"
        raise KeyError(kind)

    rows = [
        ("Graesser et al. 2022: 90% sparsity keeps >= 95% of dense return (gradual, IQM; Acrobot measured above -500, "
         f"Pendulum above {PENDULUM_FLOOR:.0f})", "gradual90"),
        ("return vs gradual sparsity (IQM)", "curve"),
        ("agreement vs one-shot magnitude sparsity (no fine-tune; mean agreement over seeds)",
         "agree_curve"),
        ("return (agreement) vs bits, uniform per-channel PTQ of the kernels", "bits_curve"),
        (f"Sparse training costs <= {TRAIN_COST_TARGET}x dense wall time (gradual to 90%, all seeds vmapped, median "
         "of 3; return IQM)", "train_cost"),
        ("Obando-Ceron et al. 2024: wide sparse >= small dense at equal non-zeros (ERK layer budgets, the default)",
         "wide"),
        ("QuaRL: int8 PTQ within the dense CI, >= 99% agreement (greedy action; continuous: mean action within 1% of "
         "the range)", "int8"),
        ("QuaRL: QAT >= PTQ (weights; PTQ of an equally long fine-tune)", "qat_w"),
        ("QuaRL: QAT >= PTQ (weights + activations)", "qat_wa"),
        ("QuaRL: 4-bit log >= 4-bit uniform (PTQ weights)", "log4"),
        (f"k-means QAT (trained weight sharing) costs <= {QAT_COST_TARGET:g}x uniform QAT's wall time, every bit "
         "width (median of 3; return IQM)", "qat_cost"),
        ("90% pruned + int8 export >= 20x smaller than dense float32 (actor file)", "export"),
    ]
    lines = ["| claim (paper, docs/architecture.md \"Reference targets\") | " + " | ".join(envs_) + " |",
             "|---" * (len(envs_) + 1) + "|"]
    for label, kind in rows:
        lines.append(f"| {label} | " + " | ".join(cell(e, kind) for e in envs_) + " |")
    lines += ["", TABLE_NOTE]
    return "\n".join(lines) + "\n"


def export_lines(ex: dict) -> list[str]:
    """The summary's export table: bytes and ratios per variant, and each shipped actor's return and
    agreement as read back from its artifact (older entries: the two int8 returns they stored)."""
    a, ac = ex["actor"], ex["actor_critic"]
    lines = [f"Export of the {tuple(ex['hidden'])} net, 90% gradual pruning (median over seeds; dense float32 "
             f"file: actor {a['dense_float32_bytes']} B, actor+critic {ac['dense_float32_bytes']} B; headline "
             f"`{ex.get('headline')}`). Float 90%-pruned policy: {fmt(ex['float_policy_return'])}. {ex.get('note', '')}",
             ""]
    shipped = ex.get("shipped")
    if shipped is None:
        lines += [f"Return (older run): int8 per tensor {fmt(ex['shipped_policy_return'])}, int8 per channel "
                  f"{fmt(ex['shipped_per_channel_return'])}.", ""]
    lines += ["| file | actor bytes | ratio (min over seeds) | actor+critic bytes | ratio | shipped actor: return "
              "(agreement) |", "|---|---|---|---|---|---|"]
    for k in ex["variants"]:
        lo = f" ({a[k]['min_ratio']:.1f})" if "min_ratio" in a[k] else ""
        ret = f"{fmt(shipped[k])} ({100 * shipped[k]['agreement']:.2f}%)" if shipped else "—"
        lines.append(f"| {k} | {a[k]['median_bytes']:.0f} | x{a[k]['median_ratio']:.1f}{lo} | "
                     f"{ac[k]['median_bytes']:.0f} | x{ac[k]['median_ratio']:.1f} | {ret} |")
    bd = (ex.get("breakdown_seed0") or {}).get(ex.get("headline", ""))
    if bd:
        fixed = {k: v for k, v in bd.items() if k not in ("total", "leaves")}
        lines += ["", f"Where the headline file's {bd['total']} B go (seed 0): "
                  + ", ".join(f"{k} {v} B" for k, v in fixed.items()) + "; per leaf: "
                  + ", ".join(f"{k} {v['bytes']} B" for k, v in bd["leaves"].items()) + "."]
    lines.append("")
    return lines


def provenance_text(entry: dict) -> str:
    """'abc1234567 (dirty tree: 3 paths) `command` (start to end)' of an experiment's result."""
    pv = entry.get("provenance")
    if not pv:
        return "provenance not recorded (older run)"
    commit = (pv.get("commit") or "unknown commit")[:10]
    dirty = {True: f" (dirty tree: {pv.get('dirty_count')} paths)", False: " (clean tree)"}.get(pv.get("dirty"), "")
    return f"{commit}{dirty} `{pv['command']}` ({pv['started_utc']} to {pv['finished_utc']})"


def provenance_lines(r: dict) -> str:
    """Per experiment of an environment: commit, dirty flag and command (older entries grouped)."""
    names = [n for n in EXPERIMENTS if isinstance(r.get(n), dict)]
    recorded = [f"{n}: {provenance_text(r[n])}" for n in names if r[n].get("provenance")]
    older = [n for n in names if not r[n].get("provenance")]
    parts = recorded + ([f"{', '.join(older)}: provenance not recorded (older run)"] if older else [])
    return ("Provenance per experiment (commit when its invocation started, whether the tree differed from it, "
            "command): " + "; ".join(parts) + ".")


def summary_markdown(result: dict) -> str:
    lines = [f"# Compression benchmark ({result['hardware']['cpu_model']}, {result['timestamp_utc']})", "",
             f"Greedy return, IQM over {result['settings']['seeds']} seeds of the per-seed "
             f"mean over {result['settings']['eval_episodes']} episodes, [95% stratified bootstrap CI]. Every number was "
             f"measured by the invocations each environment lists below (JSON: `{result['json']}`; latest: "
             f"`{result['command']}`). Paper figures: docs/architecture.md \"Reference targets\".", "",
             "Activation quantization, as it ran: PTQ W+A (`ptq`) quantizes the input of every Dense layer with one "
             "static range per layer (per tensor), calibrated per seed on dense-policy rollouts (minmax or "
             "percentile); QAT W+A and the PTQ it is compared with (`qat_act`) use dynamic ranges, measured in "
             "every forward pass: one per sample (each observation's own Dense-input features) unless the "
             "environment's section says otherwise.", "",
             paper_table(result), ""]
    for env, r in result["envs"].items():
        st = r.get("settings", {})
        lines += [f"## {env}", "",
                  f"PPO {st.get('config_summary', '')}; budget {st.get('total_timesteps')} env steps per run, "
                  f"fine-tune {st.get('finetune_steps')} steps. Measured by: "
                  + "; ".join(f"`{x['command']}` ({x['started_utc']}{', ' + x['interrupted'] if 'interrupted' in x else ''})"
                              for x in r.get("runs", [])) + ". Wall time per experiment: "
                  + ", ".join(f"{k} {v:.0f}s" for k, v in (r.get("wall_s") or {}).items()), "",
                  provenance_lines(r), ""]
        if r.get("errors"):
            lines += [f"Failed experiments: {', '.join(r['errors'])} (see JSON).", ""]
        dense = r.get("dense")
        cont = continuous(r)
        measure = get(r, "ptq", "agreement_measure") or get(r, "oneshot", "agreement_measure")
        if measure:
            lines += [f"Agreement (in parentheses): {measure.split(' of the pruned')[0]} with the dense policy, on "
                      f"{get(r, 'ptq', 'agreement_obs_per_seed') or get(r, 'oneshot', 'agreement_obs_per_seed')} states per "
                      "seed visited by the dense policy"
                      + ("; gap: mean |difference| of the clipped mean actions, % of the action range." if cont else "."), ""]
        lines += ["| sparsity | gradual | one-shot (no FT; agree) | one-shot + FT | lottery ticket |", "|---|---|---|---|---|"]
        levels = sorted({float(k) for src in ("gradual", "oneshot", "lottery") for k in (get(r, src, "levels") or {})})
        for lv in levels:
            k = str(lv)
            lines.append(f"| {100 * lv:.0f}% | {fmt(get(r, 'gradual', 'levels', k))} | "
                         f"{agree_cell(get(r, 'oneshot', 'levels', k, 'no_finetune'), cont)} | "
                         f"{fmt(get(r, 'oneshot', 'levels', k, 'finetune'))} | "
                         f"{fmt(get(r, 'lottery', 'levels', k))} |")
        lines += ["", f"Dense: {fmt(dense)}.", ""]
        ptq, qat = get(r, "ptq", "results") or {}, get(r, "qat", "results") or {}
        if ptq or qat:
            ctl = get(r, "qat", "control_ptq") or {}
            lines += ["| scheme / bits | PTQ W (agree) | PTQ W+A minmax (agree) | PTQ W+A pct (agree) | QAT W (fine-tune) "
                      "| PTQ W of the same fine-tune without QAT |", "|---|---|---|---|---|---|"]
            for key in sorted(set(ptq) | set(qat), key=lambda k: (k.split("/")[0], -int(k.split("/")[1]))):
                def cell(v):
                    return agree_cell(v, cont)
                lines.append(f"| {key} | {cell(get(ptq, key, 'weights'))} | {cell(get(ptq, key, 'weights_act_minmax'))} | "
                             f"{cell(get(ptq, key, 'weights_act_percentile'))} | {cell(qat.get(key))} | "
                             f"{cell(ctl.get(key))} |")
            if get(r, "qat", "control_finetune_dense"):
                lines.append(f"\nThe QAT fine-tune without quantization (control), float32: {fmt(get(r, 'qat', 'control_finetune_dense'))}.")
            lines.append("")
        qa = get(r, "qat_act", "results") or {}
        if qa:
            mode = get(r, "qat_act", "activation_range")
            ranges = (ACT_RANGE_TEXT[mode] if mode else
                      f"{ACT_RANGE_TEXT['sample']}; not recorded in this older entry: the default of "
                      "`CompressConfig.qat_activation_range` and of this benchmark's evaluator since commit a119fce, "
                      "which predates every stored qat_act run")
            lines += [f"Weights and activations (kernels per tensor; Dense inputs: {ranges}), "
                      f"QAT fine-tune of {get(r, 'qat_act', 'finetune_steps')} steps vs PTQ:", "",
                      "| scheme / bits | QAT W+A | PTQ W+A of the dense policy | PTQ W+A of the same fine-tune without QAT |",
                      "|---|---|---|---|"]
            for key in sorted(qa, key=lambda k: (k.split("/")[0], -int(k.split("/")[1]))):
                v = qa[key]
                lines.append(f"| {key} | {fmt(v['qat'])} | {fmt(v['ptq_dense'])} | {fmt(v['ptq_control'])} |")
            lines.append("")
        w = r.get("wide")
        if w:
            lines += [f"Wide-sparse {tuple(w['wide_sparse']['hidden'])} at 90% ({w['wide_sparse']['actor_torso_nonzero_kernel_weights']} "
                      f"non-zero actor-torso weights): {fmt(w['wide_sparse'])}; small-dense {tuple(w['small_dense']['hidden'])} "
                      f"({w['small_dense']['actor_torso_nonzero_kernel_weights']}): {fmt(w['small_dense'])}"
                      + (f"; the same wide net dense: {fmt(w['wide_dense'])}" if "wide_dense" in w else "")
                      + (f"; the wide net with only the actor pruned (critic dense): {fmt(w['wide_sparse_actor_only'])}"
                         if "wide_sparse_actor_only" in w else "")
                      + (f"; ERK layer budgets ({w['wide_sparse_erk']['actor_torso_nonzero_kernel_weights']}): "
                         f"{fmt(w['wide_sparse_erk'])}" if "wide_sparse_erk" in w else "") + ".", ""]
            diag = [(k, w[k]) for k in ("wide_sparse", "wide_sparse_erk", "wide_sparse_actor_only", "wide_dense",
                                        "small_dense") if "final_value_loss_per_run" in w.get(k, {}).get("timing", {})]
            if diag:
                lines += ["| wide-sparse diagnostics | min return over seeds | critic's final value loss (median, max "
                          "over seeds) | first-layer units without input (actor, critic) |", "|---|---|---|---|"]
                for k, v in diag:
                    vl = np.asarray(v["timing"]["final_value_loss_per_run"])
                    dead = v.get("inputless_first_layer_units")
                    dead_text = f"{100 * dead['actor_torso']:.0f}%, {100 * dead['critic_torso']:.0f}%" if dead else "0 (dense)"
                    lines.append(f"| {k} | {v['min']:.0f} | {np.median(vl):.2f}, {vl.max():.2f} | {dead_text} |")
                lines.append("")
        for ex in (r.get("export"), get(r, "export", "wide")):
            if not ex:
                continue
            lines += export_lines(ex)
        c = r.get("cost")
        if c:
            lines += ["| policy forward | params | non-zeros | FLOPs | latency b=1 (µs), median (min-max) "
                      "| latency b=256 (µs), median (min-max) |", "|---|---|---|---|---|---|"]
            for name, v in c["variants"].items():
                lat = [get(v, "latency_us", f"batch{b}") or v.get(f"latency_us_batch{b}") for b in (1, 256)]
                lines.append(f"| {name} | {v['params']} | {v['nonzeros']} | {v['flops_per_forward']} | "
                             f"{latency_text(lat[0])} | {latency_text(lat[1])} |")
            old = not any("latency_us" in v for v in c["variants"].values())
            note = c["note"][0].upper() + c["note"][1:]
            lines += ["", note if not old else
                      (f"{note} (an older run, single measurement per variant: the variants did not "
                       "alternate, and the dense and fake-quant-in-forward variants were given host (numpy) "
                       "parameters, copied to the device on every call, the others device arrays). "
                       f"{LATENCY_NOTE[0].upper()}{LATENCY_NOTE[1:]}"),
                      "", f"Shrink 50% (no fine-tune) return: {fmt(c['shrink_50_return_no_finetune'])}.", ""]
        ck = checks(r, env)
        if ck:
            lines += ["| target (paper) | ours | verdict |", "|---|---|---|"]
            for name, v in ck.items():
                ours = v.get("ours")
                if isinstance(ours, float):
                    ours = f"{ours:.3f}"
                elif isinstance(ours, dict):
                    ours = ", ".join(f"{k}={x:.3f}" if isinstance(x, float) else f"{k}={x}" for k, x in ours.items())
                else:
                    ours = "; ".join(f"{k}: {v2['names'][0]} {v2['a']:.1f} vs {v2['names'][1]} {v2['b']:.1f} "
                                     f"{short_verdict(v2)}" for k, v2 in v["per_point"].items())
                verdict = f"{verdict_text(v)} ({counts_text(v)})" if "per_point" in v else verdict_text(v)
                lines.append(f"| {name}: {v['target']} | {ours} | {verdict} |")
            lines.append("")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", nargs="+", default=["CartPole-v1"], choices=sorted(ENV_SETTINGS))
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="tiny budgets (smoke test)")
    p.add_argument("--experiments", nargs="+", choices=ALL_EXPERIMENTS, default=None,
                   help="run only these (default: each env's list); results merge into an existing JSON")
    p.add_argument("--total-timesteps", type=int, default=None, help="override the env's training budget")
    p.add_argument("--finetune-steps", type=int, default=None)
    p.add_argument("--eval-episodes", type=int, default=None, help="greedy episodes per seed (default 32; quick 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--summary-only", action="store_true",
                   help="run nothing: rewrite the summary, checks and plots from the existing JSON")
    p.add_argument("--markdown", action="store_true", help="print README's table from the JSON and exit (runs nothing)")
    p.add_argument("--summary", type=Path, default=None, help="markdown summary (default results/compression_summary.md; not written with --quick)")
    return p.parse_args(argv)


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def main(argv=None) -> dict:
    args = parse_args(argv)
    hw = cpu_info()
    slug = cpu_short_name(hw["cpu_model"])
    out_path = args.out or RESULTS / f"compression_{slug}{'_quick' if args.quick else ''}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out_path.read_text()) if out_path.exists() else {}
    if args.markdown:
        print(paper_table(previous), end="")
        return previous
    started = dt.datetime.now(dt.timezone.utc)
    argv_list = list(argv) if argv is not None else sys.argv[1:]
    # the code this invocation imported (others may edit or commit while it runs)
    git0 = git_state(max_paths=20) or {"commit": None, "dirty": None, "dirty_count": None, "dirty_paths": []}
    result = {
        "benchmark": "compression",
        "timestamp_utc": started.isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/compression.py"] + argv_list),
        "json": str(out_path.relative_to(REPO)) if out_path.is_relative_to(REPO) else str(out_path),
        "hardware": hw, "backend": jax.default_backend(), "jax_environment": jax_environment(),
        "versions": local_versions(),
        "settings": {"seeds": args.seeds, "quick": args.quick, "seed": args.seed,
                     "eval_episodes": args.eval_episodes or (8 if args.quick else 32),
                     "score": "IQM over seeds of per-seed mean greedy return; 95% percentile bootstrap, 2000 resamples of seeds, seed 0",
                     "gradual_schedule": GRADUAL},
        "envs": previous.get("envs", {}),
        "targets": {"source": "docs/architecture.md, Reference targets", **TARGETS},
    }
    eval_eps = result["settings"]["eval_episodes"]
    if args.summary_only:
        result = previous
        for env_name, r in result["envs"].items():
            r["checks"] = checks(r, env_name)
            prefix = out_path.parent / f"{out_path.stem}_{env_name.replace('-', '_').lower()}"
            r["plots"] = [str(Path(x).relative_to(REPO)) if Path(x).is_relative_to(REPO) else x
                          for x in plot(env_name, r, prefix)]
        out_path.write_text(json.dumps(_jsonable(result), indent=1) + "\n")
        args.envs = []

    def save():
        result["finished_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        for env_name, r in result["envs"].items():
            r["checks"] = checks(r, env_name)
        tmp = out_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_jsonable(result), indent=1) + "\n")
        os.replace(tmp, out_path)

    log(f"{hw['cpu_model']}, {hw['logical_cores']} cores; envs={args.envs} seeds={args.seeds} quick={args.quick}; "
        f"load average {loadavg()}")
    for env in args.envs:
        st = ENV_SETTINGS[env]
        total = args.total_timesteps or (QUICK["total"] if args.quick else st["total"])
        finetune = args.finetune_steps or (QUICK["finetune"] if args.quick else st["finetune"])
        config = make_config(env, st, total)
        hparams = ppo.PPOHParams(**st["hparams"])
        r = result["envs"].setdefault(env, {})
        ctx = Ctx(env=env, n_seeds=args.seeds, total=total, finetune=finetune, eval_episodes=eval_eps,
                  sparsities=QUICK["sparsities"] if args.quick else st["sparsities"],
                  bits=QUICK["bits"] if args.quick else st["bits"],
                  schemes=QUICK["schemes"] if args.quick else st["schemes"],
                  qat_schemes=QUICK["schemes"] if args.quick else st.get("qat_schemes", st["schemes"]),
                  config=config, hparams=hparams, seed=args.seed, save=save, results=r)
        r["settings"] = {"config": dataclasses.asdict(config), "hparams": st["hparams"], "total_timesteps": total,
                         "finetune_steps": finetune, "sparsities": ctx.sparsities, "bits": ctx.bits,
                         "schemes": ctx.schemes, "qat_schemes": ctx.qat_schemes,
                         "config_summary": f"{config.num_envs} envs x {config.num_steps} steps, {config.update_epochs} epochs, "
                                           f"{config.num_minibatches} minibatches, {config.net.torso} {config.net.hidden} "
                                           f"{config.net.activation}, lr {st['hparams']['lr']}"}
        r.setdefault("wall_s", {})
        r.setdefault("errors", [])
        r.setdefault("runs", []).append({"command": result["command"], "started_utc": result["timestamp_utc"],
                                         "experiments": list(args.experiments or st["experiments"])})
        todo = [e for e in (args.experiments or st["experiments"])]
        log(f"== {env}: {todo}; {total} steps per run, fine-tune {finetune}")
        for name in todo:
            t = Timer()
            started_e = utc_now()
            try:
                r[name] = EXPERIMENTS[name](ctx)
                r[name]["provenance"] = {**git0, "git_state_at": "invocation start (the code it imported)",
                                         "command": shlex.join(["python", "benchmarks/compression.py", *argv_list]),
                                         "started_utc": started_e, "finished_utc": utc_now()}
                r["errors"] = [e for e in r["errors"] if e != name]
                r.pop(f"{name}_error", None)
            except Exception as e:  # record, keep going with the next experiment
                traceback.print_exc()
                r[f"{name}_error"] = f"{type(e).__name__}: {e}"
                if name not in r["errors"]:
                    r["errors"].append(name)
            r["wall_s"][name] = t()
            log(f"{env} {name} done in {t():.0f}s")
            save()
        prefix = out_path.parent / f"{out_path.stem}_{env.replace('-', '_').lower()}"
        r["plots"] = [str(Path(x).relative_to(REPO)) if Path(x).is_relative_to(REPO) else x for x in plot(env, r, prefix)]
        save()
    md = summary_markdown(result)
    summary_path = args.summary or (out_path.parent / ("compression_summary_quick.md" if args.quick else "compression_summary.md"))
    summary_path.write_text(md)
    print()
    print(md)
    log(f"wrote {out_path} and {summary_path}")
    return result


if __name__ == "__main__":
    main()
