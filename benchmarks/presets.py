"""Do the presets learn? Train every preset of `rlcx_jax.presets` on several seeds and evaluate it.

    python benchmarks/presets.py                                  # every preset (hours on a 2-core CPU)
    python benchmarks/presets.py --only Pendulum-v1 Acrobot-v1    # these environments' presets
    python benchmarks/presets.py --only ppo/Breakout-MinAtar      # one preset (algorithm/env)
    python benchmarks/presets.py --markdown                       # README table from the saved JSON
    python benchmarks/presets.py --only ppo/Breakout-MinAtar --seeds 2 --set lr=5e-4 total_steps=1000000
                                                                  # a probe: writes presets_<cpu>_probe.json

Protocol (the CLI's): each preset trains `--seeds` seeds (default 4) in one call,
`jax.jit(jax.vmap(trainer.train, in_axes=(0, None)))` over `jax.random.split(PRNGKey(0), seeds)`, lowered
and compiled ahead of time (compile seconds) and then run (run seconds; env steps/s = seeds x steps per
seed / run seconds). The final policy of every seed plays `--eval-episodes` episodes (default 32; one
in each of that many parallel environments, `rlcx_jax.rl.evaluate.make_evaluator`), greedily for DQN and
with its stochastic policy otherwise (`default_greedy`), with keys `split(PRNGKey(10_000), seeds)` as
`rlcx eval` uses. A seed's score is its mean return; scores are aggregated over seeds with the
interquartile mean (IQM) and a 95% percentile-bootstrap CI (`rlcx_jax.logging`, Agarwal et al. 2021).
Also recorded: `train_return_last5pct`, the mean return of the training episodes (behaviour policy) that
ended in the last 5% of updates, per seed.

Each result is compared with a threshold: issue 18's acceptance bars where it sets one (PPO:
Pendulum-v1 >= -300 within 1M steps, Acrobot-v1 >= -100, Breakout-MinAtar with the conv torso >= 15),
else the environment's `reward_threshold` in Gym's registry (CartPole-v1 475, Acrobot-v1 -100,
MountainCar-v0 -110, MountainCarContinuous-v0 90; Pendulum-v1 and MinAtar have none). The verdict is
"yes" when the IQM reaches the threshold. rejax publishes configurations for several of these
environments (configs/gymnax/*.yaml) but no return figures for them, so its column says "not published".

Results: benchmarks/results/presets_<cpu>.json, one entry per preset ("ppo/Pendulum-v1"), each with its
own date, command, commit and versions; a run adds to or replaces entries of the saved file, so
environments can be measured separately. Timings were taken with `nice -n 19` on a machine other work
shared: information, not speed measurements (benchmarks/throughput.py measures speed).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(REPO))

from rlcx_jax import presets  # noqa: E402  (jax-free: the markdown needs no jax)

ACCEPTANCE: dict[tuple[str, str], float] = {
    ("ppo", "Pendulum-v1"): -300.0,
    ("ppo", "Acrobot-v1"): -100.0,
    ("ppo", "Breakout-MinAtar"): 15.0,
}
"""Issue 18's acceptance thresholds (IQM over >= 4 seeds of the final evaluation return)."""
ACCEPTANCE_MAX_STEPS = {("ppo", "Pendulum-v1"): 1_000_000}
"""Issue 18's step budgets: Pendulum-v1 must reach its threshold within 1M steps."""
GYM_REWARD_THRESHOLD: dict[str, float] = {
    "CartPole-v1": 475.0,
    "Acrobot-v1": -100.0,
    "MountainCar-v0": -110.0,
    "MountainCarContinuous-v0": 90.0,
}
"""`reward_threshold` of Gym's registrations (gym/envs/__init__.py); Pendulum-v1 and MinAtar have none."""
REJAX_FIGURE = "not published"
"""rejax's configs (configs/gymnax/*.yaml) come without return figures; its README shows speed plots only."""
MIN_SEEDS = 4
START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {msg}", flush=True)


