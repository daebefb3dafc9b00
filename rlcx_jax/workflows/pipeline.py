"""The expand-then-compress pipeline (`rlcx pipeline`): train a large teacher, distil it into a small
student, prune the student, quantize it, export it, and evaluate what every stage keeps and costs.

Stages, in this order (a recipe may leave out prune and quantize, or start from an existing teacher):

    teacher   train the teacher with its algorithm (a normal run directory: RUN/teacher)
    distill   policy distillation into a student with `student_hidden` (`distill.policy_distillation`)
    prune     gradual magnitude pruning to `sparsity`, learned under distillation from the teacher
    quantize  post-training quantization (`quant`), or QAT under distillation when `qat_steps` > 0
    export    one artifact file per seed (actor only), reloaded and checked against the evaluated policy
    evaluate  one row per stage: return (IQM over seeds, 95% bootstrap CI), greedy-action agreement with
              the teacher, parameters, non-zeros, artifact bytes, FLOPs, latency; table.json, report.md,
              report.png

Every stage reads its inputs from the run directory and writes its artifacts into RUN/<stage>, with a
`done.json` marker written last (atomically); a finished stage is skipped when the pipeline runs again,
so a killed pipeline resumes at the first unfinished stage, and `--from STAGE` re-runs a stage and every
later one. `stages.jsonl` logs every stage run and skip with its time. Each stage trains all seeds in one
compiled, seed-vmapped program.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from rlcx_jax import checkpoint, envs, nets, rl
from rlcx_jax import logging as rlog
from rlcx_jax.compress import export as export_lib
from rlcx_jax.compress import quant, size
from rlcx_jax.compress.training import CompressConfig, CompressHParams, find_masks
from rlcx_jax.configs.pipeline import STAGES as STAGES
from rlcx_jax.configs.pipeline import PipelineError as PipelineError
from rlcx_jax.configs.pipeline import Recipe as Recipe
from rlcx_jax.configs.pipeline import load_recipe as load_recipe
from rlcx_jax.distill import policy_distillation as pd
from rlcx_jax.nets.policy import AGREEMENT_TOLERANCE, action_agreement, action_gap
from rlcx_jax.rl.common import batched_learner
from rlcx_jax.rl.evaluate import default_greedy, make_evaluator
from rlcx_jax.seams import Hooks
from rlcx_jax.workflows import recipes
from rlcx_jax.workflows.compress_run import QUANT_INCLUDE, parse_quant, policy_forward, policy_observations, seed_slice

Params = Any

__all__ = ["STAGES", "Recipe", "PipelineError", "load_recipe", "run_pipeline"]

STUDENT_STAGES = ("distill", "prune", "quantize")
DONE_FILE = "done.json"
STUDENT_FILE = "student.msgpack"
LOG_FILE = "stages.jsonl"
RECIPE_FILE = "recipe.json"
PRUNE_ROLES = ("policy", "critic")  # heads too: the actor's output layer is part of the shipped file


# ----------------------------------------------------------------------------------------------
# The configurations of the stages
# ----------------------------------------------------------------------------------------------
def teacher_run_spec(recipe: Recipe) -> checkpoint.RunSpec:
    spec = rl.get(recipe.teacher_algorithm)
    defaults = spec.config_cls()
    config = dataclasses.replace(
        defaults,
        env=recipe.env,
        total_timesteps=recipe.teacher_steps,
        net=dataclasses.replace(defaults.net, hidden=tuple(recipe.teacher_hidden)),
    )
    trainer = rl.make(recipe.teacher_algorithm, config)  # validates
    hparams = spec.hparams_cls()
    return checkpoint.RunSpec(recipe.teacher_algorithm, config, hparams, recipe.seeds, recipe.seed, trainer.num_updates)


def distill_config(recipe: Recipe, teacher: checkpoint.RunSpec, steps: int, extensions: tuple = ()) -> pd.DistillConfig:
    tconfig = teacher.config
    return pd.DistillConfig(
        env=tconfig.env,
        env_kwargs=tconfig.env_kwargs,
        teacher_algorithm=teacher.algorithm,
        teacher_net=tconfig.net,
        normalize_obs=bool(getattr(tconfig, "normalize_obs", False)),
        net=dataclasses.replace(tconfig.net, hidden=tuple(recipe.student_hidden)),
        loss=recipe.loss,
        total_timesteps=steps,
        log_every=8,
        extensions=extensions,
    )


def distill_hparams(recipe: Recipe) -> pd.DistillHParams:
    return pd.DistillHParams(
        temperature=recipe.temperature,
        teacher_fraction_start=recipe.teacher_fraction_start,
        teacher_fraction_end=recipe.teacher_fraction_end,
    )


# ----------------------------------------------------------------------------------------------
# The run directory: stage markers, the stage log, student files
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Context:
    recipe: Recipe
    run_dir: pathlib.Path
    log: Callable[[str], None]

    def stage_dir(self, stage: str) -> pathlib.Path:
        return self.run_dir / stage

    def done(self, stage: str) -> bool:
        return (self.stage_dir(stage) / DONE_FILE).is_file()

    def teacher_dir(self) -> pathlib.Path:
        return pathlib.Path(self.recipe.teacher) if self.recipe.teacher else self.stage_dir("teacher")

    def keys(self, offset: int, n: int) -> jax.Array:
        return jax.random.split(jax.random.PRNGKey(self.recipe.seed + offset), n)


def _log_event(run_dir: pathlib.Path, event: dict[str, Any]) -> None:
    with open(run_dir / LOG_FILE, "a") as f:
        f.write(json.dumps(event) + "\n")


def save_student(
    stage_dir: pathlib.Path, params: Params, masks: Params | None, info: dict[str, Any], float_params: Params = None
) -> None:
    """The seed-batched student (its masks; for a quantized student also the float parameters it was
    quantized from) as one msgpack file, written atomically."""
    tree = {"params": jax.tree.map(np.asarray, params)}
    for name, value in (("masks", masks), ("float_params", float_params)):
        if value is not None:
            tree[name] = jax.tree.map(np.asarray, value)
    stage_dir.mkdir(parents=True, exist_ok=True)
    data = serialization.msgpack_serialize(tree)
    tmp = stage_dir / (STUDENT_FILE + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(stage_dir / STUDENT_FILE)
    checkpoint.atomic_write_text(stage_dir / "stage.json", json.dumps(info, indent=2) + "\n")


class Student(NamedTuple):
    """A student stage's artifact: seed-batched parameters, masks (None when unpruned), the stage's
    info, and the float parameters a quantized student was quantized from (else `params`)."""

    params: Params
    masks: Params | None
    info: dict[str, Any]
    float_params: Params


def load_student(stage_dir: pathlib.Path) -> Student:
    path = stage_dir / STUDENT_FILE
    if not path.is_file():
        raise PipelineError(f"Missing artifact {path}: run its stage first")
    tree = serialization.msgpack_restore(path.read_bytes())
    info = json.loads((stage_dir / "stage.json").read_text())
    return Student(tree["params"], tree.get("masks"), info, tree.get("float_params", tree["params"]))


def load_teacher(ctx: Context) -> tuple[checkpoint.RunSpec, Any, Any]:
    """(run spec, trainer, seed-batched state) of the teacher; checked against the recipe."""
    teacher_dir = ctx.teacher_dir()
    if not (teacher_dir / checkpoint.CONFIG_FILE).is_file():
        raise PipelineError(f"Missing teacher artifact: {teacher_dir} is not a run directory")
    spec, trainer, _, state = checkpoint.restore_run(teacher_dir)
    _check_teacher(ctx, spec)
    return spec, trainer, state


def _check_teacher(ctx: Context, spec: checkpoint.RunSpec) -> None:
    where = ctx.teacher_dir()
    if spec.config.env != ctx.recipe.env:
        raise PipelineError(f"The teacher in {where} was trained on {spec.config.env}; the recipe: {ctx.recipe.env}")
    if spec.num_seeds != ctx.recipe.seeds:
        raise PipelineError(f"The teacher in {where} has {spec.num_seeds} seeds, the recipe {ctx.recipe.seeds}")


def latest_student_stage(ctx: Context, before: str) -> str:
    """The last student stage before `before` that the recipe has."""
    earlier = [s for s in STUDENT_STAGES if s in ctx.recipe.stages and STAGES.index(s) < STAGES.index(before)]
    if not earlier:
        raise PipelineError(f"Stage {before} needs a student: include distill in stages")
    return earlier[-1]


def _policy_tree(params: Params, head: str, net_config: nets.NetConfig) -> Params:
    """The actor's parameter groups only (what a deployed policy needs)."""
    groups = nets.layout(net_config, head).groups("policy")
    return {k: v for k, v in params.items() if k in groups}


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------
def _train_student(
    ctx: Context,
    spec: checkpoint.RunSpec,
    state: Any,
    config: pd.DistillConfig,
    hparams: Any,
    params: Params | None,
    masks: Params | None,
    key_offset: int,
    stage: str,
) -> Any:
    """Distil from the teacher for `config.total_timesteps`, starting from `params` when given."""
    trainer = pd.make(config)
    teacher = pd.Teacher(params=state.params, obs_stats=state.obs_stats)
    n = ctx.recipe.seeds
    init = jax.jit(jax.vmap(trainer.init, in_axes=(0, None, 0)))
    student = init(ctx.keys(key_offset, n), hparams, teacher)
    if params is not None:
        student = student.with_params(params)
    if masks is not None:
        student = recipes.replace_masks(student, masks)
    t0 = time.perf_counter()
    student, metrics = batched_learner(trainer)(student, trainer.num_updates)
    jax.block_until_ready(student)
    seconds = time.perf_counter() - t0
    ctx.log(f"  {stage}: {trainer.num_updates} updates x {n} seeds in {seconds:.1f} s (with compilation)")
    rlog.append_rows(ctx.stage_dir(stage), rlog.metrics_rows(metrics, 0, trainer.log_every))
    return student


