"""Static configs and traced hyperparameters of every algorithm (jax-free; see `rlcx_jax.configs`).

`XxxConfig` (frozen dataclass, hashable, static under jit): sizes, counts, env name, network,
extensions. `XxxHParams` (`pytree.dataclass`, traced): learning rate, discount, clipping ... so a
sweep is one more `vmap`. Both validate in plain Python before anything compiles. Each algorithm's
module (`rlcx_jax.rl.ppo`, ...) re-exports its pair and holds the training code.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Self

from rlcx_jax import pytree
from rlcx_jax.configs.base import (
    Extension,
    check_extensions,
    check_finite_fields,
    check_minibatches,
    check_positive,
    check_prng_impl,
    check_range,
    complete_ext_hparams,
    largest_divisor_at_most,
)
from rlcx_jax.configs.envs import check_env_name, has_discrete_actions
from rlcx_jax.configs.nets import NetConfig

__all__ = [
    "TrainConfig",
    "HParams",
    "OnPolicyConfig",
    "ActorCriticHParams",
    "GAEHParams",
    "DQNConfig",
    "DQNHParams",
    "ReinforceConfig",
    "ReinforceHParams",
    "A2CConfig",
    "A2CHParams",
    "PPOConfig",
    "PPOHParams",
    "ALGORITHMS",
    "config_classes",
]


# ----------------------------------------------------------------------------------------------
# Bases
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainConfig(abc.ABC):
    """Static settings every algorithm has (hashable; not traced).

    extensions: capabilities plugged into training (e.g. pruning, distillation), each bringing
    its own static config, traced hyperparameters (`hparams.ext[name]`) and state (`state.ext[name]`).
    A step count that does not divide into whole updates is rounded down to whole updates; a
    `log_every` that does not divide the number of updates becomes its largest divisor below it.
    """

    env: str = "CartPole-v1"
    """Environment id: a gymnax id (CartPole-v1, Breakout-MinAtar, ...) or a registered probe."""
    env_kwargs: tuple[tuple[str, Any], ...] = ()
    """Overrides of the environment's `EnvParams` fields, (name, value) pairs (`envs.make`), e.g.
    (("num_entities", 6),); the environment object itself is the registered id's."""
    num_envs: int = 4
    """Environments stepped in parallel per seed."""
    total_timesteps: int = 500_000
    """Environment steps per seed, summed over the parallel environments."""
    net: NetConfig = NetConfig()
    anneal_lr: bool = False
    """Decay the learning rate linearly to 0 over the run's optimizer steps."""
    log_every: int = 1
    """Updates averaged into one metrics row."""
    prng_impl: str = "threefry2x32"
    """PRNG implementation: threefry2x32 (JAX default), rbg or unsafe_rbg (faster on accelerators)."""
    extensions: tuple[Extension, ...] = ()

    HEAD: ClassVar[str] = "actor_critic"
    DISCRETE_ONLY: ClassVar[bool] = False
    """The algorithm needs a discrete action space (checked in `validate`, before any compilation)."""
    POSITIVE: ClassVar[tuple[str, ...]] = ("num_envs", "total_timesteps", "log_every")
    FUSED_PRODUCTS_MIN_ENVS: ClassVar[int | None] = None
    """Environments stepped at once on one device (seeds x num_envs) from which this algorithm's
    programs compile with `rlcx_jax.xla.FUSED_DOT_OPTIONS` (YNNPACK products fused with their bias
    and activation); None: never. Chosen per algorithm by measurement (README, "Throughput")."""

    def fused_products(self, seeds: int) -> bool:
        """Whether a program that trains `seeds` seeds of this config on one device compiles with the
        fused-product options (`FUSED_PRODUCTS_MIN_ENVS`)."""
        least = self.FUSED_PRODUCTS_MIN_ENVS
        return least is not None and seeds * self.num_envs >= least

    @property
    @abc.abstractmethod
    def steps_per_update(self) -> int:
        """Env steps (summed over the vectorised envs) one update collects."""

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.steps_per_update

    @property
    @abc.abstractmethod
    def optimizer_steps(self) -> int:
        """Optimizer steps in a full run (learning-rate annealing, pruning schedules)."""

    @property
    def updates_per_row(self) -> int:
        """Updates per metrics row: `log_every`, or its largest divisor of `num_updates` below it."""
        return largest_divisor_at_most(self.num_updates, self.log_every)

    def rounding_notice(self) -> str | None:
        """A one-line note when the step count or log_every had to be adapted; None otherwise."""
        notes = []
        done = self.num_updates * self.steps_per_update
        if done != self.total_timesteps:
            notes.append(
                f"total_timesteps {self.total_timesteps} rounded down to {done} "
                f"({self.num_updates} updates of {self.steps_per_update} env steps)"
            )
        if self.updates_per_row != self.log_every:
            notes.append(
                f"log_every {self.log_every} -> {self.updates_per_row} (a divisor of {self.num_updates} updates)"
            )
        return "; ".join(notes) or None

    def validate(self) -> None:
        check_env_name(self.env)
        if self.DISCRETE_ONLY and not has_discrete_actions(self.env):
            algorithm = type(self).__name__.removesuffix("Config")
            raise ValueError(
                f"{algorithm} needs a discrete action space; {self.env}'s actions are continuous "
                "(ppo, a2c and reinforce train on both)"
            )
        for name in self.POSITIVE:
            check_positive(name, getattr(self, name))
        if self.num_updates < 1:
            raise ValueError(
                f"total_timesteps ({self.total_timesteps}) is smaller than one update "
                f"({self.steps_per_update} env steps)"
            )
        self.net.validate()
        if self.net.dueling and self.HEAD != "q":
            raise ValueError("net.dueling applies to Q-networks (dqn) only")
        check_prng_impl(self.prng_impl)
        check_extensions(self.extensions)

    def extension(self, name: str) -> Extension | None:
        """The configured extension called `name`, or None."""
        return next((e for e in self.extensions if e.name == name), None)


