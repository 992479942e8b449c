"""Inference fast paths give the plain path's results: Verlet list, batched prediction,
torch.compile, and the frozen TorchScript artifact (which runs without the training code)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from ase import units
from ase.build import molecule
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet

import forcecentric
from conftest import edge_set
from forcecentric.errors import CheckpointError, ElementError
from forcecentric.export import FrozenModel, dense_radius_graph, export, is_exported
from forcecentric.nn import VerletList, radius_graph


def test_verlet_list_equals_a_fresh_search_along_a_trajectory():
    gen = torch.Generator().manual_seed(0)
    pos = torch.rand(40, 3, generator=gen, dtype=torch.float64) * 9.0
    batch = torch.tensor([0] * 25 + [1] * 15)
    nl = VerletList(cutoff=3.0, skin=0.6)
    for _ in range(60):
        pos = pos + 0.04 * torch.randn(pos.shape, generator=gen, dtype=torch.float64)
        got = nl(pos, batch)
        assert edge_set(got) == edge_set(radius_graph(pos, batch, 3.0))
    assert nl.n_calls == 60 and 1 < nl.n_builds < 30  # reused, and rebuilt as atoms moved
    builds = nl.n_builds
    nl(pos, torch.tensor([0] * 20 + [1] * 20))  # other molecules: searched again
    assert nl.n_builds == builds + 1
    plain = VerletList(cutoff=3.0, skin=0.0)
    for _ in range(3):
        plain(pos, batch)
    assert plain.n_builds == 3
    with pytest.raises(ValueError, match="skin"):
        VerletList(3.0, skin=-1.0)


def test_calculator_with_verlet_list_follows_the_plain_model_through_md(model_path):
    atoms = molecule("CH3CH2OH")
    thermalize_momenta(atoms, temperature_K=600, rng=np.random.default_rng(0))
    calc = forcecentric.Calculator(model_path, dtype="float64", skin=0.3)
    atoms.calc = calc
    model = forcecentric.load(model_path, dtype="float64")
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    for _ in range(8):
        dyn.run(2)
        out = model(torch.tensor(atoms.numbers), torch.tensor(atoms.positions))
        np.testing.assert_allclose(atoms.get_forces(), out["forces"].numpy(), rtol=1e-9, atol=1e-10)
    assert calc.neighbors.n_builds < calc.neighbors.n_calls


def test_batched_predict_equals_single_calls(model_path):
    calc = forcecentric.Calculator(model_path, dtype="float64")
    mols = [molecule(name) for name in ("CH3CH2OH", "CH3OH", "CH3COOH", "H2O", "CH3CH2OH")]
    mols[-1].rotate(40, "z")
    energies, forces = calc.predict(mols, batch_size=2)
    assert energies.shape == (5,) and [f.shape for f in forces] == [(len(m), 3) for m in mols]
    for m, e, f in zip(mols, energies, forces):
        m.calc = forcecentric.Calculator(model_path, dtype="float64")
        assert e == pytest.approx(m.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(f, m.get_forces(), atol=1e-9)
    with pytest.raises(ElementError, match="structure 1"):
        calc.predict([molecule("H2O"), molecule("NH3")])


def test_dense_graph_of_the_artifact_equals_the_library_graph():
    gen = torch.Generator().manual_seed(3)
    pos = torch.rand(30, 3, generator=gen) * 7.0
    batch = torch.tensor([0] * 12 + [1] * 18)
    assert edge_set(dense_radius_graph(pos, batch, 4.0)) == edge_set(radius_graph(pos, batch, 4.0))


def test_exported_artifact_gives_the_checkpoint_energies_and_forces(model_path, tmp_path):
    art = export(model_path, tmp_path / "model.pt", dtype="float64")
    assert is_exported(art) and not is_exported(model_path)
    assert not list(tmp_path.glob("*.tmp"))
    frozen = forcecentric.load(art)
    assert isinstance(frozen, FrozenModel) and frozen.elements == [1, 6, 8] and frozen.cutoff == 5.0
    assert frozen.meta["units"]["forces"] == "eV/Angstrom" and frozen.meta["dtype"] == "float64"
    model = forcecentric.load(model_path, dtype="float64")
    a, b = molecule("CH3CH2OH"), molecule("CH3COOH")
    z = torch.tensor(np.concatenate([a.numbers, b.numbers]))
    pos = torch.tensor(np.concatenate([a.positions, b.positions + 20.0]))
    batch = torch.tensor([0] * len(a) + [1] * len(b))
    ref = model(z, pos, batch)
    got = frozen(z, pos, batch)  # its own neighbour search
    torch.testing.assert_close(got["energy"], ref["energy"], atol=1e-10, rtol=0)
    torch.testing.assert_close(got["forces"], ref["forces"], atol=1e-10, rtol=0)
    # through the calculator, which passes its Verlet list
    for atoms, e_ref in ((a, ref["energy"][0]), (b, ref["energy"][1])):
        atoms.calc = forcecentric.Calculator(art, dtype="float64")
        assert atoms.get_potential_energy() == pytest.approx(float(e_ref), abs=1e-9)
    with pytest.raises(ElementError):
        atoms = molecule("NH3")
        atoms.calc = forcecentric.Calculator(art)
        atoms.get_potential_energy()
    with pytest.raises(ValueError, match="compile"):
        forcecentric.Calculator(art, compile=True)


def test_artifact_runs_in_a_process_without_forcecentric(model_path, tmp_path):
    art = export(model_path, tmp_path / "model.pt")
    atoms = molecule("CH3CH2OH")
    ref = forcecentric.load(model_path)(torch.tensor(atoms.numbers), torch.tensor(atoms.positions, dtype=torch.float32))
    code = (
        "import json, sys, torch\n"
        f"m = torch.jit.load({str(art)!r})\n"
        f"z = torch.tensor({atoms.numbers.tolist()})\n"
        f"pos = torch.tensor({atoms.positions.tolist()}, dtype=torch.float32)\n"
        "out = m(z, pos)\n"
        "assert not any(k.startswith('forcecentric') for k in sys.modules), 'forcecentric was imported'\n"
        "print(json.dumps({'energy': out['energy'].tolist(), 'forces': out['forces'].tolist()}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["energy"][0] == pytest.approx(float(ref["energy"][0]), abs=1e-4)
    np.testing.assert_allclose(got["forces"], ref["forces"].numpy(), atol=1e-5)


def test_export_cli_and_bad_artifacts(model_path, tmp_path, capsys):
    from forcecentric.cli import main

    out = tmp_path / "sub" / "frozen.pt"
    assert main(["export", "--model", str(model_path), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["artifact"] == str(out) and report["elements"] == [1, 6, 8] and report["dtype"] == "float32"
    # MD runs on the artifact like on the checkpoint
    md = tmp_path / "md"
    assert main(["simulate", "--model", str(out), "--structure", "CCO", "--steps", "6", "--save-every", "3",
                 "--out", str(md), "--no-progress"]) == 0
    summary = json.loads((md / "summary.json").read_text())
    assert summary["steps_completed"] == 6 and summary["stopped_reason"] is None
    capsys.readouterr()
    with pytest.raises(CheckpointError, match="already an exported artifact"):
        export(out, tmp_path / "again.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="broken.pt"):
        forcecentric.load(broken)


def test_compiled_inference_equals_eager(tiny_config, tmp_path):
    import warnings

    from forcecentric.nn.model import ForceField

    gen = torch.Generator().manual_seed(1)
    z = torch.randint(1, 9, (12,), generator=gen)
    pos = torch.rand(12, 3, generator=gen) * 4.0
    # two sizes compiled in one process: one that Inductor (torch 2.13, CPU) compiles right, and
    # the pre-training size (F=64, 3 layers), for which it generated wrong forces: the first
    # call's check against the eager model catches that and the model goes back to the eager
    # path, with a warning. (Each size compiles twice, for two edge counts: about a minute each
    # on 2 cores, so the suite keeps two sizes.)
    for layers, width, denoise in ((2, 32, True), (3, 64, False)):
        torch.manual_seed(layers)
        model = ForceField(tiny_config.model_copy(
            update={"num_layers": layers, "hidden_channels": width, "denoise_head": denoise, "num_rbf": 32})).eval()
        refs = [model(z, pos * scale) for scale in (1.0, 1.3)]
        model.compile_inference()
        assert model.is_compiled and model.compile_check is None
        for scale, ref in zip((1.0, 1.3), refs):  # another edge count
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = model(z, pos * scale)
            check = model.compile_check
            assert check is not None and check["max_abs_force_deviation"] >= 0
            assert model.is_compiled == check["passed"]
            if scale == 1.0:
                assert any(issubclass(w.category, RuntimeWarning) and "eager path" in str(w.message)
                           for w in caught) == (not check["passed"])
            torch.testing.assert_close(got["energy"], ref["energy"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got["forces"], ref["forces"], atol=1e-5, rtol=1e-5)
            if denoise:
                torch.testing.assert_close(got["noise_pred"], ref["noise_pred"], atol=1e-5, rtol=1e-5)
    model = ForceField(tiny_config.model_copy(update={"num_layers": 1, "hidden_channels": 16})).eval()
    model.compile_inference()
    # export scripts an eager copy and leaves the caller's model compiled
    model.elements = [1, 2, 3, 4, 5, 6, 7, 8]
    art = export(model, tmp_path / "compiled.pt")
    assert model.is_compiled
    eager = model.disable_compile()(z, pos)
    torch.testing.assert_close(forcecentric.load(art)(z, pos)["forces"], eager["forces"], atol=1e-5, rtol=1e-5)
    model.compile_inference().train()
    with pytest.raises(RuntimeError, match="disable_compile"):
        model(z, pos, create_graph=True)


def test_compiled_model_with_wrong_forces_goes_back_to_eager(tiny_config):
    from forcecentric.nn.model import ForceField

    torch.manual_seed(0)
    model = ForceField(tiny_config).eval()
    atoms = molecule("CH3CH2OH")
    z, pos = torch.tensor(atoms.numbers), torch.tensor(atoms.positions, dtype=torch.float32)
    ref = model(z, pos)
    model.compile_inference()

    def wrong(z, pos, batch, edge_index):  # what a miscompiled graph does: right energies, wrong slope
        e, x, vec = ForceField._atom_energy(model, z, pos, batch, edge_index)
        return e + 1e-3 * (pos - pos.detach()).sum(dim=1), x, vec

    model.__dict__["_atom_energy"] = wrong
    p = pos.clone().requires_grad_(True)  # the caller's graph stays connected after the fallback
    with pytest.warns(RuntimeWarning, match="eager path"):
        got = model(z, p)
    assert not model.is_compiled and model.compile_check["passed"] is False
    assert model.compile_check["max_abs_force_deviation"] == pytest.approx(1e-3, rel=1e-3)
    torch.testing.assert_close(got["forces"], ref["forces"], atol=1e-6, rtol=0)
    (g,) = torch.autograd.grad(got["energy"].sum(), p)
    torch.testing.assert_close(-g, ref["forces"], atol=1e-6, rtol=0)
    # a correct compiled function passes the check and stays
    model.compile_inference()
    model.__dict__["_atom_energy"] = lambda *a: ForceField._atom_energy(model, *a)
    model(z, pos)
    assert model.is_compiled and model.compile_check["passed"] is True
