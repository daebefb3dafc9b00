"""rlcx_jax: compression and expansion of RL agents in JAX."""

__version__ = "0.1.0"
