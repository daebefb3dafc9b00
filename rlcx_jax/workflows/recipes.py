"""Ready-made pruning recipes over any core algorithm, for a batch of seeds at once.

* `prune_and_finetune`: one-shot magnitude pruning of trained parameters, then training on with the
  mask fixed (Han et al. 2015).
* `lottery_ticket`: iterative magnitude pruning with weight rewinding (Frankle & Carbin 2019; rewinding
  to an early iteration k rather than to initialisation, Frankle et al. 2020): train, prune the
  smallest surviving weights, rewind the survivors (and the rest of the training state) to their
  values at update k, retrain; repeat for each sparsity level.

Both build the algorithm with the compression extension on the "fixed" schedule and write the masks
into the training state (`replace_masks`), where the pruning transformation keeps them for the rest
of training. New parameters enter a state through its `with_params` (the `seams.HasParams` protocol).
The loops over rounds run on the host (a handful of iterations); each round is one compiled,
seed-vmapped `learn`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax

from rlcx_jax import nets, rl
from rlcx_jax.compress import masks as masks_lib
from rlcx_jax.compress.training import CompressConfig, PruneState, find_masks, prune_selection
from rlcx_jax.rl.common import batched_learner

Params = Any

__all__ = [
    "replace_masks",
    "compress_extension",
    "fixed_mask_config",
    "prune_and_finetune",
    "lottery_ticket",
    "TicketRound",
]


def replace_masks(state: Any, masks: Params) -> Any:
    """The training state with the pruning masks in its optimizer state replaced by `masks`."""
    if find_masks(state) is None:
        raise ValueError("The state holds no pruning masks: build the algorithm with a prune_schedule")
    return jax.tree.map(
        lambda x: x._replace(masks=masks) if isinstance(x, PruneState) else x,
        state,
        is_leaf=lambda x: isinstance(x, PruneState),
    )


def compress_extension(config: Any) -> CompressConfig:
    """The compression extension of an algorithm config (default settings when it has none)."""
    ext = config.extension(CompressConfig.name)
    return ext if ext is not None else CompressConfig()


def fixed_mask_config(config: Any, total_timesteps: int | None = None) -> Any:
    """`config` with the mask-keeping pruning transformation switched on (and a new budget)."""
    compress = dataclasses.replace(compress_extension(config), prune_schedule="fixed")
    others = tuple(e for e in config.extensions if e.name != CompressConfig.name)
    changes: dict[str, Any] = {"extensions": others + (compress,)}
    if total_timesteps is not None:
        changes["total_timesteps"] = total_timesteps
    return dataclasses.replace(config, **changes)


def _batched_masks(params: Params, sparsity: float, config: Any, distribution: str) -> Params:
    """Magnitude masks per seed (leading axis of every leaf) over the config's prunable layers."""
    compress = compress_extension(config)
    include = prune_selection(compress, nets.layout(config.net, config.HEAD))
    exclude = compress.prune_exclude
    return jax.jit(
        jax.vmap(
            lambda p: masks_lib.magnitude_masks(
                p, sparsity, distribution=distribution, include=include, exclude=exclude
            )
        )
    )(params)


def prune_and_finetune(
    algorithm: str,
    config: Any,
    hparams: Any,
    keys: jax.Array,
    params: Params,
    sparsity: float,
    finetune_timesteps: int,
    distribution: str = "uniform",
) -> tuple[Any, Any, Params]:
    """Prune trained `params` (leading seed axis) to `sparsity` by magnitude and train on for
    `finetune_timesteps` with the mask fixed. Returns (final state, metrics, masks)."""
    masks_lib.validate_sparsity(sparsity)
    trainer = rl.make(algorithm, fixed_mask_config(config, finetune_timesteps))
    masks = _batched_masks(params, sparsity, config, distribution)
    state = jax.jit(jax.vmap(trainer.init, in_axes=(0, None)))(keys, hparams)
    state = replace_masks(state.with_params(masks_lib.apply_masks(params, masks)), masks)
    state, metrics = batched_learner(trainer)(state, trainer.num_updates)
    return state, metrics, masks


class TicketRound(NamedTuple):
    """One round of iterative magnitude pruning: its sparsity and the retrained result."""

    sparsity: float
    state: Any
    metrics: Any
    masks: Params


def lottery_ticket(
    algorithm: str,
    config: Any,
    hparams: Any,
    keys: jax.Array,
    sparsities: Sequence[float],
    rewind_updates: int,
    distribution: str = "uniform",
    on_round: Callable[[TicketRound], None] | None = None,
) -> list[TicketRound]:
    """Iterative magnitude pruning with rewinding, one round per (increasing) level of `sparsities`.

    Round 0 trains the dense network; the state after `rewind_updates` updates is kept. Each round
    then prunes the previous round's final weights to the next level (already pruned weights are
    zero and go first), rewinds the survivors and the rest of the state to update k, and retrains
    for the remaining updates. `on_round` is called after each retraining (e.g. to evaluate).
    """
    levels = [float(s) for s in sparsities]
    for level in levels:
        masks_lib.validate_sparsity(level)
    if any(b <= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"sparsities must increase, got {list(sparsities)}")
    trainer = rl.make(algorithm, fixed_mask_config(config))
    if not 0 <= rewind_updates < trainer.num_updates:
        raise ValueError(f"rewind_updates must be in [0, {trainer.num_updates}), got {rewind_updates}")
    learn = batched_learner(trainer)
    state0 = jax.jit(jax.vmap(trainer.init, in_axes=(0, None)))(keys, hparams)
    rewind_state, first_metrics = learn(state0, rewind_updates) if rewind_updates else (state0, None)
    remaining = trainer.num_updates - rewind_updates
    final, metrics = learn(rewind_state, remaining)
    rounds = [TicketRound(0.0, final, metrics, find_masks(final))]
    del first_metrics
    for level in levels:
        masks = _batched_masks(rounds[-1].state.params, level, config, distribution)
        state = rewind_state.with_params(masks_lib.apply_masks(rewind_state.params, masks))
        final, metrics = learn(replace_masks(state, masks), remaining)
        rounds.append(TicketRound(level, final, metrics, masks))
        if on_round is not None:
            on_round(rounds[-1])
    return rounds
