"""The compression benchmark's verdicts (benchmarks/compression.py: `checks`, `paper_table`,
`summary_markdown`) on small hand-made result dicts and on the stored results: every verdict is
the one of the figure printed beside it, and ties at the score ceiling or a plateau are not wins."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS_JSON = ROOT / "benchmarks" / "results" / "compression_amd-epyc.json"


def _load_script():
    # The script refuses to be imported as `compression` (it would shadow the stdlib-backport package).
    spec = importlib.util.spec_from_file_location("rlcx_bench_compression", ROOT / "benchmarks" / "compression.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


comp = _load_script()
TIE = "tie (saturated)"


def score(iqm: float, lo: float, hi: float, **extra) -> dict:
    return {"iqm": iqm, "ci95": [lo, hi], **extra}


def table(envs: dict[str, dict]) -> str:
    """paper_table of these environments' results, with their checks stored as the script stores them."""
    for env, r in envs.items():
        r["checks"] = comp.checks(r, env)
    return comp.paper_table({"envs": envs})


def cell(md: str, label_start: str, column: int = 0) -> str:
    """The text of one environment's cell in the row whose claim starts with `label_start`."""
    rows = [ln for ln in md.splitlines() if ln.startswith("| " + label_start)]
    assert len(rows) == 1, f"no single row starting with {label_start!r}"
    return rows[0].strip().strip("|").split(" | ")[1 + column].strip()


CARTPOLE_DENSE = score(500.0, 500.0, 500.0)
ACROBOT_DENSE = score(-84.0, -87.0, -81.7)


# ----------------------------------------------------------------------------------------------
# (a) int8: one verdict per figure, each from its own check
# ----------------------------------------------------------------------------------------------
def breakout_like() -> dict:
    dense = score(6.0, 6.0, 6.4)
    return {"dense": dense, "ptq": {"agreement_measure": "greedy agreement", "results": {"uniform/8": {
        "weights": score(6.0, 6.0, 6.4, agreement=0.995),
        "weights_act_minmax": score(6.0, 6.0, 6.4, agreement=0.98999),
    }}}}


def test_int8_cell_prints_the_weights_and_the_wa_verdict_each_from_its_own_check() -> None:
    text = cell(table({"Breakout-MinAtar": breakout_like()}), "QuaRL: int8 PTQ")
    weights, wa = text.split("; W+A")
    assert weights.endswith(": yes"), text
    assert wa.endswith(": **no**"), text  # 98.999% < 99%: the W+A figure fails
    assert "98.999%" in wa and "99.00%" not in wa  # not rounded up to the target
    ck = comp.checks(breakout_like(), "Breakout-MinAtar")
    assert (ck["int8_ptq_weights"]["verdict"], ck["int8_ptq_weights"]["holds"]) == ("yes", True)
    assert (ck["int8_ptq_weights_act_minmax"]["verdict"], ck["int8_ptq_weights_act_minmax"]["holds"]) == ("no", False)


def test_int8_weights_failing_is_printed_no_even_where_wa_passes() -> None:
    r = breakout_like()
    r["ptq"]["results"]["uniform/8"]["weights"]["agreement"] = 0.95
    r["ptq"]["results"]["uniform/8"]["weights_act_minmax"]["agreement"] = 0.999
    weights, wa = cell(table({"Breakout-MinAtar": r}), "QuaRL: int8 PTQ").split("; W+A")
    assert weights.endswith(": **no**") and wa.endswith(": yes")


# ----------------------------------------------------------------------------------------------
# (b) ties at the ceiling / on a plateau are not wins
# ----------------------------------------------------------------------------------------------
def cartpole_qat(qat_agreement: float | None = None, ptq_agreement: float | None = None) -> dict:
    qat = score(500.0, 500.0, 500.0)
    ctl = score(500.0, 500.0, 500.0)
    if qat_agreement is not None:
        qat["agreement"], ctl["agreement"] = qat_agreement, ptq_agreement
    return {"dense": CARTPOLE_DENSE, "qat": {"results": {"uniform/4": qat}, "control_ptq": {"uniform/4": ctl}}}


