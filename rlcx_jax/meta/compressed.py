"""A compressed meta-learned initialisation: prune and fake-quantize it, then adapt it as usual.

Variants (each a parameter transform applied in every forward pass of adaptation, built from the
compression transforms that exist, `compress.masks` and `compress.quant`):

  dense        the meta-learned init as it is
  pruned       magnitude pruning of the kernels (Zhu & Gupta 2017); the masks stay fixed during
               adaptation: pruned weights are zero in the forward pass and get zero gradient
  int8         uniform symmetric per-tensor int8 fake quantization of the kernels (Jacob et al.
               2018); adaptation is quantization-aware: it updates the latent float weights through
               the straight-through estimator (Bengio et al. 2013)
  pruned+int8  both (the pruned entries stay exactly zero under quantization)

`compressed_adaptation` returns the adaptation table of each variant (returns after 0..k steps on the
test tasks), so the question "does a 90%-sparse int8 init still adapt?" is one call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from rlcx_jax.compress import masks as mask_ops
from rlcx_jax.compress import quant
from rlcx_jax.configs.compress import QuantSpec
from rlcx_jax.meta.loop import MetaTrainer, make_trainer
from rlcx_jax.meta.maml import MAML
from rlcx_jax.meta.platipus import PlatipusParams

__all__ = ["VARIANTS", "compression_transform", "compressed_adaptation", "policy_init"]

Params = Any
VARIANTS = ("dense", "pruned", "int8", "pruned+int8")
KERNELS = (r".*kernel",)


def policy_init(meta_params: Any) -> Params:
    """The policy parameters a method's meta-parameters start adaptation from (PLATIPUS: its mean)."""
    return meta_params.mean if isinstance(meta_params, PlatipusParams) else meta_params


def compression_transform(
    params: Params, variant: str, sparsity: float = 0.9, bits: int = 8
) -> Callable[[Params], Params] | None:
    """The forward-pass transform of `variant` for the init `params` (None for dense). The masks are
    computed once, here, from the init's magnitudes, and stay fixed."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown compression variant {variant!r}; known: {', '.join(VARIANTS)}")
    if variant == "dense":
        return None
    masks = mask_ops.magnitude_masks(params, sparsity, include=KERNELS) if "pruned" in variant else None
    if "int8" not in variant:
        assert masks is not None
        return lambda p: mask_ops.apply_masks(p, masks)
    return quant.weight_param_transform(QuantSpec(scheme="uniform", bits=bits), include=KERNELS, masks=masks)


def compressed_adaptation(
    trainer: MetaTrainer,
    meta_params: Any,
    hparams: Any,
    key: jax.Array,
    variants: tuple[str, ...] = VARIANTS,
    sparsity: float = 0.9,
    bits: int = 8,
) -> dict[str, jax.Array]:
    """{variant: returns [tasks, steps + 1]} of adapting the compressed init on the test tasks (one seed;
    the same evaluation key for every variant, so they see the same tasks and noise)."""
    init = policy_init(meta_params)
    out = {}
    for variant in variants:  # a handful of static variants, each its own compiled program
        transform = compression_transform(init, variant, sparsity, bits)
        learner = dataclasses.replace(trainer.learner, param_transform=transform)
        evaluator = make_trainer(trainer.config, learner, MAML(), trainer.family)
        out[variant] = jax.jit(evaluator.evaluate)(init, hparams, key).returns
    return out
