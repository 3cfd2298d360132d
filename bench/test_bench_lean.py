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


def test_bytes_moved_per_param_follow_the_streams():
    """fp32 AdamW: p, m, v read and written, g read; 8-bit moments and the compact master as
    the README counts them; a bf16 param beside its fp32 master is written, not read."""
    moved = {name: streams.moved for name, (streams, _) in bench_lean.ADAMW_MODES.items()}
    assert moved["torch fused fp32"] == 28 and moved["fusedopt fp32, 8-bit moments"] == 16
    assert moved["fusedopt bf16, compact master, 8-bit moments"] == 12
    assert moved["fusedopt bf16, fp32 master, fp32 moments"] == 28
    lion = bench_lean.ALGORITHMS["lion"][0]
    assert lion["fusedopt bf16, compact master, 8-bit momentum"][0].moved == 10
