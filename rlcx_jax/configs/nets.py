"""`NetConfig`, the static description of a network, and the names it may use (jax-free).

The torso names are those registered with `rlcx_jax.nets.register_torso`; the built-in ones are
listed here so that a config validates before the network modules (flax) are imported.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Collection

__all__ = ["NetConfig", "ACTIVATION_NAMES", "TORSO_NAMES", "add_torso_name"]

ACTIVATION_NAMES = ("tanh", "relu", "gelu", "elu", "silu")
TORSO_NAMES: set[str] = {"mlp", "cnn"}
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
    """A registered torso: mlp (flattens any observation), cnn (MinAtar-style conv, then hidden) or one of yours."""
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
    dueling: bool = False
    """Q-networks only: Q = V + A - mean(A), a state-value and an advantage stream over the torso (Wang et al. 2016)."""

    def validate(self) -> None:
        if self.torso not in TORSO_NAMES:
            raise unknown_name("torso", self.torso, TORSO_NAMES)
        if self.activation not in ACTIVATION_NAMES:
            raise unknown_name("activation", self.activation, ACTIVATION_NAMES)
        if any(int(h) <= 0 for h in self.hidden):
            raise ValueError(f"Hidden widths must be positive, got {self.hidden}")
        for name in ("conv_features", "conv_kernel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
