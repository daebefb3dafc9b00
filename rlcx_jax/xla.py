"""How rlcx_jax compiles its programs: `jit` is `jax.jit` plus XLA compiler options chosen per backend.

    from rlcx_jax import xla
    out = xla.jit(jax.vmap(train))(keys, hparams)     # instead of jax.jit(jax.vmap(train))

The options are XLA `DebugOptions` fields passed through `jax.jit(..., compiler_options=...)`, so
they apply to these programs only: nothing global (no `XLA_FLAGS`) changes, other JAX code in the
process compiles as before, and the persistent compilation cache keys on them. Every option here
changes how buffers are assigned or programs scheduled, never the arithmetic: results are the same
bit for bit with or without them (tested).

XLA:CPU
    xla_cpu_copy_insertion_use_region_analysis: copy insertion proves, per region of a `while`
    body, when a loop-carried buffer may be updated in place, instead of copying it each iteration.
    A training run is nested `while` loops (updates, rollout steps, epochs, minibatches) whose
    bodies are dozens of tiny kernels, so the copies it saves are a large share of the work
    (`benchmarks/profile_ops.py`; figures in README, "Throughput").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

OPTIONS: Mapping[str, Mapping[str, Any]] = {
    "cpu": {"xla_cpu_copy_insertion_use_region_analysis": True},
}


def compiler_options(backend: str | None = None) -> dict[str, Any]:
    """The options for `backend` (default: JAX's default backend); empty where none are chosen."""
    return dict(OPTIONS.get(backend or jax.default_backend(), {}))


def jit(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """`jax.jit(fn, **kwargs)` with this backend's `compiler_options` (explicit ones override them)."""
    options = {**compiler_options(), **kwargs.pop("compiler_options", {})}
    return jax.jit(fn, compiler_options=options or None, **kwargs)
