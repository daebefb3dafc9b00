"""Compression settings (jax-free; see `rlcx_jax.configs`): quantizer specs, compression during
training (`CompressConfig`, an extension, with its traced `CompressHParams`) and post-training
compression of a trained run (`CompressOptions`, what `rlcx compress` does).

The transforms themselves live in `rlcx_jax.compress` (quant, masks, training) and
`rlcx_jax.workflows.compress_run`, which re-export these classes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from rlcx_jax import pytree
from rlcx_jax.configs.base import Extension, register_extension

if TYPE_CHECKING:
    from rlcx_jax.seams import BuildContext, Hooks

__all__ = [
    "SCHEMES",
    "KMEANS_INITS",
    "RANGE_METHODS",
    "MIN_BITS",
    "MAX_BITS",
    "DYNAMIC_RANGES",
    "DISTRIBUTIONS",
    "check_sparsity",
    "QuantSpec",
    "PRUNE_SCHEDULES",
    "DEFAULT_PRUNE_ROLES",
    "DEFAULT_PRUNE_INCLUDE",
    "QAT_INCLUDE",
    "CompressHParams",
    "CompressConfig",
    "QUANT_FORMAT",
    "CompressOptions",
    "parse_quant",
]

SCHEMES = ("uniform", "log", "kmeans")
KMEANS_INITS = ("optimal", "linear")
RANGE_METHODS = ("minmax", "percentile")
MIN_BITS, MAX_BITS = 2, 16
DYNAMIC_RANGES = ("sample", "tensor")
"""Activation ranges measured per sample (each observation its own) or over the whole tensor."""
DISTRIBUTIONS = ("uniform", "global", "erk")
"""How a sparsity is spread over layers (`rlcx_jax.compress.masks`)."""


def check_sparsity(sparsity: Any) -> float:
    """A concrete sparsity checked: a real scalar in [0, 1), returned as a Python float."""
    array = np.asarray(sparsity)
    if array.shape != () or array.dtype.kind not in "biuf":
        raise ValueError(f"Sparsity must be a real scalar, got {sparsity!r}")
    value = float(array)
    if not 0.0 <= value < 1.0:  # also rejects NaN
        raise ValueError(f"Sparsity must be in [0, 1), got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# Quantizers
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How to quantize one kind of tensor (hashable: static under jit).

    scheme: "uniform" (Jacob et al. 2018), "log" (Miyashita et al. 2016) or "kmeans" (Han et al. 2016).
    bits: code width, 2..16.
    symmetric: uniform only; zero point fixed at 0 (True) or an integer zero point (False).
    per_channel: one range (scale, exponent) per output channel = last axis; else one per tensor.
        k-means always uses one codebook per tensor.
    range_method: how activation ranges are measured (dynamic ranges and `calibrate`): "minmax" or
        "percentile" (the `percentile`-th percentile of |x|, or of x at both tails if asymmetric).
        Weight ranges are always min/max.
    kmeans_iters: number of Lloyd iterations (fixed, so the fit is deterministic and jittable).
    kmeans_init: where Lloyd starts. "optimal": the exact 1-D clustering of the values grouped into
        up to ~512 equal-weight atoms (dynamic programming; within 0.1% of the optimal squared error
        on trained kernels; ~10 ms for a 64x64 kernel on CPU). "linear": evenly spaced over
        [min, max] (Han et al.; ~0.5 ms, up to 2x the optimal error on small or heavy-tailed
        kernels). k-means QAT fits from scratch once, then re-assigns by warm-started Lloyd steps
        (`compress.training.kmeans_qat_transform`).
    """

    scheme: str = "uniform"
    bits: int = 8
    symmetric: bool = True
    per_channel: bool = False
    range_method: str = "minmax"
    percentile: float = 99.99
    kmeans_iters: int = 16
    kmeans_init: str = "optimal"

    def validate(self) -> None:
        """Raise ValueError on an invalid spec (call before anything is compiled)."""
        if self.scheme not in SCHEMES:
            raise ValueError(f"Unknown quantization scheme {self.scheme!r}; expected one of {SCHEMES}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)):
            raise ValueError(f"bits must be an int, got {self.bits!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {self.bits}")
        if self.range_method not in RANGE_METHODS:
            raise ValueError(f"Unknown range_method {self.range_method!r}; expected one of {RANGE_METHODS}")
        if not 0.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if isinstance(self.kmeans_iters, bool) or not isinstance(self.kmeans_iters, (int, np.integer)):
            raise ValueError(f"kmeans_iters must be an int, got {self.kmeans_iters!r}")
        if self.kmeans_iters < 1:
            raise ValueError(f"kmeans_iters must be >= 1, got {self.kmeans_iters}")
        if self.kmeans_init not in KMEANS_INITS:
            raise ValueError(f"Unknown kmeans_init {self.kmeans_init!r}; expected one of {KMEANS_INITS}")
        if self.scheme == "kmeans" and self.per_channel:
            raise ValueError("k-means weight sharing uses one codebook per tensor; set per_channel=False")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantSpec:
        spec = cls(**dict(data))
        spec.validate()
        return spec


# ----------------------------------------------------------------------------------------------
# Compression during training (an extension)
# ----------------------------------------------------------------------------------------------
PRUNE_SCHEDULES = ("none", "gradual", "oneshot", "fixed")
DEFAULT_PRUNE_ROLES = ("torso",)  # output heads are never pruned by default: that removes whole actions
DEFAULT_PRUNE_INCLUDE = (r".*kernel",)  # within those roles: kernels; biases stay dense
QAT_INCLUDE = (r".*kernel",)


@pytree.dataclass
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
    prune_distribution: str = "erk"
    """How sparsity spreads over layers: erk (Evci et al. 2020; the default), uniform or global. ERK keeps
    small layers denser (density ~ (n_in + n_out) / (n_in n_out)): with uniform 90%, a layer with 4 inputs
    leaves ~0.9^4 = 66% of its units without any input, which broke the 256x256 CartPole critic."""
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
    """One range per output channel instead of per tensor (uniform, log; k-means: one codebook per tensor)."""
    qat_symmetric: bool = True
    """Symmetric integer grid (int<b>); False: asymmetric with a zero point (uint<b>)."""
    qat_activations: bool = True
    """Also fake-quantize layer inputs."""
    qat_activation_range: str = "sample"
    """Activation ranges: sample (each observation its own: acting and learning see the same network) or tensor."""
    qat_recluster_every: int = 16
    """k-means QAT: optimizer steps between re-assignments of the clusters (centroids move every step)."""
    qat_recluster_iters: int = 4
    """k-means QAT: Lloyd steps of a re-assignment, started from the current codebook."""

    @property
    def prunes(self) -> bool:
        return self.prune_schedule != "none"

    def validate(self) -> None:
        if self.prune_schedule not in PRUNE_SCHEDULES:
            raise ValueError(f"Unknown prune_schedule {self.prune_schedule!r}; expected one of {PRUNE_SCHEDULES}")
        if self.prune_distribution not in DISTRIBUTIONS:
            raise ValueError(f"Unknown prune_distribution {self.prune_distribution!r}; expected one of {DISTRIBUTIONS}")
        if not 0.0 <= self.prune_start <= self.prune_end <= 1.0:
            raise ValueError(
                f"Need 0 <= prune_start <= prune_end <= 1, got prune_start={self.prune_start}, "
                f"prune_end={self.prune_end}"
            )
        if self.prune_every < 1:
            raise ValueError(f"prune_every must be >= 1, got {self.prune_every}")
        if self.qat_bits != 0:
            self.qat_spec().validate()
            if self.shares_weights and self.qat_activations:
                raise ValueError("qat_scheme='kmeans' shares weights only; set qat_activations=False")
        for name in ("qat_recluster_every", "qat_recluster_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.qat_activation_range not in DYNAMIC_RANGES:
            raise ValueError(f"qat_activation_range must be one of {DYNAMIC_RANGES}, got {self.qat_activation_range!r}")

    def qat_spec(self) -> QuantSpec:
        """QAT's quantizer (k-means: the first fit is PTQ's, from the optimal clustering)."""
        return QuantSpec(
            scheme=self.qat_scheme,
            bits=self.qat_bits,
            symmetric=self.qat_symmetric,
            per_channel=self.qat_per_channel and self.qat_scheme != "kmeans",
        )

    @property
    def shares_weights(self) -> bool:
        """k-means QAT: the parameters are the shared weights (`kmeans_qat_transform`)."""
        return self.qat_bits > 0 and self.qat_scheme == "kmeans"

    def default_hparams(self) -> CompressHParams:
        return CompressHParams()

    def validate_hparams(self, hparams: CompressHParams) -> None:
        check_sparsity(hparams.sparsity)
        if float(hparams.sparsity) > 0 and self.prune_schedule in ("none", "fixed"):
            raise ValueError(
                f"sparsity={float(hparams.sparsity)} needs prune_schedule 'gradual' or 'oneshot' "
                f"(it is {self.prune_schedule!r})"
            )

    def hooks(self, ctx: BuildContext) -> Hooks:
        """The pruning transformation after the optimizer (its target sparsity read from this
        extension's traced hyperparameters) and QAT's weight and activation fake-quantization
        (`rlcx_jax.compress.training.compress_hooks`)."""
        from rlcx_jax.compress.training import compress_hooks

        return compress_hooks(self, ctx)


# ----------------------------------------------------------------------------------------------
# Post-training compression of a run
# ----------------------------------------------------------------------------------------------
QUANT_FORMAT = re.compile(r"(int|uint|log|kmeans)(\d+)")


@dataclasses.dataclass(frozen=True)
class CompressOptions:
    """What to do to a trained policy (all off by default)."""

    prune: float = 0.0
    """Unstructured magnitude sparsity in [0, 1) of the prunable kernels (heads excluded)."""
    distribution: str = "uniform"
    """How the sparsity is spread over layers: uniform, global or erk."""
    nm: str = ""
    """N:M sparsity along each kernel's input axis, e.g. 2:4 (combined with --prune)."""
    structured: float = 0.0
    """Fraction of hidden units (neurons / conv filters) removed physically, ranked by L1 norm."""
    quant: str = ""
    """Weight quantization: int<b> (symmetric), uint<b> (asymmetric), log<b>, kmeans<b>; b in 2..16."""
    per_channel: bool = False
    """One scale per output channel (uniform schemes); costs 4 bytes per channel in the file."""
    finetune_steps: int = 0
    """After pruning, train on for this many env steps with the mask fixed (0: no fine-tuning)."""
    activations: str = ""
    """Also fake-quantize every layer's input with ranges calibrated on rollouts: minmax or percentile."""
    roles: tuple[str, ...] = DEFAULT_PRUNE_ROLES
    """Roles of the network's layout that may be pruned (torso, actor_head, critic_head, q_head, policy, critic)."""
    include: tuple[str, ...] = DEFAULT_PRUNE_INCLUDE
    """Regexes (by path, e.g. .*kernel) of the parameters pruned within those roles."""
    exclude: tuple[str, ...] = ()
    """Regexes of parameters never pruned."""
    fold_dead_units: bool = True
    """After pruning (mlp / cnn torsos): fold units left without inputs into the next layer's biases and
    clear units nothing reads (Han et al. 2015); same function, fewer stored weights."""

    def validate(self) -> None:
        if self.prune:
            check_sparsity(self.prune)
        if self.structured:
            check_sparsity(self.structured)
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"Unknown distribution {self.distribution!r}; expected one of {DISTRIBUTIONS}")
        if self.nm:
            self.nm_pair()
        if self.quant:
            parse_quant(self.quant, self.activations, self.per_channel).validate()
        if self.activations and not self.quant:
            raise ValueError("--activations needs --quant (the bit width and scheme of the activations)")
        if self.finetune_steps < 0:
            raise ValueError(f"--finetune-steps must be >= 0, got {self.finetune_steps}")
        if self.finetune_steps and not (self.prune or self.nm):
            raise ValueError("--finetune-steps needs --prune or --nm (it retrains the pruned network)")
        if self.activations not in ("", "minmax", "percentile"):
            raise ValueError(f"--activations must be minmax or percentile, got {self.activations!r}")

    def nm_pair(self) -> tuple[int, int]:
        match = re.fullmatch(r"(\d+):(\d+)", self.nm)
        if not match:
            raise ValueError(f"--nm must look like N:M (e.g. 2:4), got {self.nm!r}")
        return int(match.group(1)), int(match.group(2))


def parse_quant(text: str, range_method: str = "", per_channel: bool = False) -> QuantSpec:
    """'int8' -> uniform symmetric 8-bit; 'uint4' asymmetric; 'log4'; 'kmeans3'."""
    match = QUANT_FORMAT.fullmatch(text)
    if not match:
        raise ValueError(f"--quant must be int<bits>, uint<bits>, log<bits> or kmeans<bits>, got {text!r}")
    kind, bits = match.group(1), int(match.group(2))
    scheme = {"int": "uniform", "uint": "uniform", "log": "log", "kmeans": "kmeans"}[kind]
    spec = QuantSpec(
        scheme=scheme,
        bits=bits,
        symmetric=kind != "uint",
        per_channel=per_channel and scheme == "uniform",
        range_method=range_method or "minmax",
    )
    spec.validate()
    return spec
