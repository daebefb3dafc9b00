"""Scaling benchmark (issue 16): PPO CartPole env steps/s as the number of vmapped settings, the number
of environments and the number of forced CPU devices grow, beside the raw environment ceiling.

    python benchmarks/scaling.py                          # full run, about 20 min on a 2-core CPU
    python benchmarks/scaling.py --quick                  # smoke run, under 2 min
    python benchmarks/scaling.py --axes settings --settings 1 8 64 --repeats 5
    python benchmarks/scaling.py --markdown benchmarks/results/scaling_amd-epyc.json   # README tables
    python benchmarks/scaling.py --plot benchmarks/results/scaling_amd-epyc.json       # redraw the PNG

What is measured (PPO with PureJaxRL's CartPole settings, benchmarks/throughput.py's OUR_SETTINGS,
built through the public API: `rl.make("ppo", PPOConfig(...))`):

settings  `xla.jit(jax.vmap(trainer.train))(keys, hparams)` for 1, 2, 4, ..., 256 settings, each with
          its own key and learning rate (log-uniform over [lr/4, 4 lr], `broadcast_tree(...).replace(lr=...)`),
          num_envs 4 and the same `--timesteps` per setting at every count (a like-for-like curve).
envs      one setting, num_envs 4 ... 4096, num_steps 128, total_timesteps = `--updates` * 128 * num_envs,
          so every point runs the same number of PPO updates.
ceiling   at every point of both axes, gymnax CartPole-v1 stepped with uniformly random actions in the
          same shape: `xla.jit(jax.vmap(run))` over the settings, `lax.scan` over updates of `lax.scan`
          over num_steps of `jax.vmap(env.step)` over num_envs; the same env steps as the PPO point.
          PPO / ceiling is the share of the bare environment's speed that training keeps.
devices   `shard.sharded(jax.vmap(trainer.train))` over 1, 2, 4, 8 CPU devices for a fixed number of
          settings (`--device-settings`), each count in its own process started with
          `XLA_FLAGS=--xla_force_host_platform_device_count=N` and `JAX_PLATFORMS=cpu` (as
          benchmarks/sharding.py does). More devices than cores cannot run more shards at once.

Trace + lower and XLA compilation are timed apart (`.lower().compile()`); in the device processes,
where `shard.sharded` compiles on its first call, compile time is the first call minus the median
run. Each run is one call of the compiled program plus `block_until_ready`; PPO and the ceiling
alternate within every repeat and the figure is the median over `--repeats` of env steps / run
seconds. Beside every PPO figure: the final training episode return of each setting (the last
metrics row in which an episode finished; min and median over settings), the CPU seconds per
million env steps of this process, and the CPU share other processes used while it ran.
JSON (hardware, versions, commit, command, settings, load average at start and end, every raw
timing) and a 3-panel PNG: benchmarks/results/scaling_<label>.json / .png, where <label> is the CPU
(e.g. amd-epyc) or the accelerator (e.g. nvidia-h100) unless --device-label names it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import throughput  # (benchmarks/throughput.py: machine, version and commit facts)

FULL = {
    "settings": [2**i for i in range(9)],
    "num_envs": [4**i for i in range(1, 7)],
    "devices": [1, 2, 4, 8],
    "timesteps": 2**15,
    "updates": 8,
    "device_settings": 32,
    "repeats": 3,
}
QUICK = {
    "settings": [1, 4],
    "num_envs": [4, 64],
    "devices": [1, 2],
    "timesteps": 2**12,
    "updates": 2,
    "device_settings": 4,
    "repeats": 2,
}
AXES = ("settings", "envs", "devices")
NUM_STEPS = throughput.OUR_SETTINGS["ppo"]["config"]["num_steps"]
FLAT_GAIN = 1.10  # a curve is "flat" from the first point no later point beats by more than this


# ----------------------------------------------------------------------------------------------
# Programs: PPO through the public API, and the bare environment
# ----------------------------------------------------------------------------------------------
def ppo_trainer(num_envs: int, total_timesteps: int) -> Any:
    """`rl.make("ppo", ...)` with PureJaxRL's CartPole settings, `num_envs` and `total_timesteps` changed."""
    from rlcx_jax import rl
    from rlcx_jax.nets import NetConfig
    from rlcx_jax.rl.ppo import PPOConfig

    kwargs = dict(throughput.OUR_SETTINGS["ppo"]["config"])
    kwargs.update(num_envs=num_envs, total_timesteps=total_timesteps, net=NetConfig(**kwargs["net"]))
    return rl.make("ppo", PPOConfig(**kwargs))


