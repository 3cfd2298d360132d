"""python -m bench's charts from each benchmark's report layout (bench/results/<machine>/*.json)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
RESULTS = sorted(HERE.glob("results/*/optim.json")) + sorted(HERE.glob("results/*/muon.json")) \
    + sorted(HERE.glob("results/*/norm.json"))


def load_bench_main():
    spec = importlib.util.spec_from_file_location("bench_main", HERE / "__main__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_main = load_bench_main()  # python -m bench's module, by its file (it has no import name)


@pytest.mark.parametrize("report", RESULTS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_committed_report_charts(report, tmp_path):
    (tmp_path / report.name).write_text(report.read_text())
    png = bench_main.chart(report.stem, tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    baseline, bars = bench_main.chart_bars(report.stem, json.loads(report.read_text()))
    assert bars and all(ratio > 0 for _, ratio, _ in bars)
    assert any(ours for _, _, ours in bars) and not all(ours for _, _, ours in bars)