def test_qat_vs_ptq_both_at_the_ceiling_is_a_tie_not_a_hold() -> None:
    r = cartpole_qat()
    text = cell(table({"CartPole-v1": r}), "QuaRL: QAT >= PTQ (weights;")
    assert "1/1 hold" not in text and "0/1 yes, 1 tie, 0 no" in text, text
    assert "no agreement stored for QAT" in text  # said, not invented
    c = comp.checks(r, "CartPole-v1")["qat_ge_ptq_same_training"]
    assert c["per_point"]["uniform/4"]["verdict"] == TIE
    assert c["holds"] is False and c["verdict"] == TIE and c["counts"] == {
        "yes": 0, "tie": 1, "no": 0, "decided_on_agreement": 0}


def test_tie_at_the_ceiling_is_decided_on_agreement_where_both_sides_have_one() -> None:
    c = comp.compare("CartPole-v1", score(500.0, 500.0, 500.0, agreement=0.97),
                     score(500.0, 500.0, 500.0, agreement=0.99), CARTPOLE_DENSE)
    assert (c["verdict"], c["holds"]) == (f"{TIE}; decided on agreement: no", False)
    c = comp.compare("CartPole-v1", score(500.0, 500.0, 500.0, agreement=0.99),
                     score(500.0, 500.0, 500.0, agreement=0.97), CARTPOLE_DENSE)
    assert (c["verdict"], c["holds"]) == (f"{TIE}; decided on agreement: yes", True)
    r = cartpole_qat(0.97, 0.99)
    text = cell(table({"CartPole-v1": r}), "QuaRL: QAT >= PTQ (weights;")
    assert "0/1 yes, 0 ties, 1 no (1 ties decided on agreement)" in text, text


def test_log4_vs_uniform4_both_at_500_with_lower_log_agreement_is_not_a_yes() -> None:
    r = {"dense": CARTPOLE_DENSE, "ptq": {"agreement_measure": "greedy agreement", "results": {
        "log/4": {"weights": score(500.0, 500.0, 500.0, agreement=0.985)},
        "uniform/4": {"weights": score(500.0, 500.0, 500.0, agreement=0.994)}}}}
    text = cell(table({"CartPole-v1": r}), "QuaRL: 4-bit log")
    assert not text.endswith(": yes"), text
    assert text.endswith(f"{TIE}; agreement 98.50% vs 99.40%: **no**"), text
    assert comp.checks(r, "CartPole-v1")["log4_ge_uniform4_ptq"]["holds"] is False


def test_wide_sparse_vs_small_dense_both_at_500_is_a_tie() -> None:
    r = {"dense": CARTPOLE_DENSE, "wide": {
        "wide_sparse": score(500.0, 261.1, 500.0, hidden=[256, 256]),
        "small_dense": score(500.0, 500.0, 500.0, hidden=[80, 80]),
        "wide_dense": score(500.0, 500.0, 500.0, hidden=[256, 256])}}
    text = cell(table({"CartPole-v1": r}), "Obando-Ceron")
    assert not text.endswith(": yes") and f": {TIE}" in text, text
    c = comp.checks(r, "CartPole-v1")["wide_sparse_ge_small_dense"]
    assert (c["verdict"], c["holds"]) == (TIE, False)


def test_plateau_overlapping_cis_within_the_dense_ci_is_a_tie() -> None:
    dense = score(6.0, 6.0, 6.4)
    c = comp.compare("Breakout-MinAtar", score(6.1, 6.0, 6.4), score(6.0, 6.0, 6.3), dense)
    assert (c["verdict"], c["holds"]) == (TIE, False)
    assert c["saturated"].startswith("plateau")


