"""End to end: the demo's contract (quick version in the default suite, full run marked slow)."""

from __future__ import annotations

import json

import pytest

import forcecentric
from forcecentric.cli import main


def _check_contract(out):
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["held_out_molecule"] == "aspirin"
    assert metrics["force_mae"] > 0 and metrics["energy_mae"] >= 0
    model = forcecentric.load(out / "model.ckpt")
    calc = forcecentric.Calculator(out / "model.ckpt", device="cpu", dtype="float64")
    assert model.metadata["pretrained_from"].endswith("model.ckpt")
    assert calc.model.elements == model.elements
    for stage in ("pretrain", "finetune"):
        assert (out / stage / "learning_curve.png").is_file()
    return metrics


def test_quick_demo_meets_the_contract(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--no-scratch", "--no-progress"]) == 0
    _check_contract(out)
    assert "force MAE" in capsys.readouterr().out
    # a second run into the same folder is refused instead of mixing results
    assert main(["demo", "--out", str(out), "--quick", "--no-progress"]) == 2


@pytest.mark.slow
def test_full_demo_beats_scratch(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    metrics = _check_contract(out)
    assert metrics["force_mae_ratio_scratch_over_pretrained"] > 1.0
    assert metrics["wall_time_s"] > 0  # the demo's wall time is reported, not asserted: shared machines are noisy