def _throughput() -> Any:
    """benchmarks/throughput.py's machine and version helpers, loaded by path (as the other benchmarks do)."""
    spec = importlib.util.spec_from_file_location("rlcx_bench_throughput", HERE / "throughput.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------
# Thresholds and verdicts (used by --markdown too: no jax)
# ----------------------------------------------------------------------------------------------
def threshold_for(algorithm: str, env: str) -> dict[str, Any] | None:
    """The bar a preset is held to: issue 18's acceptance threshold, else Gym's reward_threshold."""
    if (algorithm, env) in ACCEPTANCE:
        return {
            "value": ACCEPTANCE[(algorithm, env)],
            "source": "issue 18 acceptance",
            "max_steps": ACCEPTANCE_MAX_STEPS.get((algorithm, env)),
        }
    if env in GYM_REWARD_THRESHOLD:
        return {"value": GYM_REWARD_THRESHOLD[env], "source": "Gym reward_threshold", "max_steps": None}
    return None


def verdict(entry: dict[str, Any]) -> str:
    """'yes' / 'no' against the entry's threshold (and step budget, and >= 4 seeds for acceptance); '-' if none."""
    bar = entry.get("threshold")
    if not bar:
        return "-"
    ok = entry["iqm"] >= bar["value"]
    if bar.get("max_steps") is not None and entry["total_steps_per_seed"] > bar["max_steps"]:
        ok = False
    if bar["source"] == "issue 18 acceptance" and len(entry["per_seed"]) < MIN_SEEDS:
        ok = False
    return "yes" if ok else "no"


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------
def build(algorithm: str, env: str, values: dict[str, Any]) -> tuple[Any, Any]:
    """(config, hparams) of `algorithm` on `env` from flat preset values, both validated."""
    from rlcx_jax import nets, rl

    spec = rl.get(algorithm)
    names = [[f.name for f in dataclasses.fields(cls)] for cls in (spec.config_cls, nets.NetConfig, spec.hparams_cls)]
    config_kw, net_kw, hparams_kw = presets.split(values, *names)
    net_kw = {k: tuple(v) if isinstance(v, list) else v for k, v in net_kw.items()}
    config = spec.config_cls(env=env, net=nets.NetConfig(**net_kw), **config_kw)
    hparams = spec.hparams_cls(**hparams_kw)
    config.validate()
    hparams.validate(config.extensions)
    return config, hparams


def measure(algorithm: str, env: str, values: dict[str, Any], seeds: int, episodes: int) -> dict[str, Any]:
    """Train `seeds` seeds of the setting in one vmapped call, evaluate each final policy; figures and times."""
    import jax
    import numpy as np

    from rlcx_jax import logging as rlog
    from rlcx_jax import rl
    from rlcx_jax.rl.evaluate import default_greedy, make_evaluator

    config, hparams = build(algorithm, env, values)
    trainer = rl.make(algorithm, config)
    keys = jax.random.split(jax.random.PRNGKey(0), seeds)
    t0 = time.perf_counter()
    compiled = jax.jit(jax.vmap(trainer.train, in_axes=(0, None))).lower(keys, hparams).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = compiled(keys, hparams)
    jax.block_until_ready(out.state)
    run_s = time.perf_counter() - t0

    greedy = default_greedy(algorithm)
    evaluator = jax.jit(jax.vmap(make_evaluator(trainer, episodes, greedy)))
    eval_keys = jax.random.split(jax.random.PRNGKey(10_000), seeds)  # rlcx eval's keys for seed 0
    returns = np.asarray(evaluator(out.state.params, out.state.obs_stats, eval_keys))  # (seeds, episodes)
    per_seed = returns.mean(axis=1)
    point, lo, hi = rlog.bootstrap_ci(per_seed, "iqm")
    steps = trainer.num_updates * config.steps_per_update
    episode = out.metrics.episode  # (seeds, rows): mean return of the episodes that ended in a row, and their count
    tail = max(1, np.shape(episode.episode_return)[1] // 20)
    returns_tail = np.asarray(episode.episode_return)[:, -tail:]
    counts_tail = np.asarray(episode.episode_count)[:, -tail:]
    ended = counts_tail.sum(axis=1)
    train_tail = (returns_tail * counts_tail).sum(axis=1) / np.maximum(ended, 1)
    return {
        "per_seed": [float(x) for x in per_seed],
        "per_seed_min": [float(x) for x in returns.min(axis=1)],
        "per_seed_max": [float(x) for x in returns.max(axis=1)],
        "iqm": point,
        "ci": [lo, hi],
        "mean": float(per_seed.mean()),
        "train_return_last5pct": [float(r) if n > 0 else None for r, n in zip(train_tail, ended)],
        "evaluation": f"{episodes} episodes per seed, {'greedy' if greedy else 'stochastic policy'}",
        "total_steps_per_seed": steps,
        "num_updates": trainer.num_updates,
        "compile_s": compile_s,
        "run_s": run_s,
        "env_steps_per_s": seeds * steps / run_s,
        "config": repr(config),
        "hparams": {k: v for k, v in dataclasses.asdict(hparams).items() if k != "ext"},
    }


# ----------------------------------------------------------------------------------------------
# Selection, record, markdown
# ----------------------------------------------------------------------------------------------
def select(only: list[str] | None) -> list[presets.Preset]:
    """The presets named by `--only` (env ids or algorithm/env), cheap ones first; all without it."""
    chosen = [presets.PRESETS[k] for k in presets.available()]
    if only:
        wanted = set(only)
        unknown = wanted - {p.env for p in chosen} - {f"{p.algorithm}/{p.env}" for p in chosen}
        if unknown:
            raise SystemExit(f"no preset for {sorted(unknown)}; known: {[f'{a}/{e}' for a, e in presets.available()]}")
        chosen = [p for p in chosen if p.env in wanted or f"{p.algorithm}/{p.env}" in wanted]
    return sorted(chosen, key=lambda p: (p.env in presets.MINATAR, p.values.get("total_steps", 0)))


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`--set NAME=VALUE` pairs; values are JSON where they parse (numbers, true/false, [64, 64])."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects NAME=VALUE, got {item!r}")
        try:
            out[name] = json.loads(text)
        except json.JSONDecodeError:
            out[name] = text
    return out


def git_state() -> dict[str, Any]:
    """HEAD and the tracked files that differ from it (untracked files, e.g. new results, do not count)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout

    dirty = git("status", "--porcelain", "--untracked-files=no").splitlines()
    return {"head": git("rev-parse", "HEAD").strip(), "dirty": bool(dirty), "dirty_paths": [ln[3:] for ln in dirty]}


def key_settings(values: dict[str, Any]) -> str:
    """A short description of a preset's main settings for the table."""
    v = values
    hidden = "x".join(str(h) for h in v.get("net_hidden", ()))
    net = f"{v.get('net_torso', 'mlp')} {hidden} {v.get('net_activation', '')}"
    if "num_steps" in v:  # on-policy
        rollout = f"{v['num_envs']}x{v['num_steps']}, {v.get('update_epochs', 1)}x{v.get('num_minibatches', 1)} mb"
    else:
        rollout = f"{v['num_envs']} envs, buffer {v['buffer_size']}, batch {v['batch_size']}"
    extra = [f"lr {v['lr']:g}", f"gamma {v.get('gamma', 0.99):g}"]
    if "ent_coef" in v:
        extra.append(f"ent {v['ent_coef']:g}")
    if v.get("double"):
        extra.append("double")
    return f"{net.strip()}; {rollout}; {', '.join(extra)}"


def is_current(entry: dict[str, Any]) -> bool:
    """Did the entry run the preset as it is now (same values, same env steps per seed after rounding)?"""
    preset = presets.get(entry["algorithm"], entry["env"])
    if preset is None:
        return False
    now = {k: list(v) if isinstance(v, tuple) else v for k, v in preset.values.items() if k != "total_steps"}
    ran = {k: v for k, v in entry["values"].items() if k != "total_steps"}
    return now == ran and entry["total_steps_per_seed"] == preset.total_steps


def fmt_return(entry: dict[str, Any]) -> str:
    return f"{entry['iqm']:.1f} [{entry['ci'][0]:.1f}, {entry['ci'][1]:.1f}]"


def markdown(record: dict[str, Any]) -> str:
    """The README table: one row per measured preset, the verdict beside each figure; then the unmeasured."""
    hw = record["hardware"]
    entries = record["presets"]
    lines = [
        f"`python benchmarks/presets.py` on {hw['cpu_model']} ({hw['usable_cores']} cores, shared, `nice -n 19`); "
        "return = IQM over seeds of each seed's mean evaluation return [95% bootstrap CI]; threshold: issue 18's "
        "acceptance bar (A) or Gym's reward_threshold (G); rejax publishes no return figures for its configs.",
        "",
        "| algo | env | settings | steps/seed | seeds | return IQM [95% CI] | per seed | threshold | reached |"
        " rejax | compile s | run s | env steps/s | source |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted(entries, key=lambda n: (entries[n]["env"] in presets.MINATAR, n)):
        e = entries[name]
        bar = e.get("threshold")
        bar_text = "-" if not bar else f">= {bar['value']:g} ({'A' if bar['source'].startswith('issue') else 'G'})"
        per_seed = ", ".join(f"{x:.0f}" if abs(x) >= 10 else f"{x:.3g}" for x in e["per_seed"])
        stale = (
            " (**no such preset now**)"
            if presets.get(e["algorithm"], e["env"]) is None
            else " (**not the current preset**)"
        )
        settings = key_settings(e["values"]) + ("" if is_current(e) else stale)
        lines.append(
            f"| {e['algorithm']} | {e['env']} | {settings} | {e['total_steps_per_seed']:,} | "
            f"{len(e['per_seed'])} | {fmt_return(e)} | {per_seed} | {bar_text} | {verdict(e)} | {e['rejax']} | "
            f"{e['compile_s']:.0f} | {e['run_s']:.0f} | {e['env_steps_per_s']:,.0f} | {e['source']} |"
        )
    names = [f"{a}/{env}" for a, env in presets.available()]
    missing = [n for n in names if n not in entries or not is_current(entries[n])]
    if missing:
        lines += [
            "",
            "Current presets not measured (or measured only with other settings): " + ", ".join(missing) + ".",
        ]
    commits = sorted({e["commit"]["head"][:12] + (" (dirty)" * e["commit"]["dirty"]) for e in entries.values()})
    lines += ["", f"Commits: {', '.join(commits)}; commands per entry in the JSON."]
    return "\n".join(lines)


def load(path: Path) -> dict[str, Any]:
    """A saved record, or an empty one."""
    return json.loads(path.read_text()) if path.exists() else {"benchmark": "presets", "presets": {}}


def save(path: Path, record: dict[str, Any], name: str) -> dict[str, Any]:
    """Write entry `name` (result or error) of `record` into the file at `path` as it is now (another run
    may have added entries since this one started) and return the merged record."""
    merged = load(path)
    merged.update({k: v for k, v in record.items() if k not in ("presets", "errors")})
    if name in record["presets"]:
        merged["presets"][name] = record["presets"][name]
        merged.get("errors", {}).pop(name, None)
    if name in record.get("errors", {}):
        merged.setdefault("errors", {})[name] = record["errors"][name]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2) + "\n")
    return merged