def stage_teacher(ctx: Context) -> dict[str, Any]:
    spec = teacher_run_spec(ctx.recipe)
    out = ctx.stage_dir("teacher")
    if out.exists():
        shutil.rmtree(out)  # an unfinished teacher stage: start it again
    checkpoint.write_run_spec(out, spec)
    trainer = rl.make(spec.algorithm, spec.config)
    t0 = time.perf_counter()
    init, args, _ = checkpoint.abstract_state(trainer, spec)
    state, metrics = batched_learner(trainer)(init.compile()(*args), trainer.num_updates)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - t0
    ctx.log(
        f"  teacher: {spec.algorithm} {spec.config.net.hidden}, {trainer.num_updates} updates x {spec.num_seeds} "
        f"seeds in {seconds:.1f} s (with compilation)"
    )
    rlog.append_rows(out, rlog.metrics_rows(metrics, 0, trainer.log_every))
    checkpoint.save_state(out, trainer.num_updates, state)
    return {"seconds": seconds}


def stage_distill(ctx: Context) -> dict[str, Any]:
    spec, _, state = load_teacher(ctx)
    config = distill_config(ctx.recipe, spec, ctx.recipe.distill_steps)
    student = _train_student(ctx, spec, state, config, distill_hparams(ctx.recipe), None, None, 1, "distill")
    save_student(ctx.stage_dir("distill"), student.params, None, {"net": checkpoint.to_jsonable(config.net)})
    return {}


