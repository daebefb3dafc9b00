"""Checks shared by every config, and the `Extension` base class with its registry (jax-free).

An extension is a capability plugged into any algorithm (docs/architecture.md, "Extensions"): a
frozen dataclass on `config.extensions` whose fields are its static config, with its own traced
hyperparameters (`hparams.ext[name]`), training state (`state.ext[name]`), hooks and loss term.
Its declaration and validation live here; what it builds is jax code in `rlcx_jax.seams` and the
extension's own module.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import types
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    import jax

    from rlcx_jax.seams import BuildContext, ExtrasFn, Hooks, LossTerm, Params, PyTree

__all__ = [
    "RUN_CONFIG_FILE",
    "PRNG_IMPLS",
    "check_positive",
    "check_range",
    "check_minibatches",
    "check_prng_impl",
    "largest_divisor_at_most",
    "Extension",
    "EXTENSION_TYPES",
    "register_extension",
    "check_extensions",
    "complete_ext_hparams",
    "ConfigError",
    "to_jsonable",
    "from_jsonable",
    "check_directory_path",
]

RUN_CONFIG_FILE = "config.json"
"""A run directory's config (`rlcx_jax.checkpoint`)."""
PRNG_IMPLS = ("threefry2x32", "unsafe_rbg", "rbg")
"""PRNG implementations training can run on (`rlcx_jax.prng.jax_impl` maps them to jax's)."""


def check_finite_fields(obj: Any) -> None:
    """Every int or float field of the dataclass `obj` is finite (a one-line error names the first that is not)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, int | float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be finite, got {value}")


def check_positive(name: str, value: int | float) -> None:
    if not (value > 0 and math.isfinite(value)):  # NaN fails the comparison
        raise ValueError(f"{name} must be positive and finite, got {value}")


def check_range(name: str, value: float, low: float, high: float, high_inclusive: bool = True) -> None:
    ok = low <= value <= high if high_inclusive else low <= value < high
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}")


def check_minibatches(steps_per_update: int, num_minibatches: int) -> None:
    """A rollout of `steps_per_update` samples (num_envs * num_steps) splits into equal minibatches."""
    if steps_per_update % num_minibatches != 0:
        raise ValueError(
            f"num_envs * num_steps ({steps_per_update}) must be divisible by num_minibatches ({num_minibatches})"
        )


def check_prng_impl(impl: str) -> None:
    if impl not in PRNG_IMPLS:
        raise ValueError(f"Unknown prng_impl {impl!r}; expected one of {PRNG_IMPLS}")


def largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of `n` that is <= `limit` (at least 1)."""
    for d in range(min(n, max(limit, 1)), 0, -1):
        if n % d == 0:
            return d
    return 1


# ----------------------------------------------------------------------------------------------
# Extensions
# ----------------------------------------------------------------------------------------------
EXTENSION_TYPES: dict[str, type[Extension]] = {}


def register_extension(cls: type[Extension]) -> type[Extension]:
    """Class decorator: make an extension type known by its `name`, so run directories that use it
    can be written to and read back from `config.json`."""
    name = cls.name
    if not name or not name.isidentifier():
        raise ValueError(f"Extension name must be an identifier, got {name!r}")
    known = EXTENSION_TYPES.get(name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"Another extension type ({known.__qualname__}) is registered as {name!r}")
    EXTENSION_TYPES[name] = cls
    return cls