def sweep_inputs(n: int, seed: int = 0) -> tuple[Any, Any]:
    """One key per setting and PPOHParams with a leading axis of n: learning rates log-uniform over
    [lr/4, 4 lr] around PureJaxRL's 2.5e-4 (just 2.5e-4 for one setting)."""
    import jax
    import jax.numpy as jnp

    from rlcx_jax.rl.common import broadcast_tree
    from rlcx_jax.rl.ppo import PPOHParams

    hp = PPOHParams(**throughput.OUR_SETTINGS["ppo"]["hparams"])
    lrs = hp.lr * np.float_power(4.0, np.linspace(-1.0, 1.0, n)) if n > 1 else np.array([hp.lr])
    hps = broadcast_tree(hp, n).replace(lr=jnp.asarray(lrs, jnp.float32))
    return jax.random.split(jax.random.PRNGKey(seed), n), hps


def env_ceiling(num_envs: int, num_steps: int, num_updates: int) -> Callable[[Any], Any]:
    """One setting of the bare environment: gymnax CartPole-v1, random actions, PPO's loop shape.
    Returns (reward sum, finished episodes), so nothing is dead code and the random policy's mean
    episode return comes out as a check (about 22 for CartPole)."""
    import gymnax
    import jax
    import jax.numpy as jnp

    env, params = gymnax.make("CartPole-v1")
    n_actions = env.action_space(params).n
    step = jax.vmap(env.step, in_axes=(0, 0, 0, None))

    def env_step(carry: tuple, _: Any) -> tuple:
        state, key, total, episodes = carry
        key, k_act, k_step = jax.random.split(key, 3)
        actions = jax.random.randint(k_act, (num_envs,), 0, n_actions)
        _, state, reward, terminated, truncated, _ = step(jax.random.split(k_step, num_envs), state, actions, params)
        done = jnp.logical_or(terminated, truncated)
        return (state, key, total + reward.sum(), episodes + done.sum()), None

    def update(carry: tuple, _: Any) -> tuple:
        return jax.lax.scan(env_step, carry, None, num_steps)[0], None

    def run(key: Any) -> tuple[Any, Any]:
        k_reset, key = jax.random.split(key)
        _, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_reset, num_envs), params)
        carry = (state, key, jnp.float32(0.0), jnp.int32(0))
        state, key, total, episodes = jax.lax.scan(update, carry, None, num_updates)[0]
        return total, episodes

    return run


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def compile_timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, dict]:
    """`xla.jit(fn)` lowered and compiled ahead of time, the two phases timed apart."""
    from rlcx_jax import xla

    t0 = time.perf_counter()
    lowered = xla.jit(fn).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, {"trace_lower_s": t1 - t0, "xla_compile_s": t2 - t1, "compile_s": t2 - t0}


def timed_call(fn: Callable[..., Any], args: tuple, env_steps: int) -> tuple[Any, dict]:
    """One call waited for: seconds, env steps/s, own CPU seconds per 1M steps, other processes' CPU share."""
    import jax

    busy0, cpu0 = throughput._system_busy_s(), time.process_time()
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    run_s = time.perf_counter() - t0
    load = throughput.contention(busy0, cpu0, run_s)
    own = load.get("own_cpu_s", time.process_time() - cpu0)
    return out, {
        "run_s": run_s,
        "steps_per_s": env_steps / run_s,
        "cpu_s_per_m_steps": own / env_steps * 1e6,
        "other_cpu_frac": load.get("other_cpu_frac"),
    }


def summarize_runs(runs: list[dict]) -> dict:
    """Medians over repeats (and the worst contention seen)."""
    other = [r["other_cpu_frac"] for r in runs if r.get("other_cpu_frac") is not None]
    return {
        "median_steps_per_s": float(np.median([r["steps_per_s"] for r in runs])),
        "median_run_s": float(np.median([r["run_s"] for r in runs])),
        "median_cpu_s_per_m_steps": float(np.median([r["cpu_s_per_m_steps"] for r in runs])),
        "max_other_cpu_frac": max(other) if other else None,
        "runs": runs,
    }