def stage_prune(ctx: Context) -> dict[str, Any]:
    spec, _, state = load_teacher(ctx)
    params = load_student(ctx.stage_dir(latest_student_stage(ctx, "prune"))).params
    compress = CompressConfig(prune_schedule="gradual", prune_roles=PRUNE_ROLES, prune_end=0.75)
    config = distill_config(ctx.recipe, spec, ctx.recipe.prune_steps, (compress,))
    hparams = distill_hparams(ctx.recipe).with_ext(compress.name, CompressHParams(sparsity=ctx.recipe.sparsity))
    student = _train_student(ctx, spec, state, config, hparams, params, None, 2, "prune")
    info = {"net": checkpoint.to_jsonable(config.net)}
    save_student(ctx.stage_dir("prune"), student.params, find_masks(student), info)
    return {}


def stage_quantize(ctx: Context) -> dict[str, Any]:
    recipe = ctx.recipe
    qspec = parse_quant(recipe.quant)
    params, masks, info, _ = load_student(ctx.stage_dir(latest_student_stage(ctx, "quantize")))
    if recipe.qat_steps:
        spec, _, state = load_teacher(ctx)
        compress = CompressConfig(
            prune_schedule="fixed" if masks is not None else "none",
            prune_roles=PRUNE_ROLES,
            qat_bits=qspec.bits,
            qat_scheme=qspec.scheme,
            qat_per_channel=qspec.per_channel,
            qat_symmetric=qspec.symmetric,
            qat_activations=False,  # the artifact holds weights; activations stay float
        )
        config = distill_config(recipe, spec, recipe.qat_steps, (compress,))
        student = _train_student(ctx, spec, state, config, distill_hparams(recipe), params, masks, 3, "quantize")
        params = student.params
    quantize = jax.jit(lambda p, m: quant.quantize_tree(p, qspec, include=QUANT_INCLUDE, masks=m))
    per_seed = [quantize(seed_slice(params, i), seed_slice(masks, i)) for i in range(recipe.seeds)]
    params_q = jax.tree.map(lambda *xs: jnp.stack(xs), *per_seed)
    info = {**info, "quant": recipe.quant, "qat_steps": recipe.qat_steps}
    save_student(ctx.stage_dir("quantize"), params_q, masks, info, float_params=params)
    return {}


