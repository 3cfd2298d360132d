"""bench_lean at a toy size, once per algorithm: every mode runs and its row is consistent (the
benchmark itself is timed only by `python bench/bench_lean.py`)."""

from __future__ import annotations

import pytest

import bench_lean


@pytest.mark.parametrize("algorithm", list(bench_lean.ALGORITHMS))
def test_each_mode_steps_and_reports(algorithm):
    modes, peer_kw = bench_lean.ALGORITHMS[algorithm]
    result = bench_lean.run_algorithm(modes, peer_kw, [(64, 80), (300,)], rounds=1, device="cpu")
    rows = result["rows"]
    assert set(rows) >= {name for name, (_, make) in modes.items() if not isinstance(make, str)}
    assert rows[result["baseline"]]["time_vs_baseline"] == 1.0
    for name, row in rows.items():
        assert row["ms"] > 0 and row["state_B_per_param"] > 0, name
        assert row["floor_ms"] > 0 and row["time_vs_floor"] > 0, name  # its own streams' probe
    assert rows[result["baseline"]]["floor_vs_baseline_floor"] == 1.0
    # 8-bit momentum on the 5,120-element matrix: codes + scales, with the 300-element tensor's
    # fp32 state: well under the fp32 baseline's.
    eight_bit = next(name for name in rows if name.startswith("fusedopt fp32, 8-bit"))
    assert rows[eight_bit]["state_vs_baseline"] < 0.4
    report = {"machine": bench_lean._report.machine("cpu"),
              "results": {f"{algorithm} lean": result}}
    assert bench_lean.markdown(report).count("\n| ") == len(rows) + 1


def test_pairs_alternate_each_fusedopt_mode_with_the_baseline():
    modes, peer_kw = bench_lean.ALGORITHMS["sgd"]
    result = bench_lean.run_algorithm(modes, peer_kw, [(64, 80)], rounds=1, device="cpu",
                                      pairs=4)
    rows = result["rows"]
    for name, row in rows.items():
        paired = row["paired_vs_baseline"]
        if name.startswith("fusedopt"):
            assert 0 < paired["q1"] <= paired["median"] <= paired["q3"], name
        else:  # the baseline (torch's step) and the peers are not alternated
            assert paired is None, name
    report = {"machine": bench_lean._report.machine("cpu"), "results": {"sgd lean": result}}
    assert "paired / baseline (4 pairs)" in bench_lean.markdown(report)


def test_paired_ratio_is_the_median_of_alternating_steps():
    """Each pair's ratio is the step's time over the baseline's; which one runs first swaps
    every pair."""
    order = []
    times = {"baseline": 2.0, "step": 3.0}

    def measure(fn, count):
        order.append(fn)
        return times[fn]

    paired = bench_lean.paired_ratio("baseline", "step", 3, measure)
    assert order == ["baseline", "step", "step", "baseline", "baseline", "step"]
    assert paired == {"median": 1.5, "q1": 1.5, "q3": 1.5}


def test_bytes_moved_per_param_follow_the_streams():
    """fp32 AdamW: p, m, v read and written, g read; 8-bit moments and the compact master as
    the README counts them; a bf16 param beside its fp32 master is written, not read."""
    moved = {name: streams.moved for name, (streams, _) in bench_lean.ADAMW_MODES.items()}
    assert moved["torch fused fp32"] == 28 and moved["fusedopt fp32, 8-bit moments"] == 16
    assert moved["fusedopt bf16, compact master, 8-bit moments"] == 12
    assert moved["fusedopt bf16, fp32 master, fp32 moments"] == 28
    lion = bench_lean.ALGORITHMS["lion"][0]
    assert lion["fusedopt bf16, compact master, 8-bit momentum"][0].moved == 10