def final_returns(metrics: Any) -> dict:
    """Each setting's mean training episode return in the last metrics row where an episode finished."""
    ret = np.asarray(metrics.episode.episode_return, dtype=np.float64)
    count = np.asarray(metrics.episode.episode_count)
    per_setting = []
    for r, c in zip(ret, count):
        rows = np.flatnonzero(c > 0)
        per_setting.append(float(r[rows[-1]]) if rows.size else float("nan"))
    vals = np.asarray(per_setting)
    return {
        "per_setting": per_setting,
        "min": float(np.nanmin(vals)) if np.isfinite(vals).any() else None,
        "median": float(np.nanmedian(vals)) if np.isfinite(vals).any() else None,
    }


# ----------------------------------------------------------------------------------------------
# One point: PPO and the ceiling in the same shape, alternating
# ----------------------------------------------------------------------------------------------
def measure_point(n_settings: int, num_envs: int, total_timesteps: int, repeats: int) -> dict:
    import jax

    trainer = ppo_trainer(num_envs, total_timesteps)
    cfg = trainer.config
    steps = cfg.num_updates * cfg.steps_per_update * n_settings
    keys, hps = sweep_inputs(n_settings)
    ppo_fn, ppo_compile = compile_timed(jax.vmap(trainer.train), keys, hps)
    ceiling_fn, ceiling_compile = compile_timed(jax.vmap(env_ceiling(num_envs, cfg.num_steps, cfg.num_updates)), keys)
    sides: dict[str, list[dict]] = {"ppo": [], "ceiling": []}
    calls = {"ppo": (ppo_fn, (keys, hps)), "ceiling": (ceiling_fn, (keys,))}
    outs: dict[str, Any] = {}
    for r in range(repeats):
        for name in ("ppo", "ceiling") if r % 2 == 0 else ("ceiling", "ppo"):
            fn, args = calls[name]
            outs[name], res = timed_call(fn, args, steps)
            sides[name].append(res)
    total, episodes = (np.asarray(x, dtype=np.float64) for x in outs["ceiling"])
    ppo, ceiling = summarize_runs(sides["ppo"]), summarize_runs(sides["ceiling"])
    return {
        "n_settings": n_settings,
        "num_envs": num_envs,
        "num_steps": cfg.num_steps,
        "num_updates": cfg.num_updates,
        "env_steps_per_setting": cfg.num_updates * cfg.steps_per_update,
        "env_steps": steps,
        "lr_range": [float(np.min(hps.lr)), float(np.max(hps.lr))],
        "ppo": {**ppo, "compile": ppo_compile, "returns": final_returns(outs["ppo"].metrics)},
        "ceiling": {
            **ceiling,
            "compile": ceiling_compile,
            "random_policy_mean_episode_return": float(total.sum() / max(episodes.sum(), 1.0)),
        },
        "ppo_over_ceiling": ppo["median_steps_per_s"] / ceiling["median_steps_per_s"],
        "loadavg_after": throughput.loadavg(),
    }


def log_point(axis: str, p: dict) -> None:
    ppo, ceil = p["ppo"], p["ceiling"]
    print(
        f"[{axis}] settings={p['n_settings']:<4} num_envs={p['num_envs']:<5} steps={p['env_steps']:>10,} "
        f"PPO {ppo['median_steps_per_s']:>12,.0f}/s (compile {ppo['compile']['compile_s']:.1f} s) "
        f"ceiling {ceil['median_steps_per_s']:>14,.0f}/s  PPO/ceiling {100 * p['ppo_over_ceiling']:.1f}%  "
        f"return min/median {fmt_ret(ppo['returns'])}  load {p['loadavg_after']}",
        flush=True,
    )


def sweep_settings(counts: list[int], timesteps: int, repeats: int, save: Callable[[], None]) -> list[dict]:
    points = []
    for n in counts:
        points.append(measure_point(n, 4, timesteps, repeats))
        log_point("settings", points[-1])
        save()
    return points


