"""The recipe of `rlcx pipeline` (jax-free; see `rlcx_jax.configs`): what the expand-then-compress
pipeline trains, distils, prunes, quantizes and evaluates (`rlcx_jax.workflows.pipeline` runs it).
"""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
import tomllib
from typing import Any, cast

from rlcx_jax.configs.algorithms import config_classes
from rlcx_jax.configs.base import RUN_CONFIG_FILE, from_jsonable
from rlcx_jax.configs.compress import check_sparsity, parse_quant
from rlcx_jax.configs.envs import check_env_name

__all__ = ["STAGES", "DISTILL_LOSSES", "PipelineError", "Recipe", "check_types", "check_stages", "load_recipe"]

STAGES = ("teacher", "distill", "prune", "quantize", "export", "evaluate")
DISTILL_LOSSES = ("kl", "nll", "mse")
"""Policy-distillation losses (`rlcx_jax.distill.losses`)."""


class PipelineError(ValueError):
    """A bad recipe, or a run directory that does not fit it (one line, before any training)."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What the pipeline does: a TOML file (`--recipe`), flags, or both (flags win)."""

    env: str = "CartPole-v1"
    """Environment id."""
    seeds: int = 4
    """Seeds trained at once (vmapped); student i learns from teacher seed i."""
    seed: int = 0
    """Base PRNG seed."""
    stages: tuple[str, ...] = STAGES
    """Stages to run, in pipeline order (teacher, distill, prune, quantize, export, evaluate)."""
    teacher: str = ""
    """An existing run directory (from `rlcx train`) to use as the teacher instead of the teacher stage."""
    teacher_algorithm: str = "ppo"
    """Algorithm of the teacher stage."""
    teacher_hidden: tuple[int, ...] = (256, 256)
    """Hidden widths of the teacher."""
    teacher_steps: int = 500_000
    """Environment steps per seed of the teacher stage."""
    student_hidden: tuple[int, ...] = (64, 64)
    """Hidden widths of the student (same torso kind and activation as the teacher)."""
    distill_steps: int = 100_000
    """Environment steps per seed of distillation."""
    loss: str = "kl"
    """Distillation loss: kl, nll or mse."""
    temperature: float = 1.0
    """Temperature of the kl loss."""
    teacher_fraction_start: float = 1.0
    """Probability that the teacher acts while collecting, at the start of distillation."""
    teacher_fraction_end: float = 0.0
    """... and at its end (linear in between)."""
    sparsity: float = 0.9
    """Target sparsity of the student's kernels (actor and critic, heads included)."""
    prune_steps: int = 200_000
    """Environment steps per seed of gradual pruning under distillation."""
    quant: str = "int8"
    """Weight quantization of the shipped student: int<b>, uint<b>, log<b> or kmeans<b>."""
    qat_steps: int = 0
    """Steps of quantization-aware distillation before quantizing (0: post-training only); kernels train on
    the shipped grid, biases are quantized after training."""
    eval_episodes: int = 32
    """Evaluation episodes per seed."""

    # -- validation (plain Python: runs before anything is traced) ------------------------------
    def validate(self) -> None:
        check_types(self)
        check_stages(self.stages)
        check_env_name(self.env)
        config_classes(self.teacher_algorithm)
        for name in ("seeds", "teacher_steps", "distill_steps", "prune_steps", "eval_episodes"):
            if getattr(self, name) < 1:
                raise PipelineError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.qat_steps < 0:
            raise PipelineError(f"qat_steps must be >= 0, got {self.qat_steps}")
        for name in ("teacher_hidden", "student_hidden"):
            widths = getattr(self, name)
            if not widths or min(widths) < 1:
                raise PipelineError(f"{name} needs at least one layer of width >= 1, got {tuple(widths)}")
        if self.loss not in DISTILL_LOSSES:
            raise PipelineError(f"Unknown distillation loss {self.loss!r}; expected one of {DISTILL_LOSSES}")
        if not self.temperature > 0:
            raise PipelineError(f"temperature must be > 0, got {self.temperature}")
        for name in ("teacher_fraction_start", "teacher_fraction_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise PipelineError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if "prune" in self.stages:
            check_sparsity(self.sparsity)
        if "quantize" in self.stages:
            parse_quant(self.quant)
        if self.teacher and "teacher" in self.stages:
            raise PipelineError("teacher is an existing run directory: leave the teacher stage out of stages")
        if self.teacher:
            teacher_dir = pathlib.Path(self.teacher)
            if not (teacher_dir / RUN_CONFIG_FILE).is_file():
                raise PipelineError(f"teacher {self.teacher!r} is not a run directory (no {RUN_CONFIG_FILE})")


def check_types(recipe: Recipe) -> None:
    """Each field has its default's type (a TOML file can hold anything): one-line error otherwise."""
    for f in dataclasses.fields(recipe):
        value, default = getattr(recipe, f.name), cast(Any, f.default)
        if isinstance(default, bool) or isinstance(default, str):
            ok = isinstance(value, type(default))
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        else:  # a tuple of ints or of strings
            kind = type(default[0]) if default else int
            ok = isinstance(value, tuple) and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
        if not ok:
            raise PipelineError(f"recipe field {f.name} must look like {default!r}, got {value!r}")


def check_stages(stages: tuple[str, ...]) -> None:
    """Known stage names, each once, in pipeline order."""
    if not stages:
        raise PipelineError("stages is empty")
    for s in stages:
        if s not in STAGES:
            close = difflib.get_close_matches(s, STAGES, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise PipelineError(f"Unknown stage {s!r}.{hint} Stages: {', '.join(STAGES)}")
    order = [STAGES.index(s) for s in stages]
    if order != sorted(set(order)):
        raise PipelineError(f"stages must be in pipeline order ({' -> '.join(STAGES)}), each once; got {list(stages)}")


def load_recipe(path: pathlib.Path | None, overrides: dict[str, Any] | None = None) -> Recipe:
    """A Recipe from a TOML file (keys are Recipe fields) with `overrides` applied on top."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(pathlib.Path(path).read_text())
        except FileNotFoundError:
            raise PipelineError(f"No recipe file at {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise PipelineError(f"{path} is not valid TOML: {e}") from None
    data.update(overrides or {})
    names = [f.name for f in dataclasses.fields(Recipe)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise PipelineError(f"Unknown recipe key {key!r}.{hint}")
    try:
        recipe = from_jsonable(Recipe, data)
    except (TypeError, ValueError) as e:
        raise PipelineError(f"Bad recipe value: {e}") from None
    check_types(recipe)
    return recipe
