"""What a hyperparameter sweep varies, and the settings it expands to (jax-free).

A sweep trains one algorithm with one static config (`XxxConfig`: shapes, counts, network,
extensions, hence one compiled program) for many traced hyperparameter settings (`XxxHParams`,
including the extensions' `hparams.ext`) and seeds. Because only traced values vary, every
(setting, seed) pair is one row of a single `jit(vmap(train))` call (`rlcx_jax.sweep`).

    --grid lr=1e-4,3e-4,1e-3 --grid ent_coef=0,0.01      -> 6 settings (the Cartesian product)
    --random lr=loguniform:1e-4:1e-2 --samples 16         -> 16 settings drawn with NumPy from --seed
    both                                                   -> every random draw with every grid point

Names are the hyperparameter fields of the algorithm (`lr`, `gamma`, `clip_eps` ...) and of its
configured extensions, either bare (`sparsity`) when unambiguous or qualified (`compress.sparsity`).
Everything here is checked in plain Python, so a typo, an empty grid or a value out of range is a
one-line error before jax is imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
from typing import Any

import numpy as np

from rlcx_jax.configs.algorithms import HParams, TrainConfig
from rlcx_jax.configs.base import EXTENSION_TYPES, check_positive

__all__ = ["DISTRIBUTIONS", "Axis", "SweepSpec", "parse_grid", "parse_random", "parse_part", "parse_chunk_size"]

DISTRIBUTIONS = ("uniform", "loguniform")
"""How `--random` draws a value in [low, high]: uniform, or uniform in log space (low > 0)."""


@dataclasses.dataclass(frozen=True)
class Axis:
    """One swept hyperparameter: a list of grid values, or a distribution for random search."""

    name: str
    values: tuple[float, ...] = ()
    distribution: str = ""
    low: float = 0.0
    high: float = 0.0

    @property
    def is_random(self) -> bool:
        return bool(self.distribution)

    def describe(self) -> str:
        if self.is_random:
            return f"{self.name}={self.distribution}:{self.low:g}:{self.high:g}"
        return f"{self.name}=" + ",".join(f"{v:g}" for v in self.values)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.distribution == "loguniform":
            return np.exp(rng.uniform(math.log(self.low), math.log(self.high), n))
        return rng.uniform(self.low, self.high, n)


def _split_assignment(text: str, flag: str, example: str) -> tuple[str, str]:
    name, sep, rhs = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"{flag} expects NAME={example}, got {text!r}")
    if not rhs.strip():
        raise ValueError(f"{flag} {name.strip()}: the grid is empty (give at least one value)")
    return name.strip(), rhs.strip()


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{what}: {text!r} is not finite")
    return value


def parse_grid(text: str) -> Axis:
    """`NAME=V1,V2,...` -> a grid axis (duplicates refused: they would train the same setting twice)."""
    name, rhs = _split_assignment(text, "--grid", "V1,V2,...")
    items = [item.strip() for item in rhs.split(",")]
    if any(not item for item in items):
        raise ValueError(f"--grid {name}: empty value in {rhs!r}")
    values = tuple(_number(item, f"--grid {name}") for item in items)
    if len(set(values)) != len(values):
        raise ValueError(f"--grid {name}: repeated values in {rhs!r}")
    return Axis(name, values=values)


def parse_random(text: str) -> Axis:
    """`NAME=DIST:LOW:HIGH` -> a random-search axis (DIST in `DISTRIBUTIONS`)."""
    name, rhs = _split_assignment(text, "--random", "DIST:LOW:HIGH")
    parts = rhs.split(":")
    if len(parts) != 3 or parts[0] not in DISTRIBUTIONS:
        known = ", ".join(DISTRIBUTIONS)
        raise ValueError(f"--random {name}: expected DIST:LOW:HIGH with DIST one of {known}, got {rhs!r}")
    low, high = (_number(p, f"--random {name}") for p in parts[1:])
    if not low < high:
        raise ValueError(f"--random {name}: LOW ({low:g}) must be below HIGH ({high:g})")
    if parts[0] == "loguniform" and low <= 0:
        raise ValueError(f"--random {name}: loguniform needs LOW > 0, got {low:g}")
    return Axis(name, distribution=parts[0], low=low, high=high)


def parse_part(text: str) -> tuple[int, int]:
    """`I/N` -> (I, N): this process runs the settings s with s % N == I (one of N independent jobs)."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--part expects I/N (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--part {text}: need N >= 1 and 0 <= I < N")
    return index, count


