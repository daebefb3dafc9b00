"""Meta-learning benchmark: MAML, first-order MAML, Reptile, PLATIPUS, the pretrained and the random-init
baselines over task families, with Finn et al.'s (2017) protocol: the mean return over 40 fixed test
tasks after 0, 1, 2, 3 policy-gradient steps (fresh trajectories each step), every method meta-trained
for several seeds at once (vmapped), 95% bootstrap confidence intervals over seeds.

    python benchmarks/meta.py                                   # every experiment (about an hour, 2 cores)
    python benchmarks/meta.py --experiments point-nav-uniform   # one of them
    python benchmarks/meta.py --experiments point-nav-sparse --update   # rerun one, keep the others
    python benchmarks/meta.py --experiments pendulum --methods reptile --update   # add or rerun rows
    python benchmarks/meta.py --markdown benchmarks/results/meta_intel-xeon.json   # README tables

Experiments (settings in EXPERIMENTS below; each method's meta-training is timed apart from its
compilation, with env steps per second, second-order included):

  point-nav-uniform  every method, Finn et al.'s sizes (20 tasks x 20 trajectories of 100 steps per
                     sampling), beside the paper's numbers and the analytic oracle; then the compressed
                     meta-learned initialisation (90% pruned, int8, both) adapting against the dense one.
                     Two MAML rows: the paper's setting (one inner step in meta-training), and
                     "maml-2step": two inner steps with MAML++'s multi-step loss (weight 0.5), trained
                     for the two steps the table reports
  point-nav-circle   MAML (both rows) against the pretrained baseline
  point-nav-sparse   PLATIPUS against MAML where one initialisation cannot know which way to go: the
                     return after adaptation, and the spread of the first episodes' end points over
                     sampled initialisations (PLATIPUS samples one per evaluation; MAML has one)
  cartpole-flip      MAML against pretrained where the sign of the force is flipped in half the tasks
  pendulum           MAML against pretrained over pole masses and lengths

Writes `benchmarks/results/meta_<cpu>.json` (hardware, versions, commit, command, settings and every
number) and `meta_<cpu>.png` (return against adaptation steps per experiment).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import cpu_info, cpu_short_name, git_state, loadavg, local_versions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAPER = {  # Finn et al. 2017, 2D navigation, mean return over test tasks after 0 / 1 / 2 steps
    "maml": [-40.41, -11.68, -3.33],
    "pretrain": [-40.81, -19.66, -11.68],
    "oracle": -2.3,
    "standing still": -38.3,
}
FINN = dict(meta_batch=20, num_trajectories=20, horizon=100)
EXPERIMENTS: dict[str, dict[str, Any]] = {
    "point-nav-uniform": dict(
        family="point-nav-uniform",
        methods=("maml-2step", "maml", "fomaml", "reptile", "platipus", "pretrain"),
        config=dict(FINN, iterations=200),
        compressed=True,
    ),
    "point-nav-circle": dict(
        family="point-nav-circle",
        methods=("maml", "maml-2step", "fomaml", "reptile", "platipus", "pretrain"),
        config=dict(FINN, iterations=200),
    ),
    "point-nav-sparse": dict(
        family="point-nav-sparse", methods=("maml", "platipus"), config=dict(FINN, iterations=200), spread=True
    ),
    "cartpole-flip": dict(
        family="cartpole-flip",
        methods=("maml", "fomaml", "reptile", "platipus", "pretrain"),
        config=dict(meta_batch=10, num_trajectories=10, horizon=200, iterations=100, net_hidden=(64, 64)),
    ),
    "pendulum": dict(
        family="pendulum",
        methods=("maml", "fomaml", "reptile", "platipus", "pretrain"),
        config=dict(meta_batch=10, num_trajectories=10, horizon=200, iterations=100, net_hidden=(64, 64)),
    ),
}
METHOD_SETTINGS: dict[str, dict[str, Any]] = {  # per row: the method and MetaConfig / MetaHParams changes
    "reptile": dict(inner_steps=2),
    "maml-2step": dict(method="maml", inner_steps=2, step_loss_weight=0.5),
}
SPREAD_SAMPLES = 8


def _setup(experiment: dict[str, Any], label: str, seeds: int, iterations: int | None) -> tuple[Any, Any]:
    from rlcx_jax.configs.meta import MetaConfig, MetaHParams
    from rlcx_jax.configs.nets import NetConfig

    settings = {**experiment["config"], **METHOD_SETTINGS.get(label, {})}
    method = settings.pop("method", label)
    if iterations:
        settings["iterations"] = iterations
    hidden = settings.pop("net_hidden", (100, 100))
    config_fields = {f.name for f in dataclasses.fields(MetaConfig)}
    config = MetaConfig(
        method=method,
        family=experiment["family"],
        net=NetConfig(hidden=hidden, activation="relu"),
        log_every=max(1, settings["iterations"] // 20),
        **{k: v for k, v in settings.items() if k in config_fields},
    )
    hparams = MetaHParams(**{k: v for k, v in settings.items() if k not in config_fields})
    return config, hparams


def _summary(returns: np.ndarray) -> list[dict[str, float]]:
    from rlcx_jax.workflows.meta_run import adaptation_summary

    return adaptation_summary(returns)


def run_method(experiment: dict[str, Any], label: str, seeds: int, iterations: int | None) -> dict[str, Any]:
    """Meta-train the row `label` (a method, or a variant in METHOD_SETTINGS) for `seeds` seeds
    (vmapped), timed apart from compilation; evaluate."""
    import jax

    from rlcx_jax.meta import make_trainer

    config, hparams = _setup(experiment, label, seeds, iterations)
    trainer = make_trainer(config)
    keys = jax.random.split(jax.random.PRNGKey(0), seeds)
    train = jax.jit(jax.vmap(trainer.train, in_axes=(0, None)))
    t = time.perf_counter()
    compiled = train.lower(keys, hparams).compile()
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    out = jax.block_until_ready(compiled(keys, hparams))
    run_s = time.perf_counter() - t
    evaluate = jax.jit(jax.vmap(lambda m, k: trainer.evaluate(m, hparams, k), in_axes=(0, 0)))
    eval_keys = jax.random.split(jax.random.PRNGKey(1), seeds)
    table = evaluate(out.state.meta_params, eval_keys)
    returns = np.asarray(table.returns)  # [seeds, tasks, steps + 1]
    env_steps = config.env_steps_per_iteration * config.iterations * seeds
    record = {
        "method": config.method,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git_state(),
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "net"} | {"net": config.net.hidden},
        "hparams": dataclasses.asdict(hparams),
        "seeds": seeds,
        "compile_s": compile_s,
        "run_s": run_s,
        "env_steps": env_steps,
        "env_steps_per_s": env_steps / run_s,
        "train_curve_after": np.asarray(out.metrics.return_after).mean(axis=0).tolist(),
        "adaptation": _summary(returns),
        "per_seed_returns": returns.mean(axis=1).tolist(),
    }
    print(
        f"  {label}: compile {compile_s:.0f} s, run {run_s:.0f} s, {env_steps / run_s:,.0f} env steps/s; "
        + ", ".join(f"{r['step']}: {r['mean']:.1f}" for r in record["adaptation"]),
        flush=True,
    )
    extras = {"trainer": trainer, "state": out.state, "hparams": hparams, "keys": eval_keys}
    return {"record": record, **extras}


def random_init(trainer: Any, hparams: Any, seeds: int) -> list[dict[str, float]]:
    import jax

    from rlcx_jax.workflows.meta_run import random_init_returns

    keys = jax.random.split(jax.random.PRNGKey(2), seeds)
    returns = jax.jit(jax.vmap(lambda k: random_init_returns(trainer, hparams, k)))(keys)
    return _summary(np.asarray(returns))


def end_point_spread(run: dict[str, Any]) -> dict[str, float]:
    """How far apart the first episodes end over `SPREAD_SAMPLES` evaluations of each test task (each
    a fresh sample of the initialisation for PLATIPUS): the root mean square distance of each
    evaluation's mean end point from their average, averaged over tasks and seeds."""
    import jax

    trainer, state, hparams = run["trainer"], run["state"], run["hparams"]

    def ends(meta_params: Any, key: Any) -> Any:  # [tasks, N, 2] end points before adaptation
        return trainer.evaluate(meta_params, hparams, key, steps=0).end_obs[:, 0]

    keys = jax.random.split(jax.random.PRNGKey(3), SPREAD_SAMPLES)
    per_seed = jax.jit(jax.vmap(lambda m: jax.vmap(lambda k: ends(m, k))(keys)))(state.meta_params)
    means = np.asarray(per_seed).mean(axis=3)  # [seeds, samples, tasks, 2]: each evaluation's mean end
    spread = np.sqrt(((means - means.mean(axis=1, keepdims=True)) ** 2).sum(-1).mean(axis=1))  # [seeds, tasks]
    within = np.asarray(per_seed).std(axis=3).mean()  # spread among one evaluation's trajectories
    return {"spread_across_inits": float(spread.mean()), "spread_within_one_init": float(within)}


