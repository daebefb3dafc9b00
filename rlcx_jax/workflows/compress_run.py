"""Post-training compression of a trained run (what `rlcx compress` does), for every seed of the run.

prune (unstructured magnitude, N:M) and/or shrink (structured, physically smaller network), then
quantize weights (and optionally activations, calibrated on observations from the original policy's
rollouts), evaluate the return, measure action agreement with the original policy
(`nets.policy.action_agreement`: greedy-action equality for discrete actions, executed mean actions
within 1% of the action range for continuous ones, beside the mean action gap), export one artifact
file per seed and check that the loaded artifact acts exactly like the evaluated policy.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlcx_jax import envs, nets, rl
from rlcx_jax.compress import export as export_lib
from rlcx_jax.compress import masks as masks_lib
from rlcx_jax.compress import quant, size, structured
from rlcx_jax.configs.compress import QUANT_FORMAT as QUANT_FORMAT
from rlcx_jax.configs.compress import CompressOptions as CompressOptions
from rlcx_jax.configs.compress import parse_quant as parse_quant
from rlcx_jax.envs.normalize import normalize_observation
from rlcx_jax.nets.policy import action_agreement, action_gap, greedy_action
from rlcx_jax.rl import rollout
from rlcx_jax.rl.common import batched_learner
from rlcx_jax.rl.evaluate import default_greedy, make_evaluator
from rlcx_jax.seams import Hooks, make_apply
from rlcx_jax.workflows import recipes

Params = Any

QUANT_INCLUDE = (r".*kernel", r".*bias")
"""What post-training quantization quantizes: kernels and biases."""

__all__ = ["CompressOptions", "parse_quant", "Variant", "compress_run", "policy_forward", "seed_slice"]


class Variant(NamedTuple):
    """One row of the comparison table (per-seed arrays have a leading seed axis)."""

    name: str
    returns: np.ndarray  # (seeds, episodes)
    agreement: np.ndarray  # (seeds,) action agreement with the original policy (`action_agreement`)
    gap: np.ndarray  # (seeds,) mean action gap to the original policy (`action_gap`, a fraction of the range)
    params: int
    nonzeros: int
    artifact_bytes: float  # mean over seeds
    flops: int
    latency_s: float
    export_exact: bool


def seed_slice(tree: Any, i: int) -> Any:
    """Seed `i` of a seed-batched tree (every leaf's leading axis); None stays None."""
    return None if tree is None else jax.tree.map(lambda x: x[i], tree)


def policy_observations(
    trainer: Any, state: Any, greedy: bool, num_envs: int, num_steps: int, key: jax.Array
) -> jax.Array:
    """(seeds, num_envs * num_steps, *obs) raw observations visited by each seed's original policy."""
    config = trainer.config
    env, env_params = envs.make_training_env(config.env, config.env_kwargs)

    def one(params: Params, stats: Any, k: jax.Array) -> jax.Array:
        k_reset, k_run = jax.random.split(k)
        runner = rollout.reset(env, env_params, k_reset, num_envs)

        def policy_fn(kk: jax.Array, obs: jax.Array) -> tuple[jax.Array, None]:
            return trainer.act(params, stats, obs, kk, greedy), None

        _, traj = rollout.collect(env, env_params, policy_fn, runner, k_run, num_steps)
        return traj.obs.reshape((-1,) + traj.obs.shape[2:])

    n = jax.tree.leaves(state.params)[0].shape[0]
    return jax.jit(jax.vmap(one))(state.params, state.obs_stats, jax.random.split(key, n))


def policy_forward(network: Any, hooks: Hooks, spec: Any):
    """Greedy actions of `network` through `hooks` (every registered head has a `policy` method)."""
    apply = make_apply(network, hooks)

    def forward(params: Params, obs: jax.Array) -> jax.Array:
        return greedy_action(apply(params, obs, method="policy"), spec)

    return forward


def compress_run(
    algorithm: str,
    config: Any,
    state: Any,
    options: CompressOptions,
    out_dir: pathlib.Path,
    num_episodes: int = 32,
    seed: int = 0,
) -> list[Variant]:
    """Compress every seed of a trained (vmapped) `state`; returns [original, compressed] rows."""
    options.validate()
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = rl.make(algorithm, config)
    agent = trainer.agent
    head, spec, obs_shape = config.HEAD, agent.spec, agent.obs_shape
    layout = nets.layout(config.net, head)
    include = layout.patterns(options.roles, options.include)
    key = jax.random.PRNGKey(seed + 20_000)
    obs = policy_observations(trainer, state, default_greedy(algorithm), num_envs=16, num_steps=256, key=key)
    params = state.params
    n_seeds = jax.tree.leaves(params)[0].shape[0]
    normalize = bool(getattr(config, "normalize_obs", False))

    def prep(i: int, x: jax.Array) -> jax.Array:
        return normalize_observation(seed_slice(state.obs_stats, i), x) if normalize else x

    # -- 1. structured shrinking (a smaller network) ---------------------------------------------
    net_config = config.net
    if options.structured:
        shrunk = [
            structured.shrink(seed_slice(params, i), config.net, options.structured, head=head) for i in range(n_seeds)
        ]
        net_config = shrunk[0][1]
        params = jax.tree.map(lambda *xs: jnp.stack(xs), *[p for p, _ in shrunk])
    small_config = dataclasses.replace(config, net=net_config)

    # -- 2. unstructured / N:M masks -------------------------------------------------------------
    masks = None
    if options.prune or options.nm:

        def seed_masks(p: Params) -> Params:
            m = masks_lib.ones_masks(p)
            if options.prune:
                m = masks_lib.magnitude_masks(p, options.prune, options.distribution, include, options.exclude)
            if options.nm:
                n, mm = options.nm_pair()
                m = jax.tree.map(
                    jnp.logical_and, m, masks_lib.nm_masks(p, n, mm, include=include, exclude=options.exclude)
                )
            return m

        masks = jax.vmap(seed_masks)(params)
        if options.finetune_steps:
            params, masks = _finetune(algorithm, small_config, state, params, masks, options.finetune_steps, seed)

    # -- 3. weight quantization (fake-quantized floats = what the artifact holds) ----------------
    qspec = parse_quant(options.quant, options.activations, options.per_channel) if options.quant else None
    compressed, floats = [], []
    fold = masks is not None and options.fold_dead_units and net_config.torso in structured.SHRINKABLE_TORSOS
    for i in range(n_seeds):
        p, m = seed_slice(params, i), (None if masks is None else seed_slice(masks, i))
        if fold:  # only creates zeros, so the masks stay valid
            p = structured.fold_dead_units(masks_lib.apply_masks(p, m), net_config, head=head)
        floats.append(p)  # what export encodes: quantizing once, from the float weights
        if qspec is not None:
            p = quant.quantize_tree(p, qspec, include=QUANT_INCLUDE, masks=m)
        elif m is not None:
            p = masks_lib.apply_masks(p, m)
        compressed.append(p)

    # -- 4. activation calibration, evaluation, agreement, export -------------------------------
    network = nets.make(net_config, obs_shape, spec, head=head)
    evaluator_greedy = default_greedy(algorithm)
    returns, agreement, gap, sizes, exact = [], [], [], [], True
    original_forward = jax.jit(policy_forward(agent.network, Hooks(), spec))
    for i, p in enumerate(compressed):
        hooks = Hooks()
        if options.activations and qspec is not None:
            calib_obs = prep(i, obs[i][:2048])
            ranges = quant.calibrate(make_apply(network), p, calib_obs, qspec)
            hooks = Hooks(interceptor=quant.activation_interceptor(qspec, ranges))
        trainer_c = rl.make(algorithm, small_config, hooks)
        evaluator = jax.jit(make_evaluator(trainer_c, num_episodes, evaluator_greedy))
        eval_key = jax.random.fold_in(jax.random.PRNGKey(seed + 10_000), i)
        returns.append(np.asarray(evaluator(p, seed_slice(state.obs_stats, i), eval_key)))
        forward = jax.jit(policy_forward(network, hooks, spec))
        x = prep(i, obs[i])
        a_orig = np.asarray(original_forward(seed_slice(state.params, i), x))
        a_new = np.asarray(forward(p, x))
        agreement.append(float(action_agreement(a_new, a_orig, spec)))
        gap.append(float(action_gap(a_new, a_orig, spec)))
        path = out_dir / f"seed_{i}.rlcx"
        sizes.append(
            export_lib.export(  # the float weights: quantizing the fake-quantized `p` again can move values
                floats[i],
                path,
                masks=None if masks is None else seed_slice(masks, i),
                qspec=qspec,
                include=QUANT_INCLUDE,
                net_config=net_config,
                obs_shape=obs_shape,
                action_spec=spec,
                head=head,
                meta={"algorithm": algorithm, "env": config.env, "seed": i, "options": dataclasses.asdict(options)},
            )
        )
        loaded = export_lib.load(path)  # the file holds exactly the evaluated weights
        exact &= export_lib.same_parameters(loaded.params, p)
        if not options.activations:  # with activation quantization the policy also needs the hooks
            exact &= bool(np.array_equal(np.asarray(loaded.policy(x)), a_new))

    # -- 5. the table rows -------------------------------------------------------------------------
    paths = layout.prefixes("policy")
    batch1 = obs[0][:1]
    dense_bytes = export_lib.dense_float32_bytes(
        seed_slice(state.params, 0), net_config=config.net, obs_shape=obs_shape, action_spec=spec, head=head
    )
    dense_count = size.count(seed_slice(state.params, 0), 32, paths)
    original = Variant(
        name="original (float32)",
        returns=np.asarray(_eval_original(algorithm, config, state, num_episodes, seed)),
        agreement=np.ones(n_seeds),
        gap=np.zeros(n_seeds),
        params=dense_count.params,
        nonzeros=dense_count.nonzeros,
        artifact_bytes=float(dense_bytes),
        flops=size.flops_per_forward(seed_slice(state.params, 0), obs_shape, paths),
        latency_s=size.measure_latency(original_forward, seed_slice(state.params, 0), batch1),
        export_exact=True,
    )
    c0 = compressed[0]
    small_paths = nets.layout(net_config, head).prefixes("policy")
    c_count = size.count(c0, qspec.bits if qspec else 32, small_paths)
    new = Variant(
        name="compressed",
        returns=np.stack(returns),
        agreement=np.asarray(agreement),
        gap=np.asarray(gap),
        params=c_count.params,
        nonzeros=c_count.nonzeros,
        artifact_bytes=float(np.mean(sizes)),
        flops=size.flops_per_forward(c0, obs_shape, small_paths),
        latency_s=size.measure_latency(jax.jit(policy_forward(network, Hooks(), spec)), c0, batch1),
        export_exact=exact,
    )
    return [original, new]


def _finetune(
    algorithm: str, config: Any, state: Any, params: Params, masks: Params, timesteps: int, seed: int
) -> tuple[Params, Params]:
    """Train the masked parameters on for `timesteps` env steps per seed with the mask fixed."""
    trainer = rl.make(algorithm, recipes.fixed_mask_config(config, timesteps))
    n = jax.tree.leaves(params)[0].shape[0]
    keys = jax.random.split(jax.random.PRNGKey(seed + 30_000), n)
    fresh = jax.jit(jax.vmap(trainer.init))(keys, state.hparams)
    start = recipes.replace_masks(fresh.with_params(masks_lib.apply_masks(params, masks)), masks)
    start = start.replace(obs_stats=state.obs_stats)
    final, _ = batched_learner(trainer)(start, trainer.num_updates)
    return final.params, masks


def _eval_original(algorithm: str, config: Any, state: Any, num_episodes: int, seed: int) -> np.ndarray:
    trainer = rl.make(algorithm, config)
    evaluator = jax.jit(make_evaluator(trainer, num_episodes, default_greedy(algorithm)))
    n = jax.tree.leaves(state.params)[0].shape[0]
    return np.stack(
        [
            np.asarray(
                evaluator(
                    seed_slice(state.params, i),
                    seed_slice(state.obs_stats, i),
                    jax.random.fold_in(jax.random.PRNGKey(seed + 10_000), i),
                )
            )
            for i in range(n)
        ]
    )