def stage_export(ctx: Context) -> dict[str, Any]:
    spec, teacher_trainer, state = load_teacher(ctx)
    source = latest_student_stage(ctx, "export")
    params, masks, info, float_params = load_student(ctx.stage_dir(source))
    student_net = checkpoint.from_jsonable(nets.NetConfig, info["net"])
    qspec = parse_quant(info["quant"]) if "quant" in info else None
    agent = teacher_trainer.agent
    head = spec.config.HEAD
    meta = dict(obs_shape=agent.obs_shape, action_spec=agent.spec, head=head)
    out = ctx.stage_dir("export")
    out.mkdir(parents=True, exist_ok=True)
    obs = policy_observations(teacher_trainer, state, default_greedy(spec.algorithm), 8, 128, jax.random.PRNGKey(7))
    forward = jax.jit(_greedy_forward(student_net, agent, head))
    sizes, exact = [], True
    for i in range(ctx.recipe.seeds):
        actor = _policy_tree(seed_slice(params, i), head, student_net)
        actor_masks = None if masks is None else _policy_tree(seed_slice(masks, i), head, student_net)
        path = out / f"seed_{i}.rlcx"
        sizes.append(
            export_lib.export(  # quantized once, from the float parameters (a second pass could move values)
                _policy_tree(seed_slice(float_params, i), head, student_net),
                path,
                masks=actor_masks,
                qspec=qspec,
                include=QUANT_INCLUDE,
                net_config=student_net,
                meta={"env": ctx.recipe.env, "seed": i, "source_stage": source},
                **meta,
            )
        )
        loaded = export_lib.load(path)
        x = agent.prep_obs(seed_slice(state.obs_stats, i), obs[i])
        same_params = export_lib.same_parameters(loaded.params, actor)
        exact &= same_params and bool(np.array_equal(np.asarray(loaded.policy(x)), np.asarray(forward(actor, x))))
    teacher_actor = _policy_tree(seed_slice(state.params, 0), head, spec.config.net)
    teacher_bytes = export_lib.dense_float32_bytes(
        jax.tree.map(np.asarray, teacher_actor), net_config=spec.config.net, **meta
    )
    if not exact:
        raise PipelineError("A reloaded artifact differs from the evaluated policy (export is not exact)")
    result = {"source_stage": source, "bytes_per_seed": sizes, "teacher_float32_bytes": teacher_bytes, "exact": exact}
    checkpoint.atomic_write_text(out / "export.json", json.dumps(result, indent=2) + "\n")
    return result


def _greedy_forward(net_config: nets.NetConfig, agent: Any, head: str) -> Callable[[Params, jax.Array], jax.Array]:
    """Greedy actions of the network `net_config` (with this env's observations and actions)."""
    return policy_forward(nets.make(net_config, agent.obs_shape, agent.spec, head=head), Hooks(), agent.spec)


# ----------------------------------------------------------------------------------------------
# Evaluation and report
# ----------------------------------------------------------------------------------------------
ROW_NAMES = {
    "teacher": "teacher (float32)",
    "distill": "distilled student (float32)",
    "prune": "pruned student (sparse float32)",
    "quantize": "quantized student (shipped file)",
}


def _kernel_sparsity(tree: Params) -> float:
    kernels = [np.asarray(v) for p, v in quant.flatten_with_paths(tree).items() if p.endswith("kernel")]
    total = sum(k.size for k in kernels)
    return 1.0 - sum(int(np.count_nonzero(k)) for k in kernels) / max(total, 1)


