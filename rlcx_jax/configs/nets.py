"""`NetConfig`, the static description of a network, and the names it may use (jax-free).

The torso names are those registered with `rlcx_jax.nets.register_torso`; the built-in ones are
listed here so that a config validates before the network modules (flax) are imported.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Collection

__all__ = [
    "NetConfig",
    "ACTIVATION_NAMES",
    "DENSE_GRADS",
    "POOL_NAMES",
    "TASK_MODES",
    "ATTENTION_TORSOS",
    "TORSO_NAMES",
    "add_torso_name",
]

ACTIVATION_NAMES = ("tanh", "relu", "gelu", "elu", "silu")
POOL_NAMES = ("attention", "mean")
TASK_MODES = ("heads", "embedding", "shared")
DENSE_GRADS = ("transposed", "autodiff")
"""Multi-task networks: per-task output layers, the task one-hot joined to the features, or one shared head."""
ATTENTION_TORSOS = ("attention", "memory")
"""Torsos built from multi-head self-attention blocks (`rlcx_jax.nets.attention`)."""
TORSO_NAMES: set[str] = {"mlp", "cnn", "attention", "memory", "deepsets"}
"""Torsos `NetConfig.torso` may name: the built-in ones and every registered one."""


def add_torso_name(name: str) -> None:
    """Called by `rlcx_jax.nets.register_torso`."""
    TORSO_NAMES.add(name)


def unknown_name(what: str, name: str, known: Collection[str]) -> ValueError:
    """A one-line error for an unknown `what` called `name`, with the closest known name."""
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"Unknown {what} {name!r}.{hint} Known: {sorted(known)}")


@dataclasses.dataclass(frozen=True)
class NetConfig:
    """Static network description (hashable; part of an algorithm's config)."""

    torso: str = "mlp"
    """A registered torso: mlp (flattens any observation), cnn (MinAtar-style conv, then hidden), attention
    (tokens, self-attention blocks, pooled, then hidden), memory (attention over the tokens and learned
    memory slots), deepsets (per-entity MLP, pooled, then hidden) or one of yours."""
    hidden: tuple[int, ...] = (64, 64)
    """Widths of the dense layers."""
    activation: str = "tanh"
    """Activation of the dense layers: tanh, relu, gelu, elu or silu."""
    separate_critic: bool = True
    """Actor and critic get their own torsos (PureJaxRL default) or share one."""
    conv_features: int = 16
    """Channels of the CNN's conv layer (Young & Tian 2019, MinAtar)."""
    conv_kernel: int = 3
    """Kernel size of the CNN's conv layer."""
    attention_width: int = 64
    """Attention torsos: the token width (model dimension) of the self-attention blocks."""
    attention_heads: int = 4
    """Attention torsos: heads per attention layer; must divide `attention_width`."""
    attention_depth: int = 2
    """Attention torsos: pre-norm self-attention blocks (attention + token MLP, each residual)."""
    attention_pool: str = "attention"
    """Attention and deepsets torsos: tokens to one feature vector by a learned query ("attention",
    Lee et al. 2019, PMA) or by the mean over present tokens ("mean")."""
    memory_slots: int = 8
    """The memory torso: learned key/value slots every attention layer also attends to."""
    entity_mask: bool = True
    """Entity observations (N, F): feature 0 of a token is 1 for a present entity and 0 for padding,
    and padding tokens are masked out of attention and pooling."""
    num_tasks: int = 0
    """Multi-task networks (0: off): flat observations end with a one-hot task id of this length
    (`multitask.TaskSetEnv`); the torso reads the rest, the task id goes to the heads (`task_mode`)."""
    task_mode: str = "heads"
    """Multi-task networks: heads (one output layer per task over the shared torso), embedding (the
    one-hot joins the torso features before one shared head) or shared (one head, task id unused)."""
    dueling: bool = False
    """Q-networks only: Q = V + A - mean(A), a state-value and an advantage stream over the torso (Wang et al. 2016)."""
    dense_grad: str = "transposed"
    """How dense layers take their kernel gradient: "transposed" (a standard matrix product on a transposed
    copy of the inputs, faster on XLA:CPU; reverse mode only) or "autodiff" (JAX's own rule; needed for
    forward mode: jax.jvp, jacfwd, hessian). The same values either way, up to float rounding."""

    def validate(self) -> None:
        if self.torso not in TORSO_NAMES:
            raise unknown_name("torso", self.torso, TORSO_NAMES)
        if self.activation not in ACTIVATION_NAMES:
            raise unknown_name("activation", self.activation, ACTIVATION_NAMES)
        if any(int(h) <= 0 for h in self.hidden):
            raise ValueError(f"Hidden widths must be positive, got {self.hidden}")
        if self.attention_pool not in POOL_NAMES:
            raise unknown_name("attention pooling", self.attention_pool, POOL_NAMES)
        for name in ("attention_width", "attention_heads", "attention_depth", "memory_slots"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.attention_width % self.attention_heads:
            raise ValueError(
                f"attention_heads={self.attention_heads} must divide attention_width={self.attention_width}"
            )
        if self.num_tasks < 0 or self.num_tasks == 1:
            raise ValueError(f"num_tasks must be 0 (off) or >= 2, got {self.num_tasks}")
        if self.task_mode not in TASK_MODES:
            raise unknown_name("task mode", self.task_mode, TASK_MODES)
        if self.dense_grad not in DENSE_GRADS:
            raise unknown_name("dense gradient", self.dense_grad, DENSE_GRADS)
        for name in ("conv_features", "conv_kernel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