@pytree.dataclass
class HParams:
    """Traced hyperparameters every algorithm has (vmappable for sweeps).

    ext: {extension name: that extension's hyperparameters}; filled with each configured
    extension's defaults where missing when training starts. Subclasses list their fields'
    valid ranges in POSITIVE / UNIT (closed [0, 1]) so one `validate` checks them all.
    """

    lr: float = 2.5e-4
    """Adam learning rate."""
    gamma: float = 0.99
    """Discount factor."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip."""
    adam_eps: float = 1e-5
    """Adam's epsilon (added to the root of the second-moment estimate)."""
    ext: dict[str, Any] = pytree.field(default_factory=dict)

    POSITIVE: ClassVar[tuple[str, ...]] = ("lr", "max_grad_norm", "adam_eps")
    UNIT: ClassVar[tuple[str, ...]] = ("gamma",)

    if TYPE_CHECKING:  # added by pytree.dataclass

        def replace(self, **changes: Any) -> Self: ...

    def validate(self, extensions: tuple[Extension, ...] = ()) -> None:
        """Check concrete (non-traced) values; called by the CLI before compiling."""
        check_finite_fields(self)
        for name in self.POSITIVE:
            check_positive(name, getattr(self, name))
        for name in self.UNIT:
            check_range(name, getattr(self, name), 0.0, 1.0)
        ext = complete_ext_hparams(extensions, self.ext)
        for e in extensions:
            e.validate_hparams(ext[e.name])

    def with_ext(self, name: str, ext_hparams: Any) -> HParams:
        """These hyperparameters with extension `name`'s replaced."""
        return self.replace(ext={**self.ext, name: ext_hparams})