def _file_bytes(
    tree: Params, masks: Params | None, qspec: quant.QuantSpec | None, net: nets.NetConfig, meta: dict
) -> int:
    """Bytes of `tree` exported as it would be shipped (sparse where masked, quantized when qspec)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return export_lib.export(
            jax.tree.map(np.asarray, tree),
            pathlib.Path(tmp) / "a.rlcx",
            masks=masks,
            qspec=qspec,
            include=QUANT_INCLUDE,
            net_config=net,
            **meta,
        )


def stage_evaluate(ctx: Context) -> dict[str, Any]:
    recipe = ctx.recipe
    spec, teacher_trainer, state = load_teacher(ctx)
    agent, head, n = teacher_trainer.agent, spec.config.HEAD, recipe.seeds
    meta = dict(obs_shape=agent.obs_shape, action_spec=agent.spec, head=head)
    greedy = default_greedy(spec.algorithm)
    keys = ctx.keys(10_000, n)
    obs = policy_observations(teacher_trainer, state, greedy, 8, 128, jax.random.PRNGKey(recipe.seed + 20_000))
    x = jax.vmap(agent.prep_obs)(state.obs_stats, obs)
    teacher_forward = jax.jit(jax.vmap(_greedy_forward(spec.config.net, agent, head)))
    teacher_actions = np.asarray(teacher_forward(state.params, x))
    batch1 = x[0][:1]

    compiled: dict[Any, tuple[Any, Any, Any]] = {}  # one evaluator and forward per network (students share one)

    def programs(trainer: Any, net: nets.NetConfig) -> tuple[Any, Any, Any]:
        if net not in compiled:
            forward = _greedy_forward(net, agent, head)
            evaluator = jax.jit(jax.vmap(make_evaluator(trainer, recipe.eval_episodes, greedy)))
            compiled[net] = (evaluator, forward, jax.jit(jax.vmap(forward)))
        return compiled[net]

    def row(stage: str, trainer: Any, params: Params, masks: Params | None, net: nets.NetConfig, qspec: Any) -> dict:
        evaluator, forward, batched_forward = programs(trainer, net)
        returns = np.asarray(evaluator(params, state.obs_stats, keys))
        per_seed = returns.mean(axis=1)
        actions = np.asarray(batched_forward(params, x))
        actor = jax.tree.map(jnp.asarray, _policy_tree(seed_slice(params, 0), head, net))  # on device: no copy per call
        actor_masks = None if masks is None else _policy_tree(seed_slice(masks, 0), head, net)
        counted = size.count(actor, qspec.bits if qspec else 32)
        iqm, lo, hi = rlog.bootstrap_ci(per_seed, "iqm")
        return {
            "stage": stage,
            "name": ROW_NAMES[stage],
            "return_per_seed": per_seed.tolist(),
            "return_iqm": iqm,
            "return_ci95": [lo, hi],
            "agreement_with_teacher": float(action_agreement(actions, teacher_actions, agent.spec)),
            "action_gap_to_teacher": float(action_gap(actions, teacher_actions, agent.spec)),
            "params": counted.params,
            "nonzeros": counted.nonzeros,
            "kernel_sparsity": _kernel_sparsity(actor),
            "artifact_bytes": _file_bytes(actor, actor_masks, qspec, net, meta),
            "flops": size.flops_per_forward(actor, agent.obs_shape),
            "latency_us": 1e6 * size.measure_latency(forward, actor, batch1),
        }

    rows = [row("teacher", teacher_trainer, state.params, None, spec.config.net, None)]
    student_trainer = pd.make(distill_config(recipe, spec, recipe.distill_steps))
    for stage in STUDENT_STAGES:
        if stage not in recipe.stages:
            continue
        params, masks, info, _ = load_student(ctx.stage_dir(stage))
        net = checkpoint.from_jsonable(nets.NetConfig, info["net"])
        trainer = (
            student_trainer
            if net == student_trainer.config.net
            else pd.make(dataclasses.replace(student_trainer.config, net=net))
        )
        qspec = parse_quant(info["quant"]) if "quant" in info else None
        rows.append(row(stage, trainer, params, masks, net, qspec))
    export_info = ctx.stage_dir("export") / "export.json"
    shipped = json.loads(export_info.read_text()) if "export" in recipe.stages and export_info.is_file() else None
    if shipped is not None and shipped["source_stage"] == rows[-1]["stage"]:  # the shipped files themselves
        rows[-1]["artifact_bytes"] = float(np.mean(shipped["bytes_per_seed"]))
        rows[-1]["export_exact"] = shipped["exact"]
    random_per_seed = random_policy_returns(teacher_trainer.config, recipe.eval_episodes, keys)
    random_iqm = rlog.iqm(random_per_seed)
    teacher = rows[0]
    for r in rows:
        r["return_retained"], r["retained_measure"] = retained(r["return_iqm"], teacher["return_iqm"], random_iqm)
        r["smaller_than_teacher"] = teacher["artifact_bytes"] / r["artifact_bytes"]
    out = ctx.stage_dir("evaluate")
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "recipe": checkpoint.to_jsonable(recipe),
        "random_policy_return_iqm": random_iqm,
        "random_policy_return_per_seed": random_per_seed.tolist(),
        "rows": rows,
        "device": jax.devices()[0].device_kind,
        "latency_note": "one jitted forward of the actor, batch 1, float32 dense kernels on this host (masks "
        "and int codes do not make XLA's dense matmuls faster)",
    }
    checkpoint.atomic_write_text(out / "table.json", json.dumps(result, indent=2) + "\n")
    write_report(ctx, rows)
    return {"rows": len(rows)}


@dataclasses.dataclass(frozen=True)
class RandomPolicy:
    """Uniformly random actions, in the shape `make_evaluator` expects of a trainer."""

    config: Any

    def act(self, params: Params, obs_stats: Any, obs: jax.Array, key: jax.Array, greedy: bool) -> jax.Array:
        env, env_params = envs.make_training_env(self.config.env, self.config.env_kwargs)
        space = env.action_space(env_params)
        return jax.vmap(space.sample)(jax.random.split(key, obs.shape[0]))


def random_policy_returns(config: Any, episodes: int, keys: jax.Array) -> np.ndarray:
    """Per-seed mean return of uniformly random actions (the floor of the "kept" measure)."""
    evaluator = make_evaluator(RandomPolicy(config), episodes, greedy=False)  # type: ignore[arg-type]
    returns = jax.jit(jax.vmap(lambda k: evaluator(None, None, k)))(keys)
    return np.asarray(returns).mean(axis=1)


def retained(value: float, teacher: float, random: float) -> tuple[float, str]:
    """The fraction of the teacher's return a row keeps: value / teacher where returns are positive
    (teacher and random policy above 0), else (value - random) / (teacher - random), so that a
    negative-return task is measured from the random policy's floor. Returns (fraction, which)."""
    if teacher > 0 and random >= 0:
        return value / teacher, "ratio"
    span = teacher - random
    return ((value - random) / span if span else float("nan")), "over random"


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """The two targets of the pipeline, each decided by the figure printed beside it."""
    final, teacher = rows[-1], rows[0]
    keep = final["return_retained"]
    ratio = final["smaller_than_teacher"]
    return [
        f"final student keeps {100 * keep:.1f}% of the teacher's return ({final['retained_measure']}; IQM "
        f"{final['return_iqm']:.1f} vs {teacher['return_iqm']:.1f}); target >= 90%: {'yes' if keep >= 0.9 else 'no'}",
        f"its file is {ratio:.1f}x smaller than the teacher's float32 actor file ({final['artifact_bytes']:,.0f} B vs "
        f"{teacher['artifact_bytes']:,.0f} B); target >= 50x: {'yes' if ratio >= 50 else 'no'}",
    ]


