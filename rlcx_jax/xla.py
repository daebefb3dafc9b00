"""How rlcx_jax compiles its programs: `jit` is `jax.jit` plus XLA compiler options chosen per backend
(and, for one option, per program size).

    from rlcx_jax import xla
    out = xla.jit(jax.vmap(train))(keys, hparams)     # instead of jax.jit(jax.vmap(train))
    out = xla.jit(jax.vmap(train), envs_at_once=n_seeds * config.num_envs)(keys, hparams)

The options are XLA `DebugOptions` fields passed through `jax.jit(..., compiler_options=...)`, so
they apply to these programs only: nothing global (no `XLA_FLAGS`) changes, other JAX code in the
process compiles as before, and the persistent compilation cache keys on them.

XLA:CPU, always (`OPTIONS`; same results bit for bit with or without, tested)
    xla_cpu_copy_insertion_use_region_analysis: copy insertion proves, per region of a `while`
    body, when a loop-carried buffer may be updated in place, instead of copying it each iteration.
    A training run is nested `while` loops (updates, rollout steps, epochs, minibatches) whose
    bodies are dozens of tiny kernels, so the copies it saves are a large share of the work
    (`benchmarks/profile_ops.py`; figures in README, "Throughput").

XLA:CPU, for programs that step at least `FUSED_DOT_MIN_ENVS` environments at once (`FUSED_DOT_OPTIONS`)
    xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT: YNNPACK takes each matrix product
    together with the elementwise work around it (bias, activation) as one fused kernel, and leaves
    reductions to XLA's own loops (the default hands YNNPACK bare products and reductions). With
    vmapped seeds the products are large and PPO on CartPole trains 1.10-1.17x faster at 8-32 seeds
    (4 environments each); stepping 4 or 16 environments, the rollout's products have so few rows
    that the fused kernels' fixed cost dominates (0.77x at 1 seed, 0.97x at 4). A fused product
    rounds differently from the separate kernels, so results differ in the last bits, not in
    distribution (README, "Throughput").
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
FUSED_DOT_MIN_ENVS = 32
"""Environments stepped at once (seeds x num_envs) from which `FUSED_DOT_OPTIONS` apply."""


def compiler_options(backend: str | None = None, envs_at_once: int | None = None) -> dict[str, Any]:
    """The options for `backend` (default: JAX's default backend) and a program that steps
    `envs_at_once` environments in one vectorised step (None: unknown, the size-independent options)."""
    backend = backend or jax.default_backend()
    options = dict(OPTIONS.get(backend, {}))
    if envs_at_once is not None and envs_at_once >= FUSED_DOT_MIN_ENVS:
        options.update(FUSED_DOT_OPTIONS.get(backend, {}))
    return options


def jit(fn: Callable[..., Any], envs_at_once: int | None = None, **kwargs: Any) -> Any:
    """`jax.jit(fn, **kwargs)` with this backend's `compiler_options` (explicit ones override them)."""
    options = {**compiler_options(envs_at_once=envs_at_once), **kwargs.pop("compiler_options", {})}
    return jax.jit(fn, compiler_options=options or None, **kwargs)
