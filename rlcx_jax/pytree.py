"""Frozen dataclasses that are jax pytrees, declared without importing jax.

`@pytree.dataclass` is `flax.struct.dataclass` for classes that must be importable before jax is
(the configs and hyperparameters the CLI parses and validates in well under a second, while
`import jax` alone takes over one): a frozen dataclass with `replace(**changes)`, registered with
`jax.tree_util.register_dataclass` as soon as jax is loaded. Fields are pytree leaves (traced, so a
sweep is one more `vmap`) unless declared `field(static=True)` (part of the tree's structure).

Registration happens at once when jax is already imported, else right after jax's own module has
executed, through an import hook that removes itself: nothing the user does can see one of these
classes unregistered.
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any, TypeVar, dataclass_transform

__all__ = ["dataclass", "field", "is_registered"]

T = TypeVar("T")
STATIC = "pytree_node"
"""Field metadata key (flax's name, so `flax.struct.field(pytree_node=False)` means the same here)."""

_pending: list[type] = []
_registered: set[type] = set()


def field(*, static: bool = False, **kwargs: Any) -> Any:
    """A dataclass field; `static=True` makes it part of the pytree's structure, not a leaf."""
    metadata = {**kwargs.pop("metadata", {}), STATIC: not static}
    return dataclasses.field(metadata=metadata, **kwargs)


def _replace(self: T, **changes: Any) -> T:
    return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, field))
def dataclass(cls: type[T]) -> type[T]:
    """Make `cls` a frozen dataclass with `replace`, registered as a jax pytree once jax loads."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    if "replace" not in cls.__dict__:
        cls.replace = _replace  # type: ignore[attr-defined]
    _pending.append(cls)
    if _jax_loaded():
        _register_pending()
    else:
        _install_hook()
    return cls


def is_registered(cls: type) -> bool:
    """Whether `cls` is registered with jax yet (it is once jax has been imported)."""
    return cls in _registered


def _jax_loaded() -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and hasattr(jax, "tree_util")


def _register_pending() -> None:
    from jax import tree_util

    while _pending:
        cls = _pending.pop(0)
        fields = dataclasses.fields(cls)
        data = [f.name for f in fields if f.metadata.get(STATIC, True)]
        meta = [f.name for f in fields if not f.metadata.get(STATIC, True)]
        tree_util.register_dataclass(cls, data, meta)
        _registered.add(cls)


class _RegisterAfterJax(importlib.abc.MetaPathFinder):
    """Finds `jax` with the other finders and registers the pending classes once it has executed."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "jax":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("jax")
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            _register_pending()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _install_hook() -> None:
    if not any(isinstance(f, _RegisterAfterJax) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterJax())