def percent(x: float) -> str:
    """A fraction as a percentage; n/a where it was not measured (NaN)."""
    return "n/a" if np.isnan(x) else f"{100 * x:.1f}%"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| stage | return IQM [95% CI] | kept | agreement | params | non-zeros | kernel sparsity | file bytes "
        "| smaller | FLOPs | latency (us) |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['name']} | {r['return_iqm']:.1f} [{r['return_ci95'][0]:.1f}, {r['return_ci95'][1]:.1f}] "
        f"| {100 * r['return_retained']:.0f}% | {percent(r['agreement_with_teacher'])} | {r['params']:,} "
        f"| {r['nonzeros']:,} | {100 * r['kernel_sparsity']:.1f}% | {r['artifact_bytes']:,.0f} "
        f"| {r['smaller_than_teacher']:.1f}x | {r['flops']:,} | {r['latency_us']:.1f} |\n"
        for r in rows
    )
    return head + body


def write_report(ctx: Context, rows: list[dict[str, Any]]) -> None:
    out = ctx.stage_dir("evaluate")
    recipe = ctx.recipe
    lines = [
        f"# Pipeline report: {recipe.env}, {recipe.seeds} seeds",
        "",
        markdown_table(rows),
        *[f"- {v}" for v in verdicts(rows)],
        f"- return: mean over {recipe.eval_episodes} episodes per seed, IQM over seeds; kept: return / teacher's "
        "return, or (return - random) / (teacher's - random) where returns are negative (random: uniformly random "
        "actions); agreement, on states the teacher visits: greedy actions equal to the teacher's (discrete "
        f"actions) or clipped mean actions within {100 * AGREEMENT_TOLERANCE:g}% of the action range of the "
        "teacher's (continuous); params / non-zeros / FLOPs: the actor; file bytes: "
        "the actor as shipped (float32 dense, float32 sparse, or quantized sparse); latency: see table.json.",
        "",
        "![return against file size and learning curves](report.png)",
        "",
    ]
    checkpoint.atomic_write_text(out / "report.md", "\n".join(lines))
    plot_report(ctx, rows, out / "report.png")


