"""The 64-setting x 4-seed PPO CartPole sweep of README's "Sweeps" section, run as one `rlcx sweep`
command and recorded with the machine, versions and commit.

    python benchmarks/sweep.py                 # about 3 minutes on a 2-core CPU
    python benchmarks/sweep.py --markdown benchmarks/results/sweep_amd-epyc.json

Writes `benchmarks/results/sweep_<cpu>.json` (the command, wall time, the sweep's own timing: compile
apart from run, env steps/s; and its per-setting summary) and `sweep_<cpu>.png` (the sweep's plot).
One run: this records that the command works end to end and what it costs, not a speed comparison.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import cpu_info, cpu_short_name, git_state, loadavg, local_versions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GRID = ["lr=1e-4,3e-4,1e-3,3e-3", "ent_coef=0,0.003,0.01,0.03", "clip_eps=0.1,0.2,0.3,0.4"]


def command(out: Path, total_steps: int, seeds: int) -> list[str]:
    argv = ["rlcx", "sweep", "ppo"]
    for axis in GRID:
        argv += ["--grid", axis]
    argv += ["--seeds", str(seeds), "--total-steps", str(total_steps)]
    return argv + ["--out", str(out), "--compile-cache", "off"]


def run(total_steps: int, seeds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sweep"
        argv = command(out, total_steps, seeds)
        load0 = loadavg()
        started = time.perf_counter()
        subprocess.run(argv, check=True, cwd=ROOT)
        wall = time.perf_counter() - started
        results = json.loads((out / "results.json").read_text())
        cpu = cpu_info()
        name = cpu_short_name(cpu.get("cpu_model", "cpu"))
        shutil.copy(out / "sweep.png", RESULTS / f"sweep_{name}.png")
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(argv[:-4]) + " --out DIR --compile-cache off",
        "hardware": cpu,
        "versions": local_versions(),
        "git": git_state(),
        "loadavg_start_end": [load0, loadavg()],
        "wall_s": wall,
        "timing": results["timing"],
        "summary": results["summary"],
    }
    path = RESULTS / f"sweep_{name}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return record


def markdown(path: Path) -> str:
    r = json.loads(path.read_text())
    t = r["timing"]
    settings = r["summary"]
    solved = sum(s["return_iqm"] >= 475 for s in settings)
    best = max(settings, key=lambda s: (s["return_iqm"], s["return_mean"], s["return_min"]))
    return (
        f"| runs | chunks x rows | devices | compile s | run s | env steps/s | wall s (whole command) "
        f"| settings with IQM >= 475 | best setting (IQM, mean, min) |\n|---|---|---|---|---|---|---|---|---|\n"
        f"| {t['rows']} | {t['chunks']} x {t['chunk_rows']} | {t['devices']} | {t['compile_s']:.1f} "
        f"| {t['run_s']:.1f} | {t['env_steps_per_s']:,.0f} | {r['wall_s']:.0f} | {solved} of {len(settings)} "
        f"| lr={best['lr']:g} ent_coef={best['ent_coef']:g} clip_eps={best['clip_eps']:g} "
        f"({best['return_iqm']:.0f}, {best['return_mean']:.0f}, {best['return_min']:.0f}) |\n\n"
        f"{r['hardware'].get('cpu_model', '?')}; `{r['command']}`; measured {r['date'][:10]} at "
        f"{(r.get('git') or {}).get('commit', '?')[:7]}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total-steps", type=int, default=100_000)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--markdown", type=Path, help="print README's table from a result file instead")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(args.markdown))
    else:
        run(args.total_steps, args.seeds)


if __name__ == "__main__":
    main()