def sweep_envs(num_envs: list[int], updates: int, repeats: int, save: Callable[[], None]) -> list[dict]:
    points = []
    for e in num_envs:
        points.append(measure_point(1, e, updates * NUM_STEPS * e, repeats))
        log_point("envs", points[-1])
        save()
    return points


# ----------------------------------------------------------------------------------------------
# Devices: one process per forced CPU device count
# ----------------------------------------------------------------------------------------------
def device_worker(n_settings: int, timesteps: int, repeats: int) -> dict:
    """In a fresh process whose XLA_FLAGS the parent set: `shard.sharded(jax.vmap(trainer.train))`."""
    import jax

    from rlcx_jax import shard

    trainer = ppo_trainer(4, timesteps)
    steps = trainer.config.num_updates * trainer.config.steps_per_update * n_settings
    keys, hps = sweep_inputs(n_settings)
    fn = shard.sharded(jax.vmap(trainer.train))
    out, first = timed_call(fn, (keys, hps), steps)
    runs = [timed_call(fn, (keys, hps), steps)[1] for _ in range(repeats)]
    summary = summarize_runs(runs)
    return {
        "devices": jax.device_count(),
        "backend": jax.default_backend(),
        "n_settings": n_settings,
        "env_steps": steps,
        "first_call_s": first["run_s"],
        "compile_s_estimate": first["run_s"] - summary["median_run_s"],
        **summary,
        "returns": final_returns(out.metrics),
    }