def compressed(run: dict[str, Any], seeds: int) -> dict[str, list[dict[str, float]]]:
    import jax

    from rlcx_jax.meta.compressed import VARIANTS, compressed_adaptation

    tables: dict[str, list[np.ndarray]] = {v: [] for v in VARIANTS}
    for s in range(seeds):
        params = jax.tree.map(lambda x: x[s], run["state"].meta_params)
        out = compressed_adaptation(run["trainer"], params, run["hparams"], run["keys"][s])
        for variant, returns in out.items():
            tables[variant].append(np.asarray(returns))
    return {v: _summary(np.stack(t)) for v, t in tables.items()}


def run_experiment(name: str, seeds: int, iterations: int | None, only: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every row of experiment `name` (only those in `only` when given)."""
    from rlcx_jax.workflows.meta_run import oracle_return

    experiment = EXPERIMENTS[name]
    print(f"{name}:", flush=True)
    rows = [m for m in experiment["methods"] if not only or m in only]
    runs = {m: run_method(experiment, m, seeds, iterations) for m in rows}
    first = next(iter(runs.values()))
    out: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git_state(),
        "command": "python benchmarks/meta.py " + " ".join(sys.argv[1:]),
        "hardware": cpu_info(),
        "family": experiment["family"],
        "methods": {m: r["record"] for m, r in runs.items()},
        "random_init": random_init(first["trainer"], first["hparams"], seeds),
        "oracle": oracle_return(first["trainer"]),
    }
    if experiment.get("spread"):
        out["end_point_spread"] = {m: end_point_spread(r) for m, r in runs.items()}
    if experiment.get("compressed") and "maml" in runs:
        out["compressed_init"] = compressed(runs["maml"], seeds)
    return out


def merge_rows(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """An experiment's stored record with the rows (methods, end-point spreads) of a partial rerun
    replaced or added; the rest (random init, compressed init) stays as measured before."""
    merged = {**old, "methods": {**old["methods"], **new["methods"]}}
    if "end_point_spread" in new:
        merged["end_point_spread"] = {**old.get("end_point_spread", {}), **new["end_point_spread"]}
    if "compressed_init" in new:
        merged["compressed_init"] = new["compressed_init"]
    return merged


def verdicts(results: dict[str, Any]) -> dict[str, str]:
    """The acceptance checks, each decided from the figures beside it."""
    out = {}
    maml_rows = ("maml", "maml-2step")
    uniform = results.get("point-nav-uniform", {"methods": {}})
    for row in (m for m in maml_rows if m in uniform["methods"]):
        steps = uniform["methods"][row]["adaptation"]
        one, two = steps[1]["mean"], steps[2]["mean"]
        out[f"{row} point-nav-uniform: after 1 step >= -16"] = f"{'yes' if one >= -16 else 'no'} ({one:.1f})"
        out[f"{row} point-nav-uniform: after 2 steps >= -8"] = f"{'yes' if two >= -8 else 'no'} ({two:.1f})"
    circle = results.get("point-nav-circle", {"methods": {}})
    for row in (m for m in maml_rows if m in circle["methods"] and "pretrain" in circle["methods"]):
        m, p = circle["methods"][row]["adaptation"][1], circle["methods"]["pretrain"]["adaptation"][1]
        beats = m["ci_low"] > p["ci_high"]
        out[f"{row} beats pretrained after 1 step on point-nav-circle (CIs apart)"] = (
            f"{'yes' if beats else 'no'} ({row} {m['mean']:.1f} [{m['ci_low']:.1f}, {m['ci_high']:.1f}], "
            f"pretrained {p['mean']:.1f} [{p['ci_low']:.1f}, {p['ci_high']:.1f}])"
        )
    for name, res in results.items():
        for method, rec in res["methods"].items():
            minutes = (rec["compile_s"] + rec["run_s"]) / 60
            per_seed = (rec["compile_s"] + rec["run_s"] / rec["seeds"]) / 60
            out[f"{name} {method}: meta-training under 10 min"] = (
                f"{'yes' if minutes < 10 else 'no'} for all {rec['seeds']} seeds vmapped ({minutes:.1f} min); "
                f"{'yes' if per_seed < 10 else 'no'} per seed ({per_seed:.1f} min: compile + run / seeds)"
            )
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        curves = {**{m: r["adaptation"] for m, r in res["methods"].items()}, "random init": res["random_init"]}
        for label, rows in curves.items():
            steps = [r["step"] for r in rows]
            ax.errorbar(
                steps,
                [r["mean"] for r in rows],
                yerr=[[r["mean"] - r["ci_low"] for r in rows], [r["ci_high"] - r["mean"] for r in rows]],
                marker="o",
                capsize=3,
                label=label,
            )
        if res.get("oracle") is not None:
            ax.axhline(res["oracle"], color="k", ls=":", lw=1, label="oracle")
        ax.set_title(name)
        ax.set_xlabel("policy-gradient steps")
        ax.set_ylabel("mean return (40 test tasks)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(row: dict[str, float]) -> str:
    return f"{row['mean']:.1f} [{row['ci_low']:.1f}, {row['ci_high']:.1f}]"


def markdown(path: Path) -> str:
    record = json.loads(path.read_text())
    record["verdicts"] = verdicts(record["results"])
    lines = []
    for name, res in record["results"].items():
        steps = len(res["random_init"])
        header = "| method | " + " | ".join(f"after {k}" for k in range(steps)) + " | env steps/s | compile s | run s |"
        lines += [f"**{name}** (mean over 40 test tasks; mean [95% CI] over seeds)", "", header,
                  "|---" * (steps + 4) + "|"]  # fmt: skip
        for method, rec in res["methods"].items():
            cells = " | ".join(_cell(r) for r in rec["adaptation"])
            lines.append(
                f"| {method} | {cells} | {rec['env_steps_per_s']:,.0f} | {rec['compile_s']:.0f} | {rec['run_s']:.0f} |"
            )
        lines.append("| random init | " + " | ".join(_cell(r) for r in res["random_init"]) + " | | | |")
        if res.get("oracle") is not None:
            lines.append(f"| oracle | {res['oracle']:.1f} | | | | | | |")
        if name == "point-nav-uniform":
            paper = " | ".join(f"{v:.1f}" for v in PAPER["maml"])
            lines.append(f"| paper: MAML (Finn et al. 2017) | {paper} | | | | |")
            lines.append(f"| paper: pretrained | {' | '.join(f'{v:.1f}' for v in PAPER['pretrain'])} | | | | |")
        if "platipus" in res["methods"]:
            lines.append("")
            lines.append(
                "PLATIPUS's step 0 is measured after its inference step, which uses one batch of the mean "
                "policy's trajectories in the task: one batch more than the other methods at every step."
            )
        lines.append("")
        if "end_point_spread" in res:
            lines += ["| method | spread of first-episode end points across initialisations | within one |",
                      "|---|---|---|"]  # fmt: skip
            for method, s in res["end_point_spread"].items():
                lines.append(f"| {method} | {s['spread_across_inits']:.3f} | {s['spread_within_one_init']:.3f} |")
            lines.append("")
        if "compressed_init" in res:
            lines += ["| MAML init | " + " | ".join(f"after {k}" for k in range(steps)) + " |",
                      "|---" * (steps + 1) + "|"]  # fmt: skip
            for variant, rows in res["compressed_init"].items():
                lines.append(f"| {variant} | " + " | ".join(_cell(r) for r in rows) + " |")
            lines.append("")
    lines += ["| check | verdict (from the figure beside it) |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in record["verdicts"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiments", default=",".join(EXPERIMENTS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=0, help="override every experiment's (quick checks)")
    parser.add_argument("--out", default="")
    parser.add_argument("--markdown", default="", help="print README tables from a results JSON and exit")
    parser.add_argument(
        "--update", action="store_true", help="replace these experiments in the existing JSON, keep the others"
    )
    parser.add_argument("--methods", default="", help="with --update: run only these rows, merge them into the JSON")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(Path(args.markdown)))
        return
    names = [n for n in args.experiments.split(",") if n]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        sys.exit(f"unknown experiment(s) {unknown}; known: {', '.join(EXPERIMENTS)}")
    load0 = loadavg()
    started = time.perf_counter()
    only = tuple(m for m in args.methods.split(",") if m)
    if only and not args.update:
        sys.exit("--methods needs --update (a partial rerun is merged into the stored results)")
    results = {n: run_experiment(n, args.seeds, args.iterations or None, only) for n in names}
    cpu = cpu_info()
    name = cpu_short_name(cpu.get("cpu_model", "cpu"))
    path = Path(args.out) if args.out else RESULTS / f"meta_{name}.json"
    if args.update and path.exists():  # each experiment keeps its own date, commit, command and hardware
        old = json.loads(path.read_text())
        if only:  # rows merged into the stored experiments
            results = {n: merge_rows(old["results"][n], r) if n in old["results"] else r for n, r in results.items()}
        kept = {n: r for n, r in old["results"].items() if n not in results}
        for r in kept.values():
            for field in ("date", "git", "command", "hardware"):
                r.setdefault(field, old[field])
        results = {**kept, **results}
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/meta.py " + " ".join(sys.argv[1:]),
        "hardware": cpu,
        "versions": local_versions(),
        "git": git_state(),
        "loadavg_start_end": [load0, loadavg()],
        "wall_s": time.perf_counter() - started,
        "paper": PAPER,
        "results": results,
        "verdicts": verdicts(results),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    plot(results, path.with_suffix(".png"))
    print(f"wrote {path}")
    print(markdown(path))


if __name__ == "__main__":
    main()
