"""What pruning during training costs: wall time of gradual pruning to 90% against the dense run.

    python benchmarks/sparse_cost.py                 # PPO CartPole-v1, DQN Acrobot-v1; 1 and 8 seeds
    python benchmarks/sparse_cost.py --quick         # smoke run

Every variant trains through the chunked path that `rlcx train` uses (`vmap` of `learn` over the
seeds' states), compiled ahead of time; only the run is timed. Variants:
  dense          no extension
  gradual        gradual magnitude pruning to 90% (Zhu & Gupta), `rl.common.vmap_learn` (step counters
                 shared by the seeds, so the mask ranking stays behind a real `lax.cond`)
  gradual-plain  the same with a plain `vmap(learn)` (every leaf batched: the cond becomes a select
                 and the ranking runs at every optimizer step; what `rlcx train` did before)
Dense and gradual alternate within each repeat (order flipped every repeat); the figure is the median
over repeats; gradual-plain runs once per point (it is the slow reference). Each row carries the
final return (mean episode return of the last two metrics rows, mean over seeds) and the sparsity
reached. JSON: benchmarks/results/sparse_cost_<cpu>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlcx_jax import rl
from rlcx_jax.compress.training import CompressConfig, CompressHParams, find_masks
from rlcx_jax.rl import dqn, ppo
from rlcx_jax.rl.common import vmap_learn

HERE = Path(__file__).resolve().parent
# prune_start 0, prune_end 0.75, every 16 steps; uniform layer budgets (as the stored results measured)
GRADUAL = CompressConfig(prune_schedule="gradual", prune_distribution="uniform")
TARGET = 0.9


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cases(quick: bool) -> dict[str, tuple[str, Any, Any]]:
    ppo_steps, dqn_steps = (20_480, 20_000) if quick else (500_000, 100_000)
    return {
        "ppo-CartPole-v1": ("ppo", ppo.PPOConfig(total_timesteps=ppo_steps, log_every=4), ppo.PPOHParams()),
        "dqn-Acrobot-v1": (
            "dqn",
            dqn.DQNConfig(env="Acrobot-v1", total_timesteps=dqn_steps, learning_starts=1_000, log_every=100),
            dqn.DQNHParams(),
        ),
    }


@dataclasses.dataclass
class Variant:
    name: str
    trainer: Any
    hparams: Any
    plain: bool

    def compiled(self, seeds: int) -> tuple[Any, Any, float]:
        keys = jax.random.split(jax.random.PRNGKey(0), seeds)
        state = jax.jit(jax.vmap(self.trainer.init, in_axes=(0, None)))(keys, self.hparams)
        n = self.trainer.num_updates
        learn = jax.vmap(lambda s: self.trainer.learn(s, n)) if self.plain else vmap_learn(self.trainer, n, state)
        t = time.perf_counter()
        fn = jax.jit(learn).lower(state).compile()
        return fn, state, time.perf_counter() - t


def run_once(fn: Any, state: Any) -> tuple[float, Any, Any]:
    jax.block_until_ready(state)
    t = time.perf_counter()
    out, metrics = jax.block_until_ready(fn(state))
    return time.perf_counter() - t, out, metrics


def summary(out: Any, metrics: Any) -> dict[str, float]:
    ret = np.asarray(metrics.episode.episode_return)[:, -2:].mean(axis=1)
    masks = find_masks(out)
    sparsity = None
    if masks is not None:
        kernels = [np.asarray(m) for p, m in zip(jax.tree.leaves(out.params), jax.tree.leaves(masks))
                   if np.ndim(p) >= 3 and not np.all(m)]
        sparsity = float(np.mean([1.0 - k.mean() for k in kernels])) if kernels else 0.0
    return {"final_return_mean": float(ret.mean()), "final_return_min": float(ret.min()), "sparsity": sparsity}


def markdown_table(rows: list[dict]) -> str:
    """README's table: dense and gradual wall time, their ratio and the returns beside them."""
    names = {"ppo-CartPole-v1": "PPO CartPole-v1", "dqn-Acrobot-v1": "DQN Acrobot-v1"}
    lines = ["| run | seeds | dense s | gradual 90% s | cost | return dense | return gradual |",
             "|---|---|---|---|---|---|---|"]
    by_key = {(r["case"], r["seeds"], r["variant"]): r for r in rows}
    for (case, seeds, variant), g in by_key.items():
        if variant != "gradual":
            continue
        d = by_key[(case, seeds, "dense")]
        lines.append(f"| {names.get(case, case)} | {seeds} | {d['median_run_seconds']:.2f} | {g['median_run_seconds']:.2f} | "
                     f"{g['cost_vs_dense']:.2f}x | {d['final_return_mean']:.1f} | {g['final_return_mean']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None, metavar="JSON", help="print README's table and exit")
    args = p.parse_args(argv)
    if args.markdown is not None:
        print(markdown_table(json.loads(args.markdown.read_text())["rows"]))
        return 0
    cpu = _cpu()
    tag = "amd-epyc" if "EPYC" in cpu else ("intel-xeon" if "Xeon" in cpu else "cpu")
    out_path = args.out or HERE / "results" / f"sparse_cost_{tag}{'_quick' if args.quick else ''}.json"
    rows = []
    for case, (algorithm, config, hparams) in cases(args.quick).items():
        sparse_config = dataclasses.replace(config, extensions=(GRADUAL,))
        sparse_hp = hparams.with_ext("compress", CompressHParams(sparsity=TARGET))
        variants = {
            "dense": Variant("dense", rl.make(algorithm, config), hparams, plain=False),
            "gradual": Variant("gradual", rl.make(algorithm, sparse_config), sparse_hp, plain=False),
            "gradual-plain": Variant("gradual-plain", rl.make(algorithm, sparse_config), sparse_hp, plain=True),
        }
        for seeds in args.seeds:
            built = {name: v.compiled(seeds) for name, v in variants.items()}
            times: dict[str, list[float]] = {name: [] for name in variants}
            results: dict[str, dict[str, float]] = {}
            for r in range(args.repeats):
                order = ["dense", "gradual"] if r % 2 == 0 else ["gradual", "dense"]
                for name in order:
                    fn, state, _ = built[name]
                    seconds, out, metrics = run_once(fn, state)
                    times[name].append(seconds)
                    results[name] = summary(out, metrics)
            fn, state, _ = built["gradual-plain"]
            seconds, out, metrics = run_once(fn, state)
            times["gradual-plain"].append(seconds)
            results["gradual-plain"] = summary(out, metrics)
            steps = variants["dense"].trainer.num_updates * config.steps_per_update * seeds
            dense_s = float(np.median(times["dense"]))
            for name in variants:
                median = float(np.median(times[name]))
                row = {
                    "case": case, "seeds": seeds, "variant": name, "run_seconds": times[name],
                    "median_run_seconds": median, "env_steps_per_second": steps / median,
                    "compile_seconds": built[name][2], "cost_vs_dense": median / dense_s, **results[name],
                }
                rows.append(row)
                print(f"{case:16s} seeds={seeds:<2d} {name:13s} {median:7.2f} s  {steps / median:>10,.0f} steps/s  "
                      f"x{median / dense_s:.2f} dense  return {results[name]['final_return_mean']:.1f}  "
                      f"sparsity {results[name]['sparsity']}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    record = {
        "benchmark": "sparse_cost",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/sparse_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": commit,
        "hardware": {"cpu": cpu, "cores": __import__("os").cpu_count(), "platform": platform.platform()},
        "versions": {k: metadata.version(k) for k in ("jax", "jaxlib", "flax", "optax", "gymnax")},
        "settings": {"target_sparsity": TARGET, "schedule": dataclasses.asdict(GRADUAL), "repeats": args.repeats,
                     "cases": {k: {"algorithm": a, "config": repr(c)} for k, (a, c, _) in cases(args.quick).items()}},
        "rows": rows,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(record, indent=2) + "\n")
    print(markdown_table(rows))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
