"""The same results on a CUDA GPU as on the CPU: the model, the neighbour search, the calculator
and its fast paths, the exported artifact, training and MD. Skipped without a GPU (CI has none);
``python -m pytest tests/test_cuda.py`` on a GPU machine runs them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase import units
from ase.build import molecule
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet

import forcecentric
from conftest import edge_set
from forcecentric.nn import VerletList, radius_graph
from forcecentric.nn.neighbors import DENSE_MAX_ATOMS_CUDA
from forcecentric.nn.model import ForceField

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = "cuda"


def _batch_of(*names: str, gap: float = 20.0):
    mols = [molecule(n) for n in names]
    z = torch.tensor(np.concatenate([m.numbers for m in mols]))
    pos = torch.tensor(np.concatenate([m.positions + i * gap for i, m in enumerate(mols)]))
    batch = torch.tensor(np.concatenate([[i] * len(m) for i, m in enumerate(mols)]))
    return z, pos, batch


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_model_on_cuda_gives_the_cpu_energies_and_forces(tiny_config, dtype, atol):
    torch.manual_seed(0)
    model = ForceField(tiny_config).to(dtype).eval()
    model.set_normalization(scale=0.5, atomref={1: -13.0, 6: -1000.0, 8: -2000.0})
    z, pos, batch = _batch_of("CH3CH2OH", "CH3COOH", "H2O")
    pos = pos.to(dtype)
    ref = model(z, pos, batch)
    got = model.to(CUDA)(z.to(CUDA), pos.to(CUDA), batch.to(CUDA))
    assert got["energy"].device.type == "cuda" and got["forces"].device.type == "cuda"
    assert got["forces"].dtype == dtype and torch.isfinite(got["forces"]).all()
    torch.testing.assert_close(got["energy"].cpu(), ref["energy"], atol=atol * 10, rtol=0)
    torch.testing.assert_close(got["forces"].cpu(), ref["forces"], atol=atol, rtol=0)


def test_equivariance_on_cuda(tiny_config):
    torch.manual_seed(1)
    model = ForceField(tiny_config).double().to(CUDA).eval()
    z, pos, batch = (t.to(CUDA) for t in _batch_of("CH3CH2OH", "CH3COOH"))
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, device=CUDA))
    shift = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, device=CUDA)
    a = model(z, pos, batch)
    b = model(z, pos @ q.T + shift, batch)
    torch.testing.assert_close(b["energy"], a["energy"], atol=1e-9, rtol=0)
    torch.testing.assert_close(b["forces"], a["forces"] @ q.T, atol=1e-9, rtol=0)


@pytest.mark.parametrize("n_atoms", [30, DENSE_MAX_ATOMS_CUDA + 88])  # dense back-end; vesin's
def test_radius_graph_on_cuda_equals_cpu_and_verlet_list_reuses_it(n_atoms):
    gen = torch.Generator().manual_seed(n_atoms)
    side = 2.2 * n_atoms ** (1 / 3)
    pos = torch.rand(n_atoms, 3, generator=gen, dtype=torch.float64) * side
    batch = torch.zeros(n_atoms, dtype=torch.long)
    batch[n_atoms // 3:] = 1
    ref = radius_graph(pos, batch, 3.0)
    got = radius_graph(pos.to(CUDA), batch.to(CUDA), 3.0)
    assert got.device.type == "cuda" and got.dtype == torch.long
    assert edge_set(got) == edge_set(ref) and ref.shape[1] > 0
    nl = VerletList(cutoff=3.0, skin=0.5)
    p = pos.to(CUDA)
    for _ in range(10):
        p = p + 0.02 * torch.randn(p.shape, dtype=p.dtype, device=CUDA)
        assert edge_set(nl(p, batch.to(CUDA))) == edge_set(radius_graph(p.cpu(), batch, 3.0))
    assert nl.n_builds < nl.n_calls


def test_calculator_on_cuda_follows_the_cpu_calculator_through_md(model_path):
    trajs = {}
    for device in ("cpu", CUDA):
        atoms = molecule("CH3CH2OH")
        thermalize_momenta(atoms, temperature_K=600, rng=np.random.default_rng(0))
        calc = forcecentric.Calculator(model_path, device=device, dtype="float64", skin=0.3)
        atoms.calc = calc
        dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
        frames = []
        for _ in range(5):
            dyn.run(2)
            frames.append((atoms.get_potential_energy(), atoms.get_forces().copy(), atoms.positions.copy()))
        assert calc.neighbors.n_builds < calc.neighbors.n_calls
        trajs[device] = frames
    for (e0, f0, x0), (e1, f1, x1) in zip(trajs["cpu"], trajs[CUDA]):
        assert e1 == pytest.approx(e0, abs=1e-8)
        np.testing.assert_allclose(f1, f0, atol=1e-8)
        np.testing.assert_allclose(x1, x0, atol=1e-10)


def test_batched_predict_and_compile_on_cuda(model_path):
    mols = [molecule(n) for n in ("CH3CH2OH", "CH3OH", "CH3COOH", "H2O")]
    ref_e, ref_f = forcecentric.Calculator(model_path, dtype="float64").predict(mols, batch_size=4)
    e, f = forcecentric.Calculator(model_path, device=CUDA, dtype="float64").predict(mols, batch_size=3)
    np.testing.assert_allclose(e, ref_e, atol=1e-8)
    for a, b in zip(f, ref_f):
        np.testing.assert_allclose(a, b, atol=1e-8)
    compiled = forcecentric.Calculator(model_path, device=CUDA, compile=True)
    ce, cf = compiled.predict(mols, batch_size=1)
    np.testing.assert_allclose(ce, ref_e, atol=5e-3)
    for a, b in zip(cf, ref_f):
        np.testing.assert_allclose(a, b, atol=5e-4)
    with pytest.raises(ValueError, match="fused=True needs device='cpu'"):
        forcecentric.Calculator(model_path, device=CUDA, fused=True)


def test_exported_artifact_runs_on_cuda(model_path, tmp_path):
    from forcecentric.export import export

    art = export(model_path, tmp_path / "model.pt", dtype="float64")
    frozen = forcecentric.load(art, device=CUDA)
    z, pos, batch = _batch_of("CH3CH2OH", "CH3COOH")
    ref = forcecentric.load(model_path, dtype="float64")(z, pos, batch)
    got = frozen(z.to(CUDA), pos.to(CUDA), batch.to(CUDA))
    assert got["forces"].device.type == "cuda"
    torch.testing.assert_close(got["energy"].cpu(), ref["energy"], atol=1e-8, rtol=0)
    torch.testing.assert_close(got["forces"].cpu(), ref["forces"], atol=1e-8, rtol=0)


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_training_on_gpu_writes_a_checkpoint_that_loads_anywhere(tmp_path, morse_file, precision):
    from forcecentric.config import load_run_config
    from forcecentric.train.run import run

    cfg = load_run_config(None, {
        "run_dir": str(tmp_path / "run"),
        "model.hidden_channels": 32, "model.num_layers": 2, "model.num_heads": 4, "model.num_rbf": 16,
        "data.train": [str(morse_file)], "data.n_val": 8, "data.n_test": 8, "data.batch_size": 8,
        "trainer.max_epochs": 3, "trainer.progress_bar": False, "optim.warmup_steps": 2,
        "trainer.accelerator": "gpu", "trainer.precision": precision,
    })
    metrics = run(cfg)
    assert np.isfinite(metrics["test"]["force_mae"])
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["epochs"] == 3
    model = forcecentric.load(tmp_path / "run" / "model.ckpt")  # a CPU load of a GPU run
    assert next(model.parameters()).device.type == "cpu"
    a = molecule("CH3CH2OH")
    cpu = model(torch.tensor(a.numbers), torch.tensor(a.positions, dtype=torch.float32))
    gpu = forcecentric.load(tmp_path / "run" / "model.ckpt", device=CUDA)(
        torch.tensor(a.numbers, device=CUDA), torch.tensor(a.positions, dtype=torch.float32, device=CUDA))
    torch.testing.assert_close(gpu["forces"].cpu(), cpu["forces"], atol=2e-4, rtol=0)


def test_simulate_cli_on_cuda(model_path, tmp_path):
    import ase.io

    from forcecentric.cli import main

    start = tmp_path / "ethanol.xyz"  # a file, not a SMILES: no RDKit needed on the GPU machine
    ase.io.write(start, molecule("CH3CH2OH"))
    out = tmp_path / "md"
    assert main(["simulate", "--model", str(model_path), "--structure", str(start), "--steps", "20",
                 "--save-every", "5", "--device", CUDA, "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_completed"] == 20 and summary["stopped_reason"] is None
