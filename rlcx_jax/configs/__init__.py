"""Every static config and traced hyperparameter class, importable without jax.

The CLI parses flags into these classes and validates them before jax, flax or gymnax is imported
(`import jax` alone takes over a second), so `rlcx --help`, a typo or an out-of-range value is
answered at once. The classes are the ones the library uses (`ppo.PPOConfig` is
`configs.algorithms.PPOConfig`); what they build (networks, optimizers, training) lives in the
jax modules that import them. A test imports every module here and checks that jax stays unloaded.

    base        checks, the `Extension` base class and its registry
    envs        the static table of environment ids (and whether their actions are discrete)
    nets        `NetConfig`
    algorithms  `TrainConfig`, `HParams` and the configs of dqn, reinforce, a2c and ppo
    compress    `QuantSpec`, `CompressConfig` / `CompressHParams` (training), `CompressOptions` (post-training)
"""
