"""Where a training run's time goes, per XLA operation: a `jax.profiler` trace, summarised.

    python benchmarks/profile_ops.py --label before            # PPO, CartPole, 1 seed
    python benchmarks/profile_ops.py --algo dqn --seeds 8 --label after
    benchmarks/.rejax-venv/bin/python benchmarks/profile_ops.py --side rejax --label rejax

The run is `jax.jit(jax.vmap(train))` with the throughput benchmark's settings (PureJaxRL's
CartPole configuration, `benchmarks/throughput.py`), compiled and run once untimed, then run again
under `jax.profiler.trace`. The Perfetto trace that JAX writes holds one event per executed XLA:CPU
thunk (a fusion, a dot, a copy, a loop); each event's *self* time (its duration minus that of the
events nested in it on the same thread) is summed per HLO instruction, and each instruction is
described by what it computes, read from the compiled module's HLO text. Self times of loops and
conditionals are their control overhead; the work inside them is counted at the instructions
they run.

Results: a table on stdout and an entry under `--label` in
benchmarks/results/profile_<algo>_<cpu>.json (hardware, versions, commit, settings, command, total
self time by instruction and by kind, the top instructions with their HLO), so that a "before" and
an "after" profile of a change sit side by side.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as dt
import glob
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import throughput  # noqa: E402  (hardware, versions, git state and the shared settings live there)

RESULTS = HERE / "results"
# Thunk events that are bookkeeping of the runtime, not operations of the program.
RUNTIME_EVENTS = re.compile(
    r"^(end: |\$|PjitFunction|CommonPjRt|ParseArguments|Handle |Allocate|Wait for|PythonRef|.*wait for completion)"
)
LOOP = re.compile(r"^(while|conditional)(\.\d+)?$")


@dataclasses.dataclass
class Event:
    name: str
    start: float
    dur: float
    tid: int


def load_events(trace_dir: str) -> list[Event]:
    """Complete ("X") events of the XLA threads from the Perfetto trace JAX wrote under `trace_dir`."""
    paths = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
    if not paths:
        raise SystemExit(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(paths[0]) as f:
        data = json.load(f)
    raw = data["traceEvents"] if isinstance(data, dict) else data
    python_tids = {
        e.get("tid")
        for e in raw
        if e.get("ph") == "M" and e.get("name") == "thread_name" and e["args"]["name"] == "python"
    }
    return [
        Event(e["name"], float(e["ts"]), float(e.get("dur", 0.0)), e.get("tid"))
        for e in raw
        if e.get("ph") == "X" and e.get("tid") not in python_tids and not RUNTIME_EVENTS.match(e["name"])
    ]


def self_times(events: list[Event]) -> dict[str, tuple[int, float]]:
    """Per instruction name: (count, summed self time in microseconds). Nesting is by time on the
    same thread; XLA:CPU may run a loop's body thunks on other pool threads than the loop's own."""
    out: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    by_thread: dict[int, list[Event]] = collections.defaultdict(list)
    for e in events:
        by_thread[e.tid].append(e)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e.start, -e.dur))
        stack: list[tuple[Event, list[float]]] = []  # (event, [children time])
        for e in evs:
            while stack and e.start >= stack[-1][0].start + stack[-1][0].dur:
                done, child = stack.pop()
                out[done.name][0] += 1
                out[done.name][1] += done.dur - child[0]
            if stack:
                stack[-1][1][0] += e.dur
            stack.append((e, [0.0]))
        for done, child in stack:
            out[done.name][0] += 1
            out[done.name][1] += done.dur - child[0]
    return {k: (int(v[0]), v[1]) for k, v in out.items()}


def hlo_computations(hlo_text: str) -> dict[str, list[str]]:
    """computation name -> its instruction lines, from a compiled module's HLO text."""
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            current = head.group(1)
            computations[current] = []
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None:
            computations[current].append(line.strip())
    return computations


INSTRUCTION = re.compile(r"^(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\(")  # name = shape opcode(


