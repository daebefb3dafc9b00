"""`rlcx plot`: IQM curves with bootstrap bands from hand-written metrics.jsonl files, checked against
numbers worked out by hand and against `logging.bootstrap_ci`; bad input is a one-line ValueError."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import matplotlib.figure
import numpy as np
import pytest

from rlcx_jax import logging as rlog
from rlcx_jax import plot

RET = "episode/episode_return"
COUNT = "episode/episode_count"


def _write_run(
    run_dir: pathlib.Path,
    table: dict[int, list[tuple[float | None, float]]],
    x: list[tuple[int, int | None]],
    config: dict | None = None,
) -> pathlib.Path:
    """metrics.jsonl rows written by hand: table[seed][point] = (episode return or None, episode count);
    x[point] = (update, env_steps or None: no env_steps key)."""
    run_dir.mkdir()
    lines = []
    for p, (update, env_steps) in enumerate(x):
        for seed, points in table.items():
            ret, count = points[p]
            row = {"seed": seed, "update": update, RET: ret, COUNT: count, "loss": 0.5 * p}
            if env_steps is not None:
                row["env_steps"] = env_steps
            lines.append(json.dumps(row))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if config is not None:
        (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir


@pytest.fixture
def run_a(tmp_path) -> pathlib.Path:
    """3 seeds at env steps 100/200/300; a None return (no finished episode) is a gap before the seed's
    first episode and the last return carried after it: curves [nan 4 4], [2 6 8], [nan nan 10]."""
    table = {
        0: [(None, 0), (4.0, 1), (None, 0)],
        1: [(2.0, 1), (6.0, 2), (8.0, 1)],
        2: [(None, 0), (None, 0), (10.0, 3)],
    }
    return _write_run(tmp_path / "ppo_a", table, [(10, 100), (20, 200), (30, 300)])


@pytest.fixture
def run_b(tmp_path) -> pathlib.Path:
    """5 seeds at env steps 150/300 (another grid); seed 3 finishes no episode in the second row."""
    table = {
        0: [(10.0, 1), (1.0, 1)],
        1: [(0.0, 1), (7.0, 1)],
        2: [(4.0, 1), (3.0, 1)],
        3: [(2.0, 1), (None, 0)],
        4: [(8.0, 1), (5.0, 1)],
    }
    config = {"algorithm": "dqn", "config": {"env": "CartPole-v1"}}
    return _write_run(tmp_path / "dqn_b", table, [(4, 150), (8, 300)], config)


# IQM by hand: the mean of sorted values [floor(n/4), ceil(3n/4)) of the seeds that have a value.
IQM_A = [2.0, (4.0 + 6.0) / 2, (4.0 + 8.0 + 10.0) / 3]  # n = 1, 2, 3: every present value
IQM_B = [(2.0 + 4.0 + 8.0) / 3, (2.0 + 3.0 + 5.0) / 3]  # sorted [0 2 4 8 10], [1 2 3 5 7]: the middle three
CURVES_B = np.array([[10.0, 1.0], [0.0, 7.0], [4.0, 3.0], [2.0, 2.0], [8.0, 5.0]])


def test_nan_iqm_matches_hand_numbers_and_logging_iqm() -> None:
    np.testing.assert_allclose(plot.nan_iqm(np.array([8.0, 1.0, 7.0, 2.0, 6.0, 3.0, 5.0, 4.0])), 4.5)  # (3+4+5+6)/4
    np.testing.assert_allclose(
        plot.nan_iqm(np.array([[10.0, 0.0, 4.0, 2.0, 8.0], [1.0, np.nan, 3.0, np.nan, 9.0]])), [14.0 / 3, 13.0 / 3]
    )  # the NaN row: IQM of [1 3 9] = mean of all three
    assert np.isnan(plot.nan_iqm(np.full(4, np.nan)))
    x = np.random.default_rng(1).normal(size=(6, 11))
    np.testing.assert_allclose(plot.nan_iqm(x, axis=0), [rlog.iqm(x[:, j]) for j in range(11)], rtol=1e-12)


def test_band_equals_bootstrap_ci_per_point_and_a_loop_where_seeds_lack_values() -> None:
    values = np.random.default_rng(2).normal(size=(7, 9)) * 10
    iqm, lo, hi = plot.iqm_band(values, num_resamples=300, confidence=0.9, seed=3)
    ref = np.array([rlog.bootstrap_ci(values[:, p], "iqm", 300, 0.9, seed=3) for p in range(9)])
    np.testing.assert_allclose(np.stack([iqm, lo, hi], axis=1), ref, rtol=1e-10)
    assert np.all(lo < iqm) and np.all(iqm < hi)

    values[0, :4] = np.nan  # seed 0 has no value before point 4, seed 1 none before point 2
    values[1, :2] = np.nan
    values[:, 0] = np.nan  # point 0: only seed 3 has one
    values[3, 0] = 1.5
    iqm, lo, hi = plot.iqm_band(values, num_resamples=300, confidence=0.9, seed=3)
    idx = np.random.default_rng(3).integers(0, 7, size=(300, 7))  # the documented draws: whole seeds
    for p in range(9):
        stats = []
        for b in range(300):
            present = values[idx[b], p][~np.isnan(values[idx[b], p])]
            if present.size:
                stats.append(rlog.iqm(present))
        np.testing.assert_allclose([lo[p], hi[p]], np.percentile(stats, [5, 95]), rtol=1e-10)
        np.testing.assert_allclose(iqm[p], rlog.iqm(values[:, p][~np.isnan(values[:, p])]), rtol=1e-12)
    assert iqm[0] == lo[0] == hi[0] == 1.5  # one seed with a value: every usable resample is that value
    assert np.all(np.isnan(plot.iqm_band(np.full((3, 2), np.nan), num_resamples=50)))  # no value: no curve, no band


def _capture_figure(monkeypatch) -> list[matplotlib.figure.Figure]:
    figures: list[matplotlib.figure.Figure] = []
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(self, fname, **kwargs):
        figures.append(self)
        return real_savefig(self, fname, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return figures


def test_plot_draws_each_runs_iqm_and_band_on_its_own_env_step_grid(tmp_path, run_a, run_b, monkeypatch) -> None:
    figures = _capture_figure(monkeypatch)
    out = tmp_path / "curves.svg"
    summary = plot.plot_runs([run_a, run_b], out, num_resamples=200)
    assert out.read_text().lstrip().startswith("<?xml") and "<svg" in out.read_text()
    (ax,) = figures[0].axes
    assert ax.get_xlabel() == "environment steps (per seed)" and ax.get_ylabel() == RET
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "ppo_a, 3 seeds",
        "dqn_b (dqn on CartPole-v1), 5 seeds",
    ]
    line_a, line_b = ax.lines
    np.testing.assert_allclose(line_a.get_xydata(), np.c_[[100, 200, 300], IQM_A])
    np.testing.assert_allclose(line_b.get_xydata(), np.c_[[150, 300], IQM_B])

    band_b = np.concatenate([p.vertices for p in ax.collections[1].get_paths()])
    for p, x in enumerate([150.0, 300.0]):
        _, lo, hi = rlog.bootstrap_ci(CURVES_B[:, p], "iqm", 200, 0.95, seed=0)
        at_x = band_b[band_b[:, 0] == x, 1]
        np.testing.assert_allclose([at_x.min(), at_x.max()], [lo, hi], rtol=1e-10)

    assert summary["x"] == "env_steps" and summary["metric"] == RET and summary["out"] == str(out)
    a, b = summary["runs"]
    assert (a["label"], a["seeds"], a["points"], a["final_x"]) == ("ppo_a", 3, 3, 300.0)
    assert (b["label"], b["seeds"], b["points"], b["final_x"]) == ("dqn_b (dqn on CartPole-v1)", 5, 2, 300.0)
    np.testing.assert_allclose([a["final_iqm"], b["final_iqm"]], [IQM_A[-1], IQM_B[-1]])
    _, lo, hi = rlog.bootstrap_ci(CURVES_B[:, 1], "iqm", 200, 0.95, seed=0)
    np.testing.assert_allclose(b["final_ci"], [lo, hi], rtol=1e-10)


def test_other_metric_and_update_axis_when_a_run_lacks_env_steps(tmp_path, run_a, monkeypatch) -> None:
    no_steps = _write_run(
        tmp_path / "old", {0: [(1.0, 1), (3.0, 1)], 1: [(5.0, 1), (None, 0)]}, [(7, None), (14, None)]
    )
    figures = _capture_figure(monkeypatch)
    summary = plot.plot_runs([run_a, no_steps], tmp_path / "f.png", metric="loss", labels=["A", "B"])
    assert summary["x"] == "update" and [r["label"] for r in summary["runs"]] == ["A", "B"]
    ax = figures[0].axes[0]
    assert ax.get_xlabel() == "updates"
    np.testing.assert_allclose(ax.lines[0].get_xydata(), [[10, 0.0], [20, 0.5], [30, 1.0]])  # loss = 0.5 * point
    np.testing.assert_allclose(ax.lines[1].get_xydata(), [[7, 0.0], [14, 0.5]])
    ret = plot.plot_runs([no_steps], tmp_path / "g.png", x="update")
    np.testing.assert_allclose(ret["runs"][0]["final_iqm"], (3.0 + 5.0) / 2)  # seed 1 carries 5.0 forward


def test_run_plot_command_writes_the_figure_and_prints_a_table(tmp_path, run_a, run_b, capsys) -> None:
    out = tmp_path / "both.png"
    summary = plot.run_plot([str(run_a), str(run_b), "--out", str(out), "--label", "PPO", "--label", "DQN"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert f"figure: {out}\n" in printed
    assert "[CI]" in printed and "PPO" in printed and "DQN" in printed and f"{IQM_B[-1]:.4g}" in printed
    assert [r["label"] for r in summary["runs"]] == ["PPO", "DQN"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("no runs", "no run directories given"),
        ("a file", "not a directory"),
        ("no metrics", "no metrics.jsonl"),
        ("empty metrics", "holds no rows"),
        ("foreign rows", "a row without seed and update"),
        ("unknown metric", "unknown metric 'episode/nope' in"),
        ("labels", "1 labels for 2 runs"),
        ("suffix", "must end in .png, .pdf, .svg"),
        ("missing out dir", "does not exist"),
    ],
)
def test_bad_input_is_a_one_line_value_error(tmp_path, run_a, run_b, case, message) -> None:
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "metrics.jsonl").write_text("")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "metrics.jsonl").write_text('{"step": 1, "reward": 2.0}\n')
    out = ["--out", str(tmp_path / "f.png")]
    argv = {
        "no runs": out,
        "a file": [str(tmp_path / "file.txt"), *out],
        "no metrics": [str(tmp_path / "empty"), *out],
        "empty metrics": [str(tmp_path / "blank"), *out],
        "foreign rows": [str(tmp_path / "foreign"), *out],
        "unknown metric": [str(run_a), "--metric", "episode/nope", *out],
        "labels": [str(run_a), str(run_b), "--label", "x", *out],
        "suffix": [str(run_a), "--out", str(tmp_path / "f.jpg")],
        "missing out dir": [str(run_a), "--out", str(tmp_path / "nowhere" / "f.png")],
    }[case]
    with pytest.raises(ValueError) as e:
        plot.run_plot(argv)
    assert message in str(e.value) and "\n" not in str(e.value)
    if case == "unknown metric":
        assert str(e.value).endswith(f"available: {COUNT}, {RET}, loss")
    assert not (tmp_path / "f.png").exists()


def test_plot_and_logging_import_without_jax_or_matplotlib() -> None:
    code = (
        "import sys, rlcx_jax.plot, rlcx_jax.logging; "
        "bad = [m for m in ('jax', 'matplotlib') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
