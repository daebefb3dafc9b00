"""Run `rlcx pipeline` (the README's main job) as a user would and record what it produced.

    python benchmarks/pipeline.py                 # runs `rlcx pipeline` with the default recipe, timed
    python benchmarks/pipeline.py --markdown      # prints README's table from the JSON

The command runs in a fresh run directory in a subprocess; its wall-clock time (import, compilation,
training, evaluation, report) is the figure the README states. Writes
benchmarks/results/pipeline_<cpu>.json (hardware, versions, commit, command, recipe, seconds per stage,
the evaluation table) and pipeline_<cpu>.png (the pipeline's own report plot).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(REPO))


def _throughput():
    spec = importlib.util.spec_from_file_location("rlcx_bench_throughput", HERE / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run(extra: list[str]) -> dict:
    tp = _throughput()
    hw = tp.cpu_info()
    run_dir = Path(tempfile.mkdtemp(prefix="rlcx-pipeline-")) / "run"
    command = ["rlcx", "pipeline", "--out", str(run_dir), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"rlcx pipeline failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    table = json.loads((run_dir / "evaluate" / "table.json").read_text())
    from rlcx_jax.workflows.pipeline import DONE_FILE, STAGES

    stages = {s: json.loads((run_dir / s / DONE_FILE).read_text())["seconds"] for s in STAGES if (run_dir / s).is_dir()}
    slug = tp.cpu_short_name(hw["cpu_model"])
    png = RESULTS / f"pipeline_{slug}.png"
    shutil.copyfile(run_dir / "evaluate" / "report.png", png)
    record = {
        "benchmark": "pipeline",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["rlcx", "pipeline", *extra]),
        "hardware": hw,
        "versions": tp.local_versions(),
        "loadavg_after": tp.loadavg(),
        "wall_seconds": wall,
        "stage_seconds": stages,
        "recipe": table["recipe"],
        "rows": table["rows"],
        "latency_note": table["latency_note"],
        "stdout_tail": proc.stdout[-4000:],
    }
    out = RESULTS / f"pipeline_{slug}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} and {png}; `rlcx pipeline` took {wall:.0f} s")
    shutil.rmtree(run_dir.parent, ignore_errors=True)
    return record


def markdown(record: dict) -> str:
    from rlcx_jax.workflows.pipeline import markdown_table, verdicts

    recipe = record["recipe"]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in record["stage_seconds"].items())
    lines = [
        f"`{record['command']}` on {record['hardware']['cpu_model']} ({record['hardware']['usable_cores']} cores), "
        f"commit {str(record['versions'].get('rlcx_jax_git'))[:12]}: **{record['wall_seconds']:.0f} s** in all "
        f"({stages}). {recipe['seeds']} seeds, {recipe['eval_episodes']} evaluation episodes per seed; teacher "
        f"{recipe['teacher_algorithm'].upper()} {tuple(recipe['teacher_hidden'])}, "
        f"student {tuple(recipe['student_hidden'])}.",
        "",
        markdown_table(record["rows"]).rstrip(),
        "",
        *[f"- {v}" for v in verdicts(record["rows"])],
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", action="store_true", help="print README's table from the saved JSON")
    parser.add_argument("--json", type=Path, default=None, help="results file for --markdown")
    parser.add_argument("extra", nargs="*", help="extra `rlcx pipeline` flags (after --)")
    args = parser.parse_args()
    if args.markdown:
        path = args.json or next(iter(sorted(RESULTS.glob("pipeline_*.json"))))
        print(markdown(json.loads(path.read_text())))
        return 0
    run(args.extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
