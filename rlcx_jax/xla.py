"""How rlcx_jax compiles its programs: `jit` is `jax.jit` plus XLA compiler options chosen per backend
(and, for one option, per algorithm and program size).

    from rlcx_jax import xla
    out = xla.jit(jax.vmap(train))(keys, hparams)     # instead of jax.jit(jax.vmap(train))
    out = xla.jit(jax.vmap(train), fused_products=config.fused_products(n_seeds))(keys, hparams)

The options are XLA `DebugOptions` fields passed through `jax.jit(..., compiler_options=...)`, so
they apply to these programs only: nothing global (no `XLA_FLAGS`) changes, other JAX code in the
process compiles as before, and the persistent compilation cache keys on them.

XLA:CPU, always (`OPTIONS`; same results bit for bit with or without, tested)
    xla_cpu_copy_insertion_use_region_analysis: copy insertion proves, per region of a `while`
    body, when a loop-carried buffer may be updated in place, instead of copying it each iteration.
    A training run is nested `while` loops (updates, rollout steps, epochs, minibatches) whose
    bodies are dozens of tiny kernels, so the copies it saves are a large share of the work
    (`benchmarks/profile_ops.py`; figures in README, "Throughput").

XLA:CPU, with `fused_products=True` (`FUSED_DOT_OPTIONS`)
    xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT: YNNPACK takes each matrix product
    together with the elementwise work around it (bias, activation) as one fused kernel, and leaves
    reductions to XLA's own loops (the default hands YNNPACK bare products and reductions). Whether
    that pays depends on the program, so each algorithm's config decides
    (`TrainConfig.fused_products(seeds)`, from `FUSED_PRODUCTS_MIN_ENVS` environments at once):
    PPO on CartPole trains 1.15-1.17x faster at 8-32 seeds (4 environments each) but 0.77x at 1
    seed, where the rollout's products have too few rows for the fused kernels' fixed cost;
    REINFORCE (one gradient step on 2048 rows per update; 0.93x at 8 seeds, 0.86x at 32) and DQN
    (relu; 0.89x at 8 seeds) never take them. A fused product rounds differently from the separate kernels,
    so results differ in the last bits, not in distribution (README, "Throughput").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

OPTIONS: Mapping[str, Mapping[str, Any]] = {
    "cpu": {"xla_cpu_copy_insertion_use_region_analysis": True},
}
FUSED_DOT_OPTIONS: Mapping[str, Mapping[str, Any]] = {
    "cpu": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
}


def compiler_options(backend: str | None = None, fused_products: bool = False) -> dict[str, Any]:
    """The options for `backend` (default: JAX's default backend); `fused_products` adds
    `FUSED_DOT_OPTIONS` (what `TrainConfig.fused_products(seeds)` says for a training program)."""
    backend = backend or jax.default_backend()
    options = dict(OPTIONS.get(backend, {}))
    if fused_products:
        options.update(FUSED_DOT_OPTIONS.get(backend, {}))
    return options


def jit(fn: Callable[..., Any], fused_products: bool = False, **kwargs: Any) -> Any:
    """`jax.jit(fn, **kwargs)` with this backend's `compiler_options` (explicit ones override them)."""
    options = {**compiler_options(fused_products=fused_products), **kwargs.pop("compiler_options", {})}
    return jax.jit(fn, compiler_options=options or None, **kwargs)
