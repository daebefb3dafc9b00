"""Throughput of rlcx_jax's own algorithms, this tree against an earlier commit, alternating processes.

    python benchmarks/against_commit.py --base c9efee1 --algos a2c reinforce --seeds 1 8 32

For algorithms rejax does not have (A2C, REINFORCE) the throughput table has no opponent; "did the
speed work make them faster" is a comparison with the code before it. Each sample is a fresh
Python process that builds the point with that tree's own `benchmarks/throughput.py` (`OurPoint`:
the same settings, compiler options and seeds as the throughput table), runs it once to warm up and
`--runs` more times, and reports the median env steps/s. The two trees alternate (the order
reverses on odd repeats); the figure is the median over repeats, and the ratio is this tree's over
the base's. The base is checked out with `git worktree` into a temporary folder and removed after.
Results: a table on stdout and benchmarks/results/against_commit_<cpu>.json (hardware, versions,
both commits, command, every sample).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import throughput  # noqa: E402  (hardware, versions, git state)

PROBE = """
import json, statistics, sys
sys.path.insert(0, {bench!r}); sys.path.insert(0, {repo!r})
import throughput
import rlcx_jax
assert rlcx_jax.__file__.startswith({repo!r}), rlcx_jax.__file__
point = throughput.OurPoint({algo!r}, {n_seeds}, {total}, 0)
point.run()
runs = [point.run() for _ in range({runs})]
print("RESULT " + json.dumps({{"steps_per_s": statistics.median(r["steps_per_s"] for r in runs),
                             "compile_s": point.compile_info["compile_s"]}}))
"""


def sample(repo: Path, algo: str, n_seeds: int, total: int, runs: int) -> dict:
    """One fresh process on the tree at `repo`: build, warm up, `runs` timed runs; the median."""
    code = PROBE.format(
        bench=str(repo / "benchmarks"), repo=str(repo), algo=algo, n_seeds=n_seeds, total=total, runs=runs
    )
    return throughput.probe(sys.executable, code, f"{repo} {algo} x{n_seeds}", timeout_s=1800)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the earlier commit to compare with")
    parser.add_argument("--algos", nargs="+", default=["a2c", "reinforce"], choices=throughput.ALGOS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per process (after one warm-up)")
    parser.add_argument("--total-timesteps", type=int, default=500_000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    repo = HERE.parent
    base_commit = subprocess.run(
        ["git", "rev-parse", args.base], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()
    hw = throughput.cpu_info()
    started = dt.datetime.now(dt.UTC)
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-f", str(base), base_commit],
            cwd=repo,
            check=True,
            capture_output=True,
        )
        try:
            for algo in args.algos:
                for n in args.seeds:
                    samples: dict[str, list[dict]] = {"this": [], "base": []}
                    for r in range(args.repeats):
                        for side in ("this", "base") if r % 2 == 0 else ("base", "this"):
                            tree = repo if side == "this" else base
                            samples[side].append(sample(tree, algo, n, args.total_timesteps, args.runs))
                            print(
                                f"[against {args.base}] {algo} x{n} repeat {r} {side:4s} "
                                f"{samples[side][-1]['steps_per_s']:,.0f} env steps/s",
                                flush=True,
                            )
                    median = {
                        side: float(np.median([s["steps_per_s"] for s in runs])) for side, runs in samples.items()
                    }
                    points.append(
                        {
                            "algo": algo,
                            "n_seeds": n,
                            "total_timesteps": args.total_timesteps,
                            "median_steps_per_s": median,
                            "this_over_base": median["this"] / median["base"],
                            "samples": samples,
                        }
                    )
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=repo, capture_output=True)
    result = {
        "benchmark": "against_commit",
        "timestamp_utc": started.isoformat(timespec="seconds"),
        "finished_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "benchmarks/against_commit.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "hardware": hw,
        "versions": throughput.local_versions(),
        "git": throughput.git_state(),
        "base_commit": base_commit,
        "method": (
            "one fresh process per sample on each tree (throughput.OurPoint of that tree: build, one "
            "warm-up run, median of --runs timed runs), trees alternating, medians over repeats; "
            "compile excluded"
        ),
        "points": points,
    }
    out = args.out or throughput.RESULTS / f"against_commit_{throughput.cpu_short_name(hw['cpu_model'])}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n| algorithm | seeds | env steps/s this | env steps/s {args.base} | this / base |\n|---|---|---|---|---|")
    for p in points:
        m = p["median_steps_per_s"]
        print(
            f"| {p['algo'].upper()} | {p['n_seeds']} | {m['this']:,.0f} | {m['base']:,.0f} | "
            f"{p['this_over_base']:.2f}x |"
        )
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