def parse_chunk_size(text: str) -> int | None:
    """`auto` -> None (from a memory estimate); else a positive number of rows per compiled call."""
    if text == "auto":
        return None
    try:
        size = int(text)
    except ValueError:
        raise ValueError(f"--chunk-size expects a positive integer or auto, got {text!r}") from None
    if size < 1:
        raise ValueError(f"--chunk-size must be >= 1 (or auto), got {size}")
    return size


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A sweep: one algorithm and static config, a base setting, the swept axes and the seeds.

    Rows are (setting, seed) pairs, setting-major. Seed i of every setting uses the key of seed i
    of `rlcx train --seed SEED --seeds SEEDS` (common random numbers across settings), so a row
    reproduces a plain training run of its setting.
    """

    algorithm: str
    config: TrainConfig
    hparams: HParams
    grid: tuple[Axis, ...] = ()
    random: tuple[Axis, ...] = ()
    samples: int = 0
    """Random settings drawn (each combined with every grid point)."""
    seeds: int = 4
    seed: int = 0
    eval_episodes: int = 32
    """Evaluation episodes of each row's final policy."""

    @property
    def axes(self) -> tuple[Axis, ...]:
        return self.grid + self.random

    @property
    def num_settings(self) -> int:
        grid = math.prod(len(a.values) for a in self.grid) if self.grid else 1
        return grid * (self.samples if self.random else 1)

    @property
    def num_rows(self) -> int:
        return self.num_settings * self.seeds

    def validate(self) -> None:
        """Every check that needs no jax: axes, names, counts and every setting's values."""
        if not self.axes:
            raise ValueError("a sweep needs at least one --grid or --random axis")
        names = [a.name for a in self.axes]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"swept more than once: {', '.join(repeated)}")
        for axis in self.axes:
            if not axis.is_random and not axis.values:
                raise ValueError(f"--grid {axis.name}: the grid is empty")
            resolve(axis.name, self.config, self.hparams)
        if self.random and self.samples < 1:
            raise ValueError(f"--random needs --samples >= 1, got {self.samples}")
        if self.samples and not self.random:
            raise ValueError("--samples draws random settings: give at least one --random NAME=DIST:LOW:HIGH")
        check_positive("seeds", self.seeds)
        check_positive("eval_episodes", self.eval_episodes)
        for i, values in enumerate(self.setting_values()):
            try:
                self.setting(values).validate(self.config.extensions)
            except ValueError as e:
                raise ValueError(f"setting {i} ({describe(values)}): {e}") from None

    def setting_values(self) -> list[dict[str, float]]:
        """{axis name: value} of every setting, in row order (deterministic: `seed` seeds the draws)."""
        grid_points = list(itertools.product(*(a.values for a in self.grid)))
        if not self.random:
            return [dict(zip([a.name for a in self.grid], point)) for point in grid_points]
        rng = np.random.default_rng(self.seed)
        draws = {a.name: a.draw(rng, self.samples) for a in self.random}
        out = []
        for s in range(self.samples):
            drawn = {name: float(values[s]) for name, values in draws.items()}
            out += [{**dict(zip([a.name for a in self.grid], point)), **drawn} for point in grid_points]
        return out

    def setting(self, values: dict[str, float]) -> HParams:
        """The base hyperparameters with `values` (axis name -> value) put in place."""
        hparams = self.hparams
        for name, value in values.items():
            ext_name, field = resolve(name, self.config, hparams)
            if ext_name is None:
                hparams = hparams.replace(**{field: value})
            else:
                ext = _ext_hparams(self.config, hparams, ext_name)
                hparams = hparams.with_ext(ext_name, dataclasses.replace(ext, **{field: value}))
        return hparams


def describe(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in values.items())


def _ext_hparams(config: TrainConfig, hparams: HParams, ext_name: str) -> Any:
    if ext_name in hparams.ext:
        return hparams.ext[ext_name]
    ext = config.extension(ext_name)
    return None if ext is None else ext.default_hparams()


def _fields(obj: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []


def sweepable(config: TrainConfig, hparams: HParams) -> list[str]:
    """Every name a sweep over this config accepts, qualified extension names included."""
    names = [f for f in _fields(hparams) if f != "ext"]
    for ext in config.extensions:
        names += [f"{ext.name}.{f}" for f in _fields(_ext_hparams(config, hparams, ext.name))]
    return names


def resolve(name: str, config: TrainConfig, hparams: HParams) -> tuple[str | None, str]:
    """(extension name or None, field) of a swept name, or a one-line error saying why it cannot be swept."""
    algorithm = type(config).__name__.removesuffix("Config").lower()
    top = [f for f in _fields(hparams) if f != "ext"]
    if name in top:
        return None, name
    bare = name.split(".")[-1]
    owners = [e.name for e in config.extensions if bare in _fields(_ext_hparams(config, hparams, e.name))]
    if "." in name:
        ext_name, field = name.split(".", 1)
        if ext_name in owners:
            return ext_name, field
    elif len(owners) == 1:
        return owners[0], name
    elif len(owners) > 1:
        raise ValueError(f"{name} is a hyperparameter of several extensions; qualify it: {', '.join(owners)}")
    if bare in _fields(config) or bare in _fields(config.net):
        raise ValueError(
            f"{bare} is a static setting of {type(config).__name__} (it changes the compiled program, so it cannot "
            f"vary inside one sweep); the traced hyperparameters are: {', '.join(sweepable(config, hparams))}"
        )
    for ext_name, ext_type in EXTENSION_TYPES.items():
        default = ext_type().default_hparams()
        if bare in _fields(default) and config.extension(ext_name) is None:
            raise ValueError(f"{bare} belongs to the {ext_name} extension, which this {algorithm} run does not use")
    close = difflib.get_close_matches(name, sweepable(config, hparams), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"{algorithm} has no hyperparameter {name!r}.{hint} Sweepable: {', '.join(sweepable(config, hparams))}"
    )
