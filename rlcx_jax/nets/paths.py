"""The one parameter-path selector: masks, QAT, export and size accounting pick parameters here.

A parameter's *path* is its '/'-joined keys, e.g. ``"actor_torso/Dense_0/kernel"``. A selection is
``include`` regexes (a bare string is one regex) minus ``exclude`` regexes, each matched against the
whole path (`re.fullmatch`). The rules, the same for every caller:
* an ``include`` regex that matches no path at all is an error (a typo would otherwise silently
  leave layers unpruned or unquantized); an ``exclude`` regex may match nothing;
* a selection that ends up empty is an error;
* both errors list the available paths.
Role-based selection (``layout.patterns(...)``) produces ordinary regexes, so it follows the same rules.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax

Tree = Any
Patterns = str | Sequence[str]

__all__ = ["Patterns", "path_str", "flatten_with_paths", "param_paths", "compile_patterns", "selected_paths", "select"]


def _key_name(key: Any) -> str:
    """One path entry as text: dict key, sequence index or attribute name."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: Sequence[Any]) -> str:
    """'actor_torso/Dense_0/kernel' from a jax key path."""
    return "/".join(_key_name(k) for k in path)


def flatten_with_paths(tree: Tree) -> dict[str, Any]:
    """{path: leaf} in jax's leaf order (None leaves are dropped, as in any pytree)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_str(p): leaf for p, leaf in leaves}


def param_paths(tree: Tree) -> list[str]:
    """The path of every leaf, e.g. ``["actor_torso/Dense_0/bias", ...]``."""
    return list(flatten_with_paths(tree))


def compile_patterns(patterns: Patterns, what: str) -> list[re.Pattern[str]]:
    """Compile regexes (a bare string is one regex); a bad regex is a one-line ValueError."""
    if isinstance(patterns, str):
        patterns = (patterns,)
    try:
        return [re.compile(p) for p in patterns]
    except re.error as err:
        raise ValueError(f"Invalid {what} regex in {tuple(patterns)}: {err}") from err


def selected_paths(tree: Tree, include: Patterns, exclude: Patterns = ()) -> list[str]:
    """Paths that fully match some `include` regex and no `exclude` regex, in leaf order."""
    inc, exc = compile_patterns(include, "include"), compile_patterns(exclude, "exclude")
    paths = param_paths(tree)
    for pattern in inc:
        if not any(pattern.fullmatch(p) for p in paths):
            raise ValueError(f"include regex {pattern.pattern!r} matches no parameter; paths are {paths}")
    chosen = [p for p in paths if any(r.fullmatch(p) for r in inc) and not any(r.fullmatch(p) for r in exc)]
    if not chosen:
        raise ValueError(
            f"include={tuple(r.pattern for r in inc)} exclude={tuple(r.pattern for r in exc)} select no "
            f"parameter; paths are {paths}"
        )
    return chosen


def select(tree: Tree, include: Patterns, exclude: Patterns = ()) -> Tree:
    """Tree of Python bools parallel to `tree`: True where `selected_paths` would list the path."""
    chosen = set(selected_paths(tree, include, exclude))
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return jax.tree_util.tree_unflatten(treedef, [path_str(p) in chosen for p, _ in with_path])