# ----------------------------------------------------------------------------------------------
# (c) a real difference off the ceiling is still decided on returns
# ----------------------------------------------------------------------------------------------
def test_a_real_win_off_the_ceiling_is_a_yes_and_a_real_loss_a_no() -> None:
    better, worse = score(-70.0, -72.0, -68.0), score(-90.0, -93.0, -88.0)
    c = comp.compare("Acrobot-v1", better, worse, ACROBOT_DENSE)
    assert (c["verdict"], c["holds"], c["saturated"]) == ("yes", True, None)
    c = comp.compare("Acrobot-v1", worse, better, ACROBOT_DENSE)
    assert (c["verdict"], c["holds"]) == ("no", False)
    r = {"dense": ACROBOT_DENSE, "ptq": {"agreement_measure": "greedy agreement", "results": {
        "log/4": {"weights": dict(better, agreement=0.90)}, "uniform/4": {"weights": dict(worse, agreement=0.99)}}}}
    assert cell(table({"Acrobot-v1": r}), "QuaRL: 4-bit log").endswith(": yes")  # returns decide, not agreement


def test_no_ceiling_outside_cartpole() -> None:
    # 500 on Acrobot is no ceiling (its returns are <= 0 anyway): with separated CIs it is a win
    c = comp.compare("Acrobot-v1", score(500.0, 499.0, 500.0), score(400.0, 390.0, 410.0), ACROBOT_DENSE)
    assert c["verdict"] == "yes"


# ----------------------------------------------------------------------------------------------
# (d) the stored results
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stored() -> dict:
    return json.loads(RESULTS_JSON.read_text())


def test_stored_table_prints_no_yes_beside_a_failing_figure(stored: dict) -> None:
    md = comp.paper_table(stored)
    for i, (env, r) in enumerate(stored["envs"].items()):
        ck = comp.checks(r, env)
        single = {"Graesser": "gradual90_keeps_95pct", "Sparse training costs": "train_cost_le_125",
                  "Obando-Ceron": "wide_sparse_ge_small_dense", "QuaRL: 4-bit log": "log4_ge_uniform4_ptq"}
        for label, name in single.items():
            if name in ck:
                assert cell(md, label, i).endswith(": yes") == ck[name]["holds"], (env, label)
        if "int8_ptq_weights" in ck:
            segments = cell(md, "QuaRL: int8 PTQ", i).split("; W+A")
            for text, name in zip(segments, ("int8_ptq_weights", "int8_ptq_weights_act_minmax")):
                assert text.endswith(": yes") == ck[name]["holds"], (env, name, text)
        for label, name in (("QuaRL: QAT >= PTQ (weights;", "qat_ge_ptq_same_training"),
                            ("QuaRL: QAT >= PTQ (weights +", "qat_ge_ptq_weights_and_activations")):
            if name in ck:
                n = len(ck[name]["per_point"])
                assert f"{n}/{n} hold" not in cell(md, label, i)
                yes = int(re.search(r"all widths: (\d+)/", cell(md, label, i)).group(1))
                assert yes == ck[name]["counts"]["yes"]


def test_stored_cartpole_qat_row_does_not_claim_every_width_holds(stored: dict) -> None:
    """On the stored CartPole QAT rows, no width where both returns sit at the ceiling is a plain
    "yes": it is a tie, or a tie decided on agreement (where both sides stored one)."""
    md = comp.paper_table(stored)
    cartpole = list(stored["envs"]).index("CartPole-v1")
    text = cell(md, "QuaRL: QAT >= PTQ (weights;", cartpole)
    assert "15/15 hold" not in text, text
    rows = stored["envs"]["CartPole-v1"]["checks"]["qat_ge_ptq_same_training"]["per_point"]
    at_ceiling = {k: v for k, v in rows.items() if v["a"] >= 500 and v["b"] >= 500}
    assert len(at_ceiling) >= 10, rows
    for k, v in at_ceiling.items():
        assert v["verdict"].startswith(comp.TIE), (k, v)
        assert v["holds"] == v["verdict"].endswith("agreement: yes"), (k, v)
    breakout = list(stored["envs"]).index("Breakout-MinAtar")
    assert cell(md, "QuaRL: int8 PTQ", breakout).endswith(": **no**")  # W+A 98.999%


