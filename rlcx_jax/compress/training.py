"""Compression during training as an extension (`rlcx_jax.seams.Extension`): adding
`CompressConfig(...)` to any algorithm config's `extensions` turns it into sparse training or
quantization-aware training, without the algorithm naming it (docs/architecture.md, "Extensions").

    config = ppo.PPOConfig(extensions=(CompressConfig(prune_schedule="gradual"),))
    hparams = ppo.PPOHParams().with_ext("compress", CompressHParams(sparsity=0.9))

* **Pruning** is an optax transformation placed after the optimizer (`Hooks.post_update`). It keeps a
  mask tree in its state (so the masks are part of the training state, `find_masks(state)`), and
  rewrites the final update so that `params + update` is zero wherever the mask is off. Masking
  the gradient before Adam would not be enough: Adam's moments keep moving a weight whose gradient
  is zero. The target sparsity is the traced hyperparameter `hparams.ext["compress"].sparsity`, so a
  sweep over sparsity levels is one more `vmap`. Which weights may be pruned is chosen by role in
  the network's own layout (`prune_roles`, default: the torsos' kernels, never the output heads),
  refined by path regexes.
  Schedules (`CompressConfig.prune_schedule`):
    - "gradual": Zhu & Gupta (2017), s_t = s_f (1 - (1 - p_t)^3) with p_t the fraction of the way
      from `prune_start` to `prune_end` (fractions of all optimizer steps), masks recomputed by
      magnitude every `prune_every` steps and fixed after `prune_end`.
  Layer budgets (`prune_distribution`) default to ERK (Evci et al. 2020), which Graesser et al.
  (2022) found better than uniform budgets for sparse RL agents.
    - "oneshot": prune to s_f by magnitude once, at `prune_start`, then train with the mask fixed.
    - "fixed": the zeros of the parameters training starts from stay zero (lottery-ticket
      retraining and fine-tuning of an already pruned network, see `recipes.py`).
* **QAT** (`qat_bits > 0`): the forward pass sees fake-quantized weights (`Hooks.param_transform`)
  and, optionally, fake-quantized layer inputs (`Hooks.interceptor`), with straight-through
  gradients (`quant.py`).
* **k-means QAT** (`qat_scheme="kmeans"`, Han et al. 2016's trained weight sharing) would re-fit a
  codebook in every forward pass that way (16 Lloyd steps per call: ~90x the wall time of uniform
  QAT). Instead the shared weights are the parameters themselves: `kmeans_qat_transform` keeps the
  float ("latent") weights, the frozen cluster of every weight and the codebook in the optimizer
  state; each optimizer step adds the update to the latent weights (the gradient was taken at the
  shared weights: a straight-through estimator), moves every centroid to the mean of its cluster's
  latent weights (training the centroids), re-assigns the clusters by a few warm-started Lloyd
  steps every `qat_recluster_every` steps, and `Hooks.project_params` writes
  `centroid[cluster]` back into the parameters exactly.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rlcx_jax import nets
from rlcx_jax.compress import masks as masks_lib
from rlcx_jax.compress import quant
from rlcx_jax.configs.compress import DEFAULT_PRUNE_INCLUDE as DEFAULT_PRUNE_INCLUDE
from rlcx_jax.configs.compress import DEFAULT_PRUNE_ROLES as DEFAULT_PRUNE_ROLES
from rlcx_jax.configs.compress import PRUNE_SCHEDULES as PRUNE_SCHEDULES
from rlcx_jax.configs.compress import QAT_INCLUDE, CompressConfig, CompressHParams
from rlcx_jax.seams import BuildContext, Hooks

RANKING_SCOPE = "prune_mask_ranking"

Params = Any

__all__ = [
    "PRUNE_SCHEDULES",
    "CompressConfig",
    "CompressHParams",
    "PruneState",
    "zhu_gupta_sparsity",
    "prune_transform",
    "prune_selection",
    "find_masks",
    "KMeansQATState",
    "kmeans_qat_transform",
    "kmeans_project",
]


def compress_hooks(config: CompressConfig, ctx: BuildContext) -> Hooks:
    """The pruning transformation after the optimizer (its target sparsity read from this
    extension's traced hyperparameters) and QAT's weight and activation fake-quantization."""
    include = prune_selection(config, nets.layout_of(ctx.network)) if config.prunes else ()
    steps = ctx.optimizer_steps

    def post_update(hparams: CompressHParams) -> optax.GradientTransformation:
        prune = prune_transform(config, hparams.sparsity, steps, include) if config.prunes else None
        if config.shares_weights:
            return kmeans_qat_transform(config, prune)
        assert prune is not None  # installed only when pruning or sharing weights
        return prune

    hooks = Hooks()
    if config.prunes or config.shares_weights:
        hooks = Hooks(post_update=post_update, project_params=kmeans_project if config.shares_weights else None)
    if config.qat_bits:
        spec = config.qat_spec()
        qat = Hooks(
            param_transform=(
                None if config.shares_weights else quant.weight_param_transform(spec, include=QAT_INCLUDE, exclude=())
            ),
            interceptor=(
                quant.activation_interceptor(spec, dynamic=config.qat_activation_range)
                if config.qat_activations
                else None
            ),
        )
        hooks = hooks.merge(qat)
    return hooks


def prune_selection(config: CompressConfig, layout: nets.Layout) -> tuple[str, ...]:
    """Include regexes of the prunable weights: `config.prune_include` within `config.prune_roles`
    of the network's layout (combine with `config.prune_exclude`)."""
    return layout.patterns(config.prune_roles, config.prune_include)


# ----------------------------------------------------------------------------------------------
# The pruning schedule and transformation
# ----------------------------------------------------------------------------------------------
def zhu_gupta_sparsity(step: jax.Array, final: jax.Array | float, start: int, end: int) -> jax.Array:
    """Sparsity at optimizer step `step` (Zhu & Gupta 2017, eq. 1 with initial sparsity 0):
    s_t = s_f (1 - (1 - p)^3), p = clip((t - start) / (end - start), 0, 1)."""
    span = max(end - start, 1)
    p = jnp.clip((jnp.asarray(step, jnp.float32) - start) / span, 0.0, 1.0)
    return jnp.asarray(final, jnp.float32) * (1.0 - (1.0 - p) ** 3)


class PruneState(NamedTuple):
    """Optimizer-state part of pruning: the step count and the current masks (True = kept)."""

    step: jax.Array
    masks: Params


def _step_bounds(config: CompressConfig, total_steps: int) -> tuple[int, int]:
    start = int(round(config.prune_start * total_steps))
    end = max(int(round(config.prune_end * total_steps)), start)
    return start, end


def prune_transform(
    config: CompressConfig,
    sparsity: jax.Array | float,
    total_steps: int,
    include: tuple[str, ...] = DEFAULT_PRUNE_INCLUDE,
) -> optax.GradientTransformation:
    """Keep pruned weights at exactly zero; update the masks on `config.prune_schedule`.

    Must come last in the optimizer chain: it receives the final updates `u` and the current
    `params` and returns `where(mask, u, -params)`, so that the new parameters are
    `where(mask, params + u, 0)`. Mask updates rank `params + u` by magnitude, so weights that are
    already zero are pruned first and the pruned set only grows. `include` selects the prunable
    weights (`prune_selection` gives the role-based default), `config.prune_exclude` removes some.
    """
    config.validate()
    start, end = _step_bounds(config, total_steps)
    exclude = config.prune_exclude

    def init(params: Params) -> PruneState:
        masks_lib.select(params, include, exclude)  # a regex selecting nothing fails here, before jit
        return PruneState(step=jnp.zeros((), jnp.int32), masks=masks_lib.ones_masks(params))

    def schedule(step: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(whether the masks are recomputed at this step, the sparsity they are recomputed for)."""
        if config.prune_schedule == "fixed":
            return step == 0, jnp.zeros((), jnp.float32)
        if config.prune_schedule == "oneshot":
            return step == start, jnp.asarray(sparsity, jnp.float32)
        on_grid = ((step - start) % config.prune_every == 0) | (step == end)
        return (step >= start) & (step <= end) & on_grid, zhu_gupta_sparsity(step, sparsity, start, end)

    def recompute(candidate: Params, target: jax.Array, current: Params) -> Params:
        if config.prune_schedule == "fixed":
            selected = masks_lib.select(candidate, include, exclude)
            return jax.tree.map(lambda p, sel: (p != 0) if sel else jnp.ones(p.shape, bool), candidate, selected)
        with jax.named_scope(RANKING_SCOPE):  # tests find the ranking by this name
            masks = masks_lib.magnitude_masks(
                candidate, target, distribution=config.prune_distribution, include=include, exclude=exclude
            )
        return jax.tree.map(jnp.logical_and, masks, current)  # never revive a pruned weight

    def update(updates: Params, state: PruneState, params: Params | None = None) -> tuple[Params, PruneState]:
        if params is None:
            raise ValueError("prune_transform needs the parameters: call optimizer.update(grads, state, params)")
        # Rank the weights as they would be after this step; "fixed" keeps the zeros they start from.
        candidate = params if config.prune_schedule == "fixed" else jax.tree.map(jnp.add, params, updates)
        now, target = schedule(state.step)
        # A real branch (the ranking is a sort) only while the step count is unbatched. It is inside
        # `jit(vmap(train))` (the count starts as a constant) and in `rl.common.vmap_learn`, which
        # keeps the seeds' shared step counters out of the vmap; a plain `vmap(learn)` over a
        # batched state turns it into a select that ranks at every step (tests check both).
        current = jax.lax.cond(
            now, recompute, lambda c, t, m: jax.tree.map(jnp.asarray, m), candidate, target, state.masks
        )
        masked = jax.tree.map(lambda m, u, p: jnp.where(m, u, -p), current, updates, params)
        return masked, PruneState(step=state.step + 1, masks=current)

    return optax.GradientTransformation(init, update)


def find_masks(tree: Any) -> Params | None:
    """The pruning masks inside a training state (or optimizer state); None when not pruning."""
    found = _find(tree, PruneState)
    return None if found is None else found.masks


# ----------------------------------------------------------------------------------------------
# k-means QAT: trained weight sharing with frozen assignments
# ----------------------------------------------------------------------------------------------
class KMeansQATState(NamedTuple):
    """Optimizer-state part of k-means QAT, one entry per quantized kernel (in `quant.select_paths`
    order): the float weights behind the shared ones, every weight's cluster (the kernel's shape)
    and the codebook (k centroids; with pruning, k = 2^b - 1 and pruned weights are exactly 0)."""

    step: jax.Array
    latent: tuple[jax.Array, ...]
    codes: tuple[jax.Array, ...]
    centroids: tuple[jax.Array, ...]


class SharedWeightsState(NamedTuple):
    """Pruning (or None) and k-means QAT, which reads the pruning masks."""

    prune: PruneState | None
    kmeans: KMeansQATState


def kmeans_qat_transform(
    config: CompressConfig, prune: optax.GradientTransformation | None = None
) -> optax.GradientTransformation:
    """Trained k-means weight sharing (Han et al. 2016, sec. 3.3) as the last optax transformation.

    With latent weights w, clusters c_i and centroids z_j, after `prune` (when pruning, its masks m):
    w <- m * (w + u) (u: the optimizer's update, computed from the gradient at the shared weights,
    i.e. a straight-through estimator); every `config.qat_recluster_every` steps the clusters are
    re-assigned by `config.qat_recluster_iters` Lloyd steps from the current codebook (the first
    step fits it from scratch like PTQ); z_j <- mean of the latent weights in cluster j (an empty
    cluster keeps its centroid). `kmeans_project` then sets the parameters to m * z[c]. Step 0 reads
    the latent weights from the parameters, so a state whose parameters were replaced after `init`
    (fine-tuning a trained policy) starts from them.
    """
    spec = config.qat_spec()
    spec.validate()
    k = 2**spec.bits - int(prune is not None)  # with masks, code 0 is reserved for pruned weights
    every, iters = config.qat_recluster_every, config.qat_recluster_iters

    def selected(tree: Params) -> list[jax.Array]:
        flat = quant.flatten_with_paths(tree)
        return [flat[p] for p in quant.select_paths(tree, QAT_INCLUDE)]

    def init(params: Params) -> SharedWeightsState:
        kernels = [jnp.asarray(w, jnp.float32) for w in selected(params)]
        state = KMeansQATState(
            step=jnp.zeros((), jnp.int32),
            latent=tuple(kernels),
            codes=tuple(jnp.zeros(w.shape, jnp.int32) for w in kernels),
            centroids=tuple(jnp.zeros((k,), jnp.float32) for _ in kernels),
        )
        return SharedWeightsState(None if prune is None else prune.init(params), state)

    def fit(latent: jax.Array, weight: jax.Array, codes: jax.Array, centroids: jax.Array, branch: jax.Array):
        x, w = latent.reshape(-1), weight.reshape(-1)

        def keep() -> tuple[jax.Array, jax.Array]:
            return codes, quant.cluster_means(x, w, codes.reshape(-1), centroids).astype(jnp.float32)

        def reassign(new: jax.Array) -> tuple[jax.Array, jax.Array]:
            c = quant.kmeans_assign(x, new)
            return c.reshape(codes.shape), quant.cluster_means(x, w, c, new).astype(jnp.float32)

        branches = (
            keep,
            lambda: reassign(quant.lloyd_1d(x, w, jnp.sort(centroids), iters)),
            lambda: reassign(quant.kmeans_centroids(x, w, k, spec)),
        )
        return jax.lax.switch(branch, branches)

    def update(updates: Params, state: SharedWeightsState, params: Params | None = None):
        if params is None:
            raise ValueError("kmeans_qat_transform needs the parameters: call optimizer.update(grads, state, params)")
        prune_state = state.prune
        if prune is not None:
            updates, prune_state = prune.update(updates, prune_state, params)
        km = state.kmeans
        masks = [None] * len(km.latent) if prune_state is None else selected(prune_state.masks)
        # a real branch under `jit(vmap(train))` and `vmap_learn`, where the step count is unbatched
        branch = jnp.where(km.step == 0, 2, jnp.where(km.step % every == 0, 1, 0))
        latent, codes, centroids = [], [], []
        for lat, p, u, m, c, z in zip(km.latent, selected(params), selected(updates), masks, km.codes, km.centroids):
            base = jnp.where(km.step == 0, jnp.asarray(p, jnp.float32), lat)
            new = base + u
            weight = jnp.ones(new.shape, jnp.float32) if m is None else m.astype(jnp.float32)
            new = new if m is None else jnp.where(m, new, 0.0)
            c, z = fit(new, weight, c, z, branch)
            latent.append(new)
            codes.append(c)
            centroids.append(z)
        km = KMeansQATState(km.step + 1, tuple(latent), tuple(codes), tuple(centroids))
        return updates, SharedWeightsState(prune_state, km)

    return optax.GradientTransformation(init, update)


def _find(tree: Any, kind: type) -> Any:
    found = [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, kind)) if isinstance(x, kind)]
    return found[0] if found else None


def kmeans_project(params: Params, opt_state: Any) -> Params:
    """`Hooks.project_params` of k-means QAT: every quantized kernel becomes m * z[c] exactly (after
    the first optimizer step; before it the codebook does not exist yet)."""
    km = _find(opt_state, KMeansQATState)
    masks = find_masks(opt_state)
    mask_of = {} if masks is None else quant.flatten_with_paths(masks)
    paths = quant.select_paths(params, QAT_INCLUDE)
    shared = {
        p: z[c] if p not in mask_of else jnp.where(mask_of[p], z[c], 0.0)
        for p, c, z in zip(paths, km.codes, km.centroids)
    }

    def put(path: Any, leaf: jax.Array) -> jax.Array:
        name = quant.path_str(path)
        if name not in shared:
            return leaf
        return jnp.where(km.step > 0, shared[name], leaf).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(put, params)