def plot_report(ctx: Context, rows: list[dict[str, Any]], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_size, ax_curve, ax_agree) = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in rows:
        lo, hi = r["return_ci95"]
        ax_size.errorbar(
            r["artifact_bytes"],
            r["return_iqm"],
            yerr=[[r["return_iqm"] - lo], [hi - r["return_iqm"]]],
            fmt="o",
            capsize=4,
            label=r["name"],
        )
    ax_size.set_xscale("log")
    ax_size.set_xlabel("actor file bytes (log)")
    ax_size.set_ylabel("return (IQM over seeds, 95% CI)")
    ax_size.set_title("return against size")
    ax_size.legend(fontsize=7, loc="lower left")
    offset = 0.0
    for stage in ("teacher", *[s for s in STUDENT_STAGES if s in ctx.recipe.stages]):
        stage_rows = rlog.read_rows(ctx.teacher_dir() if stage == "teacher" else ctx.stage_dir(stage))
        if not stage_rows:
            continue
        steps, returns = rlog.curves_from_rows(stage_rows)
        label = "teacher" if stage == "teacher" else f"{stage} (behaviour policy)"
        with warnings.catch_warnings():  # rows before any episode finished are NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            ax_curve.plot(offset + steps, np.nanmean(returns, axis=0), label=label)
        if stage != "teacher":
            agree = _row_curve(stage_rows, "aux/agreement")
            ax_agree.plot(offset + steps, agree, label=stage)
        offset += steps[-1]
    thousands = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1e3:.0f}k")
    ax_curve.xaxis.set_major_formatter(thousands)
    ax_agree.xaxis.set_major_formatter(thousands)
    ax_curve.set_xlabel("environment steps, stages one after another")
    ax_curve.set_ylabel("training episode return (mean over seeds)")
    ax_curve.set_title("learning curves")
    ax_curve.legend(fontsize=7)
    ax_agree.set_xlabel("environment steps")
    ax_agree.set_ylabel("action agreement with the teacher (training batch)")
    ax_agree.set_title("distillation")
    ax_agree.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _row_curve(rows: list[dict[str, Any]], name: str) -> np.ndarray:
    updates = sorted({r["update"] for r in rows})
    return np.array([np.mean([r[name] for r in rows if r["update"] == u]) for u in updates])


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------
STAGE_FUNCTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "teacher": stage_teacher,
    "distill": stage_distill,
    "prune": stage_prune,
    "quantize": stage_quantize,
    "export": stage_export,
    "evaluate": stage_evaluate,
}


def _check_inputs(ctx: Context, will_run: list[str]) -> None:
    """Every input a stage needs exists or is produced earlier in this run (checked before training)."""
    recipe = ctx.recipe
    if "teacher" in will_run:
        teacher_spec = teacher_run_spec(recipe)
    else:
        teacher_dir = ctx.teacher_dir()
        if not (teacher_dir / checkpoint.CONFIG_FILE).is_file():
            raise PipelineError(f"Missing teacher artifact: {teacher_dir} is not a run directory (run stage teacher)")
        try:
            teacher_spec = checkpoint.read_run_spec(teacher_dir)
        except checkpoint.CheckpointError as e:
            raise PipelineError(f"Bad teacher artifact: {e}") from None
        _check_teacher(ctx, teacher_spec)
    # every configuration a stage will build, built now (a bad one fails here, not after hours)
    steps = {"distill": recipe.distill_steps, "prune": recipe.prune_steps, "quantize": recipe.qat_steps}
    for stage, n in steps.items():
        if stage in will_run and n > 0:
            try:
                distill_config(recipe, teacher_spec, n).validate()
            except ValueError as e:
                raise PipelineError(f"Stage {stage}: {e}") from None
    for stage in will_run:
        if stage in ("prune", "quantize", "export"):
            source = latest_student_stage(ctx, stage)
            if source not in will_run and not (ctx.stage_dir(source) / STUDENT_FILE).is_file():
                raise PipelineError(f"Stage {stage} needs {ctx.stage_dir(source) / STUDENT_FILE}: run {source} first")


