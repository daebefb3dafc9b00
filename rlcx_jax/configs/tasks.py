"""Task families for meta-learning, as plain data: names, sampled fields and their ranges, checks.

No jax here: the CLI validates `--family` and `--task-range` flags before jax loads. The samplers
that turn a family into batches of `EnvParams` live in `rlcx_jax.envs.tasks`.

A *task* is one environment's `EnvParams` value; a *family* is a distribution over tasks. Each
family samples the fields in `ranges` independently and uniformly, `field ~ U(low, high)`:

  point-nav-uniform  goal = (goal_x, goal_y), each ~ U(-0.5, 0.5)         (Finn et al. 2017, MAML)
  point-nav-circle   goal = 0.5 (cos angle, sin angle), angle ~ U(0, 2 pi)
  point-nav-sparse   as point-nav-circle; reward max(0.2 - d, 0)           (after Rakelly et al. 2019)
                     (the dense families end an episode within 0.01 of the goal on both axes, as MAML's
                     reference code does; the sparse one runs the full 100 steps)
  cartpole           length ~ U(0.25, 1), masspole ~ U(0.05, 0.5), masscart ~ U(0.5, 2),
                     force_mag ~ U(5, 15)
  cartpole-flip      force_mag = 10 s, s = +1 or -1 with probability 1/2 (no range fields)
  pendulum           m ~ U(0.5, 1.5), l ~ U(0.5, 1.5)
  acrobot            link_mass_1 ~ U(0.5, 1.5), link_mass_2 ~ U(0.5, 1.5)
  bandit             reward probabilities (arm_prob, 1 - arm_prob), arm_prob ~ U(0, 1)
  meta-maze          goal cell uniform over the maze's open cells (no range fields)

A range override is written `field=low:high`, e.g. `length=0.25:1.0`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math

__all__ = [
    "FAMILY_NAMES",
    "FamilySpec",
    "FAMILIES",
    "check_family",
    "parse_ranges",
    "check_task_values",
]

Ranges = tuple[tuple[str, float, float], ...]

TWO_PI = 2.0 * math.pi

FAMILY_NAMES: tuple[str, ...] = (
    "point-nav-uniform",
    "point-nav-circle",
    "point-nav-sparse",
    "cartpole",
    "cartpole-flip",
    "pendulum",
    "acrobot",
    "bandit",
    "meta-maze",
)


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """One task family, as data.

    Attributes:
      name: the family's name (a key of `FAMILIES`).
      description: one line.
      env_id: the environment id the family is built on (gymnax's, or ours such as "PointNavigation-v0").
      ranges: the sampled fields with their default ranges, `(field, low, high)`: field ~ U(low, high).
      positive: fields that must be > 0 (masses, lengths, forces).
      bounds: fields that must lie in a closed interval, `(field, low, high)` (a probability in [0, 1]).
      extra_fields: fields a concrete task (`TaskFamily.task(...)`) may set that are not sampled from a
        range (cartpole-flip's `force_sign`, meta-maze's `goal_row` / `goal_col`).
      choices: fields restricted to a finite set of values, `(field, values)`.
      integer: fields whose values must be whole numbers (grid cells).
      settings: fixed, non-sampled settings of the family, `(name, value)` (goal radius, sparse radius, goal tolerance).
      max_steps_in_episode: the episode horizon the family's environment uses.
    """

    name: str
    description: str
    env_id: str
    ranges: Ranges = ()
    positive: tuple[str, ...] = ()
    bounds: Ranges = ()
    extra_fields: tuple[str, ...] = ()
    choices: tuple[tuple[str, tuple[float, ...]], ...] = ()
    integer: tuple[str, ...] = ()
    settings: tuple[tuple[str, float], ...] = ()
    max_steps_in_episode: int = 100

    @property
    def sampled_fields(self) -> tuple[str, ...]:
        """The fields drawn from `ranges`, in order."""
        return tuple(field for field, _, _ in self.ranges)

    @property
    def fields(self) -> tuple[str, ...]:
        """Every field a concrete task may set: the sampled ones, then `extra_fields`."""
        return self.sampled_fields + self.extra_fields

    def setting(self, name: str) -> float:
        """The value of the fixed setting `name` (KeyError when the family has none)."""
        return dict(self.settings)[name]


# Maze cells are (row, col) on gymnax's 11 x 11 MetaMaze grid (maze size 9 inside a wall ring); open
# cells have row and col in 1..9 (the layout itself is checked against the environment).
_MAZE_LOW, _MAZE_HIGH = 1.0, 9.0

FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            name="point-nav-uniform",
            description="2D point navigation (MAML): dense reward -||p - g||, goal uniform in [-0.5, 0.5]^2",
            env_id="PointNavigation-v0",
            ranges=(("goal_x", -0.5, 0.5), ("goal_y", -0.5, 0.5)),
            settings=(("goal_tolerance", 0.01),),
            max_steps_in_episode=100,
        ),
        FamilySpec(
            name="point-nav-circle",
            description="2D point navigation: dense reward, goal on the circle of radius 0.5, angle ~ U(0, 2 pi)",
            env_id="PointNavigation-v0",
            ranges=(("angle", 0.0, TWO_PI),),
            settings=(("radius", 0.5), ("goal_tolerance", 0.01)),
            max_steps_in_episode=100,
        ),
        FamilySpec(
            name="point-nav-sparse",
            description="2D point navigation: sparse reward max(0.2 - ||p - g||, 0), goal on the circle of radius 0.5",
            env_id="PointNavigation-v0",
            ranges=(("angle", 0.0, TWO_PI),),
            settings=(("radius", 0.5), ("sparse_radius", 0.2)),
            max_steps_in_episode=100,
        ),
        FamilySpec(
            name="cartpole",
            description="CartPole with random pole length, masses and force magnitude (200 steps)",
            env_id="CartPole-v1",
            ranges=(("length", 0.25, 1.0), ("masspole", 0.05, 0.5), ("masscart", 0.5, 2.0), ("force_mag", 5.0, 15.0)),
            positive=("length", "masspole", "masscart", "force_mag"),
            max_steps_in_episode=200,
        ),
        FamilySpec(
            name="cartpole-flip",
            description="CartPole whose action effect is sign-flipped in half the tasks: force_mag = 10 s, s = +-1",
            env_id="CartPole-v1",
            extra_fields=("force_sign",),
            choices=(("force_sign", (-1.0, 1.0)),),
            max_steps_in_episode=200,
        ),
        FamilySpec(
            name="pendulum",
            description="Pendulum with random mass m and length l (200 steps)",
            env_id="Pendulum-v1",
            ranges=(("m", 0.5, 1.5), ("l", 0.5, 1.5)),
            positive=("m", "l"),
            max_steps_in_episode=200,
        ),
        FamilySpec(
            name="acrobot",
            description="Acrobot with random link masses (200 steps)",
            env_id="Acrobot-v1",
            ranges=(("link_mass_1", 0.5, 1.5), ("link_mass_2", 0.5, 1.5)),
            positive=("link_mass_1", "link_mass_2"),
            max_steps_in_episode=200,
        ),
        FamilySpec(
            name="bandit",
            description="Two-armed Bernoulli bandit, success probabilities (arm_prob, 1 - arm_prob), 100 pulls",
            env_id="BernoulliBandit-misc",
            ranges=(("arm_prob", 0.0, 1.0),),
            bounds=(("arm_prob", 0.0, 1.0),),
            max_steps_in_episode=100,
        ),
        FamilySpec(
            name="meta-maze",
            description="MetaMaze (Miconi et al. 2019): goal cell uniform over the open cells, start at the centre",
            env_id="MetaMaze-misc",
            extra_fields=("goal_row", "goal_col"),
            bounds=(("goal_row", _MAZE_LOW, _MAZE_HIGH), ("goal_col", _MAZE_LOW, _MAZE_HIGH)),
            integer=("goal_row", "goal_col"),
            max_steps_in_episode=200,
        ),
    )
}

assert tuple(FAMILIES) == FAMILY_NAMES


def _close(word: str, options: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(options), n=3, cutoff=0.4)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def check_family(name: str) -> FamilySpec:
    """Return the family `name`; raise a one-line ValueError naming close matches when unknown."""
    if name in FAMILIES:
        return FAMILIES[name]
    raise ValueError(f"Unknown task family {name!r}.{_close(name, FAMILY_NAMES)} Known: {', '.join(FAMILY_NAMES)}")


def _fmt(low: float, high: float) -> str:
    return f"{low:g}:{high:g}"


def _check_range(spec: FamilySpec, field: str, low: float, high: float) -> None:
    where = f"(task family {spec.name!r})"
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{field} range must be finite, got {_fmt(low, high)} {where}")
    if low > high:
        raise ValueError(f"{field} range {_fmt(low, high)} has low > high {where}")
    if field in spec.positive and low <= 0.0:
        raise ValueError(f"{field} must be > 0, got range {_fmt(low, high)} {where}")
    for name, lo, hi in spec.bounds:
        if name == field and (low < lo or high > hi):
            raise ValueError(f"{field} must lie in [{lo:g}, {hi:g}], got range {_fmt(low, high)} {where}")


def _unknown_field(spec: FamilySpec, field: str, known: tuple[str, ...], what: str) -> ValueError:
    if not known:
        return ValueError(f"Task family {spec.name!r} has no {what} fields; got {field!r}")
    hint = _close(field, known)
    return ValueError(
        f"Unknown field {field!r} for task family {spec.name!r}.{hint} Its {what} fields: {', '.join(known)}"
    )


def parse_ranges(name: str, overrides: tuple[str, ...]) -> Ranges:
    """The family's sampled ranges with `overrides` (`"field=low:high"`, e.g. `"length=0.25:1.0"`) applied.

    Returns every `(field, low, high)` of the family, in its order. Raises a one-line ValueError for
    an unknown family or field, bad syntax, a field given twice, a non-finite bound, low > high, a
    positive field (mass, length, force) with low <= 0, or a bounded field outside its bounds.
    """
    spec = check_family(name)
    ranges = {field: (low, high) for field, low, high in spec.ranges}
    seen: set[str] = set()
    for text in overrides:
        field, eq, value = (part.strip() for part in text.partition("="))
        bounds = value.split(":")
        if not eq or not field or len(bounds) != 2:
            raise ValueError(f"Bad task range {text!r}: expected field=low:high, e.g. length=0.25:1.0")
        if field not in ranges:
            raise _unknown_field(spec, field, spec.sampled_fields, "sampled")
        if field in seen:
            raise ValueError(f"Task range for {field!r} given twice (task family {spec.name!r})")
        seen.add(field)
        try:
            low, high = float(bounds[0]), float(bounds[1])
        except ValueError:
            raise ValueError(f"Bad task range {text!r}: low and high must be numbers, e.g. length=0.25:1.0") from None
        _check_range(spec, field, low, high)
        ranges[field] = (low, high)
    for field, (low, high) in ranges.items():
        _check_range(spec, field, low, high)
    return tuple((field, low, high) for field, (low, high) in ranges.items())


def check_task_values(name: str, values: dict[str, float]) -> None:
    """Raise a one-line ValueError unless `values` set valid fields of one task of family `name`.

    A value may lie outside the family's sampling range (an out-of-distribution test task), but it
    must be physically meaningful: finite, > 0 for masses, lengths and forces, inside the bounds of a
    bounded field (a probability in [0, 1], a maze cell), one of the allowed values of a choice field
    (a force sign of -1 or +1), and whole for an integer field.
    """
    spec = check_family(name)
    choices = dict(spec.choices)
    bounds = {field: (low, high) for field, low, high in spec.bounds}
    for field, value in values.items():
        if field not in spec.fields:
            raise _unknown_field(spec, field, spec.fields, "task")
        try:
            if isinstance(value, bool | str):
                raise TypeError
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{field} must be a number, got {value!r} (task family {spec.name!r})") from None
        if not math.isfinite(v):
            raise ValueError(f"{field} must be finite, got {v:g} (task family {spec.name!r})")
        if field in spec.positive and v <= 0.0:
            raise ValueError(f"{field} must be > 0, got {v:g} (task family {spec.name!r})")
        if field in bounds and not bounds[field][0] <= v <= bounds[field][1]:
            low, high = bounds[field]
            raise ValueError(f"{field} must lie in [{low:g}, {high:g}], got {v:g} (task family {spec.name!r})")
        if field in choices and v not in choices[field]:
            allowed = ", ".join(f"{c:g}" for c in choices[field])
            raise ValueError(f"{field} must be one of {allowed}, got {v:g} (task family {spec.name!r})")
        if field in spec.integer and v != int(v):
            raise ValueError(f"{field} must be a whole number, got {v:g} (task family {spec.name!r})")
