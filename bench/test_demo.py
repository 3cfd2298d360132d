"""The demo end to end at a toy size (every optimizer, the check, the files), and the AdamW check
itself: it must fail on curves that differ."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import demo
import torch


def test_demo_trains_every_optimizer_and_writes_its_report(tmp_path):
    command = [sys.executable, str(Path(demo.__file__)), "--device", "cpu", "--steps", "12",
               "--width", "32", "--depth", "1", "--heads", "2", "--context", "16", "--batch", "4",
               "--val-points", "2", "--val-batches", "1", "--out", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    report = json.loads((tmp_path / "demo.json").read_text())
    expected = [n for n in demo.OPTIMIZERS if n != "torch-muon" or hasattr(torch.optim, "Muon")]
    assert list(report["runs"]) == expected
    for name, run in report["runs"].items():
        assert len(run["train_loss"]) == 12 and all(math.isfinite(v) for v in run["train_loss"])
        assert run["train_loss"][-1] < run["train_loss"][0] - 0.02, name  # it learns
        assert run["state_bytes"] > 0 and run["optimizer_step_ms"] > 0
    # The same model, seed and batches: the first loss is the same in every fp32 run, and within
    # bf16's rounding of the weights in the bf16 ones.
    first = {name: run["train_loss"][0] for name, run in report["runs"].items()}
    assert len({loss for name, loss in first.items() if "bf16" not in name}) == 1
    assert all(abs(loss - first["torch-adamw"]) < 0.02 for loss in first.values())
    assert report["adamw_check"]["agree"]
    assert "fusedopt.AdamW matches torch.optim.AdamW" in (tmp_path / "demo.md").read_text()
    for png in ("demo-loss.png", "demo-optimizer-step.png", "demo-state-memory.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adamw_check_fails_on_curves_that_differ():
    def run(losses):
        return {"train_loss": losses, "final_val_loss": losses[-1]}

    same = demo.adamw_curve_check({"torch-adamw": run([3.0, 2.5, 2.0]),
                                   "fusedopt-adamw": run([3.0, 2.5, 2.0 + 1e-4])})
    assert same["agree"]
    apart = demo.adamw_curve_check({"torch-adamw": run([3.0, 2.5, 2.0]),
                                    "fusedopt-adamw": run([3.0, 2.52, 2.0])})
    assert not apart["agree"] and apart["max_abs_train_loss_difference"] > 0.01