def enclosing_loops(hlo_text: str) -> dict[str, str]:
    """instruction name -> the innermost while loop (or conditional) whose body runs it, "top level"
    for the entry computation's own instructions. Read from the HLO: a `while` names its `body=`
    computation, a `conditional` its branch computations, a `call` its callee."""
    comps = hlo_computations(hlo_text)
    owner: dict[str, str] = {}  # computation -> loop instruction that runs it
    callers: dict[str, str] = {}  # computation -> computation of the caller (for call / loops)
    for comp, lines in comps.items():
        for line in lines:
            m = INSTRUCTION.match(line)
            if not m:
                continue
            name, _, opcode = m.groups()
            if opcode == "while":
                body = re.search(r"body=%?([\w.\-]+)", line)
                if body:
                    owner[body.group(1)] = name
                    callers[body.group(1)] = comp
            elif opcode == "conditional":
                listed = re.search(r"branch_computations=\{([^}]*)\}", line)
                branches = (
                    re.findall(r"[\w.\-]+", listed.group(1))
                    if listed
                    else re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", line)
                )
                for branch in branches:
                    owner[branch] = name
                    callers[branch] = comp
            elif opcode == "call":
                callee = re.search(r"to_apply=%?([\w.\-]+)", line)
                if callee:
                    callers[callee.group(1)] = comp

    def loop_of(comp: str) -> str:
        for _ in range(64):
            if comp in owner:
                return owner[comp]
            if comp not in callers:
                return "top level"
            comp = callers[comp]
        return "top level"

    out: dict[str, str] = {}
    for comp, lines in comps.items():
        for line in lines:
            m = INSTRUCTION.match(line)
            if m:
                out[m.group(1)] = loop_of(comp)
    return out


def hlo_descriptions(hlo_text: str) -> dict[str, str]:
    """instruction name -> a short description: the opcode, and for a fusion its fused root and ops."""
    computations = hlo_computations(hlo_text)
    ops_of = {
        name: [m.group(1) for m in (re.search(r"= [^ ]+ ([\w\-]+)\(", ln) for ln in lines) if m]
        for name, lines in computations.items()
    }
    out: dict[str, str] = {}
    for lines in computations.values():
        for line in lines:
            m = INSTRUCTION.match(line)
            if not m:
                continue
            name, shape, opcode = m.groups()
            desc = f"{opcode} {shape}"
            trips = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
            if trips:
                desc += f" trip count {trips.group(1)}"
            called = re.search(r"calls=%?([\w.\-]+)", line)
            if opcode == "fusion" and called and called.group(1) in ops_of:
                ops = [o for o in ops_of[called.group(1)] if o != "parameter"]
                common = collections.Counter(ops).most_common(4)
                desc += " {" + ", ".join(f"{o}x{n}" if n > 1 else o for o, n in common) + "}"
            out[name] = desc
    return out


def kind_of(name: str) -> str:
    """An instruction's family: its name without the numeric suffix (fusion.12 -> fusion)."""
    return re.sub(r"[.\-_]?\d+$", "", name)