# ----------------------------------------------------------------------------------------------
# Summary: latency, provenance and the activation ranges as they ran
# ----------------------------------------------------------------------------------------------
def summary_of(r: dict) -> str:
    result = {"hardware": {"cpu_model": "test CPU"}, "timestamp_utc": "2026-01-01T00:00:00+00:00",
              "settings": {"seeds": 8, "eval_episodes": 32}, "json": "x.json", "command": "benchmarks/compression.py",
              "envs": {"CartPole-v1": r}}
    return comp.summary_markdown(result)


def cost_entry(new: bool) -> dict:
    row = {"params": 10, "nonzeros": 5, "flops_per_forward": 20}
    if new:
        row["latency_us"] = {f"batch{b}": {"median": 12.0, "min": 10.0, "max": 15.0, "iqr": [11.0, 13.0]}
                             for b in (1, 256)}
    else:
        row.update(latency_us_batch1=8.2, latency_us_batch256=30.0)
    return {"note": "latency: test", "variants": {"dense": row},
            "shrink_50_return_no_finetune": score(500.0, 500.0, 500.0)}


def test_summary_latency_median_min_max_and_older_single_measurements() -> None:
    md = summary_of({"dense": CARTPOLE_DENSE, "cost": cost_entry(new=True)})
    assert "| dense | 10 | 5 | 20 | 12.0 (10.0-15.0) | 12.0 (10.0-15.0) |" in md
    md = summary_of({"dense": CARTPOLE_DENSE, "cost": cost_entry(new=False)})
    assert "8.2 (single measurement (older run))" in md
    assert "masks do not make it faster" in md


def test_summary_lists_provenance_per_experiment() -> None:
    dense = dict(CARTPOLE_DENSE, provenance={
        "commit": "0123456789abcdef" * 2 + "01234567", "dirty": True, "dirty_count": 3, "dirty_paths": ["a", "b", "c"],
        "command": "python benchmarks/compression.py --envs CartPole-v1 --experiments dense",
        "started_utc": "2026-01-01T00:00:00+00:00", "finished_utc": "2026-01-01T00:01:00+00:00"})
    md = summary_of({"dense": dense, "cost": cost_entry(new=False)})
    assert "dense: 0123456789 (dirty tree: 3 paths) `python benchmarks/compression.py --envs CartPole-v1 " \
           "--experiments dense`" in md
    assert "cost: provenance not recorded (older run)" in md


def test_summary_describes_qat_act_ranges_per_sample() -> None:
    qa = {"uniform/8": {k: score(500.0, 500.0, 500.0) for k in ("qat", "ptq_dense", "ptq_control")}}
    md = summary_of({"dense": CARTPOLE_DENSE, "qat_act": {"finetune_steps": 10, "results": qa,
                                                           "activation_range": "sample"}})
    line = next(ln for ln in md.splitlines() if ln.startswith("Weights and activations"))
    assert "each sample's own range" in line and "per tensor with a dynamic range" not in line


def test_alternating_latency_reports_median_and_spread_over_rounds() -> None:
    import jax.numpy as jnp

    out = comp.alternating_latency({"a": (lambda p, x: x @ p, jnp.ones((4, 4))), "b": (lambda p, x: x + p, 1.0)},
                                   jnp.ones((1, 4)), rounds=3, min_round_s=0.005)
    for v in out.values():
        assert len(v["rounds_s"]) == 3 and v["calls_per_round"] >= 10
        assert v["min_s"] <= v["iqr_s"][0] <= v["median_s"] <= v["iqr_s"][1] <= v["max_s"]
