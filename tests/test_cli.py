"""Command line: help texts, evaluate, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from forcecentric.checkpoint import load, save_model
from forcecentric.cli import main
from forcecentric.nn.model import ForceField


@pytest.mark.parametrize("command", ["pretrain", "finetune", "evaluate", "demo"])
def test_every_command_has_help_with_defaults(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: forcecentric " + command in text
    if command in ("pretrain", "finetune", "demo"):
        assert "default" in text


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "forcecentric.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "forcecentric" in out.stdout


def test_evaluate_writes_metrics_and_parity_plot(tmp_path, tiny_config, morse_file, capsys):
    torch.manual_seed(0)
    model = ForceField(tiny_config)
    model.elements = [1, 6, 8]
    ckpt = save_model(model, tmp_path / "m.ckpt")
    rc = main(["evaluate", "--model", str(ckpt), "--data", str(morse_file), "--out", str(tmp_path / "ev")])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "ev" / "morse_metrics.json").read_text())
    for key in ("energy_mae", "energy_mae_per_atom", "force_mae", "force_rmse", "force_cos", "force_mae_per_element"):
        assert key in saved
    assert set(saved["force_mae_per_element"]) == {"H", "C", "O"}
    assert printed["force_mae"] == pytest.approx(saved["force_mae"])
    assert (tmp_path / "ev" / "morse_parity.png").stat().st_size > 1000


def test_errors_are_clear_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  layers: 3\n")
    assert main(["pretrain", "-c", str(bad), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'model.layers'" in err and "bad.yaml" in err
    assert main(["evaluate", "--model", str(tmp_path / "none.ckpt"), "--data", "x.xyz"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["pretrain", "-c", "no-such-preset"]) == 2
    assert "presets" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_key_value_options_share_one_parser_and_name_the_option(tmp_path, capsys):
    """--set, --select and --only: a malformed item names its option and the expected form, before
    any work starts; --set parses values as YAML, the others keep strings (--only splits commas)."""
    from forcecentric.cli import _key_values, _overrides

    assert _overrides(["trainer.max_epochs=3", "data.train=[a, b]", " model.cutoff =4.5", "a.b="]) == {
        "trainer.max_epochs": 3, "data.train": ["a", "b"], "model.cutoff": 4.5, "a.b": None}
    assert _key_values(["seed=1,2", "seed=3"], "--only", "KEY=V1,V2") == {"seed": "3"}
    cases = [
        (["pretrain", "--set", "trainer.max_epochs", "--run-dir", str(tmp_path / "r")], "--set expects KEY=VALUE"),
        (["relabel", "x.extxyz", "--out", str(tmp_path / "o.extxyz"), "--select", "=1"], "--select expects KEY=VALUE"),
        (["study", "--only", "molecule=", "--phase", "status"], "--only expects KEY=V1,V2 with KEY one of molecule"),
        (["study", "--only", "molecules=ethanol"], "got 'molecules=ethanol'"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "r").exists() and not (tmp_path / "o.extxyz").exists()


def test_label_then_build_data_then_evaluate(tmp_path, tiny_config, capsys):
    smi = tmp_path / "mols.smi"
    smi.write_text("smiles name\nCO methanol\nC=O formaldehyde\nCC(C)(C)(C)(C) impossible\n")
    args = ["label", str(smi), "--out", str(tmp_path / "lab"), "--workers", "1", "--conformers", "1",
            "--md-temperatures", "300", "--md-frames", "2", "--md-equilibration", "10", "--md-interval", "5",
            "--nm-temperatures", "300", "--nm-samples", "2", "--shard-molecules", "2", "--no-progress"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_failed"] == 1 and report["records_this_run"] >= 8
    failures = (tmp_path / "lab" / "failures.csv").read_text()
    assert "impossible" in failures and "SMILES" in failures
    # resuming finds every shard done and labels nothing again
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["records_this_run"] == 0
    # killed after failures.csv was written but before the shard that marks its chunk done: the
    # chunk is labelled again and its failure is listed once
    (tmp_path / "lab" / ".shard-00001.empty").unlink()
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["n_failed"] == 1
    rows = (tmp_path / "lab" / "failures.csv").read_text().splitlines()
    assert rows[0] == "name,smiles,reason" and [r.split(",")[0] for r in rows[1:]] == ["impossible"]
    assert not list((tmp_path / "lab").glob(".*.tmp"))
    # other settings in the same folder are refused
    assert main(args[:-1] + ["--seed", "5", "--no-progress"]) == 2
    capsys.readouterr()
    shards = sorted(str(p) for p in (tmp_path / "lab").glob("shard-*.extxyz"))
    assert main(["build-data", *shards, "--out", str(tmp_path / "store"), "--no-progress"]) == 0
    built = json.loads(capsys.readouterr().out)
    st = built["statistics"]
    assert st["n_equilibrium"] == 2 and st["n_off_equilibrium"] >= 6
    assert st["levels_of_theory"] == {"GFN2-xTB": st["n_conformations"]}
    # the labeller's sampling kind selects records: minima and MD frames without the normal modes
    from forcecentric.data import read_all

    kinds = [c.info["sampling"] for f in shards for c in read_all(f)]
    assert main(["build-data", *shards, "--out", str(tmp_path / "no_nm"), "--no-progress",
                 "--exclude", "sampling=normal_mode"]) == 0
    no_nm = json.loads(capsys.readouterr().out)
    assert no_nm["n_not_selected"] == kinds.count("normal_mode") >= 2
    assert no_nm["n_kept"] == kinds.count("md") + kinds.count("minimum") == st["n_conformations"] - kinds.count("normal_mode")
    assert no_nm["statistics"]["n_equilibrium"] == 2 and no_nm["options"]["exclude"] == {"sampling": "normal_mode"}
    assert main(["build-data", *shards, "--out", str(tmp_path / "md"), "--no-progress",
                 "--select", "sampling=md", "--select", "mol_id=methanol"]) == 0
    md = json.loads(capsys.readouterr().out)
    assert md["n_kept"] == 2 and md["statistics"]["n_equilibrium"] == 0
    # the record's own flags select too; true/false in any case
    assert main(["build-data", *shards, "--out", str(tmp_path / "minima"), "--no-progress",
                 "--select", "equilibrium=true"]) == 0
    minima = json.loads(capsys.readouterr().out)
    assert minima["n_kept"] == minima["statistics"]["n_equilibrium"] == kinds.count("minimum") == 2
    assert main(["build-data", *shards, "--out", str(tmp_path / "bad"), "--exclude", "sampling"]) == 2
    assert "--exclude expects KEY=VALUE" in capsys.readouterr().err
    torch.manual_seed(0)
    model = ForceField(tiny_config)
    model.elements = [1, 6, 8]
    ckpt = save_model(model, tmp_path / "m.ckpt")
    assert main(["evaluate", "--model", str(ckpt), "--data", str(tmp_path / "store")]) == 0
    assert json.loads(capsys.readouterr().out)["n_conformations"] == st["n_conformations"]


def test_finetune_config_keeps_its_init_from_unless_from_is_given(tmp_path, tiny_config, morse_file):
    """A config that names init_from (a run's own config.yaml, say) fine-tunes from it; --from
    overrides it. Before the fix the CLI's --from default (None) silently made it a scratch run."""
    ckpt = tmp_path / "pre.ckpt"
    save_model(ForceField(tiny_config), ckpt)
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(yaml.safe_dump({
        "task": "finetune", "init_from": str(ckpt), "model": tiny_config.model_dump(),
        "data": {"train": [str(morse_file)], "n_val": 8, "n_test": 8, "batch_size": 8},
        "trainer": {"max_epochs": 1, "progress_bar": False}, "optim": {"warmup_steps": 1}}))
    assert main(["finetune", "-c", str(cfg), "--run-dir", str(tmp_path / "a")]) == 0
    done = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert done["init_from"] == str(ckpt)
    assert load(tmp_path / "a" / "model.ckpt").metadata["pretrained_from"] == str(ckpt)
    other = tmp_path / "other.ckpt"
    save_model(ForceField(tiny_config), other)
    assert main(["finetune", "-c", str(cfg), "--run-dir", str(tmp_path / "b"), "--from", str(other)]) == 0
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["init_from"] == str(other)


def test_dft_commands_without_pyscf_stop_with_a_one_line_error(tmp_path, monkeypatch, capsys):
    """label --level dft and relabel need PySCF: without it they say how to install it, before any
    work and without a traceback."""
    import sys

    monkeypatch.setitem(sys.modules, "pyscf", None)  # import pyscf now raises ImportError
    smiles = tmp_path / "water.smi"
    smiles.write_text("O water\n")
    assert main(["label", str(smiles), "--out", str(tmp_path / "labels"), "--level", "dft", "--no-progress"]) == 2
    assert "pip install 'forcecentric[dft]'" in capsys.readouterr().err
    assert not (tmp_path / "labels").exists()
    from forcecentric.errors import MissingDependencyError

    with pytest.raises(ImportError):  # still an ImportError for Python callers
        raise MissingDependencyError("x")