# ----------------------------------------------------------------------------------------------
# On-policy actor-critic (REINFORCE, A2C, PPO)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OnPolicyConfig(TrainConfig):
    """Static settings common to the on-policy algorithms (hashable; not traced)."""

    num_envs: int = 4
    num_steps: int = 128
    """Steps per environment in one rollout."""
    normalize_obs: bool = False
    """Standardise observations with running mean and variance (updated from every rollout)."""
    normalize_advantages: bool = True
    """Standardise advantages over the batch before the policy loss."""

    POSITIVE = TrainConfig.POSITIVE + ("num_steps",)

    @property
    def steps_per_update(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def optimizer_steps_per_update(self) -> int:
        return 1

    @property
    def optimizer_steps(self) -> int:
        return self.num_updates * self.optimizer_steps_per_update


@pytree.dataclass
class ActorCriticHParams(HParams):
    """Traced hyperparameters of the actor-critic losses: entropy bonus and value-loss weights."""

    ent_coef: float = 0.01
    """Weight of the entropy bonus."""
    vf_coef: float = 0.5
    """Weight of the value loss."""


@pytree.dataclass
class GAEHParams(ActorCriticHParams):
    """Actor-critic hyperparameters of the algorithms that estimate advantages with GAE(lambda)."""

    gae_lambda: float = 0.95
    """GAE lambda: 0 gives one-step TD advantages, 1 Monte-Carlo (n-step) ones."""

    UNIT = ActorCriticHParams.UNIT + ("gae_lambda",)


# ----------------------------------------------------------------------------------------------
# Algorithms
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DQNConfig(TrainConfig):
    """Static DQN settings. Counts are in environment steps (summed over the vectorised envs)."""

    num_envs: int = 10
    buffer_size: int = 10_000
    """Replay capacity in transitions."""
    batch_size: int = 128
    """Transitions per gradient step."""
    learning_starts: int = 10_000
    """Environment steps collected before the first gradient step."""
    train_frequency: int = 10
    """Environment steps per update (a multiple of num_envs)."""
    gradient_steps: int = 1
    """Gradient steps per update, each on its own minibatch sampled from the replay buffer."""
    target_update_period: int = 500
    """Environment steps between target-network updates."""
    eps_start: float = 1.0
    """Initial exploration epsilon."""
    eps_end: float = 0.05
    """Final exploration epsilon."""
    eps_decay_fraction: float = 0.5
    """Fraction of the run over which epsilon decays linearly."""
    double: bool = False
    """Double DQN: the online network picks the bootstrap action (van Hasselt et al. 2016)."""
    huber_delta: float | None = None
    """Huber loss threshold; None for the squared TD error."""
    net: NetConfig = NetConfig(hidden=(120, 84), activation="relu")
    log_every: int = 50

    HEAD = "q"
    DISCRETE_ONLY = True
    FUSED_PRODUCTS_MIN_ENVS = None
    """Never: with relu the default kernels are as fast or faster (CartPole, in-process alternating,
    8 seeds: 0.89x on PureJaxRL's config, 1.01x on rejax's)."""
    POSITIVE = TrainConfig.POSITIVE + (
        "buffer_size",
        "batch_size",
        "train_frequency",
        "gradient_steps",
        "target_update_period",
    )

    @property
    def steps_per_update(self) -> int:
        return self.train_frequency

    @property
    def optimizer_steps(self) -> int:
        """Gradient steps in a full run: `gradient_steps` per update from the update whose transitions
        fill the buffer to `learning_starts` (update u holds (u + 1) * train_frequency), on."""
        waiting = max(-(-self.learning_starts // self.train_frequency) - 1, 0)
        return max(self.num_updates - waiting, 1) * self.gradient_steps

    def validate(self) -> None:
        super().validate()
        if self.learning_starts < 0:
            raise ValueError(f"learning_starts must be >= 0, got {self.learning_starts}")
        if self.train_frequency % self.num_envs != 0:
            raise ValueError(
                f"train_frequency ({self.train_frequency}) must be a multiple of num_envs ({self.num_envs}):"
                " one update collects train_frequency / num_envs vectorised steps"
            )
        if self.buffer_size % self.train_frequency != 0:
            raise ValueError(
                f"buffer_size ({self.buffer_size}) must be a multiple of train_frequency ({self.train_frequency})"
            )
        if self.target_update_period % self.train_frequency != 0:
            raise ValueError(
                f"target_update_period ({self.target_update_period}) must be a multiple of "
                f"train_frequency ({self.train_frequency})"
            )
        if self.learning_starts > self.buffer_size:
            raise ValueError(
                f"learning_starts ({self.learning_starts}) exceeds buffer_size ({self.buffer_size}): "
                "the buffer never holds that many transitions, so no gradient step would ever be taken"
            )
        check_range("eps_start", self.eps_start, 0.0, 1.0)
        check_range("eps_end", self.eps_end, 0.0, 1.0)
        check_range("eps_decay_fraction", self.eps_decay_fraction, 0.0, 1.0)
        if self.huber_delta is not None and not self.huber_delta > 0:
            raise ValueError(f"huber_delta must be positive (or None for the squared loss), got {self.huber_delta}")


@pytree.dataclass
class DQNHParams(HParams):
    """Traced DQN hyperparameters; tau is the target network's Polyak step (1: hard copy)."""

    lr: float = 2.5e-4
    max_grad_norm: float = 10.0
    tau: float = 1.0
    """Target network's Polyak step at each target update (1: hard copy)."""

    UNIT = HParams.UNIT + ("tau",)


@pytree.dataclass
class ReinforceHParams(ActorCriticHParams):
    """Traced REINFORCE hyperparameters (no entropy bonus by default)."""

    lr: float = 1e-3
    max_grad_norm: float = 1.0
    ent_coef: float = 0.0


@dataclasses.dataclass(frozen=True)
class ReinforceConfig(OnPolicyConfig):
    """Static REINFORCE settings. `use_baseline` subtracts a learned V(s) from the return."""

    num_envs: int = 8
    num_steps: int = 256
    use_baseline: bool = True
    """Subtract a learned V(s) from the return (the critic is then trained too)."""

    FUSED_PRODUCTS_MIN_ENVS = None
    """Never: one gradient step on 2048 rows per 256 rollout steps does not repay the fused kernels'
    cost in the rollout (CartPole, in-process alternating: 0.93x at 8 seeds, 0.86x at 32)."""


@dataclasses.dataclass(frozen=True)
class A2CConfig(OnPolicyConfig):
    """Static A2C settings: short rollouts from many environments."""

    num_envs: int = 16
    """Parallel environments (the paper runs 16 actor-learner threads)."""
    num_steps: int = 8
    """Steps per environment per update: the n of the n-step returns (the paper uses 5)."""
    normalize_advantages: bool = False
    """Off as in the paper; on often helps with few environments."""

    FUSED_PRODUCTS_MIN_ENVS = 32
    """Measured (CartPole, 16 environments per seed, in-process alternating): 1.03x at 8 seeds, 1.12x
    at 32."""


@pytree.dataclass
class A2CHParams(GAEHParams):
    """Traced A2C hyperparameters."""

    lr: float = 2e-3
    gae_lambda: float = 1.0
    """1 gives the paper's n-step returns (n = num_steps)."""


@dataclasses.dataclass(frozen=True)
class PPOConfig(OnPolicyConfig):
    """Static PPO settings. `num_envs * num_steps` must divide into `num_minibatches`."""

    anneal_lr: bool = True
    update_epochs: int = 4
    """Passes over each rollout."""
    num_minibatches: int = 4
    """Minibatches per pass; num_envs * num_steps must divide by it."""
    clip_value_loss: bool = True
    """Clip the value update to clip_eps around the old value (PPO2)."""

    POSITIVE = OnPolicyConfig.POSITIVE + ("update_epochs", "num_minibatches")
    FUSED_PRODUCTS_MIN_ENVS = 32
    """Measured (CartPole, 4 environments per seed): 1.15x at 8 seeds, 1.17x at 32; 0.97x at 4 seeds
    and 0.77x at 1, where the rollout's products have too few rows for the fused kernels."""

    @property
    def optimizer_steps_per_update(self) -> int:
        return self.update_epochs * self.num_minibatches

    def validate(self) -> None:
        super().validate()
        check_minibatches(self.steps_per_update, self.num_minibatches)


@pytree.dataclass
class PPOHParams(GAEHParams):
    """Traced PPO hyperparameters (vmappable for sweeps)."""

    clip_eps: float = 0.2
    """Clipping radius of the probability ratio."""

    POSITIVE = GAEHParams.POSITIVE + ("clip_eps",)


ALGORITHMS: dict[str, tuple[type[TrainConfig], type[HParams]]] = {
    "dqn": (DQNConfig, DQNHParams),
    "reinforce": (ReinforceConfig, ReinforceHParams),
    "a2c": (A2CConfig, A2CHParams),
    "ppo": (PPOConfig, PPOHParams),
}
"""Algorithm name -> (config class, hyperparameter class); `rlcx_jax.rl.ALGORITHMS` adds the modules."""


def config_classes(name: str) -> tuple[type[TrainConfig], type[HParams]]:
    """(config class, hyperparameter class) of algorithm `name`, or a ValueError listing the known ones."""
    if name not in ALGORITHMS:
        import difflib

        close = difflib.get_close_matches(name, list(ALGORITHMS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown algorithm {name!r}.{hint} Known: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]
