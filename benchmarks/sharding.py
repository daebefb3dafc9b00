"""Seeds sharded over CPU devices: PPO CartPole, `xla.jit(vmap(train))` on one device against
`shard.sharded(vmap(train))` over N forced CPU devices, in alternating processes.

    python benchmarks/sharding.py                         # 8 and 32 seeds, 2 devices, 3 rounds
    python benchmarks/sharding.py --seeds 8 --devices 2 4 --rounds 2 --steps 204800

XLA:CPU runs one device's program on one thread at a time, with some operations spread over its
intra-op thread pool; forcing `--xla_force_host_platform_device_count=N` gives N devices that run
their shards of the seed axis concurrently. The flag must be set before jax starts, so each side
runs in its own process (`--worker`), one process at a time, sides alternating per round; a
process compiles (timed apart), runs `--runs` times, and reports the median. Settings are
benchmarks/throughput.py's (PureJaxRL's CartPole PPO). Every run's final policy is evaluated
(32 episodes, stochastic policy) so each speed sits beside its returns.
JSON: benchmarks/results/sharding_<cpu>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def worker(n_seeds: int, steps: int, devices: int, runs: int) -> dict:
    """Runs in a fresh process: XLA_FLAGS were set by the parent before this interpreter started."""
    sys.path.insert(0, str(HERE))
    import jax
    import throughput

    from rlcx_jax import shard, xla

    point = throughput.OurPoint("ppo", n_seeds, steps, 0)  # compiles the plain program too (unused here)
    train = jax.vmap(point.module.make_train(point.cfg))
    fn = xla.jit(train) if devices == 1 else shard.sharded(train)
    t0 = time.perf_counter()
    out = jax.device_get(fn(point.keys, point.hps))
    first_s = time.perf_counter() - t0
    times, cpu0 = [], time.process_time()
    for _ in range(runs):
        t0 = time.perf_counter()
        out = jax.device_get(fn(point.keys, point.hps))
        times.append(time.perf_counter() - t0)
    cpu_s = (time.process_time() - cpu0) / runs
    point.out = jax.tree.map(jax.numpy.asarray, out)
    returns = point.evaluate(32)
    env_steps = point.env_steps_per_seed * n_seeds
    return {
        "devices": jax.device_count(),
        "n_seeds": n_seeds,
        "env_steps": env_steps,
        "first_call_s": first_s,
        "run_s": times,
        "steps_per_s": env_steps / float(np.median(times)),
        "cpu_s_per_m_steps": cpu_s / env_steps * 1e6,
        "returns": returns,
    }


def run_side(n_seeds: int, steps: int, devices: int, runs: int) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    cmd = [sys.executable, __file__, "--worker", str(n_seeds), str(steps), str(devices), str(runs)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown_table(record: dict) -> str:
    """README's table: one row per (seeds, devices), speed beside CPU time and returns."""
    rows = [
        "| seeds | devices | 1 device env steps/s | sharded env steps/s | speedup | CPU s per 1M steps 1 / sharded "
        "| final return mean/min 1 / sharded |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in record["points"]:
        one, many = (p["runs"][str(d)][-1]["returns"] for d in (1, p["devices"]))
        rows.append(
            f"| {p['n_seeds']} | {p['devices']} | {p['steps_per_s_one_device']:,.0f} | {p['steps_per_s_sharded']:,.0f} "
            f"| {p['speedup']:.2f}x | {p['cpu_s_per_m_steps_one_device']:.2f} / {p['cpu_s_per_m_steps_sharded']:.2f} "
            f"| {one['mean_over_seeds']:.0f}/{one['min_over_seeds']:.0f} / {many['mean_over_seeds']:.0f}/"
            f"{many['min_over_seeds']:.0f} |"
        )
    hw = record["hardware"]
    rows.append("")
    rows.append(
        f"{hw['cpu_model']}, {hw['usable_cores']} cores; median of {record['settings']['rounds']} alternating "
        f"processes per side; measured {record['timestamp_utc'][:10]} at {record['git']['commit'][:7]}"
        f"{' (dirty)' if record['git']['dirty'] else ''}."
    )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--devices", type=int, nargs="+", default=[2])
    ap.add_argument("--steps", type=int, default=500_000, help="env steps per seed")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (processes per side)")
    ap.add_argument("--runs", type=int, default=1, help="timed runs per process (median)")
    ap.add_argument("--markdown", type=Path, help="print README's table from this result file and exit")
    ap.add_argument("--worker", type=int, nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.markdown:
        print(markdown_table(json.loads(args.markdown.read_text())))
        return
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return

    sys.path.insert(0, str(HERE))
    import throughput

    started = dt.datetime.now(dt.UTC)
    points = []
    for n_seeds in args.seeds:
        for devices in args.devices:
            sides: dict[int, list[dict]] = {1: [], devices: []}
            for r in range(args.rounds):
                for d in (1, devices) if r % 2 == 0 else (devices, 1):
                    res = run_side(n_seeds, args.steps, d, args.runs)
                    sides[d].append(res)
                    print(
                        f"[{d} device(s)] seeds={n_seeds} round={r} {res['steps_per_s']:,.0f} steps/s, "
                        f"CPU {res['cpu_s_per_m_steps']:.2f} s/1M, return {res['returns']['mean_over_seeds']:.0f}",
                        flush=True,
                    )
            med = {d: float(np.median([x["steps_per_s"] for x in v])) for d, v in sides.items()}
            cpu = {d: float(np.median([x["cpu_s_per_m_steps"] for x in v])) for d, v in sides.items()}
            points.append(
                {
                    "n_seeds": n_seeds,
                    "devices": devices,
                    "steps_per_s_one_device": med[1],
                    "steps_per_s_sharded": med[devices],
                    "speedup": med[devices] / med[1],
                    "cpu_s_per_m_steps_one_device": cpu[1],
                    "cpu_s_per_m_steps_sharded": cpu[devices],
                    "runs": {str(d): v for d, v in sides.items()},
                }
            )
            print(
                f"seeds={n_seeds}: 1 device {med[1]:,.0f} steps/s, {devices} devices {med[devices]:,.0f} "
                f"({med[devices] / med[1]:.2f}x); CPU s/1M {cpu[1]:.2f} vs {cpu[devices]:.2f}",
                flush=True,
            )
    record = {
        "benchmark": "sharding",
        "timestamp_utc": started.isoformat(),
        "command": "python benchmarks/sharding.py " + " ".join(sys.argv[1:]),
        "finished_utc": dt.datetime.now(dt.UTC).isoformat(),
        "hardware": throughput.cpu_info(),
        "git": throughput.git_state(),
        "versions": throughput.local_versions(),
        "settings": {
            "algo": "ppo",
            "env": "CartPole-v1",
            "env_steps_per_seed_requested": args.steps,
            "rounds": args.rounds,
            "runs_per_process": args.runs,
            "settings": throughput.OUR_SETTINGS["ppo"],
        },
        "method": __doc__,
        "points": points,
    }
    cpu_name = throughput.cpu_short_name(record["hardware"]["cpu_model"])
    path = HERE / "results" / f"sharding_{cpu_name}.json"
    path.write_text(json.dumps(record, indent=1, default=float))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