@dataclasses.dataclass(frozen=True)
class Extension:
    """Base class of a capability plugged into any algorithm.

    Subclass it as a frozen dataclass (its fields are the static config), set `name` (the key of
    its hyperparameters in `hparams.ext` and of its state in `state.ext`) and override what it
    needs. Every method has a do-nothing default.
    """

    name: ClassVar[str] = ""

    def validate(self) -> None:
        """Check the static config (called before anything compiles)."""

    def default_hparams(self) -> PyTree:
        """The traced hyperparameters (a `pytree.dataclass` or `flax.struct` dataclass), or None."""
        return None

    def validate_hparams(self, hparams: PyTree) -> None:
        """Check concrete hyperparameter values (called by the CLI before compiling)."""

    def check_run(self, config: Any, hparams: PyTree) -> None:
        """Check this extension against the run it is part of: the algorithm's config (network,
        environment) and this extension's concrete hyperparameters (called by the CLI before jax loads)."""

    def hooks(self, ctx: BuildContext) -> Hooks:
        """Forward-pass and optimizer hooks; `post_update` receives this extension's hparams."""
        from rlcx_jax.seams import Hooks

        return Hooks()

    def init_state(self, key: jax.Array, params: Params, hparams: PyTree) -> PyTree:
        """This extension's part of the training state (`state.ext[name]`), or None."""
        return None

    def loss_term(self, ctx: BuildContext) -> LossTerm | None:
        """A term added to the algorithm's loss, or None. `ctx.apply` is set here."""
        return None

    def extras(self, ctx: BuildContext) -> ExtrasFn | None:
        """Per-sample data for the loss term, computed once per update on the whole batch before
        any minibatching, found by the term in `batch.extras[name]`."""
        return None


def check_extensions(extensions: tuple[Extension, ...]) -> None:
    """Each entry is an Extension with a distinct name; each validates."""
    seen: set[str] = set()
    for ext in extensions:
        if not isinstance(ext, Extension):
            raise ValueError(f"extensions must be Extension instances, got {type(ext).__name__}")
        if not ext.name:
            raise ValueError(f"{type(ext).__name__} has no name")
        if ext.name in seen:
            raise ValueError(f"Two extensions are named {ext.name!r}")
        seen.add(ext.name)
        ext.validate()


def complete_ext_hparams(extensions: tuple[Extension, ...], ext: Mapping[str, Any]) -> dict[str, Any]:
    """`ext` with every extension's default hyperparameters filled in where they are missing."""
    names = {e.name for e in extensions}
    unknown = sorted(set(ext) - names)
    if unknown:
        raise ValueError(f"hparams.ext has entries {unknown} for no configured extension (have {sorted(names)})")
    return {e.name: ext[e.name] if e.name in ext else e.default_hparams() for e in extensions}


# ----------------------------------------------------------------------------------------------
# Config <-> JSON (run directories, recipes)
# ----------------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A stored config (JSON, TOML) that does not fit its dataclass."""


def to_jsonable(obj: Any) -> Any:
    """Dataclasses (configs, hparams) to plain JSON values; an extension carries its registered name
    under "extension" so `from_jsonable` can find its type again."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {"extension": obj.name, **fields} if isinstance(obj, Extension) else fields
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [to_jsonable(x) for x in obj]
    if hasattr(obj, "__array__"):
        return np.asarray(obj).tolist()
    return obj


def _extension_from_json(value: dict[str, Any]) -> Extension:
    fields = dict(value)
    name = fields.pop("extension", None)
    if name not in EXTENSION_TYPES:
        raise ConfigError(
            f"Unknown extension {name!r} (known: {sorted(EXTENSION_TYPES)}); import the module that defines it first"
        )
    return from_jsonable(EXTENSION_TYPES[name], fields)


def _from_value(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, Extension):
        return _extension_from_json(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_jsonable(tp, value)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_value(args[0], v) for v in value)
        return tuple(_from_value(a, v) for a, v in zip(args, value)) if args else tuple(value)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        for arg in typing.get_args(tp):
            if arg is not type(None):
                return _from_value(arg, value)
    if tp is float and value is not None:
        return float(value)
    return value


def from_jsonable(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (nested) config dataclass from `to_jsonable` output, with type conversion."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {unknown}")
    return cls(**{k: _from_value(hints[k], v) for k, v in data.items()})


def check_directory_path(path: pathlib.Path, flag: str = "--out") -> None:
    """Refuse, before anything is written, a directory path that cannot be one: `path` or its
    nearest existing ancestor is a file (mkdir would raise NotADirectoryError / FileExistsError)."""
    path = pathlib.Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "" if candidate == path else f" ({candidate} is a file)"
                raise ConfigError(f"{flag} {path}: not a directory{where}")
            return
