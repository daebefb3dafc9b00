"""Static config and traced hyperparameters of meta-learning (jax-free; `rlcx_jax.meta` trains them).

`MetaConfig` (frozen, hashable, static under jit): method, task family, meta-batch size, trajectories,
inner steps, iterations, network. `MetaHParams` (`pytree.dataclass`, traced): inner and outer
learning rates, discount, PLATIPUS's KL weight ... so a sweep over them is one more `vmap`. Both
validate in plain Python, so bad input is a one-line error before anything compiles.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Self

from rlcx_jax import pytree
from rlcx_jax.configs.base import check_finite_fields, check_positive, check_range, largest_divisor_at_most
from rlcx_jax.configs.nets import NetConfig, unknown_name
from rlcx_jax.configs.tasks import check_family, parse_ranges

__all__ = ["METHODS", "MetaConfig", "MetaHParams", "check_method"]

METHODS: dict[str, str] = {
    "maml": "MAML: the meta-gradient flows through the inner updates (second order; Finn et al. 2017)",
    "fomaml": "first-order MAML: the inner gradients are constants in the meta-gradient",
    "reptile": "Reptile: phi += eps (adapted - phi), eps annealed to 0 (Nichol et al. 2018)",
    "platipus": "PLATIPUS: a learned Gaussian over the initialisation (Finn, Xu & Levine 2018)",
    "pretrain": "baseline: one policy trained on the task mixture (no adaptation in training)",
}
"""Meta-training methods: name -> what it is."""


def check_method(name: str) -> None:
    """A one-line error naming the closest method when `name` is not one."""
    if name not in METHODS:
        raise unknown_name("meta-learning method", name, METHODS)


@dataclasses.dataclass(frozen=True)
class MetaConfig:
    """Static meta-learning settings (hashable; not traced).

    One meta-iteration samples `meta_batch` tasks; in each it collects `num_trajectories`
    trajectories of `horizon` steps per inner step and once more after adaptation (MAML's
    "before and after"), all tasks and trajectories vmapped.
    """

    method: str = "maml"
    """maml, fomaml, reptile, platipus or pretrain."""
    family: str = "point-nav-uniform"
    """Task family (`rlcx_jax.envs.tasks`)."""
    family_ranges: tuple[str, ...] = ()
    """Overrides of the family's sampled ranges, e.g. ("length=0.25:1.0",)."""
    meta_batch: int = 20
    """Tasks per meta-iteration."""
    num_trajectories: int = 20
    """Trajectories (parallel environments) per task per sampling."""
    horizon: int = 100
    """Steps per trajectory; only the first episode of each trajectory counts."""
    inner_steps: int = 1
    """Policy-gradient steps of adaptation during meta-training (0 is allowed: no adaptation)."""
    iterations: int = 500
    """Meta-iterations."""
    net: NetConfig = NetConfig(hidden=(100, 100), activation="relu")
    """The policy network (a policy-only head over this torso)."""
    log_every: int = 10
    """Meta-iterations averaged into one metrics row."""
    eval_tasks: int = 40
    """Test tasks of the adaptation table (drawn from a fixed key)."""
    eval_steps: int = 3
    """Adaptation steps of the adaptation table (returns after 0..eval_steps steps)."""

    POSITIVE: ClassVar[tuple[str, ...]] = (
        "meta_batch",
        "num_trajectories",
        "horizon",
        "iterations",
        "log_every",
        "eval_tasks",
    )

    def validate(self) -> None:
        check_method(self.method)
        check_family(self.family)
        parse_ranges(self.family, self.family_ranges)
        for name in self.POSITIVE:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("inner_steps", "eval_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.method == "reptile" and self.inner_steps < 1:
            raise ValueError("reptile needs inner_steps >= 1 (its update is adapted - phi)")
        self.net.validate()

    @property
    def rows_every(self) -> int:
        """Meta-iterations per metrics row: `log_every`, or its largest divisor of `iterations` below it."""
        return largest_divisor_at_most(self.iterations, self.log_every)

    @property
    def first_order(self) -> bool:
        return self.method == "fomaml"

    @property
    def train_inner_steps(self) -> int:
        """Inner steps in meta-training: none for the pretrained baseline."""
        return 0 if self.method == "pretrain" else self.inner_steps

    @property
    def samplings_per_task(self) -> int:
        """Batches of trajectories one task costs per meta-iteration."""
        if self.method == "reptile":
            return self.inner_steps
        if self.method == "platipus":  # two batches from the mean policy (train / test conditioning)
            return self.train_inner_steps + 3
        return self.train_inner_steps + 1

    @property
    def env_steps_per_iteration(self) -> int:
        return self.meta_batch * self.num_trajectories * self.horizon * self.samplings_per_task


@pytree.dataclass
class MetaHParams:
    """Traced meta-learning hyperparameters (vmappable for sweeps)."""

    inner_lr: float = 0.1
    """Step size alpha of the inner policy-gradient steps (plain SGD)."""
    inner_max_grad_norm: float = 1e9
    """Global-norm clip of each inner policy-gradient step's gradient (before the step)."""
    outer_lr: float = 3e-3
    """Adam step size of the meta-update (MAML, FOMAML, PLATIPUS, pretrain), decayed linearly to 0."""
    reptile_eps: float = 1.0
    """Reptile's initial step eps (phi += eps (adapted - phi)); annealed linearly to 0."""
    gamma: float = 0.99
    """Discount of the policy-gradient returns."""
    max_grad_norm: float = 1.0
    """Global-norm clip of the meta-gradient."""
    step_loss_weight: float = 0.0
    """MAML/FOMAML with inner_steps k > 1: weight w of the intermediate steps' losses in the
    meta-objective (L_k + w sum_{j<k} L_j) / (1 + w (k - 1)) (MAML++'s multi-step loss); 0 is MAML."""
    kl_weight: float = 1e-4
    """PLATIPUS: weight of KL(q(phi | test data) || p(phi | train data)) in the meta-objective."""
    init_log_var: float = -9.0
    """PLATIPUS: initial log-variance of the prior and posterior over the initial parameters."""

    POSITIVE: ClassVar[tuple[str, ...]] = (
        "inner_lr",
        "inner_max_grad_norm",
        "outer_lr",
        "reptile_eps",
        "max_grad_norm",
    )

    if TYPE_CHECKING:  # added by pytree.dataclass

        def replace(self, **changes: Any) -> Self: ...

    def validate(self) -> None:
        """Check concrete values (called by the CLI before compiling)."""
        check_finite_fields(self)
        for name in self.POSITIVE:
            check_positive(name, getattr(self, name))
        check_range("gamma", self.gamma, 0.0, 1.0)
        for name in ("kl_weight", "step_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