def forced_device_env(devices: int) -> dict[str, str]:
    """This environment with N forced CPU devices (none forced for 1), CPU only."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_device_point(devices: int, n_settings: int, timesteps: int, repeats: int, timeout_s: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps([n_settings, timesteps, repeats])]
    env = forced_device_env(devices)
    for attempt in range(2):  # XLA:CPU's thread pool can wedge (benchmarks/throughput.py): one retry
        try:
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=timeout_s)
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            return {**res, "process_s": time.perf_counter() - t0, "attempt": attempt, "xla_flags": env.get("XLA_FLAGS")}
        except subprocess.TimeoutExpired:
            print(f"[devices] {devices} devices: no answer in {timeout_s:.0f} s, retrying", file=sys.stderr)
    raise RuntimeError(f"{devices}-device worker hung twice")


def sweep_devices(
    counts: list[int], n_settings: int, timesteps: int, repeats: int, save: Callable[[], None]
) -> list[dict]:
    points: list[dict] = []
    for d in counts:
        p = run_device_point(d, n_settings, timesteps, repeats, timeout_s=900.0)
        p["speedup_vs_first"] = p["median_steps_per_s"] / (points[0] if points else p)["median_steps_per_s"]
        p["loadavg_after"] = throughput.loadavg()
        points.append(p)
        print(
            f"[devices] {p['devices']} device(s), {n_settings} settings: {p['median_steps_per_s']:,.0f} steps/s "
            f"({p['speedup_vs_first']:.2f}x), CPU {p['median_cpu_s_per_m_steps']:.2f} s/1M, first call "
            f"{p['first_call_s']:.1f} s, return min/median {fmt_ret(p['returns'])}",
            flush=True,
        )
        save()
    return points


# ----------------------------------------------------------------------------------------------
# Reporting: markdown and plot from the JSON
# ----------------------------------------------------------------------------------------------
def fmt_ret(r: dict | None) -> str:
    if not r or r.get("min") is None:
        return "-"
    return f"{r['min']:.0f} / {r['median']:.0f}"


def fmt_other(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def flat_from(xs: list[int], ys: list[float]) -> tuple[int, float]:
    """The first x that no later point beats by more than FLAT_GAIN, and its y."""
    for i, y in enumerate(ys):
        if all(later <= FLAT_GAIN * y for later in ys[i + 1 :]):
            return xs[i], y
    return xs[-1], ys[-1]


def axis_table(points: list[dict], key: str, label: str) -> list[str]:
    base = points[0]["ppo"]["median_steps_per_s"]
    rows = [
        f"| {label} | env steps per setting | PPO env steps/s | env ceiling steps/s | PPO / ceiling | vs first "
        "| compile s PPO / ceiling | CPU s per 1M steps | final return min / median | other processes' CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        ppo, ceil = p["ppo"], p["ceiling"]
        rows.append(
            f"| {p[key]} | {p['env_steps_per_setting']:,} | {ppo['median_steps_per_s']:,.0f} "
            f"| {ceil['median_steps_per_s']:,.0f} | {100 * p['ppo_over_ceiling']:.1f}% "
            f"| {ppo['median_steps_per_s'] / base:.2f}x | {ppo['compile']['compile_s']:.1f} / "
            f"{ceil['compile']['compile_s']:.1f} | {ppo['median_cpu_s_per_m_steps']:.2f} | {fmt_ret(ppo['returns'])} "
            f"| {fmt_other(ppo['max_other_cpu_frac'])} |"
        )
    return rows


def count(n: int, noun: str) -> str:
    """'1 setting', '4 settings'."""
    return f"{n} {noun if n != 1 else noun.removesuffix('s')}"


def axis_verdict(points: list[dict], key: str, noun: str) -> str:
    xs = [p[key] for p in points]
    ys = [p["ppo"]["median_steps_per_s"] for p in points]
    share = [p["ppo_over_ceiling"] for p in points]
    ceil = [p["ceiling"]["median_steps_per_s"] for p in points]
    fx, fy = flat_from(xs, ys)
    best = int(np.argmax(ys))
    lo, hi = int(np.argmin(share)), int(np.argmax(share))
    return (
        f"PPO goes from {ys[0]:,.0f} env steps/s at {count(xs[0], noun)} to {ys[-1]:,.0f} at {count(xs[-1], noun)} "
        f"({ys[-1] / ys[0]:.2f}x; best {ys[best]:,.0f} at {xs[best]}); the curve is flat from {count(fx, noun)} on "
        f"({fy:,.0f}/s; no larger count is more than {100 * (FLAT_GAIN - 1):.0f}% faster). "
        f"PPO runs at {100 * share[lo]:.1f}% ({count(xs[lo], noun)}) to {100 * share[hi]:.1f}% ({xs[hi]}) of the bare "
        f"environment's speed, whose own curve goes from {ceil[0]:,.0f} to {ceil[-1]:,.0f} env steps/s "
        f"({ceil[-1] / ceil[0]:.1f}x)."
    )


def devices_table(points: list[dict], cores: int, reference: dict | None) -> list[str]:
    rows = [
        "| forced CPU devices | settings | PPO env steps/s | vs 1 device | CPU s per 1M steps "
        "| first call s (compile + run) | final return min / median | other processes' CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        rows.append(
            f"| {p['devices']} | {p['n_settings']} | {p['median_steps_per_s']:,.0f} | {p['speedup_vs_first']:.2f}x "
            f"| {p['median_cpu_s_per_m_steps']:.2f} | {p['first_call_s']:.1f} | {fmt_ret(p['returns'])} "
            f"| {fmt_other(p['max_other_cpu_frac'])} |"
        )
    rows += ["", devices_verdict(points, cores, reference)]
    return rows


def devices_verdict(points: list[dict], cores: int, reference: dict | None) -> str:
    by = {p["devices"]: p["median_steps_per_s"] for p in points}
    one = by.get(1, points[0]["median_steps_per_s"])
    best = max(by, key=by.get)
    words = [f"Best: {count(best, 'devices')}, {by[best]:,.0f} env steps/s ({by[best] / one:.2f}x the 1-device run)."]
    for d in sorted(by):
        if d > cores and cores in by:
            c = by[cores]
            if by[d] < c / FLAT_GAIN:
                how = f"slower than {cores} ({by[d]:,.0f} vs {c:,.0f}, {by[d] / c:.2f}x)"
            elif by[d] <= c * FLAT_GAIN:
                how = f"no faster than {cores} ({by[d]:,.0f} vs {c:,.0f}, {by[d] / c:.2f}x)"
            else:
                how = f"faster than {cores} ({by[d]:,.0f} vs {c:,.0f}, {by[d] / c:.2f}x): unexpected, check the load"
            words.append(f"{d} devices are {how}.")
    if any(d > cores for d in by):
        words.append(
            f"This machine has {cores} usable cores: more forced devices than cores only time-slice the same "
            f"cores, so they cannot beat {cores} devices."
        )
    if reference:
        words.append(
            f"For reference, `xla.jit(vmap)` on the default single device at {reference['n_settings']} settings "
            f"(settings axis, same steps per setting) ran {reference['ppo']['median_steps_per_s']:,.0f} env steps/s."
        )
    return " ".join(words)


def markdown(record: dict) -> str:
    s, hw = record["settings"], record["hardware"]
    out: list[str] = []
    if record.get("settings_axis"):
        pts = record["settings_axis"]
        out += [f"**Vmapped settings** (num_envs 4, {s['timesteps']:,} env steps per setting):", ""]
        out += axis_table(pts, "n_settings", "settings") + ["", axis_verdict(pts, "n_settings", "settings"), ""]
    if record.get("envs_axis"):
        pts = record["envs_axis"]
        out += [f"**Environments per setting** (1 setting, num_steps {NUM_STEPS}, {s['updates']} updates):", ""]
        out += axis_table(pts, "num_envs", "num_envs") + ["", axis_verdict(pts, "num_envs", "envs"), ""]
    if record.get("devices_axis"):
        ref = next((p for p in record.get("settings_axis") or [] if p["n_settings"] == s["device_settings"]), None)
        out += [
            f"**Forced CPU devices** (`shard.sharded`, {s['device_settings']} settings, {s['timesteps']:,} env "
            "steps per setting, one process per count):",
            "",
        ]
        out += devices_table(record["devices_axis"], hw["usable_cores"], ref) + [""]
    git = record["git"] or {"commit": "?", "dirty": False}
    out.append(
        f"{hw['cpu_model']}, {hw['usable_cores']} cores ({record['backend']}); median of {s['repeats']} runs, "
        f"compile excluded; load average {record['loadavg_start']} at start, {record.get('loadavg_end')} at end; "
        f"measured {record['timestamp_utc'][:10]} at {git['commit'][:7]}{' (dirty)' if git['dirty'] else ''} "
        f"with `{record['command']}` ({record.get('wall_s', 0) / 60:.0f} min)."
    )
    return "\n".join(out)


def log2_ticks(ax: Any, xs: list[int]) -> None:
    """A base-2 log x axis ticked at exactly `xs`."""
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.xaxis.set_minor_locator(NullLocator())


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = (
        ("settings_axis", "n_settings", "vmapped settings (num_envs 4)"),
        ("envs_axis", "num_envs", "num_envs (1 setting)"),
    )
    for ax, (name, key, xlabel) in zip(axes[:2], panels):
        pts = record.get(name) or []
        if not pts:
            ax.set_visible(False)
            continue
        xs = [p[key] for p in pts]
        ax.plot(xs, [p["ppo"]["median_steps_per_s"] for p in pts], "o-", label="PPO (train)")
        ax.plot(xs, [p["ceiling"]["median_steps_per_s"] for p in pts], "s--", label="env ceiling (random actions)")
        for x, p in zip(xs, pts):
            ax.annotate(
                f"{100 * p['ppo_over_ceiling']:.0f}%",
                (x, p["ppo"]["median_steps_per_s"]),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=7,
            )
        ax.set(yscale="log", xlabel=xlabel, ylabel="env steps/s", title="point labels: PPO / env ceiling")
        log2_ticks(ax, xs)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    devs = record.get("devices_axis") or []
    ax = axes[2]
    if devs:
        ds = [p["devices"] for p in devs]
        ys = [p["median_steps_per_s"] for p in devs]
        cores = record["hardware"]["usable_cores"]
        ax.plot(ds, ys, "o-", label=f"PPO, shard.sharded, {devs[0]['n_settings']} settings")
        ax.plot(ds, [ys[0] * min(d, cores) / ds[0] for d in ds], ":", color="gray", label=f"linear up to {cores} cores")
        ax.set(xlabel="forced CPU devices", ylabel="env steps/s", ylim=(0, None))
        log2_ticks(ax, ds)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    else:
        ax.set_visible(False)
    hw = record["hardware"]
    fig.suptitle(
        f"PPO CartPole-v1 scaling, {record['label']} ({hw['cpu_model']}, {hw['usable_cores']} cores), "
        f"{record['timestamp_utc'][:10]}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def device_label(cpu_model: str) -> str:
    """The accelerator's name (e.g. nvidia-h100) where JAX's default backend is one, else the CPU's."""
    import jax

    if jax.default_backend() == "cpu":
        return throughput.cpu_short_name(cpu_model)
    words = re.sub(r"[^a-z0-9]+", " ", jax.devices()[0].device_kind.lower()).split()
    return "-".join(words[:2]) or jax.default_backend()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--axes", nargs="+", choices=AXES, default=list(AXES))
    p.add_argument("--settings", type=int, nargs="+", help="vmapped setting counts (default 1 2 4 ... 256)")
    p.add_argument("--num-envs", type=int, nargs="+", help="num_envs values (default 4 16 ... 4096)")
    p.add_argument("--devices", type=int, nargs="+", help="forced CPU device counts (default 1 2 4 8)")
    p.add_argument("--timesteps", type=int, help="env steps per setting, settings and devices axes (default 2^15)")
    p.add_argument("--updates", type=int, help="PPO updates per point of the num_envs axis (default 8)")
    p.add_argument("--device-settings", type=int, help="settings split over the devices (default 32)")
    p.add_argument("--repeats", type=int, help="timed runs per point, median reported (default 3)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, under 2 minutes")
    p.add_argument("--device-label", help="result file name part (default: the CPU or accelerator, e.g. amd-epyc)")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/scaling_<label>[_quick].json)")
    p.add_argument("--markdown", type=Path, metavar="JSON", help="print README tables from a result file and exit")
    p.add_argument("--plot", type=Path, metavar="JSON", help="redraw the PNG beside a result file and exit")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.repeats < 3 and not args.quick:
        print(f"[warn] --repeats {args.repeats} < 3: medians of fewer than 3 runs", file=sys.stderr)
    return args


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    t_start = time.perf_counter()
    hw = throughput.cpu_info()
    import jax

    label = args.device_label or device_label(hw["cpu_model"])
    out = args.out or throughput.RESULTS / f"scaling_{label}{'_quick' if args.quick else ''}.json"
    record: dict[str, Any] = {
        "benchmark": "scaling",
        "timestamp_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python benchmarks/scaling.py", *argv]),
        "label": label,
        "backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "hardware": hw,
        "git": throughput.git_state(max_paths=20),
        "versions": throughput.local_versions(),
        "jax_environment": throughput.jax_environment(),
        "loadavg_start": throughput.loadavg(),
        "settings": {
            **{k: getattr(args, k) for k in FULL},
            "num_envs": args.num_envs,
            "axes": args.axes,
            "quick": args.quick,
            "num_steps": NUM_STEPS,
            "ppo": throughput._jsonable(throughput.OUR_SETTINGS["ppo"]),
            "lr_spread": "log-uniform over [lr/4, 4 lr] across the settings (lr alone for 1 setting)",
        },
        "method": __doc__,
    }

    def save() -> None:
        record["wall_s"] = time.perf_counter() - t_start
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(throughput._jsonable(record), indent=1) + "\n")

    print(f"[scaling] {hw['cpu_model']}, {hw['usable_cores']} cores, {label}; load {record['loadavg_start']}")
    if "settings" in args.axes:
        record["settings_axis"] = sweep_settings(args.settings, args.timesteps, args.repeats, save)
    if "envs" in args.axes:
        record["envs_axis"] = sweep_envs(args.num_envs, args.updates, args.repeats, save)
    if "devices" in args.axes:
        record["devices_axis"] = sweep_devices(args.devices, args.device_settings, args.timesteps, args.repeats, save)
    record["loadavg_end"] = throughput.loadavg()
    record["finished_utc"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    save()
    plot(record, out.with_suffix(".png"))
    print(f"[scaling] wrote {out} and {out.with_suffix('.png')} in {record['wall_s'] / 60:.1f} min\n")
    print(markdown(record))
    return record


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
    elif args.plot:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
    elif args.worker:
        print(json.dumps(throughput._jsonable(device_worker(*json.loads(args.worker)))))
    else:
        run(args, argv)


if __name__ == "__main__":
    main()
