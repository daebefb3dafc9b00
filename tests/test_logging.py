"""metrics.jsonl rows: episode statistics of rows without a finished episode are missing, not 0."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
from flax import struct

from rlcx_jax import logging as rlog
from rlcx_jax.rl.rollout import EpisodeMetrics


@struct.dataclass
class _Metrics:
    episode: EpisodeMetrics
    loss: jnp.ndarray
    env_steps: jnp.ndarray


def _metrics() -> _Metrics:
    """2 seeds x 3 rows; seed 0 finishes no episode in row 0, seed 1 none in row 2."""
    count = jnp.array([[0.0, 2.0, 1.0], [3.0, 1.0, 0.0]])
    ret = jnp.where(count > 0, jnp.array([[9.0, 10.0, 12.0], [4.0, 5.0, 7.0]]), 0.0)  # 0 where none finished
    episode = EpisodeMetrics(episode_return=ret, episode_length=ret * 2, episode_count=count,
                             terminated_fraction=jnp.where(count > 0, 1.0, 0.0))
    return _Metrics(episode, loss=jnp.zeros((2, 3)), env_steps=jnp.array([[8.0, 16.0, 24.0]] * 2))


def test_rows_without_a_finished_episode_hold_null_episode_statistics(tmp_path) -> None:
    rows = rlog.metrics_rows(_metrics(), first_row=0, log_every=5)
    by = {(r["seed"], r["update"]): r for r in rows}
    assert sorted(by) == [(0, 5), (0, 10), (0, 15), (1, 5), (1, 10), (1, 15)]
    for key in [(0, 5), (1, 15)]:
        row = by[key]
        assert row["episode/episode_return"] is None and row["episode/episode_length"] is None
        assert row["episode/terminated_fraction"] is None
        assert row["episode/episode_count"] == 0.0 and row["loss"] == 0.0  # counts and losses stay numbers
    assert by[(0, 10)]["episode/episode_return"] == 10.0 and by[(1, 5)]["episode/episode_length"] == 8.0
    rlog.append_rows(tmp_path, rows)
    text = (tmp_path / rlog.METRICS_FILE).read_text()
    assert '"episode/episode_return": null' in text and "NaN" not in text
    assert [json.loads(line) for line in text.splitlines()] == rows


def test_learning_curves_read_null_rows_as_gaps_then_carry_the_last_episode(tmp_path) -> None:
    rlog.append_rows(tmp_path, rlog.metrics_rows(_metrics(), first_row=0, log_every=5))
    steps, returns = rlog.curves_from_rows(rlog.read_rows(tmp_path))
    np.testing.assert_array_equal(steps, [8.0, 16.0, 24.0])
    np.testing.assert_array_equal(returns, [[np.nan, 10.0, 12.0], [4.0, 5.0, 5.0]])
    rlog.plot_learning_curves(rlog.read_rows(tmp_path), tmp_path / "curve.png", "test")
    assert (tmp_path / "curve.png").stat().st_size > 0
