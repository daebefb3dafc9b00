"""Compile time of the throughput benchmark's programs: rlcx_jax against rejax, fresh processes.

    python benchmarks/compile_time.py                          # PPO, 1 / 8 / 32 seeds, 5 repeats
    python benchmarks/compile_time.py --algos ppo dqn --seeds 1 8 --repeats 3

`throughput.py` compiles each point once per side, so its compile column is one sample. Here every
sample is a fresh Python process that builds the point exactly as `throughput.py` does (ours:
`throughput.OurPoint`, with rlcx_jax.xla's options for that many environments; rejax:
`rejax_runner.Point` in benchmarks/.rejax-venv) and reports trace + lower and XLA compile seconds.
The sides alternate (the order reverses on odd repeats), no persistent compilation cache is set, and
the figure is the median over repeats. Results: a table on stdout and
benchmarks/results/compile_time_<cpu>.json (hardware, versions, commit, command, every sample).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import throughput  # noqa: E402  (hardware, versions, git state, the rejax venv)

PROBE = """
import json, sys, time
sys.path.insert(0, {here!r})
t0 = time.perf_counter()
import {module} as m
import_s = time.perf_counter() - t0
point = m.{cls}({algo!r}, {n_seeds}, {total}, 0)
print("RESULT " + json.dumps({{**point.compile_info, "import_s": import_s}}))
"""


def sample(side: str, algo: str, n_seeds: int, total: int) -> dict:
    """One fresh process: build and compile the point, return its compile_info."""
    module, cls = ("throughput", "OurPoint") if side == "ours" else ("rejax_runner", "Point")
    python = sys.executable if side == "ours" else str(throughput.venv_python(throughput.REJAX_VENV))
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    code = PROBE.format(here=str(HERE), module=module, cls=cls, algo=algo, n_seeds=n_seeds, total=total)
    return throughput.probe(python, code, f"{side} {algo} x{n_seeds}", env=env, timeout_s=900)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algos", nargs="+", default=["ppo"], choices=("ppo", "dqn", "dqn-rejax"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--total-timesteps", type=int, default=500_000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    throughput.ensure_rejax_venv(throughput.REJAX_VENV, throughput.rejax_pins(None))
    hw = throughput.cpu_info()
    started = dt.datetime.now(dt.timezone.utc)
    points = []
    for algo in args.algos:
        total = args.total_timesteps if algo != "dqn-rejax" else 100_000
        for n in args.seeds:
            samples: dict[str, list[dict]] = {"ours": [], "rejax": []}
            for r in range(args.repeats):
                for side in ("ours", "rejax") if r % 2 == 0 else ("rejax", "ours"):
                    samples[side].append(sample(side, algo, n, total))
                    print(f"[compile] {algo} x{n} repeat {r} {side:5s} {samples[side][-1]['compile_s']:.2f} s",
                          flush=True)
            median = {side: float(np.median([s["compile_s"] for s in runs])) for side, runs in samples.items()}
            points.append({"algo": algo, "n_seeds": n, "total_timesteps": total, "median_compile_s": median,
                           "ours_over_rejax": median["ours"] / median["rejax"], "samples": samples})
    result = {
        "benchmark": "compile_time",
        "timestamp_utc": started.isoformat(timespec="seconds"),
        "finished_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "benchmarks/compile_time.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "hardware": hw,
        "versions": throughput.local_versions(),
        "git": throughput.git_state(),
        "method": ("one fresh process per sample (build + trace/lower + XLA compile of jit(vmap(train)) as "
                   "throughput.py builds it), sides alternating, no persistent compilation cache; "
                   "compile_s = trace + lower + XLA compile; medians over repeats"),
        "points": points,
    }
    out = args.out or throughput.RESULTS / f"compile_time_{throughput.cpu_short_name(hw['cpu_model'])}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n| algorithm | seeds | compile s ours | compile s rejax | ours / rejax |\n|---|---|---|---|---|")
    for p in points:
        m = p["median_compile_s"]
        print(f"| {p['algo'].upper()} | {p['n_seeds']} | {m['ours']:.2f} | {m['rejax']:.2f} | {p['ours_over_rejax']:.2f} |")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