def merge(sources: list[Path], target: Path) -> dict[str, Any]:
    """Fold the entries of other result files (e.g. runs made side by side with --out) into `target`;
    an entry replaces the target's entry of the same preset only when it is newer."""
    record = load(target)
    for source in sources:
        other = load(source)
        for key in ("hardware", "versions"):
            record.setdefault(key, other.get(key))
        for name, entry in other["presets"].items():
            mine = record["presets"].get(name)
            if mine is None or entry["date"] > mine["date"]:
                record["presets"][name] = {**entry, "merged_from": source.name}
                record.get("errors", {}).pop(name, None)
    target.write_text(json.dumps(record, indent=2) + "\n")
    return record


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    tp = _throughput()
    hw = tp.cpu_info()
    overrides = parse_sets(args.set)
    probe = bool(overrides) or args.seeds < MIN_SEEDS
    slug = tp.cpu_short_name(hw["cpu_model"]) + ("_probe" if probe else "")
    out = args.out or RESULTS / f"presets_{slug}.json"
    record = load(out)
    record.update(hardware=hw, versions=tp.local_versions())
    command = " ".join(["python", "benchmarks/presets.py", *argv])
    for preset in select(args.only):
        values = {**preset.values, **overrides}
        name = f"{preset.algorithm}/{preset.env}"
        log(f"{name}: {args.seeds} seeds x {values.get('total_steps', 0):,} steps, {key_settings(values)}")
        commit, t0 = git_state(), time.perf_counter()
        try:
            result = measure(preset.algorithm, preset.env, values, args.seeds, args.eval_episodes)
        except Exception as exc:  # one failing preset must not lose the others' results
            log(f"{name}: FAILED {type(exc).__name__}: {exc}")
            record.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
            save(out, record, name)
            continue
        entry = {
            "algorithm": preset.algorithm,
            "env": preset.env,
            "values": {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()},
            "overrides": overrides,
            "source": preset.source,
            "rejax": REJAX_FIGURE,
            "threshold": threshold_for(preset.algorithm, preset.env),
            **result,
            "wall_s": time.perf_counter() - t0,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": command,
            "commit": {**commit, "head_at_end": git_state()["head"]},
            "versions": record["versions"],
            "loadavg_at_end": tp.loadavg(),
        }
        entry["verdict"] = verdict(entry)
        record["presets"][name] = entry
        record.get("errors", {}).pop(name, None)
        record = save(out, record, name)
        log(
            f"{name}: IQM {fmt_return(entry)} per seed {[round(x, 1) for x in entry['per_seed']]}; "
            f"threshold {entry['threshold'] and entry['threshold']['value']}: {entry['verdict']}; "
            f"compile {entry['compile_s']:.0f} s, run {entry['run_s']:.0f} s ({entry['env_steps_per_s']:,.0f} steps/s)"
        )
    log(f"wrote {out}")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=None, help="env ids or algorithm/env of the presets to run")
    parser.add_argument("--seeds", type=int, default=MIN_SEEDS, help=f"seeds per preset (default {MIN_SEEDS})")
    parser.add_argument("--eval-episodes", type=int, default=32, help="evaluation episodes per seed")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="override preset values (a probe: results go to presets_<cpu>_probe.json)",
    )
    parser.add_argument("--markdown", action="store_true", help="print the README table from the saved JSON")
    parser.add_argument("--json", type=Path, default=None, help="results file for --markdown")
    parser.add_argument("--out", type=Path, default=None, help="results file (default presets_<cpu>.json)")
    parser.add_argument(
        "--merge", nargs="+", type=Path, default=None, metavar="FILE", help="fold these results files into --out"
    )
    args = parser.parse_args(argv)
    if args.merge:
        tp = _throughput()
        target = args.out or RESULTS / f"presets_{tp.cpu_short_name(tp.cpu_info()['cpu_model'])}.json"
        print(markdown(merge(args.merge, target)))
        return 0
    if args.markdown:
        candidates = [p for p in sorted(RESULTS.glob("presets_*.json")) if "_probe" not in p.name]
        path = args.json or (candidates[0] if candidates else None)
        if path is None:
            raise SystemExit("no benchmarks/results/presets_<cpu>.json yet: run the benchmark first")
        print(markdown(json.loads(path.read_text())))
        return 0
    if args.seeds < 1 or args.eval_episodes < 1:
        raise SystemExit("--seeds and --eval-episodes must be >= 1")
    record = run(args, sys.argv[1:] if argv is None else argv)
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
