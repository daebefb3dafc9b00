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
    - "oneshot": prune to s_f by magnitude once, at `prune_start`, then train with the mask fixed.
    - "fixed": the zeros of the parameters training starts from stay zero (lottery-ticket
      retraining and fine-tuning of an already pruned network, see `recipes.py`).
* **QAT** (`qat_bits > 0`): the forward pass sees fake-quantized weights (`Hooks.param_transform`)
  and, optionally, fake-quantized layer inputs (`Hooks.interceptor`), with straight-through
  gradients (`quant.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from rlcx_jax import nets
from rlcx_jax.compress import masks as masks_lib
from rlcx_jax.compress import quant
from rlcx_jax.seams import BuildContext, Extension, Hooks, register_extension

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
]

PRUNE_SCHEDULES = ("none", "gradual", "oneshot", "fixed")
DEFAULT_PRUNE_ROLES = ("torso",)  # output heads are never pruned by default: that removes whole actions
DEFAULT_PRUNE_INCLUDE = (r".*kernel",)  # within those roles: kernels; biases stay dense
QAT_INCLUDE = (r".*kernel",)
RANKING_SCOPE = "prune_mask_ranking"


@struct.dataclass
class CompressHParams:
    """Traced compression hyperparameters: the target sparsity of the pruning schedule, in [0, 1)."""

    sparsity: float = 0.0
    """Target sparsity of the pruning schedule, in [0, 1)."""


@register_extension
@dataclasses.dataclass(frozen=True)
class CompressConfig(Extension):
    """Static compression settings of a training run (an extension on `config.extensions`).

    The target sparsity itself is a traced hyperparameter (`CompressHParams.sparsity`); everything
    here changes the compiled program. Fractions are of the run's optimizer steps.
    """

    name = "compress"

    prune_schedule: str = "none"
    """none, gradual (Zhu & Gupta 2017), oneshot, or fixed (the zeros training starts from stay zero)."""
    prune_distribution: str = "uniform"
    """How sparsity spreads over layers: uniform, global or erk (Evci et al. 2020)."""
    prune_start: float = 0.0
    """Fraction of the optimizer steps at which pruning starts."""
    prune_end: float = 0.75
    """Fraction of the optimizer steps at which the target sparsity is reached."""
    prune_every: int = 16
    """Optimizer steps between mask updates."""
    prune_roles: tuple[str, ...] = DEFAULT_PRUNE_ROLES
    """Network roles pruned (torso, actor, critic, q_head)."""
    prune_include: tuple[str, ...] = DEFAULT_PRUNE_INCLUDE
    """Regexes of the parameter paths pruned within those roles."""
    prune_exclude: tuple[str, ...] = ()
    """Regexes of parameter paths never pruned."""
    qat_bits: int = 0
    """Bits of quantization-aware training (0: off)."""
    qat_scheme: str = "uniform"
    """Quantizer: uniform, log or kmeans."""
    qat_per_channel: bool = True
    """One quantization range per output channel instead of per tensor."""
    qat_symmetric: bool = True
    """Symmetric integer grid (int<b>); False: asymmetric with a zero point (uint<b>)."""
    qat_activations: bool = True
    """Also fake-quantize layer inputs."""
    qat_activation_range: str = "sample"
    """Activation ranges: sample (each observation its own: acting and learning see the same network) or tensor."""

    @property
    def prunes(self) -> bool:
        return self.prune_schedule != "none"

    def validate(self) -> None:
        if self.prune_schedule not in PRUNE_SCHEDULES:
            raise ValueError(f"Unknown prune_schedule {self.prune_schedule!r}; expected one of {PRUNE_SCHEDULES}")
        if self.prune_distribution not in masks_lib.DISTRIBUTIONS:
            raise ValueError(
                f"Unknown prune_distribution {self.prune_distribution!r}; expected one of {masks_lib.DISTRIBUTIONS}"
            )
        if not 0.0 <= self.prune_start <= self.prune_end <= 1.0:
            raise ValueError(
                f"Need 0 <= prune_start <= prune_end <= 1, got prune_start={self.prune_start}, "
                f"prune_end={self.prune_end}"
            )
        if self.prune_every < 1:
            raise ValueError(f"prune_every must be >= 1, got {self.prune_every}")
        if self.qat_bits != 0:
            self.qat_spec().validate()
        if self.qat_activation_range not in quant.DYNAMIC_RANGES:
            raise ValueError(
                f"qat_activation_range must be one of {quant.DYNAMIC_RANGES}, got {self.qat_activation_range!r}"
            )

    def qat_spec(self) -> quant.QuantSpec:
        """QAT's quantizer. k-means re-fits its codebook in every forward pass, so it starts Lloyd from
        the linear init (~20x cheaper) rather than from the optimal clustering that PTQ and export use."""
        return quant.QuantSpec(
            scheme=self.qat_scheme,
            bits=self.qat_bits,
            symmetric=self.qat_symmetric,
            per_channel=self.qat_per_channel,
            kmeans_init="linear",
        )

    def default_hparams(self) -> CompressHParams:
        return CompressHParams()

    def validate_hparams(self, hparams: CompressHParams) -> None:
        masks_lib.validate_sparsity(hparams.sparsity)
        if float(hparams.sparsity) > 0 and self.prune_schedule in ("none", "fixed"):
            raise ValueError(
                f"sparsity={float(hparams.sparsity)} needs prune_schedule 'gradual' or 'oneshot' "
                f"(it is {self.prune_schedule!r})"
            )

    def hooks(self, ctx: BuildContext) -> Hooks:
        """The pruning transformation after the optimizer (its target sparsity read from this
        extension's traced hyperparameters) and QAT's weight and activation fake-quantization."""
        hooks = Hooks()
        if self.prunes:
            include = prune_selection(self, nets.layout_of(ctx.network))
            steps = ctx.optimizer_steps

            def post_update(hparams: CompressHParams) -> optax.GradientTransformation:
                return prune_transform(self, hparams.sparsity, steps, include)

            hooks = hooks.merge(Hooks(post_update=post_update))
        if self.qat_bits:
            spec = self.qat_spec()
            qat = Hooks(
                param_transform=quant.weight_param_transform(spec, include=QAT_INCLUDE, exclude=()),
                interceptor=(
                    quant.activation_interceptor(spec, dynamic=self.qat_activation_range)
                    if self.qat_activations
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
    found = [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, PruneState)) if isinstance(x, PruneState)]
    return found[0].masks if found else None