def profile(side: str, algo: str, n_seeds: int, total_timesteps: int, seed: int, top: int) -> dict:
    import jax

    if side == "ours":
        point = throughput.OurPoint(algo, n_seeds, total_timesteps, seed)
        args = (point.keys, point.hps)
        env_steps = point.env_steps_per_seed * n_seeds
        settings = point.settings
    else:  # run under benchmarks/.rejax-venv/bin/python (rejax_runner.py's builders)
        import rejax_runner

        point = rejax_runner.Point(algo, n_seeds, total_timesteps, seed)
        args = (point.keys,)
        env_steps = point.total * n_seeds
        settings = point.config
    point.run()  # warm: first execution allocates and fills caches
    timed = point.run()
    with tempfile.TemporaryDirectory() as trace_dir:
        t0 = time.perf_counter()
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            jax.block_until_ready(point.compiled(*args))
        traced_s = time.perf_counter() - t0
        events = load_events(trace_dir)
    selfs = self_times(events)
    total = sum(t for _, t in selfs.values())
    hlo_text = point.compiled.as_text()
    desc = hlo_descriptions(hlo_text)
    loop_of = enclosing_loops(hlo_text)
    loops: dict[str, float] = collections.defaultdict(float)
    for name, (_, t) in selfs.items():
        loops[loop_of.get(name, "runtime (not an HLO instruction)")] += t
    rows = sorted(selfs.items(), key=lambda kv: -kv[1][1])
    kinds: dict[str, float] = collections.defaultdict(float)
    for name, (_, t) in selfs.items():
        kinds[kind_of(name)] += t
    return {
        "side": side,
        "algo": algo,
        "n_seeds": n_seeds,
        "settings": settings,
        "compile": point.compile_info,
        "untraced_run_s": timed["run_s"],
        "traced_run_s": traced_s,
        "events": len(events),
        "distinct_instructions": len(selfs),
        "self_time_total_s": total / 1e6,
        "self_time_per_env_step_us": total / env_steps,
        "by_kind": [
            {"kind": k, "self_s": t / 1e6, "share": t / total}
            for k, t in sorted(kinds.items(), key=lambda kv: -kv[1])[:top]
        ],
        "by_loop": [
            {"loop": name, "iterations": selfs.get(name, (0, 0.0))[0], "self_s_inside": t / 1e6, "share": t / total,
             "hlo": desc.get(name, "")}
            for name, t in sorted(loops.items(), key=lambda kv: -kv[1])[:top]
        ],
        "top_instructions": [
            {
                "name": name,
                "count": count,
                "self_s": t / 1e6,
                "share": t / total,
                "mean_us": t / max(count, 1),
                "hlo": desc.get(name, "?"),
            }
            for name, (count, t) in rows[:top]
        ],
    }


def print_summary(label: str, res: dict) -> None:
    print(f"\n[{label}] {res['side']} {res['algo']} x{res['n_seeds']} seeds: {res['events']} thunk events, "
          f"{res['self_time_total_s']:.2f} s self time ({res['self_time_per_env_step_us']:.2f} us per env step), "
          f"run {res['untraced_run_s']:.2f} s untraced / {res['traced_run_s']:.2f} s traced")
    print("  by kind:  " + ", ".join(f"{k['kind']} {100 * k['share']:.1f}%" for k in res["by_kind"][:8]))
    print("  inside loops: " + ", ".join(
        f"{r['loop']} ({r['iterations']}x) {100 * r['share']:.1f}%" for r in res["by_loop"][:8]))
    print(f"  {'instruction':<28} {'count':>8} {'self s':>8} {'share':>6} {'mean us':>8}  hlo")
    for r in res["top_instructions"]:
        print(f"  {r['name']:<28} {r['count']:>8} {r['self_s']:>8.3f} {100 * r['share']:>5.1f}% "
              f"{r['mean_us']:>8.2f}  {r['hlo'][:90]}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=("ours", "rejax"), default="ours",
                        help="rejax: run this script with benchmarks/.rejax-venv/bin/python")
    parser.add_argument("--algo", choices=("ppo", "dqn"), default="ppo")
    parser.add_argument("--seeds", type=int, default=1, help="seeds vmapped in one run")
    parser.add_argument("--total-timesteps", type=int, default=20_480,
                        help="keep it short: the trace holds one event per thunk executed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=25, help="instructions and kinds listed")
    parser.add_argument("--label", default="current", help="entry name in the JSON (e.g. before / after)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/profile_<algo>_<cpu>.json)")
    args = parser.parse_args(argv)

    res = profile(args.side, args.algo, args.seeds, args.total_timesteps, args.seed, args.top)
    print_summary(args.label, res)
    hw = throughput.cpu_info()
    out = args.out or RESULTS / f"profile_{args.algo}_{throughput.cpu_short_name(hw['cpu_model'])}.json"
    doc = json.loads(out.read_text()) if out.exists() else {"benchmark": "profile_ops", "profiles": {}}
    doc["profiles"][args.label] = {
        "timestamp_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/profile_ops.py", *(sys.argv[1:] if argv is None else argv)]),
        "hardware": hw,
        "versions": throughput.local_versions(),
        "git": throughput.git_state(("rlcx_jax",)),
        "loadavg": throughput.loadavg(),
        **res,
    }
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str))
    print(f"\nwrote {out} [{args.label}]")
    return res


if __name__ == "__main__":
    main()