# The recipe fields each stage's artifacts depend on (cumulative: a stage depends on every earlier one).
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "teacher": ("env", "seeds", "seed", "teacher", "teacher_algorithm", "teacher_hidden", "teacher_steps"),
    "distill": (
        "student_hidden",
        "distill_steps",
        "loss",
        "temperature",
        "teacher_fraction_start",
        "teacher_fraction_end",
    ),
    "prune": ("sparsity", "prune_steps"),
    "quantize": ("quant", "qat_steps"),
    "export": (),
    "evaluate": ("eval_episodes", "stages"),
}


def stage_settings(recipe: Recipe, stage: str) -> dict[str, Any]:
    """The recipe's values of every field `stage`'s artifacts depend on (its own and earlier stages')."""
    names = [n for s in STAGES[: STAGES.index(stage) + 1] for n in STAGE_FIELDS[s]]
    if stage in ("prune", "quantize", "export", "evaluate"):  # which student stages came before matters too
        names.append("stages")
    return {n: checkpoint.to_jsonable(getattr(recipe, n)) for n in dict.fromkeys(names)}


def stage_status(ctx: Context, stage: str) -> tuple[str, list[str]]:
    """("done" | "missing" | "changed", the changed field names) of a stage in the run directory."""
    marker = ctx.stage_dir(stage) / DONE_FILE
    if not marker.is_file():
        return "missing", []
    stored = json.loads(marker.read_text()).get("settings", {})
    current = stage_settings(ctx.recipe, stage)
    changed = [k for k in current if stored.get(k) != current[k]]
    return ("changed", changed) if changed else ("done", [])


def plan(ctx: Context, from_stage: str | None) -> list[str]:
    """The stages to run: from `from_stage` (or the first stage not done) to the end. A finished
    stage whose settings differ from the recipe's is an error unless `--from` re-runs it."""
    stages = ctx.recipe.stages
    start = stages.index(from_stage) if from_stage else len(stages)
    for i, stage in enumerate(stages[:start]):
        status, changed = stage_status(ctx, stage)
        if status == "changed":
            fields = ", ".join(changed)
            hint = f"--from {stage}" if from_stage is None else f"--from {stage} (not --from {from_stage})"
            raise PipelineError(
                f"Stage {stage} in {ctx.run_dir} ran with other settings ({fields}); pass {hint} to re-run it and "
                "every later stage, or choose another --out"
            )
        if status == "missing":
            start = i
            break
    return list(stages[start:])


def run_pipeline(
    recipe: Recipe,
    run_dir: pathlib.Path,
    from_stage: str | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run (or resume) the recipe's stages in `run_dir`; returns the evaluation table's rows.

    Stages before the first unfinished one (or before `from_stage`) are reused when their settings
    match the recipe's; that stage and every later one run again."""
    recipe.validate()
    run_dir = pathlib.Path(run_dir)
    if from_stage is not None and from_stage not in recipe.stages:
        raise PipelineError(f"--from {from_stage!r}: not one of this recipe's stages {list(recipe.stages)}")
    checkpoint.check_directory_path(run_dir)
    stored = run_dir / RECIPE_FILE
    ctx = Context(recipe, run_dir, log)
    will_run = plan(ctx, from_stage)
    _check_inputs(ctx, will_run)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_text(stored, json.dumps(checkpoint.to_jsonable(recipe), indent=2) + "\n")
    for stage in will_run:  # later stages are stale from now on, even if this run is killed
        (ctx.stage_dir(stage) / DONE_FILE).unlink(missing_ok=True)
    for stage in recipe.stages:
        if stage not in will_run:
            log(f"{stage}: done earlier, skipped")
            _log_event(run_dir, {"stage": stage, "event": "skipped", "time": time.time()})
            continue
        marker = ctx.stage_dir(stage) / DONE_FILE
        if stage != "teacher":
            rlog_file = ctx.stage_dir(stage) / rlog.METRICS_FILE
            rlog_file.unlink(missing_ok=True)
        ctx.stage_dir(stage).mkdir(parents=True, exist_ok=True)
        log(f"{stage}: running")
        started = time.time()
        _log_event(run_dir, {"stage": stage, "event": "started", "time": started})
        info = STAGE_FUNCTIONS[stage](ctx)
        finished = time.time()
        done = {
            "stage": stage,
            "started": started,
            "finished": finished,
            "seconds": finished - started,
            "settings": stage_settings(recipe, stage),
            **info,
        }
        checkpoint.atomic_write_text(marker, json.dumps(done, indent=2) + "\n")
        _log_event(run_dir, {"stage": stage, "event": "finished", "time": finished, "seconds": finished - started})
    table = ctx.stage_dir("evaluate") / "table.json"
    return json.loads(table.read_text())["rows"] if table.is_file() else []
